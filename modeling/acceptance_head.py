"""The CSI-conditioned acceptance decision head (WISV): accept a mismatched draft token anyway?

    >>> cfg = AcceptanceHeadConfig.for_pair(adapter, drafter.config, drafter_fingerprint(drafter))
    >>> head = AcceptanceHead(cfg)
    >>> logit = head(target_hidden, drafter_hidden, confidence, csi)   # (N,) accept logits
    >>> head.accepts(logit, preset="bad")                              # calibrated threshold

On the edge, at the first node of a drafted path whose token is not the target's greedy choice,
the head looks at the target's hidden state that predicts the token (the state of its parent),
the drafter's hidden state there, confidence features of both models and the channel state,
and decides whether to accept the token anyway. Lossy by design: its thresholds are calibrated
per channel preset so that task accuracy drops by at most a budget (default 1% absolute), and
it is trained cost-sensitively, so a bad channel (every rejection costs a round trip) makes it
more permissive and a good one pushes it back towards exact matching.

Features, in the order `CONFIDENCE_FEATURES` and `CSI_FEATURES` name them (the config records
both lists, so a head trained on other features is refused, never misread):
- confidence: target probability of the draft token, target top-1 probability, target top-1
  minus top-2 margin, target entropy (nats), drafter log-probability of the token, drafter
  entropy, draft depth, depth over the drafter's trained depth (`max_draft_steps`);
- CSI: uplink SNR (dB / 10), log10 uplink rate (Mbit/s), RTT (s).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from covspec.modeling.adapters import TargetAdapter, TargetMismatchError

CONFIDENCE_FEATURES = (
    "target_prob",
    "target_top1_prob",
    "target_margin",
    "target_entropy",
    "drafter_logprob",
    "drafter_entropy",
    "depth",
    "relative_depth",
)
CSI_FEATURES = ("uplink_snr_db_over_10", "log10_uplink_mbps", "rtt_s")


class AcceptanceHeadConfig(PretrainedConfig):
    model_type = "covspec_acceptance_head"

    def __init__(
        self,
        target_hidden_size: int = 4096,
        drafter_hidden_size: int = 4096,
        projection_size: int = 64,
        hidden_size: int = 128,
        use_drafter_hidden: bool = True,
        confidence_features: tuple[str, ...] | list[str] = CONFIDENCE_FEATURES,
        csi_features: tuple[str, ...] | list[str] = CSI_FEATURES,
        thresholds: dict[str, float] | None = None,
        accuracy_budget: float = 0.01,
        target_model_type: str | None = None,
        target_name_or_path: str | None = None,
        target_vocab_size: int | None = None,
        drafter_name_or_path: str | None = None,
        drafter_fingerprint: str | None = None,
        **kwargs,
    ) -> None:
        if projection_size < 1 or hidden_size < 1:
            raise ValueError(f"sizes must be >= 1, got {projection_size}, {hidden_size}")
        if not 0 <= accuracy_budget < 1:
            raise ValueError(f"accuracy_budget must be in [0, 1), got {accuracy_budget}")
        self.target_hidden_size = target_hidden_size
        self.drafter_hidden_size = drafter_hidden_size
        self.projection_size = projection_size
        self.hidden_size = hidden_size
        self.use_drafter_hidden = use_drafter_hidden
        self.confidence_features = list(confidence_features)
        self.csi_features = list(csi_features)
        self.thresholds = dict(thresholds or {})  # channel preset -> logit threshold
        self.accuracy_budget = accuracy_budget
        self.target_model_type = target_model_type
        self.target_name_or_path = target_name_or_path
        self.target_vocab_size = target_vocab_size
        self.drafter_name_or_path = drafter_name_or_path
        self.drafter_fingerprint = drafter_fingerprint
        super().__init__(**kwargs)

    @classmethod
    def for_pair(
        cls, adapter: TargetAdapter, drafter_config, drafter_fingerprint: str | None, **overrides
    ) -> AcceptanceHeadConfig:
        values = dict(
            target_hidden_size=adapter.hidden_size,
            drafter_hidden_size=drafter_config.hidden_size,
            target_model_type=adapter.config.model_type,
            target_name_or_path=getattr(adapter.model, "name_or_path", None) or None,
            target_vocab_size=adapter.vocab_size,
            drafter_name_or_path=getattr(drafter_config, "_name_or_path", None) or None,
            drafter_fingerprint=drafter_fingerprint,
        )
        values.update(overrides)
        return cls(**values)


class AcceptanceHead(PreTrainedModel):
    config_class = AcceptanceHeadConfig
    base_model_prefix = "acceptance_head"
    main_input_name = "target_hidden"

    def __init__(self, config: AcceptanceHeadConfig) -> None:
        super().__init__(config)
        p = config.projection_size
        self.target_norm = nn.LayerNorm(config.target_hidden_size)
        self.target_proj = nn.Linear(config.target_hidden_size, p)
        width = p + len(config.confidence_features) + len(config.csi_features)
        if config.use_drafter_hidden:
            self.drafter_norm = nn.LayerNorm(config.drafter_hidden_size)
            self.drafter_proj = nn.Linear(config.drafter_hidden_size, p)
            width += p
        self.mlp = nn.Sequential(
            nn.Linear(width, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, 1),
        )
        self.post_init()

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs) -> AcceptanceHead:
        """Load a head folder (safetensors only). A missing or unexpected weight, or feature
        lists other than this version's (`CONFIDENCE_FEATURES`, `CSI_FEATURES`, whose order
        the inputs follow), is an error naming it, never a silently misread head."""
        kwargs.setdefault("use_safetensors", True)
        head, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        unexpected, missing = sorted(info["unexpected_keys"]), sorted(info["missing_keys"])
        if unexpected or missing:
            raise ValueError(
                f"{path}: weights do not match its config.json "
                f"(missing: {missing or 'none'}; unexpected: {unexpected or 'none'})"
            )
        c = head.config
        for name, saved, ours in (
            ("confidence_features", c.confidence_features, CONFIDENCE_FEATURES),
            ("csi_features", c.csi_features, CSI_FEATURES),
        ):
            if list(saved) != list(ours):
                raise ValueError(
                    f"{path}: head trained on {name} {list(saved)}; this version computes "
                    f"{list(ours)}, in that order: retrain the head"
                )
        return head

    def forward(
        self,
        target_hidden: torch.Tensor,  # (N, Ht) target state predicting the draft token
        drafter_hidden: torch.Tensor | None,  # (N, Hd) drafter state there (None if unused)
        confidence: torch.Tensor,  # (N, len(confidence_features))
        csi: torch.Tensor,  # (N, len(csi_features))
    ) -> torch.Tensor:
        """Accept logits (N,)."""
        parts = [self.target_proj(self.target_norm(target_hidden.float()))]
        if self.config.use_drafter_hidden:
            if drafter_hidden is None:
                raise ValueError("this head reads the drafter's hidden states; none were given")
            parts.append(self.drafter_proj(self.drafter_norm(drafter_hidden.float())))
        parts += [confidence.float(), csi.float()]
        return self.mlp(torch.cat(parts, dim=-1))[:, 0]

    def threshold(self, preset: str | None) -> float:
        """The calibrated logit threshold for a channel preset (the strictest one if unknown)."""
        thresholds = self.config.thresholds
        if not thresholds:
            raise ValueError("this head has no calibrated thresholds; calibrate it before use")
        if preset in thresholds:
            return thresholds[preset]
        return max(thresholds.values())

    def accepts(self, logits: torch.Tensor, preset: str | None) -> torch.Tensor:
        return logits > self.threshold(preset)

    def check_pair(
        self,
        adapter: TargetAdapter,
        drafter_fingerprint: str | set[str] | None,
        drafter_name: str | None = None,
    ) -> None:
        """Refuse a target or drafter other than the ones this head was trained against
        (`drafter_fingerprint`: the drafter's digest, or the set of its current and legacy
        ones, so a head an earlier version trained is still recognised)."""
        c = self.config
        if isinstance(drafter_fingerprint, set):
            drafter_fingerprint = (
                c.drafter_fingerprint
                if c.drafter_fingerprint in drafter_fingerprint
                else min(drafter_fingerprint)
            )
        expected = {
            "target model type": (c.target_model_type, adapter.config.model_type),
            "target vocab size": (c.target_vocab_size, adapter.vocab_size),
            "target hidden size": (c.target_hidden_size, adapter.hidden_size),
            "drafter": (c.drafter_fingerprint, drafter_fingerprint),
        }
        for name, (want, got) in expected.items():
            if want is not None and got is not None and want != got:
                raise TargetMismatchError(
                    f"acceptance head was trained for {name} {want!r} "
                    f"({c.drafter_name_or_path or c.target_name_or_path}), this one has {got!r}"
                    + (f" ({drafter_name})" if drafter_name else "")
                )


def drafter_fingerprint(drafter: nn.Module, legacy: bool = False) -> str:
    """A short digest of a drafter's weights: a retrained drafter gets another one, the same
    drafter cast to bfloat16 (as a bf16 target's runner casts it) keeps it: floats are hashed
    at bfloat16 precision. `legacy`: the float32 digest heads of earlier versions recorded."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(drafter.state_dict().items()):
        digest.update(name.encode())
        t = tensor.detach()
        if t.is_floating_point() and not legacy:
            t = t.to(torch.bfloat16)
        flat = t.float().flatten()
        digest.update(flat[:: max(1, flat.numel() // 64)].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


AutoConfig.register(AcceptanceHeadConfig.model_type, AcceptanceHeadConfig)
AutoModel.register(AcceptanceHeadConfig, AcceptanceHead)
