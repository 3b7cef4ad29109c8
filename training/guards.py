"""Guards of a training run: what a checkpoint must carry, hold and match before it is used.

    >>> trainer = L.Trainer(plugins=[AtomicCheckpointIO()])   # `covspec train` installs it
    >>> check_resumable(checkpoint, drafter, "last.ckpt")     # in DrafterDistillation
    >>> check_finite_weights(state_dict, step)                # before a checkpoint is written
    >>> check_step_applied(engine, skipped_before, step)      # after a DeepSpeed step

A resumed run continues a checkpoint only when the checkpoint was made for the same target
(config, tokenizer and weights digests, modeling/identity.py) and the same drafter settings,
and holds exactly the drafter's tensors; each refusal names the field. A checkpoint is written
beside the old one, flushed to disk and renamed over it, so a run killed at any instant leaves
a complete `last.ckpt`, and never with non-finite weights.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from covspec.modeling.drafter import DrafterConfig
from covspec.modeling.identity import IDENTITY_FIELDS, check_identity

# drafter settings a resumed run must share with its checkpoint (the target identity is checked
# first and apart; the target's path may move, its digests may not)
_SETTINGS = [
    name
    for name in inspect.signature(DrafterConfig.__init__).parameters
    if name not in ("self", "kwargs", "target_name_or_path", *IDENTITY_FIELDS)
]


class CheckpointMismatchError(ValueError):
    """A checkpoint that this run must not continue (other drafter, other target, old format)."""


def trainer_metrics(trainer) -> dict[str, float]:
    """The run's logged train/val metrics, as floats (empty without a trainer)."""
    if trainer is None:
        return {}
    return {
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))
    }


def check_finite_weights(state_dict: dict[str, torch.Tensor], step: int) -> None:
    """Refuse to checkpoint non-finite weights: the previous checkpoint stays the last good one."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise FloatingPointError(
            f"drafter weights {', '.join(bad[:3])} are not finite at global step {step}; "
            "not checkpointed, the last checkpoint keeps the last finite weights"
        )


def check_step_applied(engine, skipped_before: int, step: int) -> None:
    """Stop a DeepSpeed run whose optimizer skipped a step for a non-finite gradient.

    ZeRO keeps the gradients in its own partitions (every `p.grad` is None when the
    LightningModule's `on_before_optimizer_step` looks), checks them itself (bf16, and fp32
    with gradient clipping) and skips such a step without a word, counting it in
    `engine.skipped_steps`: a run whose gradients stay non-finite would go on without learning.
    fp16 loss scaling skips steps by design while it finds its scale, so it is let be."""
    if engine.fp16_enabled() or engine.skipped_steps <= skipped_before:
        return
    raise FloatingPointError(
        f"DeepSpeed skipped the update of global step {step}: its gradient is not finite "
        f"({engine.skipped_steps - skipped_before} step(s) skipped). The weights are those of the "
        "step before and the last checkpoint is finite: lower the learning rate or check the "
        "data before resuming"
    )


def check_resumable(checkpoint: dict[str, Any], drafter, path: str | None = None) -> None:
    """Refuse a checkpoint of another target, other drafter settings or other tensors."""
    where = f"checkpoint {path}" if path else "checkpoint"
    saved = checkpoint.get("covspec")
    if saved is None:
        raise CheckpointMismatchError(
            f"{where} was written by an older covspec without its target's identity and drafter "
            "settings, so continuing it cannot be checked: pass --resume none to start over "
            "(`covspec export-checkpoint` still exports it)"
        )
    # through the config class: a checkpoint written before `variant` became two fields
    # reads as its preset
    recorded = DrafterConfig.from_dict(saved["drafter_config"]).to_dict()
    current = drafter.config.to_dict()
    check_identity(recorded, {f: current.get(f) for f in IDENTITY_FIELDS}, where)
    for name in _SETTINGS:
        if recorded.get(name) != current.get(name):
            raise CheckpointMismatchError(
                f"{where} was made with drafter setting {name}={recorded.get(name)!r}, this run "
                f"has {current.get(name)!r}: resume with the recipe it was made with, or pass "
                "--resume none to start over"
            )
    if "state_dict" not in checkpoint:
        # DeepSpeed keeps the tensors in its own files and hands back only the client state;
        # its engine loads them, and the settings checked above fix which tensors there are
        return
    have = {
        k.removeprefix("drafter.") for k in checkpoint["state_dict"] if k.startswith("drafter.")
    }
    want = set(drafter.state_dict())
    if have != want:
        raise CheckpointMismatchError(
            f"{where} does not hold this drafter's tensors (missing: "
            f"{sorted(want - have)[:5] or 'none'}; unexpected: {sorted(have - want)[:5] or 'none'})"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file beside the checkpoint, fsync, then rename over it: a
    process killed at any instant leaves the old or the new checkpoint, whole. (Lightning's own
    writer stages in the system temp folder, whose final move is a copy on another disk.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
