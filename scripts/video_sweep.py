"""`covspec video-sweep`: every drafter (and the keep-or-offload policy) over clip lengths.

    covspec video-sweep --target checkpoints/toy-video-target \\
        --drafter checkpoints/toy-video-drafter --drafter checkpoints/toy-video-drafter-pool3 \\
        --frames 8 32 128 576 --clips 6 --out docs/results/video-sweep.json
    # then the policy, its threshold measured by that sweep:
    covspec video-sweep ... --visual-policy auto --keep toy-video-drafter-pool3 \\
        --offload toy-video-drafter --threshold-from docs/results/video-sweep.json --out F.json
    # every drafter at several tree depths; auto then ties its depth to the clip's length
    # (one such sweep gives the threshold too, read at the default --depth):
    covspec video-sweep ... --depths 4 6 8 --out depths.json
    covspec video-sweep ... --visual-policy auto ... --threshold-from depths.json \
        --depth-from depths.json --out F.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from covspec.scripts.args import at_least


def _video_sweep(args: argparse.Namespace) -> None:
    from covspec.inference.sweep import (
        depth_table_from,
        markdown_table,
        run_sweep,
        threshold_from,
        write_sweep,
    )
    from covspec.inference.visual_policy import AutoVisualPolicy, keeps
    from covspec.modeling.identity import resolve_source
    from covspec.scripts.cli import _draft_settings

    if args.visual_policy != "auto":  # its flags would be ignored otherwise
        given = [f for f in ("keep", "offload", "threshold", "threshold_from", "depth_from")
                 if getattr(args, f) is not None]  # fmt: skip
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise ValueError(f"{flags} set --visual-policy auto: add it")

    target = resolve_source(args.target, "target")
    drafters = [resolve_source(d, "drafter") for d in args.drafter]
    names = {Path(d).name for d in drafters}
    policies, threshold, depths = None, None, None
    if args.visual_policy == "auto":
        for role, name in (("--keep", args.keep), ("--offload", args.offload)):
            if name not in names:
                raise ValueError(
                    f"{role} {name!r} is not one of the --drafter folders {sorted(names)}"
                )
        if args.threshold is not None:
            threshold = args.threshold
        elif args.threshold_from:
            measured = json.loads(Path(args.threshold_from).read_text())
            threshold = threshold_from(measured, args.keep, args.offload)
        else:
            raise ValueError(
                "--visual-policy auto needs --threshold-from SWEEP.json (or --threshold N)"
            )
        if args.depth_from:
            measured = json.loads(Path(args.depth_from).read_text())
            depths = depth_table_from(
                measured,
                lambda tokens: args.keep if keeps(tokens, threshold) else args.offload,
                args.depth,
            )
        policies = {
            "auto": lambda runners: AutoVisualPolicy(
                runners[args.keep], runners[args.offload], threshold, depths
            )
        }
    report = run_sweep(
        target, drafters, args.frames, args.clips, args.max_new_tokens, _draft_settings(args),
        policies=policies, depths=args.depths, repeats=args.repeats, seed=args.seed,
    )  # fmt: skip
    if policies:
        report["policy"] = {
            "keep": args.keep, "offload": args.offload, "threshold_visual_tokens": threshold,
            "threshold_from": args.threshold_from, "depths": depths,
            "depth_from": args.depth_from,
        }  # fmt: skip
    print(markdown_table(report))
    path = write_sweep(report, args.out)
    print(f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")


def add_video_sweep_parser(sub) -> None:
    from covspec.scripts.cli import _add_draft_arguments

    p = sub.add_parser(
        "video-sweep", help="drafters over toy clip lengths (72 to 5000+ visual tokens)"
    )
    p.add_argument("--target", default="checkpoints/toy-video-target")
    p.add_argument("--drafter", action="append", default=[], help="drafter folder (repeatable)")
    p.add_argument("--frames", type=at_least(2), nargs="+", default=[8, 32, 128, 576])
    p.add_argument("--clips", type=at_least(1), default=6, help="unseen clips per length")
    p.add_argument("--max-new-tokens", type=at_least(1), default=64)
    p.add_argument(
        "--repeats", type=at_least(1), default=1,
        help="rounds of every method per clip (shuffled order); each method's fastest run is kept",
    )  # fmt: skip
    p.add_argument(
        "--seed", type=int,
        help="clip stream (default: the bench's prompt stream): pick auto's threshold on one "
        "seed, report auto on another",
    )  # fmt: skip
    p.add_argument("--visual-policy", choices=("none", "auto"), default="none")
    p.add_argument("--keep", help="drafter folder name that keeps a visual prefix (auto)")
    p.add_argument("--offload", help="visual-token-free drafter folder name (auto)")
    p.add_argument("--threshold-from", help="a sweep report of keep and offload (auto)")
    p.add_argument("--threshold", type=at_least(0), help="visual tokens; overrides the measurement")
    p.add_argument(
        "--depths", type=at_least(1), nargs="+",
        help="run every drafter at each of these tree depths (methods NAME@dD)",
    )  # fmt: skip
    p.add_argument(
        "--depth-from",
        help="a sweep run with --depths: auto's tree depth per clip length from it (auto)",
    )
    p.add_argument("--out", default="checkpoints/bench/video-sweep.json")
    _add_draft_arguments(p)
    p.set_defaults(func=_video_sweep)
