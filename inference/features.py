"""The drafter's feature path split between edge and device, with what crosses the link.

    >>> encode, decode = FeatureEncoder(drafter, wire_dtype=torch.float16), FeatureDecoder(drafter)
    >>> payload = encode(fused_states)    # on the edge: (n, n_layers * Ht) -> FeaturePayload
    >>> feats = decode(payload)           # on the device: (n, D) drafter input features

The visual-token-free drafter needs the target's fused states of every committed position. The
edge applies the drafter's projection `fc` (n_layers * Ht -> D) before sending, which is 3x
fewer numbers than the raw states; rows travel at `wire_dtype`. A drafter trained with the
feature codec (`feature_codec_rank` r) splits `fc` in two: the edge runs `fc_down` to r dims
and sends int8 codes with one float16 scale per row, the device runs `fc_up`. The text-only
drafter sends nothing. `decode(encode(x))` is what the drafter computes in training
(`Drafter.project_features`), up to the wire rounding of plain rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from covspec.inference.messages import FeaturePayload
from covspec.modeling.codec import dequantize, quantize_int8
from covspec.modeling.drafter import Drafter


class FeatureEncoder:
    """Edge half: fused target states -> the payload the device needs."""

    def __init__(self, drafter: Drafter, wire_dtype: torch.dtype | None = None) -> None:
        cfg = drafter.config
        self.off = not cfg.target_features
        self.codec = bool(cfg.feature_codec_rank) and not self.off
        if self.off:
            self.weight = None
        elif self.codec:
            self.weight = drafter.fc_down.weight.detach()
        else:
            self.weight = drafter.fc.weight.detach()
        # plain rows default to the drafter's own dtype: no rounding in the in-process runner
        self.wire_dtype = wire_dtype or drafter.dtype

    def __call__(self, fused: torch.Tensor) -> FeaturePayload:
        """fused: (n, n_layers * Ht) target states of the positions to send."""
        if self.off:
            return FeaturePayload()
        projected = F.linear(fused.to(self.weight.dtype), self.weight)  # (n, D) or (n, r)
        if self.codec:
            codes, scales = quantize_int8(projected)
            return FeaturePayload(codes=codes, scales=scales[:, 0].to(torch.float16))
        return FeaturePayload(values=projected.to(self.wire_dtype))


class FeatureDecoder:
    """Device half: the received payload -> (n, D) drafter input features."""

    def __init__(self, drafter: Drafter) -> None:
        cfg = drafter.config
        self.dim = cfg.hidden_size
        self.dtype, self.device = drafter.dtype, drafter.device
        self.up = drafter.fc_up.weight.detach() if getattr(drafter, "fc_up", None) else None

    def __call__(self, payload: FeaturePayload, rows: int) -> torch.Tensor:
        if payload.values is not None:
            return payload.values.to(self.device, self.dtype)
        if payload.codes is not None:
            scales = payload.scales[:, None].to(self.device, self.dtype)
            code = dequantize(payload.codes.to(self.device), scales)
            return F.linear(code, self.up)
        return torch.zeros(rows, self.dim, dtype=self.dtype, device=self.device)  # text-only
