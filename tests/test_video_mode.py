"""Video mode end to end on a micro toy video target: its folder, training batches of clips,
the runner on a clip against `generate`, the length sweep's report and the keep-or-offload
policy."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from covspec.data.chat import frames_as_images
from covspec.data.datamodule import Collator, load_conversations
from covspec.data.resumable import ResumableSampler
from covspec.data.toy_video import (
    ToyVideoClips,
    Track,
    clip_frame,
    event_questions,
    frame_objects,
    make_clip,
    toy_video_prompts,
)
from covspec.inference.media import Media
from covspec.inference.runner import SpecRunner
from covspec.inference.sweep import (
    auto_gaps,
    depth_table_from,
    markdown_table,
    paired_gain_low,
    run_sweep,
    tau_change,
    threshold_from,
    write_sweep,
)
from covspec.inference.tree import DraftSettings
from covspec.inference.visual_policy import AutoVisualPolicy
from covspec.modeling.adapters import adapter_for
from covspec.modeling.drafter import Drafter, DrafterConfig
from covspec.training.toy_target import REPORT_NAME, build_toy_target
from covspec.training.toy_video_target import ToyVideoTargetSettings
from tests.test_toy_target import MICRO

MICRO_VIDEO = ToyVideoTargetSettings(  # the micro image target's sizes, 9 tokens a frame
    spec=dataclasses.replace(MICRO.spec, patch_size=24, max_position_embeddings=1024),
    vision_steps=2,
    vision_batch=4,
    lm_steps=20,
    lm_batch=4,
    warmup_steps=1,
    max_frames=4,
    eval_samples=1,
    eval_frames=(2, 3),
)
TOKENS_PER_FRAME = 9  # 72 px frames in 24 px patches


@pytest.fixture(scope="module")
def video_target(tmp_path_factory):
    out = tmp_path_factory.mktemp("targets") / "micro-video"
    report = build_toy_target(out, MICRO_VIDEO)
    return out, report


@pytest.fixture(scope="module")
def loaded(video_target):
    out, _ = video_target
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    return model, AutoProcessor.from_pretrained(out)


def test_the_video_target_trains_one_clip_length_per_language_batch(loaded):
    _, processor = loaded
    encode = MICRO_VIDEO.lm_encode(processor)
    batch = MICRO_VIDEO.lm_batch
    frames = [len(encode(k)["pixel_values"]) for k in range(6 * batch)]
    per_batch = [set(frames[i : i + batch]) for i in range(0, len(frames), batch)]
    assert all(len(lengths) == 1 for lengths in per_batch), frames
    assert len(set.union(*per_batch)) > 1, frames  # while lengths still differ across batches


@pytest.fixture(scope="module")
def drafters(video_target, loaded, tmp_path_factory):
    """A visual-token-free, a full-visual, a one-row-per-frame and an elastic drafter (random
    weights)."""
    adapter = adapter_for(loaded[0])
    root = tmp_path_factory.mktemp("video-drafters")
    torch.manual_seed(0)
    kinds = {
        "free": {},
        "full": {"variant": "full_visual"},
        "pool3": {"visual_prefix": "compressed", "compressor": {"options": ["pool:3"]}},
        "elastic": {
            "visual_prefix": "compressed",
            "compressor": {"options": ["none", "pool:3", "tpool:4"], "gate": "critic"},
        },
    }
    for name, kw in kinds.items():
        Drafter(DrafterConfig.for_target(adapter, **kw)).save_pretrained(root / name)
    return {name: root / name for name in kinds}


def test_event_questions_and_frame_objects_follow_the_ground_truth():
    clip = make_clip(3, 1, 6)
    tracks = [Track(**t) for t in clip["tracks"]]
    kinds = [k for k, _, _ in event_questions(tracks)]
    assert kinds.count("where_to") == len(tracks) and kinds.count("count") == 1
    assert ("leaves" in kinds) == any(t.leave is not None for t in tracks)
    for f in range(6):
        names = {f"{o['colour']} {o['shape']}" for o in frame_objects(clip["tracks"], f, 6, 72)}
        assert names == {t.name for t in tracks if t.at(f, 6, 72) is not None}


def test_one_frame_drawn_alone_is_the_clips_frame():
    clip = make_clip(4, 2, 7)
    for f in (0, 3, 6):
        image, objects = clip_frame(4, 2, 7, f)
        assert image.tobytes() == clip["frames"][f].tobytes()
        assert objects == frame_objects(clip["tracks"], f, 7, 72)


def test_frames_as_images_puts_one_image_slot_per_frame():
    msgs = [
        {"role": "user", "content": "<video>\nWhat happens?"},
        {"role": "assistant", "content": "x"},
    ]
    out = frames_as_images(msgs, 3)
    assert out[0]["content"] == "<image>\n<image>\n<image>\nWhat happens?"
    assert out[1] == msgs[1] and msgs[0]["content"].startswith("<video>")
    with pytest.raises(ValueError, match="num_frames"):
        frames_as_images(msgs, 0)


def test_video_target_folder_loads_with_auto_classes_and_reports_event_accuracy(
    video_target, loaded
):
    out, report = video_target
    assert json.loads((out / REPORT_NAME).read_text())["settings_digest"] == MICRO_VIDEO.digest()
    assert 0.0 <= report["event_accuracy"] <= 1.0
    assert {"frames=2", "frames=3", "where_to", "count"} <= set(report["event_accuracy_by"])
    assert loaded[0].config.text_config.max_position_embeddings == 1024
    assert loaded[1].tokenizer.model_max_length == 1024  # no false "too long" warnings
    assert build_toy_target(out, MICRO_VIDEO)["train_seconds"] == report["train_seconds"]  # cached


def test_bad_video_target_settings_are_refused():
    with pytest.raises(ValueError, match="min_frames"):
        ToyVideoTargetSettings(min_frames=5, max_frames=3)
    with pytest.raises(ValueError, match="eval_frames"):
        ToyVideoTargetSettings(eval_frames=(1,))


def test_toyvideo_spec_gives_lazy_deterministic_clips_of_mixed_length():
    ds = load_conversations("toyvideo:50:4:2-5")
    assert isinstance(ds, ToyVideoClips) and len(ds) == 50
    lengths = {len(ds[i]["video"]) for i in range(50)}
    assert lengths <= {2, 3, 4, 5} and len(lengths) > 1
    assert [f.tobytes() for f in ds[7]["video"]] == [f.tobytes() for f in ds[7]["video"]]
    for bad in ("toyvideo:x", "toyvideo:5:1:9", "toyvideo:5:1:2-9:cubic", "toyvideo:5:1:2-9:log:x"):
        with pytest.raises(ValueError, match="toyvideo"):
            load_conversations(bad)
    with pytest.raises(IndexError):
        ds[50]


def test_log_spread_covers_the_range_with_as_many_short_as_long_clips():
    lengths = load_conversations("toyvideo:4000:4:2-512:log").lengths
    assert min(lengths) == 2 and 500 <= max(lengths) <= 512
    short = sum(2 <= n < 8 for n in lengths)  # log2 spans: 2 octaves each
    long = sum(128 <= n <= 512 for n in lengths)
    assert abs(short - long) < 0.15 * len(lengths) / 4  # each about a quarter of the clips
    uniform = load_conversations("toyvideo:4000:4:2-512").lengths
    assert sum(n < 8 for n in uniform) < 0.02 * len(uniform)
    with pytest.raises(ValueError, match="spread"):
        ToyVideoClips(4, spread="cubic")
    with pytest.raises(ValueError, match="frame_spread"):
        ToyVideoTargetSettings(frame_spread="cubic")


def test_grouped_sampler_batches_clips_of_like_lengths_and_resumes():
    clips = ToyVideoClips(960, seed=3, min_frames=2, max_frames=256, spread="log")
    lengths = clips.lengths

    def batches(sampler, batch=16):
        order = list(sampler)
        return [order[i : i + batch] for i in range(0, len(order), batch)]

    sampler = ResumableSampler(clips, True, seed=0, group_batch=16)
    sampler.set_epoch(2)
    grouped = batches(sampler)
    assert sorted(i for b in grouped for i in b) == list(range(960))  # every clip once
    # a batch spans a few frames, where a shuffled batch spans most of 2-256
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in grouped]
    plain = batches(ResumableSampler(clips, True, seed=0))
    plain_spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain]
    assert sorted(spans)[len(spans) // 2] * 10 < sorted(plain_spans)[len(plain_spans) // 2]
    again = ResumableSampler(clips, True, seed=0, group_batch=16)
    again.set_epoch(2)
    again.skip = 32  # resumed two batches in: the same order from there
    assert list(again) == [i for b in grouped for i in b][32:]
    other = ResumableSampler(clips, True, seed=0, group_batch=16)
    other.set_epoch(3)
    assert batches(other) != grouped  # a new order each epoch
    halves = [ResumableSampler(clips, True, 0, 2, r, group_batch=8) for r in (0, 1)]
    for h in halves:
        h.set_epoch(2)
    assert sorted(list(halves[0]) + list(halves[1])) == list(range(960))
    with pytest.raises(ValueError, match="lengths"):
        ResumableSampler(list(range(10)), True, seed=0, group_batch=4)


def test_collator_shows_a_clip_as_its_frames(loaded):
    _, processor = loaded
    rows = [ToyVideoClips(4, seed=1, max_frames=4)[i] for i in range(2)]
    batch = Collator(processor, max_length=None)(rows)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for i, row in enumerate(rows):
        assert int((batch["input_ids"][i] == image_id).sum()) == TOKENS_PER_FRAME * len(
            row["video"]
        )
    assert batch["pixel_values"].shape[0] == sum(len(r["video"]) for r in rows)
    assert batch["loss_mask"].any(1).all()


@pytest.mark.parametrize("name", ["free", "full", "pool3", "elastic"])
def test_runner_on_a_clip_is_identical_to_generate(loaded, drafters, name):
    model, processor = loaded
    runner = SpecRunner.for_drafter_folder(model, processor, str(drafters[name]))
    prompt = toy_video_prompts(1, 3)[0]
    media = Media(video=prompt["frames"])
    inputs = runner.encode(media, prompt["prompt"])
    assert int(torch.isin(inputs["input_ids"], runner.visual_ids).sum()) == 3 * TOKENS_PER_FRAME
    want = model.generate(
        **inputs, do_sample=False, max_new_tokens=12, suppress_tokens=runner.suppress_tokens
    )[0, inputs["input_ids"].shape[1] :].tolist()
    result = runner.generate(media, prompt["prompt"], 12, DraftSettings(mode="tree", depth=3))
    assert result.tokens == want
    assert result.visual_tokens == 3 * TOKENS_PER_FRAME
    # pool:3 = one row per frame; tpool:4 = one 3x3 grid for the 3 frames; none = no rows
    expected_prefix = {"free": {0}, "full": {0}, "pool3": {3}, "elastic": {0, 3, 9}}[name]
    assert result.prefix_tokens in expected_prefix
    assert result.drafter_kv_bytes > 0


def test_drafter_kv_cache_grows_with_frames_only_for_a_visual_prefix(loaded, drafters):
    model, processor = loaded
    sizes = {}
    for name in ("free", "full"):
        runner = SpecRunner.for_drafter_folder(model, processor, str(drafters[name]))
        for frames in (2, 6):
            p = toy_video_prompts(1, frames)[0]
            r = runner.generate(Media(video=p["frames"]), p["prompt"], 1, DraftSettings("chain", 2))
            sizes[name, frames] = r.drafter_kv_bytes
    cfg = DrafterConfig.from_pretrained(drafters["full"])
    row = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    # full: every visual token and separator is a row; free: neither (same text, same cache)
    assert sizes["full", 6] - sizes["full", 2] == row * 4 * (TOKENS_PER_FRAME + 1)
    assert sizes["free", 6] == sizes["free", 2] > 0


def test_auto_policy_keeps_short_and_offloads_long_clips(loaded, drafters):
    model, processor = loaded
    keep = SpecRunner.for_drafter_folder(model, processor, str(drafters["pool3"]))
    offload = SpecRunner.for_drafter_folder(model, processor, str(drafters["free"]))
    auto = AutoVisualPolicy(keep, offload, threshold=3 * TOKENS_PER_FRAME)
    settings = DraftSettings(mode="tree", depth=3)
    for frames, choice in ((3, "keep"), (4, "offload")):
        p = toy_video_prompts(1, frames)[0]
        media = Media(video=p["frames"])
        result = auto.generate(media, p["prompt"], 8, settings)
        alone = (keep if choice == "keep" else offload).generate(media, p["prompt"], 8, settings)
        assert result.tokens == alone.tokens and result.prefix_tokens == alone.prefix_tokens
        assert result.seconds["encode"] > 0
    assert auto.choices == {"keep": 1, "offload": 1}
    assert AutoVisualPolicy(keep, offload, None).choose(10**6) == "keep"
    with pytest.raises(ValueError, match="threshold"):
        AutoVisualPolicy(keep, offload, -1)


def test_auto_policy_ties_the_draft_depth_to_the_clip_length(loaded, drafters):
    model, processor = loaded
    keep = SpecRunner.for_drafter_folder(model, processor, str(drafters["pool3"]))
    offload = SpecRunner.for_drafter_folder(model, processor, str(drafters["free"]))
    table = [(2 * TOKENS_PER_FRAME, 2), (None, 4)]
    auto = AutoVisualPolicy(keep, offload, threshold=None, depths=table)
    for frames, depth in ((2, 2), (3, 4)):
        p = toy_video_prompts(1, frames)[0]
        media = Media(video=p["frames"])
        result = auto.generate(media, p["prompt"], 8, DraftSettings(mode="tree", depth=3))
        alone = keep.generate(media, p["prompt"], 8, DraftSettings(mode="tree", depth=depth))
        assert result.tokens == alone.tokens and len(result.attempts_per_depth) == depth
    assert auto.depth_choices == {2: 1, 4: 1}
    for bad in ([(None, 2), (None, 3)], [(30, 2), (10, 3), (None, 4)], [(30, 2)], [(None, 0)]):
        with pytest.raises(ValueError, match="depths"):
            AutoVisualPolicy(keep, offload, None, depths=bad)


def test_sweep_report_schema_table_plot_and_policy(video_target, drafters, tmp_path):
    out, _ = video_target
    paths = [str(drafters[n]) for n in ("free", "pool3", "elastic")]
    policies = {"auto": lambda r: AutoVisualPolicy(r["pool3"], r["free"], 2 * TOKENS_PER_FRAME)}
    report = run_sweep(
        str(out), paths, [2, 3], clips=1, max_new_tokens=6, policies=policies, warmup=0
    )
    assert [p["frames"] for p in report["points"]] == [2, 3]
    assert [p["visual_tokens"] for p in report["points"]] == [18.0, 27.0]
    for p in report["points"]:
        assert set(p["methods"]) == {"free", "pool3", "elastic", "auto"}
        rows = {n: m["visual_prefix_tokens"] for n, m in p["methods"].items()}
        assert rows["free"] == 0 and rows["pool3"] == p["frames"] and rows["auto"] is None
        assert all(len(m["clip_seconds"]) == 1 for m in p["methods"].values())
        picks = p["methods"]["elastic"]["gate_choices"]
        assert sum(sum(c.values()) for c in picks.values()) == 1  # one clip, one pick
        for m in p["methods"].values():
            assert m["identical_fraction"] == 1.0 and m["tau"] >= 1.0
            assert m["drafter_ms_per_step"] > 0 and m["drafter_kv_bytes"] > 0
            assert m["speedup"] > 0 and m["decode_speedup"] > 0
    page = markdown_table(report)
    assert "| 3 | 27 |" in page and "| auto | - |" in page and "| pool3 | 3.0 |" in page
    assert "`elastic` gate picks (prompts per option): 2 frames: " in page
    policy = {"keep": "pool3", "offload": "free", "threshold_visual_tokens": 18}
    policy |= {"threshold_from": "a.json", "depth_from": "a.json"}
    one = markdown_table({**report, "policy": {**policy, "depths": [(None, 6)]}})
    assert "depth (a.json): 6 at every length" in one
    two = markdown_table({**report, "policy": {**policy, "depths": [(20, 4), (None, 6)]}})
    assert "depth 4 up to 20 tokens, depth 6 beyond" in two
    assert all(0 < p["answer_tokens"] <= 6 for p in report["points"])
    assert all(p["methods"]["pool3"]["gate_choices"] is None for p in report["points"])
    write_sweep(report, tmp_path / "s.json")
    assert (tmp_path / "s.png").stat().st_size > 0 and (tmp_path / "s.md").is_file()
    assert json.loads((tmp_path / "s.json").read_text())["points"][0]["frames"] == 2
    with pytest.raises(ValueError, match="frames"):
        run_sweep(str(out), paths, [1], clips=1, max_new_tokens=2)


def test_sweep_runs_every_drafter_at_each_depth(video_target, drafters):
    out, _ = video_target
    report = run_sweep(
        str(out), [str(drafters["free"])], [2], clips=1, max_new_tokens=6, warmup=0,
        depths=[2, 5],
    )  # fmt: skip
    methods = report["points"][0]["methods"]
    assert set(methods) == {"free@d2", "free@d5"} and report["depths"] == [2, 5]
    assert all(m["identical_fraction"] == 1.0 for m in methods.values())


def test_depth_table_takes_a_deeper_draft_only_where_it_pays():
    def point(tokens, speedups):
        methods = {f"{n}@d{d}": {"speedup": v} for (n, d), v in speedups.items()}
        return {"visual_tokens": tokens, "frames": tokens // 9, "methods": methods}

    report = {
        "points": [
            point(72, {("k", 4): 2.0, ("k", 6): 2.1, ("o", 6): 1.0, ("o", 8): 1.0}),
            point(576, {("k", 4): 1.0, ("k", 6): 1.0, ("o", 6): 1.50, ("o", 8): 1.52}),
            point(5184, {("k", 6): 0.5, ("o", 6): 1.0, ("o", 8): 1.2}),
        ]
    }
    runs = lambda tokens: "k" if tokens <= 100 else "o"  # noqa: E731
    # 576: o@d8 is within 3% of depth 6 (noise), so 6; 5184: 20% faster at 8
    assert depth_table_from(report, runs, default=6) == [(2880, 6), (None, 8)]
    assert depth_table_from(report, runs, default=6, min_gain=0.0) == [(324, 6), (None, 8)]
    with pytest.raises(ValueError, match="o@d4"):
        depth_table_from(report, "o", default=4)


def test_depth_table_refuses_a_gain_the_clips_do_not_support():
    def point(d8_clips):
        d6_clips = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
        methods = {
            f"o@d{d}": {"speedup": 6 / sum(c), "clip_seconds": c}
            for d, c in ((6, d6_clips), (8, d8_clips))
        }
        return {"points": [{"visual_tokens": 72, "frames": 8, "methods": methods}]}

    # 7% faster in total, all of it from one clip: the bootstrap's low end is below 0
    noisy = point([0.55, 1.05, 1.05, 1.05, 1.05, 0.85])
    assert noisy["points"][0]["methods"]["o@d8"]["speedup"] > 1.06
    assert depth_table_from(noisy, "o", default=6) == [(None, 6)]
    # 7% faster on every clip: it pays
    steady = point([0.935] * 6)
    assert depth_table_from(steady, "o", default=6) == [(None, 8)]
    assert paired_gain_low([1.0] * 6, [0.935] * 6) > 0.06
    with pytest.raises(ValueError, match="differ in length"):
        paired_gain_low([1.0, 1.0], [1.0])


def _fake(rows):
    return {
        "points": [
            {"visual_tokens": v, "methods": {"k": {"speedup": k}, "o": {"speedup": o}}}
            for v, k, o in rows
        ]
    }


def test_threshold_is_where_offloading_starts_to_win_for_good():
    assert (
        threshold_from(
            _fake([(80, 2.0, 1.5), (300, 1.8, 1.7), (1000, 1.2, 1.6), (5000, 0.6, 1.5)]), "k", "o"
        )
        == 650
    )
    assert threshold_from(_fake([(80, 2.0, 1.5), (5000, 1.9, 1.5)]), "k", "o") is None
    assert threshold_from(_fake([(80, 1.0, 1.5), (5000, 0.5, 1.5)]), "k", "o") == 0
    # a noisy early win of offload does not set the threshold; the last crossing does
    assert (
        threshold_from(_fake([(80, 1.4, 1.5), (300, 1.8, 1.7), (1000, 1.2, 1.6)]), "k", "o") == 650
    )
    # offload wins a tie within 3% (no visual rows at the same speed); tie=0 makes it strict
    tied = _fake([(80, 2.0, 1.5), (1000, 1.5, 1.6), (5000, 1.16, 1.14)])
    assert threshold_from(tied, "k", "o") == 540
    assert threshold_from(tied, "k", "o", tie=0.0) is None
    # a sweep over several depths is read at its default depth
    deep = _fake([(80, 2.0, 1.5), (1000, 1.2, 1.6)])
    for p in deep["points"]:
        p["methods"] = {f"{n}@d{d}": m for n, m in p["methods"].items() for d in (4, 6)}
    assert threshold_from({**deep, "depths": [4, 6], "depth": 6}, "k", "o") == 540
    with pytest.raises(ValueError, match="no method 'k@d8'"):
        threshold_from({**deep, "depths": [4, 6], "depth": 8}, "k", "o")


def test_auto_gap_is_against_the_better_of_keep_and_offload_with_a_paired_interval():
    def point(frames, k, o, auto):  # clip seconds; the same tokens, so speedup ~ 1 / time
        m = {
            n: {"clip_seconds": c, "speedup": 1 / sum(c)}
            for n, c in zip("koa", (k, o, auto), strict=True)
        }
        return {"frames": frames, "methods": {"k": m["k"], "o": m["o"], "auto": m["a"]}}

    steady = [1.0, 2.0, 3.0, 4.0]
    report = {
        "policy": {
            "keep": "k",
            "offload": "o",
            "threshold_visual_tokens": 10,
            "threshold_from": "a",
        },
        "points": [
            point(8, steady, [2 * t for t in steady], steady),  # auto runs keep: no gap
            point(64, steady, [0.5 * t for t in steady], [0.55 * t for t in steady]),
            point(576, [1.0] * 4, [2.0] * 4, [0.5, 0.5, 4.0, 0.5]),  # one slow clip
        ],
    }
    (f8, n8, g8, *i8), (f64, n64, g64, *i64), (_, _, g576, lo, hi) = auto_gaps(report)
    assert (f8, n8, f64, n64) == (8, "k", 64, "o")  # the faster one at each length
    assert g8 == pytest.approx(0.0) and i8 == pytest.approx([0.0, 0.0])
    assert g64 == pytest.approx(1 / 1.1 - 1) and i64 == pytest.approx([1 / 1.1 - 1] * 2)
    assert g576 == pytest.approx(4 / 5.5 - 1) and lo < g576 < hi  # resampled over the clips
    page = markdown_table({**report, "points": []})
    assert "against the better of keep and offload" in page
    assert auto_gaps({"points": report["points"]}) == []  # no policy, no gap


def test_tau_change_compares_the_longest_length_with_the_shortest():
    def point(frames, decode):  # per clip [tokens decoded, target forwards]
        return {"frames": frames, "methods": {"d": {"clip_decode": decode}, "auto": {}}}

    steady = {"points": [point(64, [[30, 6]] * 4), point(8, [[30, 5]] * 4)]}
    assert tau_change(steady, "d") == pytest.approx((8, 64, -1 / 6, -1 / 6, -1 / 6))
    mixed = {"points": [point(8, [[30, 5], [20, 5]]), point(64, [[30, 6], [10, 5]])]}
    first, last, change, low, high = tau_change(mixed, "d")
    assert change == pytest.approx((40 / 11) / 5 - 1) and low < change < high
    assert tau_change(mixed, "auto") is None  # no per-clip rounds kept: no claim


def test_sweep_reports_its_clip_seed_and_repeats(monkeypatch):
    import covspec.inference.sweep as sweep

    seen = []

    def fake_prompts(clips, frames, seed):
        seen.append((clips, frames, seed))
        from PIL import Image

        return [{"id": "c", "frames": [Image.new("RGB", (8, 8))], "prompt": "p"}]

    def fake_bench(target, drafters, samples, max_new_tokens, **kw):
        seen.append((kw["repeats"], kw["prompt_lookup"]))
        hf = {"kind": "baseline", "ms_per_sample": {"total": 1.0}}
        return {"methods": {"hf_greedy": hf}, "samples": [{"token_ids": {"hf_greedy": [1]}}]}

    monkeypatch.setattr(sweep, "toy_video_prompts", fake_prompts)
    monkeypatch.setattr(sweep, "run_bench", fake_bench)
    report = run_sweep("t", [], [4], clips=3, max_new_tokens=2, repeats=2, seed=7)
    assert seen == [(3, 4, 7), (2, False)]  # and no prompt lookup: the sweep never reports it
    assert (report["seed"], report["repeats"]) == (7, 2)


def test_video_sweep_command_refuses_an_auto_policy_it_cannot_build(tmp_path, capsys):
    from covspec.scripts.cli import main

    target, drafter = tmp_path / "t", tmp_path / "d"
    target.mkdir(), drafter.mkdir()
    base = [
        "video-sweep",
        "--target",
        str(target),
        "--drafter",
        str(drafter),
        "--visual-policy",
        "auto",
    ]
    assert main([*base, "--keep", "d", "--offload", "other", "--threshold", "5"]) == 2
    assert "--offload 'other' is not one of the --drafter folders" in capsys.readouterr().err
    assert main([*base, "--keep", "d", "--offload", "d"]) == 2
    assert "needs --threshold-from" in capsys.readouterr().err


def test_video_sweep_command_reads_auto_depths_for_the_drafter_auto_runs(tmp_path, monkeypatch):
    """--depth-from: per length, the depths of the drafter the threshold picks there (keep
    below, offload above), not of the other one."""
    import covspec.inference.sweep as sweep
    from covspec.scripts.cli import main

    target, keep, offload = (tmp_path / n for n in ("t", "k", "o"))
    for d in (target, keep, offload):
        d.mkdir()
    speedups = {  # keep pays at depth 8 on short clips, offload at depth 4 on long ones
        (72, 8): {"k@d6": 2.0, "k@d8": 2.5, "o@d4": 1.0, "o@d6": 1.0, "o@d8": 1.0},
        (5184, 576): {"k@d6": 0.5, "k@d8": 0.6, "o@d4": 1.5, "o@d6": 1.0, "o@d8": 1.0},
    }
    points = [
        {"visual_tokens": t, "frames": f, "methods": {n: {"speedup": v} for n, v in m.items()}}
        for (t, f), m in speedups.items()
    ]
    (tmp_path / "depths.json").write_text(json.dumps({"points": points}))
    seen = {}

    def fake_run_sweep(*args, policies=None, **kwargs):
        model = object()
        seen["auto"] = policies["auto"](
            {"k": SimpleNamespace(model=model), "o": SimpleNamespace(model=model)}
        )
        return {"points": [], "clips_per_length": 1, "max_new_tokens": 1, "depth": 6}

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(sweep, "write_sweep", lambda report, out: tmp_path / "s.json")
    args = ["video-sweep", "--target", str(target), "--drafter", str(keep), "--drafter"]
    args += [str(offload), "--visual-policy", "auto", "--keep", "k", "--offload", "o"]
    args += ["--threshold", "500", "--depth-from", str(tmp_path / "depths.json")]
    assert main(args) == 0
    assert seen["auto"].depths == [(2628, 8), (None, 4)]


def test_a_drafter_without_visual_prefix_skips_the_separators_between_frames():
    from covspec.modeling.drafter_inputs import drafter_rows

    visual = torch.tensor([[0, 1, 1, 0, 1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    attention = torch.ones_like(visual)
    attention[0, -1] = False
    rows = {
        prefix: drafter_rows(SimpleNamespace(visual_prefix=prefix), attention, visual)[0].tolist()
        for prefix in ("none", "compressed", "full")
    }
    assert rows["none"] == [1, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    assert rows["compressed"] == [1, 0, 0, 1, 0, 0, 1, 0, 1, 0]
    assert rows["full"] == [1] * 9 + [0]


def test_decode_speedup_leaves_out_the_prompt_work_both_sides_share():
    from covspec.inference.sweep import _decode_speedups

    runner = {"encode": 5.0, "prefill": 45.0, "drafter_prefill": 10.0}
    methods = {
        "hf_greedy": {"kind": "baseline", "ms_per_sample": {"total": 250.0}},
        "d/tree": {"kind": "speculative", "ms_per_sample": {"total": 160.0, **runner}},
        "stuck/tree": {"kind": "speculative", "ms_per_sample": {"total": 60.0, **runner}},
    }
    # generate decodes for 250 - (5 + 45) = 200 ms, the runner for 160 - 60 = 100 ms
    assert _decode_speedups(methods) == {"d/tree": 2.0, "stuck/tree": None}
