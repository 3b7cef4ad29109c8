"""`covspec train`: LightningCLI over DrafterDistillation + ConversationDataModule.

    covspec train --config recipes/toy/drafter.yaml
    covspec train --config recipes/toy/drafter.yaml --model.variant full_visual
    covspec train --config recipes/toy/drafter.yaml --resume none      # ignore last.ckpt

The data module's `target` is linked to the model's, so a recipe names its target once. Strings
in the trainer section may hold `{variant}`, `{variant_suffix}` ("" for visual_free, else
"-full-visual" / "-text-only"), `{codec_suffix}` ("" or "-r16" for a feature codec of rank
16) and `{recipe}` (the folder of the recipe given last with
--config, e.g. "llava-1.5-7b"), so checkpoints, exports and run names follow `--model.variant`
and the target, and a baseline never resumes from another variant's checkpoint. A recipe may
start with `config: ../_shared/BASE.yaml` to inherit a shared base (jsonargparse nesting). By default training resumes from
the `last.ckpt` of the recipe's ModelCheckpoint when there is one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from covspec.data.datamodule import ConversationDataModule
from covspec.training.distill import DrafterDistillation


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
        variant = self.config.model.variant
        suffix = "" if variant == "visual_free" else "-" + variant.replace("_", "-")
        configs = self.config.get("config") or []
        recipe = Path(str(configs[-1])).resolve().parent.name if configs else "run"
        rank = self.config.model.get("feature_codec_rank")
        names = {
            "variant": variant,
            "variant_suffix": suffix,
            "recipe": recipe,
            "codec_suffix": f"-r{rank}" if rank else "",
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
    import yaml

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
    args: list[str] | None = None, cli_class: type[LightningCLI] | None = None
) -> LightningCLI:
    common = dict(
        run=False, args=args, seed_everything_default=0, save_config_kwargs={"overwrite": True}
    )
    if cli_class is None and _names_classes(args):
        return ModuleCLI(
            L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
            subclass_mode_data=True, **common,
        )  # fmt: skip
    return (cli_class or CovspecCLI)(DrafterDistillation, ConversationDataModule, **common)


def main(args: list[str] | None = None) -> None:
    cli = make_cli(args)
    resume = cli.config["resume"]
    cli.trainer.fit(
        cli.model, datamodule=cli.datamodule, ckpt_path=None if resume == "none" else resume
    )
