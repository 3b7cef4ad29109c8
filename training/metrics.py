"""Drafter metrics: top-1 agreement with the teacher per unroll depth, and the tau it implies.

    >>> m = DepthAgreement(steps=6)
    >>> m.update(depth=1, agree=torch.tensor([True, False]))
    >>> rates = m.compute()          # (steps,) agreement at each depth
    >>> implied_tau(rates)           # 1 + sum_k prod_{j<=k} a_j

tau is the mean number of tokens emitted per target forward in a chain decode loop, the bonus
token included (ceiling: depth + 1). Reading agreement at depth k as the probability that draft
k is accepted once drafts 1..k-1 were, a chain of depth K emits 1 + a1 + a1*a2 + ... tokens.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class DepthAgreement(Metric):
    full_state_update = False

    def __init__(self, steps: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps = steps
        self.add_state(
            "agree", default=torch.zeros(steps, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "total", default=torch.zeros(steps, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, depth: int, agree: torch.Tensor) -> None:
        if not 1 <= depth <= self.steps:
            raise ValueError(f"depth must be in 1..{self.steps}, got {depth}")
        self.agree[depth - 1] += agree.sum().to(self.agree.dtype)
        self.total[depth - 1] += agree.numel()

    def compute(self) -> torch.Tensor:
        return self.agree / self.total.clamp_min(1)


def implied_tau(rates: torch.Tensor) -> float:
    """Expected tokens per target forward of a chain whose depth-k acceptance rate is rates[k-1]."""
    return float(1 + torch.cumprod(rates.double(), 0).sum())
