"""A lean decode path for the drafter: fused projections, a preallocated KV cache, no HF wrappers.

    >>> kernel = DrafterKernel(drafter)                    # once per drafter: fused weights, rotary table
    >>> cache = kernel.new_cache(capacity=1024)            # once per request
    >>> h = kernel.run(cache, embeds, feats, positions, mask)  # (S, D) pre-norm hidden, K/V appended
    >>> cache.truncate(n)                                  # keep the first n entries

At batch size 1 the drafter runs a handful of rows per call, so its cost is weight traffic plus
per-op dispatch, not FLOPs. This path computes exactly what `Drafter.forward` computes (same
parameters, same rotary table, same masking) with fewer ops: q/k/v and gate/up each as one matmul,
RMSNorm weights folded into the matmul that follows (only 1/RMS is computed per row; in the
EAGLE-3 first layer the embedding and feature norms fold into the two column halves of q/k/v),
rotary cos/sin looked up instead of recomputed, and K/V written into a buffer instead of
concatenated. tests/test_kernel.py checks it equals the module forward with a DynamicCache.
Training keeps using the module (transformers' own layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from covspec.modeling.drafter import Drafter


def _cat_weights(*linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([m.weight for m in linears], dim=0)
    biases = [m.bias for m in linears]
    if all(b is None for b in biases):
        return weight, None
    return weight, torch.cat(
        [
            b if b is not None else weight.new_zeros(m.out_features)
            for b, m in zip(biases, linears, strict=True)
        ]
    )


def _inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / RMS(x) per row, (..., 1). With the norm's weight folded into the next matmul,
    RMSNorm(x) @ W.T == (x @ (W * w).T) * inv_rms(x): four cheap ops instead of F.rms_norm,
    which is the costliest op of a one-row step on CPU."""
    return x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()


class _Layer:
    def __init__(self, layer) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        qkv, self.qkv_bias = _cat_weights(attn.q_proj, attn.k_proj, attn.v_proj)
        # EAGLE-3 first layer: q/k/v read [norm(embedding); hidden_norm(feature)], 2D wide
        self.first = hasattr(layer, "hidden_norm")
        norms = torch.cat([ln1.weight, layer.hidden_norm.weight]) if self.first else ln1.weight
        self.qkv, self.eps1 = qkv * norms, ln1.variance_epsilon
        self.eps_hidden = layer.hidden_norm.variance_epsilon if self.first else None
        gate_up, self.gate_up_bias = _cat_weights(mlp.gate_proj, mlp.up_proj)
        self.gate_up, self.eps2 = gate_up * ln2.weight, ln2.variance_epsilon
        self.o, self.o_bias = attn.o_proj.weight, attn.o_proj.bias
        self.down, self.down_bias = mlp.down_proj.weight, mlp.down_proj.bias
        self.heads, self.kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.act = mlp.act_fn


def _normed_linear(x, weight, bias, eps) -> torch.Tensor:
    """RMSNorm then linear, the norm weight already folded into `weight`."""
    y = F.linear(x, weight) * _inv_rms(x, eps)
    return y if bias is None else y + bias


class KVBuffer:
    """One request's drafter cache: preallocated (layers, Hkv, capacity, hd) keys and values."""

    def __init__(self, shape: tuple[int, ...], like: torch.Tensor) -> None:
        self.keys = like.new_empty(shape)
        self.values = like.new_empty(shape)
        self.length = 0  # filled entries

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def nbytes(self, length: int) -> int:
        """Bytes of keys + values held for the first `length` positions."""
        per_row = self.keys[:, :, :1].numel() * self.keys.element_size()
        return 2 * per_row * length

    def truncate(self, length: int) -> None:
        assert 0 <= length <= self.length, (length, self.length)
        self.length = length


class DrafterKernel:
    """Inference-only view of a `Drafter`'s weights (fused once; do not train through it)."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.layers = [_Layer(layer) for layer in drafter.layers]
        weight = drafter.layers[0].self_attn.o_proj.weight
        # tree nodes sit up to a draft depth past the last text position, so leave headroom
        self.max_positions = drafter.config.max_position_embeddings + 1024
        position = torch.arange(self.max_positions, device=weight.device)[None]
        cos, sin = drafter.rotary(weight.new_zeros(1), position)  # (1, P, head_dim)
        # rotate_half(x) * sin == x[..., perm] * signed_sin: one gather instead of four ops
        half = cos.shape[-1] // 2
        self.perm = torch.cat([torch.arange(half, 2 * half), torch.arange(half)]).to(weight.device)
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(weight.device)
        self.cos, self.signed_sin = cos[0].to(weight.dtype), (sin[0] * sign).to(weight.dtype)
        # plain attributes: config and module lookups cost microseconds on every step
        self.eps_final, self.final_norm = drafter.norm.variance_epsilon, drafter.norm.weight
        head = drafter.head()
        self.head, self.head_bias = head.weight, head.bias
        cfg = drafter.config
        embedding = drafter.embedding()
        # a plain table is one F.embedding; scaled or otherwise special embeddings keep their module
        self.embedding = embedding.weight if type(embedding) is torch.nn.Embedding else None
        self.embedding_module = embedding
        self.text_only = not cfg.target_features
        self.step_bias = drafter.step_bias.detach() if cfg.step_bias else None
        self.max_draft_steps = cfg.max_draft_steps
        self.dtype, self.device = weight.dtype, weight.device

    def new_cache(self, capacity: int) -> KVBuffer:
        first = self.layers[0]
        shape = (len(self.layers), first.kv_heads, capacity, first.head_dim)
        return KVBuffer(shape, self.drafter.layers[0].self_attn.o_proj.weight)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(...,) token ids -> (..., D) target embeddings, as `Drafter.embed`."""
        if self.embedding is None:
            return self.embedding_module(ids)
        return F.embedding(ids, self.embedding)

    def step_feature(self, previous_hidden: torch.Tensor, step: int) -> torch.Tensor:
        """The feature at draft step `step` >= 2, as `Drafter.step_feature`."""
        feature = torch.zeros_like(previous_hidden) if self.text_only else previous_hidden
        if self.step_bias is None:
            return feature
        row = min(min(step, self.max_draft_steps) - 2, self.step_bias.shape[0] - 1)
        return feature + self.step_bias[row]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) pre-norm hidden -> (..., V_draft), as `Drafter.logits`. The head may be the
        target's (large, shared), so the final norm is applied, not folded into a copy."""
        normed = hidden * _inv_rms(hidden, self.eps_final) * self.final_norm
        return F.linear(normed.to(self.head.dtype), self.head, self.head_bias)

    def run(
        self,
        cache: KVBuffer,
        embeds: torch.Tensor,  # (S, D) next-token embeddings
        feats: torch.Tensor,  # (S, D) projected target features or step features
        positions: torch.Tensor,  # (S,) rotary positions
        mask: torch.Tensor,  # (S, cache.length + S) additive, over the cache then the new rows
    ) -> torch.Tensor:
        """Appends S entries to `cache`; returns the pre-norm hidden states (S, D)."""
        s, start = embeds.shape[0], cache.length
        if start + s > cache.capacity:
            raise ValueError(
                f"drafter cache holds {cache.capacity} entries; {start} + {s} do not fit"
            )
        embeds = embeds.to(feats.dtype)
        cos, sin = self.cos[positions][None], self.signed_sin[positions][None]  # (1, S, hd)
        mask = mask[None, None].to(feats.dtype)
        h = feats  # the EAGLE-3 first layer's attention residual is the un-normed feature
        for i, layer in enumerate(self.layers):
            if layer.first:  # (S, 2D), each half pre-scaled by its 1/RMS; norm weights folded
                x = torch.cat(
                    [embeds * _inv_rms(embeds, layer.eps1), h * _inv_rms(h, layer.eps_hidden)], -1
                )
                qkv = F.linear(x, layer.qkv)
                qkv = qkv if layer.qkv_bias is None else qkv + layer.qkv_bias
            else:
                qkv = _normed_linear(h, layer.qkv, layer.qkv_bias, layer.eps1)
            h = h + self._attention(cache, i, layer, qkv, cos, sin, mask, start)
            gate_up = _normed_linear(h, layer.gate_up, layer.gate_up_bias, layer.eps2)
            gate, up = gate_up.chunk(2, dim=-1)
            h = h + F.linear(layer.act(gate) * up, layer.down, layer.down_bias)
        cache.length = start + s
        return h

    def _attention(self, cache: KVBuffer, i: int, layer: _Layer, qkv, cos, sin, mask, start: int):
        """qkv: (S, (H + 2 Hkv) hd) projections of this layer's normed input."""
        s, hd = qkv.shape[0], layer.head_dim
        end = start + s
        heads = layer.heads + layer.kv_heads
        qk = qkv[:, : heads * hd].view(s, heads, hd).transpose(0, 1)  # (H + Hkv, S, hd)
        qk = qk * cos + qk[..., self.perm] * sin  # rotary on queries and keys at once
        cache.keys[i, :, start:end] = qk[layer.heads :]
        cache.values[i, :, start:end] = (
            qkv[:, heads * hd :].view(s, layer.kv_heads, hd).transpose(0, 1)
        )
        out = F.scaled_dot_product_attention(
            qk[None, : layer.heads],
            cache.keys[None, i, :, :end],
            cache.values[None, i, :, :end],
            attn_mask=mask,
            scale=layer.scaling,
            enable_gqa=layer.heads != layer.kv_heads,
        )  # (1, H, S, hd)
        out = out[0].transpose(0, 1).reshape(s, layer.heads * hd)
        return F.linear(out, layer.o, layer.o_bias)
