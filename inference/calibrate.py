"""Closed-loop calibration of an acceptance head: thresholds from the accuracy drop it really causes.

    >>> report = calibrate_head(runner, head, toy_prompts(1000, seed=4242, mixed=True),
    ...                         budgets={"good": 0.003, "bad": 0.01}, settings=settings)
    >>> save_calibration(head, report, "checkpoints/acceptance-head-para-short")

or `covspec calibrate-acceptance --head DIR --drafter D --target T --toy 1000`.

Why: the training-time calibration (training/acceptance.py) estimates a threshold's accuracy
drop from mismatches that were each labelled alone, on the lossless path. Once a head accepts
several mismatches in one answer, the later ones sit on paths no label saw, and the drop can be
larger than estimated. Here the lossy verifier itself decodes held-out conversations (not the
training stream, not the evaluation scenes) with the target's greedy answers as the paired
reference, and per channel preset the threshold is raised in `step`s until
the answers it breaks (correct under greedy decoding, wrong under the head) are within the
preset's budget of all answers -- by the upper `confidence` bound of that rate, since a
threshold picked at the edge of the budget on one sample of scenes overshoots it on the next
half the time -- and the share of mismatches it accepts is no larger than that of the next
worse channel. The search starts at the head's current threshold (the trained one, until a
calibration rewrites it), so it never makes a head more permissive than its open-loop estimate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from covspec.inference.acceptance import HeadRule
from covspec.inference.compute import resolve_compute
from covspec.inference.link import PRESETS, Link
from covspec.inference.protocols import run_protocol
from covspec.inference.roles import Request
from covspec.inference.simulate import greedy_tokens, task_correct
from covspec.inference.timeline import Timeline
from covspec.inference.tree import DraftSettings
from covspec.modeling.outputs import write_folder


@dataclass
class Trial:
    """One threshold decoded over the calibration answers."""

    threshold: float
    broken: int  # answers correct under greedy decoding and wrong under the head
    mended: int
    answers: int
    accepted_rate: float  # accepted mismatches over mismatches decided
    tau: float

    @property
    def drop(self) -> float:
        return self.broken / self.answers


def binomial_upper(k: int, n: int, confidence: float) -> float:
    """Clopper-Pearson upper bound on a rate seen k times in n: the p at which k or fewer
    events have probability 1 - confidence."""
    if k >= n:
        return 1.0

    def cdf(p: float) -> float:  # P(X <= k), X ~ Binomial(n, p)
        logs = [
            math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
            + i * math.log(p) + (n - i) * math.log1p(-p)
            for i in range(k + 1)
        ]  # fmt: skip
        top = max(logs)
        return math.exp(top) * sum(math.exp(v - top) for v in logs)

    lo, hi = k / n, 1.0
    for _ in range(60):  # cdf falls as p rises
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > 1 - confidence else (lo, mid)
    return hi


def search_threshold(
    measure: Callable[[float], Trial], start: float, budget: float, cap: float | None,
    step: float, max_steps: int, confidence: float = 0.0,
) -> tuple[Trial, list[Trial]]:  # fmt: skip
    """The lowest threshold start + k * step (k <= max_steps) whose drop is within `budget`
    (its upper `confidence` bound, when > 0: the calibration answers are a sample) and that
    accepts no more than `cap`; (chosen trial, every trial). Raises when none of them is."""
    trials = []
    for k in range(max_steps + 1):
        trial = measure(start + k * step)
        trials.append(trial)
        drop = binomial_upper(trial.broken, trial.answers, confidence) if confidence else trial.drop
        if drop <= budget and (cap is None or trial.accepted_rate <= cap):
            return trial, trials
    raise CalibrationError(
        f"no threshold in [{start:.3f}, {start + max_steps * step:.3f}] keeps the accuracy drop "
        f"within {budget} (last: {trials[-1].drop:.4f}); raise --max-steps or --step"
    )


class CalibrationError(ValueError):
    """No candidate threshold met the budget (a user setting: widen the search)."""


def _measure(runner, head, samples, greedy_ok, preset, settings, max_new, compute, seed):
    def measure(threshold: float) -> Trial:
        broken = mended = asked = accepted = rounds = tokens = 0
        for i, sample in enumerate(samples):
            timeline = Timeline(
                Link(PRESETS[preset], seed=seed + i), resolve_compute(compute),
                runner.adapter.vocab_size,
            )  # fmt: skip
            rule = HeadRule(head, preset=preset, threshold=threshold)
            req = Request(sample["image"], sample["prompt"], max_new)
            result = run_protocol("sync", runner, req, timeline, settings, rule=rule)
            ok = bool(task_correct(sample, result.text))
            broken += greedy_ok[i] and not ok
            mended += ok and not greedy_ok[i]
            asked += len(rule.events)
            accepted += sum(e.accepted for e in rule.events)
            rounds += result.rounds
            tokens += max(len(result.tokens) - 1, 0)
        return Trial(
            threshold, broken, mended, len(samples), accepted / asked if asked else 0.0,
            tokens / rounds if rounds else 0.0,
        )  # fmt: skip

    return measure


def calibrate_head(
    runner, head, samples: list[dict], budgets: dict[str, float], settings: DraftSettings,
    max_new: int = 96, compute: str = "a40-orin-7b", seed: int = 0, step: float = 0.5,
    max_steps: int = 16, confidence: float = 0.9,
) -> dict:  # fmt: skip
    """Per preset (worst channel first), the closed-loop threshold and every trial decoded."""
    unknown = sorted(set(budgets) - set(PRESETS))
    if unknown:
        raise ValueError(f"unknown channel preset(s) {unknown}; known: {sorted(PRESETS)}")
    if any(not 0 <= b < 1 for b in budgets.values()):
        raise ValueError(f"accuracy budgets must be in [0, 1), got {budgets}")
    if not 0 <= confidence < 1:
        raise ValueError(f"confidence must be in [0, 1), got {confidence}")
    if step <= 0 or max_steps < 0:
        raise ValueError(f"step must be > 0 and max_steps >= 0, got {step}, {max_steps}")
    if not samples or any("objects" not in s for s in samples):
        raise ValueError("closed-loop calibration needs samples with ground truth (toy scenes)")
    decode = runner.processor.tokenizer.decode
    greedy_ok = [
        bool(task_correct(s, decode(greedy_tokens(runner, s, max_new), skip_special_tokens=True)))
        for s in tqdm(samples, desc="greedy answers", unit="answer")
    ]  # fmt: skip
    out, cap = {}, None
    for preset in sorted(budgets, key=lambda p: -budgets[p]):
        measure = _measure(
            runner, head, samples, greedy_ok, preset, settings, max_new, compute, seed
        )
        bar = tqdm(desc=f"calibrate {preset}", unit="threshold")

        def counted(t: float, measure=measure, bar=bar) -> Trial:
            bar.update()
            return measure(t)

        chosen, trials = search_threshold(
            counted, head.threshold(preset), budgets[preset], cap, step, max_steps, confidence
        )
        bar.close()
        cap = chosen.accepted_rate
        out[preset] = {
            "budget": budgets[preset], "start_threshold": head.threshold(preset),
            **asdict(chosen), "accuracy_drop": chosen.drop,
            "accuracy_drop_bound": binomial_upper(chosen.broken, chosen.answers, confidence),
            "trials": [asdict(t) for t in trials],
        }  # fmt: skip
    return {
        "answers": len(samples),
        "greedy_task_accuracy": sum(greedy_ok) / len(samples),
        "compute": compute,
        "confidence": confidence,
        "settings": settings.__dict__,
        "presets": out,
    }


def save_calibration(head, report: dict, folder: str | Path) -> Path:
    """Write the head back with its closed-loop thresholds (swapped in whole: a crash leaves
    the old folder), the report in metrics.json and a section in the model card."""
    folder = Path(folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    card = (folder / "README.md").read_text().split("\n## Closed-loop calibration")[0]
    head.config.thresholds = {
        **head.config.thresholds, **{p: c["threshold"] for p, c in report["presets"].items()}
    }  # fmt: skip
    metrics["closed_loop_calibration"] = report
    rows = "\n".join(
        f"| {p} | {c['budget']:.3f} | {c['start_threshold']:.3f} | {c['threshold']:.3f} | "
        f"{c['broken']} / {c['answers']} | {c['accepted_rate']:.3f} | {c['tau']:.2f} |"
        for p, c in report["presets"].items()
    )
    card += f"""
## Closed-loop calibration

Thresholds raised until the lossy verifier itself, decoding {report["answers"]} held-out toy
conversations (chain/tree settings `{report["settings"]}`), breaks at most the budget's share of
the answers (its {report["confidence"]:.0%} Clopper-Pearson upper bound, when above 0%); the
target's greedy decoding gets {report["greedy_task_accuracy"]:.1%} of them right.

| preset | accuracy budget | start threshold | threshold | answers broken | accepted rate | tau |
|---|---|---|---|---|---|---|
{rows}
"""

    def write(tmp: Path) -> None:
        head.save_pretrained(tmp, safe_serialization=True)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (tmp / "README.md").write_text(card)

    return write_folder(folder, write, kind="acceptance-head")
