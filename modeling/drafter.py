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

import copy

import torch
from torch import nn
from transformers import AutoModel, LlamaConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from covspec.modeling.adapters import TargetAdapter, TargetMismatchError
from covspec.modeling.codec import dequantize, quantize_int8
from covspec.modeling.compressor import VisualCompressor
from covspec.modeling.drafter_config import DrafterConfig
from covspec.modeling.identity import check_identity


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

    def set_cost_weight(self, cost_weight: float) -> None:
        """Run the compressor's critic gate at another price (`VisualCompressor.set_cost_weight`),
        recorded in this drafter's config too, so a `save_pretrained` after it keeps the price."""
        if self.config.visual_prefix != "compressed":
            raise ValueError(
                f"visual_prefix is {self.config.visual_prefix!r}: no compressor gate to price"
            )
        self.compressor.set_cost_weight(cost_weight)
        self.config.compressor = {**self.config.compressor, "cost_weight": float(cost_weight)}

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
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma: norms around the MLP too
            raise ValueError(
                f"{type(layer).__name__} is not a Llama-layout decoder layer (extra norms around "
                "its MLP): start the drafter from scratch (init_from_target: false)"
            )
        for mine, theirs in pairs:
            mine.load_state_dict(theirs.state_dict())
            if isinstance(mine, nn.Linear):
                continue
            # both in float32 (a bf16 target's own rounding is not a different function)
            x = torch.randn(2, self.config.hidden_size, device=self.device)
            ref = copy.deepcopy(theirs).float()
            if not torch.allclose(copy.deepcopy(mine).float()(x), ref(x), atol=1e-4):
                # e.g. Gemma's (1 + w) norms or a GELU MLP: same weights, another function
                raise ValueError(
                    f"{type(layer).__name__}'s {type(theirs).__name__} computes another function "
                    f"than the drafter's {type(mine).__name__} with the same weights: start the "
                    "drafter from scratch (init_from_target: false)"
                )
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


AutoModel.register(DrafterConfig, Drafter)
