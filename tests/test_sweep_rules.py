"""The length sweep's rules, without a model: auto's threshold and depth table from a sweep,
its gap to keep and offload, tau across lengths, the decode-phase speedup, and the
`covspec video-sweep` command's checks."""

import json
from types import SimpleNamespace

import pytest

from covspec.inference.sweep import (
    auto_gaps,
    depth_table_from,
    markdown_table,
    paired_gain_low,
    run_sweep,
    tau_change,
    threshold_from,
)


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
    assert run_sweep("t", [], [4], clips=1, max_new_tokens=2)["seed"] == 31_337  # the bench's


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
    fixed = base[:-2]  # no --visual-policy auto: its flags would be ignored, so are refused
    assert main([*fixed, "--keep", "d", "--threshold", "5"]) == 2
    assert "--keep, --threshold set --visual-policy auto: add it" in capsys.readouterr().err


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

    def fake_run_sweep(*args, policies=None, seed=None, **kwargs):
        seen["seed"] = seed
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
    assert main([*args, "--seed", "5"]) == 0 and seen["seed"] == 5
    assert seen["auto"].depths == [(2628, 8), (None, 4)]


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
