"""The bench report's pages: markdown table, Pareto verdicts with paired intervals, plots.

    >>> from covspec.inference.bench import run_bench
    >>> report = run_bench("checkpoints/toy-target", drafters, samples, 96)
    >>> print(markdown_table(report))
    >>> write_report(report, "docs/results/bench.json")  # + .md, .png, -pareto.png

Kept apart from inference/bench.py (which runs the methods) so the statistics can be tested
on hand-written reports and recomputed from a saved JSON without a model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from covspec.inference.bench import PHASES
from covspec.inference.pages import save_figure_atomic, write_pages


def markdown_table(report: dict) -> str:
    lines = [
        f"Target `{report['target']}`, {report['num_samples']} samples, max {report['max_new_tokens']} new tokens, "
        f"{report['torch_threads']} torch threads, {report.get('dtype', 'float32')}, each method's "
        f"fastest of {report.get('repeats', 1)} run(s) per sample. {report['tau_definition']}."
        + (
            " Outside float32, identical_fraction is a measured rate (multi-token verify rounds differently)."
            if report.get("dtype", "float32") != "float32"
            else ""
        ),
        "",
        "| method | tokens/s | speedup vs hf_greedy | tau | drafted/round | visual prefix tokens "
        "| drafter ms/step | identical to hf_greedy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        cells = [
            _fmt(m["tau"], "{:.2f}"),
            _fmt(m["mean_drafted"], "{:.1f}"),
            _fmt(m.get("visual_prefix_tokens"), "{:.1f}"),
            _fmt(m.get("drafter_ms_per_step"), "{:.2f}"),
        ]
        speedup = _fmt(m["speedup"], "{:.2f}x")
        lines.append(
            f"| {name} | {m['tokens_per_s']:.1f} | {speedup} | {' | '.join(cells)} "
            f"| {m['identical_fraction']:.0%} |"
        )
    lines += pareto_lines(report, "tree") + pareto_lines(report, "chain")
    lines += seed_lines(report) + _gate_lines(report) + _kind_lines(report)
    lines += [
        "",
        "Where the time goes, wall ms per sample (runner phases; `other` = the loop itself):",
        "",
        "| method | total | " + " | ".join(PHASES) + " | other |",
        "|---|" + "---|" * (len(PHASES) + 2),
    ]
    for name, m in report["methods"].items():
        ms = m["ms_per_sample"]
        cells = [f"{ms[p]:.1f}" if p in ms else "-" for p in (*PHASES, "other")]
        lines.append(f"| {name} | {ms['total']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return spec.format(value) if value is not None else "-"


def _kind_lines(report: dict) -> list[str]:
    """tau per prompt kind for every drafter in tree mode, when the prompts have several kinds
    (which kind profits from which visual prefix: what a question-aware gate can learn)."""
    rows = {
        n: m["tau_per_kind"]
        for n, m in report["methods"].items()
        if m.get("tau_per_kind") and m["mode"] == "tree"
    }
    kinds = sorted({k for per in rows.values() for k in per})
    if len(kinds) < 2:
        return []
    lines = ["", "tau per prompt kind (tree):", ""]
    lines += ["| method | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, per in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(per.get(k), "{:.2f}") for k in kinds) + " |")
    return lines


def pareto_lines(report: dict, mode: str = "tree") -> list[str]:
    """Where each gated drafter stands: its tau against the best fixed primitive carrying at
    least as many visual rows (the full visual prefix counts as one: it is `pool:1`), on or
    above that Pareto front or below it, and its speedup against the best drafter with no
    visual rows."""
    ms = {n: m for n, m in report["methods"].items() if m["mode"] == mode and m.get("prefix_kind")}

    def best(kinds: tuple[str, ...], key: str, rows: float = 0.0):
        pool = [
            (m[key], n) for n, m in ms.items()
            if m["prefix_kind"] in kinds and m[key] is not None
            and m["visual_prefix_tokens"] >= rows
        ]  # fmt: skip
        return max(pool) if pool else (None, None)

    fixed = [n for n, m in ms.items() if m["prefix_kind"] in ("primitive", "full")]
    oracle = per_prompt_oracle_tau(report.get("samples", []), fixed)
    lines = []
    for name, g in ms.items():
        if g["prefix_kind"] != "gated":
            continue
        rows = g["visual_prefix_tokens"]
        tau, rival = best(("primitive", "full"), "tau", rows)
        speed, free = best(("free",), "speedup")
        verdict = "no fixed primitive carries as many rows" if rival is None else (
            f"{'on or above' if g['tau'] >= tau else 'below'} the fixed primitives' front: "
            f"the best with >= {rows:.1f} rows is `{rival}` at {tau:.3f}"
            + _paired_interval(report.get("samples", []), name, rival)
        )  # fmt: skip
        text = f"`{name}` carries {rows:.1f} rows for tau {g['tau']:.3f}, {verdict}"
        if oracle is not None:
            text += (
                f"; a per-prompt oracle over the {len(fixed)} fixed drafters reaches {oracle:.3f}"
            )
        if speed is not None:
            text += f"; speedup {g['speedup']:.2f}x vs {speed:.2f}x for `{free}` (no visual rows)"
        lines += ["", text + "."]
    return lines


def seed_lines(report: dict) -> list[str]:
    """Each drafter benched beside its training-seed replicates (`NAME-seedN`, what
    `covspec train --seed_everything N` exports): their tau per draft shape and each
    replicate's paired difference from seed 0. The scene intervals above say nothing of the
    training seed; this spread is the yardstick for a difference between two drafters."""
    groups: dict[tuple[str, str], dict[int, str]] = {}
    for name in report["methods"]:
        label, _, mode = name.rpartition("/")
        match = re.fullmatch(r"(.+)-seed(\d+)", label)
        if match and f"{match[1]}/{mode}" in report["methods"]:
            group = groups.setdefault((match[1], mode), {0: f"{match[1]}/{mode}"})
            group[int(match[2])] = name
    lines = []
    for (base, mode), seeds in groups.items():
        order = sorted(seeds)
        taus = [report["methods"][seeds[k]]["tau"] for k in order]
        text = (
            f"Training seeds of `{base}` ({mode}): seeds {', '.join(map(str, order))} reach tau "
            f"{', '.join(f'{t:.3f}' for t in taus)} (spread {max(taus) - min(taus):.3f})"
        )
        for k in order[1:]:
            text += f"; seed {k} against seed 0" + _paired_interval(
                report.get("samples", []), seeds[k], seeds[0]
            )
        lines += ["", text + "."]
    return lines


def bootstrap_sums(x: torch.Tensor, resamples: int = 2000, seed: int = 0) -> torch.Tensor:
    """Column sums of `x` (N samples, K columns) over `resamples` draws of N samples with
    replacement, paired (a draw takes whole rows): (resamples, K). Seeded, so the same report
    always gives the same interval."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(x.shape[0], (resamples, x.shape[0]), generator=gen)
    return x[idx].sum(1)


def interval95(draws: torch.Tensor) -> tuple[float, float]:
    """The central 95% of bootstrap draws (R,): (low, high)."""
    q = torch.tensor([0.025, 0.975], dtype=draws.dtype)
    low, high = torch.quantile(draws, q).tolist()
    return low, high


def tau_difference_interval(
    samples: list[dict], a: str, b: str, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float] | None:
    """Tau of method `a` minus method `b` and its 95% paired bootstrap interval over samples
    (each resample draws samples, both methods keep their own rounds on them); None when the
    samples do not record both methods' decode tokens and rounds."""
    pairs = [s["decode"] for s in samples if a in s.get("decode", {}) and b in s["decode"]]
    if len(pairs) < 2:
        return None
    x = torch.tensor([[p[a][0], p[a][1], p[b][0], p[b][1]] for p in pairs], dtype=torch.float64)
    sums = bootstrap_sums(x, resamples, seed)  # (R, 4)
    diffs = sums[:, 0] / sums[:, 1] - sums[:, 2] / sums[:, 3]
    total = x.sum(0)
    return float(total[0] / total[1] - total[2] / total[3]), *interval95(diffs)


def per_prompt_oracle_tau(samples: list[dict], methods: list[str]) -> float | None:
    """Tau if every prompt were decoded by whichever of `methods` needed the fewest rounds on
    it: the ceiling of a per-prompt gate over them. Only prompts that every method decoded to
    the same length count (lossless greedy: all of them). None without such records."""
    rows = [
        r
        for r in (s.get("decode", {}) for s in samples)
        if methods and all(m in r for m in methods) and len({r[m][0] for m in methods}) == 1
    ]
    if not rows:
        return None
    best = [min((r[m] for m in methods), key=lambda x: x[1]) for r in rows]
    return sum(b[0] for b in best) / max(1, sum(b[1] for b in best))


def _paired_interval(samples: list[dict], a: str, b: str) -> str:
    ci = tau_difference_interval(samples, a, b)
    if ci is None:
        return ""
    return f" (difference {ci[0]:+.3f}, 95% paired bootstrap interval [{ci[1]:+.3f}, {ci[2]:+.3f}])"


def _gate_lines(report: dict) -> list[str]:
    """What each gated drafter chose, per prompt kind (share of prompts)."""
    lines = []
    for m in report["methods"].values():
        choices = m.get("gate_choices")
        if not choices or m["mode"] != "tree":
            continue
        options = sorted({o for kind in choices.values() for o in kind})
        price = m.get("gate_cost_weight")
        at = "" if price is None else f" at cost weight {price:g}"
        lines += ["", f"Gate choices of `{m['drafter']}`{at} (share of prompts per kind):", ""]
        lines += [
            "| prompt kind | n | " + " | ".join(options) + " |",
            "|---|---|" + "---|" * len(options),
        ]
        for kind, counts in sorted(choices.items()):
            n = sum(counts.values())
            shares = " | ".join(f"{counts.get(o, 0) / n:.0%}" for o in options)
            lines.append(f"| {kind} | {n} | {shares} |")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in report["methods"].items():
        if m["acceptance_per_depth"]:
            ax1.plot(
                range(1, len(m["acceptance_per_depth"]) + 1),
                [float("nan") if a is None else a for a in m["acceptance_per_depth"]],
                marker="o",
                label=name,
            )
    ax1.set(
        xlabel="draft depth", ylabel="acceptance rate", title="acceptance per depth", ylim=(0, 1.05)
    )
    ax1.legend(fontsize=7)
    names = list(report["methods"])
    ax2.barh(names, [report["methods"][n]["speedup"] or 0.0 for n in names])
    ax2.axvline(1.0, color="k", lw=0.8)
    ax2.set(xlabel="wall-clock speedup vs hf_greedy", title="speedup")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


def pareto_plot(report: dict, path: Path, mode: str = "tree") -> bool:
    """tau and speedup against the visual rows the drafter carries, one point per drafter in
    `mode`; False (nothing drawn) with fewer than two drafters."""
    points = [
        (m["visual_prefix_tokens"], m["tau"], m["speedup"] or 0.0, _label(m))
        for m in report["methods"].values()
        if m["mode"] == mode and m.get("visual_prefix_tokens") is not None and m["tau"]
    ]
    if len(points) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, col, label in ((axes[0], 1, "tau"), (axes[1], 2, "speedup vs hf_greedy")):
        for p in points:
            ax.scatter(p[0], p[col])
            ax.annotate(p[3], (p[0], p[col]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for curve in _price_curves(report, mode):  # one elastic drafter at several prices
            ax.plot([p[0] for p in curve], [p[col] for p in curve], ls="--", lw=0.8)
        best, front = float("-inf"), []
        for p in sorted(points, key=lambda p: (p[0], -p[col])):  # upper-left envelope
            if p[col] > best:
                best = p[col]
                front.append(p)
        ax.step([p[0] for p in front], [p[col] for p in front], where="post", lw=0.8, color="k")
        ax.set(
            xlabel="visual rows in the drafter's cache (mean)",
            ylabel=label,
            title=f"{label} ({mode})",
        )
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    return True


def _label(m: dict) -> str:
    name = Path(m["drafter"]).name
    return name if m.get("gate_cost_weight") is None else f"{name}@{m['gate_cost_weight']:g}"


def _price_curves(report: dict, mode: str) -> list[list[tuple[float, float, float]]]:
    """(rows, tau, speedup) of each gated drafter run at several prices, by rows."""
    by_drafter: dict[str, list[tuple[float, float, float]]] = {}
    for m in report["methods"].values():
        if m["mode"] == mode and m.get("prefix_kind") == "gated" and m["tau"]:
            point = (m["visual_prefix_tokens"], m["tau"], m["speedup"] or 0.0)
            by_drafter.setdefault(m["drafter"], []).append(point)
    return [sorted(c) for c in by_drafter.values() if len(c) > 1]


def write_report(report: dict, out: str | Path) -> Path:
    """JSON at `out`, markdown table and PNG plot beside it (atomic writes)."""
    out = write_pages(report, out, markdown_table(report))
    plot(report, out.with_suffix(".png"))
    pareto = out.with_name(out.stem + "-pareto.png")
    if not pareto_plot(report, pareto):
        pareto.unlink(missing_ok=True)  # never leave another run's plot beside this report
    return out
