"""`covspec export-checkpoint`: the HF drafter folder from any Lightning checkpoint of a run.

    covspec export-checkpoint checkpoints/runs/toy-drafter/last.ckpt --out checkpoints/toy-drafter

    >>> export_checkpoint("checkpoints/runs/toy-drafter/last.ckpt", "checkpoints/toy-drafter")

The export is a function of the checkpoint: the same config.json + model.safetensors +
README.md (card with the metrics logged up to that step and the run's resolved recipe) +
metrics.json that `ExportDrafter` writes when training ends, swapped in beside any old folder.
A checkpoint carries its drafter's config (with the target's identity), so the target is not
loaded; a checkpoint of an older covspec without it is rebuilt against the target its
hyperparameters name, whose identity the export then records. `covspec train` calls this when a
resumed run finds nothing left to train and its export missing (`ExportDrafter.export_if_stale`).
(`covspec export` is another command: a drafter folder to the EAGLE-3 / speculators formats.)
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from covspec.modeling.drafter import Drafter, DrafterConfig
from covspec.modeling.outputs import check_replaceable
from covspec.training.callbacks import is_drafter_folder, write_drafter_folder


class CheckpointError(ValueError):
    """A file that is not a covspec drafter checkpoint, or one whose tensors do not fit."""


DEEPSPEED_STATES = "checkpoint/mp_rank_00_model_states.pt"  # in Lightning's DeepSpeed folder


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict (tensors and plain values only: `weights_only` loading). A
    DeepSpeed checkpoint is a folder: its model-states file holds the module's tensors (whole
    under ZeRO 1-2) beside Lightning's client state."""
    path = Path(path)
    file = path / DEEPSPEED_STATES if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint not found: {file}")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled objects we do not load
        raise CheckpointError(f"{path} is not a readable Lightning checkpoint: {e}") from None
    if path.is_dir():
        checkpoint = {**checkpoint, "state_dict": checkpoint.get("module", {})}
    hparams = checkpoint.get("hyper_parameters") or {}
    if "unroll_steps" not in hparams or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint of a covspec drafter run")
    return checkpoint


def drafter_from_checkpoint(checkpoint: dict) -> Drafter:
    """The drafter a checkpoint holds, every tensor accounted for."""
    saved = checkpoint.get("covspec")
    if saved is not None:
        drafter = Drafter(DrafterConfig.from_dict(saved["drafter_config"]))
    else:  # an older checkpoint: rebuild the drafter against the target it names
        from covspec.training.distill import DrafterDistillation

        known = inspect.signature(DrafterDistillation).parameters  # not LightningCLI's extras
        hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in known}
        module = DrafterDistillation(**hparams)
        module.configure_model()
        drafter = module.drafter
    state = {
        k.removeprefix("drafter."): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("drafter.")
    }
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint tensors do not fit its drafter config (missing: {missing or 'none'}; "
            f"unexpected: {unexpected or 'none'})"
        )
    return drafter.eval()


def export_checkpoint(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the drafter folder of `checkpoint` to `out`; returns `out`."""
    check_replaceable(out, overwrite, is_drafter_folder)  # before reading gigabytes
    data = read_checkpoint(checkpoint)
    saved = data.get("covspec") or {}
    hparams = dict(data["hyper_parameters"])
    recipe = saved.get("recipe") or {"model": hparams}
    if not saved.get("recipe") and data.get("datamodule_hyper_parameters"):
        recipe["data"] = dict(data["datamodule_hyper_parameters"])
    return write_drafter_folder(
        out, drafter_from_checkpoint(data), hparams, int(data["global_step"]),
        saved.get("metrics") or {}, recipe, overwrite,
    )  # fmt: skip
