"""The feature codec's wire format: symmetric per-row int8 codes with one scale per row.

>>> codes, scales = quantize_int8(code)      # (..., r) -> int8 (..., r), (..., 1)
>>> approx = dequantize(codes, scales)       # what the device reconstructs
"""

from __future__ import annotations

import torch


def quantize_int8(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (..., r) -> codes (..., r) int8 and scales (..., 1)."""
    scale = code.detach().abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127.0
    return (code / scale).round().clamp(-127, 127).to(torch.int8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.to(scale.dtype) * scale
