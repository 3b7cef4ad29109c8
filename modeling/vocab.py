"""EAGLE-3's pruned draft vocabulary: the most frequent target ids of the training answers.

>>> ids = build_draft_vocab(counts, 32000)     # (V,) counts -> ascending (32000,) target ids
>>> drafter.set_draft_vocab(ids)               # d2t offsets + t2d mask + head rows
"""

from __future__ import annotations

import torch


def build_draft_vocab(counts: torch.Tensor, size: int) -> torch.Tensor:
    """EAGLE-3 draft vocabulary: the `size` most frequent target ids, ascending. counts: (V,)."""
    if not 0 < size <= counts.numel():
        raise ValueError(f"draft vocab size must be in 1..{counts.numel()}, got {size}")
    top = torch.argsort(-counts.double(), stable=True)[:size]  # ties keep the lower id
    return torch.sort(top).values
