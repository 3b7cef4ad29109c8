"""`DrafterDistillation`: online-logit distillation of the drafter from a frozen target (Lightning).

    >>> module = DrafterDistillation(target="checkpoints/toy-target", variant="visual_free")
    >>> trainer.fit(module, datamodule=ConversationDataModule(target="checkpoints/toy-target"))

The frozen target runs inside every training step (eval mode, no grad, bf16 on GPU) and is the
teacher: no hidden-state dump. The drafter is unrolled `unroll_steps` times as at inference
(training-time test); each depth k is trained with soft cross-entropy against the teacher's
distribution plus SmoothL1 against the target's final features, weighted by `step_decay**(k-1)`,
on assistant tokens only. The target's weights are never written into Lightning checkpoints.

With `visual_prefix: compressed` the elastic compressor (modeling/compressor.py) is trained
jointly with the drafter: its prefix rows go ahead of the text rows. A `gumbel` gate picks an
option per sample by Gumbel-softmax straight-through (temperature annealed from
`gate_temperature[0]` to `[1]`) and `cost_weight` times the expected prefix tokens per visual
token is added to the loss. A `critic` gate (`compressor: {gate: critic}`) sees every sample
twice, under two uniformly drawn options (`explore_pairs`), and regresses their loss gap
(`critic_term`); `cost_weight` is then stored in the compressor, which weighs it against the
predicted loss at inference. Either way the gate trades acceptance against the drafter's cost.
A compressor with one option is that fixed primitive's baseline
(`--model.compressor '{options: [pool:4]}'`).
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from transformers import AutoModelForImageTextToText

from covspec.modeling.adapters import adapter_for
from covspec.modeling.drafter import Drafter, DrafterConfig
from covspec.modeling.drafter_config import VARIANTS
from covspec.modeling.drafter_inputs import (
    VisualPrefix,
    drafter_rows,
    prompt_mask,
    target_layer_ids,
    visual_prefix,
)
from covspec.modeling.identity import resolve_source, target_identity
from covspec.modeling.tokens import tokenizer_fingerprint
from covspec.modeling.ttt import ttt_unroll
from covspec.modeling.vocab import build_draft_vocab
from covspec.training.gate_terms import critic_term, explore_pairs, gate_term
from covspec.training.guards import (
    check_finite_weights,
    check_resumable,
    check_step_applied,
    trainer_metrics,
)
from covspec.training.metrics import DepthAgreement, implied_tau

# batch entries that are bookkeeping, not model inputs
NON_MODEL_KEYS = ("loss_mask", "overlong")


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, S) gathering the kept positions of each row to the left, and their validity."""
    counts = keep.sum(1)
    s = int(counts.max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :s]  # kept first, in order
    valid = torch.arange(s, device=keep.device)[None] < counts[:, None]
    return order, valid


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


class DrafterDistillation(L.LightningModule):
    def __init__(
        self,
        target: str,
        variant: str = "visual_free",
        visual_prefix: str | None = None,
        compressor: dict | None = None,
        cost_weight: float = 0.0,
        gate_temperature: tuple[float, float] = (1.0, 0.1),
        unroll_steps: int = 6,
        step_decay: float = 0.8,
        feature_loss_weight: float = 0.1,
        fused_layer_ids: list[int] | None = None,
        drafter_layers: int = 1,
        step_bias: bool = False,
        feature_codec_rank: int | None = None,
        init_from: str | None = None,
        init_from_target: bool = False,
        draft_vocab_size: int | None = None,
        draft_vocab_batches: int = 200,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        target_dtype: str = "auto",
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
        if (visual_prefix == "compressed") != (compressor is not None):
            raise ValueError(
                "visual_prefix 'compressed' needs a `compressor` section (options, ...) and only "
                f"it takes one; got visual_prefix={visual_prefix!r}, compressor={compressor!r}"
            )
        if cost_weight < 0 or min(gate_temperature) <= 0:
            raise ValueError(
                f"cost_weight must be >= 0 and gate_temperature > 0, got {cost_weight}, "
                f"{gate_temperature}"
            )
        if unroll_steps < 1:
            raise ValueError(f"unroll_steps must be >= 1, got {unroll_steps}")
        if init_from and init_from_target:  # one start only: a trained drafter's layer wins
            raise ValueError(
                f"init_from ({init_from!r}) and init_from_target are exclusive: a drafter that "
                "starts from a trained one already has its layer"
            )
        self.save_hyperparameters()
        self.strict_loading = False  # checkpoints hold the drafter only, never the frozen target
        self.run_recipe: dict | None = None  # the resolved recipe, set by `covspec train`
        self.target = self.drafter = self.adapter = None
        self.train_agreement = DepthAgreement(unroll_steps)
        self.val_agreement = DepthAgreement(unroll_steps)

    # -- model ----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.drafter is None:
            self._load_target()
        # before the strategy wraps the model: DeepSpeed's optimizer copies the weights then,
        # and a head initialised later would be overwritten by its first step
        self._build_draft_vocab()

    def _load_target(self) -> None:
        hp = self.hparams
        dtype = hp.target_dtype
        if dtype == "auto":
            dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        else:
            dtype = getattr(torch, dtype)
        source = resolve_source(hp.target, "target")  # a missing folder never hits the Hub
        target = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
        self.set_target(target, tokenizer_fingerprint(source))

    def set_target(self, target, fingerprint: str | None = None) -> None:
        """Bind a loaded target and build the drafter for it (tests pass tiny models here)."""
        hp = self.hparams
        self.target = target.eval().requires_grad_(False)
        self.adapter = adapter_for(self.target)
        overrides = {
            "variant": hp.variant,
            "visual_prefix": hp.visual_prefix or VARIANTS[hp.variant][1],
            "compressor": self._compressor_section(),
            "max_draft_steps": hp.unroll_steps,
            "num_hidden_layers": hp.drafter_layers,
            "step_bias": hp.step_bias,
        }
        if hp.fused_layer_ids:
            overrides["fused_layer_ids"] = list(hp.fused_layer_ids)
        if hp.draft_vocab_size:
            overrides["draft_vocab_size"] = hp.draft_vocab_size
        if hp.feature_codec_rank:
            overrides["feature_codec_rank"] = hp.feature_codec_rank
        if hp.init_from:
            self.drafter = self._fine_tune_start(hp.init_from, fingerprint)
            return
        config = DrafterConfig.for_target(
            self.adapter, tokenizer_fingerprint=fingerprint, **overrides
        )
        self.adapter.check_layer_ids(config.fused_layer_ids)  # refuse before any training
        self.drafter = Drafter(config).attach_target(self.adapter)
        if hp.init_from_target:  # a head start: the target's last layer (quickstart recipe)
            self.drafter.init_from_target_layer(
                self.adapter.decoder_layers()[-1], self.adapter.language_model().norm
            )

    def _compressor_section(self) -> dict | None:
        """The recipe's compressor section; a critic gate also keeps `cost_weight`, the price
        of a prefix row it weighs against predicted loss at inference."""
        section = self.hparams.compressor
        if section is None:
            return None
        section = dict(section)
        if section.get("gate") == "critic":
            section["cost_weight"] = self.hparams.cost_weight
        return section

    def _fine_tune_start(self, folder: str, fingerprint: str | None) -> Drafter:
        """A drafter that starts from a trained one (`init_from`): its architecture and weights,
        with the feature codec added when `feature_codec_rank` is set (initialised at the best
        rank-r split of the trained `fc`, by SVD)."""
        hp = self.hparams
        source = Drafter.from_pretrained(resolve_source(folder, "init_from drafter"))
        source.check_target(self.adapter, fingerprint, target_identity(self.target))
        prefix = hp.visual_prefix or VARIANTS[hp.variant][1]
        adds_compressor = prefix == "compressed" and source.config.visual_prefix == "none"
        src = source.config
        if src.target_features != VARIANTS[hp.variant][0] or (
            src.visual_prefix != prefix and not adds_compressor
        ):
            raise ValueError(
                f"init_from {folder} is a {src.variant!r} drafter (target_features="
                f"{src.target_features}, visual_prefix={src.visual_prefix!r}); this run trains "
                f"{hp.variant!r} with visual_prefix={prefix!r}: only a compressor may be added"
            )
        config = DrafterConfig.from_dict(
            {**src.to_dict(), "feature_codec_rank": hp.feature_codec_rank,
             "max_draft_steps": hp.unroll_steps, "visual_prefix": prefix,
             "compressor": self._compressor_section()}
        )  # fmt: skip
        drafter = Drafter(config).attach_target(self.adapter)
        state = source.state_dict()
        codec_start = state.pop("fc.weight", None) if hp.feature_codec_rank else None
        missing, unexpected = drafter.load_state_dict(state, strict=False)
        expected_missing = {"fc_down.weight", "fc_up.weight"} if hp.feature_codec_rank else set()
        if adds_compressor:  # a fresh compressor on a trained drafter
            expected_missing |= {k for k in drafter.state_dict() if k.startswith("compressor.")}
        if set(missing) != expected_missing or unexpected:
            raise ValueError(
                f"cannot start from {folder}: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        if codec_start is not None:
            drafter.init_codec_from(codec_start)
        return drafter

    def _build_draft_vocab(self) -> None:
        """Build the pruned draft vocabulary from answer-token counts (summed over ranks) when
        fitting; a checkpoint restored after this replaces it with its own."""
        d, trainer = self.drafter, self._trainer
        # (a resumed run counts too: Lightning restores the checkpoint only after this hook,
        # and the restored map and head then replace these)
        if trainer is None or trainer.state.fn != "fit":
            return
        if not d.config.draft_vocab_size or d.has_draft_vocab():
            return  # full vocabulary, or a map already installed
        # on the CPU: Lightning runs configure_model under its device context, which forked
        # loader workers would inherit (CUDA cannot start in a forked child)
        with torch.device("cpu"):
            counts = torch.zeros(self.adapter.vocab_size)
            for i, batch in enumerate(trainer.datamodule.train_dataloader()):
                if i >= self.hparams.draft_vocab_batches:
                    break
                ids = batch["input_ids"][batch["loss_mask"]].cpu()
                counts += torch.bincount(ids, minlength=counts.numel()).to(counts.dtype)
        device = trainer.strategy.root_device  # a collective needs the backend's device
        counts = trainer.strategy.reduce(counts.to(device), reduce_op="sum").cpu()
        d.set_draft_vocab(build_draft_vocab(counts, d.config.draft_vocab_size))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("target.")
        }
        check_finite_weights(checkpoint["state_dict"], self.global_step)
        # what resume checks and an export from this checkpoint needs, without the target
        checkpoint["covspec"] = {
            "drafter_config": self.drafter.config.to_dict(),
            "metrics": trainer_metrics(self._trainer),
            "recipe": self.run_recipe,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume only a checkpoint of this drafter for this target (named field otherwise)."""
        check_resumable(checkpoint, self.drafter, getattr(self._trainer, "ckpt_path", None))

    def on_before_optimizer_step(self, optimizer) -> None:
        """Refuse a non-finite gradient before it reaches the weights: the last checkpoint then
        still holds the finite weights of the step before (NaN loss is refused earlier). Under
        DeepSpeed no gradient is in sight here; `on_train_batch_end` asks the engine instead."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 loss scaling: an overflow is expected, and its step skipped
        grads = {n: p.grad for n, p in self.drafter.named_parameters() if p.grad is not None}
        if grads and not bool(torch.stack([g.isfinite().all() for g in grads.values()]).all()):
            bad = [n for n, g in grads.items() if not g.isfinite().all()]
            raise FloatingPointError(
                f"non-finite gradient of {', '.join(bad[:3])} at global step {self.global_step}; "
                "the update was not applied and the last checkpoint is finite: lower the "
                "learning rate or check the data before resuming"
            )

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher(self, batch: dict) -> dict[str, torch.Tensor]:
        """Run the frozen target; return the drafter-side (compacted, shifted) tensors."""
        self.target.eval()
        cfg = self.drafter.config
        n_layers = self.adapter.num_layers
        inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
        # logits only where the loss reads them (answer positions, `losses`): at a 150k
        # vocabulary, full-sequence logits would dwarf every other activation of the step
        out = self.adapter.forward(inputs, target_layer_ids(cfg, (n_layers,)), logits_to_keep=1)
        idx, valid = compact(drafter_rows(cfg, batch["attention_mask"], out.visual_mask))
        ids = _gather(batch["input_ids"], idx)
        feats = torch.cat([_gather(out.hidden_states[i], idx) for i in cfg.fused_layer_ids], dim=-1)
        full = cfg.visual_prefix == "full"
        loss_mask = _gather(batch["loss_mask"], idx) & valid
        t = {
            "ids": ids,  # (B, S)
            "valid": valid,  # (B, S)
            "features": feats,  # (B, S, n*Ht) at position i
            "embeds": _gather(out.hidden_states[0], idx) if full else None,  # (B, S, D) merged
            "teacher_hidden": _gather(out.hidden_states[n_layers], idx),  # (B, S, Ht) final normed
            "loss_mask": loss_mask,  # (B, S): token i is an answer token
        }
        if cfg.visual_prefix == "compressed":  # what the compressor reads, uncompacted
            t["target"] = {
                "input_ids": batch["input_ids"],
                "hidden_states": {i: out.hidden_states[i] for i in target_layer_ids(cfg)},
                "visual_mask": out.visual_mask,
                "ask": prompt_mask(batch["attention_mask"], out.visual_mask, batch["loss_mask"]),
                "grids": self.adapter.visual_grids(inputs),
            }
        return t

    def step_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """The gate's random draws for this batch (Gumbel noise, a critic's option pairs): a
        stream of its own, seeded by the run's seed, the batch count and the rank, so a run
        resumed from a checkpoint draws what the uninterrupted one would have."""
        trainer = self._trainer
        rank = trainer.global_rank if trainer else 0
        # the batch count, not the optimizer step: accumulated micro-batches draw apart
        batch = trainer.fit_loop.total_batch_idx if trainer else 0
        seed = (torch.initial_seed() * 1_000_003 + batch * 7_919 + rank) % 2**63
        return torch.Generator(device=device).manual_seed(seed)

    def gate_temperature(self) -> float:
        """Gumbel-softmax temperature, annealed geometrically over the run."""
        start, end = self.hparams.gate_temperature
        trainer = self._trainer
        total = max(1, int(trainer.estimated_stepping_batches)) if trainer else 1
        return start * (end / start) ** min(1.0, self.global_step / total)

    def unroll(
        self, t: dict[str, torch.Tensor], force: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor, VisualPrefix | None]:
        """Drafter hidden per step over positions 0..S-2 (input: feature i, embedding of token
        i+1), after the compressed visual prefix's rows when the drafter carries one."""
        embeds = t["embeds"] if t["embeds"] is not None else self.drafter.embed(t["ids"])
        next_embeds = embeds[:, 1:]  # (B, S-1, D)
        valid = t["valid"][:, 1:]
        feats = self.drafter.project_features(
            t["features"][:, :-1], like=next_embeds.to(self.drafter.dtype)
        )
        prefix = None
        if "target" in t:
            temperature = self.gate_temperature() if self.training else None
            noise = self.step_generator(t["ids"].device) if temperature is not None else None
            prefix = visual_prefix(
                self.drafter, **t["target"], temperature=temperature, force=force, generator=noise
            )
            next_embeds = torch.cat([prefix.embeds.to(next_embeds), next_embeds], 1)
            feats = torch.cat([prefix.features.to(feats), feats], 1)
            valid = torch.cat([prefix.valid, valid], 1)
        hidden = ttt_unroll(self.drafter, next_embeds, feats, valid, self.hparams.unroll_steps)
        m = 0 if prefix is None else prefix.valid.shape[1]
        return [h[:, m:] for h in hidden], valid[:, m:], prefix

    def losses(self, batch: dict, agreement: DepthAgreement) -> torch.Tensor:
        t, force = self.teacher(batch), None
        if self.training and "target" in t and self.drafter.compressor.critic:
            pairs = self.step_generator()  # CPU: randperm draws there
            t, force = explore_pairs(t, len(self.drafter.compressor.parsed), pairs)
        hidden, _, prefix = self.unroll(t, force)
        s = hidden[0].shape[1]  # S-1 drafter positions; position i predicts token i+2
        target_mask = torch.zeros_like(t["loss_mask"][:, 1:])
        target_mask[:, : s - 1] = t["loss_mask"][:, 2:]
        teacher_hidden = t["teacher_hidden"][:, 1:]  # row i: the state that predicts token i+2
        teacher_logits, answer_row = self._teacher_logits(teacher_hidden, target_mask, force)
        pruned = bool(self.drafter.config.draft_vocab_size)
        total, weights = 0.0, 0.0
        positions = torch.arange(s, device=target_mask.device)
        # each sample's weighted CE sum and weight sum, only where a gate learns from them
        per_sample = None if prefix is None else target_mask.new_zeros(len(target_mask), 2).float()
        for k, h in enumerate(hidden, start=1):
            sel = target_mask & (positions >= k - 1)[None]  # depth k needs k-1 earlier positions
            if not sel.any():
                continue
            logits = self.drafter.logits(h[sel]).float()  # (N_k, V_draft)
            full = teacher_logits[answer_row[sel[target_mask]]]  # (N_k, V); sel within the mask
            # A pruned vocabulary renormalises the teacher over the draft tokens (EAGLE-3).
            p_teacher = (full[:, self.drafter.draft_token_ids()] if pruned else full).softmax(-1)
            ce_rows = -(p_teacher * logits.log_softmax(-1)).sum(-1)  # (N_k,)
            feat = F.smooth_l1_loss(self.drafter.norm(h[sel]).float(), teacher_hidden[sel].float())
            w = self.hparams.step_decay ** (k - 1)
            total = total + w * (ce_rows.mean() + self.hparams.feature_loss_weight * feat)
            weights += w
            if per_sample is not None:
                pairs = torch.stack([w * ce_rows.detach(), ce_rows.new_full(ce_rows.shape, w)], -1)
                per_sample.index_add_(0, sel.nonzero()[:, 0], pairs)
            agreement.update(k, self.drafter.to_target_ids(logits.argmax(-1)) == full.argmax(-1))
        if weights == 0.0:
            raise ValueError("batch has no answer tokens to train on (check the loss mask / data)")
        loss = total / weights
        if prefix is not None:
            self._log_prefix(prefix)
            if self.drafter.compressor.critic:
                loss = loss + critic_term(prefix, per_sample, force)
            else:
                cost = self.hparams.cost_weight * prefix.cost.mean()
                loss = loss + cost + gate_term(prefix, per_sample)
        return loss

    @torch.no_grad()
    def _teacher_logits(
        self, teacher_hidden: torch.Tensor, target_mask: torch.Tensor, force: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, V) teacher logits at answer positions only (see `teacher`), and each answer
        position's row in them. Paired rows (`explore_pairs`) hold one sample twice: one LM-head
        pass per sample, not per row."""
        if force is None:
            logits = self.adapter.logits_from_hidden(teacher_hidden[target_mask]).float()
            return logits, torch.arange(len(logits), device=logits.device)
        once = target_mask[0::2]
        logits = self.adapter.logits_from_hidden(teacher_hidden[0::2][once]).float()
        rows = torch.arange(len(logits), device=logits.device).split(once.sum(1).tolist())
        return logits, torch.cat([r for r in rows for _ in range(2)])

    def _log_prefix(self, prefix: VisualPrefix) -> None:
        """Mean prefix tokens and the gate's choice histogram (argmax in validation)."""
        stage = "train" if self.training else "val"
        n = prefix.valid.shape[0]
        self.log(f"{stage}/prefix_tokens", prefix.valid.sum(1).float().mean(), batch_size=n)
        counts = torch.bincount(prefix.choice, minlength=prefix.probs.shape[1]).float() / n
        for option, share in zip(self.drafter.compressor.config.options, counts, strict=True):
            self.log(f"{stage}/gate_{option.replace(':', '_')}", share, batch_size=n)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._count_overlong(batch)
        if batch["input_ids"].shape[0] == 0:
            # every row of the batch was skipped for length: a zero-gradient step keeps the
            # ranks of a distributed run in lockstep, where returning None would hang them
            return sum(p.sum() for p in self.drafter.parameters() if p.requires_grad) * 0.0
        loss = self.losses(batch, self.train_agreement)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"drafter loss is {loss.item()} at global step {self.global_step}; stopping"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _count_overlong(self, batch: dict) -> None:
        """Log how many conversations the collator cut or skipped for length (running totals)."""
        counts = batch.get("overlong")
        if counts is None:
            return
        self._overlong = getattr(self, "_overlong", torch.zeros(2)) + counts.detach().cpu().float()
        if counts.sum() > 0 and not getattr(self, "_warned_overlong", False):
            self._warned_overlong = True
            rank_zero_warn(
                "some conversations exceed data.max_length: cut after their last visual token "
                "or skipped; running totals are logged as data/truncated and data/skipped"
            )
        self.log("data/truncated", self._overlong[0], reduce_fx="max")
        self.log("data/skipped", self._overlong[1], reduce_fx="max")

    def on_train_start(self) -> None:
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        # a resumed engine restores its count: only steps skipped by this run stop it
        self._skipped_before = engine.skipped_steps if engine is not None else 0

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        if engine is not None:  # ZeRO hides its gradients from on_before_optimizer_step
            # Lightning has counted the step by now, skipped or not: it was global_step - 1
            check_step_applied(engine, self._skipped_before, self.global_step - 1)
        if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            self._log_agreement("train", self.train_agreement)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch["input_ids"].shape[0] == 0:  # every row skipped for length
            return
        loss = self.losses(batch, self.val_agreement)
        self.log(
            "val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0]
        )

    def on_validation_epoch_end(self) -> None:
        self._log_agreement("val", self.val_agreement)

    def _log_agreement(self, stage: str, metric: DepthAgreement) -> None:
        rates = metric.compute()
        metric.reset()
        for k, r in enumerate(rates.tolist(), start=1):
            self.log(f"{stage}/agree_{k}", r, sync_dist=False)
        self.log(f"{stage}/tau", implied_tau(rates), prog_bar=stage == "val", sync_dist=False)

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.drafter.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=(0.9, 0.95))
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
