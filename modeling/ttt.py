"""Training-time test (EAGLE-3): the drafter unrolled over its own predictions in one pass.

    >>> hidden = ttt_unroll(drafter, next_embeds, feats, valid, steps=6)   # [(B, S, D)] per step

Step k's queries see exactly the keys the drafter's cache holds at draft depth k, so training
matches what the runner does at inference (inference/drafting.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

if TYPE_CHECKING:
    from covspec.modeling.drafter import Drafter


def ttt_attention_mask(step: int, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Training-time-test mask for unroll step `step` (1-based) over keys of steps 1..step.

    A query at position t of step k stands for draft depth k after a context that ends at
    t-k+1: it sees step-1 keys at positions <= t-k+1 and the step-j key at t-k+j (j = 2..k),
    exactly the keys the drafter's cache holds at inference. valid: (B, S) bool.
    Returns (B, 1, S, step * S), additive.
    """
    _, s = valid.shape
    t = torch.arange(s, device=valid.device)
    blocks = [(t[None, :] <= (t[:, None] - step + 1))]  # (S, S) step-1 keys
    for j in range(2, step + 1):
        blocks.append(t[None, :] == (t[:, None] - step + j))
    allowed = torch.cat(blocks, dim=1)[None] & valid.repeat(1, step)[:, None, :]  # (B, S, step*S)
    allowed |= torch.cat(
        [
            torch.zeros(s, (step - 1) * s, dtype=torch.bool, device=valid.device),
            torch.eye(s, dtype=torch.bool, device=valid.device),
        ],
        1,
    )
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def ttt_unroll(
    drafter: Drafter,
    next_embeds: torch.Tensor,  # (B, S, D) embedding of the token after each position
    target_features: torch.Tensor,  # (B, S, D) projected fused target states at each position
    valid: torch.Tensor,  # (B, S) bool
    steps: int,
) -> list[torch.Tensor]:
    """Unroll the drafter `steps` times as at inference; returns pre-norm hidden (B, S, D) per step.

    Step 1 feeds on the target's features. Step k >= 2 at position t feeds on the drafter's own
    step k-1 output at t-1 (plus the step bias), attending to the keys of earlier steps through a
    cache, so every step sees exactly what depth k sees when drafting.
    """
    b, s, _ = next_embeds.shape
    position_ids = torch.arange(s, device=next_embeds.device).expand(b, s)
    cache = DynamicCache(config=drafter.config.llama_config())
    outputs, features = [], target_features
    for k in range(1, steps + 1):
        if k > 1:
            shifted = torch.cat([torch.zeros_like(outputs[-1][:, :1]), outputs[-1][:, :-1]], dim=1)
            features = drafter.step_feature(shifted, k)
        mask = ttt_attention_mask(k, valid, features.dtype)
        outputs.append(drafter(next_embeds, features, position_ids, mask, cache=cache))
    return outputs
