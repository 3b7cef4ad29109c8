"""Device-edge protocols over virtual clocks: edge_only, sync, decoupled, progressive.

    >>> timeline = Timeline(Link(PRESETS["bad"], seed=0), PROFILES["a40-orin-7b"], vocab_size)
    >>> result = run_protocol("sync", runner, Request(image, prompt, 96), timeline,
    ...                       DraftSettings(mode="tree", depth=6))
    >>> result.tokens, result.tau, result.end_s, timeline.bytes      # tokens are real, times simulated

Every protocol runs real decoding with the two roles of inference/roles.py (so its tokens are
the model's, and the lossless ones equal `generate`) and prices what happened on a `Timeline`:
each role has a clock, a model call occupies its role for the time the compute model gives
(measured here, or a roofline profile), and a message leaves when its sender is done and
arrives when the link says. With no link and measured compute this is the plain in-process
runner.

- `edge_only`: the device uploads image + prompt; the edge decodes token by token and streams
  each token down. What a user runs without speculative decoding.
- `sync` (CoVSpec's basic loop): draft, upload, verify, download the verdict with the features
  of the accepted positions (real downlink traffic for a feature-fed drafter), commit, repeat.
- `decoupled` (CoVSpec's decoupled verification-correction): the device keeps drafting its
  chain in chunks of `depth` tokens and uploads each chunk as soon as it is drafted, assuming
  the previous ones are accepted; the edge verifies chunks in order (a chunk's first token must
  equal the bonus of the chunk before) and sends a correction at the first rejection, after
  which the device rolls back. At most `max_chunks` chunks are in flight.
- `progressive` (ProSemComVLM's progressive upload, greedy only): the device drafts a tree but
  uploads only its top-1 chain plus the first tokens of its alternative branches; after a
  mismatch whose wanted token heads a drafted branch, the edge asks for that branch's subtree
  and verifies it as the next round, without a drafting step.

Each target forward emits a `RoundRecord` to the observers (tallies, trajectory recorders).
`edge_only` and `sync` live here, with the bookkeeping every protocol shares; `decoupled` and
`progressive` in inference/protocol_variants.py.
"""

from __future__ import annotations

import torch

from covspec.inference.acceptance import UPLOAD_MODES, nominal_state
from covspec.inference.compute import MEASURED, Op
from covspec.inference.drafting import DrafterSide
from covspec.inference.messages import (
    DraftUpload,
    HiddenRequest,
    HiddenUpload,
    PromptUpload,
    VerifyResult,
)
from covspec.inference.policies import FixedDepth, LinkAwareDepth
from covspec.inference.roles import DeviceRole, EdgeRole, Request, now, tree_from_upload
from covspec.inference.timeline import GenerationResult, RoundRecord, Timeline
from covspec.inference.tree import DraftSettings, DraftTree

PROTOCOLS = ("edge_only", "sync", "decoupled", "progressive")


def _elapsed(start: float, device=None) -> float:
    return now(device) - start


class _Run:
    """Shared bookkeeping of one protocol run: the roles, the clocks, the result."""

    def __init__(
        self, runner, req: Request, timeline: Timeline, observers, source_factory, rule=None,
        upload: str = "full",
    ) -> None:  # fmt: skip
        self.runner, self.req, self.t = runner, req, timeline
        self.observers = list(observers)
        self.edge = EdgeRole(runner, runner.feature_encoder(timeline.link is not None), rule)
        self.device = DeviceRole(runner, source_factory)
        self.source_factory_used = source_factory is not None
        if runner.device_vlm is not None and hasattr(timeline.compute_model, "with_device_vlm"):
            timeline.compute_model = timeline.compute_model.with_device_vlm()
        self.fetches: list[int] = []  # selective uploads the edge asked for in this verify
        if rule is not None and getattr(rule, "needs_final_state", False):
            self._bind_acceptance_rule(rule, upload)
        self.result = GenerationResult([])
        self.device_ready = 0.0  # when the device may start its next draft
        self.marks = _marks(timeline)  # traffic and busy time not yet in a record
        req.device = runner.device

    def _bind_acceptance_rule(self, rule, upload: str) -> None:
        """Give an acceptance rule the link's CSI and the drafter's states, the latter from the
        full upload or fetched at a mismatch (selective), as `upload` says."""
        if upload not in UPLOAD_MODES:
            raise ValueError(f"upload must be one of {UPLOAD_MODES}, got {upload!r}")
        req, t = self.req, self.t
        req.upload_confidence = getattr(rule, "needs_draft_confidence", True)
        if self.runner.drafter is not None:  # relative depth is over the drafter's trained depth
            rule.max_depth = self.runner.drafter.config.max_draft_steps
        wants_hidden = getattr(rule, "needs_drafter_hidden", True)
        req.upload_hidden = wants_hidden and upload == "full"
        preset = getattr(rule, "preset", None) or "medium"
        rule.csi = (
            (lambda: t.link.state(t.now("edge"))) if t.link else (lambda: nominal_state(preset))
        )
        if not wants_hidden or self.source_factory_used:
            rule.drafter_hidden = None
            return

        def drafter_state(edge_node: int) -> torch.Tensor:
            device_node = req.order[edge_node]
            if upload == "selective":
                self.fetches.append(edge_node)
            # what crosses the link: float16 rows
            return req.source.hidden[device_node].to(torch.float16).float().cpu()

        rule.drafter_hidden = drafter_state

    def depth_lists(self, depth: int) -> None:
        self.result.attempts_per_depth = [0] * depth
        self.result.accepted_per_depth = [0] * depth

    def prefill(self, settings: DraftSettings | None, extra_depth: int = 0) -> None:
        """Prompt upload, target prefill and (with `settings`) the drafter's prefill."""
        req, t = self.req, self.t
        # priced only over a simulated link: PNG-encoding every frame of a long clip would
        # otherwise cost the in-process runner more than its own work
        media_bytes = image_size(req.image) if t.link is not None else 0
        arrival = t.send("up", PromptUpload(media_bytes, req.prompt), 0.0)
        start = now(req.device)
        down = self.edge.prefill(req)
        measured = _elapsed(start, req.device)
        if req.max_new_tokens <= 0:
            return
        end = t.run(
            [
                Op("edge", "vision", req.visual_tokens),
                Op("edge", "prefill", req.prompt_tokens, measured_s=measured),
            ],
            arrival,
        )
        if settings is not None:
            self.result.first_token_s = t.send("down", down, end)
            start = now(req.device)
            self.device.prefill(req, down, _capacity(req, settings, extra_depth))
            measured = _elapsed(start, req.device)
            ops = [Op("device", "drafter_prefill", len(down.token_ids), measured_s=measured)]
            if self.runner.device_vlm is not None:  # the small VLM encodes the image itself
                tokens = req.source.prefill_tokens
                ops = [
                    Op("device", "vision", req.visual_tokens),
                    Op("device", "drafter_prefill", tokens, measured_s=measured),
                ]
            self.device_ready = t.run(ops, self.result.first_token_s)
        else:
            req.tokens = [down.first_token]
        self.prefill_end = end
        self.prefill_bytes = dict(t.bytes)
        self.marks = _marks(t)

    def emit(self, record: RoundRecord) -> None:
        self.marks = _marks(self.t)
        r = self.result
        r.records.append(record)
        r.rounds += 1
        r.drafted += record.drafted
        for i, (a, n) in enumerate(
            zip(record.accepted_per_depth, record.attempts_per_depth, strict=True)
        ):
            if i < len(r.attempts_per_depth):
                r.attempts_per_depth[i] += n
                r.accepted_per_depth[i] += a
        for observer in self.observers:
            observer(record)

    def finished(self) -> bool:
        eos, req = self.runner.eos, self.req
        stop = next((i for i, tok in enumerate(req.tokens) if tok in eos), None)
        if stop is not None:
            req.tokens = req.tokens[: stop + 1]
        return stop is not None or len(req.tokens) >= req.max_new_tokens

    def finish(self) -> GenerationResult:
        r, req, t = self.result, self.req, self.t
        r.tokens = req.tokens[: req.max_new_tokens]
        r.text = self.runner.processor.tokenizer.decode(r.tokens, skip_special_tokens=True)
        r.seconds = dict(req.seconds)
        r.edge_s, r.device_s = t.busy["edge"], t.busy["device"]
        r.uplink_bytes, r.downlink_bytes = t.bytes["up"], t.bytes["down"]
        r.visual_tokens, r.prefix_tokens = req.visual_tokens, req.prefix_tokens
        r.gate_choice = req.gate_choice
        r.draft_steps = getattr(req.source, "steps", 0)
        if isinstance(req.source, DrafterSide):
            r.drafter_kv_bytes = req.source.cache.nbytes(req.source.length)
        return r


def image_size(image) -> int:
    """Bytes of the image as the device would upload it (PNG, lossless)."""
    if image is None:
        return 0
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.tell()


def count_depths(
    tree: DraftTree, order: list[int], path: list[int], depth: int
) -> tuple[list[int], list[int]]:
    """Depth d counts as attempted when the node accepted at depth d-1 had a verified child."""
    attempts, accepted = [0] * depth, [0] * depth
    kept, node = set(order), 0
    for d in range(1, depth + 1):
        if not any(c in kept for c in tree.children.get(node, [])):
            break
        attempts[d - 1] += 1
        if len(path) < d:
            break
        accepted[d - 1] += 1
        node = path[d - 1]
    return attempts, accepted


def emitted_tokens(up: DraftUpload, result: VerifyResult) -> list[int]:
    """The tokens a verdict emits: the accepted uploaded nodes, then the bonus."""
    return [int(up.tokens[i]) for i in result.accepted.tolist()] + [result.bonus]


def _capacity(req: Request, settings: DraftSettings, extra_depth: int = 0) -> int:
    # drafter cache: the prompt, every new token, and the nodes one round's tree can add
    depth = settings.depth + extra_depth
    return req.prompt_tokens + req.max_new_tokens + depth * settings.beam + 1


# -- protocols ------------------------------------------------------------------------------------
def run_edge_only(run: _Run, policy=None) -> GenerationResult:
    req, t = run.req, run.t
    run.prefill(None)
    if req.max_new_tokens <= 0:
        return run.finish()
    from covspec.inference.messages import TokenStream

    run.result.first_token_s = arrival = t.send("down", TokenStream(req.tokens[0]), run.prefill_end)
    edge_end = run.prefill_end
    while not run.finished():
        start = now(req.device)
        token = run.edge.step(req).token
        edge_end = t.run(
            Op("edge", "step", 1, context=req.past, measured_s=_elapsed(start, req.device))
        )
        arrival = t.send("down", TokenStream(token), edge_end)
        req.tokens.append(token)
        run.emit(_step_record(run, arrival))
    run.result.end_s = arrival
    return run.finish()


def _verify_round(
    run: _Run, up: DraftUpload, ready: float, message=None
) -> tuple[VerifyResult, list[int], float]:
    """Send `message` (default: `up`) at `ready`, verify `up` on the edge, download the
    verdict. Returns (result, emitted tokens, when the device has the verdict)."""
    req, t = run.req, run.t
    arrival = t.send("up", message if message is not None else up, ready)
    context = req.past
    start = now(req.device)
    result = run.edge.verify(req, up)
    measured = _elapsed(start, req.device)
    rows = len(result.accepted) + 1
    edge_end = t.run(
        [
            Op("edge", "verify", len(up.tokens) + 1, context=context, measured_s=measured),
            Op("edge", "project", rows),
        ],
        arrival,
    )
    for node in run.fetches:  # mismatch-first selective upload: one round trip per ask
        asked = t.send("down", HiddenRequest(node), edge_end)
        row = req.source.hidden[req.order[node]].to(torch.float16)[None]
        edge_end = t.run(Op("edge", "head", 1), t.send("up", HiddenUpload(row), asked))
    run.fetches.clear()
    back = t.send("down", result, edge_end)
    emitted = emitted_tokens(up, result)
    req.tokens += emitted
    return result, emitted, back


def _tree_record(
    run: _Run, phase: str, up: DraftUpload, result: VerifyResult, offset: int, end: float
) -> RoundRecord:
    """Record one verify forward from the edge's view (the upload and its verdict); `offset`
    is the depth of the upload's root within the round. Traffic and compute since the last
    record are its own."""
    t, marks = run.t, run.marks
    tree, order = tree_from_upload(0, up)
    path = [i + 1 for i in result.accepted.tolist()]
    size = len(run.result.attempts_per_depth)
    attempts, accepted = [0] * size, [0] * size
    sub_attempts, sub_accepted = count_depths(tree, order, path, max(size - offset, 0))
    attempts[offset:], accepted[offset:] = sub_attempts, sub_accepted
    record = RoundRecord(
        index=run.result.rounds,
        phase=phase,
        drafted=len(up.tokens),
        accepted=len(path),
        emitted=len(path) + 1,
        attempts_per_depth=attempts,
        accepted_per_depth=accepted,
        uplink_bytes=t.bytes["up"] - marks[0][0],
        downlink_bytes=t.bytes["down"] - marks[0][1],
        device_s=t.busy["device"] - marks[1][0],
        edge_s=t.busy["edge"] - marks[1][1],
        end_s=end,
    )
    run.emit(record)
    return record


def _step_record(run: _Run, end: float) -> RoundRecord:
    """A plain decoding step (edge_only): one forward, one token, nothing drafted."""
    t, marks = run.t, run.marks
    return RoundRecord(
        run.result.rounds, "step", 0, 0, 1, [], [],
        t.bytes["up"] - marks[0][0], t.bytes["down"] - marks[0][1],
        t.busy["device"] - marks[1][0], t.busy["edge"] - marks[1][1], end,
    )  # fmt: skip


def _marks(t: Timeline) -> tuple[tuple[int, int], tuple[float, float]]:
    return (t.bytes["up"], t.bytes["down"]), (t.busy["device"], t.busy["edge"])


def _draft(run: _Run, settings: DraftSettings) -> tuple[DraftUpload, float]:
    """Grow this round's tree on the device; returns the upload and when drafting ended."""
    req = run.req
    start = now(req.device)
    up = run.device.draft(req, settings)
    levels = max(req.tree.depths) if len(req.tree) > 1 else 0
    end = run.t.run(
        Op(
            "device",
            "draft",
            len(up.tokens),
            forwards=max(levels, 1),
            context=len(req.tokens) + req.prompt_tokens,
            measured_s=_elapsed(start, req.device),
        ),
        run.device_ready,
    )
    return up, end


def _commit(run: _Run, results: list[VerifyResult], emitted: list[int], arrival: float) -> None:
    req = run.req
    start = now(req.device)
    run.device.commit(req, [(r.features, len(r.accepted) + 1) for r in results], emitted)
    run.device_ready = run.t.run(
        Op(
            "device",
            "commit",
            len(emitted),
            context=len(req.tokens) + req.prompt_tokens,
            measured_s=_elapsed(start, req.device),
        ),
        arrival,
    )


def run_sync(run: _Run, policy) -> GenerationResult:
    req = run.req
    cap = getattr(policy, "max_depth", policy.base.depth)
    run.depth_lists(cap)
    run.prefill(policy.base, extra_depth=cap - policy.base.depth)
    if req.max_new_tokens <= 0:
        return run.finish()
    while not run.finished():
        settings = policy.settings(req, run.t)
        up, ready = _draft(run, settings)
        tree = req.tree
        result, emitted, back = _verify_round(run, up, ready)
        record = _tree_record(run, "round", up, result, 0, back)
        policy.observe(record, max(tree.depths) if len(tree) > 1 else 0)
        run.result.end_s = back
        if run.finished():
            break
        _commit(run, [result], emitted, back)
    return run.finish()


@torch.inference_mode()
def run_protocol(
    name: str,
    runner,
    req: Request,
    timeline: Timeline | None = None,
    policy: FixedDepth | LinkAwareDepth | DraftSettings | None = None,
    observers=(),
    source_factory=None,
    max_chunks: int = 4,
    rule=None,
    upload: str = "full",
) -> GenerationResult:
    """Decode `req` with protocol `name` (one of PROTOCOLS) and price it on `timeline`.
    `rule` replaces lossless verification (an acceptance head, inference/acceptance.py); its
    drafter states reach the edge by `upload`: "full" (with every draft) or "selective"
    (fetched at a mismatch)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {list(PROTOCOLS)}")
    if name != "edge_only" and not runner.has_drafter and source_factory is None:
        raise ValueError("this runner has no drafter; load one or pass source_factory")
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
    timeline = timeline or Timeline(None, MEASURED, runner.adapter.vocab_size)
    if isinstance(policy, DraftSettings) or policy is None:
        policy = FixedDepth(policy or DraftSettings())
    run = _Run(runner, req, timeline, observers, source_factory, rule, upload)
    run.max_chunks = max_chunks
    from covspec.inference.protocol_variants import run_decoupled, run_progressive

    fn = {
        "edge_only": run_edge_only,
        "sync": run_sync,
        "decoupled": run_decoupled,
        "progressive": run_progressive,
    }[name]
    return fn(run, policy)
