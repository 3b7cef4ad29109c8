"""Tiny local copies of the five benchmarks, in each one's exact Hub schema, made from the toy
world: parquet files with `Image` columns written by `datasets`, mp4 clips written by PyAV.

    >>> dirs = write_all(tmp_path)             # {"llava-bench": Path, "mmmu": Path, ...}
    >>> load_benchmark("mmmu", data_dir=str(dirs["mmmu"]))

Questions are the toy world's (answers depend on the pixels), options list the true answer and
distractors, so the toy target's accuracy means something. Layouts follow the Hub repositories:
`data/<split>-00000-of-00001.parquet` (MMBench: `en/dev-...`), Video-MME clips in `data/`,
MVBench `json/<task>.json` with clips in `video/<task folder>/`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from datasets import Dataset, Features, Image, List, Value

from covspec.data.toy_world import COLOURS, make_sample
from covspec.data.video import write_video

LETTERS = "ABCD"


def _parquet(rows: list[dict], features: Features, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def _colour_question(seed: int, index: int) -> tuple[object, str, list[str], int]:
    """(image, question, 4 options, index of the right one) about one object's colour."""
    s = make_sample(seed, index)
    obj = s["objects"][0]
    wrong = [c for c in COLOURS if c != obj["colour"]][:3]
    options = [*wrong, obj["colour"]]
    random.Random(index).shuffle(options)
    question = f"What colour is the {obj['shape']} in the {obj['position']}?"
    return s["image"], question, options, options.index(obj["colour"])


def llava_bench(root: Path, n: int = 3) -> Path:
    features = Features(
        {
            "question_id": Value("int64"),
            "question": Value("string"),
            "image": Image(),
            "caption": Value("string"),
            "gpt_answer": Value("string"),
            "category": Value("string"),
            "image_id": Value("string"),
        }
    )
    cats, rows = ["conv", "detail", "complex"], []
    for i in range(n):
        s = make_sample(70, i)
        rows.append(
            {
                "question_id": i,
                "question": "Describe the image." if i % 2 == 0 else "What do you see?",
                "image": s["image"],
                "caption": "toy scene",
                "gpt_answer": s["messages"][1]["content"],
                "category": cats[i % 3],
                "image_id": f"img{i}",
            }
        )
    return _parquet(rows, features, root / "data" / "train-00000-of-00001.parquet").parents[1]


def mmmu(root: Path) -> Path:
    image_cols = {f"image_{k}": Image() for k in range(1, 8)}
    features = Features(
        {
            "id": Value("string"),
            "question": Value("string"),
            "options": Value("string"),
            "explanation": Value("string"),
            **image_cols,
            "img_type": Value("string"),
            "answer": Value("string"),
            "topic_difficulty": Value("string"),
            "question_type": Value("string"),
            "subfield": Value("string"),
        }
    )
    rows = []
    for i, subject in enumerate(["Art", "Art_Theory", "Math"]):
        image, question, options, right = _colour_question(71, i)
        row = {k: None for k in image_cols}
        row.update(
            id=f"validation_{subject}_{i + 1}",
            question=f"<image 1> {question}",
            options=str(options),
            explanation="",
            image_1=image,
            img_type="['Diagrams']",
            answer=LETTERS[right],
            topic_difficulty="Easy",
            question_type="multiple-choice",
            subfield=subject,
        )
        if subject == "Math":  # two images, the second referenced from an option
            row["image_2"] = make_sample(71, 9)["image"]
            row["options"] = str([*options[:3], f"{options[3]} as in <image 2>"])
        rows.append(row)
    _, question, _, _ = _colour_question(71, 5)
    rows.append(
        {
            **{k: None for k in image_cols},
            "id": "validation_Math_4",
            "question": f"{question} <image 1>",
            "options": "[]",
            "explanation": "",
            "image_1": make_sample(71, 5)["image"],
            "img_type": "[]",
            "answer": "red",
            "topic_difficulty": "Easy",
            "question_type": "open",
            "subfield": "Math",
        }
    )
    return _parquet(rows, features, root / "data" / "validation-00000-of-00001.parquet").parents[1]


def mmbench(root: Path, n: int = 4) -> Path:
    text = Value("string")
    features = Features(
        {
            "index": Value("int64"),
            "question": text,
            "hint": text,
            "A": text,
            "B": text,
            "C": text,
            "D": text,
            "answer": text,
            "category": text,
            "image": Image(),
            "source": text,
            "L2-category": text,
            "comment": text,
            "split": text,
        }
    )
    rows = []
    for i in range(n):
        image, question, options, right = _colour_question(72, i)
        rows.append(
            {
                "index": 1000 + i,
                "question": question,
                "hint": "Look at the shapes." if i % 2 else None,
                **dict(zip(LETTERS, options, strict=True)),
                "answer": LETTERS[right],
                "category": ["attribute_recognition", "spatial_relationship"][i % 2],
                "image": image,
                "source": "toy",
                "L2-category": "perception",
                "comment": None,
                "split": "dev",
            }
        )
    if n > 3:  # a three-option question: D is absent (the right option moved to A if needed)
        row = rows[3]
        if row["answer"] == "D":
            row["A"], row["answer"] = row["D"], "A"
        row["D"] = None
    return _parquet(rows, features, root / "en" / "dev-00000-of-00001.parquet").parents[1]


def clip(seed: int, frames: int = 10) -> list:
    """A clip of one scene whose objects drift right, frame by frame (even size for yuv420p)."""
    base = make_sample(seed, 0)["image"]
    out = []
    for t in range(frames):
        im = base.copy()
        im.paste(base.crop((0, 0, 72 - t, 72)), (t, 0))
        out.append(im)
    return out


def video_mme(root: Path, n: int = 3) -> Path:
    text = Value("string")
    features = Features(
        {
            "video_id": text,
            "duration": text,
            "domain": text,
            "sub_category": text,
            "url": text,
            "videoID": text,
            "question_id": text,
            "task_type": text,
            "question": text,
            "options": List(text),
            "answer": text,
        }
    )
    rows = []
    (root / "data").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _, question, options, right = _colour_question(73, i)
        vid = f"toyvid{i}"
        write_video(root / "data" / f"{vid}.mp4", clip(73 + i))
        rows.append(
            {
                "video_id": f"{i:03d}",
                "duration": ["short", "medium", "long"][i % 3],
                "domain": "Knowledge",
                "sub_category": "toy",
                "url": "",
                "videoID": vid,
                "question_id": f"{i:03d}-1",
                "task_type": "Object Recognition",
                "question": question,
                "options": [f"{LETTERS[k]}. {o}" for k, o in enumerate(options)],
                "answer": LETTERS[right],
            }
        )
    return _parquet(rows, features, root / "videomme" / "test-00000-of-00001.parquet").parents[1]


def mvbench(root: Path) -> Path:
    tasks = {"action_count": "perception/videos", "object_shuffle": "perception/videos"}
    for t, (task, folder) in enumerate(tasks.items()):
        records = []
        for i in range(2):
            name, seed = f"{task}_{i}.mp4", 80 + 2 * t + i
            (root / "video" / folder).mkdir(parents=True, exist_ok=True)
            write_video(root / "video" / folder / name, clip(seed))
            n = len(make_sample(seed, 0)["objects"])  # the clip's scene
            candidates = [str(n - 1), str(n), str(n + 1)]
            random.Random(seed).shuffle(candidates)
            records.append(
                {
                    "video": name,
                    "question": "How many objects are there?",
                    "candidates": candidates,
                    "answer": str(n),
                }
            )
        (root / "json").mkdir(exist_ok=True)
        (root / "json" / f"{task}.json").write_text(json.dumps(records))
    return root


def write_all(root: Path) -> dict[str, Path]:
    return {
        "llava-bench": llava_bench(root / "llava-bench"),
        "mmmu": mmmu(root / "mmmu"),
        "mmbench": mmbench(root / "mmbench"),
        "video-mme": video_mme(root / "video-mme"),
        "mvbench": mvbench(root / "mvbench"),
    }
