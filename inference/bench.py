"""Side-by-side benchmark: our runner vs what users would otherwise run, in one process.

    >>> report = run_bench("checkpoints/toy-target", ["checkpoints/toy-drafter"], samples, 96)
    >>> write_report(report, "bench.json")      # + bench.md table + bench.png plot
    ...                                         # (+ bench-pareto.png with several drafters)

Methods per sample, interleaved (rotating order) after a warm-up so machine noise hits all alike:
`hf_greedy` (the target's own `generate`, the baseline), `hf_prompt_lookup` (transformers'
prompt-lookup decoding) and, for every drafter, the runner in `chain` and `tree` mode. Every
method is timed from raw prompt to tokens (processor included) and its token ids compared with
`hf_greedy`'s, token for token; each sample's ids are stored beside its decoded text. tau = tokens emitted per target forward in the decode loop, bonus included.
Per drafter the report also holds the visual rows it carries (0 visual-token-free, every
visual token for a full prefix, the compressor's rows), its ms per draft step and, for an
elastic compressor, the gate's choices per prompt kind (a sample's `kind`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from covspec.inference.roles import now
from covspec.inference.runner import SpecRunner, suppressed_tokens
from covspec.inference.tree import DraftSettings
from covspec.modeling.adapters import adapter_for
from covspec.modeling.drafter import DrafterConfig

TAU_DEFINITION = "tau = tokens emitted per target forward in the decode loop, the bonus token included (ceiling: depth + 1)"


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


def _hf_method(encoder: SpecRunner, extra: dict):
    model = encoder.model

    def run(image, prompt, max_new_tokens):
        inputs = encoder.encode(image, prompt)  # the runner's prompt: same tokens, same media
        if max_new_tokens <= 0:
            return [], None
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, **extra)
        return out[0, inputs["input_ids"].shape[1] :].tolist(), None

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
):
    """hf_greedy, hf_prompt_lookup, every drafter in each of `modes`, and each of `policies`
    ({name: factory(runners by drafter folder name) -> object with the runner's `generate`},
    run in tree mode)."""
    # Same suppressed tokens as the runner (visual placeholders); it also keeps prompt lookup
    # from proposing image tokens copied out of the prompt, which crashes transformers' VLMs.
    suppress = {"suppress_tokens": suppressed_tokens(model, adapter_for(model))}
    encoder = SpecRunner(model, processor, None)
    methods = {
        "hf_greedy": (_Tally("baseline"), _hf_method(encoder, suppress)),
        "hf_prompt_lookup": (
            _Tally("baseline"),
            _hf_method(encoder, {**suppress, "prompt_lookup_num_tokens": 10}),
        ),
    }
    runners = {}
    for path in drafters:
        runner = SpecRunner.for_drafter_folder(model, processor, path)
        name = Path(path).name
        runners[name] = runner
        for settings in (s for s in (chain, tree) if s.mode in modes):
            methods[f"{name}/{settings.mode}"] = (
                _Tally(
                    "speculative",
                    path,
                    settings.mode,
                    attempts=[0] * settings.depth,
                    accepted=[0] * settings.depth,
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
) -> dict:
    """samples: [{"id", "image": PIL.Image, "prompt"}]. Returns the report dict (see module doc)."""
    if max_new_tokens < 1:  # zero tokens would make every method "identical" to the baseline
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    chain = chain or DraftSettings(mode="chain", depth=6)
    tree = tree or DraftSettings(mode="tree", depth=6)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    # target and drafters in one dtype; in bf16 a multi-token verify rounds differently from
    # one-token steps, so identical_fraction is a measured rate there, not a guarantee
    model = AutoModelForImageTextToText.from_pretrained(target, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(target)
    methods = build_methods(model, processor, drafters, chain, tree, modes, policies)
    names = list(methods)
    for s in samples[:warmup]:
        for name in names:
            methods[name][1](s["image"], s["prompt"], max_new_tokens)
    rows = []
    for i, s in enumerate(tqdm(samples, desc="bench", unit="sample")):
        outputs, token_ids, decode = {}, {}, {}
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate the order
            tally, run = methods[name]
            start = now(model.device)
            tokens, result = run(s["image"], s["prompt"], max_new_tokens)
            tally.seconds += now(model.device) - start
            tally.tokens += len(tokens)
            token_ids[name] = [int(t) for t in tokens]
            outputs[name] = processor.tokenizer.decode(tokens, skip_special_tokens=True)
            if result is not None:
                decoded = max(0, len(result.tokens) - 1)  # the prefill's token is not decoded
                tally.decode_tokens += decoded
                tally.rounds += result.rounds
                decode[name] = [decoded, result.rounds]
                tally.drafted += result.drafted
                tally.attempts = [
                    a + b for a, b in zip(tally.attempts, result.attempts_per_depth, strict=True)
                ]
                tally.accepted = [
                    a + b for a, b in zip(tally.accepted, result.accepted_per_depth, strict=True)
                ]
                for phase, sec in result.seconds.items():
                    tally.phases[phase] = tally.phases.get(phase, 0.0) + sec
                tally.visual_tokens += result.visual_tokens
                tally.prefix_tokens += result.prefix_tokens
                tally.draft_steps += result.draft_steps
                tally.kv_bytes += result.drafter_kv_bytes
                per_kind = tally.kind_rounds.setdefault(s.get("kind", "all"), [0, 0])
                per_kind[0] += decoded
                per_kind[1] += result.rounds
                if result.gate_choice is not None:
                    kind = tally.gate_choices.setdefault(s.get("kind", "all"), {})
                    kind[result.gate_choice] = kind.get(result.gate_choice, 0) + 1
        for name in names:  # token for token: decoded text hides special tokens and spacing
            methods[name][0].identical += token_ids[name] == token_ids["hf_greedy"]
        rows.append({"id": s["id"], "outputs": outputs, "token_ids": token_ids, "decode": decode})
    report = _report(target, samples, max_new_tokens, methods, rows)
    report["device"], report["dtype"] = str(model.device), dtype
    return report


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
                a / n if n else 0.0 for a, n in zip(t.accepted, t.attempts, strict=True)
            ]
            if spec
            else None,
            "identical_fraction": t.identical / max(1, len(samples)),
            "ms_per_sample": _ms_per_sample(t, len(samples)),
            # what the drafter carries and what one of its steps costs (Pareto plot)
            "visual_prefix_tokens": _visual_prefix(t, kind, len(samples)),
            "drafter_ms_per_step": 1000 * t.phases.get("draft", 0.0) / t.draft_steps
            if t.draft_steps
            else None,
            "drafter_kv_bytes": t.kv_bytes / max(1, len(samples)) if spec else None,
            "visual_tokens": t.visual_tokens / max(1, len(samples)) if spec else None,
            "gate_choices": t.gate_choices if kind == "gated" else None,
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


def markdown_table(report: dict) -> str:
    lines = [
        f"Target `{report['target']}`, {report['num_samples']} samples, max {report['max_new_tokens']} new tokens, "
        f"{report['torch_threads']} torch threads, {report.get('dtype', 'float32')}. {report['tau_definition']}."
        + (
            " Outside float32, identical_fraction is a measured rate (multi-token verify rounds differently)."
            if report.get("dtype", "float32") != "float32"
            else ""
        ),
        "",
        "| method | tokens/s | speedup vs hf_greedy | tau | drafted/round | visual prefix tokens "
        "| drafter ms/step | identical to hf_greedy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        cells = [
            _fmt(m["tau"], "{:.2f}"),
            _fmt(m["mean_drafted"], "{:.1f}"),
            _fmt(m.get("visual_prefix_tokens"), "{:.1f}"),
            _fmt(m.get("drafter_ms_per_step"), "{:.2f}"),
        ]
        speedup = _fmt(m["speedup"], "{:.2f}x")
        lines.append(
            f"| {name} | {m['tokens_per_s']:.1f} | {speedup} | {' | '.join(cells)} "
            f"| {m['identical_fraction']:.0%} |"
        )
    lines += pareto_lines(report) + _gate_lines(report) + _kind_lines(report)
    lines += [
        "",
        "Where the time goes, wall ms per sample (runner phases; `other` = the loop itself):",
        "",
        "| method | total | " + " | ".join(PHASES) + " | other |",
        "|---|" + "---|" * (len(PHASES) + 2),
    ]
    for name, m in report["methods"].items():
        ms = m["ms_per_sample"]
        cells = [f"{ms[p]:.1f}" if p in ms else "-" for p in (*PHASES, "other")]
        lines.append(f"| {name} | {ms['total']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return spec.format(value) if value is not None else "-"


def _kind_lines(report: dict) -> list[str]:
    """tau per prompt kind for every drafter in tree mode, when the prompts have several kinds
    (which kind profits from which visual prefix: what a question-aware gate can learn)."""
    rows = {
        n: m["tau_per_kind"]
        for n, m in report["methods"].items()
        if m.get("tau_per_kind") and m["mode"] == "tree"
    }
    kinds = sorted({k for per in rows.values() for k in per})
    if len(kinds) < 2:
        return []
    lines = ["", "tau per prompt kind (tree):", ""]
    lines += ["| method | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, per in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(per.get(k), "{:.2f}") for k in kinds) + " |")
    return lines


def pareto_lines(report: dict, mode: str = "tree") -> list[str]:
    """Where each gated drafter stands: its tau against the best fixed primitive carrying at
    least as many visual rows (the full visual prefix counts as one: it is `pool:1`), on or
    above that Pareto front or below it, and its speedup against the best drafter with no
    visual rows."""
    ms = {n: m for n, m in report["methods"].items() if m["mode"] == mode and m.get("prefix_kind")}

    def best(kinds: tuple[str, ...], key: str, rows: float = 0.0):
        pool = [
            (m[key], n) for n, m in ms.items()
            if m["prefix_kind"] in kinds and m[key] is not None
            and m["visual_prefix_tokens"] >= rows
        ]  # fmt: skip
        return max(pool) if pool else (None, None)

    fixed = [n for n, m in ms.items() if m["prefix_kind"] in ("primitive", "full")]
    oracle = per_prompt_oracle_tau(report.get("samples", []), fixed)
    lines = []
    for name, g in ms.items():
        if g["prefix_kind"] != "gated":
            continue
        rows = g["visual_prefix_tokens"]
        tau, rival = best(("primitive", "full"), "tau", rows)
        speed, free = best(("free",), "speedup")
        verdict = "no fixed primitive carries as many rows" if rival is None else (
            f"{'on or above' if g['tau'] >= tau else 'below'} the fixed primitives' front: "
            f"the best with >= {rows:.1f} rows is `{rival}` at {tau:.3f}"
            + _paired_interval(report.get("samples", []), name, rival)
        )  # fmt: skip
        text = f"`{name}` carries {rows:.1f} rows for tau {g['tau']:.3f}, {verdict}"
        if oracle is not None:
            text += (
                f"; a per-prompt oracle over the {len(fixed)} fixed drafters reaches {oracle:.3f}"
            )
        if speed is not None:
            text += f"; speedup {g['speedup']:.2f}x vs {speed:.2f}x for `{free}` (no visual rows)"
        lines += ["", text + "."]
    return lines


def tau_difference_interval(
    samples: list[dict], a: str, b: str, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float] | None:
    """Tau of method `a` minus method `b` and its 95% paired bootstrap interval over samples
    (each resample draws samples, both methods keep their own rounds on them); None when the
    samples do not record both methods' decode tokens and rounds."""
    pairs = [s["decode"] for s in samples if a in s.get("decode", {}) and b in s["decode"]]
    if len(pairs) < 2:
        return None
    x = torch.tensor([[p[a][0], p[a][1], p[b][0], p[b][1]] for p in pairs], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(pairs), (resamples, len(pairs)), generator=gen)
    sums = x[idx].sum(1)  # (R, 4)
    diffs = sums[:, 0] / sums[:, 1] - sums[:, 2] / sums[:, 3]
    total = x.sum(0)
    low, high = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(total[0] / total[1] - total[2] / total[3]), low, high


def per_prompt_oracle_tau(samples: list[dict], methods: list[str]) -> float | None:
    """Tau if every prompt were decoded by whichever of `methods` needed the fewest rounds on
    it: the ceiling of a per-prompt gate over them. Only prompts that every method decoded to
    the same length count (lossless greedy: all of them). None without such records."""
    rows = [
        r
        for r in (s.get("decode", {}) for s in samples)
        if methods and all(m in r for m in methods) and len({r[m][0] for m in methods}) == 1
    ]
    if not rows:
        return None
    best = [min((r[m] for m in methods), key=lambda x: x[1]) for r in rows]
    return sum(b[0] for b in best) / max(1, sum(b[1] for b in best))


def _paired_interval(samples: list[dict], a: str, b: str) -> str:
    ci = tau_difference_interval(samples, a, b)
    if ci is None:
        return ""
    return f" (difference {ci[0]:+.3f}, 95% paired bootstrap interval [{ci[1]:+.3f}, {ci[2]:+.3f}])"


def _gate_lines(report: dict) -> list[str]:
    """What each gated drafter chose, per prompt kind (share of prompts)."""
    lines = []
    for m in report["methods"].values():
        choices = m.get("gate_choices")
        if not choices or m["mode"] != "tree":
            continue
        options = sorted({o for kind in choices.values() for o in kind})
        lines += ["", f"Gate choices of `{m['drafter']}` (share of prompts per kind):", ""]
        lines += [
            "| prompt kind | n | " + " | ".join(options) + " |",
            "|---|---|" + "---|" * len(options),
        ]
        for kind, counts in sorted(choices.items()):
            n = sum(counts.values())
            shares = " | ".join(f"{counts.get(o, 0) / n:.0%}" for o in options)
            lines.append(f"| {kind} | {n} | {shares} |")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in report["methods"].items():
        if m["acceptance_per_depth"]:
            ax1.plot(
                range(1, len(m["acceptance_per_depth"]) + 1),
                m["acceptance_per_depth"],
                marker="o",
                label=name,
            )
    ax1.set(
        xlabel="draft depth", ylabel="acceptance rate", title="acceptance per depth", ylim=(0, 1.05)
    )
    ax1.legend(fontsize=7)
    names = list(report["methods"])
    ax2.barh(names, [report["methods"][n]["speedup"] or 0.0 for n in names])
    ax2.axvline(1.0, color="k", lw=0.8)
    ax2.set(xlabel="wall-clock speedup vs hf_greedy", title="speedup")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_plot(report: dict, path: Path, mode: str = "tree") -> bool:
    """tau and speedup against the visual rows the drafter carries, one point per drafter in
    `mode`; False (nothing drawn) with fewer than two drafters."""
    points = [
        (m["visual_prefix_tokens"], m["tau"], m["speedup"] or 0.0, Path(m["drafter"]).name)
        for m in report["methods"].values()
        if m["mode"] == mode and m.get("visual_prefix_tokens") is not None and m["tau"]
    ]
    if len(points) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, col, label in ((axes[0], 1, "tau"), (axes[1], 2, "speedup vs hf_greedy")):
        for p in points:
            ax.scatter(p[0], p[col])
            ax.annotate(p[3], (p[0], p[col]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        best, front = float("-inf"), []
        for p in sorted(points, key=lambda p: (p[0], -p[col])):  # upper-left envelope
            if p[col] > best:
                best = p[col]
                front.append(p)
        ax.step([p[0] for p in front], [p[col] for p in front], where="post", lw=0.8, color="k")
        ax.set(
            xlabel="visual rows in the drafter's cache (mean)",
            ylabel=label,
            title=f"{label} ({mode})",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(report: dict, out: str | Path) -> Path:
    """JSON at `out`, markdown table and PNG plot beside it (atomic writes)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (out, json.dumps(report, indent=2, allow_nan=False)),
        (out.with_suffix(".md"), markdown_table(report)),
    ):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.rename(path)
    plot(report, out.with_suffix(".png"))
    pareto = out.with_name(out.stem + "-pareto.png")
    if not pareto_plot(report, pareto):
        pareto.unlink(missing_ok=True)  # never leave another run's plot beside this report
    return out
