"""The visual-token-free drafter in EAGLE-3's layout, fed by the target's fused hidden states.

    >>> cfg = DrafterConfig.for_target(adapter, variant="visual_free")   # or target_features=...,
    ...                                                                  # visual_prefix=...
    >>> drafter = Drafter(cfg).attach_target(adapter)      # borrows embeddings (+ full LM head)
    >>> feats = drafter.project_features(target_states)    # (B, S, n_layers * Ht) -> (B, S, D)
    >>> hidden = drafter(drafter.embed(next_ids), feats, position_ids, mask)   # (B, S, D)
    >>> logits = drafter.logits(hidden)                   # (B, S, V_draft)
    >>> drafter.save_pretrained("out"); Drafter.from_pretrained("out").attach_target(adapter)

Layout (EAGLE-3, as the `speculators` library, vLLM and SGLang load it): `fc` projects the
concatenated target states of `fused_layer_ids` (HF `output_hidden_states` indices, EAGLE-3's
default 2, L//2, L-3) to the drafter width; the first decoder layer takes
[input_layernorm(token embedding); hidden_norm(feature)] (2D wide) straight into q/k/v, with the
un-normed feature as the attention residual; then a Llama MLP, `norm` and the LM head. A pruned
draft vocabulary stores EAGLE-3's `d2t` offsets (target id = draft id + d2t[draft id]) and the
`t2d` membership mask beside its own head.

Input at text position t: the embedding of token t+1 and the target's states at t. From draft
step 2 on the feature is the drafter's own previous output. What the drafter sees is two
settings: `target_features` (the fused target states above, or zeros) and `visual_prefix`:
`none` (text positions only, so compute and KV cache never grow with visual tokens), `full`
(every visual position too, carrying the merged visual embeddings, MSD style) or `compressed`
(a few tokens made by the elastic compressor, modeling/compressor.py, ahead of the text;
modeling/drafter_inputs.py builds them for training and the runner alike). `variant` names the
three classic presets: visual_free (features, none), text_only (no features, none) and
full_visual (features, full). HiViS step-dependent bias
corrections of the fed-back feature are an opt-in extra (`step_bias=True`) that the EAGLE-3
export refuses, since no serving engine applies them.

Embeddings (and the full-vocabulary LM head) belong to the target and are never saved here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from covspec.modeling.adapters import TargetAdapter, TargetMismatchError
from covspec.modeling.codec import dequantize, quantize_int8
from covspec.modeling.compressor import VisualCompressor, VisualCompressorConfig
from covspec.modeling.identity import check_identity, model_folder, target_identity
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


class Eagle3FirstLayer(LlamaDecoderLayer):
    """Llama decoder layer whose q/k/v read [input_layernorm(embedding); hidden_norm(feature)].

    The attention residual is the un-normed feature (EAGLE-3's `norm_before_residual=False`),
    so at step 1 the layer refines the target's projected state rather than the embedding."""

    def __init__(self, config: LlamaConfig, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx)
        d, attn = config.hidden_size, self.self_attn
        bias = config.attention_bias
        self.hidden_norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        attn.q_proj = nn.Linear(2 * d, attn.q_proj.out_features, bias=bias)
        attn.k_proj = nn.Linear(2 * d, attn.k_proj.out_features, bias=bias)
        attn.v_proj = nn.Linear(2 * d, attn.v_proj.out_features, bias=bias)

    def forward(  # type: ignore[override]
        self,
        inputs_embeds: torch.Tensor,  # (B, S, D)
        features: torch.Tensor,  # (B, S, D)
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(inputs_embeds), self.hidden_norm(features)], -1)
        attn, _ = self.self_attn(
            hidden_states=x,  # (B, S, 2D)
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            position_embeddings=position_embeddings,
        )
        h = features + attn  # (B, S, D)
        return h + self.mlp(self.post_attention_layernorm(h))


class DrafterWeightsError(ValueError):
    """A drafter folder whose weights do not match its config (missing, unexpected, old layout)."""


class Drafter(PreTrainedModel):
    config_class = DrafterConfig
    base_model_prefix = "drafter"
    main_input_name = "inputs_embeds"
    _supports_sdpa = True

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        lcfg = config.llama_config()
        fused = len(config.fused_layer_ids) * config.target_hidden_size
        if config.target_features and config.feature_codec_rank:
            # the device-edge feature codec: the edge runs fc_down and sends int8 codes, the
            # device runs fc_up; fc_up @ fc_down is EAGLE-3's fc (folded at export)
            self.fc_down = nn.Linear(fused, config.feature_codec_rank, bias=False)
            self.fc_up = nn.Linear(config.feature_codec_rank, d, bias=False)
        elif config.target_features:
            self.fc = nn.Linear(fused, d, bias=False)
        self.layers = nn.ModuleList(
            [Eagle3FirstLayer(lcfg, 0)]
            + [LlamaDecoderLayer(lcfg, i) for i in range(1, config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        if config.visual_prefix == "compressed":
            self.compressor = VisualCompressor(config.compressor_config())
        self.rotary = LlamaRotaryEmbedding(lcfg)
        if config.step_bias:
            # HiViS: step k >= 2 correction of the fed-back feature (row k-2); zero = plain EAGLE.
            self.step_bias = nn.Parameter(torch.zeros(max(config.max_draft_steps - 1, 1), d))
        if config.draft_vocab_size:
            v = config.draft_vocab_size
            self.lm_head = nn.Linear(d, v, bias=False)
            self.register_buffer("d2t", torch.zeros(v, dtype=torch.long), persistent=True)
            t2d = torch.zeros(config.target_vocab_size or v, dtype=torch.bool)
            self.register_buffer("t2d", t2d, persistent=True)
        self._target: tuple[nn.Module, nn.Module] | None = None  # (embeddings, lm_head), unsaved
        self.post_init()

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs) -> Drafter:
        """Load a drafter folder (safetensors only); a weight the config does not expect, or one
        it expects and the folder lacks, is an error naming it, never a random initialisation."""
        kwargs.setdefault("use_safetensors", True)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        unexpected, missing = sorted(info["unexpected_keys"]), sorted(info["missing_keys"])
        if "in_proj.weight" in unexpected:
            raise DrafterWeightsError(
                f"{path} holds a drafter in the pre-EAGLE-3 layout (in_proj + full decoder "
                "layer); this version loads EAGLE-3 layout drafters only: retrain it"
            )
        if unexpected or missing:
            raise DrafterWeightsError(
                f"{path}: weights do not match its config.json "
                f"(missing: {missing or 'none'}; unexpected: {unexpected or 'none'})"
            )
        return model

    # -- target binding -----------------------------------------------------------------------
    def check_target(
        self,
        adapter: TargetAdapter,
        tokenizer_fingerprint: str | None = None,
        identity: dict[str, str | None] | None = None,
    ) -> None:
        """Refuse a target other than the one this drafter was trained for, naming the field.
        `identity` (modeling/identity.py) and `tokenizer_fingerprint` are the target's; where
        the target has one, a drafter that records none is refused too (its check would be off)."""
        c = self.config
        expected = {
            "model type": (c.target_model_type, adapter.config.model_type),
            "vocab size": (c.target_vocab_size, adapter.vocab_size),
            "hidden size": (c.target_hidden_size, adapter.hidden_size),
            "number of layers": (c.target_num_layers, adapter.num_layers),
        }
        for name, (want, got) in expected.items():
            if want is not None and got is not None and want != got:
                raise TargetMismatchError(
                    f"drafter was trained for a target with {name} {want!r}, this target has {got!r}"
                )
        identity = {**(identity or {}), "tokenizer_fingerprint": tokenizer_fingerprint}
        check_identity(c.to_dict(), identity, "drafter")
        adapter.check_layer_ids(c.fused_layer_ids)

    def attach_target(
        self,
        adapter: TargetAdapter,
        tokenizer_fingerprint: str | None = None,
        identity: dict[str, str | None] | None = None,
    ) -> Drafter:
        self.check_target(adapter, tokenizer_fingerprint, identity)
        self._target = (adapter.input_embeddings(), adapter.lm_head())
        return self

    def _bound(self) -> tuple[nn.Module, nn.Module]:
        if self._target is None:
            raise RuntimeError("call drafter.attach_target(adapter) before using it")
        return self._target

    # -- pieces -------------------------------------------------------------------------------
    def embedding(self) -> nn.Module:
        """The target's input embedding module, borrowed (never trained here)."""
        return self._bound()[0]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Target token embeddings, (B, S) -> (B, S, D)."""
        return self.embedding()(ids)

    def project_features(
        self, target_states: torch.Tensor | None, like: torch.Tensor
    ) -> torch.Tensor:
        """Fused target states (B, S, n*Ht) -> (B, S, D); zeros for the text-only baseline.
        With the feature codec, the low-rank code passes through int8 fake quantisation
        (straight-through), exactly what crosses the link at inference."""
        if not self.config.target_features or target_states is None:
            return torch.zeros_like(like)
        if self.config.feature_codec_rank:
            code = self.fc_down(target_states.to(self.fc_down.weight.dtype))  # (..., r)
            return self.fc_up(code + (dequantize(*quantize_int8(code)) - code).detach())
        return self.fc(target_states.to(self.fc.weight.dtype))

    def feature_projection(self) -> torch.Tensor:
        """EAGLE-3's `fc` weight (D, n*Ht); the codec's two halves folded into one matrix."""
        if self.config.feature_codec_rank:
            return self.fc_up.weight @ self.fc_down.weight
        return self.fc.weight

    @torch.no_grad()
    def init_codec_from(self, fc_weight: torch.Tensor) -> None:
        """Start the codec at the best rank-r approximation of a trained `fc` (truncated SVD),
        split evenly between the edge and device halves."""
        u, s, vh = torch.linalg.svd(fc_weight.float(), full_matrices=False)
        r = self.config.feature_codec_rank
        root = s[:r].sqrt()
        self.fc_down.weight.copy_(root[:, None] * vh[:r])
        self.fc_up.weight.copy_(u[:, :r] * root[None])

    @torch.no_grad()
    def init_from_target_layer(self, layer: nn.Module, final_norm: nn.Module) -> None:
        """Start layer 0 and the final norm from a target decoder layer (its last) of the same
        width: norms, MLP and o_proj copied; q/k/v read [embedding; feature] through the
        layer's projection halved over the two, so both streams enter as the target's own
        attention would read one of them; `fc` starts as the highest fused layer's state, a
        residual stream the copied layer knows how to read. Other shapes: a ValueError."""
        first, attn, src = self.layers[0], self.layers[0].self_attn, layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            w = getattr(src, name).weight  # (O, D)
            mine = getattr(attn, name).weight  # (O, 2D)
            if mine.shape != (w.shape[0], 2 * w.shape[1]):
                raise ValueError(
                    f"target layer {name} {tuple(w.shape)} does not fit the drafter's "
                    f"{tuple(mine.shape)}"
                )
            mine.copy_(torch.cat([w, w], dim=1) * 0.5)
        pairs = [(attn.o_proj, src.o_proj), (first.mlp, layer.mlp), (self.norm, final_norm)]
        pairs += [(first.input_layernorm, layer.input_layernorm),
                  (first.hidden_norm, layer.input_layernorm),
                  (first.post_attention_layernorm, layer.post_attention_layernorm)]  # fmt: skip
        for mine, theirs in pairs:
            mine.load_state_dict(theirs.state_dict())
        if hasattr(self, "fc"):
            d = self.config.hidden_size
            self.fc.weight.zero_()
            self.fc.weight[:, -d:].copy_(torch.eye(d))

    def step_feature(self, previous_hidden: torch.Tensor, step: int) -> torch.Tensor:
        """The feature fed at draft step `step` >= 2: the drafter's own previous output (plus the
        HiViS bias correction when enabled); zeros for the text-only baseline."""
        assert step >= 2, "step 1 feeds on target features"
        if not self.config.target_features:
            previous_hidden = torch.zeros_like(previous_hidden)
        if not self.config.step_bias:
            return previous_hidden
        row = min(step, self.config.max_draft_steps) - 2
        return previous_hidden + self.step_bias[min(row, self.step_bias.shape[0] - 1)]

    def head(self) -> nn.Module:
        """The output head: the drafter's own for a pruned draft vocabulary, else the target's."""
        return self.lm_head if self.config.draft_vocab_size else self._bound()[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, S, D) -> (B, S, V_draft): final norm, then the draft or the target LM head."""
        h = self.norm(hidden)
        head = self.head()
        return head(h.to(head.weight.dtype))

    @torch.no_grad()
    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Install a draft vocabulary (ascending target ids, `build_draft_vocab`) as EAGLE-3's
        d2t offsets + t2d mask, and start the draft head from the target head's rows."""
        if token_ids.shape != self.d2t.shape:
            raise ValueError(
                f"draft vocabulary must have shape {tuple(self.d2t.shape)}, got {tuple(token_ids.shape)}"
            )
        token_ids = token_ids.to(self.d2t.device)
        self.d2t.copy_(token_ids - torch.arange(len(token_ids), device=token_ids.device))
        self.t2d.zero_().index_fill_(0, token_ids, True)
        self.lm_head.weight.copy_(self._bound()[1].weight[token_ids.to(self.lm_head.weight.device)])

    def draft_token_ids(self) -> torch.Tensor:
        """(V_draft,) target id of every draft-vocabulary entry (d2t offsets applied)."""
        assert self.config.draft_vocab_size, "full-vocabulary drafter has no draft vocabulary"
        return self.d2t + torch.arange(len(self.d2t), device=self.d2t.device)

    def has_draft_vocab(self) -> bool:
        """Whether a pruned vocabulary was installed (t2d marks exactly draft_vocab_size ids)."""
        return bool(self.config.draft_vocab_size) and int(self.t2d.sum()) == len(self.d2t)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids] if self.config.draft_vocab_size else draft_ids

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # (B, S, D) embeddings of the next tokens
        features: torch.Tensor,  # (B, S, D) projected target features or step features
        position_ids: torch.Tensor,  # (B, S)
        attention_mask: torch.Tensor | None = None,  # (B, 1, S, S_past + S) additive
        cache=None,
    ) -> torch.Tensor:
        """Pre-norm hidden states (B, S, D); with `cache`, keys/values are appended to it."""
        pos = self.rotary(features, position_ids)
        first, *rest = self.layers
        h = first(
            inputs_embeds.to(features.dtype),
            features,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            position_embeddings=pos,
        )  # (B, S, D)
        for layer in rest:
            h = layer(
                h,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                position_embeddings=pos,
            )
            h = h[0] if isinstance(h, tuple) else h
        return h


AutoConfig.register(DrafterConfig.model_type, DrafterConfig)
AutoModel.register(DrafterConfig, Drafter)
