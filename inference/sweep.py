"""Video length sweep: every method at several clip lengths, side by side, on one target.

    >>> report = run_sweep("checkpoints/toy-video-target", drafters, frames=[8, 64, 576],
    ...                    clips=6, max_new_tokens=64)
    >>> write_sweep(report, "docs/results/video-sweep.json")   # + .md table + .png plots
    >>> threshold_from(report, keep="video-pool", offload="video-drafter")
    >>> report = run_sweep(target, drafters, frames=[8, 64, 576], clips=6, max_new_tokens=64,
    ...                    depths=[4, 6, 8])          # methods NAME@d4, NAME@d6, NAME@d8
    >>> depth_table_from(report, "video-drafter", default=6)   # [(tokens up to, depth), ...]

Each length is one `run_bench` over the same number of unseen toy clips (interleaved methods,
a warm-up, token-for-token comparison with `generate`). Per method and length the report keeps
the target's visual tokens, tau, the drafter's ms per draft step and its KV cache at the end,
the end-to-end speedup over `generate` (processor and prefill included) and the decode-phase
speedup: `generate`'s time minus the prompt's encode + prefill (as the runner measured them on
the same prompts, the same computation) against the runner's time minus its encode, prefill
and drafter prefill. Per length it also counts the clips whose target answer loops (one token
`LOOP_RUN`+ times in a row): a drafter's tau there measures the target's failure, not the
drafter's. An `auto` policy (inference/visual_policy.py) appears as one more method.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby
from pathlib import Path

import torch

from covspec.data.toy_video import toy_video_prompts
from covspec.data.toy_world import PROMPT_SEED
from covspec.inference.bench import run_bench
from covspec.inference.bench_report import bootstrap_sums, interval95
from covspec.inference.media import Media
from covspec.inference.pages import save_figure_atomic, write_pages
from covspec.inference.tree import DraftSettings

FIELDS = (
    "visual_tokens",
    "visual_prefix_tokens",
    "tau",
    "drafter_ms_per_step",
    "drafter_kv_bytes",
    "speedup",
    "decode_speedup",
    "identical_fraction",
    "repeats_disagreed",
)
# a target answer that repeats one token this many times in a row ("a red red red red circle")
# is looping: drafters distilled on well-formed answers follow it poorly, so their tau drops there
LOOP_RUN = 4


def longest_run(ids: list[int]) -> int:
    """Length of the longest run of one token id in a row (0 for an empty answer)."""
    return max((len(list(run)) for _, run in groupby(ids)), default=0)


def _decode_speedups(methods: dict) -> dict[str, float | None]:
    spec = {k: m for k, m in methods.items() if m["kind"] == "speculative"}
    if not spec:
        return {}
    # the prompt's encode + prefill: the same computation for generate and the runner
    prompt_ms = sum(
        m["ms_per_sample"]["encode"] + m["ms_per_sample"]["prefill"] for m in spec.values()
    )
    prompt_ms /= len(spec)
    hf_decode = methods["hf_greedy"]["ms_per_sample"]["total"] - prompt_ms
    if hf_decode <= 0:  # generate's whole run took less than the others' prompt: noise, no ratio
        return {name: None for name in spec}
    out = {}
    for name, m in spec.items():
        ms = m["ms_per_sample"]
        decode = ms["total"] - ms["encode"] - ms["prefill"] - ms["drafter_prefill"]
        out[name] = hf_decode / decode if decode > 0 else None
    return out


def run_sweep(
    target: str,
    drafters: list[str],
    frames: list[int],
    clips: int,
    max_new_tokens: int,
    tree: DraftSettings | None = None,
    policies: dict[str, object] | None = None,
    warmup: int = 1,
    depths: list[int] | None = None,
    repeats: int = 1,
    seed: int | None = None,
) -> dict:
    """One bench per frame count (tree mode only and no prompt lookup: they add time, not
    information). `policies`: extra named methods (`auto`), each a callable runner factory for
    run_bench; `depths`: every drafter at each of these tree depths (methods `NAME@dD`);
    `repeats`: each method's fastest of that many runs per clip (run_bench); `seed`: the clip
    stream, default the bench's PROMPT_SEED (a sweep that picks the policy's threshold and
    depths and the sweep that reports the policy should not share clips)."""
    if not frames or min(frames) < 2:
        raise ValueError(f"frames must be frame counts >= 2, got {frames}")
    tree = tree or DraftSettings(mode="tree", depth=6)
    seed = PROMPT_SEED if seed is None else seed
    points = []
    for num_frames in frames:
        samples = toy_video_prompts(clips, num_frames, seed)
        for s in samples:  # the runner's video input
            s["image"] = Media(video=s.pop("frames"))
        report = run_bench(
            target, drafters, samples, max_new_tokens, tree=tree, warmup=warmup,
            modes=("tree",), policies=policies, tree_depths=depths or (), repeats=repeats,
            prompt_lookup=False,
        )  # fmt: skip
        decode = _decode_speedups(report["methods"])
        methods = {}
        for name, m in report["methods"].items():
            if m["kind"] != "speculative":
                continue
            row = {k: m.get(k) for k in FIELDS if k != "decode_speedup"}
            row["decode_speedup"] = decode[name]
            row["ms_per_sample"] = m["ms_per_sample"]  # by runner phase
            row["gate_choices"] = m["gate_choices"]  # an elastic compressor's picks
            # per clip, in clip order: lets `depth_table_from` test a gain against the noise
            row["clip_seconds"] = [r["seconds"][name] for r in report["samples"]]
            row["clip_decode"] = [r["decode"][name] for r in report["samples"]]  # [tokens, rounds]
            methods[name.replace("/tree", "")] = row  # NAME, or NAME@dD for a depth variant
        points.append(
            {
                "frames": num_frames,
                "visual_tokens": next(iter(methods.values()))["visual_tokens"] if methods else None,
                "hf_ms_per_sample": report["methods"]["hf_greedy"]["ms_per_sample"]["total"],
                # the target's own answers: how long they are says how much decode there is
                "answer_tokens": sum(len(r["token_ids"]["hf_greedy"]) for r in report["samples"])
                / max(1, len(report["samples"])),
                "clip_looping": [  # in clip order, beside each method's clip_decode
                    longest_run(r["token_ids"]["hf_greedy"]) >= LOOP_RUN for r in report["samples"]
                ],
                "methods": methods,
            }
        )
        points[-1]["looping_answers"] = sum(points[-1]["clip_looping"])
    return {
        "target": target,
        "clips_per_length": clips,
        "max_new_tokens": max_new_tokens,
        "depth": tree.depth,
        "depths": depths,
        "repeats": repeats,
        "seed": seed,
        "points": points,
    }


def _paired_gain_draws(base: list[float], other: list[float], draws: int = 2000) -> torch.Tensor:
    """(draws,) bootstrap draws over the clips of sum(base) / sum(other) - 1 (seconds per
    clip, the same clips in the same order: the relative speed gain of `other`)."""
    if len(base) != len(other) or not base:
        raise ValueError(f"paired clip times differ in length: {len(base)} and {len(other)}")
    sums = bootstrap_sums(torch.tensor([base, other], dtype=torch.float64).T, draws)  # (R, 2)
    return sums[:, 0] / sums[:, 1] - 1


def paired_gain_low(base: list[float], other: list[float], draws: int = 2000) -> float:
    """Lower end of a one-sided 95% bootstrap interval, over the clips, of the relative gain
    sum(base) / sum(other) - 1 (seconds per clip, the same clips in the same order)."""
    return float(torch.quantile(_paired_gain_draws(base, other, draws), 0.05))


def depth_table_from(
    report: dict, drafter: str | Callable[[float], str], default: int, min_gain: float = 0.03
) -> list[tuple[int | None, int]]:
    """Tree depth per visual-token range from a sweep run with `depths`, for `drafter` (or the
    drafter a policy runs at that many visual tokens): at each length the depth of the best
    end-to-end speedup where it beats `default` by `min_gain` (relative) and, where the sweep
    kept each clip's time, where its gain over the same clips is above 0 at the lower end of
    a 95% bootstrap interval (`paired_gain_low`); else `default`. Returns [(visual tokens up
    to, depth), ..., (None, depth)], bounds halfway between measured lengths."""
    pick_drafter = drafter if callable(drafter) else (lambda tokens: drafter)
    chosen = []
    for p in sorted(report["points"], key=lambda p: p["visual_tokens"]):
        drafter = pick_drafter(p["visual_tokens"])
        named = {
            int(name.rsplit("@d", 1)[1]): m
            for name, m in p["methods"].items()
            if name.rsplit("@d", 1)[0] == drafter and "@d" in name and m["speedup"] is not None
        }
        runs = {d: m["speedup"] for d, m in named.items()}
        if default not in runs:
            raise ValueError(
                f"the sweep has no {drafter}@d{default} at {p['frames']} frames: run it with "
                f"--depths including {default}"
            )
        best = max(runs, key=runs.get)
        pays = runs[best] >= (1 + min_gain) * runs[default]
        clips = named[best].get("clip_seconds"), named[default].get("clip_seconds")
        if pays and best != default and clips[0] and clips[1]:
            pays = paired_gain_low(clips[1], clips[0]) > 0
        chosen.append((p["visual_tokens"], best if pays else default))
    table = []
    for i, (tokens, depth) in enumerate(chosen):
        bound = (tokens + chosen[i + 1][0]) / 2 if i + 1 < len(chosen) else float("inf")
        if table and table[-1][1] == depth:
            table[-1] = (bound, depth)
        else:
            table.append((bound, depth))
    return [(int(b) if b != float("inf") else None, d) for b, d in table]


def threshold_from(report: dict, keep: str, offload: str, tie: float = 0.03) -> int | None:
    """Visual tokens from which offloading is as fast end to end as keeping: the midpoint
    between the last length where `keep` wins and the first where `offload` wins for good
    (None when keep wins everywhere: then always keep; 0 when offload always wins). Offload
    wins ties: within `tie` (relative; this machine's noise) of keep's speedup it is as fast
    and carries no visual rows, so less drafter memory and fewer bytes to a device. A sweep
    run with `depths` is read at its default depth (`NAME@dD`, D = report["depth"])."""

    def speedup(methods: dict, name: str) -> float:
        if name not in methods and report.get("depths"):
            name = f"{name}@d{report['depth']}"
        if name not in methods:
            raise ValueError(f"the sweep has no method {name!r}: it ran {sorted(methods)}")
        return methods[name]["speedup"]

    rows = [
        (p["visual_tokens"], speedup(p["methods"], keep), speedup(p["methods"], offload))
        for p in report["points"]
    ]
    rows.sort()
    wins = [o >= k * (1 - tie) for _, k, o in rows]
    first = next((i for i in range(len(rows)) if all(wins[i:])), None)
    if first is None:
        return None
    if first == 0:
        return 0
    return int((rows[first - 1][0] + rows[first][0]) / 2)


def auto_gaps(report: dict) -> list[tuple[int, str, float, float, float]]:
    """Per length, `auto` against the better (end to end) of its keep and offload drafters:
    (frames, that drafter, gap, low, high), gap = auto's speedup / theirs - 1 with a paired
    95% bootstrap interval over the clips (the same clips, so the same tokens: the ratio of
    summed clip times is the ratio of speedups). Empty without a policy."""
    policy = report.get("policy")
    if not policy:
        return []
    out = []
    for p in report["points"]:
        m = p["methods"]
        best = max((policy["keep"], policy["offload"]), key=lambda n: m[n]["speedup"])
        draws = _paired_gain_draws(m[best]["clip_seconds"], m["auto"]["clip_seconds"])
        low, high = interval95(draws)
        gap = m["auto"]["speedup"] / m[best]["speedup"] - 1
        out.append((p["frames"], best, gap, low, high))
    return out


def tau_change(report: dict, name: str) -> tuple[int, int, float, float, float] | None:
    """Method `name`'s tau at the longest length against the shortest: (first frames, last
    frames, change, low, high), change = tau_last / tau_first - 1 with a 95% bootstrap
    interval (the two lengths' clips resampled independently: they are different clips).
    None when the sweep did not keep per-clip rounds or ran `name` at fewer than 2 lengths."""
    pts = [p for p in report["points"] if (p["methods"].get(name) or {}).get("clip_decode")]
    if len(pts) < 2:
        return None
    first, last = min(pts, key=lambda p: p["frames"]), max(pts, key=lambda p: p["frames"])
    taus = []
    for seed, p in enumerate((first, last)):
        x = torch.tensor(p["methods"][name]["clip_decode"], dtype=torch.float64)  # (N, 2)
        sums = bootstrap_sums(x, seed=seed)  # (R, 2)
        taus.append((x[:, 0].sum() / x[:, 1].sum(), sums[:, 0] / sums[:, 1]))
    (t0, r0), (t1, r1) = taus
    return first["frames"], last["frames"], float(t1 / t0 - 1), *interval95(r1 / r0 - 1)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _rows(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _gate_lines(report: dict, names: list[str]) -> list[str]:
    """What each gated (elastic) drafter's gate picked at each length, over all prompts."""
    lines = []
    for n in names:
        picks = []
        for p in report["points"]:
            by_kind = (p["methods"].get(n) or {}).get("gate_choices")
            if not by_kind:
                continue
            total: dict[str, int] = {}
            for counts in by_kind.values():
                for option, k in counts.items():
                    total[option] = total.get(option, 0) + k
            share = ", ".join(f"{o} {k}" for o, k in sorted(total.items()))
            picks.append(f"{p['frames']} frames: {share}")
        if picks:
            lines += ["", f"`{n}` gate picks (prompts per option): " + "; ".join(picks) + "."]
    return lines


def markdown_table(report: dict) -> str:
    """One row per length and method; with a policy, the threshold and what `auto` ran."""
    names = sorted({n for p in report["points"] for n in p["methods"]})
    head = "| frames | visual tokens | answer tokens | method | prefix rows | tau | drafter ms/step | drafter KV (KiB) | decode speedup | end-to-end speedup | identical |"
    lines = [head, "|" + "---|" * 11]
    for p in report["points"]:
        for n in names:
            m = p["methods"].get(n)
            if m is None:
                continue
            lines.append(
                f"| {p['frames']} | {p['visual_tokens']:.0f} | {p['answer_tokens']:.1f} | {n} | "
                f"{_rows(m.get('visual_prefix_tokens'))} | {m['tau']:.2f} | "
                f"{m['drafter_ms_per_step']:.2f} | {m['drafter_kv_bytes'] / 1024:.0f} | "
                f"{_x(m['decode_speedup'])} | {_x(m['speedup'])} | "
                f"{100 * m['identical_fraction']:.0f}% |"
            )
    lines += _gate_lines(report, names)
    if all("looping_answers" in p for p in report["points"]):
        loops = ", ".join(f"{p['frames']} frames {p['looping_answers']}" for p in report["points"])
        lines += [
            "",
            f"Target answers that loop (one token {LOOP_RUN}+ times in a row), clips per length: "
            f"{loops}.",
        ]
    changes = [(n, c) for n in names if (c := tau_change(report, n))]
    if changes:
        f0, f1 = changes[0][1][:2]
        shown = "; ".join(
            f"`{n}` {100 * c:+.1f}% ({100 * lo:+.1f}% to {100 * hi:+.1f}%)"
            for n, (_, _, c, lo, hi) in changes
        )
        lines += ["", f"tau at {f1} frames against {f0} (95% bootstrap over the clips): {shown}."]
    policy = report.get("policy")
    if policy:
        t = policy["threshold_visual_tokens"]
        lines += [
            "",
            f"`auto`: keep `{policy['keep']}` up to {t} visual tokens, above that offload to "
            f"`{policy['offload']}` (threshold from `{policy['threshold_from']}`).",
        ]
        if policy.get("depths") and len(policy["depths"]) == 1:
            lines.append(
                f"Its tree depth ({policy['depth_from']}): {policy['depths'][0][1]} at every "
                "length (no other depth paid at any)."
            )
        elif policy.get("depths"):
            ranges = ", ".join(
                f"depth {d} {'beyond' if b is None else f'up to {b} tokens'}"
                for b, d in policy["depths"]
            )
            lines.append(f"Its tree depth by visual tokens ({policy['depth_from']}): {ranges}.")
        gaps = "; ".join(
            f"{f} frames {100 * g:+.1f}% vs `{n}` ({100 * lo:+.1f}% to {100 * hi:+.1f}%)"
            for f, n, g, lo, hi in auto_gaps(report)
        )
        lines.append(
            "`auto` end to end against the better of keep and offload (paired 95% bootstrap "
            f"interval over the clips): {gaps}."
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({n for p in report["points"] for n in p["methods"]})
    panels = ("tau", "drafter_ms_per_step", "drafter_kv_bytes", "decode_speedup", "speedup")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, key in zip(axes, panels, strict=True):
        for n in names:
            pts = [
                (p["visual_tokens"], p["methods"][n][key])
                for p in report["points"]
                if n in p["methods"] and p["methods"][n][key] is not None
            ]
            ax.plot(*zip(*pts, strict=True), marker="o", label=n)
        ax.set_xscale("log")
        ax.set_xlabel("visual tokens")
        ax.set_title(key.replace("_", " "))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


def write_sweep(report: dict, out: str | Path) -> Path:
    """`out` (.json) plus a markdown table and a plot beside it, each written whole."""
    page = (
        f"# Video length sweep\n\nTarget `{report['target']}`, {report['clips_per_length']} unseen "
        f"clips per length, up to {report['max_new_tokens']} new tokens, tree depth "
        f"{report['depth']}, clip seed {report.get('seed', PROMPT_SEED)}; each method's fastest of "
        f"{report.get('repeats', 1)} run(s) per clip.\n\n{markdown_table(report)}\n"
    )
    out = write_pages(report, out, page)
    plot(report, out.with_suffix(".png"))
    return out
