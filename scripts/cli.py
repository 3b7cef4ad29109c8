"""The `covspec` command: one entry point, one subcommand per job.

    covspec toy-data   --out DIR --num N --seed S     # inspectable jsonl + PNGs of the toy world
    covspec toy-target --out checkpoints/toy-target   # train (or reuse) the toy target VLM
    covspec toy-eval   --target checkpoints/toy-target --num 200
    covspec train      --config recipes/toy/drafter.yaml [--model.variant text_only ...]
    covspec bench      --target DIR --drafter DIR [--drafter DIR ...] [--data F.jsonl | --toy N] --out F.json

Subcommands import their heavy modules lazily so `covspec --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields


def _toy_data(args: argparse.Namespace) -> None:
    from covspec.data.readers import write_toy_jsonl

    path = write_toy_jsonl(args.out, num=args.num, seed=args.seed, image_size=args.image_size)
    print(f"wrote {args.num} conversations to {path}")


def _toy_target(args: argparse.Namespace) -> None:
    from covspec.modeling.toy_vlm import ToyVLMSpec
    from covspec.training.toy_target import ToyTargetSettings, build_toy_target

    spec_keys = {f.name for f in fields(ToyVLMSpec)}
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    spec = ToyVLMSpec(**{k: v for k, v in overrides.items() if k in spec_keys})
    setting_keys = {f.name for f in fields(ToyTargetSettings)} - {"spec"}
    settings = ToyTargetSettings(
        spec=spec, **{k: v for k, v in overrides.items() if k in setting_keys}
    )
    report = build_toy_target(args.out, settings, force=args.force)
    summary = {k: report[k] for k in ("object_accuracy", "recall", "precision", "train_seconds")}
    print(f"toy target in {args.out}: {json.dumps(summary)}")


def _toy_eval(args: argparse.Namespace) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from covspec.training.toy_target import EVAL_SEED, object_accuracy

    processor = AutoProcessor.from_pretrained(args.target)
    model = AutoModelForImageTextToText.from_pretrained(args.target).eval()
    metrics = object_accuracy(
        model, processor, args.num, seed=args.seed if args.seed is not None else EVAL_SEED
    )
    print(json.dumps(metrics, indent=2))


def _bench(args: argparse.Namespace) -> None:
    from covspec.data.readers import read_prompts_jsonl, toy_prompts
    from covspec.inference.bench import markdown_table, run_bench, write_report
    from covspec.inference.tree import DraftSettings

    samples = read_prompts_jsonl(args.data) if args.data else toy_prompts(args.toy)
    chain = DraftSettings(mode="chain", depth=args.depth, stop_margin=args.stop_margin)
    tree = DraftSettings(
        mode="tree", depth=args.depth, top_k=args.top_k, beam=args.beam, max_nodes=args.max_nodes,
        stop_margin=args.stop_margin, branch_margin=None if args.branch_margin < 0 else args.branch_margin,
    )  # fmt: skip
    report = run_bench(
        args.target, args.drafter, samples, args.max_new_tokens, chain, tree, warmup=args.warmup
    )
    path = write_report(report, args.out)
    print(markdown_table(report))
    print(f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covspec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("toy-data", help="write toy-world conversations as jsonl + images")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=72)
    p.set_defaults(func=_toy_data)

    p = sub.add_parser("toy-target", help="train the toy target VLM (cached unless --force)")
    p.add_argument("--out", default="checkpoints/toy-target")
    p.add_argument("--force", action="store_true", help="retrain even if a matching one exists")
    p.add_argument("--seed", type=int)
    for name in (
        "vision_steps",
        "lm_steps",
        "lm_batch",
        "vision_batch",
        "text_layers",
        "text_hidden",
        "eval_samples",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=int, dest=name)
    p.set_defaults(func=_toy_target)

    sub.add_parser(
        "train", help="train a drafter: covspec train --config RECIPE.yaml (LightningCLI)"
    )

    p = sub.add_parser("bench", help="runner vs HF generate / prompt lookup, side by side")
    p.add_argument("--target", default="checkpoints/toy-target")
    p.add_argument("--drafter", action="append", default=[], help="drafter folder (repeatable)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help='jsonl of {"id", "image", "prompt"}')
    src.add_argument("--toy", type=int, default=20, help="N unseen toy scenes (default)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--out", default="checkpoints/bench/toy.json")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--beam", type=int, default=2)
    p.add_argument("--max-nodes", type=int, default=10)
    p.add_argument(
        "--stop-margin", type=float, default=0.0, help="CoVSpec adaptive length (0: off)"
    )
    p.add_argument(
        "--branch-margin", type=float, default=0.5,
        help="CoVSpec parallel branching: top-k children only below this margin (negative: always, EAGLE-2)",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=1)
    p.set_defaults(func=_bench)

    p = sub.add_parser(
        "toy-eval", help="object accuracy of a target's descriptions on unseen scenes"
    )
    p.add_argument("--target", default="checkpoints/toy-target")
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--seed", type=int, help="scene stream (default: the held-out evaluation seed)")
    p.set_defaults(func=_toy_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # LightningCLI owns its own argument parsing
        from covspec.training.cli import main as train_main

        train_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"covspec {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
