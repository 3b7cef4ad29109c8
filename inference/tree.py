"""Draft trees: growth (chain, EAGLE-2 dynamic tree, CoVSpec margin gating), masks, verification.

    >>> tree = DraftTree(root_token=b)
    >>> grow(tree, drafter_side, DraftSettings(mode="tree", depth=6))   # drafts under the root
    >>> order = tree.select(max_nodes=24)                          # root first, depth-first
    >>> mask = tree_attention_mask(tree, order, past_len, dtype)   # (1, 1, n, past + n)
    >>> path, bonus = verify_greedy(tree, order, target_logits)    # lossless, exact

Node 0 is the root: the bonus token the target emitted last round, committed but not yet run
through the target. Every other node is a drafted token; depth d sits d positions after the root.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch


@dataclass(frozen=True)
class DraftSettings:
    """How to draft one round.

    mode: "chain" (one token per depth) or "tree" (EAGLE-2: expand the `beam` most probable
      frontier nodes with `top_k` children each, verify the `max_nodes` best by cumulative prob).
      `max_nodes` applies to greedy verification only: a sampled tree verifies every drafted
      node, because a cut chosen from the sampled tokens' own probabilities would bias the
      rejection sampling (it is lossless only over candidates fixed before their draws).
    stop_margin: CoVSpec adaptive length; stop deepening once the best frontier node's
      top-1 minus top-2 drafter probability falls below it (0 disables).
    branch_margin: CoVSpec parallel branching; a node gets `top_k` children only when its margin
      is below this, else just its top-1 (None: always `top_k`, plain EAGLE-2).
    """

    mode: Literal["chain", "tree"] = "tree"
    depth: int = 6
    top_k: int = 4
    beam: int = 4
    max_nodes: int = 24
    stop_margin: float = 0.0
    branch_margin: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("chain", "tree"):
            raise ValueError(f"mode must be 'chain' or 'tree', got {self.mode!r}")
        if self.depth < 0 or self.top_k < 1 or self.beam < 1 or self.max_nodes < 1:
            raise ValueError(f"depth >= 0 and top_k, beam, max_nodes >= 1 required, got {self}")


@dataclass
class DraftTree:
    root_token: int
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # cumulative drafter log-prob
    draft_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # node -> q over children
    children: dict[int, list[int]] = field(default_factory=dict)  # in drafting order
    # node -> the drafter's entropy over its children, kept when `track_entropy` is set (an
    # acceptance head reads it)
    entropies: dict[int, float] = field(default_factory=dict)
    track_entropy: bool = False
    # node -> (drafter log-prob of its token, drafter entropy at its parent), as uploaded
    confidence: dict[int, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.add(-1, self.root_token, 0.0)

    def add(self, parent: int, token: int, score: float) -> int:
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.depths.append(0 if parent < 0 else self.depths[parent] + 1)
        self.scores.append(score)
        if parent >= 0:
            self.children.setdefault(parent, []).append(len(self.tokens) - 1)
        return len(self.tokens) - 1

    def __len__(self) -> int:
        return len(self.tokens)

    def ancestors(self, node: int) -> list[int]:
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def select(self, max_nodes: int | None = None) -> list[int]:
        """Root + the best `max_nodes` drafted nodes by cumulative score (None: all), closed
        under ancestors. Depth-first, first-drafted child first: parents precede children and
        the drafter's top path is a prefix, so accepting it keeps both caches by cropping
        instead of gathering."""
        drafted = sorted(range(1, len(self)), key=lambda n: (-self.scores[n], self.depths[n], n))
        chosen = set(drafted if max_nodes is None else drafted[:max_nodes])
        keep = {0}
        for n in sorted(chosen, key=lambda n: (self.depths[n], n)):
            if self.parents[n] in keep:
                keep.add(n)
        order, stack = [], [0]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed([c for c in self.children.get(node, []) if c in keep]))
        return order


class DraftSource(Protocol):
    """What tree growth needs from a drafter: logits under the root, and under new nodes."""

    def root_logits(self) -> torch.Tensor: ...  # (V,)

    def expand(self, tree: DraftTree, nodes: list[int]) -> torch.Tensor: ...  # (len(nodes), V)


def _gumbel_topk(logp: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k draws without replacement from exp(logp), per row (Gumbel top-k). (F, V) -> (F, k)."""
    # the generator is a CPU one (reproducible across devices): draw there, then move
    u = torch.rand(logp.shape, generator=generator, dtype=logp.dtype).clamp_min(1e-20)
    return (logp - torch.log(-torch.log(u)).to(logp.device)).topk(k, dim=-1).indices


def grow(
    tree: DraftTree,
    source: DraftSource,
    s: DraftSettings,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> None:
    """Draft under the root. Greedy (temperature 0) takes top children; sampling draws them
    without replacement from the drafter's distribution (as sampling verification requires).
    One softmax and one top-k per level, read back once: this runs every round."""
    sample = temperature > 0
    k = 1 if s.mode == "chain" else s.top_k
    logits = source.root_logits()[None]  # (1, V)
    frontier = [0]
    for level in range(s.depth):
        scaled = logits.float() / temperature if sample else logits.float()
        logp = scaled.log_softmax(-1)  # (F, V)
        top_lp, top_ids = logp.topk(min(max(k, 2), logp.shape[-1]), dim=-1)  # (F, >=2)
        top_p = top_lp.exp()
        margins = (top_p[:, 0] - top_p[:, 1] if top_p.shape[-1] > 1 else top_p[:, 0]).tolist()
        if s.stop_margin > 0 and max(margins) < s.stop_margin:
            break  # adaptive length: the drafter is unsure everywhere
        if sample:
            top_ids = _gumbel_topk(logp, k, generator)
            top_lp = logp.gather(-1, top_ids)
        ids, lps = top_ids.tolist(), top_lp.tolist()
        if tree.track_entropy:
            for node, h in zip(
                frontier, torch.special.entr(logp.exp()).sum(-1).tolist(), strict=True
            ):
                tree.entropies[node] = h
        new = []
        for row, node in enumerate(frontier):
            # CoVSpec parallel branching: extra candidates only where the drafter is unsure
            width = k if s.branch_margin is None or margins[row] < s.branch_margin else 1
            if sample:
                tree.draft_probs[node] = logp[row].exp().cpu()
            for tok, lp in zip(ids[row][:width], lps[row][:width], strict=True):
                new.append(tree.add(node, tok, tree.scores[node] + lp))
        frontier = sorted(new, key=lambda n: -tree.scores[n])[
            : (1 if s.mode == "chain" else s.beam)
        ]
        if level + 1 < s.depth:
            logits = source.expand(tree, frontier)


def additive_mask(
    n_query: int,
    n_keys: int,
    visible: int,
    rows: list[int],
    cols: list[int],
    dtype: torch.dtype,
    device=None,
) -> torch.Tensor:
    """(1, 1, n_query, n_keys) additive mask: every query sees the first `visible` keys, and
    query rows[j] also sees key cols[j]. Built from index lists in one write, every round."""
    mask = torch.full((n_query, n_keys), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask[:, :visible] = 0
    mask[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = 0
    return mask[None, None]


def tree_attention_mask(
    tree: DraftTree, order: list[int], past_len: int, dtype: torch.dtype, device=None
) -> torch.Tensor:
    """(1, 1, n, past_len + n) additive mask: the context, plus each node's ancestors and itself."""
    index = {node: i for i, node in enumerate(order)}
    rows, cols = [], []
    for i, node in enumerate(order):
        while node >= 0:
            rows.append(i)
            cols.append(past_len + index[node])
            node = tree.parents[node]
    return additive_mask(len(order), past_len + len(order), past_len, rows, cols, dtype, device)


def verify_greedy(tree: DraftTree, order: list[int], logits: torch.Tensor) -> tuple[list[int], int]:
    """Walk down while a child carries the target's argmax. logits: (n, V) in `order`.
    Returns (accepted node ids, bonus token): identical to greedy decoding with the target."""
    index = {node: i for i, node in enumerate(order)}
    kept = set(order)
    best = logits.argmax(-1).tolist()
    path, node = [], 0
    while True:
        want = best[index[node]]
        nxt = next(
            (c for c in tree.children.get(node, []) if c in kept and tree.tokens[c] == want), None
        )
        if nxt is None:
            return path, want
        path.append(nxt)
        node = nxt


def verify_sampling(
    tree: DraftTree, order: list[int], target_probs: torch.Tensor, generator: torch.Generator
) -> tuple[list[int], int]:
    """Multi-draft recursive rejection sampling (SpecInfer / EAGLE): lossless in distribution when
    each node's children were drawn without replacement from `tree.draft_probs[node]`.
    target_probs: (n, V) in `order`, already tempered / top-p filtered."""
    index = {node: i for i, node in enumerate(order)}
    kept = set(order)
    path, node = [], 0
    while True:
        p = target_probs[index[node]].double().clone()
        children = [c for c in tree.children.get(node, []) if c in kept]
        accepted = None
        if children:
            q = tree.draft_probs[node].double().clone()
            for c in children:
                tok = tree.tokens[c]
                if torch.rand((), generator=generator, dtype=torch.float64) * q[tok] < p[tok]:
                    accepted = c
                    break
                p = (p - q).clamp_min(0)
                p = p / p.sum() if p.sum() > 0 else target_probs[index[node]].double()
                q[tok] = 0
                q = q / q.sum() if q.sum() > 0 else q
        if accepted is None:
            return path, int(torch.multinomial(p, 1, generator=generator))
        path.append(accepted)
        node = accepted
