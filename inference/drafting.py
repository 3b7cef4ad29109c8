"""The drafter side of the runner: its own KV cache over text positions, tree expansion, catch-up.

    >>> side = DrafterSide(kernel, vocab_size, capacity)
    >>> side.prefill(token_ids, features, bonus)  # the prompt's positions, from the edge
    >>> side.root_logits()                  # (V,) distribution of the token after the bonus
    >>> side.expand(tree, frontier)         # (F, V) for new tree nodes, one forward per level
    >>> side.commit(features, emitted)      # keep the accepted path, feed real target features

The device's drafter runs through `DrafterKernel` (inference/kernel.py) with a preallocated
cache. It never sees the target: the edge sends the projected features of the positions it
needs (inference/features.py). The visual-token-free drafter's cache holds text positions only
(the edge drops visual positions before sending; a full visual prefix keeps them, with their
visual embeddings; a compressed one puts the compressor's few rows ahead of the prompt). Tree nodes are run with a tree mask and dropped from the cache after
each round; `commit` re-runs the accepted positions with the target's real features, exactly
as the training-time-test unroll assumes.
"""

from __future__ import annotations

import torch

from covspec.inference.kernel import DrafterKernel
from covspec.inference.tree import DraftTree, additive_mask


def keep_cache_positions(cache, past: int, rows: list[int]) -> None:
    """Keep the first `past` entries of every layer plus entries past+rows (in that order)."""
    if rows == list(range(len(rows))):  # accepted path is a prefix (always for chains): crop
        cache.crop(-(cache.get_seq_length() - past - len(rows)))
        return
    idx = torch.tensor(rows)
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)  # (B, H, T, d)
            setattr(
                layer,
                name,
                torch.cat([t[..., :past, :], t[..., past + idx.to(t.device), :]], dim=-2),
            )


def _causal(n_new: int, past: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    mask = torch.full((n_new, past + n_new), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.triu(past + 1)  # (n_new, past + n_new)


class DrafterSide:
    def __init__(self, kernel: DrafterKernel, vocab_size: int, capacity: int) -> None:
        self.kernel = kernel
        self.drafter = kernel.drafter
        self.vocab_size = vocab_size
        self.cache = kernel.new_cache(capacity)
        self.length = 0  # drafter cache entries that belong to committed positions
        self.steps = 0  # drafter forwards while drafting (tree levels), for cost per step
        self.hidden: dict[int, torch.Tensor] = {}  # tree node -> drafter output (D,)
        self.tree_nodes: list[int] = []  # tree nodes in the cache after `length`, in order
        cfg = self.drafter.config
        self.d2t = self.drafter.draft_token_ids() if cfg.draft_vocab_size else None
        self.dtype = kernel.dtype
        self.device = kernel.device

    def prefill(
        self,
        token_ids: torch.Tensor,  # (n,) the prompt positions the drafter runs on
        features: torch.Tensor,  # (n, D) their projected target features
        bonus: int,  # the target's first token
        visual_embeds: torch.Tensor | None = None,  # (v, D) embeddings of the visual rows
        visual_rows: torch.Tensor | None = None,  # (n,) bool, which rows are visual
        prefix: torch.Tensor | None = None,  # (m, 2D) compressed visual rows [embed; feature]
    ) -> None:
        """Run the prompt: row i pairs feature i with the embedding of the token after it; a
        compressed visual prefix goes first, as in training (modeling/drafter_inputs.py)."""
        token_ids = token_ids.to(self.device)
        next_ids = torch.cat([token_ids[1:], torch.tensor([bonus], device=self.device)])
        next_embeds = self.kernel.embed(next_ids)
        if visual_embeds is not None:  # full_visual: placeholders carry the visual embeddings
            embeds = self.kernel.embed(token_ids).clone()  # (n, D)
            embeds[visual_rows.to(self.device)] = visual_embeds.to(embeds)
            next_embeds = torch.cat([embeds[1:], next_embeds[-1:]])
        features = features.to(self.device)
        if prefix is not None:
            d = next_embeds.shape[-1]
            prefix = prefix.to(self.device)
            next_embeds = torch.cat([prefix[:, :d].to(next_embeds), next_embeds])
            features = torch.cat([prefix[:, d:].to(features), features])
        self._run_committed(features, next_embeds)

    def _run_committed(self, feats: torch.Tensor, next_embeds: torch.Tensor) -> None:
        """Append committed positions (real target features) and reset the tree to its root."""
        n = next_embeds.shape[0]
        self.cache.truncate(self.length)  # drop last round's drafted nodes
        self.tree_nodes = []
        next_embeds = next_embeds.to(self.dtype)
        feats = feats.to(self.device, self.dtype)
        pos = torch.arange(self.length, self.length + n, device=self.device)
        mask = _causal(n, self.length, self.dtype, self.device)
        h = self.kernel.run(self.cache, next_embeds, feats, pos, mask)  # (n, D)
        self.length += n
        self.hidden = {0: h[-1]}

    def _full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.kernel.logits(hidden).float()
        if self.d2t is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.d2t, logits)

    def root_logits(self) -> torch.Tensor:
        return self._full_logits(self.hidden[0][None])[0]

    def expand(self, tree: DraftTree, nodes: list[int]) -> torch.Tensor:
        """Run the drafter on new tree nodes (each attends to context + its ancestors)."""
        depth = tree.depths[nodes[0]]
        assert all(tree.depths[n] == depth for n in nodes), "expand one tree level at a time"
        previous = torch.stack([self.hidden[tree.parents[n]] for n in nodes])  # (F, D)
        feats = self.kernel.step_feature(previous, depth + 1)
        embeds = self.kernel.embed(
            torch.tensor([tree.tokens[n] for n in nodes], device=self.device)
        )
        pos = torch.full((len(nodes),), self.length - 1 + depth, device=self.device)
        # Keys after the committed context: this round's earlier nodes (in `tree_nodes` order),
        # then the new nodes themselves.
        slot = {node: i for i, node in enumerate(self.tree_nodes + nodes)}
        rows, cols = [], []
        for i, n in enumerate(nodes):
            while n > 0:  # the root is the last committed entry, visible to all
                rows.append(i)
                cols.append(self.length + slot[n])
                n = tree.parents[n]
        mask = additive_mask(
            len(nodes), self.length + len(slot), self.length, rows, cols, self.dtype, self.device
        )
        h = self.kernel.run(self.cache, embeds.to(self.dtype), feats, pos, mask[0, 0])  # (F, D)
        self.steps += 1
        self.tree_nodes += nodes
        for i, n in enumerate(nodes):
            self.hidden[n] = h[i]
        return self._full_logits(h)

    def commit(self, features: torch.Tensor, emitted: list[int]) -> None:
        """Keep the accepted path: features (m, D) of the root and the accepted nodes; emitted =
        the accepted drafted tokens then the bonus, i.e. the token after each of those rows."""
        self._run_committed(features, self.kernel.embed(torch.tensor(emitted, device=self.device)))
