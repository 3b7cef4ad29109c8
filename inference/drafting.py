"""The drafter side of the runner: its own KV cache over text positions, tree expansion, catch-up.

    >>> side = DrafterSide.prefill(runner, inputs, target_out, bonus, capacity)  # after target prefill
    >>> side.root_logits()                  # (V,) distribution of the token after the bonus
    >>> side.expand(tree, frontier)         # (F, V) for new tree nodes, one forward per level
    >>> side.commit(verify_out, rows, emitted)  # keep the accepted path, feed real target features

The drafter runs through the runner's `DrafterKernel` (inference/kernel.py) with a preallocated
cache. The visual-token-free drafter's cache holds text positions only: at prefill the visual positions
are dropped from the target's states (the `full_visual` baseline keeps them). Tree nodes are run
with a tree mask and dropped from the cache after each round; `commit` re-runs the accepted
positions with the target's real features, exactly as the training-time-test unroll assumes.
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
        self.hidden: dict[int, torch.Tensor] = {}  # tree node -> drafter output (D,)
        self.tree_nodes: list[int] = []  # tree nodes in the cache after `length`, in order
        cfg = self.drafter.config
        self.fused = cfg.fused_layer_ids
        self.d2t = self.drafter.draft_token_ids() if cfg.draft_vocab_size else None
        self.dtype = kernel.dtype

    @classmethod
    def prefill(cls, runner, inputs: dict, target_out, bonus: int, capacity: int) -> DrafterSide:
        """`capacity`: drafter cache entries the request may need (text + new tokens + a tree)."""
        side = cls(runner.kernel(), runner.adapter.vocab_size, capacity)
        d = side.drafter
        ids = inputs["input_ids"][0]
        keep = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))[0].bool()
        if d.config.variant != "full_visual":
            keep &= ~target_out.visual_mask[0]
        positions = keep.nonzero()[:, 0]
        feats = side._fused(target_out, positions)
        k = side.kernel
        if d.config.variant == "full_visual":
            bonus_embed = k.embed(torch.tensor([bonus]))
            next_embeds = torch.cat([target_out.hidden_states[0][0, positions[1:]], bonus_embed])
        else:
            next_embeds = k.embed(torch.cat([ids[positions[1:]], torch.tensor([bonus])]))
        side._run_committed(feats, next_embeds)  # (n, D) each
        return side

    def _fused(self, target_out, index: torch.Tensor) -> torch.Tensor:
        """The fused target layers at sequence positions `index`: (len(index), n * Ht)."""
        return torch.cat([target_out.hidden_states[i][0, index] for i in self.fused], dim=-1)

    def _run_committed(self, target_feats: torch.Tensor, next_embeds: torch.Tensor) -> None:
        """Append committed positions (real target features) and reset the tree to its root."""
        n = next_embeds.shape[0]
        self.cache.truncate(self.length)  # drop last round's drafted nodes
        self.tree_nodes = []
        next_embeds = next_embeds.to(self.dtype)
        feats = self.kernel.project_features(target_feats, like=next_embeds)
        pos = torch.arange(self.length, self.length + n)
        mask = _causal(n, self.length, self.dtype)
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
        embeds = self.kernel.embed(torch.tensor([tree.tokens[n] for n in nodes]))
        pos = torch.full((len(nodes),), self.length - 1 + depth)
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
            len(nodes), self.length + len(slot), self.length, rows, cols, self.dtype
        )
        h = self.kernel.run(self.cache, embeds.to(self.dtype), feats, pos, mask[0, 0])  # (F, D)
        self.tree_nodes += nodes
        for i, n in enumerate(nodes):
            self.hidden[n] = h[i]
        return self._full_logits(h)

    def commit(self, verify_out, rows: list[int], emitted: list[int]) -> None:
        """Keep the accepted path: rows index the verify forward (root first); emitted = the
        accepted drafted tokens then the bonus, i.e. the token after each row."""
        self._run_committed(
            self._fused(verify_out, torch.tensor(rows)), self.kernel.embed(torch.tensor(emitted))
        )
