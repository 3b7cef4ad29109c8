"""`covspec toy-data`, `toy-target` and `toy-eval`: the toy worlds, their targets and their
accuracy.

    covspec toy-data   --out DIR --num N --seed S     # inspectable jsonl + PNGs of the toy world
    covspec toy-data   --out DIR --video --frames 16  # toy video clips (mp4) + ground truth
    covspec toy-target --out checkpoints/toy-target   # train (or reuse) the toy target VLM
    covspec toy-target --video                        # the toy video target (clips as frames)
    covspec toy-eval   --video --target checkpoints/toy-video-target --num 100 --frames 4 16
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from covspec.scripts.args import at_least, between


def _toy_data(args: argparse.Namespace) -> None:
    from covspec.data.readers import write_toy_jsonl
    from covspec.data.toy_video import write_toy_video

    if args.video and args.paraphrase:
        raise ValueError("--paraphrase is a world of images; the toy video world has none")
    if args.video:
        path = write_toy_video(
            args.out, args.num, args.seed, args.frames, args.image_size, args.format, args.overwrite
        )
        print(f"wrote {args.num} clips of {args.frames} frames to {path}")
        return
    path = write_toy_jsonl(
        args.out, num=args.num, seed=args.seed, image_size=args.image_size,
        overwrite=args.overwrite, paraphrase=args.paraphrase,
    )  # fmt: skip
    print(f"wrote {args.num} conversations to {path}")


VIDEO_TARGET_FLAGS = (
    "describe_prob",
    "max_questions",
    "min_frames",
    "max_frames",
    "frame_spread",
    "symbolic",
    "where_every",
    "long_every",
    "long_max_frames",
    "long_step_frames",
    "align_steps",
    "pixel_polish",
    "pixel_lr",
    "pixel_step_frames",
)


def _toy_target(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from covspec.training.toy_target import ToyTargetSettings, build_toy_target
    from covspec.training.toy_video_target import ToyVideoTargetSettings

    base = ToyVideoTargetSettings() if args.video else ToyTargetSettings()
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    video_only = sorted(k for k in VIDEO_TARGET_FLAGS if k in overrides)
    if video_only and not args.video:
        flags = ", ".join(
            "--pixel-language" if k == "symbolic" else "--" + k.replace("_", "-")
            for k in video_only
        )
        raise ValueError(f"{flags} set the toy video target's conversations: add --video")
    spec_keys = {f.name for f in fields(base.spec)}
    spec = replace(base.spec, **{k: v for k, v in overrides.items() if k in spec_keys})
    setting_keys = {f.name for f in fields(base)} - {"spec"}
    settings = replace(base, spec=spec, **{k: v for k, v in overrides.items() if k in setting_keys})
    default = "toy-para-target" if args.paraphrase else "toy-target"
    out = args.out or ("checkpoints/toy-video-target" if args.video else f"checkpoints/{default}")
    report = build_toy_target(out, settings, force=args.force, overwrite=args.overwrite)
    keys = (
        ("event_accuracy", "event_accuracy_by", "where_to_guess_rate")
        if args.video
        else ("object_accuracy", "recall", "precision")
    )
    summary = {k: report[k] for k in (*keys, "train_seconds") if k in report}  # older reports
    print(f"toy target in {out}: {json.dumps(summary)}")


def _toy_eval(args: argparse.Namespace) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from covspec.modeling.identity import resolve_source
    from covspec.training.toy_target import EVAL_SEED, object_accuracy
    from covspec.training.toy_video_target import event_accuracy

    if args.frames is not None and not args.video:
        raise ValueError(f"--frames {args.frames} sets clip lengths: add --video")
    default = "checkpoints/toy-video-target" if args.video else "checkpoints/toy-target"
    target = resolve_source(args.target or default, "target")
    processor = AutoProcessor.from_pretrained(target)
    model = AutoModelForImageTextToText.from_pretrained(target).eval()
    seed = args.seed if args.seed is not None else EVAL_SEED
    if args.video:
        size = processor.image_processor.size["height"]
        frames = tuple(args.frames or (4, 16))
        metrics = event_accuracy(model, processor, args.num, frames, size, seed)
    else:
        metrics = object_accuracy(model, processor, args.num, seed=seed)
    print(json.dumps(metrics, indent=2))


def add_toy_parsers(sub) -> None:
    p = sub.add_parser("toy-data", help="write toy-world conversations as jsonl + images")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=at_least(1), default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=at_least(36), default=72)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty foreign --out")
    p.add_argument("--video", action="store_true", help="toy video clips instead of images")
    p.add_argument(
        "--paraphrase", action="store_true",
        help="the paraphrase world: answers in synonyms (crimson disc, upper left, 3 items)",
    )  # fmt: skip
    p.add_argument("--frames", type=at_least(2), default=8, help="frames per clip (--video)")
    p.add_argument(
        "--format", choices=("mp4", "frames"), default="mp4", help="clip files (--video)"
    )
    p.set_defaults(func=_toy_data)

    p = sub.add_parser("toy-target", help="train the toy target VLM (cached unless --force)")
    p.add_argument(
        "--out",
        help="default: checkpoints/toy-target (--video: toy-video-target, --paraphrase: toy-para-target)",
    )
    p.add_argument("--video", action="store_true", help="the toy video target (clips as frames)")
    p.add_argument(
        "--paraphrase", action="store_true", default=None,
        help="train on the paraphrase world (answers in synonyms: crimson disc, upper left)",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="retrain even if a matching one exists")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty foreign --out")
    p.add_argument("--seed", type=int)
    for name in (
        "vision_steps",
        "lm_steps",
        "lm_batch",
        "vision_batch",
        "text_layers",
        "text_hidden",
        "text_heads",
        "eval_samples",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=at_least(1), dest=name)
    for name in ("vision_lr", "lm_lr"):
        p.add_argument("--" + name.replace("_", "-"), type=between(1e-6, 1.0), dest=name)
    p.add_argument(
        "--describe-prob", type=between(0, 1), dest="describe_prob",
        help="--video: share of training clips whose conversation is their caption",
    )  # fmt: skip
    p.add_argument(
        "--max-questions", type=at_least(1), dest="max_questions",
        help="--video: event questions per question conversation (at most)",
    )  # fmt: skip
    p.add_argument("--min-frames", type=at_least(2), help="--video: shortest training clip")
    p.add_argument("--max-frames", type=at_least(2), help="--video: longest training clip")
    p.add_argument(
        "--frame-spread", choices=("uniform", "log"), help="--video: training clip lengths"
    )
    p.add_argument(
        "--pixel-language", action="store_const", const=False, dest="symbolic",
        help="--video: the language stage on rendered frames, not symbolic frames",
    )  # fmt: skip
    p.add_argument(
        "--where-every", type=at_least(0), dest="where_every",
        help="--video: every k-th language step asks where every object of 2-frame clips "
        "moves (0: never)",
    )  # fmt: skip
    p.add_argument(
        "--long-every", type=at_least(0), dest="long_every",
        help="--video: every k-th language step trains on clips longer than --max-frames "
        "(0: never)",
    )  # fmt: skip
    p.add_argument(
        "--long-max-frames", type=at_least(3), dest="long_max_frames",
        help="--video: longest clip of the long-clip steps",
    )  # fmt: skip
    p.add_argument(
        "--long-step-frames", type=at_least(1), dest="long_step_frames",
        help="--video: frames a long-clip step holds (its clip count: this // clip length)",
    )  # fmt: skip
    p.add_argument(
        "--align-steps", type=at_least(1), dest="align_steps",
        help="--video: projector regression steps after the symbolic language stage",
    )  # fmt: skip
    p.add_argument(
        "--pixel-polish", type=at_least(0), dest="pixel_polish", metavar="STEPS",
        help="--video: language steps on rendered frames after the projector regression, "
        "every other one a long clip (0: none)",
    )  # fmt: skip
    p.add_argument(
        "--pixel-lr", type=between(1e-6, 1.0), dest="pixel_lr",
        help="--video: learning rate of the pixel polish",
    )  # fmt: skip
    p.add_argument(
        "--pixel-step-frames", type=at_least(1), dest="pixel_step_frames",
        help="--video: frames a long-clip step of the pixel polish holds",
    )  # fmt: skip
    p.set_defaults(func=_toy_target)

    p = sub.add_parser(
        "toy-eval", help="object accuracy (--video: event accuracy) of a target on unseen scenes"
    )
    p.add_argument(
        "--target", help="default: checkpoints/toy-target (--video: checkpoints/toy-video-target)"
    )
    p.add_argument(
        "--num", type=at_least(1), default=200, help="scenes (--video: clips per length)"
    )
    p.add_argument("--seed", type=int, help="scene stream (default: the held-out evaluation seed)")
    p.add_argument("--video", action="store_true", help="event accuracy of a toy video target")
    p.add_argument(
        "--frames", type=at_least(2), nargs="+", help="clip lengths (--video; default: 4 16)"
    )
    p.set_defaults(func=_toy_eval)
