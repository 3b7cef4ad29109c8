"""Real VLM benchmarks as one stream of samples: LLaVA-Bench-in-the-Wild, MMMU, MMBench,
Video-MME and MVBench, read with `datasets.load_dataset` from the Hub or from a local mirror.

    >>> bench = load_benchmark("mmmu")                              # lmms-lab/MMMU, validation
    >>> bench = load_benchmark("mmbench", data_dir="mirrors/MMBench", limit=100)
    >>> bench = load_benchmark("video-mme", data_dir="mirrors/videomme", num_frames=8)
    >>> for s in bench.samples(skip_ids=done):      # images and frames decoded one row at a time
    ...     s.id, s.category, s.prompt, s.images, s.video, s.answer
    >>> bench.skipped                               # [(row id, reason)] when skip_bad=True

`data_dir` is a local folder laid out like the Hub repository (parquet files named by split,
`<split>-00000-of-00001.parquet`, at any depth), one parquet / json file, or a Hub id. Video
sets read their metadata the same way and their clips from `video_dir` (default: `data_dir`):
Video-MME `<videoID>.mp4` under `data/` or at the top; MVBench `<task folder>/<file>` under
`video/` or at the top, or flat; MVBench's metadata is `json/<task>.json` (or `<task>.json`).

Prompts are built the way lmms-eval builds them for each task with its default
`lmms_eval_specific_kwargs` (EvolvingLMMs-Lab/lmms-eval, lmms_eval/tasks/...), so acceptance is
measured on the prompts people run; each builder names the file it follows. Visuals go before
the text (lmms-eval's default non-interleaved layout). A row whose image is missing or whose clip
cannot be decoded raises `BadSampleError` naming the row id, or is skipped and counted with
`skip_bad=True`; nothing undecodable ever reaches a processor.
"""

from __future__ import annotations

import ast
import io
import re
import string
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, concatenate_datasets
from PIL import Image as PILImage

from covspec.data.tables import read_table
from covspec.data.video import VideoError, sample_frames

LETTERS = string.ascii_uppercase
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


class BadSampleError(ValueError):
    """A benchmark row that cannot be shown to a model; the message names the row id."""


class _BadRow(Exception):
    """Raised by builders; the loader adds the benchmark and row id."""


@dataclass
class BenchSample:
    id: str
    benchmark: str
    category: str
    prompt: str
    images: list[PILImage.Image] = field(default_factory=list)
    video: list[PILImage.Image] | None = None  # uniformly sampled frames of one clip
    answer: str | None = None  # the correct option letter (multiple choice), else None
    choices: dict[str, str] = field(default_factory=dict)  # letter -> option text


@dataclass(frozen=True)
class _Context:
    video_dir: Path | None
    num_frames: int


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    hub_id: str
    split: str
    config: str | None
    id_columns: tuple[str, ...]  # enough to name a row without decoding its images
    columns: tuple[str, ...]  # what the builder needs besides those
    row_id: Callable[[dict], str]
    build: Callable[[dict, str, _Context], BenchSample]  # (row, id, context)
    video: bool = False
    aliases: tuple[str, ...] = ()
    read: Callable[..., Dataset] | None = None  # default: one table through load_dataset


def _open_image(value: Any, column: str) -> PILImage.Image:
    if value is None:
        raise _BadRow(f"{column} is missing")
    if isinstance(value, PILImage.Image):
        return value.convert("RGB")
    data, path = value.get("bytes"), value.get("path")
    if not data and not path:
        raise _BadRow(f"{column} is missing")
    try:
        with PILImage.open(io.BytesIO(data) if data else path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise _BadRow(f"{column} is not a readable image ({e})") from e


def _frames(path: Path, ctx: _Context) -> list[PILImage.Image]:
    try:
        return sample_frames(path, ctx.num_frames)
    except VideoError as e:
        raise _BadRow(str(e)) from e


def _first_existing(candidates: list[Path], what: str) -> Path:
    for path in candidates:
        if path.exists():
            return path
    raise _BadRow(f"{what} not found; looked for {[str(p) for p in candidates]}")


def _video_dir(ctx: _Context) -> Path:
    if ctx.video_dir is None:
        raise _BadRow("this benchmark's clips live on disk: pass video_dir (--video-dir)")
    return ctx.video_dir


# -- multiple choice --------------------------------------------------------------------------
def _lettered(options: list[str]) -> dict[str, str]:
    if len(options) > len(LETTERS):
        raise _BadRow(f"{len(options)} options is more than the {len(LETTERS)} letters")
    return {LETTERS[i]: str(o) for i, o in enumerate(options)}


# -- LLaVA-Bench-in-the-Wild ------------------------------------------------------------------
def _llava_bench(row: dict, rid: str, ctx: _Context) -> BenchSample:
    # lmms_eval/tasks/llava-in-the-wild/{llava-in-the-wild.yaml,utils.py}: the question as is
    # (pre_prompt and post_prompt empty); open-ended, judged by GPT there, so no answer here
    return BenchSample(
        rid, "llava-bench", str(row.get("category") or "unknown"), row["question"],
        [_open_image(row.get("image"), "image")],
    )  # fmt: skip


# -- MMMU -------------------------------------------------------------------------------------
def _mmmu_subject(rid: str) -> str | None:
    m = re.fullmatch(r"[^_]+_(.+)_\d+", rid)  # validation_Art_Theory_12 -> Art_Theory
    return m.group(1) if m else None


def _mmmu(row: dict, rid: str, ctx: _Context) -> BenchSample:
    # lmms_eval/tasks/mmmu/utils.py construct_prompt with mmmu_val.yaml's default kwargs:
    # "{question}\nA. ...\nB. ...\n\n{mc prompt}" or "{question}\n\n{open prompt}"; the images
    # are those the question or options reference as <image N>, and the references stay in
    # the text (interleaved_format: false)
    options = row.get("options") or []
    if isinstance(options, str):
        try:
            options = ast.literal_eval(options) if options.strip() else []
        except (ValueError, SyntaxError) as e:
            raise _BadRow(f"options {options!r} is not a list literal") from e
    choices = _lettered(options)
    question = row["question"]
    if row.get("question_type", "multiple-choice") == "multiple-choice" and choices:
        listed = "\n".join(f"{c}. {t}" for c, t in choices.items())
        prompt = f"{question}\n{listed}\n\n{MC_INSTRUCTION}"
        answer = str(row.get("answer", "")).strip()
        answer = answer if answer in choices else None
    else:
        prompt = f"{question}\n\nAnswer the question using a single word or phrase."
        choices, answer = {}, None
    refs = sorted({int(n) for n in re.findall(r"<image (\d+)>", question + str(options))})
    images = [_open_image(row.get(f"image_{n}"), f"image_{n}") for n in refs]
    category = _mmmu_subject(rid) or str(row.get("subfield") or "unknown")
    return BenchSample(rid, "mmmu", category, prompt, images, None, answer, choices)


# -- MMBench ----------------------------------------------------------------------------------
def _present(value: Any) -> bool:
    return value is not None and str(value).strip() not in ("", "nan", "None")


def _mmbench(row: dict, rid: str, ctx: _Context) -> BenchSample:
    # lmms_eval/tasks/mmbench/en_utils.py mmbench_doc_to_text + mmbench_evals.py
    # create_options_prompt, with _default_template_mmbench_en_yaml's post_prompt:
    # "{hint} {question} There are several options:\nA. ...\nD. ...\n\n{mc prompt}"
    choices = {c: str(row[c]) for c in "ABCDE" if _present(row.get(c))}
    if not choices:
        raise _BadRow("no options in columns A-E")
    options = "There are several options:\n" + "\n".join(f"{c}. {t}" for c, t in choices.items())
    hint = row.get("hint")
    head = f"{hint} {row['question']}" if _present(hint) else row["question"]
    prompt = f"{head} {options}\n\n{MC_INSTRUCTION}"
    answer = str(row.get("answer") or "").strip()
    image = _open_image(row.get("image"), "image")
    return BenchSample(
        rid, "mmbench", str(row.get("category") or "unknown"), prompt, [image], None,
        answer if answer in choices else None, choices,
    )  # fmt: skip


# -- Video-MME --------------------------------------------------------------------------------
VIDEOMME_INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video and "
    "the subtitles. Respond with only the letter (A, B, C, or D) of the correct option."
)


def _videomme(row: dict, rid: str, ctx: _Context) -> BenchSample:
    # lmms_eval/tasks/videomme/{videomme.yaml,utils.py} videomme_doc_to_text, default kwargs:
    # "{instruction}\n{question}\n{options, already 'A. ...'}\n\n{mc prompt}"; no subtitles
    options = [str(o) for o in row["options"]]
    choices = {}
    for o in options:
        m = re.match(r"^\s*([A-Z])[.)]\s*(.*)$", o)
        if m is None:
            raise _BadRow(f"option {o!r} does not start with a letter")
        choices[m.group(1)] = m.group(2)
    prompt = f"{VIDEOMME_INSTRUCTION}\n{row['question']}\n" + "\n".join(options)
    prompt += f"\n\n{MC_INSTRUCTION}"
    root, vid = _video_dir(ctx), str(row["videoID"])
    names = [f"{vid}.mp4", f"{vid}.MP4", f"{vid}.mkv"]
    path = _first_existing([d / n for d in (root / "data", root) for n in names], "video")
    answer = str(row.get("answer") or "").strip()
    return BenchSample(
        rid, "video-mme", str(row.get("duration") or "unknown"), prompt, [],
        _frames(path, ctx), answer if answer in choices else None, choices,
    )  # fmt: skip


# -- MVBench ----------------------------------------------------------------------------------
# task -> its clips' folder in the OpenGVLab/MVBench repository (lmms_eval/tasks/mvbench/utils.py)
MVBENCH_TASKS = {
    "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment",
    "action_antonym": "ssv2_video_mp4",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test",
    "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_segment",
    "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation",
    "action_localization": "sta/sta_video_segment",
    "scene_transition": "scene_qa/video",
    "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation",
    "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos",
    "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos",
    "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "counterfactual_inference": "clevrer/video_validation",
}


def _read_mvbench(source: str | None, hub_id: str, split: str, config: str | None) -> Dataset:
    """MVBench is one json per task; `config` picks one task (default: all found)."""
    tasks = [config] if config else list(MVBENCH_TASKS)
    local = source is not None and Path(source).expanduser().exists()
    parts, missing = [], []
    for task in tasks:
        if local:
            root = Path(source).expanduser()
            files = [root / "json" / f"{task}.json", root / f"{task}.json"]
            found = next((f for f in files if f.is_file()), None)
            if found is None:
                if config:
                    raise FileNotFoundError(f"no {task}.json under {root} or {root / 'json'}")
                missing.append(task)
                continue
            ds = read_table(str(found), hub_id, split, None)
        else:
            ds = read_table(source, hub_id, split, task)
        parts.append(
            ds.add_column("task", [task] * len(ds)).add_column("row", list(range(len(ds))))
        )
    if not parts:
        raise FileNotFoundError(f"no MVBench task json ({', '.join(MVBENCH_TASKS)}) in {source}")
    if missing:  # the report's per-task table shows which ran; say which did not
        warnings.warn(
            f"MVBench: no json for {len(missing)} of {len(tasks)} tasks under {source} "
            f"({', '.join(missing)}): evaluating the other {len(parts)}",
            stacklevel=2,
        )
    return concatenate_datasets(parts)


def _mvbench(row: dict, rid: str, ctx: _Context) -> BenchSample:
    # lmms_eval/tasks/mvbench/utils.py mvbench_doc_to_text with every task yaml's post_prompt:
    # "Question:{question}\nOption:\n(A) ...\n(B) ...\nOnly give the best option.\n"
    choices = _lettered(list(row["candidates"]))
    listed = "".join(f"({c}) {t}\n" for c, t in choices.items())
    prompt = f"Question:{row['question']}\nOption:\n{listed}Only give the best option.\n"
    answer = next((c for c, t in choices.items() if t == str(row["answer"])), None)
    if answer is None:
        raise _BadRow(f"answer {row['answer']!r} is not one of the candidates")
    root, task, name = _video_dir(ctx), row["task"], str(row["video"])
    folder = MVBENCH_TASKS.get(task, task)
    where = [root / "video" / folder / name, root / folder / name, root / "video" / name]
    path = _first_existing([*where, root / name], "video")
    return BenchSample(rid, "mvbench", task, prompt, [], _frames(path, ctx), answer, choices)


# -- registry ---------------------------------------------------------------------------------
_SPECS = (
    BenchmarkSpec(
        name="llava-bench",
        hub_id="lmms-lab/llava-bench-in-the-wild",
        split="train",
        config=None,
        id_columns=("question_id",),
        columns=("question", "image"),
        row_id=lambda r: str(r["question_id"]),
        build=_llava_bench,
        aliases=("llava-bench-in-the-wild", "llava-in-the-wild", "llava-wild"),
    ),
    BenchmarkSpec(
        name="mmmu",
        hub_id="lmms-lab/MMMU",
        split="validation",
        config=None,
        id_columns=("id",),
        columns=("question",),
        row_id=lambda r: str(r["id"]),
        build=_mmmu,
    ),
    BenchmarkSpec(
        name="mmbench",
        hub_id="lmms-lab/MMBench",
        split="dev",
        config="en",
        id_columns=("index",),
        columns=("question", "image", "A", "B"),
        row_id=lambda r: str(r["index"]),
        build=_mmbench,
        aliases=("mmbench-en",),
    ),
    BenchmarkSpec(
        name="video-mme",
        hub_id="lmms-lab/Video-MME",
        split="test",
        config=None,
        id_columns=("question_id",),
        columns=("question", "options", "videoID"),
        row_id=lambda r: str(r["question_id"]),
        build=_videomme,
        video=True,
        aliases=("videomme",),
    ),
    BenchmarkSpec(
        name="mvbench",
        hub_id="OpenGVLab/MVBench",
        split="train",
        config=None,  # one task's name, or all of MVBENCH_TASKS
        id_columns=("task", "row"),
        columns=("video", "question", "candidates", "answer"),
        row_id=lambda r: f"{r['task']}-{r['row']}",
        build=_mvbench,
        video=True,
        read=_read_mvbench,
    ),
)
BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in _SPECS}


def _key(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.lower())


def benchmark_spec(name: str) -> BenchmarkSpec:
    """The registry entry for `name` (case, '-' and '_' do not matter)."""
    for spec in BENCHMARKS.values():
        if _key(name) in {_key(spec.name), *map(_key, spec.aliases)}:
            return spec
    raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")


@dataclass
class BenchmarkSet:
    """A benchmark's rows; samples decode lazily, so finished ids cost nothing on a rerun."""

    spec: BenchmarkSpec
    rows: Dataset
    context: _Context
    skip_bad: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def ids(self) -> list[str]:
        keys = self.rows.select_columns(list(self.spec.id_columns))
        return [self.spec.row_id(r) for r in keys]

    def samples(self, skip_ids: set[str] | frozenset[str] = frozenset()) -> Iterator[BenchSample]:
        """Decoded samples in row order, leaving out `skip_ids`. A bad row raises
        BadSampleError naming it, or with skip_bad is recorded in `skipped` and passed over."""
        for i, rid in enumerate(self.ids()):
            if rid in skip_ids:
                continue
            try:
                sample = self.spec.build(self.rows[i], rid, self.context)
            except _BadRow as e:
                self.reject(rid, str(e))
                continue
            yield sample

    def reject(self, rid: str, reason: str) -> None:
        """A row that cannot be evaluated: raise naming it, or record it with skip_bad."""
        if not self.skip_bad:
            raise BadSampleError(f"{self.spec.name} row {rid}: {reason}")
        self.skipped.append((rid, reason))


def load_benchmark(
    name: str,
    data_dir: str | None = None,
    split: str | None = None,
    config: str | None = None,
    video_dir: str | None = None,
    num_frames: int = 8,
    limit: int | None = None,
    skip_bad: bool = False,
) -> BenchmarkSet:
    """Open benchmark `name` (see BENCHMARKS); nothing is decoded until `samples()`.

    data_dir: local folder / data file / Hub id (default: the benchmark's Hub id); split and
    config default to the ones lmms-eval evaluates (MMBench `en` / `dev`, MMMU `validation`,
    ...; for MVBench `config` names one task); limit: the first N rows.
    """
    spec = benchmark_spec(name)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    local = data_dir is not None and Path(data_dir).expanduser().exists()
    videos = video_dir or (data_dir if local else None)
    if spec.video and videos is None:
        raise ValueError(
            f"{spec.name} reads its clips from disk: pass video_dir (--video-dir) with the Hub "
            f"id {data_dir or spec.hub_id}, or a local data_dir that holds them"
        )
    read = spec.read or read_table
    rows = read(data_dir, spec.hub_id, split or spec.split, config or spec.config)
    missing = [c for c in (*spec.id_columns, *spec.columns) if c not in rows.column_names]
    if missing:
        raise ValueError(
            f"{spec.name} data has no column(s) {missing}; columns: {rows.column_names}"
        )
    if limit is not None and limit < len(rows):
        # evenly spaced rows, not the first ones: benchmarks are ordered by subject or task
        rows = rows.select([i * len(rows) // limit for i in range(limit)])
    ctx = _Context(Path(videos).expanduser() if videos else None, num_frames)
    return BenchmarkSet(spec, rows, ctx, skip_bad)
