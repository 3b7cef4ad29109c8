"""Trajectories for the acceptance head: every mismatch of lossless decoding, labelled by rollout.

    >>> collect(runner, samples, "checkpoints/trajectories/toy-text-only", max_new_tokens=96)

The lossless runner (sync protocol, greedy) decodes each conversation's first question while a
`RecordingRule` logs every mismatch: the features the head will see (target and drafter states,
confidence features) and where it happened. A mismatched token is **safe to accept** when
accepting it and continuing with the target's greedy decoding does not turn a correct answer
into a wrong one: each mismatch is rolled out (the prefix, the drafted token, then greedy
decoding, batched per sample) and the answer is checked against the toy scene's ground truth
(`answer_correct`: the objects named and where, or the short answer). Only one deviation is
rolled out at a time (the label of a mismatch assumes the others were rejected). Answers that
are already wrong without any acceptance cannot lose accuracy, so their mismatches count as
safe; the label balance is reported.

Each mismatch becomes one training example per channel preset, with a channel state drawn
from that preset's link model at a random moment (CSI: uplink SNR, uplink rate, RTT) and the
round latency that state implies (`round_cost_s`: RTT plus a typical round's bytes each way at
those rates): what accepting the token would save. Shards of `shard_size` samples are written
as parquet (temporary file, then renamed), so a killed collection resumes with the next
missing shard.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from covspec.data.toy_world import answer_correct
from covspec.inference.acceptance import RecordingRule, csi_vector
from covspec.inference.link import PRESETS, Link
from covspec.inference.pages import write_text_atomic
from covspec.inference.protocols import run_protocol
from covspec.inference.roles import Request
from covspec.inference.tree import DraftSettings

COLUMNS = (
    "sample_id", "question", "depth", "token", "target_choice", "confidence", "target_hidden",
    "drafter_hidden", "safe", "lossless_correct", "rollout_correct", "preset", "csi",
    "round_cost_s", "prefix", "rollout", "lossless",
)  # fmt: skip
ROUND_BYTES = (
    48 + 40,
    48 + 400,
)  # a typical round's upload and verdict, transport headers included


def channel_draws(presets: list[str], seed: int) -> list[tuple[str, list[float], float]]:
    """(preset, CSI features, round latency in s) for one example per preset, at a random time."""
    rng = random.Random(seed)
    draws = []
    for name in presets:
        link = Link(PRESETS[name], seed=rng.randrange(2**31))
        state = link.state(rng.uniform(0.0, 60.0))
        cost = state.rtt_ms / 1e3 + 8 * ROUND_BYTES[0] / state.uplink_bps
        cost += 8 * ROUND_BYTES[1] / state.downlink_bps
        draws.append((name, csi_vector(state).tolist(), cost))
    return draws


@torch.inference_mode()
def rollout(runner, image, prompt: str, prefixes: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy continuations of `prefixes` (answer tokens so far), one left-padded batch."""
    base = runner.encode(image, prompt)
    ids = base["input_ids"][0].tolist()
    pad = runner.processor.tokenizer.pad_token_id
    width = max(len(p) for p in prefixes)
    rows = [[pad] * (width - len(p)) + ids + p for p in prefixes]
    mask = [[0] * (width - len(p)) + [1] * (len(ids) + len(p)) for p in prefixes]
    n = len(prefixes)
    extra = {
        k: v.repeat(n, *[1] * (v.dim() - 1))
        for k, v in base.items()
        if k not in ("input_ids", "attention_mask")
    }
    out = runner.model.generate(
        input_ids=torch.tensor(rows, device=runner.device),
        attention_mask=torch.tensor(mask, device=runner.device),
        **extra,
        do_sample=False,
        max_new_tokens=max(1, max_new - min(len(p) for p in prefixes)),
        suppress_tokens=runner.suppress_tokens,
    )[:, len(rows[0]) :].tolist()
    done = []
    for prefix, cont in zip(prefixes, out, strict=True):
        answer = prefix + cont
        stop = next((i for i, t in enumerate(answer) if t in runner.eos), None)
        done.append(answer[: stop + 1 if stop is not None else max_new][:max_new])
    return done


def _question(sample: dict) -> tuple[str, str]:
    """The first user turn without its image tag, and its reference answer."""
    return sample["messages"][0]["content"].replace("<image>", "").strip(), sample["messages"][1][
        "content"
    ]


def sample_rows(
    runner, sample: dict, settings: DraftSettings, max_new: int, presets: list[str]
) -> list[dict]:
    """Decode one sample losslessly, log its mismatches, label each by rollout."""
    question, reference = _question(sample)
    recorder = RecordingRule()
    req = Request(sample["image"], question, max_new)
    result = run_protocol("sync", runner, req, None, settings, rule=recorder)
    decode = runner.processor.tokenizer.decode
    lossless_ok = answer_correct(
        sample["objects"], question, reference, decode(result.tokens, skip_special_tokens=True)
    )
    events = [e for e in recorder.events if len(e.prefix) < max_new]
    if not events:
        return []
    answers = rollout(
        runner, sample["image"], question, [e.prefix + [e.token] for e in events], max_new
    )
    rows = []
    for i, (event, answer) in enumerate(zip(events, answers, strict=True)):
        ok = answer_correct(
            sample["objects"], question, reference, decode(answer, skip_special_tokens=True)
        )
        row = {
            "sample_id": sample["id"],
            "question": question,
            "depth": event.depth,
            "token": event.token,
            "target_choice": event.target_choice,
            "confidence": event.confidence.tolist(),
            "target_hidden": event.target_hidden.tolist(),
            "drafter_hidden": event.drafter_hidden.tolist()
            if event.drafter_hidden is not None
            else [],
            "safe": bool(ok or not lossless_ok),
            "lossless_correct": lossless_ok,
            "rollout_correct": ok,
        }
        seed = zlib.crc32(f"{sample['id']}/{i}".encode())
        for preset, csi, cost in channel_draws(presets, seed):
            rows.append({**row, "preset": preset, "csi": csi, "round_cost_s": cost})
    return rows


def collect(
    runner, samples: list[dict], out: str | Path, max_new_tokens: int = 96,
    settings: DraftSettings | None = None, shard_size: int = 50,
    presets: tuple[str, ...] = ("good", "medium", "bad"),
) -> dict:  # fmt: skip
    """Write `out/shard-XXXXX.parquet` for every shard not yet there; returns a summary."""
    settings = settings or DraftSettings(mode="chain", depth=6)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = [samples[i : i + shard_size] for i in range(0, len(samples), shard_size)]
    for k, shard in enumerate(tqdm(shards, desc="trajectories", unit="shard")):
        path = out / f"shard-{k:05d}.parquet"
        if path.is_file():
            continue  # resumed: this shard is done
        rows = [
            r
            for s in shard
            for r in sample_rows(runner, s, settings, max_new_tokens, list(presets))
        ]
        tmp = path.with_name(f".{path.name}.tmp")
        Dataset.from_list(rows).to_parquet(str(tmp))
        tmp.rename(path)
    return summarise(out)


def summarise(out: Path) -> dict:
    """Label balance and counts over every shard, also written to `summary.json`."""
    from datasets import load_dataset

    ds = load_dataset(
        "parquet", data_files=sorted(str(p) for p in out.glob("shard-*.parquet")), split="train"
    )
    one = ds.filter(lambda r: r["preset"] == ds[0]["preset"])  # one row per mismatch
    safe = sum(one["safe"])
    summary = {
        "mismatches": len(one),
        "examples": len(ds),
        "safe": safe,
        "unsafe": len(one) - safe,
        "safe_fraction": safe / max(len(one), 1),
        "samples_with_mismatches": len(set(one["sample_id"])),
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary
