"""The elastic visual compressor (SpecVLM): prune / pool / conv / resampler and a text-only branch,
chosen per input by a question-aware gate.

    >>> cfg = VisualCompressorConfig(hidden_size=256, options=["none", "pool:2", "resampler:8"])
    >>> comp = VisualCompressor(cfg)
    >>> out = comp(images, prompt, temperature=1.0)   # training: Gumbel-softmax straight-through
    >>> out = comp(images, prompt)                      # inference: argmax
    >>> out.tokens, out.valid, out.choice               # (B, M, 2D), (B, M), (B,)
    >>> choice, *_ = comp.choose(prompt, visual, grids)  # the gate alone, before any row
    >>> rows = comp.sample_rows(int(choice[0]), images[0], prompt[0])   # (m, 2D), one option

`images[b]` lists sample b's images as (tokens (N, 2D), grid (h, w)) with N == h * w; a token
is the drafter's pair [embedding; projected target feature] of one visual position, so one
primitive compresses both streams the drafter reads. `prompt` (B, D) is the pooled embedding of
the question. Options, as strings so a recipe can list them:

- `none`: the text-only branch, zero tokens;
- `prune:R`: the top ceil(R * N) tokens by a learned question-aware score, in grid order;
- `pool:S`: S x S average pooling over the patch grid (ceil mode: odd grids keep their edges);
- `conv:S`: a learned depthwise S x S stride-S convolution then a pointwise one (starts as pooling);
- `resampler:Q`: Q learned queries, shifted by the prompt, cross-attending to the tokens;
- `tpool:K`: temporal average pooling: each run of consecutive images of one grid (a video's
  frames) is cut into chunks of K, averaged position by position (one grid per chunk).

Two gates (`gate` in the config). `gumbel` learns through `weight`, the straight-through value
of each sample's hard Gumbel choice (1.0 forward, the soft probability's gradient backward):
the trainer multiplies it with that sample's distillation loss relative to the batch
(training/distill.py), since scaling the prefix rows themselves would teach nothing through the
drafter's RMS norms. `critic` outputs each option's predicted distillation loss (`scores`);
training runs every sample under two uniformly drawn options and regresses the measured loss
gap, so no option starves, and inference picks the lowest predicted loss plus `cost_weight` x
prefix rows per visual token.

`choose` and `sample_rows` split `forward` so the drafter's input builder
(modeling/drafter_inputs.py) computes only the chosen option's rows, averaging raw target states
before projecting them where the option only averages. `option_embedding: true` adds a learned
row per option to its rows (a gated compressor only). `set_cost_weight` moves a critic gate
along its tau / rows curve after training (`covspec bench --gate-cost-weight`).

Samples are left-padded to the batch's longest prefix (`valid` marks real rows): the drafter's
rotary positions are relative, so a prefix always ends right before the text it precedes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

DEFAULT_OPTIONS = ("none", "prune:0.25", "pool:2", "pool:4", "conv:2", "resampler:8")
KINDS = ("none", "prune", "pool", "conv", "resampler", "tpool")
GATES = ("gumbel", "critic")


def parse_option(option: str) -> tuple[str, float]:
    """'pool:2' -> ('pool', 2.0); refuses unknown kinds and out-of-range arguments."""
    kind, _, arg = option.partition(":")
    if kind not in KINDS:
        raise ValueError(f"compressor option {option!r}: kind must be one of {KINDS}")
    if kind == "none":
        if arg:
            raise ValueError(f"compressor option {option!r}: 'none' takes no argument")
        return kind, 0.0
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"compressor option {option!r} needs a number after ':'") from None
    if kind == "prune" and not 0.0 < value <= 1.0:
        raise ValueError(f"compressor option {option!r}: keep ratio must be in (0, 1]")
    if kind != "prune" and (value < 1 or value != int(value)):
        raise ValueError(f"compressor option {option!r}: needs a whole number >= 1")
    return kind, value


def grid_for(n: int) -> tuple[int, int]:
    """The patch grid of an image of n tokens when the family does not say: square when n is a
    perfect square (LLaVA-1.5, Gemma 3), else one row (pooling then runs along the sequence)."""
    side = math.isqrt(n)
    return (side, side) if side * side == n else (1, n)


def option_tokens(option: str, grid: tuple[int, int]) -> int:
    """How many prefix tokens `option` makes of one image with this grid."""
    kind, value = parse_option(option)
    h, w = grid
    if kind == "none":
        return 0
    if kind == "prune":
        return max(1, math.ceil(value * h * w))
    if kind in ("pool", "conv"):
        s = int(value)
        return math.ceil(h / s) * math.ceil(w / s)
    if kind == "tpool":
        return h * w  # per chunk of frames; `sample_tokens` counts the chunks
    return int(value)


def frame_chunks(grids: Sequence[tuple[int, int]], k: int) -> list[list[int]]:
    """Image indices grouped for `tpool:k`: consecutive images of one grid, k at a time."""
    chunks: list[list[int]] = []
    for i, g in enumerate(grids):
        last = chunks[-1] if chunks else None
        if last is not None and len(last) < k and grids[last[-1]] == g and last[-1] == i - 1:
            last.append(i)
        else:
            chunks.append([i])
    return chunks


def sample_tokens(option: str, grids: Sequence[tuple[int, int]]) -> int:
    """How many prefix tokens `option` makes of one sample's images."""
    kind, value = parse_option(option)
    if kind == "tpool":
        return sum(grids[c[0]][0] * grids[c[0]][1] for c in frame_chunks(grids, int(value)))
    return sum(option_tokens(option, g) for g in grids)


class VisualCompressorConfig(PretrainedConfig):
    model_type = "covspec_visual_compressor"

    def __init__(
        self,
        hidden_size: int = 4096,
        options: Sequence[str] = DEFAULT_OPTIONS,
        gate_hidden_size: int = 128,
        score_size: int = 64,
        resampler_heads: int = 4,
        gate: str = "gumbel",
        cost_weight: float = 0.0,
        option_embedding: bool = False,
        **kwargs,
    ) -> None:
        options = list(options)
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if cost_weight < 0:
            raise ValueError(f"cost_weight must be >= 0, got {cost_weight}")
        if not options:
            raise ValueError("compressor options must not be empty")
        for option in options:
            parse_option(option)
        if len(set(options)) != len(options):
            raise ValueError(f"compressor options repeat an entry: {options}")
        if min(gate_hidden_size, score_size, resampler_heads) < 1:
            raise ValueError(
                "gate_hidden_size, score_size and resampler_heads must be >= 1, got "
                f"{gate_hidden_size}, {score_size}, {resampler_heads}"
            )
        if (2 * hidden_size) % resampler_heads:
            raise ValueError(
                f"resampler_heads {resampler_heads} must divide 2 * hidden_size {2 * hidden_size}"
            )
        self.hidden_size = hidden_size
        self.options = options
        self.gate_hidden_size = gate_hidden_size
        self.score_size = score_size
        self.resampler_heads = resampler_heads
        self.gate = gate
        self.cost_weight = float(cost_weight)  # the critic's price of a prefix row at inference
        self.option_embedding = bool(option_embedding)
        super().__init__(**kwargs)


@dataclass
class CompressorOutput:
    tokens: torch.Tensor  # (B, M, 2D) left-padded prefix
    valid: torch.Tensor  # (B, M) bool
    choice: torch.Tensor  # (B,) option index
    probs: torch.Tensor  # (B, K) gate probabilities (softmax of the logits)
    cost: torch.Tensor  # (B,) expected prefix tokens / visual tokens under `probs`
    weight: torch.Tensor  # (B,) straight-through value of the choice: 1.0, gradient to the gate
    scores: torch.Tensor  # (B, K) raw gate outputs: logits, or the critic's predicted losses


class _Conv(nn.Module):
    """Depthwise S x S stride-S convolution then pointwise, on the (2D, h, w) grid."""

    def __init__(self, width: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.depthwise = nn.Conv2d(width, width, stride, stride=stride, groups=width)
        self.pointwise = nn.Conv2d(width, width, 1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # starts as average pooling, so joint training begins from a working prefix
        self.depthwise.weight.fill_(1.0 / self.stride**2)
        self.depthwise.bias.zero_()
        self.pointwise.weight.copy_(torch.eye(self.pointwise.weight.shape[0])[..., None, None])
        self.pointwise.bias.zero_()

    def forward(self, grid: torch.Tensor) -> torch.Tensor:  # (2D, h, w) -> (m, 2D)
        s = self.stride
        h, w = grid.shape[-2:]
        # replicate-pad to a multiple of the stride: an odd edge is averaged with itself
        grid = F.pad(grid[None], (0, -w % s, 0, -h % s), mode="replicate")
        return self.pointwise(self.depthwise(grid))[0].flatten(1).T


class _Resampler(nn.Module):
    """Q learned queries (plus a projection of the prompt) attending over the tokens."""

    def __init__(self, width: int, prompt_width: int, queries: int, heads: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.empty(queries, width))
        self.from_prompt = nn.Linear(prompt_width, width, bias=False)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # values and output start as the identity: each query returns a weighted mean of tokens
        width = self.queries.shape[1]
        self.queries.normal_(0.0, 1.0 / math.sqrt(width))
        self.from_prompt.weight.zero_()
        eye = torch.eye(width)
        self.attn.in_proj_weight.normal_(0.0, 1.0 / math.sqrt(width))
        self.attn.in_proj_weight[2 * width :].copy_(eye)
        self.attn.in_proj_bias.zero_()
        self.attn.out_proj.weight.copy_(eye)
        self.attn.out_proj.bias.zero_()

    def forward(self, tokens: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """`self.attn(q, tokens, tokens)` with its key and value projections moved onto the Q
        queries (weight absorption): the N tokens are never projected, so the two N x W x W
        projections become Q x W x W ones (Q = 8 against N = 81 here); equal in value."""
        a = self.attn
        heads, width = a.num_heads, self.queries.shape[1]
        w_q, w_k, w_v = a.in_proj_weight.chunk(3)  # (W, W) each
        b_q, _, b_v = a.in_proj_bias.chunk(3)  # the key bias shifts every score of a query alike
        q = F.linear(self.queries + self.from_prompt(prompt), w_q, b_q)  # (Q, W)
        q = q.view(-1, heads, width // heads)  # (Q, H, dh)
        qk = torch.einsum("qhd,hdw->hqw", q, w_k.view(heads, -1, width))  # (H, Q, W)
        scores = qk @ tokens.T.to(qk) / math.sqrt(width // heads)  # (H, Q, N)
        mixed = scores.softmax(-1) @ tokens.to(qk)  # (H, Q, W): attention-weighted tokens
        v = torch.einsum("hqw,hdw->qhd", mixed, w_v.view(heads, -1, width))  # (Q, H, dh)
        return a.out_proj(v.flatten(1) + b_v)  # (Q, W)


class _Scorer(nn.Module):
    """Question-aware token score: the prompt's query against each token's key."""

    def __init__(self, width: int, prompt_width: int, size: int) -> None:
        super().__init__()
        self.query = nn.Linear(prompt_width, size, bias=False)
        self.key = nn.Linear(width, size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.query.weight, 0.0, 1.0 / math.sqrt(self.query.in_features))
        nn.init.normal_(self.key.weight, 0.0, 1.0 / math.sqrt(self.key.in_features))

    def forward(self, tokens: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / math.sqrt(self.key.out_features)
        return self.key(tokens) @ self.query(prompt) * scale  # (N,)


class _Gate(nn.Module):
    """Logits over the options from [pooled prompt; mean visual embedding]."""

    def __init__(self, prompt_width: int, hidden: int, options: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * prompt_width, hidden), nn.GELU(), nn.Linear(hidden, options)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        first, _, last = self.net
        nn.init.normal_(first.weight, 0.0, 1.0 / math.sqrt(first.in_features))
        first.bias.zero_()
        last.weight.zero_()  # uniform choice at the start: every option gets trained
        last.bias.zero_()

    def forward(self, summary: torch.Tensor) -> torch.Tensor:  # (B, 2D) -> (B, K)
        return self.net(summary)


class VisualCompressor(PreTrainedModel):
    config_class = VisualCompressorConfig
    base_model_prefix = "compressor"
    main_input_name = "prompt"

    def __init__(self, config: VisualCompressorConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.parsed = [parse_option(o) for o in config.options]
        if len(config.options) > 1:  # one option is a fixed primitive: nothing to choose
            self.gate = _Gate(d, config.gate_hidden_size, len(config.options))
        # a learned row bias per option: through the drafter's key projection it sets how much
        # attention a prefix of 8 or of 81 rows draws (zero at the start: no bias)
        self.option_embedding = None
        if config.option_embedding and len(config.options) > 1:
            self.option_embedding = nn.Parameter(torch.zeros(len(config.options), 2 * d))
        if any(kind == "prune" for kind, _ in self.parsed):
            self.scorer = _Scorer(2 * d, d, config.score_size)
        # ModuleDicts keyed by the option string's argument: "conv:2" -> convs["2"]
        self.convs = nn.ModuleDict(
            {str(int(v)): _Conv(2 * d, int(v)) for k, v in self.parsed if k == "conv"}
        )
        self.resamplers = nn.ModuleDict(
            {
                str(int(v)): _Resampler(2 * d, d, int(v), config.resampler_heads)
                for k, v in self.parsed
                if k == "resampler"
            }
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (_Conv, _Resampler, _Scorer, _Gate)):
            module.reset_parameters()
        if module is self and self.option_embedding is not None:
            nn.init.zeros_(self.option_embedding)

    def compress(
        self, option: int, tokens: torch.Tensor, grid: tuple[int, int], prompt: torch.Tensor
    ) -> torch.Tensor:
        """One image, one option: tokens (N, 2D) in grid order, prompt (D,) -> (m, 2D)."""
        kind, value = self.parsed[option]
        h, w = grid
        if tokens.shape[0] != h * w:
            raise ValueError(f"image has {tokens.shape[0]} visual tokens, its grid {grid} {h * w}")
        if kind == "none":
            return tokens[:0]
        if kind == "tpool":  # one image is a chunk of its own
            return tokens
        if kind == "prune":
            scores = self.scorer(tokens, prompt)  # (N,)
            keep = torch.topk(scores, option_tokens(self.config.options[option], grid)).indices
            keep = keep.sort().values
            # straight-through on the score, so the scorer learns which tokens the loss wants
            return tokens[keep] * (1.0 + (scores[keep] - scores[keep].detach()))[:, None]
        if kind == "pool":
            s = int(value)
            x = tokens.T.reshape(1, -1, h, w)  # (1, 2D, h, w)
            return F.avg_pool2d(x, s, s, ceil_mode=True)[0].flatten(1).T
        if kind == "conv":
            return self.convs[str(int(value))](tokens.T.reshape(-1, h, w))
        return self.resamplers[str(int(value))](tokens, prompt)

    def forward(
        self,
        images: Sequence[Sequence[tuple[torch.Tensor, tuple[int, int]]]],
        prompt: torch.Tensor,  # (B, D)
        temperature: float | None = None,
        force: int | torch.Tensor | None = None,
    ) -> CompressorOutput:
        """The gate's choice (`choose`) then each sample's rows under it (`sample_rows`)."""
        b, d = prompt.shape
        if len(images) != b:
            raise ValueError(f"{len(images)} image lists for a batch of {b} prompts")
        visual = torch.stack(  # (B, D); a sample without images (a text turn) sums nothing
            [torch.cat([t[:, :d] for t, _ in imgs]).mean(0) if imgs else prompt.new_zeros(d)
             for imgs in images]
        )  # fmt: skip
        grids = [[g for _, g in imgs] for imgs in images]
        gate = self.choose(prompt, visual, grids, temperature, force)
        rows = [
            self.sample_rows(int(c), imgs, p)
            for c, imgs, p in zip(gate[0], images, prompt, strict=True)
        ]
        tokens, valid = left_pad(rows, 2 * d, prompt)
        return CompressorOutput(tokens, valid, *gate)

    def choose(
        self,
        prompt: torch.Tensor,  # (B, D) pooled question embedding
        visual: torch.Tensor,  # (B, D) mean merged embedding of the sample's visual tokens
        grids: Sequence[Sequence[tuple[int, int]]],  # each sample's image grids
        temperature: float | None = None,
        force: int | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """(choice (B,), probs (B, K), cost (B,), weight (B,), scores (B, K)), before any row is
        made, so a caller computes only the chosen option. `temperature` set: Gumbel-softmax
        straight-through (a gumbel gate in training); None: the gate's pick. `force` picks the
        option index for every sample (an int) or per sample (a (B,) tensor): a fixed-primitive
        evaluation, or a critic's exploration. `generator`: the Gumbel noise's own stream (on
        the logits' device), so a resumed training run samples what it would have."""
        b = prompt.shape[0]
        k = len(self.parsed)
        share = torch.tensor(
            [
                [
                    sample_tokens(o, g) / max(1, sum(h * w for h, w in g))
                    for o in self.config.options
                ]
                for g in grids
            ],
            dtype=torch.float32,
            device=prompt.device,
        )  # (B, K) prefix rows per visual token
        if k > 1:
            scores = self.gate(torch.cat([prompt, visual.to(prompt)], -1)).float()
        else:
            scores = share.new_zeros(b, 1)
        # a critic predicts each option's distillation loss: the pick minimises loss + price
        logits = -(scores + self.config.cost_weight * share) if self.critic else scores
        probs = logits.softmax(-1)  # (B, K)
        if force is not None:
            forced = torch.as_tensor(force, device=probs.device).expand(b)
            if bool(((forced < 0) | (forced >= k)).any()):
                raise ValueError(f"force must index one of the {k} options, got {force}")
            weights = F.one_hot(forced, k).to(probs)
        elif temperature is not None and not self.critic:
            weights = gumbel_hard(logits, temperature, generator)
        else:
            weights = F.one_hot(logits.argmax(-1), k).to(probs)
        empty = torch.tensor([not g for g in grids], device=probs.device)  # (B,) no visual token
        if force is None and "none" in self.config.options and bool(empty.any()):
            # nothing to compress: the text-only branch, whatever the gate would have priced
            none = F.one_hot(torch.tensor(self.config.options.index("none")), k).to(weights)
            weights = torch.where(empty[:, None], none, weights)
        choice = weights.argmax(-1)  # (B,)
        weight = weights.gather(1, choice[:, None])[:, 0]  # (B,)
        return choice, probs, (probs * share).sum(-1), weight, scores

    def sample_rows(self, option: int, imgs, prompt: torch.Tensor) -> torch.Tensor:
        """One sample's prefix rows (m, 2D) under `option`: its images' rows, option tagged
        (none for a sample without images)."""
        if not imgs:
            return prompt.new_zeros(0, 2 * prompt.shape[-1])
        return self.tag(option, self.primitive_rows(option, imgs, prompt))

    def tag(self, option: int, rows: torch.Tensor) -> torch.Tensor:
        """Rows (m, 2D) plus the option's learned embedding, when the config has them."""
        if self.option_embedding is None:
            return rows
        return rows + self.option_embedding[option].to(rows)

    def primitive_rows(self, option: int, imgs, prompt: torch.Tensor) -> torch.Tensor:
        """The primitive alone over a sample's images. `pool`, `tpool` and `none` only average,
        so they take tokens of any width (the caller may average before projecting)."""
        kind, value = self.parsed[option]
        if kind == "tpool":  # (chunks * h * w, 2D): frames averaged position by position
            chunks = frame_chunks([g for _, g in imgs], int(value))
            return torch.cat([torch.stack([imgs[j][0] for j in c]).mean(0) for c in chunks])
        return torch.cat([self.compress(option, t, g, prompt) for t, g in imgs])

    @property
    def critic(self) -> bool:
        return self.config.gate == "critic" and len(self.parsed) > 1

    def set_cost_weight(self, cost_weight: float) -> None:
        """Move a critic gate's operating point: the price of a prefix row per visual token
        its pick adds to the predicted loss. The critic never saw the price in training, so
        any weight >= 0 is a valid point on the same drafter's tau / rows curve; a Gumbel
        gate learned its price and picks by its logits alone, so it refuses."""
        if not self.critic:
            raise ValueError(
                f"only a critic gate over several options takes a cost weight at inference; "
                f"this compressor has gate {self.config.gate!r} over {self.config.options}"
            )
        if not math.isfinite(cost_weight) or cost_weight < 0:
            raise ValueError(f"cost_weight must be a finite number >= 0, got {cost_weight}")
        self.config.cost_weight = float(cost_weight)


def gumbel_hard(
    logits: torch.Tensor, tau: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`F.gumbel_softmax(logits, tau, hard=True)` with the noise drawn from `generator`:
    a one-hot sample in value, the soft sample's gradient (straight-through). (B, K)"""
    noise = -torch.empty_like(logits).exponential_(generator=generator).log()  # Gumbel(0, 1)
    soft = ((logits + noise) / tau).softmax(-1)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft)
    return hard - soft.detach() + soft


def left_pad(rows: list[torch.Tensor], width: int, like: torch.Tensor):
    """Stack (m_b, W) rows left-padded with zeros: (B, M, W) and the (B, M) valid mask."""
    m = max((r.shape[0] for r in rows), default=0)
    out = like.new_zeros(len(rows), m, width)
    valid = torch.zeros(len(rows), m, dtype=torch.bool, device=like.device)
    for i, r in enumerate(rows):
        if r.shape[0]:
            out[i, m - r.shape[0] :] = r.to(out.dtype)
            valid[i, m - r.shape[0] :] = True
    return out, valid
