"""Video mode end to end on a micro toy video target: its folder, training batches of clips,
the runner on a clip against `generate`, the length sweep's report and the keep-or-offload
policy."""

import copy
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
    longest_run,
    markdown_table,
    run_sweep,
    write_sweep,
)
from covspec.inference.tree import DraftSettings
from covspec.inference.visual_policy import AutoVisualPolicy
from covspec.modeling.adapters import adapter_for
from covspec.modeling.drafter import Drafter, DrafterConfig
from covspec.training.toy_target import EVAL_SEED, REPORT_NAME, build_toy_target
from covspec.training.toy_video_target import ToyVideoTargetSettings
from tests.test_toy_target import MICRO

MICRO_VIDEO = ToyVideoTargetSettings(  # the micro image target's sizes, 9 tokens a frame
    spec=dataclasses.replace(MICRO.spec, patch_size=24, max_position_embeddings=1024),
    vision_steps=2,
    vision_batch=4,
    lm_steps=20,
    lm_batch=4,
    align_steps=2,
    warmup_steps=1,
    max_frames=4,
    long_every=3,
    long_max_frames=12,
    long_step_frames=16,
    pixel_polish=2,
    pixel_step_frames=16,
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


def test_long_clip_steps_hold_fewer_longer_clips(loaded):
    s = MICRO_VIDEO  # where-to steps are the even ones, so every third step past them is long
    assert [step for step in range(s.lm_steps) if s.long_step(step)] == [5, 11, 17]
    for step in range(s.lm_steps):
        frames = {s.lm_clip(step * s.lm_batch + i)[2] for i in range(s.step_batch(step))}
        if s.long_step(step):
            (num,) = frames
            assert s.max_frames < num <= s.long_max_frames
            assert s.step_batch(step) == max(1, s.long_step_frames // num)
        else:
            assert max(frames) <= s.max_frames and s.step_batch(step) == s.lm_batch


def test_train_language_encodes_each_steps_own_batch(loaded):
    from covspec.training.toy_target import train_language

    model, processor = loaded
    model = copy.deepcopy(model)
    seen = []

    def loss_fn(m, batch):
        seen.append(batch["input_ids"].shape[0])
        return m.lm_head.weight.sum() * 0.0

    bar = SimpleNamespace(update=lambda n: None, set_postfix=lambda **kw: None)
    train_language(model, processor, MICRO_VIDEO, bar, MICRO_VIDEO.lm_encode(processor), loss_fn)
    assert seen == [MICRO_VIDEO.step_batch(step) for step in range(MICRO_VIDEO.lm_steps)]
    assert min(seen) < MICRO_VIDEO.lm_batch  # the long steps


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
    # one where-to question per object: each clip adds n questions a random object gets 1/n of
    objects = [len(make_clip(EVAL_SEED, 0, f)["tracks"]) for f in MICRO_VIDEO.eval_frames]
    assert report["where_to_guess_rate"] == pytest.approx(len(objects) / sum(objects))
    assert {f"where_to/objects={n}" for n in objects} <= set(report["event_accuracy_by"])
    assert loaded[0].config.text_config.max_position_embeddings == 1024
    assert loaded[1].tokenizer.model_max_length == 1024  # no false "too long" warnings
    assert build_toy_target(out, MICRO_VIDEO)["train_seconds"] == report["train_seconds"]  # cached


def test_bad_video_target_settings_are_refused():
    with pytest.raises(ValueError, match="min_frames"):
        ToyVideoTargetSettings(min_frames=5, max_frames=3)
    with pytest.raises(ValueError, match="eval_frames"):
        ToyVideoTargetSettings(eval_frames=(1,))
    with pytest.raises(ValueError, match="long_max_frames"):
        ToyVideoTargetSettings(max_frames=32, long_max_frames=32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        dataclasses.replace(MICRO_VIDEO, long_max_frames=200)  # 1,800 tokens in 1,024 positions
    with pytest.raises(ValueError, match="long-clip step among"):
        dataclasses.replace(MICRO_VIDEO, lm_steps=4, long_every=6)
    assert dataclasses.replace(MICRO_VIDEO, lm_steps=4, long_every=0).step_batch(3) == 4


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
            # decode time is a difference of timings: too noisy on a busy CPU, it is None
            assert m["speedup"] > 0 and (m["decode_speedup"] is None or m["decode_speedup"] > 0)
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
    assert all(p["looping_answers"] == sum(p["clip_looping"]) for p in report["points"])
    assert all(len(p["clip_looping"]) == 1 for p in report["points"])  # one clip per length
    assert "Target answers that loop (one token 4+ times in a row), clips per length: 2" in page
    assert all(p["methods"]["pool3"]["gate_choices"] is None for p in report["points"])
    write_sweep(report, tmp_path / "s.json")
    assert (tmp_path / "s.png").stat().st_size > 0 and (tmp_path / "s.md").is_file()
    assert json.loads((tmp_path / "s.json").read_text())["points"][0]["frames"] == 2
    with pytest.raises(ValueError, match="frames"):
        run_sweep(str(out), paths, [1], clips=1, max_new_tokens=2)


def test_longest_run_finds_a_looping_answer():
    assert longest_run([]) == 0 and longest_run([5]) == 1
    assert longest_run([3, 7, 7, 7, 7, 2, 7]) == 4  # "a red red red red circle red"
    assert longest_run([1, 2, 1, 2, 1]) == 1


def test_sweep_flags_the_clips_whose_target_answer_loops(monkeypatch):
    # a faked bench with known answers: the flags must follow each clip's own answer
    answers = [[9, 4, 4, 4, 4, 2], [9, 4, 4, 4, 2], [1, 2, 3]]
    bench = {
        "methods": {"hf_greedy": {"kind": "hf", "ms_per_sample": {"total": 1.0}}},
        "samples": [{"token_ids": {"hf_greedy": a}} for a in answers],
    }
    monkeypatch.setattr("covspec.inference.sweep.run_bench", lambda *a, **k: bench)
    report = run_sweep("unused", [], [2], clips=3, max_new_tokens=6)
    point = report["points"][0]
    assert point["clip_looping"] == [True, False, False] and point["looping_answers"] == 1
    assert "clips per length: 2 frames 1." in markdown_table(report)


def test_sweep_runs_every_drafter_at_each_depth(video_target, drafters):
    out, _ = video_target
    report = run_sweep(
        str(out), [str(drafters["free"])], [2], clips=1, max_new_tokens=6, warmup=0,
        depths=[2, 5],
    )  # fmt: skip
    methods = report["points"][0]["methods"]
    assert set(methods) == {"free@d2", "free@d5"} and report["depths"] == [2, 5]
    assert all(m["identical_fraction"] == 1.0 for m in methods.values())


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
