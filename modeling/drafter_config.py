"""The drafter's config: what it sees (`target_features`, `visual_prefix`, the compressor's
nested config), its size, and the identity of the target it was trained against.

    >>> cfg = DrafterConfig.for_target(adapter, variant="visual_free")  # sized for the target
    >>> cfg = DrafterConfig.for_target(adapter, visual_prefix="compressed",
    ...                                compressor={"options": ["none", "pool:2", "resampler:8"]})
    >>> cfg.variant, cfg.describe_inputs()       # a label and a sentence for cards and reports

The model that reads it is modeling/drafter.py; `AutoConfig` knows it as `covspec_drafter`.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import AutoConfig, LlamaConfig, PretrainedConfig

from covspec.modeling.adapters import TargetAdapter
from covspec.modeling.compressor import VisualCompressorConfig
from covspec.modeling.identity import model_folder, target_identity
from covspec.modeling.tokens import folder_tokenizer_fingerprint

VISUAL_PREFIXES = ("none", "full", "compressed")
# named presets of (target_features, visual_prefix); configs written before the two fields
# existed store `variant`, which loads as its preset
VARIANTS = {
    "visual_free": (True, "none"),
    "text_only": (False, "none"),
    "full_visual": (True, "full"),
}


def default_fused_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's low / mid / high target layers (2, L//2, L-3), as HF hidden_states indices.

    EAGLE-3 (and vLLM's `aux_hidden_state_layers`) take the input of decoder layer i, which is
    HF's `hidden_states[i]`, so the two indexings agree. Shallow targets fall back to distinct
    layers in 1..L."""
    ids = sorted({2, num_layers // 2, num_layers - 3})
    if num_layers >= 6 and len(ids) == 3:
        return ids
    return sorted({max(1, min(i, num_layers)) for i in (1, (num_layers + 1) // 2, num_layers)})


class DrafterConfig(PretrainedConfig):
    model_type = "covspec_drafter"

    def __init__(
        self,
        hidden_size: int = 4096,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 1,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 8192,
        target_features: bool = True,
        visual_prefix: str = "none",
        compressor: dict | None = None,
        fused_layer_ids: Sequence[int] = (2, 16, 29),
        max_draft_steps: int = 6,
        step_bias: bool = False,
        feature_codec_rank: int | None = None,
        draft_vocab_size: int | None = None,
        target_model_type: str | None = None,
        target_name_or_path: str | None = None,
        target_vocab_size: int | None = None,
        target_hidden_size: int | None = None,
        target_num_layers: int | None = None,
        tokenizer_fingerprint: str | None = None,
        target_config_digest: str | None = None,
        target_weights_digest: str | None = None,
        **kwargs,
    ) -> None:
        variant = kwargs.pop("variant", None)
        if variant is not None:
            if variant not in VARIANTS:
                raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
            preset_features, preset_prefix = VARIANTS[variant]
            if visual_prefix == "compressed" and preset_prefix != "none":
                raise ValueError(
                    f"variant {variant!r} carries a full visual prefix, not a compressed one"
                )
            target_features = preset_features
            visual_prefix = visual_prefix if visual_prefix == "compressed" else preset_prefix
        if visual_prefix not in VISUAL_PREFIXES:
            raise ValueError(
                f"visual_prefix must be one of {VISUAL_PREFIXES}, got {visual_prefix!r}"
            )
        if (visual_prefix == "compressed") != (compressor is not None):
            raise ValueError(
                "visual_prefix='compressed' needs a `compressor` config (and only it takes one), "
                f"got visual_prefix={visual_prefix!r}, compressor={compressor!r}"
            )
        if max_draft_steps < 1:
            raise ValueError(f"max_draft_steps must be >= 1, got {max_draft_steps}")
        if num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}")
        if feature_codec_rank is not None and feature_codec_rank < 1:
            raise ValueError(f"feature_codec_rank must be >= 1 or None, got {feature_codec_rank}")
        kv_heads = num_key_value_heads or num_attention_heads
        if hidden_size % num_attention_heads or num_attention_heads % kv_heads:
            raise ValueError(
                f"num_attention_heads {num_attention_heads} must divide hidden_size {hidden_size} "
                f"and be a multiple of num_key_value_heads {kv_heads}"
            )
        layer_ids = list(fused_layer_ids)
        if target_features and (not layer_ids or len(set(layer_ids)) < len(layer_ids)):
            raise ValueError(f"fused_layer_ids must be distinct and not empty, got {layer_ids}")
        if compressor is not None:  # refused now, naming the field, not when the model is built
            if "hidden_size" in compressor:
                raise ValueError("compressor must not set hidden_size: it is the drafter's")
            VisualCompressorConfig(hidden_size=hidden_size, **compressor)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size or hidden_size * 8 // 3
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.target_features = bool(target_features)
        self.visual_prefix = visual_prefix
        self.compressor = dict(compressor) if compressor is not None else None
        self.fused_layer_ids = list(fused_layer_ids)
        self.max_draft_steps = max_draft_steps
        self.step_bias = bool(step_bias)
        self.feature_codec_rank = feature_codec_rank
        self.draft_vocab_size = draft_vocab_size
        self.target_model_type = target_model_type
        self.target_name_or_path = target_name_or_path  # Hub id or folder it was trained against
        self.target_vocab_size = target_vocab_size
        self.target_hidden_size = target_hidden_size or hidden_size
        self.target_num_layers = target_num_layers
        self.tokenizer_fingerprint = tokenizer_fingerprint
        # the target's identity (modeling/identity.py): a retrained target of the same shape
        # has other weights, so the runner and a resumed run can tell it apart
        self.target_config_digest = target_config_digest
        self.target_weights_digest = target_weights_digest
        super().__init__(**kwargs)

    @classmethod
    def for_target(
        cls, adapter: TargetAdapter, tokenizer_fingerprint: str | None = None, **overrides
    ) -> DrafterConfig:
        """A config sized for `adapter`'s target: its width and heads, EAGLE-3's fused ids, and
        its identity (config and weights digests; the tokenizer's fingerprint from the target's
        folder unless given)."""
        text = adapter.text_config
        folder = model_folder(getattr(adapter.model, "name_or_path", None) or None)
        if tokenizer_fingerprint is None and folder is not None:
            tokenizer_fingerprint = folder_tokenizer_fingerprint(folder)
        heads = getattr(text, "num_attention_heads", max(1, adapter.hidden_size // 64))
        values = dict(
            hidden_size=adapter.hidden_size,
            intermediate_size=getattr(text, "intermediate_size", None),
            num_attention_heads=heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", heads),
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            max_position_embeddings=getattr(text, "max_position_embeddings", 8192),
            fused_layer_ids=default_fused_layer_ids(adapter.num_layers),
            target_model_type=adapter.config.model_type,
            target_name_or_path=getattr(adapter.model, "name_or_path", None) or None,
            target_vocab_size=adapter.vocab_size,
            target_hidden_size=adapter.hidden_size,
            target_num_layers=adapter.num_layers,
            tokenizer_fingerprint=tokenizer_fingerprint,
            **target_identity(adapter.model),
        )
        values.update(overrides)
        return cls(**values)

    @property
    def variant(self) -> str:
        """A label for what the drafter sees (run names, cards, reports); code reads the
        fields `target_features` and `visual_prefix`."""
        for name, preset in VARIANTS.items():
            if preset == (self.target_features, self.visual_prefix):
                return name
        prefix = self.visual_prefix if self.visual_prefix != "full" else "full_visual"
        return prefix if self.target_features else f"text_only_{prefix}"

    def describe_inputs(self) -> str:
        """What the drafter reads, in words (model cards)."""
        feats = "the target's fused hidden states" if self.target_features else "no target features"
        prefix = {
            "none": "text positions only, never visual tokens (cost and KV cache grow with the "
            "text alone)",
            "full": "every visual position too, with the merged visual embeddings (MSD style)",
            "compressed": "a compressed visual prefix",
        }[self.visual_prefix]
        if self.visual_prefix == "compressed":
            options = self.compressor_config().options
            prefix += (
                f" made by the fixed `{options[0]}` primitive"
                if len(options) == 1
                else f" chosen per input by a question-aware gate over {options}"
            )
        return f"{feats}; {prefix}"

    def compressor_config(self) -> VisualCompressorConfig:
        assert self.compressor is not None, "this drafter has no compressor"
        return VisualCompressorConfig(hidden_size=self.hidden_size, **self.compressor)

    def llama_config(self) -> LlamaConfig:
        cfg = LlamaConfig(
            vocab_size=self.target_vocab_size or 1,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
        )
        cfg._attn_implementation = "sdpa"
        return cfg


AutoConfig.register(DrafterConfig.model_type, DrafterConfig)
