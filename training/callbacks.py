"""Callbacks: export the trained drafter as an HF folder with a model card when training ends.

    trainer = L.Trainer(callbacks=[ExportDrafter("checkpoints/toy-drafter")])
    write_drafter_folder("out", drafter, hparams, steps, metrics, recipe)   # any source

Recipes write `dirpath: checkpoints/toy-drafter{variant_suffix}` (resolved by `covspec train`), so
`--model.variant text_only` exports to `checkpoints/toy-drafter-text-only`. The folder is written
beside the old one and swapped in (covspec.modeling.outputs), so at every instant one complete
drafter folder exists; a non-empty folder covspec did not write is refused before training
(unless `overwrite`). The target's weights are not in it. The card's recipe is the run's own
(handed over by `covspec train`), never a config.yaml that a concurrent run may have rewritten.
The same folder can be written from any Lightning checkpoint (training/checkpoint_export.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.utilities import rank_zero_only

from covspec.modeling.drafter import Drafter, DrafterConfig
from covspec.modeling.outputs import check_replaceable, marker_info, write_folder
from covspec.training.guards import trainer_metrics
from covspec.training.metrics import implied_tau
from covspec.training.model_card import TAU_DEFINITION


def with_tau(metrics: dict, steps: int) -> dict:
    """The metrics plus the validation tau their per-depth agreement implies."""
    m = dict(metrics)
    rates = [m.get(f"val/agree_{k}") for k in range(1, steps + 1)]
    if all(r is not None for r in rates):
        import torch

        m["val/tau"] = implied_tau(torch.tensor(rates))
    return m


def model_card(cfg: DrafterConfig, hparams: dict, trained: int, metrics: dict, recipe: dict) -> str:
    """README.md of a drafter folder: what it is, its metrics, the run's resolved recipe.
    hparams: DrafterDistillation's; trained: optimizer steps."""
    steps = hparams["unroll_steps"]
    rows = "\n".join(
        f"| {k} | {metrics[f'val/agree_{k}']:.4f} |"
        for k in range(1, steps + 1)
        if f"val/agree_{k}" in metrics
    )
    return f"""---
library_name: transformers
tags: [speculative-decoding, eagle, drafter, vision-language-model, covspec]
---
# covspec drafter ({cfg.variant})

A {cfg.num_hidden_layers}-layer EAGLE-3 style drafter for `{hparams["target"]}`
(`{cfg.target_model_type}`, {cfg.target_num_layers} layers, hidden {cfg.target_hidden_size},
vocab {cfg.target_vocab_size}), fusing target layers {cfg.fused_layer_ids}. Variant `{cfg.variant}`:
{cfg.describe_inputs()}.
Trained by online-logit distillation with a {steps}-step training-time-test unroll for
{trained} optimizer steps{
        f", starting from `{hparams['init_from']}`" if hparams.get("init_from") else ""
    }. Layout: EAGLE-3's ([embedding; fused feature] into q/k/v, `fc`, `d2t`/`t2d`){
        "; HiViS step-bias corrections enabled" if cfg.step_bias else ""
    }{
        f"; device-edge feature codec of rank {cfg.feature_codec_rank} (the edge sends "
        f"{cfg.feature_codec_rank} int8 values + one float16 scale per token)"
        if cfg.feature_codec_rank
        else ""
    }. Embeddings (and a full-vocabulary LM head) are the target's and are not stored here; {
        "`covspec export --format speculators` writes a self-contained folder for vLLM / "
        "speculators."
        if cfg.target_features and cfg.visual_prefix != "compressed" and not cfg.step_bias
        else "no EAGLE-3 export exists for it (serving engines run no compressor, no drafter "
        "without target features and no HiViS step bias)."
    }

Load it with the project's code (no `trust_remote_code`):

```python
from covspec.modeling.drafter import Drafter
from covspec.modeling.adapters import adapter_for
drafter = Drafter.from_pretrained(this_folder).attach_target(adapter_for(target_model))
```

## Validation metrics (reached at the end of training)

Top-1 agreement with the target at each unroll depth:

| depth | agreement |
|---|---|
{rows}

Implied tau at depth {steps}: **{metrics.get("val/tau", float("nan")):.3f}**. {TAU_DEFINITION}
Implied tau reads depth-k agreement as the chance that draft k is accepted once drafts 1..k-1 were;
the runner measures the real one.

All logged metrics:

```json
{json.dumps(metrics, indent=2, sort_keys=True)}
```

## Training recipe (resolved)

```yaml
{yaml.safe_dump(recipe, sort_keys=False)}```
"""


def is_drafter_folder(folder: Path) -> bool:
    """A drafter folder written by an older covspec (before output markers)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("model_type") == DrafterConfig.model_type


def write_drafter_folder(
    out: str | Path,
    drafter: Drafter,
    hparams: dict,
    trained: int,
    metrics: dict,
    recipe: dict,
    overwrite: bool = False,
) -> Path:
    """config.json + model.safetensors + README.md + metrics.json, swapped in for `out`."""
    metrics = with_tau(metrics, hparams["unroll_steps"])

    def write(tmp: Path) -> None:
        drafter.save_pretrained(tmp, safe_serialization=True)
        card = model_card(drafter.config, hparams, trained, metrics, recipe)
        (tmp / "README.md").write_text(card)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))

    out = write_folder(
        out, write, overwrite=overwrite, kind="drafter", legacy=is_drafter_folder,
        info={"trained_steps": int(trained)},  # what a resumed run's export_if_stale compares
    )  # fmt: skip
    print(f"exported drafter to {out} (val tau {metrics.get('val/tau', float('nan')):.3f})")
    return out


class ExportDrafter(L.Callback):
    """Write the drafter folder at the end of training. `covspec train` hands it the run's
    resolved recipe (`recipe`) and, when a resumed run had nothing left to train, asks it to
    export from the checkpoint if its folder is missing or older (`export_if_stale`)."""

    def __init__(self, dirpath: str = "checkpoints/drafter", overwrite: bool = False) -> None:
        self.dirpath = dirpath
        self.overwrite = overwrite
        self.recipe: dict | None = None
        self.exported: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        check_replaceable(self.dirpath, self.overwrite, is_drafter_folder)  # before training

    def _recipe(self, trainer: L.Trainer, module) -> dict:
        recipe = self.recipe or getattr(module, "run_recipe", None)
        if recipe:
            return recipe
        recipe = {"model": dict(module.hparams)}
        if trainer.datamodule is not None:
            recipe["data"] = dict(trainer.datamodule.hparams)
        return recipe

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, module) -> None:
        self.exported = write_drafter_folder(
            self.dirpath, module.drafter, dict(module.hparams), trainer.global_step,
            trainer_metrics(trainer), self._recipe(trainer, module), self.overwrite,
        )  # fmt: skip

    def export_if_stale(self, checkpoint: str | Path) -> Path | None:
        """Export from `checkpoint` when the folder is missing or holds another step than it
        (a run killed between its last checkpoint and its export, or a folder exported from an
        earlier checkpoint since); None when the folder is current. A folder that records no
        step (an older covspec's) counts as current when it is newer than the checkpoint."""
        # imported here: checkpoint_export builds on this module's folder writer
        from covspec.training.checkpoint_export import export_checkpoint, read_checkpoint

        out, checkpoint = Path(self.dirpath), Path(checkpoint)
        if (out / "model.safetensors").is_file():
            steps = marker_info(out).get("trained_steps")
            if steps is None and out.stat().st_mtime >= checkpoint.stat().st_mtime:
                return None
            if steps is not None and steps == int(read_checkpoint(checkpoint)["global_step"]):
                return None
        self.exported = export_checkpoint(checkpoint, out, overwrite=self.overwrite)
        return self.exported
