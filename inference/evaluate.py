"""`covspec eval`: a drafter's acceptance length on a real benchmark, beside plain `generate`.

    >>> bench = load_benchmark("mmbench", data_dir="mirrors/MMBench")       # covspec.data
    >>> runner = SpecRunner.from_folders("checkpoints/toy-target", "checkpoints/toy-drafter")
    >>> report = run_eval(runner, bench, "eval/mmbench.json", max_new_tokens=128)
    >>> report["overall"]["tree"]["tau"], report["per_category"], report["overall"]["accuracy"]

Per sample, in one process, after a warm-up and in a seeded shuffled order (inference/bench.py's
`method_order`): `hf_greedy`, the target's own greedy `generate` (the speed baseline and the
reference tokens), and the runner in each draft mode. Every method is timed from raw prompt to
tokens, processor included. A runner output counts as identical when its token ids equal
`generate`'s. The benchmark's accuracy is the target's: the option letter parsed from its
answer (lossless decoding emits the same tokens, so it is the runner's too).

Resumable: every finished sample appends one line to `<out>.samples.jsonl` (its first line holds
the settings). A rerun with the same settings skips the ids already there, so an evaluation
killed after k samples goes on from sample k + 1; other settings are refused unless `fresh`. The
report covers the ids of the current selection, so `--limit N` then no limit evaluates the first
N once. A sample the processor refuses or that does not fit the target's context is a bad row:
an error naming it, or with the benchmark's skip_bad a skipped line that reruns skip too.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from covspec.inference.bench import method_order
from covspec.inference.eval_report import aggregate, parse_choice, write_report
from covspec.inference.media import Media, as_media
from covspec.inference.roles import now
from covspec.inference.runner import SpecRunner
from covspec.inference.tree import DraftSettings

BASELINE = "hf_greedy"


class SampleLog:
    """The run's jsonl: a settings line, then one line per finished or skipped sample."""

    def __init__(self, path: Path, header: dict, fresh: bool = False) -> None:
        # compared with the file's after a JSON round trip (tuples come back as lists)
        self.path, self.header = path, json.loads(json.dumps(header))
        self.records: dict[str, dict] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh or not path.exists():
            self._rewrite()
            return
        lines, intact = self._read()
        if not lines or lines[0].get("header") != self.header:
            found = lines[0].get("header") if lines else None
            raise ValueError(
                f"{path} holds a run with other settings ({_diff(found, self.header)}); pass "
                "--fresh to start over or choose another --out"
            )
        for record in lines[1:]:
            self.records[record["id"]] = record
        if not intact:  # a run killed mid-line: drop the partial line before appending
            self._rewrite()

    def _read(self) -> tuple[list[dict], bool]:
        lines, intact = [], True
        for text in self.path.read_text(encoding="utf-8").splitlines():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                intact = False
        return lines, intact and self.path.read_bytes().endswith(b"\n")

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for record in [{"header": self.header}, *self.records.values()]:
                f.write(json.dumps(record) + "\n")
        tmp.rename(self.path)

    def append(self, record: dict) -> None:
        self.records[record["id"]] = record
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _diff(found: dict | None, wanted: dict) -> str:
    if found is None:
        return "no settings line"
    keys = sorted(k for k in {*found, *wanted} if found.get(k) != wanted.get(k))
    return ", ".join(f"{k}: {found.get(k)!r} there, {wanted.get(k)!r} now" for k in keys)


def _methods(runner: SpecRunner, modes: list[DraftSettings], max_new_tokens: int) -> dict:
    def hf(media, prompt):
        return runner.greedy(media, prompt, max_new_tokens), None

    def spec(settings):
        def run(media, prompt):
            result = runner.generate(media, prompt, max_new_tokens, settings)
            return result.tokens, result

        return run

    return {BASELINE: hf, **{s.mode: spec(s) for s in modes}}


def _refusal(runner: SpecRunner, media: Media | None, prompt: str, max_new: int) -> str | None:
    """Why this sample cannot run (None: it can), found before any timed call."""
    try:
        inputs = runner.encode(media, prompt)
    except Exception as e:  # the processor's own errors come from deep in transformers
        return f"the processor refused it ({type(e).__name__}: {e})"
    try:
        runner.check_length(inputs["input_ids"].shape[1], max_new)
    except ValueError as e:
        return str(e)
    return None


def _run_sample(
    runner: SpecRunner, sample, methods: dict, media, order_seed: int, warm: bool
) -> dict:
    names = list(methods)
    if warm:  # one untimed pass: first calls pay for allocation and lazy initialisation
        for name in names:
            methods[name](media, sample.prompt)
    runs = {}
    for name in method_order(names, order_seed):
        start = now(runner.device)
        tokens, result = methods[name](media, sample.prompt)
        runs[name] = (tokens, result, now(runner.device) - start)
    ref, _, seconds = runs[BASELINE]
    record_methods = {BASELINE: {"seconds": seconds, "tokens": len(ref)}}
    for name in names[1:]:
        tokens, r, seconds = runs[name]
        record_methods[name] = {
            "seconds": seconds,
            "tokens": len(tokens),
            "decode_tokens": max(0, len(r.tokens) - 1),  # the first token is the prefill's
            "rounds": r.rounds,
            "drafted": r.drafted,
            "attempts": list(r.attempts_per_depth),
            "accepted": list(r.accepted_per_depth),
            "identical": tokens == ref,
        }
    text = runner.processor.tokenizer.decode(ref, skip_special_tokens=True)
    prediction = parse_choice(text, sample.choices) if sample.choices else None
    return {
        "id": sample.id,
        "category": sample.category,
        "answer": sample.answer,
        "prediction": prediction,
        "correct": prediction == sample.answer if sample.answer else None,
        "text": text,
        "methods": record_methods,
    }


def _check_modes(modes: list[DraftSettings]) -> None:
    names = [m.mode for m in modes]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"draft modes must be distinct and at least one, got {names}")


def run_eval(
    runner: SpecRunner,
    bench,
    out: str | Path,
    max_new_tokens: int = 128,
    modes: list[DraftSettings] | None = None,
    warmup: int = 1,
    fresh: bool = False,
    info: dict | None = None,
) -> dict:
    """Evaluate `bench` (a covspec.data.benchmarks.BenchmarkSet) with `runner`; writes the
    JSON report at `out` (+ .md, .png, .samples.jsonl) and returns it. `info` (target and
    drafter names, split, ...) goes into the settings that a resumed run must match."""
    modes = modes or [DraftSettings(mode="chain", depth=6), DraftSettings(mode="tree", depth=6)]
    _check_modes(modes)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    out = Path(out)
    methods = _methods(runner, modes, max_new_tokens)
    header = {
        "benchmark": bench.spec.name,
        **(info or {}),
        "max_new_tokens": max_new_tokens,
        "device": str(runner.device),
        "methods": list(methods),
        "settings": {m.mode: asdict(m) for m in modes},
    }
    log = SampleLog(out.with_suffix(".samples.jsonl"), header, fresh)
    ids = bench.ids()
    todo = [i for i in ids if i not in log.records]
    samples = bench.samples(skip_ids=set(log.records))
    seen_skips = len(bench.skipped)
    bar = tqdm(total=len(todo), desc=f"eval {bench.spec.name}", unit="sample")
    evaluated = 0  # in this process: each one warms up on its first sample that runs
    with torch.inference_mode(), bar:
        for sample in samples:
            media = as_media(Media(sample.images, sample.video))
            reason = _refusal(runner, media, sample.prompt, max_new_tokens)
            if reason is not None:
                bench.reject(sample.id, reason)  # raises naming the row unless skip_bad
            else:
                # the method order is seeded by the row's id: the same after a resume
                order_seed = zlib.crc32(sample.id.encode())
                record = _run_sample(runner, sample, methods, media, order_seed, evaluated < warmup)
                log.append(record)
                evaluated += 1
            for rid, why in bench.skipped[seen_skips:]:
                log.append({"id": rid, "category": None, "skipped": why})
                bar.update(1)
            seen_skips = len(bench.skipped)
            bar.update(reason is None)
        for rid, why in bench.skipped[seen_skips:]:  # bad rows after the last good one
            log.append({"id": rid, "category": None, "skipped": why})
    wanted = set(ids)
    report = aggregate(
        [r for r in log.records.values() if r["id"] in wanted], list(methods), header
    )
    report["torch_threads"] = torch.get_num_threads()
    report["samples_file"] = str(log.path)
    write_report(report, out)
    return report
