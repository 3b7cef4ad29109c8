"""Virtual clocks of the device and the edge, and what one decode reports.

    >>> t = Timeline(Link(PRESETS["bad"]), PROFILES["a40-orin-7b"], vocab_size)
    >>> done = t.run(Op("edge", "verify", 9, context=600), after=arrival)  # edge busy until `done`
    >>> arrival = t.send("down", verdict, ready=done)                      # link arrival time

Each role has a clock; a model call occupies its role from max(its clock, `after`) for the
time the compute model gives, and a message leaves when its sender is done and arrives when the
link says (no link: at once, the in-process runner). Bytes and busy time are tallied per
direction and role; with a link, every message and compute interval is logged for figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from covspec.inference.compute import MEASURED, Op
from covspec.inference.link import Link


@dataclass
class RoundRecord:
    """One target forward of the decode loop and what it cost."""

    index: int
    phase: str  # "round", "chunk" (decoupled, after the first) or "subtree" (progressive)
    drafted: int  # draft tokens verified
    accepted: int  # of them accepted
    emitted: int  # tokens emitted (accepted + the bonus, when there is one)
    attempts_per_depth: list[int]
    accepted_per_depth: list[int]
    uplink_bytes: int
    downlink_bytes: int
    device_s: float  # priced by the timeline's compute model
    edge_s: float
    end_s: float  # when the device holds this forward's verdict (simulated clock)


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str = ""
    rounds: int = 0  # target forwards in the decode loop (prefill excluded)
    drafted: int = 0  # draft tokens verified, summed over rounds
    attempts_per_depth: list[int] = field(default_factory=list)
    accepted_per_depth: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # measured wall time per phase
    records: list[RoundRecord] = field(default_factory=list)
    first_token_s: float = 0.0  # simulated: the device holds the first token
    end_s: float = 0.0  # simulated: the device holds the whole answer
    edge_s: float = 0.0  # simulated edge compute, prefill included
    device_s: float = 0.0
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    visual_tokens: int = 0  # the target's visual tokens in the prompt
    prefix_tokens: int = 0  # compressed visual prefix rows in the drafter's cache
    gate_choice: str | None = None  # the compressor option the gate picked
    draft_steps: int = 0  # drafter forwards while drafting (one per tree level)
    drafter_kv_bytes: int = 0  # the drafter's KV cache at the end: committed rows, keys + values

    @property
    def tau(self) -> float:
        """Tokens emitted per target forward in the decode loop, the bonus token included."""
        return (len(self.tokens) - 1) / self.rounds if self.rounds else float("nan")

    @property
    def acceptance_per_depth(self) -> list[float]:
        return [
            a / n if n else float("nan")
            for a, n in zip(self.accepted_per_depth, self.attempts_per_depth, strict=True)
        ]


class Timeline:
    """Virtual clocks of the device and the edge over a link (None: an in-process, free link)."""

    def __init__(self, link: Link | None = None, compute=MEASURED, vocab_size: int = 1) -> None:
        self.link, self.compute_model, self.vocab_size = link, compute, vocab_size
        self.free = {"device": 0.0, "edge": 0.0}
        self.busy = {"device": 0.0, "edge": 0.0}
        self.bytes = {"up": 0, "down": 0}
        # event log for figures (kept only with a link): messages (dir, kind, bytes, sent,
        # arrived) and compute intervals (role, kind, start, end)
        self.messages: list[tuple[str, str, int, float, float]] = []
        self.intervals: list[tuple[str, str, float, float]] = []

    def run(self, ops: Op | list[Op], after: float = 0.0) -> float:
        """Occupy the ops' role from max(its clock, `after`); returns when it is done."""
        ops = [ops] if isinstance(ops, Op) else ops
        role = ops[0].role
        seconds = sum(self.compute_model.seconds(op) for op in ops)
        start = max(self.free[role], after)
        self.free[role] = start + seconds
        self.busy[role] += seconds
        if self.link is not None:  # the in-process runner keeps no event log
            kind = "+".join(op.kind for op in ops)
            self.intervals.append((role, kind, start, self.free[role]))
        return self.free[role]

    def send(self, direction: str, message, ready: float) -> float:
        """Hand `message` to the link at `ready`; returns its arrival time."""
        nbytes = message.nbytes(self.vocab_size)
        self.bytes[direction] += nbytes
        arrival = ready if self.link is None else self.link.send(direction, nbytes, ready)
        if self.link is not None:
            self.messages.append((direction, type(message).__name__, nbytes, ready, arrival))
        return arrival

    def now(self, role: str = "device") -> float:
        return self.free[role]
