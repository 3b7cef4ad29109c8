"""Callbacks: export the trained drafter as an HF folder with a model card when training ends.

    trainer = L.Trainer(callbacks=[ExportDrafter("checkpoints/toy-drafter")])

Recipes write `dirpath: checkpoints/toy-drafter{variant_suffix}` (resolved by `covspec train`), so
`--model.variant text_only` exports to `checkpoints/toy-drafter-text-only`. The folder is written to a temporary sibling and renamed,
so a crash never leaves a half-written drafter. The target's weights are not in it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.utilities import rank_zero_only

from covspec.training.metrics import implied_tau
from covspec.training.model_card import TAU_DEFINITION


def _metrics(trainer: L.Trainer, steps: int) -> dict:
    m = {
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))
    }
    rates = [m.get(f"val/agree_{k}") for k in range(1, steps + 1)]
    if all(r is not None for r in rates):
        import torch

        m["val/tau"] = implied_tau(torch.tensor(rates))
    return m


def model_card(module, trainer: L.Trainer, metrics: dict, recipe: dict) -> str:
    cfg = module.drafter.config
    steps = module.hparams.unroll_steps
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

A {cfg.num_hidden_layers}-layer EAGLE-3 style drafter for `{module.hparams.target}`
(`{cfg.target_model_type}`, {cfg.target_num_layers} layers, hidden {cfg.target_hidden_size},
vocab {cfg.target_vocab_size}), fusing target layers {cfg.fused_layer_ids}. Variant `{cfg.variant}`:
{
        "text positions only; the drafter never sees visual tokens"
        if cfg.variant == "visual_free"
        else "no target features (text-only baseline)"
        if cfg.variant == "text_only"
        else "all positions including projected visual tokens (MSD-style baseline)"
    }.
Trained by online-logit distillation with a {steps}-step training-time-test unroll for
{trainer.global_step} optimizer steps{
        f", starting from `{module.hparams.init_from}`" if module.hparams.init_from else ""
    }. Layout: EAGLE-3's ([embedding; fused feature] into q/k/v, `fc`, `d2t`/`t2d`){
        "; HiViS step-bias corrections enabled" if cfg.step_bias else ""
    }{
        f"; device-edge feature codec of rank {cfg.feature_codec_rank} (the edge sends "
        f"{cfg.feature_codec_rank} int8 values + one float16 scale per token)"
        if cfg.feature_codec_rank
        else ""
    }. Embeddings (and a full-vocabulary LM head) are the target's and are not stored here;
`covspec export --format speculators` writes a self-contained folder for vLLM / speculators.

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


class ExportDrafter(L.Callback):
    def __init__(self, dirpath: str = "checkpoints/drafter") -> None:
        self.dirpath = dirpath

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        # trainer.log_dir is a collective call under DDP: read it on every rank, here.
        self._log_dir = trainer.log_dir

    def _recipe(self, trainer: L.Trainer, module) -> dict:
        log_dir = getattr(self, "_log_dir", None)
        cli_config = Path(log_dir or "") / "config.yaml"
        if log_dir and cli_config.is_file():
            return yaml.safe_load(cli_config.read_text())
        recipe = {"model": dict(module.hparams)}
        if trainer.datamodule is not None:
            recipe["data"] = dict(trainer.datamodule.hparams)
        return recipe

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, module) -> None:
        out = Path(self.dirpath)
        metrics = _metrics(trainer, module.hparams.unroll_steps)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        module.drafter.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(
            model_card(module, trainer, metrics, self._recipe(trainer, module))
        )
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        print(f"exported drafter to {out} (val tau {metrics.get('val/tau', float('nan')):.3f})")
