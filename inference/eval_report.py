"""The `covspec eval` report: per-sample records in, overall and per-category tables out.

    >>> report = aggregate(records, methods=["hf_greedy", "chain", "tree"], header)
    >>> report["overall"]["tree"]["tau"], report["per_category"]["detail"]["tree"]["speedup"]
    >>> write_report(report, "eval/mmbench.json")        # + eval/mmbench.md + eval/mmbench.png

A record is one sample's line of the run's jsonl (inference/evaluate.py): its category, the
correct option letter if the benchmark has one, the target's parsed answer, and per method the
seconds, tokens and (for the runner) rounds, drafted tokens and acceptance counts per depth.
Sums are taken before ratios, so tau and speedup weigh every token alike across samples.
"""

from __future__ import annotations

import re
from pathlib import Path

from covspec.inference.pages import TAU_DEFINITION, save_figure_atomic, write_pages


def parse_choice(text: str, choices: dict[str, str]) -> str | None:
    """The option letter a free-form answer picks, or None when it names none.

    In the spirit of MMMU's `parse_multi_choice_response` (lmms_eval/tasks/mmmu/utils.py), but
    deterministic (no random fallback), in this order: a leading letter ("B", "B.", "(B)");
    a letter the answer declares ("answer is B", "option (B)", "B is correct"); a bracketed
    letter; a standalone option letter, the last one named (an "A" or "I" opening a phrase
    such as "A red circle" is the article or the pronoun); else the option text named as whole
    words, the longest such text when several are ("12" over "2"), the first named among
    equals.
    """
    letters = [c for c in choices if len(c) == 1 and c.isalpha()]
    if not letters:
        return None
    group = "".join(letters)
    text = text.strip()
    m = re.match(rf"^\(?([{group}])\)?(?=$|[.:,)\n])", text)
    if m:
        return m.group(1)
    # only the words are case-free: "the answer is a dog" names no letter
    declared = (
        rf"(?i:\b(?:answer|choice))\s*(?i:is|:)?\s*\(?([{group}])\)?(?![\w])",
        rf"(?<![\w])\(?([{group}])\)?\s+(?i:is)\s+(?i:the\s+)?(?i:correct|right|best|answer)\b",
    )
    stated = [m for pattern in declared for m in re.finditer(pattern, text)]
    if stated:  # the last statement: "Option A is wrong ... the answer is C" says C
        return max(stated, key=lambda m: m.start(1)).group(1)
    found = re.findall(rf"\(([{group}])\)", text)
    found = found or re.findall(rf"\b([{group}])\b(?<![AI]\b(?=[ \t]+[a-z]))", text)
    if found:
        return found[-1]
    lowered = text.lower()
    named = []
    for c, t in choices.items():
        hit = re.search(rf"(?<!\w){re.escape(t.lower())}(?!\w)", lowered) if t else None
        if hit:
            named.append((-len(t), hit.start(), c))
    return min(named)[2] if named else None


def _method_stats(records: list[dict], name: str, base: dict | None) -> dict:
    runs = [r["methods"][name] for r in records]
    seconds = sum(m["seconds"] for m in runs)
    tokens = sum(m["tokens"] for m in runs)
    tps = tokens / seconds if seconds else 0.0
    out = {"tokens_per_s": tps, "seconds": seconds, "tokens": tokens}
    if base is not None:
        out["speedup"] = tps / base["tokens_per_s"] if base["tokens_per_s"] else None
    if "rounds" not in runs[0]:  # the baseline
        return out
    rounds = sum(m["rounds"] for m in runs)
    depth = len(runs[0]["attempts"])
    attempts = [sum(m["attempts"][d] for m in runs) for d in range(depth)]
    accepted = [sum(m["accepted"][d] for m in runs) for d in range(depth)]
    out.update(
        tau=sum(m["decode_tokens"] for m in runs) / rounds if rounds else None,
        mean_drafted=sum(m["drafted"] for m in runs) / rounds if rounds else None,
        acceptance_per_depth=[
            a / n if n else None for a, n in zip(accepted, attempts, strict=True)
        ],
        identical_fraction=sum(bool(m["identical"]) for m in runs) / len(runs),
    )
    return out


def _group_stats(records: list[dict], methods: list[str]) -> dict:
    base = _method_stats(records, methods[0], None)
    out = {"num_samples": len(records), methods[0]: base}
    for name in methods[1:]:
        out[name] = _method_stats(records, name, base)
    scored = [r for r in records if r.get("answer")]
    out["accuracy"] = (
        sum(bool(r["correct"]) for r in scored) / len(scored) if scored else None
    )  # the target's own answers (lossless: the runner's are the same tokens)
    out["num_scored"] = len(scored)
    return out


def aggregate(records: list[dict], methods: list[str], header: dict) -> dict:
    """The report: `header` (settings) + overall and per-category stats of `records`.
    methods[0] is the baseline that speedups and identical fractions refer to."""
    done = [r for r in records if "methods" in r]
    skipped = [{"id": r["id"], "reason": r["skipped"]} for r in records if "skipped" in r]
    report = {
        **header,
        "tau_definition": TAU_DEFINITION,
        "num_samples": len(done),
        "skipped": {"count": len(skipped), "rows": skipped},
        "overall": _group_stats(done, methods) if done else None,
        "per_category": {},
    }
    for category in sorted({r["category"] for r in done}):
        group = [r for r in done if r["category"] == category]
        report["per_category"][category] = _group_stats(group, methods)
    return report


def _fmt(x, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def markdown(report: dict) -> str:
    methods, base = report["methods"], report["methods"][0]
    lines = [
        f"# `covspec eval` on {report['benchmark']} ({report['num_samples']} samples, "
        f"{report['skipped']['count']} skipped)",
        "",
        f"Target `{report.get('target')}`, drafter `{report.get('drafter')}`, max "
        f"{report['max_new_tokens']} new tokens, {report['torch_threads']} torch threads, "
        f"device {report['device']}. {report['tau_definition']}. Speedup: tokens/s over "
        f"{base}'s, measured side by side in this process. Identical: token ids equal {base}'s.",
        "",
    ]
    if report["overall"] is None:
        return "\n".join(lines + ["No sample was evaluated."]) + "\n"
    overall = report["overall"]
    lines += [
        "| method | tokens/s | speedup | tau | drafted/round | acceptance per depth | identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in methods:
        m = overall[name]
        acc = " ".join(_fmt(a) for a in m.get("acceptance_per_depth", [])) or "-"
        lines.append(
            f"| {name} | {m['tokens_per_s']:.1f} | {_fmt(m.get('speedup'), '.2f', 'x')} | "
            f"{_fmt(m.get('tau'))} | {_fmt(m.get('mean_drafted'), '.1f')} | {acc} | "
            f"{_fmt(m.get('identical_fraction'), '.0%')} |"
        )
    spec = methods[1:]
    lines += [
        "",
        "Per category:",
        "",
        "| category | n | " + " | ".join(f"tau {m} | speedup {m}" for m in spec)
        + " | identical | accuracy |",
        "|---|---|" + "---|---|" * len(spec) + "---|---|",
    ]  # fmt: skip
    for category, g in {**report["per_category"], "all": overall}.items():
        cells = [f"{_fmt(g[m]['tau'])} | {_fmt(g[m]['speedup'], '.2f', 'x')}" for m in spec]
        identical = min((g[m]["identical_fraction"] for m in spec), default=None)
        lines.append(
            f"| {category} | {g['num_samples']} | " + " | ".join(cells)
            + f" | {_fmt(identical, '.0%')} | {_fmt(g['accuracy'], '.1%')} |"
        )  # fmt: skip
    if overall["num_scored"]:
        lines += [
            "",
            f"Accuracy: the target's answers, option letter parsed, over {overall['num_scored']} "
            "multiple-choice samples with a known answer.",
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = report["methods"][1:]
    cats = list(report["per_category"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(1, len(spec))
    for i, name in enumerate(spec):
        taus = [report["per_category"][c][name]["tau"] or 0.0 for c in cats]
        ax1.bar([x + i * width for x in range(len(cats))], taus, width, label=name)
        acc = report["overall"][name]["acceptance_per_depth"]
        ax2.plot(range(1, len(acc) + 1), [a if a is not None else float("nan") for a in acc],
                 marker="o", label=name)  # fmt: skip
    ax1.set_xticks([x + width * (len(spec) - 1) / 2 for x in range(len(cats))], cats,
                   rotation=30, ha="right", fontsize=7)  # fmt: skip
    ax1.set(
        ylabel="tau (tokens per target forward)", title=f"{report['benchmark']}: tau per category"
    )
    ax1.legend(fontsize=7)
    ax2.set(
        xlabel="draft depth", ylabel="acceptance rate", title="acceptance per depth", ylim=(0, 1.05)
    )
    ax2.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


def write_report(report: dict, out: str | Path) -> Path:
    """JSON at `out`, markdown and PNG beside it; every file written to a temp name first."""
    out = write_pages(report, out, markdown(report))
    if report["overall"] is not None:
        plot(report, out.with_suffix(".png"))
    return out
