"""`covspec train`: LightningCLI over DrafterDistillation + ConversationDataModule.

    covspec train --config recipes/toy/drafter.yaml
    covspec train --config recipes/toy/drafter.yaml --model.variant full_visual
    covspec train --config recipes/toy/drafter.yaml --resume none      # ignore last.ckpt

The data module's `target` is linked to the model's, so a recipe names its target once. Strings in
the trainer section may hold `{variant}`, `{variant_suffix}` ("" for visual_free, else
"-full-visual" / "-text-only"; then "-elastic" for a compressed visual prefix, or the fixed
primitive, e.g. "-pool4"; then "-seedN" for `--seed_everything N` other than 0), `{codec_suffix}`
("" or "-r16" for a feature codec of rank 16), `{target_stem}` (the target folder's name without
"-target", e.g. "toy-video") and `{recipe}` (the folder of the recipe given last with --config,
e.g. "llava-1.5-7b"), so checkpoints, exports and run names follow `--model.variant` and the
target, and a baseline never resumes from another variant's checkpoint (nor a seed replicate from
another seed's: the resume guard checks settings and target, not the seed). A recipe may start with
`config: ../_shared/BASE.yaml` to inherit a shared base (jsonargparse nesting). By default training
resumes from the `last.ckpt` of the recipe's ModelCheckpoint when there is one: exactly (the data
loader resumes mid-epoch, data/resumable.py), and only a checkpoint of the same drafter settings
and target identity (training/guards.py). Checkpoints are written beside the old one and renamed
over it, so a killed run keeps a whole `last.ckpt`. A resumed run with nothing left to train
exports from its checkpoint when the drafter folder is missing or older, and says so. Errors reach
the user as one line through `covspec`'s error boundary (scripts/cli.py).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from covspec.data.datamodule import ConversationDataModule
from covspec.modeling.compressor import DEFAULT_OPTIONS
from covspec.training.callbacks import ExportDrafter
from covspec.training.distill import DrafterDistillation
from covspec.training.guards import AtomicCheckpointIO


def _format(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, sub in names.items():
            value = value.replace("{" + key + "}", sub)
        return value
    if isinstance(value, list):
        return [_format(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _format(v, names) for k, v in value.items()}
    if isinstance(value, Namespace):
        for key in list(vars(value)):
            setattr(value, key, _format(getattr(value, key), names))
    return value


class CovspecCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.target", "data.target")
        parser.add_argument(
            "--resume",
            default="last",
            help="'last' (resume if a last.ckpt exists), 'none', or a checkpoint path",
        )

    def before_instantiate_classes(self) -> None:
        model = self.config.model
        variant = model.variant
        suffix = "" if variant == "visual_free" else "-" + variant.replace("_", "-")
        if model.get("visual_prefix") == "compressed":  # -elastic, or the one fixed primitive
            options = (model.get("compressor") or {}).get("options") or DEFAULT_OPTIONS
            suffix += "-elastic" if len(options) > 1 else "-" + options[0].replace(":", "")
        seed = self.config.get("seed_everything")  # an int by now (LightningCLI._set_seed)
        if seed:  # seed 0 (every recipe's) and False keep the plain names
            suffix += f"-seed{seed}"
        configs = self.config.get("config") or []
        recipe = Path(str(configs[-1])).resolve().parent.name if configs else "run"
        rank = self.config.model.get("feature_codec_rank")
        names = {
            "variant": variant,
            "variant_suffix": suffix,
            "recipe": recipe,
            "codec_suffix": f"-r{rank}" if rank else "",
            # the target folder's name without "-target": toy-target -> toy, toy-video-target ->
            # toy-video, so one recipe names the drafters of several toy targets apart
            "target_stem": Path(str(model.target)).name.removesuffix("-target"),
        }
        _format(self.config.trainer, names)


class ModuleCLI(LightningCLI):
    """Any covspec LightningModule + DataModule named by `class_path` in the recipe (the
    acceptance head, the small-VLM device drafter, ...); `--resume` and `{recipe}` in trainer
    paths as for drafters."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--resume",
            default="last",
            help="'last' (resume if a last.ckpt exists), 'none', or a checkpoint path",
        )

    def before_instantiate_classes(self) -> None:
        configs = self.config.get("config") or []
        recipe = Path(str(configs[-1])).resolve().parent.name if configs else "run"
        _format(self.config.trainer, {"recipe": recipe})


def _names_classes(args: list[str] | None) -> bool:
    """Whether the recipe given with --config names its module by class_path."""
    argv = list(args) if args is not None else sys.argv[1:]
    paths = [Path(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == "--config"]
    while paths:
        path = paths.pop()
        if not path.is_file():
            continue  # LightningCLI reports a missing recipe itself
        recipe = yaml.safe_load(path.read_text()) or {}
        model = recipe.get("model")
        if (isinstance(model, dict) and "class_path" in model) or any(
            k.startswith("model.init_args.") for k in recipe
        ):
            return True
        if isinstance(recipe.get("config"), str):  # a nested base recipe
            paths.append(path.parent / recipe["config"])
    return False


def make_cli(
    args: list[str] | None = None,
    cli_class: type[LightningCLI] | None = None,
    exit_on_error: bool = True,
) -> LightningCLI:
    """exit_on_error=False: a bad recipe key or value raises argparse.ArgumentError (for
    `covspec`'s one-line error boundary) instead of printing usage and exiting."""
    common = dict(
        run=False, args=args, seed_everything_default=0, save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": exit_on_error},
    )  # fmt: skip
    if cli_class is None and _names_classes(args):
        return ModuleCLI(
            L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
            subclass_mode_data=True, **common,
        )  # fmt: skip
    return (cli_class or CovspecCLI)(DrafterDistillation, ConversationDataModule, **common)


def _hand_over(cli: LightningCLI) -> None:
    """Give the run its own resolved recipe (for model cards and checkpoints: a concurrent
    run may rewrite a shared config.yaml) and checkpoints that a kill cannot truncate."""
    recipe = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    recipe.pop("config", None)
    if hasattr(cli.model, "run_recipe"):
        cli.model.run_recipe = recipe
    for callback in cli.trainer.callbacks:
        if hasattr(callback, "recipe"):
            callback.recipe = recipe
    strategy = cli.trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:  # not DeepSpeed's, not a user's own
        strategy.checkpoint_io = AtomicCheckpointIO()


def _plain_progress_bar(trainer: L.Trainer, refresh_rate: int = 10) -> None:
    """Rich's bar draws nothing until the end when stdout is not a terminal (nohup, a cluster
    log), so a long run would show no progress at all: there, a tqdm bar instead, whose lines
    `tail` can follow."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    if sys.stdout.isatty():
        return
    for i, callback in enumerate(trainer.callbacks):
        if isinstance(callback, RichProgressBar):
            trainer.callbacks[i] = TQDMProgressBar(refresh_rate=refresh_rate)


class _TrainEnd(L.Callback):
    """Notes whether the fit loop ran to its end (a resumed, finished run skips it)."""

    reached = False

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self.reached = True


def _after_fit(trainer: L.Trainer, end: _TrainEnd) -> None:
    """A resumed run with nothing left to train never reaches on_train_end: export from its
    checkpoint when the export is missing or older, and say what happened either way."""
    if end.reached or not trainer.is_global_zero or not trainer.ckpt_path:
        return
    exports = [c for c in trainer.callbacks if isinstance(c, ExportDrafter)]
    print(
        f"covspec train: {trainer.ckpt_path} is already at step {trainer.global_step}: "
        "nothing left to train (pass --resume none to train again)"
    )
    for callback in exports:
        if callback.export_if_stale(trainer.ckpt_path) is None:
            print(f"covspec train: export {callback.dirpath} is current")


def main(args: list[str] | None = None) -> None:
    # `covspec train ARGS` hands LightningCLI the arguments after `train` on purpose (sys.argv
    # keeps `train`, which DDP's launcher needs to start the other ranks the same way)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cli = make_cli(args, exit_on_error=False)
    _hand_over(cli)
    _plain_progress_bar(cli.trainer)
    cli.trainer.callbacks.append(end := _TrainEnd())
    resume = cli.config["resume"]
    cli.trainer.fit(
        cli.model, datamodule=cli.datamodule, ckpt_path=None if resume == "none" else resume
    )
    _after_fit(cli.trainer, end)
