"""Typed messages between the device (drafter) and the edge (target), each knowing its size.

    >>> up = DraftUpload(tokens=torch.tensor([5, 7, 9]), parents=torch.tensor([-1, 0, 1]))
    >>> up.nbytes(vocab_size=32000)          # ids at the narrowest unsigned width + tree + header
    >>> len(up.serialise(vocab_size=32000))  # the same number, from the actual bytes

Sizes are what the payload takes on the wire: token ids at the narrowest unsigned integer that
holds the vocabulary (2 bytes up to 65,536 entries, else 4), tree parents at the narrowest width
that holds the node count, features and probabilities at their wire dtype (a feature codec's
int8 codes plus one float16 scale per row), images as their encoded file bytes, text as UTF-8.
Every message adds `HEADER_BYTES` (type, request id, round, payload lengths). Transport and
radio overheads (IP/UDP, MAC, retransmissions) are the link model's business, not the message's.
`serialise` writes exactly those bytes, so the tests hold the size formulas to real buffers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import torch

HEADER_BYTES = 16  # message type (1), flags (1), request id (4), round (4), lengths (2 x 3)


def id_bytes(vocab_size: int) -> int:
    """Bytes per token id: the narrowest unsigned width that holds `vocab_size` ids."""
    return 1 if vocab_size <= 2**8 else 2 if vocab_size <= 2**16 else 4


def _index_bytes(count: int) -> int:
    return id_bytes(max(count, 1))


def _ints(values: torch.Tensor, width: int, signed_offset: int = 0) -> bytes:
    fmt = {1: "B", 2: "H", 4: "I"}[width]
    return struct.pack(f"<{len(values)}{fmt}", *[int(v) + signed_offset for v in values.tolist()])


def _header(payload: bytes) -> bytes:
    return bytes(HEADER_BYTES) + payload


@dataclass
class FeaturePayload:
    """Per-position drafter features as they cross the downlink.

    Either plain rows at a wire dtype (`values`, (n, D)) or a codec's int8 codes with one float16
    scale per row (`codes` (n, r), `scales` (n,)). `None` everywhere means nothing is sent (the
    text-only drafter needs no target features)."""

    values: torch.Tensor | None = None  # (n, D) at the wire dtype
    codes: torch.Tensor | None = None  # (n, r) int8
    scales: torch.Tensor | None = None  # (n,) float16

    @property
    def rows(self) -> int:
        data = self.values if self.values is not None else self.codes
        return 0 if data is None else data.shape[0]

    def nbytes(self) -> int:
        if self.values is not None:
            return self.values.numel() * self.values.element_size()
        if self.codes is not None:
            return self.codes.numel() + self.scales.numel() * 2
        return 0

    def serialise(self) -> bytes:
        if self.values is not None:
            return _tensor_bytes(self.values)
        if self.codes is not None:
            return _tensor_bytes(self.codes) + _tensor_bytes(self.scales.to(torch.float16))
        return b""


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the same 2 bytes
        t = t.view(torch.int16)
    return t.numpy().tobytes()


@dataclass
class PromptUpload:
    """Device -> edge, once per request: the encoded image file and the prompt text."""

    image_bytes: int  # the encoded image file's size (PNG / JPEG as the device holds it)
    prompt: str

    def nbytes(self, vocab_size: int = 0) -> int:
        return HEADER_BYTES + self.image_bytes + len(self.prompt.encode("utf-8"))

    def serialise(self, vocab_size: int = 0) -> bytes:
        return _header(bytes(self.image_bytes) + self.prompt.encode("utf-8"))


@dataclass
class FeatureDownlink:
    """Edge -> device after prefill: the prompt's text ids the drafter runs on, their features
    (and, for the full-visual baseline, the visual embeddings), and the first token."""

    token_ids: torch.Tensor  # (n,) the drafter's prompt positions
    features: FeaturePayload
    first_token: int
    visual: FeaturePayload = field(default_factory=FeaturePayload)

    def nbytes(self, vocab_size: int) -> int:
        ids = (len(self.token_ids) + 1) * id_bytes(vocab_size)
        return HEADER_BYTES + ids + self.features.nbytes() + self.visual.nbytes()

    def serialise(self, vocab_size: int) -> bytes:
        ids = torch.cat([self.token_ids.flatten(), torch.tensor([self.first_token])])
        return _header(
            _ints(ids, id_bytes(vocab_size)) + self.features.serialise() + self.visual.serialise()
        )


@dataclass
class DraftUpload:
    """Device -> edge each round: the drafted nodes (root excluded) as token ids and parent
    indices into the same list (-1 = the root), optionally the drafter's distributions over the
    vocabulary at each expanded node (sampling verification needs them) and its hidden states."""

    tokens: torch.Tensor  # (n,) drafted token ids, in the order the edge verifies them
    parents: torch.Tensor  # (n,) parent index in `tokens`, -1 for children of the root
    chain: bool = False  # a chain needs no parent list
    # sampling: q at each expanded node (node ids: 0 = root, i + 1 = entry i), float32 so the
    # edge rejects against exactly the distribution the device drew from
    prob_nodes: torch.Tensor | None = None  # (m,)
    draft_probs: torch.Tensor | None = None  # (m, V)
    # for an acceptance head: per node (drafter log-prob, drafter entropy at its parent) and,
    # with full-hidden upload, the drafter's states at the nodes that have children
    confidence: torch.Tensor | None = None  # (n, 2) float16
    hidden_nodes: torch.Tensor | None = None  # (h,) node ids, 0 = root
    hidden: torch.Tensor | None = None  # (h, D) at the wire dtype

    def nbytes(self, vocab_size: int) -> int:
        n = len(self.tokens)
        size = HEADER_BYTES + n * id_bytes(vocab_size)
        if not self.chain:
            size += n * _index_bytes(n + 1)
        for nodes in (self.prob_nodes, self.hidden_nodes):
            if nodes is not None:
                size += len(nodes) * _index_bytes(n + 1)
        for extra in (self.draft_probs, self.confidence, self.hidden):
            if extra is not None:
                size += extra.numel() * extra.element_size()
        return size

    def serialise(self, vocab_size: int) -> bytes:
        n = len(self.tokens)
        body = _ints(self.tokens, id_bytes(vocab_size))
        if not self.chain:
            body += _ints(self.parents, _index_bytes(n + 1), signed_offset=1)
        for nodes in (self.prob_nodes, self.hidden_nodes):
            if nodes is not None:
                body += _ints(nodes, _index_bytes(n + 1))
        for extra in (self.draft_probs, self.confidence, self.hidden):
            if extra is not None:
                body += _tensor_bytes(extra)
        return _header(body)


@dataclass
class VerifyResult:
    """Edge -> device each round: how many drafted nodes were accepted (their indices in the
    upload when it was a tree), the target's bonus token, and the features of the accepted
    positions (root included) that the visual-token-free drafter continues from."""

    accepted: torch.Tensor  # (a,) indices into the DraftUpload's nodes, in path order
    bonus: int
    features: FeaturePayload
    chain: bool = False  # a chain's accepted path is its first a nodes: a count is enough
    drafted: int = 0  # nodes in the upload (sizes the index width)

    def nbytes(self, vocab_size: int) -> int:
        path = 1 if self.chain else 1 + len(self.accepted) * _index_bytes(self.drafted + 1)
        return HEADER_BYTES + path + id_bytes(vocab_size) + self.features.nbytes()

    def serialise(self, vocab_size: int) -> bytes:
        body = bytes([len(self.accepted)])
        if not self.chain:
            body += _ints(self.accepted, _index_bytes(self.drafted + 1))
        body += _ints(torch.tensor([self.bonus]), id_bytes(vocab_size))
        return _header(body + self.features.serialise())


@dataclass
class Correction(VerifyResult):
    """Edge -> device in the decoupled protocol: a rejection inside an optimistic chunk. The
    device rolls back to the accepted path, takes the bonus, and drops the chunks it drafted
    after the rejected one (`chunk` says which one was rejected)."""

    chunk: int = 0

    def nbytes(self, vocab_size: int) -> int:
        return super().nbytes(vocab_size) + 2

    def serialise(self, vocab_size: int) -> bytes:
        return super().serialise(vocab_size) + struct.pack("<H", self.chunk)


@dataclass
class ProgressiveUpload:
    """Device -> edge in the progressive protocol: the drafted tree's top-1 chain, plus the
    first token of every alternative branch that has drafted descendants, with its depth."""

    chain: torch.Tensor  # (n,) token ids of the top path
    alternatives: list[tuple[int, int]]  # (depth, token) heads of other drafted branches

    def nbytes(self, vocab_size: int) -> int:
        return (
            HEADER_BYTES
            + (len(self.chain) + len(self.alternatives)) * id_bytes(vocab_size)
            + len(self.alternatives)
        )

    def serialise(self, vocab_size: int) -> bytes:
        depths = bytes(d for d, _ in self.alternatives)
        tokens = torch.tensor([t for _, t in self.alternatives], dtype=torch.long)
        width = id_bytes(vocab_size)
        return _header(_ints(self.chain, width) + depths + _ints(tokens, width))


@dataclass
class MismatchNack:
    """Edge -> device in the progressive protocol: the top-1 chain broke at `depth`; the
    target wants `token` there. The device answers with the subtree under that token, if it
    drafted one, and the edge verifies it without a new drafting round."""

    depth: int
    token: int

    def nbytes(self, vocab_size: int) -> int:
        return HEADER_BYTES + 1 + id_bytes(vocab_size)

    def serialise(self, vocab_size: int) -> bytes:
        return _header(
            bytes([self.depth]) + _ints(torch.tensor([self.token]), id_bytes(vocab_size))
        )


@dataclass
class HiddenRequest:
    """Edge -> device, mismatch-first selective upload: send your state at this node."""

    node: int

    def __post_init__(self) -> None:
        if not 0 <= self.node < 256:  # one byte on the wire; trees verify far fewer nodes
            raise ValueError(f"node index {self.node} does not fit the request's 1-byte field")

    def nbytes(self, vocab_size: int) -> int:
        return HEADER_BYTES + 1

    def serialise(self, vocab_size: int) -> bytes:
        return _header(bytes([self.node]))


@dataclass
class HiddenUpload:
    """Device -> edge: the drafter's state rows the edge asked for."""

    hidden: torch.Tensor  # (h, D) at the wire dtype

    def nbytes(self, vocab_size: int) -> int:
        return HEADER_BYTES + self.hidden.numel() * self.hidden.element_size()

    def serialise(self, vocab_size: int) -> bytes:
        return _header(_tensor_bytes(self.hidden))


@dataclass
class TokenStream:
    """Edge -> device in `edge_only`: one decoded token per message (streamed as generated)."""

    token: int

    def nbytes(self, vocab_size: int) -> int:
        return HEADER_BYTES + id_bytes(vocab_size)

    def serialise(self, vocab_size: int) -> bytes:
        return _header(_ints(torch.tensor([self.token]), id_bytes(vocab_size)))


Message = (
    PromptUpload | FeatureDownlink | DraftUpload | VerifyResult | Correction | ProgressiveUpload
    | MismatchNack | HiddenRequest | HiddenUpload | TokenStream
)  # fmt: skip
