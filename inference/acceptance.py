"""Lossy verification with the acceptance head, and the trajectories it is trained on.

    >>> rule = HeadRule(head, preset="bad")
    >>> run_protocol("sync", runner, req, timeline, settings, rule=rule, upload="selective")
    >>> recorder = RecordingRule()        # lossless; recorder.events logs every mismatch
    >>> TypicalRule(0.09)                 # the CSI-blind baseline: Medusa's typical acceptance

Verification walks the drafted tree as greedy verification does. At the first node whose
children hold no token equal to the target's choice, the edge asks the head about the
drafter's top child there: its features are the target's final state at the parent (the state
that predicts the token), the drafter's state there, confidence features of both models and the
current channel state (CSI). An accepted mismatch continues the walk below it (the tree mask
already ran it through the target); a rejected one ends the round with the target's token, as
in lossless decoding. So a head that never accepts is exactly greedy verification, and one that
always accepts takes every drafted node down the first-child path.

The drafter's state reaches the edge in one of two ways (WISV): `full` upload sends it with
every draft for every node that has children; `selective` (mismatch-first) sends nothing up
front and the edge asks for the one row it needs when a mismatch happens, at the price of a
round trip then. Both are counted by the link accounting (inference/protocols.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from covspec.inference.link import PRESETS, LinkConfig, LinkState
from covspec.inference.tree import DraftTree
from covspec.modeling.acceptance_head import CONFIDENCE_FEATURES, CSI_FEATURES

UPLOAD_MODES = ("full", "selective")


def nominal_state(preset: str | LinkConfig) -> LinkState:
    """The CSI of a preset at its means: no shadowing or fading, Shannon at the mean SNR."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset

    def rate(radio) -> float:
        spectral = radio.efficiency * math.log2(1 + 10 ** (radio.mean_snr_db / 10))
        return min(spectral, radio.max_spectral_efficiency) * radio.bandwidth_hz

    return LinkState(
        0.0,
        cfg.uplink.mean_snr_db,
        cfg.downlink.mean_snr_db,
        rate(cfg.uplink),
        rate(cfg.downlink),
        cfg.rtt_ms,
    )


def csi_vector(state: LinkState) -> torch.Tensor:
    """(3,) the CSI features, in CSI_FEATURES order."""
    return torch.tensor(
        [
            state.uplink_snr_db / 10.0,
            math.log10(max(state.uplink_bps, 1.0) / 1e6),
            state.rtt_ms / 1e3,
        ]
    )


def confidence_vector(
    target_logits: torch.Tensor,  # (V,) the target's logits at the parent (suppressed)
    token: int,
    drafter_logprob: float,
    drafter_entropy: float,
    depth: int,
    max_depth: int,
) -> torch.Tensor:
    """(8,) the confidence features, in CONFIDENCE_FEATURES order."""
    probs = target_logits.float().softmax(-1)
    top = probs.topk(2).values
    entropy = torch.special.entr(probs).sum()
    return torch.tensor(
        [
            float(probs[token]),
            float(top[0]),
            float(top[0] - top[1]),
            float(entropy),
            drafter_logprob,
            drafter_entropy,
            float(depth),
            depth / max(max_depth, 1),
        ]
    )


assert len(CSI_FEATURES) == 3 and len(CONFIDENCE_FEATURES) == 8  # the vectors above


@dataclass
class MismatchEvent:
    """One decision point: the features the head sees, and where it happened."""

    parent: int  # tree node whose children hold no target-matching token
    node: int  # the drafter's top child there (the candidate)
    token: int
    target_choice: int  # what the target wanted instead
    depth: int
    target_hidden: torch.Tensor  # (Ht,)
    drafter_hidden: torch.Tensor | None  # (Hd,)
    confidence: torch.Tensor  # (8,)
    csi: torch.Tensor  # (3,)
    prefix: list[int] = field(default_factory=list)  # emitted tokens before the candidate
    accepted: bool = False


class _WalkRule:
    """Greedy walk with a decision at mismatches (`decide`); subclasses choose."""

    needs_draft_probs = False
    needs_final_state = True  # the edge captures the target's layer L for it
    needs_drafter_hidden = True  # the drafter's state at the node must reach the edge
    needs_draft_confidence = True  # and its log-probability and entropy of the token

    def __init__(
        self,
        csi: Callable[[], LinkState] | None = None,
        drafter_hidden: Callable[[int], torch.Tensor | None] | None = None,
        max_depth: int = 12,
    ) -> None:
        # both callables are bound by the protocol that runs the rule (inference/protocols.py):
        # the link's current state, and where the drafter's state at an edge tree node comes
        # from (the full upload, or a selective fetch)
        self.csi = csi
        self.drafter_hidden = drafter_hidden
        self.max_depth = max_depth
        self.target_layer: int | None = None  # set by the edge: its final-state layer id
        self.eos: set[int] = set()  # set by the edge: the answer ends there, so does the walk
        self.events: list[MismatchEvent] = []

    def first_token(self, logits: torch.Tensor, req) -> int:
        return int(logits.argmax())

    def __call__(self, tree: DraftTree, order: list[int], logits, out, req):
        index = {node: i for i, node in enumerate(order)}
        kept = set(order)
        best = logits.argmax(-1).tolist()
        path, node = [], 0
        while True:
            want = best[index[node]]
            children = [c for c in tree.children.get(node, []) if c in kept]
            nxt = next((c for c in children if tree.tokens[c] == want), None)
            if nxt is None and children:
                event = self._event(tree, index, logits, out, req, node, children[0], want, path)
                event.accepted = bool(self.decide(event))
                self.events.append(event)
                nxt = children[0] if event.accepted else None
            if nxt is None:
                return path, want
            path.append(nxt)
            node = nxt
            if tree.tokens[node] in self.eos:  # nothing after the end of the answer matters
                return path, want

    def _event(self, tree, index, logits, out, req, parent, child, want, path) -> MismatchEvent:
        row = index[parent]
        hidden = out.hidden_states[self.target_layer][0, row]
        confidence = confidence_vector(
            logits[row],
            tree.tokens[child],
            *tree.confidence.get(child, (0.0, 0.0)),
            tree.depths[child],
            self.max_depth,
        )
        return MismatchEvent(
            parent=parent,
            node=child,
            token=tree.tokens[child],
            target_choice=want,
            depth=tree.depths[child],
            target_hidden=hidden.detach().float().cpu(),
            drafter_hidden=self.drafter_hidden(parent) if self.drafter_hidden else None,
            confidence=confidence,
            csi=csi_vector(self.csi()),
            prefix=list(req.tokens) + [tree.tokens[n] for n in path],
        )

    def decide(self, event: MismatchEvent) -> bool:
        raise NotImplementedError


class RecordingRule(_WalkRule):
    """Lossless greedy verification that logs every mismatch event (trajectory collection)."""

    def decide(self, event: MismatchEvent) -> bool:
        return False


class HeadRule(_WalkRule):
    """The acceptance head's lossy verification at the channel preset's calibrated threshold."""

    def __init__(
        self, head, preset: str | None, threshold: float | None = None, **kwargs
    ) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.head = head.eval()
        self.preset = preset
        # an explicit threshold: the closed-loop calibration's candidates (inference/calibrate.py)
        self.threshold = head.threshold(preset) if threshold is None else threshold
        self.needs_drafter_hidden = head.config.use_drafter_hidden

    @torch.inference_mode()
    def decide(self, event: MismatchEvent) -> bool:
        drafter = event.drafter_hidden[None] if event.drafter_hidden is not None else None
        logit = self.head(
            event.target_hidden[None], drafter, event.confidence[None], event.csi[None]
        )
        return float(logit[0]) > self.threshold


class ConstantRule(_WalkRule):
    """Accept every mismatch or none (tests; the two ends of the lossy spectrum)."""

    def __init__(self, accept: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.accept = accept

    def decide(self, event: MismatchEvent) -> bool:
        return self.accept


class TypicalRule(_WalkRule):
    """Medusa's typical acceptance, the CSI-blind baseline a head must beat: accept a mismatched
    token when the target's own probability of it is at least min(epsilon, delta x
    exp(-entropy)) (Cai et al. 2024, with their delta = sqrt(epsilon) default). It reads the
    target's distribution only, so no drafter state crosses the link for it."""

    needs_drafter_hidden = False
    needs_draft_confidence = False

    def __init__(self, epsilon: float, delta: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 < epsilon <= 1:
            raise ValueError(f"typical acceptance epsilon must be in (0, 1], got {epsilon}")
        self.epsilon = epsilon
        self.delta = math.sqrt(epsilon) if delta is None else delta

    def decide(self, event: MismatchEvent) -> bool:
        prob, entropy = float(event.confidence[0]), float(event.confidence[3])
        return prob >= min(self.epsilon, self.delta * math.exp(-entropy))
