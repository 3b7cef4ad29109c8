"""Lookup supervision for a toy target: one attention head is told which visual token to read.

    >>> sup = LookupSupervision(layer=4, head=0, weight=1.0)
    >>> with capture_attention_input(model, sup.layer) as seen:
    ...     out = model(**batch)
    >>> loss = out_loss + sup.weight * lookup_loss(model, sup, seen, pointers, batch["attention_mask"])

Why: a toy VLM trained from scratch in minutes names the objects of a clip and counts them, but
it does not learn to *find* a named object among several (a query built from the words "red
square" matched against visual tokens: associative recall). Measured on this CPU, a fresh toy
LM stays at chance on "Where is the red square?" with several objects in view after 45k
examples, whether the visual tokens come from the tower, are replaced by the sum of the answer
words' own embeddings, or are written out as text; it learns the lookup within a few hundred
steps once one head's attention is pointed at the right token. The pointers come from the
generator's ground truth (which token shows the object an answer reads its position from), a
privileged signal a synthetic world has for free. Nothing of it is saved: the target is a plain
LLaVA whose head learned to look.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LookupSupervision:
    layer: int  # decoder layer whose head is supervised
    head: int = 0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.layer < 0 or self.head < 0 or self.weight < 0:
            raise ValueError(f"lookup supervision needs layer, head, weight >= 0, got {self}")


def _decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.language_model.layers


@contextmanager
def capture_attention_input(model, layer: int):
    """Record what layer `layer`'s self-attention receives (normed hidden states, rotary cos and
    sin) during the forwards run inside the block."""
    layers = _decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is not one of the target's {len(layers)} decoder layers")
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs):
        seen["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["cos"], seen["sin"] = kwargs["position_embeddings"]

    handle = layers[layer].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def lookup_loss(
    model,
    sup: LookupSupervision,
    seen: dict[str, torch.Tensor],
    pointers: torch.Tensor,  # (n, 3) long: batch row, query position, key position
    attention_mask: torch.Tensor,  # (B, T)
) -> torch.Tensor:
    """Mean -log attention of the supervised head from each query position to its key, computed
    from the captured inputs exactly as the layer computes it (so the model's own attention
    kernel stays whatever it is)."""
    attn = _decoder_layers(model)[sup.layer].self_attn
    heads = attn.config.num_attention_heads
    if sup.head >= heads:
        raise ValueError(f"head {sup.head} is not one of layer {sup.layer}'s {heads} heads")
    hd = attn.head_dim
    kv_head = sup.head // (heads // attn.config.num_key_value_heads)
    x = seen["hidden"]  # (B, T, D)
    cos = seen["cos"].expand(x.shape[0], -1, -1)  # (B, T, hd): one row may serve the batch
    sin = seen["sin"].expand(x.shape[0], -1, -1)
    rows, q_pos, k_pos = pointers.unbind(-1)
    w_q = attn.q_proj.weight[sup.head * hd : (sup.head + 1) * hd]  # (hd, D)
    b_q = (
        None if attn.q_proj.bias is None else attn.q_proj.bias[sup.head * hd : (sup.head + 1) * hd]
    )
    q = torch.nn.functional.linear(x[rows, q_pos], w_q, b_q)  # (n, hd)
    q = _rotate(q, cos[rows, q_pos], sin[rows, q_pos])
    w_k = attn.k_proj.weight[kv_head * hd : (kv_head + 1) * hd]
    b_k = None if attn.k_proj.bias is None else attn.k_proj.bias[kv_head * hd : (kv_head + 1) * hd]
    k = _rotate(torch.nn.functional.linear(x, w_k, b_k), cos, sin)  # (B, T, hd)
    scores = torch.einsum("nd,ntd->nt", q, k[rows]) * attn.scaling  # (n, T)
    t = torch.arange(x.shape[1], device=x.device)
    allowed = (t[None] <= q_pos[:, None]) & attention_mask[rows].bool()
    logp = scores.float().masked_fill(~allowed, float("-inf")).log_softmax(-1)
    return -logp[torch.arange(len(rows), device=x.device), k_pos].mean()
