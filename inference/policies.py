"""How deep to draft each round: fixed, or CoVSpec's link-aware adaptive length.

>>> policy = LinkAwareDepth(DraftSettings(mode="tree", depth=6), max_depth=12)
>>> settings = policy.settings(request, timeline)    # this round's DraftSettings
>>> policy.observe(record, levels)                    # after the round's verdict
"""

from __future__ import annotations

from dataclasses import replace

from covspec.inference.roles import Request
from covspec.inference.timeline import RoundRecord, Timeline
from covspec.inference.tree import DraftSettings


class FixedDepth:
    """The same draft settings every round."""

    def __init__(self, settings: DraftSettings) -> None:
        self.base = settings

    def settings(self, req: Request, timeline: Timeline) -> DraftSettings:
        return self.base

    def observe(self, record: RoundRecord, draft_levels: int) -> None:
        pass


class LinkAwareDepth:
    """CoVSpec adaptive draft length under the link: each round, the depth (1..max_depth) that
    maximises expected tokens per second of a round,

        E(d) = (1 - a^(d+1)) / (1 - a)        tokens per round (chain, acceptance a per depth)
        T(d) = d * step + verify + RTT + bytes_up(d) / rate_up + E(d) * bytes_per_token / rate_down

    with `a` a moving average of the measured acceptance per attempted depth, `step` and
    `verify` moving averages of the priced compute of past rounds, and RTT and rates the
    link's current state (CSI). A long RTT favours long drafts, a fast link and a weak drafter
    short ones. Inside the chosen depth, CoVSpec's margin rules (`stop_margin`,
    `branch_margin` of the base settings) still cut unsure nodes and branch where unsure;
    `max_nodes` scales with the depth."""

    def __init__(self, base: DraftSettings, max_depth: int = 12, smoothing: float = 0.3) -> None:
        if not 1 <= base.depth <= max_depth:
            raise ValueError(f"need 1 <= base depth <= max_depth, got {base.depth}, {max_depth}")
        self.base, self.max_depth, self.smoothing = base, max_depth, smoothing
        self.alpha = 0.8  # prior acceptance per depth until the first round is seen
        self.step_s = self.verify_s = None
        self.up_bytes_per_node, self.down_bytes_per_token = 4.0, 0.0
        self.chosen: list[int] = []

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def observe(self, record: RoundRecord, levels: int) -> None:
        tried = sum(record.attempts_per_depth)
        if tried:
            self.alpha = self._avg(self.alpha, sum(record.accepted_per_depth) / tried)
        self.alpha = min(self.alpha, 0.995)
        if levels:
            self.step_s = self._avg(self.step_s, record.device_s / levels)
        self.verify_s = self._avg(self.verify_s, record.edge_s)
        if record.drafted:
            self.up_bytes_per_node = self._avg(
                self.up_bytes_per_node, record.uplink_bytes / record.drafted
            )
        self.down_bytes_per_token = self._avg(
            self.down_bytes_per_token, record.downlink_bytes / record.emitted
        )

    def settings(self, req: Request, timeline: Timeline) -> DraftSettings:
        if self.step_s is None:  # nothing measured yet: the base depth
            depth = self.base.depth
        else:
            depth = max(range(1, self.max_depth + 1), key=lambda d: self._rate(d, timeline))
        self.chosen.append(depth)
        extra = self.base.max_nodes - self.base.depth
        return replace(self.base, depth=depth, max_nodes=depth + max(extra, 0))

    def _rate(self, depth: int, timeline: Timeline) -> float:
        a = self.alpha
        tokens = (1 - a ** (depth + 1)) / (1 - a)
        seconds = depth * self.step_s + self.verify_s
        if timeline.link is not None:
            state = timeline.link.state(timeline.now("device"))
            seconds += state.rtt_ms / 1e3
            seconds += 8 * self.up_bytes_per_node * depth / state.uplink_bps
            seconds += 8 * self.down_bytes_per_token * tokens / state.downlink_bps
        return tokens / seconds
