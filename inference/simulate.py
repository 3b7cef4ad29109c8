"""`covspec simulate`: real decoding priced over simulated device-edge links, per protocol.

    >>> report = simulate("checkpoints/toy-target", ["checkpoints/toy-drafter"], samples, 96)
    >>> write_report(report, "checkpoints/simulate/toy.json")   # + .md table + .png figures

For every drafter, protocol, channel and compute setting, the samples are decoded for real by
the device and edge roles (so tau, acceptance, tokens and bytes are measured) and the decode is
priced on a `Timeline`: the link model gives message arrival times, the compute model gives
each model call's time (`measured`: this machine's wall time for the toy models; a roofline
profile: a real-size target and drafter on named hardware, simulated). Rows report per method:
latency per output token and per answer, time to first token, edge compute per output token (what
an edge operator pays), bytes per output token each way, rounds per answer, tau, the fraction of
answers identical to HF `generate`, and the speedup over `edge_only` under the same channel and
compute. An RTT sweep (one curve per protocol) shows where speculative decoding starts to beat
`edge_only` instead of picking presets that make it win.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from covspec.data.toy_world import answer_correct
from covspec.inference.acceptance import HeadRule, TypicalRule
from covspec.inference.compute import resolve_compute
from covspec.inference.link import PRESET_SOURCES, PRESETS, Link, resolve_channel
from covspec.inference.pages import TAU_DEFINITION
from covspec.inference.policies import LinkAwareDepth
from covspec.inference.protocols import run_protocol
from covspec.inference.roles import Request
from covspec.inference.runner import SpecRunner, priced_drafters
from covspec.inference.timeline import Timeline
from covspec.inference.tree import DraftSettings
from covspec.modeling.acceptance_head import AcceptanceHead, drafter_fingerprint

# protocol rows: (row name, protocol, adaptive depth?)
METHODS = {
    "edge_only": ("edge_only", False),
    "sync": ("sync", False),
    "sync_adaptive": ("sync", True),
    "decoupled": ("decoupled", False),
    "progressive": ("progressive", False),
}
# lossy rows, with --accept-head: sync verification by the head, drafter states uploaded in full
# with every draft or fetched at a mismatch (selective)
HEAD_METHODS = {"sync_head_full": "full", "sync_head_selective": "selective"}
# the CSI-blind baseline, with --typical EPS: Medusa's typical acceptance, one row per epsilon
TYPICAL = "sync_typical@"


def _is_lossy(method: str) -> bool:
    return method in HEAD_METHODS or method.startswith(TYPICAL)


@dataclass
class Tally:
    samples: int = 0
    tokens: int = 0
    rounds: int = 0
    latency_s: float = 0.0
    first_token_s: float = 0.0
    edge_s: float = 0.0
    device_s: float = 0.0
    up: int = 0
    down: int = 0
    decode_up: int = 0  # traffic of the decode loop only (after the prompt's exchange)
    decode_down: int = 0
    identical: int = 0
    correct: int = 0
    scored: int = 0
    asked: int = 0  # lossy rows: mismatches the rule decided on, and how many it accepted
    accepted: int = 0
    broken: int = 0  # answers correct under greedy decoding and wrong here (paired)
    mended: int = 0  # and the other way round
    depths: list[int] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)  # draft tokens verified / accepted per depth
    accepted_at: list[int] = field(default_factory=list)

    def add(
        self, result, same: bool, depths: list[int], correct: bool | None = None,
        decisions: tuple[int, int] | None = None, greedy_correct: bool | None = None,
    ) -> None:  # fmt: skip
        if correct is not None and greedy_correct is not None:
            self.broken += greedy_correct and not correct
            self.mended += correct and not greedy_correct
        if decisions is not None:
            self.asked += decisions[0]
            self.accepted += decisions[1]
        if correct is not None:
            self.scored += 1
            self.correct += correct
        self.samples += 1
        self.tokens += len(result.tokens)
        self.rounds += result.rounds
        self.latency_s += result.end_s
        self.first_token_s += result.first_token_s
        self.edge_s += result.edge_s
        self.device_s += result.device_s
        self.up += result.uplink_bytes
        self.down += result.downlink_bytes
        self.decode_up += sum(r.uplink_bytes for r in result.records)
        self.decode_down += sum(r.downlink_bytes for r in result.records)
        self.identical += same
        self.depths += depths
        for mine, theirs in ((self.attempts, result.attempts_per_depth),
                             (self.accepted_at, result.accepted_per_depth)):  # fmt: skip
            mine += [0] * (len(theirs) - len(mine))
            for i, n in enumerate(theirs):
                mine[i] += n

    def row(self) -> dict:
        n, tok = max(self.samples, 1), max(self.tokens, 1)
        decode_tokens = max(self.tokens - self.samples, 1)
        return {
            "latency_per_token_ms": 1e3 * self.latency_s / tok,
            "latency_per_answer_ms": 1e3 * self.latency_s / n,
            "time_to_first_token_ms": 1e3 * self.first_token_s / n,
            "edge_compute_per_token_ms": 1e3 * self.edge_s / tok,
            "device_compute_per_token_ms": 1e3 * self.device_s / tok,
            "uplink_bytes_per_token": self.up / tok,
            "downlink_bytes_per_token": self.down / tok,
            "decode_uplink_bytes_per_token": self.decode_up / tok,
            "decode_downlink_bytes_per_token": self.decode_down / tok,
            "prompt_downlink_bytes_per_answer": (self.down - self.decode_down) / n,
            "rounds_per_answer": self.rounds / n,
            "tau": decode_tokens / self.rounds if self.rounds else None,
            "tokens_per_answer": self.tokens / n,
            "identical_fraction": self.identical / n,
            "task_accuracy": self.correct / self.scored if self.scored else None,
            "answers_broken": self.broken if self.scored else None,
            "answers_mended": self.mended if self.scored else None,
            "mismatches_per_answer": self.asked / n if self.asked else None,
            "mismatch_accept_rate": self.accepted / self.asked if self.asked else None,
            "mean_draft_depth": sum(self.depths) / len(self.depths) if self.depths else None,
            # conditional: accepted at depth d among the draft tokens verified at depth d
            "acceptance_per_depth": [
                a / n if n else None for a, n in zip(self.accepted_at, self.attempts, strict=True)
            ],
            "acceptance_rate": sum(self.accepted_at) / sum(self.attempts)
            if sum(self.attempts)
            else None,
        }


def _policy(adaptive: bool, settings: DraftSettings, max_depth: int):
    return LinkAwareDepth(settings, max_depth=max_depth) if adaptive else settings


def _decode(runner, method, sample, max_new, timeline, settings, max_depth, head=None, preset=None):
    """(result, adaptive depths chosen, (mismatches decided, accepted) of a lossy rule)."""
    req = Request(sample["image"], sample["prompt"], max_new)
    if _is_lossy(method):
        if method in HEAD_METHODS:
            rule, upload = HeadRule(head, preset=preset), HEAD_METHODS[method]
        else:
            rule, upload = TypicalRule(float(method.removeprefix(TYPICAL))), "full"
        result = run_protocol("sync", runner, req, timeline, settings, rule=rule, upload=upload)
        return result, [], (len(rule.events), sum(e.accepted for e in rule.events))
    protocol, adaptive = METHODS[method]
    policy = _policy(adaptive, settings, max_depth)
    result = run_protocol(protocol, runner, req, timeline, policy)
    depths = list(policy.chosen) if adaptive else []
    return result, depths, None


def greedy_tokens(runner: SpecRunner, sample: dict, max_new: int) -> list[int]:
    """The target's own greedy answer (HF `generate`): what lossless decoding must equal."""
    return runner.greedy(sample["image"], sample["prompt"], max_new)


@dataclass
class SimulationPlan:
    drafters: list[str]
    methods: list[str]
    channels: list[str]
    computes: list[str]
    rtt_sweep_ms: list[float]
    sweep_channel: str = "medium"
    sweep_compute: str = "a40-orin-7b"
    settings: DraftSettings = field(default_factory=lambda: DraftSettings(mode="tree", depth=6, top_k=2, beam=2, max_nodes=10, branch_margin=0.5))  # fmt: skip
    max_depth: int = 12
    seed: int = 0
    accept_head: str | None = None
    gate_cost_weights: list[float] = field(default_factory=list)  # prices of a prefix row
    typical: list[float] = field(default_factory=list)  # epsilons of typical-acceptance rows

    def __post_init__(self) -> None:
        if self.accept_head:
            self.methods = list(self.methods) + [m for m in HEAD_METHODS if m not in self.methods]
        bad = [e for e in self.typical if not 0 < e <= 1]
        if bad or len(set(self.typical)) < len(self.typical):
            raise ValueError(f"typical epsilons must be distinct, in (0, 1], got {self.typical}")
        self.methods = list(self.methods) + [f"{TYPICAL}{e:g}" for e in self.typical]
        unknown = [m for m in self.methods if m not in METHODS and not _is_lossy(m)]
        if unknown:
            raise ValueError(f"unknown protocol(s) {unknown}; known: {list(METHODS)}")
        for name in self.computes + [self.sweep_compute]:
            resolve_compute(name)
        for spec in self.channels + [self.sweep_channel]:
            resolve_channel(spec)
        if any(r <= 0 for r in self.rtt_sweep_ms):
            raise ValueError(f"RTTs must be > 0 ms, got {self.rtt_sweep_ms}")
        adaptive = any(METHODS.get(m, (None, False))[1] for m in self.methods)
        if adaptive and not 1 <= self.settings.depth <= self.max_depth:  # LinkAwareDepth's range
            raise ValueError(
                f"need 1 <= depth <= max_depth, got depth {self.settings.depth}, "
                f"max_depth {self.max_depth}"
            )


def _runs(plan: SimulationPlan, drafters: list[str]):
    """(section, drafter run name, method, channel spec, compute name) for every decode."""
    for compute in plan.computes:
        for channel in plan.channels:
            yield "table", None, "edge_only", channel, compute
            for k, drafter in enumerate(drafters):
                for method in plan.methods:
                    if method != "edge_only" and (k == 0 or not _is_lossy(method)):
                        yield "table", drafter, method, channel, compute
    for rtt in plan.rtt_sweep_ms:
        channel = f"{plan.sweep_channel}@rtt{rtt:g}"
        yield "sweep", None, "edge_only", channel, plan.sweep_compute
        for method in plan.methods:
            if method != "edge_only" and not _is_lossy(method):
                yield "sweep", drafters[0], method, channel, plan.sweep_compute


def simulate(target: str, plan: SimulationPlan, samples: list[dict], max_new_tokens: int) -> dict:
    """Decode every sample for every run of `plan`; returns the report dict."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not plan.drafters:
        raise ValueError("simulate needs at least one --drafter")
    model = AutoModelForImageTextToText.from_pretrained(target).eval()
    processor = AutoProcessor.from_pretrained(target)
    runners = {None: SpecRunner(model, processor, None)}
    names = []  # drafter runs: an elastic drafter once per price
    for path, weight, name in priced_drafters(plan.drafters, plan.gate_cost_weights):
        runners[name] = SpecRunner.for_drafter_folder(model, processor, path, weight)
        names.append(name)
    refs = [greedy_tokens(runners[None], s, max_new_tokens) for s in samples]
    decode = processor.tokenizer.decode
    refs_correct = [
        task_correct(s, decode(r, skip_special_tokens=True))
        for s, r in zip(samples, refs, strict=True)
    ]
    head = load_head(plan.accept_head, runners[names[0]]) if plan.accept_head else None
    runs = list(_runs(plan, names))
    rows, timeline_example = [], None
    for section, drafter, method, channel, compute in tqdm(runs, desc="simulate", unit="run"):
        tally = Tally()
        runner = runners[drafter]
        for i, sample in enumerate(samples):
            link = Link(resolve_channel(channel), seed=plan.seed + i)
            timeline = Timeline(link, resolve_compute(compute), runner.adapter.vocab_size)
            result, depths, decisions = _decode(
                runner, method, sample, max_new_tokens, timeline, plan.settings, plan.max_depth,
                head, channel.split("@")[0],
            )  # fmt: skip
            correct = task_correct(sample, result.text)
            tally.add(result, result.tokens == refs[i], depths, correct, decisions, refs_correct[i])
            if i == 0 and section == "table" and channel == plan.channels[-1]:
                timeline_example = timeline_example or {}
                timeline_example.setdefault(f"{method}|{compute}", _events(timeline))
        rows.append(
            {
                "section": section,
                "drafter": drafter,
                "protocol": method,
                "channel": channel,
                "compute": compute,
                **tally.row(),
            }
        )
    _speedups(rows)
    return {
        "target": str(target),
        "num_samples": len(samples),
        "greedy_task_accuracy": _mean([c for c in refs_correct if c is not None]),
        "max_new_tokens": max_new_tokens,
        "tau_definition": TAU_DEFINITION,
        "settings": plan.settings.__dict__,
        "max_adaptive_depth": plan.max_depth,
        "channels": {name: _describe(name) for name in sorted(set(plan.channels))},
        "preset_sources": PRESET_SOURCES,
        "computes": {
            name: _compute_doc(name) for name in sorted(set(plan.computes + [plan.sweep_compute]))
        },
        "rows": rows,
        "timeline_example": timeline_example,
        "torch_threads": torch.get_num_threads(),
    }


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def task_correct(sample: dict, text: str) -> bool | None:
    """Task accuracy where the sample carries ground truth (toy scenes)."""
    if "objects" not in sample:
        return None
    return answer_correct(sample["objects"], sample["prompt"], sample.get("reference", ""), text)


def load_head(folder: str, runner: SpecRunner) -> AcceptanceHead:
    """The acceptance head, refused by name when trained for another target or drafter."""
    head = AcceptanceHead.from_pretrained(folder)
    digests = {drafter_fingerprint(runner.drafter, legacy) for legacy in (False, True)}
    head.check_pair(runner.adapter, digests, runner.drafter.name_or_path)
    return head.eval()


def _speedups(rows: list[dict]) -> None:
    base = {
        (r["section"], r["channel"], r["compute"]): r["latency_per_token_ms"]
        for r in rows
        if r["protocol"] == "edge_only"
    }
    for r in rows:
        ref = base.get((r["section"], r["channel"], r["compute"]))
        r["speedup_vs_edge_only"] = ref / r["latency_per_token_ms"] if ref else None
        r["edge_compute_saving_vs_edge_only"] = None
    edge = {
        (r["section"], r["channel"], r["compute"]): r["edge_compute_per_token_ms"]
        for r in rows
        if r["protocol"] == "edge_only"
    }
    for r in rows:
        ref = edge.get((r["section"], r["channel"], r["compute"]))
        if ref and r["edge_compute_per_token_ms"]:
            r["edge_compute_saving_vs_edge_only"] = ref / r["edge_compute_per_token_ms"]


def _events(timeline: Timeline) -> dict:
    return {"compute": timeline.intervals, "messages": timeline.messages}


def _describe(spec: str) -> dict:
    channel = resolve_channel(spec)
    if spec.split("@")[0] in PRESETS:
        return {
            "description": channel.description,
            "rtt_ms": channel.rtt_ms,
            "rtt_jitter_ms": channel.rtt_jitter_ms,
            "uplink": channel.uplink.__dict__,
            "downlink": channel.downlink.__dict__,
            "overhead_bytes": channel.overhead_bytes,
        }
    return {"trace": spec, "rows": len(channel.rows)}


def _compute_doc(name: str) -> dict:
    c = resolve_compute(name)
    if name == "measured":
        return {
            "description": "wall time of every model call on this machine (toy models), measured"
        }
    return {
        "description": c.name,
        "edge": {**c.edge.__dict__},
        "device": {**c.device.__dict__},
        "target": {**c.target.__dict__},
        "drafter": {**c.drafter.__dict__},
    }
