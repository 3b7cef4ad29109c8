"""`DeviceDrafterDistillation`: a small VLM adapted to the target by online-logit distillation
with LoRA (peft), CoVSpec's device-side drafter (Lightning).

    >>> module = DeviceDrafterDistillation(target="checkpoints/toy-target",
    ...                                    student="checkpoints/toy-small", lora_rank=16)
    >>> trainer.fit(module, datamodule=ConversationDataModule(target="checkpoints/toy-target"))

The student is an independent small VLM that shares the target's tokenizer and image processing
(checked before training: the batch is encoded once, for both). LoRA adapters go on its language
model's attention and MLP projections (and, with `lora_projector`, on the vision-language
projector); every other weight stays frozen. Inside each step the frozen target is the teacher:
its distribution at every answer position (logits only there, from its final states) against
the student's, soft cross-entropy at `temperature`. The metric is top-1 agreement at answer
positions and the chain tau it implies at `tau_depth`. Only adapter weights go into Lightning
checkpoints; `ExportDeviceDrafter` writes the peft adapter folder and a merged HF folder
(beside any old export, swapped in by renames; a folder covspec did not make is refused).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from covspec.modeling.adapters import adapter_for
from covspec.modeling.identity import target_identity
from covspec.modeling.outputs import check_replaceable, write_folder
from covspec.modeling.tokens import tokenizer_fingerprint
from covspec.training.distill import NON_MODEL_KEYS
from covspec.training.guards import CheckpointMismatchError
from covspec.training.metrics import DepthAgreement, implied_tau

LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_regex(projections: tuple[str, ...] | list[str], projector: bool) -> str:
    """peft `target_modules` regex: the language model's projections (+ the projector)."""
    pattern = r".*language_model.*\.(" + "|".join(projections) + r")"
    if projector:
        pattern += r"|.*multi_modal_projector\.linear_\d+"
    return pattern


def check_shared_processing(target: str, student: str) -> None:
    """The batch is encoded once: the student must tokenize and preprocess images as the target."""
    if tokenizer_fingerprint(target) != tokenizer_fingerprint(student):
        raise ValueError(f"student {student} has another tokenizer than target {target}")
    a = AutoProcessor.from_pretrained(target).image_processor.to_dict()
    b = AutoProcessor.from_pretrained(student).image_processor.to_dict()
    diff = sorted(k for k in set(a) | set(b) if k != "processor_class" and a.get(k) != b.get(k))
    if diff:
        raise ValueError(f"student {student} preprocesses images differently: {diff}")


class DeviceDrafterDistillation(L.LightningModule):
    def __init__(
        self,
        target: str,
        student: str,
        lora_rank: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_projections: list[str] | None = None,
        lora_projector: bool = False,
        temperature: float = 1.0,
        tau_depth: int = 6,
        lr: float = 2e-4,
        warmup_steps: int = 20,
        target_dtype: str = "auto",
    ) -> None:
        super().__init__()
        if lora_rank < 1 or temperature <= 0 or tau_depth < 1:
            raise ValueError(
                f"lora_rank >= 1, temperature > 0 and tau_depth >= 1 required, got "
                f"{lora_rank}, {temperature}, {tau_depth}"
            )
        self.save_hyperparameters()
        self.strict_loading = False  # checkpoints hold the adapters only
        self.target = self.student = self.adapter = None
        self.train_agreement = DepthAgreement(1)
        self.val_agreement = DepthAgreement(1)

    def configure_model(self) -> None:
        if self.student is not None:
            return
        hp = self.hparams
        check_shared_processing(hp.target, hp.student)
        dtype = hp.target_dtype
        dtype = (
            (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
            if dtype == "auto"
            else getattr(torch, dtype)
        )
        target = AutoModelForImageTextToText.from_pretrained(hp.target, dtype=dtype)
        student = AutoModelForImageTextToText.from_pretrained(hp.student)
        self.set_models(target, student)

    def set_models(self, target, student) -> None:
        """Bind the frozen teacher and wrap the student with LoRA (tests pass tiny models)."""
        from peft import LoraConfig, get_peft_model

        hp = self.hparams
        self.target = target.eval().requires_grad_(False)
        self.adapter = adapter_for(self.target)
        config = LoraConfig(
            r=hp.lora_rank,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=lora_target_regex(
                hp.lora_projections or LM_PROJECTIONS, hp.lora_projector
            ),
            bias="none",
        )
        self.student = get_peft_model(student, config)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k
        }
        # what a resume must match: the two models and which adapters exist, at which shapes
        checkpoint["covspec_device"] = {
            "target": target_identity(self.target),
            "student": target_identity(self.student.get_base_model()),
            "adapters": {k: list(v.shape) for k, v in checkpoint["state_dict"].items()},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume only this run's adapters on these models (strict_loading is off because the
        checkpoint holds adapters only, so a mismatch would otherwise load in part, silently)."""
        where = f"checkpoint {getattr(self._trainer, 'ckpt_path', None) or ''}".strip()
        saved = checkpoint.get("covspec_device")
        if saved is None:
            raise CheckpointMismatchError(
                f"{where} records no device-drafter identity: pass --resume none to start over"
            )
        for name, model in (("target", self.target), ("student", self.student.get_base_model())):
            if saved[name] != target_identity(model):
                raise CheckpointMismatchError(
                    f"{where} was trained with another {name} ({saved[name]}): pass --resume "
                    "none to start over, or resume with the models it was made with"
                )
        want = {k: list(v.shape) for k, v in self.state_dict().items() if "lora_" in k}
        if saved["adapters"] != want:
            missing, extra = (
                sorted(set(want) - set(saved["adapters"])),
                sorted(set(saved["adapters"]) - set(want)),
            )
            raise CheckpointMismatchError(
                f"{where} holds other LoRA adapters than this run's settings make (missing: "
                f"{missing[:3] or 'none'}; unexpected: {extra[:3] or 'none'}; or other ranks): "
                "resume with the recipe it was made with, or pass --resume none"
            )

    def _answer_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, V) teacher and student logits at the positions that predict answer tokens."""
        inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
        rows = batch["loss_mask"][:, 1:]  # position i predicts token i + 1
        layer = self.adapter.num_layers
        with torch.no_grad():
            self.target.eval()
            out = self.adapter.forward(inputs, [layer], logits_to_keep=1)
            teacher = self.adapter.logits_from_hidden(out.hidden_states[layer][:, :-1][rows])
        student = self.student(**inputs).logits[:, :-1][rows]
        return teacher.float(), student.float()

    def _loss(self, batch: dict, agreement: DepthAgreement) -> torch.Tensor:
        teacher, student = self._answer_logits(batch)
        if not len(teacher):
            raise ValueError("batch has no answer tokens to train on (check the loss mask / data)")
        t = self.hparams.temperature
        p = (teacher / t).softmax(-1)
        loss = -(p * (student / t).log_softmax(-1)).sum(-1).mean() * t * t
        agreement.update(1, student.argmax(-1) == teacher.argmax(-1))
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if batch["input_ids"].shape[0] == 0:
            # every row skipped for length: a zero-gradient step keeps DDP ranks in lockstep
            return sum(p.sum() for p in self.student.parameters() if p.requires_grad) * 0.0
        loss = self._loss(batch, self.train_agreement)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"student loss is {loss.item()} at global step {self.global_step}"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        if (self.global_step + 1) % 50 == 0:  # top-1 agreement over the last 50 steps
            rate = self.train_agreement.compute().reshape(-1)
            self.train_agreement.reset()
            self.log("train/agreement", rate[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch["input_ids"].shape[0] == 0:  # every row skipped for length
            return
        loss = self._loss(batch, self.val_agreement)
        self.log(
            "val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0]
        )

    def on_validation_epoch_end(self) -> None:
        rate = self.val_agreement.compute().reshape(-1)  # torchmetrics squeezes one element
        self.val_agreement.reset()
        self.log("val/agreement", rate[0], prog_bar=True)
        self.log("val/tau", implied_tau(rate.repeat(self.hparams.tau_depth)))

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.student.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=0.0)
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ExportDeviceDrafter(L.Callback):
    """At the end of training: `<dirpath>/adapter` (peft LoRA folder on the student's base) and
    `<dirpath>` itself as the merged HF model + the student's processor, a model card and
    metrics.json; written beside any old export and swapped in by renames."""

    def __init__(self, dirpath: str = "checkpoints/device-vlm") -> None:
        self.dirpath = dirpath

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if trainer.global_rank == 0 and stage == "fit":  # refuse a foreign folder before training
            check_replaceable(Path(self.dirpath), overwrite=False)

    def on_train_end(self, trainer: L.Trainer, module: DeviceDrafterDistillation) -> None:
        if trainer.global_rank != 0:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

        def write(tmp: Path) -> None:
            module.student.save_pretrained(tmp / "adapter")  # peft: adapter_config + safetensors
            merged = module.student.merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
            AutoProcessor.from_pretrained(module.hparams.student).save_pretrained(tmp)
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
            (tmp / "README.md").write_text(_card(module, trainer, metrics))

        out = write_folder(self.dirpath, write, kind="device-drafter")
        print(f"exported device drafter to {out} (adapter in {out / 'adapter'})")


def _card(module: DeviceDrafterDistillation, trainer: L.Trainer, metrics: dict) -> str:
    hp = module.hparams
    return f"""---
library_name: transformers
tags: [speculative-decoding, device-drafter, lora, covspec]
---
# covspec device drafter (small VLM + LoRA)

`{hp.student}` adapted to the target `{hp.target}` by online-logit distillation with LoRA
(rank {hp.lora_rank}, alpha {hp.lora_alpha}, on {", ".join(hp.lora_projections or LM_PROJECTIONS)}
{"and the projector" if hp.lora_projector else ""}) for {trainer.global_step} steps. This folder is
the merged model (loads with `AutoModelForImageTextToText`); `adapter/` is the peft adapter on
the base. Validation top-1 agreement with the target at answer positions:
{metrics.get("val/agreement", float("nan")):.4f}; implied chain tau at depth {hp.tau_depth}:
{metrics.get("val/tau", float("nan")):.3f} (tokens per target forward, bonus included).
Use it with `SpecRunner.from_folders(target, this_folder)` or `covspec bench --drafter this_folder`.
"""
