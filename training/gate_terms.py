"""The elastic compressor's gate terms in the drafter's distillation loss (training/distill.py).

    >>> t, force = explore_pairs(t, options=3)            # critic gate: every sample twice
    >>> loss = loss + critic_term(prefix, per_sample, force)
    >>> loss = loss + gate_term(prefix, per_sample)       # Gumbel gate: straight-through

`per_sample` is (B, 2): each sample's weighted cross-entropy sum over its answer positions and
the sum of their weights, detached; `prefix` is the `VisualPrefix` the compressor built
(modeling/drafter_inputs.py): the straight-through weight of the gate's choice and the critic's
scores (its predicted loss per option).
"""

from __future__ import annotations

import torch

from covspec.modeling.drafter_inputs import VisualPrefix


def gate_term(prefix: VisualPrefix, per_sample: torch.Tensor) -> torch.Tensor:
    """Zero in value; its gradient moves the gate toward the choices whose samples distilled
    with less loss than the batch's mean (straight-through on the hard Gumbel choice).
    per_sample: (B, 2) weighted CE sum and weight sum of each sample's answer positions."""
    has = per_sample[:, 1] > 0
    if has.sum() < 2:
        return prefix.weight.sum() * 0.0
    loss = per_sample[has, 0] / per_sample[has, 1]  # (B',) detached
    advantage = loss - loss.mean()
    return ((prefix.weight[has] - prefix.weight[has].detach()) * advantage).mean()


def explore_pairs(
    t: dict, options: int, generator: torch.Generator | None = None
) -> tuple[dict, torch.Tensor | None]:
    """Each sample twice, under two distinct options drawn uniformly (a critic's exploration):
    the pair's loss difference is the option's effect with the sample's difficulty removed.
    `generator` (CPU): the draws' own stream, so a resumed run draws what it would have."""
    if options < 2:
        return t, None
    b = t["ids"].shape[0]
    draws = [torch.randperm(options, generator=generator)[:2] for _ in range(b)]
    force = torch.stack(draws).flatten()  # (2B,)

    def twice(x):
        if isinstance(x, torch.Tensor):
            return x.repeat_interleave(2, 0)
        if isinstance(x, dict):
            return {k: twice(v) for k, v in x.items()}
        if isinstance(x, list):  # per-sample lists (the adapter's visual grids)
            return [v for v in x for _ in range(2)]
        return x

    return twice(t), force.to(t["ids"].device)


def critic_term(prefix: VisualPrefix, per_sample: torch.Tensor, force: torch.Tensor | None):
    """Squared error of the critic's predicted loss difference between a sample's two options
    (`explore_pairs`) against the measured one. Zero without pairs (validation)."""
    if force is None:
        return prefix.scores.sum() * 0.0
    has = (per_sample[:, 1] > 0).view(-1, 2).all(1)  # (B,)
    loss = (per_sample[:, 0] / per_sample[:, 1].clamp_min(1e-9)).view(-1, 2)  # (B, 2) detached
    pred = prefix.scores.gather(1, force[:, None]).view(-1, 2)  # (B, 2)
    err = (pred[:, 0] - pred[:, 1]) - (loss[:, 0] - loss[:, 1])
    return (err[has] ** 2).mean() if has.any() else prefix.scores.sum() * 0.0
