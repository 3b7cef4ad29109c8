"""Compute time per role: measured on this machine, or a roofline profile of real hardware.

    >>> op = Op("edge", "verify", tokens=9, forwards=1, context=620, measured_s=0.011)
    >>> MEASURED.seconds(op)                                  # 0.011: what this CPU took
    >>> PROFILES["a40-orin-7b"].seconds(op)                   # a 7B target on an A40 (simulated)

Every model call the device-edge runtime makes is an `Op`: which role, what kind of call, how
many token rows, how many sequential forwards (a draft round is one forward per tree level), and
how long the context is. `MeasuredCompute` returns the wall time the call took here (the toy
models on this CPU). `RooflineCompute` prices the same call on named hardware running a named
real-size model: a forward streams the weights and the KV cache once, so it costs
max(bytes / (bandwidth x efficiency), flops / (peak x efficiency)) plus a fixed launch overhead,
with flops = 2 x parameters x rows plus attention over the context. Token counts come from the
real run; only the pricing is simulated, and reports say so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Role = Literal["device", "edge"]


@dataclass(frozen=True)
class Op:
    role: Role
    kind: str  # vision, prefill, verify, step, project | drafter_prefill, draft, commit
    tokens: int  # rows computed
    forwards: int = 1  # sequential forward passes (tree levels for a draft)
    context: int = 0  # cached positions each row attends to
    measured_s: float = 0.0  # wall seconds here


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bandwidth: float  # bytes / s
    peak_flops: float  # dense bf16/fp16 tensor FLOP / s
    bandwidth_efficiency: float = 0.7  # achieved fraction of peak bandwidth (decode kernels)
    compute_efficiency: float = 0.5  # achieved fraction of peak FLOPs (prefill GEMMs)
    launch_overhead_s: float = 2e-4  # per forward: kernel launches, sampling, bookkeeping
    source: str = ""


@dataclass(frozen=True)
class ModelCost:
    """A real-size model as the roofline sees it (bf16 weights and cache)."""

    name: str
    params: float  # parameters touched per row (embedding lookups excluded)
    layers: int
    hidden: int
    kv_bytes_per_token: float  # keys + values of all layers for one cached position
    bytes_per_param: float = 2.0
    vision_params: float = 0.0  # the vision tower, run once per image over its patches


@dataclass(frozen=True)
class RooflineCompute:
    """Device and edge hardware with the models they run; `seconds(op)` prices one call."""

    name: str
    edge: Hardware
    target: ModelCost
    device: Hardware
    drafter: ModelCost
    device_vlm: ModelCost | None = None  # the device's small VLM, when it drafts instead

    def with_device_vlm(self) -> RooflineCompute:
        """The same hardware with the small VLM as the device's drafter."""
        if self.device_vlm is None:
            raise ValueError(f"compute profile {self.name} has no small-VLM device model")
        return replace(self, name=f"{self.name}+vlm", drafter=self.device_vlm)

    def seconds(self, op: Op) -> float:
        hw, model = (self.edge, self.target) if op.role == "edge" else (self.device, self.drafter)
        params = model.vision_params if op.kind == "vision" else model.params
        if op.kind == "project":  # the drafter's feature projection, run on the edge
            params = 3 * self.drafter.hidden * self.drafter.hidden
        weight_bytes = params * model.bytes_per_param * op.forwards
        kv_bytes = 0.0 if op.kind in ("vision", "project") else model.kv_bytes_per_token
        memory = weight_bytes + kv_bytes * op.context * op.forwards
        attention = 0.0 if op.kind in ("vision", "project") else 4.0 * model.layers * model.hidden
        flops = 2.0 * params * op.tokens + attention * op.tokens * (op.context + op.tokens / 2)
        return op.forwards * hw.launch_overhead_s + max(
            memory / (hw.memory_bandwidth * hw.bandwidth_efficiency),
            flops / (hw.peak_flops * hw.compute_efficiency),
        )


class MeasuredCompute:
    """The wall time each call took in this process (the toy models on this machine)."""

    name = "measured"

    def seconds(self, op: Op) -> float:
        return op.measured_s


MEASURED = MeasuredCompute()

A40 = Hardware(
    "NVIDIA A40",
    memory_bandwidth=696e9,
    peak_flops=149.7e12,
    source="NVIDIA A40 datasheet: 48 GB GDDR6 at 696 GB/s, 149.7 TFLOPS dense BF16 tensor",
)
ORIN = Hardware(
    "Jetson AGX Orin 64GB",
    memory_bandwidth=204.8e9,
    peak_flops=42.5e12,
    launch_overhead_s=5e-4,
    source=(
        "NVIDIA Jetson AGX Orin 64GB: LPDDR5 at 204.8 GB/s; GPU 170 sparse INT8 TOPS, so "
        "~42.5 dense FP16 TFLOPS (sparse/2 for dense, INT8/2 for FP16)"
    ),
)
LLAVA_7B = ModelCost(
    "LLaVA-1.5-7B (Vicuna-7B + CLIP ViT-L/14-336)",
    params=6.48e9,  # 32 layers x 202M + LM head 131M; input embeddings are lookups
    layers=32,
    hidden=4096,
    kv_bytes_per_token=2 * 32 * 4096 * 2,  # K and V, 32 layers, 32 heads x 128, bf16
    vision_params=0.30e9,
)
EAGLE3_7B = ModelCost(
    "EAGLE-3 drafter for a 7B target (1 layer, 32k draft vocabulary)",
    # q/k/v from 2H: 3 x 2H x H; o: H x H; MLP: 3 x H x 11008; draft head 32000 x H
    params=3 * 2 * 4096**2 + 4096**2 + 3 * 4096 * 11008 + 32000 * 4096,
    layers=1,
    hidden=4096,
    kv_bytes_per_token=2 * 4096 * 2,
)
SMALL_VLM = ModelCost(
    "LLaVA-OneVision-0.5B class small VLM (Qwen2-0.5B + SigLIP-400M)",
    params=0.36e9 + 151_936 * 896,  # 24 layers x 15M + the tied LM head
    layers=24,
    hidden=896,
    kv_bytes_per_token=2 * 24 * 128 * 2,  # K and V, 24 layers, 2 KV heads x 64, bf16
    vision_params=0.40e9,
)
PROFILES: dict[str, RooflineCompute] = {
    "a40-orin-7b": RooflineCompute(
        "a40-orin-7b (simulated: LLaVA-1.5-7B on an A40 edge, EAGLE-3 drafter or a 0.5B small "
        "VLM on a Jetson AGX Orin)",
        edge=A40,
        target=LLAVA_7B,
        device=ORIN,
        drafter=EAGLE3_7B,
        device_vlm=SMALL_VLM,
    ),
}


def resolve_compute(name: str) -> MeasuredCompute | RooflineCompute:
    if name == "measured":
        return MEASURED
    if name in PROFILES:
        return PROFILES[name]
    raise ValueError(
        f"unknown compute setting {name!r}: use 'measured' or one of {sorted(PROFILES)}"
    )
