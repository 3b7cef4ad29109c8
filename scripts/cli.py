"""The `covspec` command: one entry point, one subcommand per job.

    covspec toy-data   --out DIR --num N --seed S     # inspectable jsonl + PNGs of the toy world
    covspec toy-data   --out DIR --video --frames 16  # toy video clips (mp4) + ground truth
    covspec toy-target --out checkpoints/toy-target   # train (or reuse) the toy target VLM
    covspec toy-eval   --target checkpoints/toy-target --num 200
    covspec toy-target --video                        # the toy video target (clips as frames)
    covspec toy-eval   --video --target checkpoints/toy-video-target --num 100 --frames 4 16
    covspec video-sweep --target DIR --drafter DIR [...] --frames 8 64 576 --out F.json
    covspec train      --config recipes/toy/drafter.yaml [--model.variant text_only ...]
    covspec bench      --target DIR --drafter DIR [--drafter DIR ...] [--data F.jsonl | --toy N] [--gate-cost-weight W ...] --out F.json
    covspec simulate   --target DIR --drafter DIR [--channel good|medium|bad|PRESET@rttMS|TRACE.csv ...] --out F.json
    covspec eval       --target DIR --drafter DIR --benchmark llava-bench|mmmu|mmbench|video-mme|mvbench [--data-dir DIR|HUB_ID] [--limit N] --out F.json
    covspec collect-acceptance --drafter DIR --toy N --out DIR   # acceptance-head trajectories
    covspec export     DRAFTER_DIR --target DIR --format speculators|eagle3 --out DIR [--dtype bfloat16]
    covspec export-checkpoint RUN/last.ckpt --out DIR    # the HF drafter folder from a checkpoint
    covspec publish    DIR --repo-id ORG/NAME [--base-model ID] [--private] [--exist-ok] [--dry-run]

Subcommands import their heavy modules lazily so `covspec --help` stays instant. Every command,
`train` included, runs inside one error boundary (scripts/args.py): a user mistake prints one
line and exits 2, `--debug` anywhere on the line adds the traceback. Model arguments that look
like local paths never fall back to the Hub (covspec.modeling.identity.resolve_source).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from covspec.scripts.args import Parser, at_least, between, debug_requested, run_guarded
from covspec.scripts.calibrate_head import add_calibrate_parser
from covspec.scripts.toy_commands import add_toy_parsers
from covspec.scripts.video_sweep import add_video_sweep_parser


def _bench(args: argparse.Namespace) -> None:
    from covspec.data.readers import read_prompts_jsonl, toy_prompts
    from covspec.inference.bench import run_bench
    from covspec.inference.bench_report import markdown_table, write_report
    from covspec.inference.tree import DraftSettings
    from covspec.modeling.identity import resolve_source

    target = resolve_source(args.target, "target")
    drafters = [resolve_source(d, "drafter") for d in args.drafter]
    samples = (
        read_prompts_jsonl(args.data) if args.data else toy_prompts(args.toy, mixed=args.toy_mixed)
    )
    chain = DraftSettings(mode="chain", depth=args.depth, stop_margin=args.stop_margin)
    tree = _draft_settings(args)
    report = run_bench(
        target, drafters, samples, args.max_new_tokens, chain, tree,
        warmup=args.warmup, device=args.device, dtype=args.dtype,
        gate_cost_weights=args.gate_cost_weights, repeats=args.repeats,
    )  # fmt: skip
    print(markdown_table(report))  # first: a failed write (full disk) must not lose the run
    path = write_report(report, args.out)
    print(f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")
    pareto = path.with_name(path.stem + "-pareto.png")
    if pareto.exists():
        print(f"wrote {pareto}")


def _draft_settings(args: argparse.Namespace, mode: str = "tree"):
    from covspec.inference.tree import DraftSettings

    return DraftSettings(
        mode=mode, depth=args.depth, top_k=args.top_k, beam=args.beam, max_nodes=args.max_nodes,
        stop_margin=args.stop_margin, branch_margin=None if args.branch_margin < 0 else args.branch_margin,
    )  # fmt: skip


def _simulate(args: argparse.Namespace) -> None:
    from covspec.data.readers import read_prompts_jsonl, toy_prompts
    from covspec.inference.simulate import METHODS, SimulationPlan, simulate
    from covspec.inference.simulate_report import markdown, write_report
    from covspec.modeling.identity import resolve_source

    target = resolve_source(args.target, "target")
    drafters = [resolve_source(d, "drafter") for d in args.drafter]

    sweep = [float(x) for x in args.rtt_sweep.split(",") if x.strip()] if args.rtt_sweep else []
    if any(not 0 < x < float("inf") for x in sweep):
        raise ValueError(f"--rtt-sweep values must be positive milliseconds, got {sweep}")
    plan = SimulationPlan(
        drafters=drafters,
        methods=args.protocol or list(METHODS),
        channels=args.channel or ["good", "medium", "bad"],
        computes=args.compute or ["measured", "a40-orin-7b"],
        rtt_sweep_ms=sweep,
        sweep_channel=args.sweep_channel,
        sweep_compute=args.sweep_compute,
        settings=_draft_settings(args, args.mode),
        max_depth=args.max_depth,
        seed=args.seed,
        accept_head=args.accept_head,
        gate_cost_weights=args.gate_cost_weights,
        typical=args.typical,
    )
    samples = (
        read_prompts_jsonl(args.data) if args.data else toy_prompts(args.toy, mixed=args.toy_mixed)
    )
    report = simulate(target, plan, samples, args.max_new_tokens)
    print(markdown(report))  # first: a failed write (full disk) must not lose the run
    path = write_report(report, args.out)
    print(f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")
    pareto = path.with_name(path.stem + "-pareto.png")
    if pareto.exists():
        print(f"wrote {pareto}")


def _add_draft_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--depth", type=at_least(1), default=6)
    p.add_argument("--top-k", type=at_least(1), default=2)
    p.add_argument("--beam", type=at_least(1), default=2)
    p.add_argument(
        "--max-nodes", type=at_least(1), default=10,
        help="tree nodes verified per round, greedy only (a sampled tree verifies all it drafts)",
    )  # fmt: skip
    p.add_argument(
        "--stop-margin", type=between(0, 1), default=0.0, help="CoVSpec adaptive length (0: off)"
    )
    p.add_argument(
        "--branch-margin", type=between(None, 1), default=0.5,
        help="CoVSpec parallel branching: top-k children only below this margin (negative: always, EAGLE-2)",
    )  # fmt: skip


def _add_price_argument(p) -> None:
    p.add_argument(
        "--gate-cost-weight", type=between(0, None), action="append", default=[],
        dest="gate_cost_weights",
        help="run each critic-gated drafter at this price of a prefix row (repeatable): "
        "several points on one elastic drafter's tau / rows curve",
    )  # fmt: skip


def _add_simulate_parser(sub) -> None:
    p = sub.add_parser(
        "simulate", help="real decoding priced over simulated device-edge links, per protocol"
    )
    p.add_argument("--target", default="checkpoints/toy-target")
    p.add_argument("--drafter", action="append", default=[], help="drafter folder (repeatable)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help='jsonl of {"id", "image", "prompt"}')
    src.add_argument("--toy", type=at_least(1), default=20, help="N unseen toy scenes (default)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=96)
    p.add_argument(
        "--protocol", action="append",
        help="edge_only, sync, sync_adaptive, decoupled, progressive (repeatable; default all)",
    )  # fmt: skip
    p.add_argument(
        "--channel", action="append",
        help="good, medium, bad, PRESET@rttMS or a CSV trace time_s,snr_db,rtt_ms[,uplink_mbps,downlink_mbps] (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--compute", action="append", help="measured or a40-orin-7b (repeatable; default both)"
    )
    p.add_argument("--rtt-sweep", default="5,10,20,50,100,200,400", help="ms list; '' skips")
    p.add_argument("--sweep-channel", default="medium")
    p.add_argument("--sweep-compute", default="a40-orin-7b")
    p.add_argument("--max-depth", type=at_least(1), default=12, help="cap of the adaptive depth")
    p.add_argument("--mode", choices=["tree", "chain"], default="tree", help="draft shape")
    p.add_argument(
        "--toy-mixed", action="store_true",
        help="toy scenes with their own first question (all prompt kinds) instead of descriptions",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="channel draws (per sample: seed + i)")
    p.add_argument(
        "--accept-head",
        help="acceptance head folder: adds lossy rows (full / selective upload) for the first drafter",
    )
    p.add_argument(
        "--typical", type=between(0, 1), action="append", default=[], metavar="EPS",
        help="adds a lossy row for the first drafter: Medusa's typical acceptance at this "
        "epsilon, the CSI-blind baseline of the head (repeatable)",
    )  # fmt: skip
    _add_price_argument(p)
    p.add_argument("--out", default="checkpoints/simulate/toy.json")
    _add_draft_arguments(p)
    p.set_defaults(func=_simulate)


def _eval(args: argparse.Namespace) -> None:
    import torch

    from covspec.data.benchmarks import load_benchmark
    from covspec.inference.eval_report import markdown
    from covspec.inference.evaluate import run_eval
    from covspec.inference.runner import SpecRunner

    bench = load_benchmark(
        args.benchmark, data_dir=args.data_dir, split=args.split, config=args.config,
        video_dir=args.video_dir, num_frames=args.num_frames, limit=args.limit,
        skip_bad=args.skip_bad,
    )  # fmt: skip
    dtype = getattr(torch, args.dtype)
    runner = SpecRunner.from_folders(args.target, args.drafter, dtype, device=args.device)
    modes = [_draft_settings(args, mode) for mode in args.mode or ["chain", "tree"]]
    info = {
        "target": args.target, "drafter": args.drafter, "data": args.data_dir or bench.spec.hub_id,
        "split": args.split or bench.spec.split, "config": args.config or bench.spec.config,
        "dtype": args.dtype,
        "num_frames": args.num_frames if bench.spec.video else None,
    }  # fmt: skip
    report = run_eval(
        runner, bench, args.out, args.max_new_tokens, modes, args.warmup, args.fresh, info
    )
    print(markdown(report))
    out = Path(args.out)
    print(
        f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}, {report['samples_file']}"
    )


def _add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="acceptance length, speedup and accuracy of a drafter on a real benchmark"
    )
    p.add_argument("--target", required=True, help="target VLM folder")
    p.add_argument("--drafter", required=True, help="drafter folder")
    p.add_argument(
        "--benchmark", required=True, help="llava-bench, mmmu, mmbench, video-mme or mvbench"
    )
    p.add_argument(
        "--data-dir", help="local mirror (folder or parquet/json file) or Hub id; default: the benchmark's Hub id"
    )  # fmt: skip
    p.add_argument("--split", help="default: the split lmms-eval evaluates")
    p.add_argument("--config", help="dataset config (MMBench: en; MVBench: one task)")
    p.add_argument("--video-dir", help="where the clips are (default: --data-dir)")
    p.add_argument("--num-frames", type=at_least(1), default=8, help="frames sampled per clip")
    p.add_argument(
        "--limit", type=at_least(1),
        help="N rows spread evenly over the set (sets ordered by subject or task stay covered)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="target and drafter dtype (bfloat16 on a GPU, as served)",
    )  # fmt: skip
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad rows, not fail")
    p.add_argument("--max-new-tokens", type=at_least(1), default=128)
    p.add_argument(
        "--mode", action="append", choices=["chain", "tree"], help="repeatable; default both"
    )
    p.add_argument("--warmup", type=at_least(0), default=1)
    p.add_argument("--fresh", action="store_true", help="discard an earlier run's samples")
    p.add_argument("--device", default="cpu", help="torch device of target and drafter")
    p.add_argument("--out", default="checkpoints/eval/eval.json")
    _add_draft_arguments(p)
    p.set_defaults(func=_eval)


def _collect_acceptance(args: argparse.Namespace) -> None:
    from covspec.data.toy_world import make_sample
    from covspec.inference.runner import SpecRunner
    from covspec.inference.trajectories import collect

    runner = SpecRunner.from_folders(args.target, args.drafter)
    samples = [make_sample(args.seed, i) for i in range(args.toy)]
    summary = collect(
        runner, samples, args.out, args.max_new_tokens, _draft_settings(args, args.mode),
        args.shard_size, tuple(args.preset or ("good", "medium", "bad")),
    )  # fmt: skip
    print(json.dumps(summary, indent=2))


def _add_collect_parser(sub) -> None:
    p = sub.add_parser(
        "collect-acceptance",
        help="mismatch trajectories of lossless decoding, labelled by rollout (acceptance head)",
    )
    p.add_argument("--target", default="checkpoints/toy-target")
    p.add_argument("--drafter", required=True)
    p.add_argument("--toy", type=at_least(1), default=600, help="toy conversations to decode")
    p.add_argument("--seed", type=int, default=2024, help="toy stream (not an evaluation seed)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=at_least(1), default=96)
    p.add_argument("--mode", choices=["chain", "tree"], default="chain")
    p.add_argument("--shard-size", type=at_least(1), default=50)
    p.add_argument("--preset", action="append", help="channel presets to draw CSI from")
    _add_draft_arguments(p)
    p.set_defaults(func=_collect_acceptance)


def _publish(args: argparse.Namespace) -> None:
    from covspec.scripts.publish import publish

    result = publish(
        args.dir, args.repo_id, private=args.private, dry_run=args.dry_run,
        dry_run_dir=args.dry_run_dir, exist_ok=args.exist_ok, base_model=args.base_model,
        license=args.license, token=args.token, commit_message=args.commit_message,
    )  # fmt: skip
    print(result.summary())


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from huggingface_hub.utils import validate_repo_id
    from transformers import AutoModelForImageTextToText

    from covspec.modeling.adapters import adapter_for
    from covspec.modeling.drafter import Drafter
    from covspec.modeling.export import check_out_dir, export_drafter
    from covspec.modeling.identity import looks_local, target_identity
    from covspec.modeling.tokens import tokenizer_fingerprint

    check_out_dir(Path(args.out), args.overwrite)  # before loading anything
    if args.verifier:
        try:
            validate_repo_id(args.verifier)
        except ValueError:
            raise ValueError(
                f"--verifier {args.verifier!r} is not a Hub model id (ORG/NAME)"
            ) from None
    for name, folder in (("drafter", args.drafter), ("target", args.target)):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{name} folder {folder} does not exist")
    target = AutoModelForImageTextToText.from_pretrained(args.target).eval()
    drafter = Drafter.from_pretrained(args.drafter).eval()  # refused for another target:
    drafter.attach_target(
        adapter_for(target), tokenizer_fingerprint(args.target), target_identity(target)
    )
    verifier = args.verifier or drafter.config.target_name_or_path or args.target
    path = export_drafter(
        drafter,
        args.out,
        args.format,
        dtype=args.dtype,
        target_architectures=target.config.architectures,
        target_name_or_path=verifier,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.format} EAGLE-3 checkpoint to {path}")
    if looks_local(verifier):  # an engine elsewhere resolves the verifier by this name
        print(
            f"note: the export names its verifier by the local path {verifier!r}; pass "
            "--verifier ORG/NAME (the target's Hub id) for a checkpoint others can load",
            file=sys.stderr,
        )


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a drafter as an EAGLE-3 checkpoint (vLLM, SGLang)")
    p.add_argument("drafter", metavar="DRAFTER_DIR", help="drafter folder (save_pretrained)")
    p.add_argument("--target", required=True, help="the target VLM folder it was trained for")
    p.add_argument("--format", required=True, choices=["speculators", "eagle3"])
    p.add_argument("--out", required=True, help="output folder (refused if non-empty)")
    p.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], help="default: the drafter's"
    )
    p.add_argument(
        "--verifier", help="the target's Hub id to name in the export (default: the recorded one)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_export)


def _export_checkpoint(args: argparse.Namespace) -> None:
    from covspec.training.checkpoint_export import export_checkpoint

    export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)


def _add_export_checkpoint_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-checkpoint",
        help="the HF drafter folder (weights, card, metrics) from any Lightning checkpoint",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="e.g. checkpoints/runs/toy-drafter/last.ckpt")
    p.add_argument("--out", required=True, help="drafter folder (swapped in beside an old one)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty foreign --out")
    p.set_defaults(func=_export_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="covspec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_toy_parsers(sub)
    sub.add_parser(
        "train", help="train a drafter: covspec train --config RECIPE.yaml (LightningCLI)"
    )

    p = sub.add_parser("bench", help="runner vs HF generate / prompt lookup, side by side")
    p.add_argument("--target", default="checkpoints/toy-target")
    p.add_argument("--drafter", action="append", default=[], help="drafter folder (repeatable)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help='jsonl of {"id", "image", "prompt"}')
    src.add_argument("--toy", type=at_least(1), default=20, help="N unseen toy scenes (default)")
    p.add_argument(
        "--toy-mixed", action="store_true",
        help="each toy scene with its own first question (descriptions, counts, colours, "
        "positions) instead of 'Describe the image.'",
    )  # fmt: skip
    p.add_argument("--max-new-tokens", type=at_least(1), default=96)
    p.add_argument("--out", default="checkpoints/bench/toy.json")
    _add_draft_arguments(p)
    p.add_argument("--warmup", type=at_least(0), default=1)
    p.add_argument(
        "--repeats", type=at_least(1), default=1,
        help="rounds of every method per sample (shuffled order); each method's fastest run is kept",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch device of target and drafters")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="of target and drafters; the report states it beside identical_fraction",
    )  # fmt: skip
    _add_price_argument(p)
    p.set_defaults(func=_bench)

    p = sub.add_parser("publish", help="push an exported drafter folder to the Hugging Face Hub")
    p.add_argument("dir", help="exported folder (config.json + model.safetensors + metrics.json)")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--exist-ok", action="store_true", help="add a commit to an existing repo")
    p.add_argument("--dry-run", action="store_true", help="write what would be uploaded, no upload")
    p.add_argument("--dry-run-dir", help="default: DIR/../NAME.publish-dry-run")
    p.add_argument("--base-model", help="Hub id of the target (default: from config.json)")
    p.add_argument("--license", help="e.g. apache-2.0 (default: none in the card)")
    p.add_argument("--token", help="default: HF_TOKEN or the saved `hf auth login`")
    p.add_argument("--commit-message")
    p.set_defaults(func=_publish)
    _add_export_parser(sub)
    _add_export_checkpoint_parser(sub)
    _add_simulate_parser(sub)
    _add_eval_parser(sub)
    _add_collect_parser(sub)
    add_calibrate_parser(sub)
    add_video_sweep_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    debug, argv = debug_requested(sys.argv[1:] if argv is None else list(argv))
    if argv[:1] == ["train"]:  # LightningCLI owns its own argument parsing
        from covspec.training.cli import main as train_main

        return run_guarded("train", lambda: train_main(argv[1:]), debug)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a refused flag (its one line printed): a status, as below
        if e.code in (0, None):
            raise  # --help
        return e.code if isinstance(e.code, int) else 2
    return run_guarded(args.command, lambda: args.func(args), debug)


if __name__ == "__main__":
    raise SystemExit(main())
