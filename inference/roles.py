"""The two roles of device-edge speculative decoding and what one request carries between them.

    >>> edge, device = EdgeRole(model, processor, drafter), DeviceRole(drafter, vocab_size)
    >>> req = Request(image, "Describe the image.", max_new_tokens=96)
    >>> down = edge.prefill(req)                 # FeatureDownlink: prompt features + first token
    >>> device.prefill(req, down)
    >>> up = device.draft(req, DraftSettings())  # DraftUpload: the tree the device grew
    >>> result = edge.verify(req, up)            # VerifyResult: accepted path, bonus, features
    >>> device.commit(req, result)               # both sides now hold the same tokens

The edge owns the target and its KV cache, plus the edge half of the drafter's feature path
(inference/features.py); the device owns the drafter and its cache. They share nothing but the
typed messages of inference/messages.py, whose sizes the link accounting adds up. How the edge
decides what to accept is a `VerifyRule` (exact greedy, rejection sampling, later a learned
lossy head), so a new rule plugs in without touching the protocols (inference/protocols.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from covspec.inference.drafting import DrafterSide, keep_cache_positions
from covspec.inference.features import FeatureDecoder, FeatureEncoder
from covspec.inference.messages import (
    DraftUpload,
    FeatureDownlink,
    FeaturePayload,
    TokenStream,
    VerifyResult,
)
from covspec.inference.tree import (
    DraftSettings,
    DraftTree,
    grow,
    tree_attention_mask,
    verify_greedy,
    verify_sampling,
)
from covspec.inference.vlm_drafter import VLMDrafterSide
from covspec.modeling.drafter_inputs import drafter_rows, prompt_mask, visual_prefix


def now(device: torch.device | None = None) -> float:
    """perf_counter, after the device's queued kernels finished (CUDA runs asynchronously)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Request:
    """One request's state, shared by the protocol and both roles (in a real deployment each
    side would keep its own half; the fields say whose they are)."""

    image: object  # PIL image, Media (several images, video frames) or None
    prompt: str
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    tokens: list[int] = field(default_factory=list)  # emitted so far, both sides agree
    # edge: the target's cache and how many positions of it are committed
    cache: object = None
    past: int = 0
    rope_offset: int = 0  # text position minus sequence index after the prompt (M-RoPE)
    prompt_tokens: int = 0
    visual_tokens: int = 0
    prefix_tokens: int = 0  # edge: compressed visual prefix rows sent to the device
    gate_choice: str | None = None  # edge: the compressor option its gate picked
    # device: its drafter state and the tree of the round in flight
    source: object = None
    tree: DraftTree | None = None
    order: list[int] | None = None
    generator: torch.Generator | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # measured wall time per phase
    device: torch.device | None = None  # where the models run (timing synchronises CUDA)
    # what the device uploads besides the tree, for an acceptance head on the edge
    upload_confidence: bool = False
    upload_hidden: bool = False

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def timed(self, phase: str, start: float) -> float:
        """Add the wall time since `start` to `phase`; returns it."""
        elapsed = now(self.device) - start
        self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed
        return elapsed


class VerifyRule(Protocol):
    """Which drafted path the edge accepts, and the token it emits after it."""

    needs_draft_probs: bool

    def first_token(self, logits: torch.Tensor, req: Request) -> int: ...  # (V,)

    def __call__(
        self, tree: DraftTree, order: list[int], logits: torch.Tensor, out, req: Request
    ) -> tuple[list[int], int]: ...  # logits (n, V) in `order`; out: the TargetOutput


class GreedyRule:
    """Exact greedy verification: the tokens of `generate(do_sample=False)`."""

    needs_draft_probs = False

    def first_token(self, logits: torch.Tensor, req: Request) -> int:
        return int(logits.argmax())

    def __call__(self, tree, order, logits, out, req):
        return verify_greedy(tree, order, logits)


class SamplingRule:
    """Multi-draft rejection sampling: lossless in distribution at the request's temperature."""

    needs_draft_probs = True

    def first_token(self, logits: torch.Tensor, req: Request) -> int:
        probs = target_probs(logits[None], req.temperature, req.top_p)[0]
        return int(torch.multinomial(probs.cpu(), 1, generator=req.generator))

    def __call__(self, tree, order, logits, out, req):
        # the request's generator lives on the CPU: so do the (n, V) probabilities it draws from
        probs = target_probs(logits, req.temperature, req.top_p).cpu()
        return verify_sampling(tree, order, probs, req.generator)


def target_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p.masked_fill(drop, 0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def rule_for(req: Request) -> VerifyRule:
    return SamplingRule() if req.sampling else GreedyRule()


def tree_from_upload(root: int, up: DraftUpload) -> tuple[DraftTree, list[int]]:
    """Rebuild the drafted tree on the edge: node i+1 is upload entry i, the root is node 0."""
    tree = DraftTree(root_token=root)
    parents = up.parents.tolist() if not up.chain else list(range(-1, len(up.tokens) - 1))
    for tok, parent in zip(up.tokens.tolist(), parents, strict=True):
        tree.add(parent + 1, tok, 0.0)
    if up.draft_probs is not None:
        for node, row in zip(up.prob_nodes.tolist(), up.draft_probs, strict=True):
            tree.draft_probs[node] = row.float()
    if up.confidence is not None:
        for i, (logq, entropy) in enumerate(up.confidence.float().tolist()):
            tree.confidence[i + 1] = (logq, entropy)
    return tree, list(range(len(tree)))


class EdgeRole:
    """The target: prefill, tree verification, and the edge half of the drafter's features."""

    def __init__(self, runner, encoder: FeatureEncoder | None, rule: VerifyRule | None = None):
        self.runner = runner  # SpecRunner: model, processor, adapter, layers, suppression, eos
        self.encoder = encoder
        self.rule = rule

    def _rule(self, req: Request) -> VerifyRule:
        return self.rule or rule_for(req)

    @torch.inference_mode()
    def prefill(self, req: Request) -> FeatureDownlink:
        r = self.runner
        start = now(req.device)
        inputs = r.encode(req.image, req.prompt)
        req.timed("encode", start)
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError(f"batch size must be 1, got {inputs['input_ids'].shape[0]}")
        req.prompt_tokens = inputs["input_ids"].shape[1]
        r.check_length(req.prompt_tokens, req.max_new_tokens)
        start = now(req.device)
        out = r.adapter.forward(inputs, r.layers, use_cache=True, logits_to_keep=1)
        first = self._rule(req).first_token(r.suppress(out.logits[0, -1]), req)
        req.cache, req.past = out.cache, req.prompt_tokens
        req.rope_offset = r.adapter.rope_offset(inputs)
        req.visual_tokens = int(out.visual_mask.sum())
        down = self._prompt_features(req, inputs, out, first)
        req.timed("prefill", start)
        return down

    def _prompt_features(self, req: Request, inputs: dict, out, first: int) -> FeatureDownlink:
        ids = inputs["input_ids"][0]
        if self.runner.device_vlm is not None:  # a small-VLM drafter needs only the token
            return FeatureDownlink(ids[:0], FeaturePayload(), first)
        attention = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
        if self.runner.drafter is None:  # no drafter to feed (edge-only generation)
            return FeatureDownlink(ids[:0], FeaturePayload(), first)
        cfg = self.runner.drafter.config
        positions = drafter_rows(cfg, attention, out.visual_mask)[0].nonzero()[:, 0]
        visual = FeaturePayload()
        if cfg.visual_prefix == "full":  # the MSD-style baseline also needs the merged embeddings
            rows = out.visual_mask[0, positions]
            merged = out.hidden_states[0][0, positions[rows]]  # (V, D)
            visual = FeaturePayload(values=merged.to(self.encoder.wire_dtype))  # as sent
        elif cfg.visual_prefix == "compressed":  # the edge runs the compressor, sends its rows once
            ask = prompt_mask(attention, out.visual_mask)
            grids = self.runner.adapter.visual_grids(inputs)
            prefix = visual_prefix(
                self.runner.drafter, inputs["input_ids"], out.hidden_states, out.visual_mask, ask,
                grids=grids,
            )  # fmt: skip
            req.prefix_tokens = int(prefix.valid.sum())
            req.gate_choice = self.runner.drafter.compressor.config.options[int(prefix.choice[0])]
            visual = FeaturePayload(values=prefix.tokens[0].to(self.encoder.wire_dtype))
        return FeatureDownlink(ids[positions], self._features(out, positions), first, visual)

    def _features(self, out, rows: torch.Tensor) -> FeaturePayload:
        if self.encoder is None:
            return FeaturePayload()
        fused = torch.cat([out.hidden_states[i][0, rows] for i in self.runner.fused_ids], -1)
        return self.encoder(fused)

    @torch.inference_mode()
    def verify(self, req: Request, up: DraftUpload) -> VerifyResult:
        """One target forward over the root and the uploaded nodes; keep the accepted path."""
        r = self.runner
        start = now(req.device)
        tree, order = tree_from_upload(req.tokens[-1], up)
        dev = r.device
        ids = torch.tensor([tree.tokens], device=dev)
        depths = torch.tensor([[req.past + d for d in tree.depths]], device=dev)
        pos = r.adapter.text_position_ids(depths, req.rope_offset)
        mask = tree_attention_mask(tree, order, req.past, r.model.dtype, dev)
        rule = self._rule(req)
        layers = r.layers
        if getattr(rule, "needs_final_state", False):  # an acceptance rule reads layer L
            rule.target_layer, rule.eos = r.adapter.num_layers, r.eos
            layers = sorted({*layers, rule.target_layer})
        out = r.adapter.text_forward(
            ids, layers, cache=req.cache, position_ids=pos, attention_mask=mask, use_cache=True
        )
        logits = r.suppress(out.logits[0])  # (n, V)
        path, bonus = rule(tree, order, logits, out, req)
        rows = [0, *path]
        keep_cache_positions(req.cache, req.past, rows)
        req.past += len(rows)
        result = VerifyResult(
            accepted=torch.tensor([n - 1 for n in path], dtype=torch.long),
            bonus=bonus,
            features=self._features(out, torch.tensor(rows, device=dev)),
            chain=up.chain,
            drafted=len(up.tokens),
        )
        req.timed("verify", start)
        return result

    @torch.inference_mode()
    def step(self, req: Request) -> TokenStream:
        """`edge_only`: one plain decoding step (the device only receives the token)."""
        r = self.runner
        start = now(req.device)
        ids = torch.tensor([[req.tokens[-1]]], device=r.device)
        pos = r.adapter.text_position_ids(
            torch.tensor([[req.past]], device=r.device), req.rope_offset
        )
        out = r.adapter.text_forward(ids, (), cache=req.cache, position_ids=pos, use_cache=True)
        req.past += 1
        token = self._rule(req).first_token(r.suppress(out.logits[0, -1]), req)
        req.timed("verify", start)
        return TokenStream(token)


class DeviceRole:
    """The drafter: its prefill from the edge's features, tree growth, commit of a result."""

    def __init__(self, runner, source_factory=None) -> None:
        self.runner = runner
        self.source_factory = source_factory  # tests script a drafter here
        self.decoder = FeatureDecoder(runner.drafter) if runner.drafter is not None else None

    def prefill(self, req: Request, down: FeatureDownlink, capacity: int) -> None:
        start = now(req.device)
        if self.source_factory is not None:
            req.source = self.source_factory(self.runner, down, capacity)
        elif self.runner.device_vlm is not None:  # the small VLM sees the image itself
            inputs = self.runner.encode(req.image, req.prompt)
            req.source = VLMDrafterSide(self.runner.device_vlm, inputs, down.first_token)
        else:
            side = DrafterSide(self.runner.kernel(), self.runner.adapter.vocab_size, capacity)
            n = len(down.token_ids)
            visual = self.decoder(down.visual, 0) if down.visual.rows else None
            if self.runner.drafter.config.visual_prefix == "compressed":
                side.prefill(down.token_ids, self.decoder(down.features, n), down.first_token,
                             prefix=visual)  # fmt: skip
            else:
                visual_rows = None
                if visual is not None:
                    visual_rows = torch.isin(
                        down.token_ids, self.runner.visual_ids.to(down.token_ids.device)
                    )
                side.prefill(
                    down.token_ids, self.decoder(down.features, n), down.first_token, visual,
                    visual_rows,
                )  # fmt: skip
            req.source = side
        req.tokens = [down.first_token]
        req.timed("drafter_prefill", start)

    def draft(self, req: Request, settings: DraftSettings, keep_tree: bool = False) -> DraftUpload:
        """Grow this round's tree under the last token; upload the nodes to verify."""
        start = now(req.device)
        sampling = req.sampling
        tree = DraftTree(root_token=req.tokens[-1], track_entropy=req.upload_confidence)
        grow(tree, req.source, settings, req.temperature, req.generator if sampling else None)
        order = tree.select(None if sampling else settings.max_nodes)  # DraftSettings: why
        req.tree, req.order = tree, order
        up = upload_for(tree, order, settings.mode == "chain", sampling)
        if req.upload_confidence:
            _add_head_inputs(up, tree, order, req.source, req.upload_hidden)
        req.timed("draft", start)
        return up

    def commit(
        self, req: Request, features: list[tuple[FeaturePayload, int]], emitted: list[int]
    ) -> None:
        """Feed the accepted positions back with the target's features: `features` holds the
        payloads of the root and accepted rows (with their row counts), `emitted` the tokens
        after each row (the accepted drafts, then the bonus)."""
        start = now(req.device)
        feats = None
        if self.decoder is not None:
            feats = torch.cat([self.decoder(p, n) for p, n in features])
        req.source.commit(feats, emitted)
        req.timed("commit", start)

    def extend_chain(self, req: Request, levels: int) -> list[int]:
        """Keep drafting the round's chain `levels` tokens deeper (the decoupled device drafts
        on its own outputs while the edge verifies); returns the new nodes."""
        start = now(req.device)
        tree, source = req.tree, req.source
        node = len(tree) - 1
        new = []
        for _ in range(levels):
            logits = source.expand(tree, [node])[0].float()
            logp = logits.log_softmax(-1)
            token = int(logp.argmax())
            node = tree.add(node, token, tree.scores[node] + float(logp[token]))
            new.append(node)
        req.order = list(range(len(tree)))
        req.timed("draft", start)
        return new


def _add_head_inputs(up: DraftUpload, tree: DraftTree, order: list[int], source, hidden: bool):
    """What an acceptance head on the edge needs from the device: per node the drafter's
    log-probability of its token and entropy at its parent; with `hidden`, the drafter's states
    at the nodes that have children (full-hidden upload)."""
    rows = [
        (tree.scores[n] - tree.scores[tree.parents[n]], tree.entropies.get(tree.parents[n], 0.0))
        for n in order[1:]
    ]
    up.confidence = torch.tensor(rows, dtype=torch.float16).reshape(-1, 2)
    if hidden:
        kept = set(order)
        parents = [
            i for i, n in enumerate(order) if any(c in kept for c in tree.children.get(n, []))
        ]
        up.hidden_nodes = torch.tensor(parents, dtype=torch.long)
        up.hidden = torch.stack([source.hidden[order[i]] for i in parents]).to(torch.float16)


def upload_for(
    tree: DraftTree, order: list[int], chain: bool, with_probs: bool = False
) -> DraftUpload:
    """The DraftUpload of `order`'s drafted nodes (root excluded), parents as upload indices."""
    index = {node: i for i, node in enumerate(order)}
    nodes = order[1:]
    up = DraftUpload(
        tokens=torch.tensor([tree.tokens[n] for n in nodes], dtype=torch.long),
        parents=torch.tensor([index[tree.parents[n]] - 1 for n in nodes], dtype=torch.long),
        chain=chain,
    )
    if with_probs:  # the edge needs q at every node whose children it will verify
        expanded = [n for n in order if n in tree.draft_probs and tree.children.get(n)]
        up.prob_nodes = torch.tensor([index[n] for n in expanded], dtype=torch.long)
        up.draft_probs = torch.stack([tree.draft_probs[n] for n in expanded]).float()
    return up
