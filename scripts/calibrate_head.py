"""`covspec calibrate-acceptance`: an acceptance head's thresholds, closed-loop (inference/calibrate.py).

    covspec calibrate-acceptance --head checkpoints/acceptance-head-para-short \\
        --target checkpoints/toy-para-target --drafter checkpoints/toy-para-drafter-short \\
        --toy 1000 --step 1 --mode chain

Rewrites the head folder in place (whole, atomically) with the new thresholds, the trials in
metrics.json and a section in its model card. Budgets default to the ones the head was trained
with (its metrics.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from covspec.scripts.args import at_least, between


def _budgets(args: argparse.Namespace) -> dict[str, float]:
    if args.budget:
        out = {}
        for item in args.budget:
            preset, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--budget takes PRESET=FRACTION, got {item!r}")
            out[preset] = float(value)
        return out
    metrics = json.loads((Path(args.head) / "metrics.json").read_text())
    return {p: c["budget"] for p, c in metrics["calibration"].items()}


def _calibrate(args: argparse.Namespace) -> None:
    from covspec.data.readers import toy_prompts
    from covspec.inference.calibrate import calibrate_head, save_calibration
    from covspec.inference.runner import SpecRunner
    from covspec.inference.simulate import load_head
    from covspec.scripts.cli import _draft_settings

    budgets = _budgets(args)  # before loading anything
    runner = SpecRunner.from_folders(args.target, args.drafter)
    head = load_head(args.head, runner)
    report = calibrate_head(
        runner, head, toy_prompts(args.toy, seed=args.seed, mixed=True), budgets,
        _draft_settings(args, args.mode), args.max_new_tokens, args.compute, args.seed,
        args.step, args.max_steps, args.confidence,
    )  # fmt: skip
    for preset, c in report["presets"].items():
        print(
            f"{preset}: threshold {c['start_threshold']:.3f} -> {c['threshold']:.3f}, "
            f"broken {c['broken']}/{c['answers']} (bound {c['accuracy_drop_bound']:.4f}, "
            f"budget {c['budget']}), "
            f"accepts {c['accepted_rate']:.1%} of mismatches, tau {c['tau']:.2f}"
        )
    print(f"wrote {save_calibration(head, report, args.head)}")


def add_calibrate_parser(sub) -> None:
    from covspec.scripts.cli import _add_draft_arguments

    p = sub.add_parser(
        "calibrate-acceptance",
        help="closed-loop thresholds of an acceptance head: decode held-out scenes, cap the drop",
    )
    p.add_argument("--head", required=True, help="acceptance head folder (rewritten in place)")
    p.add_argument("--target", default="checkpoints/toy-target")
    p.add_argument("--drafter", required=True)
    p.add_argument("--toy", type=at_least(1), default=1000, help="held-out toy conversations")
    p.add_argument(
        "--seed", type=int, default=4242,
        help="toy stream: neither the trajectories' (2024) nor simulate's scenes (31337)",
    )  # fmt: skip
    p.add_argument("--budget", action="append", help="PRESET=FRACTION (default: the head's own)")
    p.add_argument(
        "--confidence", type=between(0, 0.999), default=0.9,
        help="the budget bounds this upper confidence bound of the drop (0: the raw rate)",
    )  # fmt: skip
    p.add_argument("--step", type=between(1e-6, None), default=0.5, help="logit step")
    p.add_argument("--max-steps", type=at_least(0), default=16)
    p.add_argument("--compute", default="a40-orin-7b", help="clock the channel draws run on")
    p.add_argument("--max-new-tokens", type=at_least(1), default=96)
    p.add_argument("--mode", choices=["chain", "tree"], default="chain")
    _add_draft_arguments(p)
    p.set_defaults(func=_calibrate)
