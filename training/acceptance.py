"""`AcceptanceHeadTraining`: the WISV decision head, trained cost-sensitively under CSI (Lightning).

    >>> module = AcceptanceHeadTraining(target="checkpoints/toy-target",
    ...                                 drafter="checkpoints/toy-drafter-text-only")
    >>> trainer.fit(module, datamodule=TrajectoryDataModule("checkpoints/trajectories/..."))

Each example is a mismatch of lossless decoding under one channel state, labelled safe or not
by rollout (inference/trajectories.py). The loss is a weighted logistic loss: a safe example
weighs the round latency its acceptance would save under its channel (`round_cost_s`), in units
of the batch's mean round latency, an unsafe one weighs `wrong_accept_cost` in that same unit
(1.0: a wrong acceptance costs as much as an average round saves), so the Bayes-optimal rule
accepts when p(safe) x saving > (1 - p) x penalty: a slow channel makes the head more
permissive. (The unit is per batch so the loss scale does not depend on the link presets;
batches mix presets, so it is close to the dataset's mean.) After each validation pass the per-preset thresholds are calibrated on
the validation split (unseen conversations): the most permissive logit threshold whose estimated
task accuracy drop, the fraction of answers with an accepted unsafe token, stays within that
preset's budget. Metrics: AUROC, accepted rate, precision and estimated accuracy drop per
preset at its threshold. Calibration keeps the head monotone in channel quality: a preset
with a smaller budget (a better channel) never accepts a larger share than a worse one.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAUROC
from transformers import AutoConfig

from covspec.modeling.acceptance_head import (
    AcceptanceHead,
    AcceptanceHeadConfig,
    drafter_fingerprint,
)
from covspec.modeling.drafter import Drafter
from covspec.modeling.identity import resolve_source
from covspec.modeling.outputs import check_replaceable, write_folder

DEFAULT_BUDGETS = {"good": 0.003, "medium": 0.006, "bad": 0.01}


class AcceptanceHeadTraining(L.LightningModule):
    def __init__(
        self,
        target: str,
        drafter: str,
        projection_size: int = 64,
        hidden_size: int = 128,
        use_drafter_hidden: bool = True,
        wrong_accept_cost: float = 1.0,
        accuracy_budgets: dict[str, float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        if wrong_accept_cost <= 0:
            raise ValueError(f"wrong_accept_cost must be > 0, got {wrong_accept_cost}")
        budgets = dict(accuracy_budgets or DEFAULT_BUDGETS)
        bad = {k: v for k, v in budgets.items() if not 0 <= v < 1}
        if bad:
            raise ValueError(f"accuracy budgets must be in [0, 1), got {bad}")
        self.save_hyperparameters()
        self.budgets = budgets
        self.head: AcceptanceHead | None = None
        self.val_auroc = BinaryAUROC()
        self._val: list[dict] = []
        self.calibration: dict[str, dict] = {}

    def configure_model(self) -> None:
        if self.head is not None:
            return
        hp = self.hparams
        # a missing local folder is "not found", never a Hub lookup
        resolve_source(hp.target, "target"), resolve_source(hp.drafter, "drafter")
        text = AutoConfig.from_pretrained(hp.target).get_text_config()
        drafter = Drafter.from_pretrained(hp.drafter)
        config = AcceptanceHeadConfig(
            target_hidden_size=text.hidden_size,
            drafter_hidden_size=drafter.config.hidden_size,
            projection_size=hp.projection_size,
            hidden_size=hp.hidden_size,
            use_drafter_hidden=hp.use_drafter_hidden,
            accuracy_budget=max(self.budgets.values()),
            target_model_type=AutoConfig.from_pretrained(hp.target).model_type,
            target_name_or_path=hp.target,
            target_vocab_size=text.vocab_size,
            drafter_name_or_path=hp.drafter,
            drafter_fingerprint=drafter_fingerprint(drafter),
        )
        self.head = AcceptanceHead(config)

    def _logits(self, batch: dict) -> torch.Tensor:
        return self.head(
            batch["target_hidden"], batch["drafter_hidden"], batch["confidence"], batch["csi"]
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self._logits(batch)
        safe = batch["safe"]
        saving = batch["round_cost_s"] / batch["round_cost_s"].mean().clamp_min(1e-6)
        weight = torch.where(
            safe > 0.5, saving, torch.full_like(saving, self.hparams.wrong_accept_cost)
        )
        loss = (weight * F.binary_cross_entropy_with_logits(logits, safe, reduction="none")).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"head loss is {loss.item()} at global step {self.global_step}"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(safe))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self._logits(batch)
        self.val_auroc.update(logits, batch["safe"].long())
        self._val.append({"logits": logits.detach().cpu(), "batch": batch})

    def on_validation_epoch_end(self) -> None:
        self.log("val/auroc", self.val_auroc.compute(), prog_bar=True)
        self.val_auroc.reset()
        rows = self._val
        self._val = []
        if not rows:
            return
        dm = self.trainer.datamodule
        presets = dm.val_set["preset"] if dm is not None else None
        samples = dm.val_set["sample_id"] if dm is not None else None
        logits = torch.cat([r["logits"] for r in rows])
        safe = torch.cat([r["batch"]["safe"] for r in rows])
        if presets is None or self.trainer.sanity_checking:
            return
        if len(presets) != len(logits):  # e.g. a validation set sharded over several devices
            raise RuntimeError(
                f"calibration needs every validation example in dataset order on one process: "
                f"got {len(logits)} logits for {len(presets)} examples "
                f"(world size {self.trainer.world_size}); train the head on one device"
            )
        self.calibration = calibrate(logits, safe, presets, samples, self.budgets)
        for preset, c in self.calibration.items():
            for key in ("accepted_rate", "precision", "estimated_accuracy_drop"):
                self.log(f"val/{preset}/{key}", c[key])
        self.head.config.thresholds = {p: c["threshold"] for p, c in self.calibration.items()}

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.AdamW(self.head.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)


def calibrate(
    logits: torch.Tensor,  # (N,) validation logits, in dataset order
    safe: torch.Tensor,  # (N,)
    presets: list[str],
    samples: list[str],
    budgets: dict[str, float],
) -> dict[str, dict]:
    """Per preset: the lowest logit threshold whose estimated accuracy drop (answers with an
    accepted unsafe mismatch, over answers with mismatches) stays within the budget."""
    out = {}
    for preset, budget in budgets.items():
        idx = [i for i, p in enumerate(presets) if p == preset]
        if not idx:
            continue
        z, y = logits[idx], safe[idx]
        ids = [samples[i] for i in idx]
        n_answers = len(set(ids))
        order = torch.argsort(z, descending=True).tolist()
        broken: set[str] = set()
        threshold, taken = float("inf"), 0
        for k, i in enumerate(order):  # accept the k+1 highest logits: still in budget?
            if y[i] < 0.5 and len(broken | {ids[i]}) / n_answers > budget:
                break
            if y[i] < 0.5:
                broken.add(ids[i])
            nxt = order[k + 1] if k + 1 < len(order) else None
            if nxt is None or z[nxt] < z[i]:  # only cut between distinct logits
                # `accepts` is logit > threshold: the next lower logit itself is the exact cut
                # (no margin that a near tie could slip under), below the lowest one any value
                threshold = float(z[nxt]) if nxt is not None else float(z[i]) - 1.0
                taken = k + 1
        accept = z > threshold
        unsafe_answers = {ids[i] for i in range(len(idx)) if accept[i] and y[i] < 0.5}
        out[preset] = {
            "threshold": threshold,
            "budget": budget,
            "accepted_rate": taken / len(idx),
            "precision": float(y[accept].mean()) if accept.any() else 1.0,
            "estimated_accuracy_drop": len(unsafe_answers) / n_answers,
            "examples": len(idx),
            "answers": n_answers,
        }
    return _monotone(out, logits, safe, presets, samples)


def _monotone(out: dict, logits, safe, presets, samples) -> dict:
    """A better channel (smaller budget) never accepts a larger share of mismatches than a
    worse one: where it would, its threshold is raised to the worse channel's rate."""
    cap = 1.0
    for preset in sorted(out, key=lambda p: -out[p]["budget"]):  # worst channel first
        c = out[preset]
        if c["accepted_rate"] > cap + 1e-6:
            idx = [i for i, p in enumerate(presets) if p == preset]
            z = logits[idx].sort(descending=True).values
            keep = int(round(cap * len(idx)))
            c["threshold"] = float(z[keep]) if keep < len(z) else c["threshold"]
            accept = logits[idx] > c["threshold"]
            y = safe[idx]
            ids = [samples[i] for i in idx]
            c["accepted_rate"] = float(accept.float().mean())
            c["precision"] = float(y[accept].mean()) if accept.any() else 1.0
            c["estimated_accuracy_drop"] = (
                len({ids[i] for i in range(len(idx)) if accept[i] and y[i] < 0.5}) / c["answers"]
            )
            c["capped_by_worse_channel"] = True
        cap = c["accepted_rate"]
    return out


class ExportAcceptanceHead(L.Callback):
    """Write the calibrated head as an HF folder + model card + metrics.json, beside any old
    export and swapped in (covspec.modeling.outputs)."""

    def __init__(self, dirpath: str = "checkpoints/acceptance-head") -> None:
        self.dirpath = dirpath

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        check_replaceable(self.dirpath, legacy=_is_head_folder)  # refuse before training

    def on_train_end(self, trainer: L.Trainer, module: AcceptanceHeadTraining) -> None:
        if trainer.global_rank != 0:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        report = {"metrics": metrics, "calibration": module.calibration}

        def write(tmp: Path) -> None:
            module.head.save_pretrained(tmp, safe_serialization=True)
            (tmp / "metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True))
            (tmp / "README.md").write_text(_card(module, report))

        out = write_folder(self.dirpath, write, kind="acceptance-head", legacy=_is_head_folder)
        print(f"exported acceptance head to {out}")


def _is_head_folder(folder: Path) -> bool:
    """An acceptance-head export of an older covspec (before output markers)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == (
            AcceptanceHeadConfig.model_type
        )
    except (OSError, ValueError):
        return False


def _card(module: AcceptanceHeadTraining, report: dict) -> str:
    cfg = module.head.config
    rows = "\n".join(
        f"| {p} | {c['budget']:.3f} | {c['threshold']:.3f} | {c['accepted_rate']:.3f} | "
        f"{c['precision']:.3f} | {c['estimated_accuracy_drop']:.4f} |"
        for p, c in report["calibration"].items()
    )
    by = defaultdict(str, report["metrics"])
    return f"""---
library_name: transformers
tags: [speculative-decoding, acceptance-head, wisv, device-edge, covspec]
---
# covspec acceptance head

A CSI-conditioned decision head (WISV) for target `{cfg.target_name_or_path}` and drafter
`{cfg.drafter_name_or_path}` (weights digest `{cfg.drafter_fingerprint}`): at a mismatched
draft token it reads the target's state, {"the drafter's state, " if cfg.use_drafter_hidden else ""}
confidence features ({", ".join(cfg.confidence_features)}) and the channel state
({", ".join(cfg.csi_features)}), and decides whether to accept the token anyway. Lossy by design;
thresholds are calibrated per channel preset on unseen validation conversations so that the
estimated task accuracy drop stays within the budget. Validation AUROC {by["val/auroc"]}.

| preset | accuracy budget | logit threshold | accepted rate | precision | estimated accuracy drop |
|---|---|---|---|---|---|
{rows}

Load it with the project's code: `AcceptanceHead.from_pretrained(folder)`, then
`covspec simulate ... --accept-head folder`.
"""
