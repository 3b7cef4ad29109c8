"""The drafter's inputs from one target forward: one builder for training and the runner alike.

    >>> layers = target_layer_ids(drafter.config)               # target states to capture
    >>> out = adapter.forward(inputs, layers)
    >>> rows = drafter_rows(drafter.config, attention_mask, out.visual_mask)    # (B, T) bool
    >>> ask = prompt_mask(attention_mask, out.visual_mask, loss_mask)           # (B, T) bool
    >>> prefix = visual_prefix(drafter, input_ids, out.hidden_states, out.visual_mask, ask,
    ...                        grids=adapter.visual_grids(inputs))
    >>> prefix.embeds, prefix.features, prefix.valid      # (B, M, D), (B, M, D), (B, M)

Training (training/distill.py) and the edge role of the runner (inference/roles.py) both call
these, so a drafter sees at inference exactly what it was trained on (tests/test_compressor.py
checks it sample by sample). The visual positions are cut into blocks (an image, a video frame,
an any-res view) by the target adapter's `visual_grids`; for families that give none, each
contiguous run is one image whose grid `grid_for` guesses (square when the count is a perfect
square, else one row). A visual token
handed to the compressor is the pair [merged input embedding; projected fused target state] of
its position, the two streams the drafter's first layer reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from covspec.modeling.adapters import Grid, visual_runs
from covspec.modeling.compressor import grid_for, left_pad

if TYPE_CHECKING:
    from covspec.modeling.drafter import Drafter, DrafterConfig


@dataclass
class VisualPrefix:
    embeds: torch.Tensor  # (B, M, D) the prefix rows' input embeddings
    features: torch.Tensor  # (B, M, D) their features
    valid: torch.Tensor  # (B, M) bool, left-padded
    choice: torch.Tensor  # (B,) the gate's option index
    probs: torch.Tensor  # (B, K) gate probabilities
    cost: torch.Tensor  # (B,) expected prefix tokens per visual token under `probs`
    weight: torch.Tensor  # (B,) straight-through value of the gate's choice (1.0 forward)
    scores: torch.Tensor  # (B, K) raw gate outputs (a critic's: predicted loss per option)

    @property
    def tokens(self) -> torch.Tensor:
        """(B, M, 2D): what crosses the link, [embedding; feature] per row."""
        return torch.cat([self.embeds, self.features], -1)


def target_layer_ids(cfg: DrafterConfig, extra: tuple[int, ...] = ()) -> list[int]:
    """Target hidden states the drafter needs: its fused layers, plus the merged input
    embeddings (HF index 0) when it carries a visual prefix."""
    layers = set(cfg.fused_layer_ids) | set(extra)
    if cfg.visual_prefix != "none":
        layers.add(0)
    return sorted(layers)


def drafter_rows(
    cfg: DrafterConfig, attention_mask: torch.Tensor, visual_mask: torch.Tensor
) -> torch.Tensor:
    """(B, T) positions the drafter runs on: every position for a full prefix; text for a
    compressed one; for a drafter without visual prefix (visual-token-free, text-only) the text
    outside the visual block: separators between images or frames are dropped too, so its
    cache and inputs do not grow with the number of frames (Sparrow's point about video)."""
    keep = attention_mask.bool()
    if cfg.visual_prefix == "full":
        return keep
    keep = keep & ~visual_mask
    if cfg.visual_prefix == "none":
        seen = visual_mask.long()
        inside = (seen.cumsum(1) > 0) & (seen.flip(1).cumsum(1).flip(1) > 0)  # between runs
        keep &= ~inside
    return keep


def prompt_mask(
    attention_mask: torch.Tensor,  # (B, T)
    visual_mask: torch.Tensor,  # (B, T)
    loss_mask: torch.Tensor | None = None,  # (B, T) answer tokens (training); None: all prompt
) -> torch.Tensor:
    """(B, T) the question's text positions: before the first answer token, never visual."""
    ask = attention_mask.bool() & ~visual_mask
    if loss_mask is not None:
        ask &= loss_mask.long().cumsum(1) == 0
    return ask


image_runs = visual_runs  # (T,) bool -> [(start, length)] of each contiguous visual run


def visual_prefix(
    drafter: Drafter,
    input_ids: torch.Tensor,  # (B, T)
    hidden_states,  # HF-indexed target states: [0] merged embeddings (B, T, D), fused ids
    visual_mask: torch.Tensor,  # (B, T)
    ask: torch.Tensor,  # (B, T) the question's positions (`prompt_mask`)
    temperature: float | None = None,
    force: int | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    grids: list[list[Grid]] | None = None,
) -> VisualPrefix:
    """The compressed visual prefix of every sample (`temperature`: Gumbel-softmax training;
    None: the gate's pick; `force`: one option index for all, or a (B,) tensor of them;
    `generator`: the Gumbel noise's stream; `grids`: each sample's visual blocks from the
    target adapter's `visual_grids`, None when every run is one square image)."""
    cfg = drafter.config
    if cfg.visual_prefix != "compressed":
        raise ValueError(f"visual_prefix is {cfg.visual_prefix!r}; only 'compressed' builds one")
    d = cfg.hidden_size
    comp = drafter.compressor
    merged = hidden_states[0]  # (B, T, D)
    fused = torch.cat([hidden_states[i] for i in cfg.fused_layer_ids], -1)  # (B, T, n*Ht)
    embeds = drafter.embed(input_ids)  # (B, T, D)
    prompts, visual, spans = [], [], []
    for b in range(input_ids.shape[0]):
        if not ask[b].any():
            raise ValueError(f"sample {b} has no question text to condition the gate on")
        prompts.append(embeds[b, ask[b]].mean(0))  # (D,)
        runs = image_runs(visual_mask[b])  # none in a text-only turn: an empty prefix
        spans.append(block_spans(runs, None if grids is None else grids[b]))
        seen = merged[b, visual_mask[b]].to(drafter.dtype)  # (N, D)
        visual.append(seen.mean(0) if runs else seen.new_zeros(seen.shape[-1]))  # gate's summary
    prompt = torch.stack(prompts).to(drafter.dtype)
    choice, probs, cost, weight, scores = comp.choose(
        prompt,
        torch.stack(visual).to(prompt),
        [[g for _, g in s] for s in spans],
        temperature,
        force,
        generator,
    )
    rows = [
        _sample_rows(drafter, int(c), merged[b], fused[b], spans[b], prompt[b])
        for b, c in enumerate(choice)
    ]
    tokens, valid = left_pad(rows, 2 * d, prompt)
    return VisualPrefix(
        tokens[..., :d], tokens[..., d:], valid, choice, probs, cost, weight, scores
    )  # fmt: skip


def block_spans(runs: list[tuple[int, int]], grids: list[Grid] | None) -> list[tuple[slice, Grid]]:
    """(positions, grid) of every visual block: each run one square-guessed image without
    `grids`, else the runs cut into the given blocks in order (video frames, any-res views)."""
    if grids is None:
        return [(slice(start, start + n), grid_for(n)) for start, n in runs]
    spans, blocks = [], list(grids)
    for start, n in runs:
        end = start + n
        while start < end:
            if not blocks:
                raise ValueError(f"visual run ending at {end} is longer than its grids describe")
            h, w = blocks.pop(0)
            spans.append((slice(start, start + h * w), (h, w)))
            start += h * w
        if start != end:
            raise ValueError(f"visual grids overrun a run ending at {end} (by {start - end})")
    if blocks:
        raise ValueError(f"{len(blocks)} visual grid(s) left over after every visual run")
    return spans


def _sample_rows(
    drafter: Drafter,
    option: int,
    merged: torch.Tensor,  # (T, D)
    fused: torch.Tensor,  # (T, n*Ht)
    spans: list[tuple[slice, tuple[int, int]]],
    prompt: torch.Tensor,  # (D,)
) -> torch.Tensor:
    """One sample's prefix rows (m, 2D), computing only what the chosen option reads."""
    comp, d = drafter.compressor, drafter.config.hidden_size
    kind = comp.parsed[option][0]
    if kind == "none" or not spans:  # the text-only branch, or nothing to compress
        return merged.new_zeros(0, 2 * d, dtype=drafter.dtype)
    if kind in ("pool", "tpool") and not drafter.config.feature_codec_rank:
        # averaging commutes with the linear feature projection: average the raw target
        # states, then project the few averaged rows instead of every visual token
        raw = [(torch.cat([merged[s].to(drafter.dtype), fused[s]], -1), g) for s, g in spans]
        avg = comp.primitive_rows(option, raw, prompt)  # (m, D + n*Ht)
        e = avg[:, :d]
        return comp.tag(option, torch.cat([e, drafter.project_features(avg[:, d:], like=e)], -1))
    imgs = []
    for s, g in spans:
        e = merged[s].to(drafter.dtype)  # (N, D)
        imgs.append((torch.cat([e, drafter.project_features(fused[s], like=e)], -1), g))
    return comp.sample_rows(option, imgs, prompt)
