"""Side-by-side benchmark: our runner vs what users would otherwise run, in one process.

    >>> report = run_bench("checkpoints/toy-target", ["checkpoints/toy-drafter"], samples, 96)
    >>> bench_report.write_report(report, "bench.json")  # + .md table, .png, -pareto.png
    >>> run_bench(target, ["checkpoints/toy-drafter-elastic"], samples, 96,
    ...           gate_cost_weights=[0.0, 0.02, 0.05])   # one elastic drafter, three prices

Methods per sample, interleaved (a seeded shuffled order) after a warm-up so machine noise hits
all alike (`repeats=R`: R such rounds per sample, each method's fastest run kept):
`hf_greedy` (the target's own `generate`, the baseline), `hf_prompt_lookup` (transformers'
prompt-lookup decoding) and, for every drafter, the runner in `chain` and `tree` mode. Every
method is timed from raw prompt to tokens (processor included) and its token ids compared with
`hf_greedy`'s, token for token; each sample's ids are stored beside its decoded text. tau = tokens emitted per target forward in the decode loop, bonus included.
Per drafter the report also holds the visual rows it carries (0 visual-token-free, every
visual token for a full prefix, the compressor's rows), its ms per draft step and, for an
elastic compressor, the gate's choices per prompt kind (a sample's `kind`). `gate_cost_weights`
runs each critic-gated drafter once per price of a prefix row (methods `NAME@cwW/MODE`): one
trained elastic drafter, several operating points on its tau / rows curve, no retraining.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import zip_longest

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from covspec.inference.pages import TAU_DEFINITION
from covspec.inference.roles import now
from covspec.inference.runner import SpecRunner, priced_drafters
from covspec.inference.tree import DraftSettings
from covspec.modeling.drafter import DrafterConfig


@dataclass
class _Tally:
    kind: str
    drafter: str | None = None
    mode: str | None = None
    seconds: float = 0.0
    tokens: int = 0
    decode_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    attempts: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    identical: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # runner phase -> seconds
    visual_tokens: int = 0  # the target's visual tokens, summed over samples
    prefix_tokens: int = 0  # compressed visual prefix rows, summed over samples
    draft_steps: int = 0  # drafter forwards while drafting
    kv_bytes: int = 0  # the drafter's KV cache at the end of each sample, summed
    gate_choices: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> option -> n
    kind_rounds: dict[str, list[int]] = field(default_factory=dict)  # kind -> [tokens, rounds]
    gate_cost_weight: float | None = None  # the price the drafter's gate ran at
    repeats_disagreed: int = 0  # samples whose repeated runs gave different tokens

    def add_result(self, result, kind: str) -> list[int]:
        """Count one runner result (prompt kind `kind`); returns [decoded tokens, rounds]."""
        decoded = max(0, len(result.tokens) - 1)  # the prefill's token is not decoded
        self.decode_tokens += decoded
        self.rounds += result.rounds
        self.drafted += result.drafted
        self.attempts = _add_per_depth(self.attempts, result.attempts_per_depth)
        self.accepted = _add_per_depth(self.accepted, result.accepted_per_depth)
        for phase, sec in result.seconds.items():
            self.phases[phase] = self.phases.get(phase, 0.0) + sec
        self.visual_tokens += result.visual_tokens
        self.prefix_tokens += result.prefix_tokens
        self.draft_steps += result.draft_steps
        self.kv_bytes += result.drafter_kv_bytes
        per_kind = self.kind_rounds.setdefault(kind, [0, 0])
        per_kind[0] += decoded
        per_kind[1] += result.rounds
        if result.gate_choice is not None:
            picks = self.gate_choices.setdefault(kind, {})
            picks[result.gate_choice] = picks.get(result.gate_choice, 0) + 1
        return [decoded, result.rounds]


def _hf_method(encoder: SpecRunner, extra: dict):
    def run(image, prompt, max_new_tokens):
        return encoder.greedy(image, prompt, max_new_tokens, **extra), None

    return run


def _spec_method(runner: SpecRunner, settings: DraftSettings):
    def run(image, prompt, max_new_tokens):
        result = runner.generate(image, prompt, max_new_tokens, settings)
        return result.tokens, result

    return run


def build_methods(
    model,
    processor,
    drafters: list[str],
    chain: DraftSettings,
    tree: DraftSettings,
    modes: tuple[str, ...] = ("chain", "tree"),
    policies: dict | None = None,
    gate_cost_weights: Sequence[float] = (),
    tree_depths: Sequence[int] = (),
):
    """hf_greedy, hf_prompt_lookup, every drafter in each of `modes` (a critic-gated one once
    per weight of `gate_cost_weights`, when given; in tree mode once per depth of
    `tree_depths`, methods `NAME/tree@dD`, when given), and each of `policies` ({name:
    factory(runners by drafter name) -> object with the runner's `generate`}, run in tree
    mode)."""
    # `greedy` suppresses what the runner does (visual placeholders); that also keeps prompt
    # lookup from proposing image tokens copied out of the prompt, which crashes HF's VLMs.
    encoder = SpecRunner(model, processor, None)
    methods = {
        "hf_greedy": (_Tally("baseline"), _hf_method(encoder, {})),
        "hf_prompt_lookup": (
            _Tally("baseline"),
            _hf_method(encoder, {"prompt_lookup_num_tokens": 10}),
        ),
    }
    runners = {}
    for path, weight, name in priced_drafters(drafters, gate_cost_weights):
        runner = SpecRunner.for_drafter_folder(model, processor, path, weight)
        runners[name] = runner
        variants = [(chain, "")] if "chain" in modes else []
        if "tree" in modes:
            variants += [(replace(tree, depth=d), f"@d{d}") for d in tree_depths] or [(tree, "")]
        for settings, suffix in variants:
            methods[f"{name}/{settings.mode}{suffix}"] = (
                _Tally(
                    "speculative",
                    path,
                    settings.mode,
                    attempts=[0] * settings.depth,
                    accepted=[0] * settings.depth,
                    gate_cost_weight=runner.gate_cost_weight,
                ),
                _spec_method(runner, settings),
            )
    for name, factory in (policies or {}).items():
        tally = _Tally(
            "speculative", None, tree.mode, attempts=[0] * tree.depth, accepted=[0] * tree.depth
        )
        methods[f"{name}/{tree.mode}"] = (tally, _spec_method(factory(runners), tree))
    return methods


@torch.inference_mode()
def run_bench(
    target: str,
    drafters: list[str],
    samples: list[dict],
    max_new_tokens: int,
    chain: DraftSettings | None = None,
    tree: DraftSettings | None = None,
    warmup: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    modes: tuple[str, ...] = ("chain", "tree"),
    policies: dict | None = None,
    gate_cost_weights: Sequence[float] = (),
    tree_depths: Sequence[int] = (),
    repeats: int = 1,
    prompt_lookup: bool = True,
) -> dict:
    """samples: [{"id", "image": PIL.Image, "prompt"}]. Returns the report dict (see module doc).
    `repeats`: rounds of every method per sample, each method's fastest run kept (its time,
    phases and tokens); `prompt_lookup=False` leaves that baseline out."""
    if max_new_tokens < 1:  # zero tokens would make every method "identical" to the baseline
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    chain = chain or DraftSettings(mode="chain", depth=6)
    tree = tree or DraftSettings(mode="tree", depth=6)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    # target and drafters in one dtype; in bf16 a multi-token verify rounds differently from
    # one-token steps, so identical_fraction is a measured rate there, not a guarantee
    model = AutoModelForImageTextToText.from_pretrained(target, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(target)
    methods = build_methods(
        model, processor, drafters, chain, tree, modes, policies, gate_cost_weights, tree_depths
    )
    if not prompt_lookup:
        del methods["hf_prompt_lookup"]
    names = list(methods)
    for s in samples[:warmup]:
        for name in names:
            methods[name][1](s["image"], s["prompt"], max_new_tokens)
    rows = []
    for i, s in enumerate(tqdm(samples, desc="bench", unit="sample")):
        outputs, token_ids, decode, seconds = {}, {}, {}, {}
        timed = _timed_rounds(methods, s, i, max_new_tokens, repeats, model.device)
        for name in names:
            tally = methods[name][0]
            tokens, result, seconds[name], agreed = timed[name]
            tally.repeats_disagreed += not agreed
            tally.seconds += seconds[name]
            tally.tokens += len(tokens)
            token_ids[name] = [int(t) for t in tokens]
            outputs[name] = processor.tokenizer.decode(tokens, skip_special_tokens=True)
            if result is not None:
                decode[name] = tally.add_result(result, s.get("kind", "all"))
        for name in names:  # token for token: decoded text hides special tokens and spacing
            methods[name][0].identical += token_ids[name] == token_ids["hf_greedy"]
        rows.append(
            {
                "id": s["id"],
                "outputs": outputs,
                "token_ids": token_ids,
                "decode": decode,
                "seconds": seconds,  # per method: paired comparisons over samples
            }
        )
    report = _report(target, samples, max_new_tokens, methods, rows)
    report["device"], report["dtype"], report["repeats"] = str(model.device), dtype, repeats
    return report


def method_order(names, seed: int) -> list[str]:
    """`names` in a shuffled order seeded by `seed`: what timed methods run in, one sample or
    round after another. A rotation would leave every method behind the same one each time (the
    one after `generate` always running on the caches it left)."""
    order = list(names)
    random.Random(seed).shuffle(order)
    return order


def _timed_rounds(
    methods: dict, sample: dict, turn: int, max_new_tokens: int, repeats: int, device
) -> dict[str, tuple]:
    """name -> (tokens, result, seconds, agreed): every method once per round, `repeats`
    rounds, each method's fastest run kept, in an order seeded by `turn` and the round
    (`method_order`). Noise here comes in bursts of seconds and only ever adds time; rounds
    spread a method's runs over time and the minimum is its steadiest estimate. `agreed`: every round gave the same tokens (greedy decoding is
    deterministic; a mismatch is reported, not hidden)."""
    runs: dict[str, list[tuple]] = {name: [] for name in methods}
    for r in range(repeats):
        for name in method_order(methods, turn * 1009 + r):
            start = now(device)
            tokens, result = methods[name][1](sample["image"], sample["prompt"], max_new_tokens)
            runs[name].append((tokens, result, now(device) - start))
    return {
        name: (*min(got, key=lambda run: run[2]), all(run[0] == got[0][0] for run in got))
        for name, got in runs.items()
    }


def _add_per_depth(total: list[int], new: list[int]) -> list[int]:
    """Per-depth counts summed; a policy that ties depth to the input drafts to several."""
    return [a + b for a, b in zip_longest(total, new, fillvalue=0)]


def _report(target, samples, max_new_tokens, methods, rows) -> dict:
    base = methods["hf_greedy"][0]
    base_tps = base.tokens / base.seconds if base.seconds else 0.0
    out = {}
    for name, (t, _) in methods.items():
        tps = t.tokens / t.seconds if t.seconds else 0.0
        spec = t.kind == "speculative"
        kind = _prefix_kind(t.drafter) if spec else None
        out[name] = {
            "kind": t.kind,
            "drafter": t.drafter,
            "mode": t.mode,
            "tokens_per_s": tps,
            "speedup": tps / base_tps if base_tps else None,  # undefined without tokens
            "tau": (t.decode_tokens / t.rounds if t.rounds else None) if spec else None,
            "mean_drafted": (t.drafted / t.rounds if t.rounds else None) if spec else None,
            "acceptance_per_depth": [
                a / n if n else None  # a depth never drafted has no rate (not 0%)
                for a, n in zip(t.accepted, t.attempts, strict=True)
            ]
            if spec
            else None,
            "identical_fraction": t.identical / max(1, len(samples)),
            "repeats_disagreed": t.repeats_disagreed,
            "ms_per_sample": _ms_per_sample(t, len(samples)),
            # what the drafter carries and what one of its steps costs (Pareto plot)
            "visual_prefix_tokens": _visual_prefix(t, kind, len(samples)),
            "drafter_ms_per_step": 1000 * t.phases.get("draft", 0.0) / t.draft_steps
            if t.draft_steps
            else None,
            "drafter_kv_bytes": t.kv_bytes / max(1, len(samples)) if spec else None,
            "visual_tokens": t.visual_tokens / max(1, len(samples)) if spec else None,
            "gate_choices": t.gate_choices if kind == "gated" else None,
            "gate_cost_weight": t.gate_cost_weight if kind == "gated" else None,
            "prefix_kind": kind,
            "tau_per_kind": {k: n / r for k, (n, r) in sorted(t.kind_rounds.items()) if r}
            if spec
            else None,
        }
    return {
        "target": str(target),
        "num_samples": len(samples),
        "max_new_tokens": max_new_tokens,
        "torch_threads": torch.get_num_threads(),
        "tau_definition": TAU_DEFINITION,
        "methods": out,
        "samples": rows,
    }


PHASES = ("encode", "prefill", "drafter_prefill", "draft", "verify", "commit")


def _prefix_kind(drafter: str | None) -> str | None:
    """What visual rows a drafter carries: "free" (none: visual-token-free, or a compressor
    whose one option is `none`), "full", "primitive" (one fixed compressor option) or "gated"
    (a gate over several); None for a policy over several drafters."""
    if drafter is None:
        return None
    cfg = DrafterConfig.from_pretrained(drafter)
    if cfg.visual_prefix != "compressed":
        return "full" if cfg.visual_prefix == "full" else "free"
    options = cfg.compressor_config().options
    if len(options) > 1:
        return "gated"
    return "free" if options[0] == "none" else "primitive"


def _visual_prefix(t: _Tally, kind: str | None, n: int) -> float | None:
    """Mean visual rows in the drafter's cache (`kind` from `_prefix_kind`): every visual
    token for a full prefix, the compressor's rows otherwise (none for a visual-token-free
    drafter); None for a policy over several drafters (its drafter_kv_bytes says what its
    choices carried) and for the baselines."""
    if kind is None:
        return None
    return (t.visual_tokens if kind == "full" else t.prefix_tokens) / max(1, n)


def _ms_per_sample(t: _Tally, n: int) -> dict[str, float]:
    """Wall ms per sample: the total, and for the runner its phases plus `other` (the rest)."""
    n = max(1, n)
    out = {"total": 1000 * t.seconds / n}
    if t.phases:
        out.update({p: 1000 * t.phases.get(p, 0.0) / n for p in PHASES})
        out["other"] = out["total"] - sum(out[p] for p in PHASES)
    return out
