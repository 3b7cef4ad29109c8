"""Conversation datasets: the user's jsonl and the toy world, one schema, as `datasets.Dataset`.

Schema (one row per conversation): `id` string, `image` an `Image()` feature, `messages` a list
of {"role", "content"} with a literal `<image>` in the user turn that shows the image (LLaVA
convention); the toy world adds `objects`, its ground truth.

    >>> ds = read_conversations_jsonl("train.jsonl")           # paths relative to the file
    >>> ds = toy_dataset(num=1000, seed=0)                     # same columns + objects
    >>> write_toy_jsonl("toy-data", num=100, seed=0)           # data.jsonl + images/*.png

A jsonl line is {"id", "image": path, "messages": [...]}; LLaVA-mix665k's
{"conversations": [{"from": "human" | "gpt", "value"}]} is accepted too, as is its `.json` array
file, and rows without an image (text-only conversations). Bad lines fail with
the file and line number; nothing half-written is ever left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from tqdm.auto import tqdm

from covspec.data.chat import ConversationError, validate_messages
from covspec.data.toy_world import DEFAULT_IMAGE_SIZE, PROMPT_SEED, make_sample, prompt_kind
from covspec.modeling.outputs import check_replaceable, write_folder

MESSAGE = {"role": Value("string"), "content": Value("string")}
OBJECT = {
    "colour": Value("string"),
    "shape": Value("string"),
    "position": Value("string"),
    "cell": Value("int32"),
    "size": Value("int32"),
    "cx": Value("int32"),
    "cy": Value("int32"),
}
CONVERSATION_FEATURES = Features(
    {"id": Value("string"), "image": Image(), "messages": List(MESSAGE)}
)
TOY_FEATURES = Features({**CONVERSATION_FEATURES, "objects": List(OBJECT)})
_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


IMAGE_TAG = "<image>"  # where a row's image goes (LLaVA convention)


class DataFileError(ValueError):
    """A data file line that cannot be used; the message names the file and line."""


def _messages(record: dict, where: str) -> list[dict]:
    if "messages" in record:
        messages = record["messages"]
    elif "conversations" in record:
        try:
            messages = [
                {"role": _LLAVA_ROLES[turn["from"]], "content": turn["value"]}
                for turn in record["conversations"]
            ]
        except (KeyError, TypeError) as e:
            raise DataFileError(f"{where}: malformed LLaVA conversation turn ({e!r})") from e
    else:
        raise DataFileError(f"{where}: no 'messages' (or 'conversations') field")
    try:
        return validate_messages(messages, where)
    except ConversationError as e:
        raise DataFileError(str(e)) from e


def check_image(path: Path, where: str) -> None:
    """Raise DataFileError naming `where` if `path` is missing or not a readable image."""
    if not path.is_file():
        raise DataFileError(f"{where}: image file not found: {path}")
    try:
        with PILImage.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataFileError(f"{where}: corrupt or unreadable image {path}: {e}") from e


def iter_jsonl(path: str | Path):
    """(line_number, record) for every non-blank line; invalid JSON names file and line.

    A `.json` file holding one array (LLaVA-mix665k's layout) yields (item_number, record).
    """
    path = Path(path)
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(items, list):
            raise DataFileError(f"{path}: a .json data file must hold an array of conversations")
        for n, record in enumerate(items, start=1):
            if not isinstance(record, dict):
                raise DataFileError(
                    f"{path}:item {n}: expected a JSON object, got {type(record).__name__}"
                )
            yield n, record
        return
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise DataFileError(
                    f"{path}:{n}: expected a JSON object, got {type(record).__name__}"
                )
            yield n, record


def read_conversations_jsonl(
    path: str | Path, image_root: str | Path | None = None, verify_images: bool = True
) -> Dataset:
    """Read a conversation jsonl into a Dataset; relative image paths resolve against the file."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    rows: dict[str, list] = {"id": [], "image": [], "messages": []}
    for n, record in iter_jsonl(path):
        where = f"{path}:{n}"
        messages = _messages(record, where)
        image = record.get("image")
        if image is not None and (not isinstance(image, str) or not image):
            raise DataFileError(f"{where}: 'image' must be a path string, got {image!r}")
        tags = sum(m["content"].count(IMAGE_TAG) for m in messages if isinstance(m["content"], str))
        if tags != (image is not None):
            raise DataFileError(
                f"{where}: {tags} {IMAGE_TAG} tag(s) for {int(image is not None)} image(s); "
                f"a row shows its one image with one {IMAGE_TAG} in a user turn"
            )
        image_path = None if image is None else root / image  # text-only rows have no image
        if image_path is not None and verify_images:
            check_image(image_path, where)
        rows["id"].append(str(record.get("id", f"{path.stem}-{n}")))
        rows["image"].append(None if image_path is None else str(image_path))
        rows["messages"].append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not rows["id"]:
        raise DataFileError(f"{path}: no conversations in file")
    return Dataset.from_dict(rows, features=CONVERSATION_FEATURES)


def toy_dataset(
    num: int, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE, paraphrase: bool = False
) -> Dataset:
    """`num` toy-world conversations from stream `seed`, in the jsonl reader's schema
    (`paraphrase`: the paraphrase world's answers, data/toy_wording.py)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    samples = [make_sample(seed, i, image_size, paraphrase=paraphrase) for i in range(num)]
    columns = {key: [s[key] for s in samples] for key in TOY_FEATURES}
    return Dataset.from_dict(columns, features=TOY_FEATURES)


def _is_toy_data(folder: Path) -> bool:
    """An older covspec toy-data folder (before output markers): data.jsonl and images only."""
    return {p.name for p in folder.iterdir()} <= {"data.jsonl", "images"}


def write_toy_jsonl(
    out: str | Path,
    num: int,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    overwrite: bool = False,
    paraphrase: bool = False,
) -> Path:
    """Write `out/data.jsonl` and `out/images/*.png`, written beside any old folder and swapped
    in; a non-empty `out` that covspec did not write is refused unless `overwrite`.
    `paraphrase`: the paraphrase world's conversations."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    out = Path(out)
    check_replaceable(out, overwrite, _is_toy_data)  # before generating anything

    def write(tmp: Path) -> None:
        (tmp / "images").mkdir()
        with (tmp / "data.jsonl").open("w", encoding="utf-8") as f:
            for i in tqdm(range(num), desc="toy data", unit="sample"):
                s = make_sample(seed, i, image_size, paraphrase=paraphrase)
                rel = f"images/{s['id']}.png"
                s["image"].save(tmp / rel)
                record = {
                    "id": s["id"],
                    "image": rel,
                    "messages": s["messages"],
                    "objects": s["objects"],
                }
                f.write(json.dumps(record) + "\n")

    write_folder(out, write, overwrite=overwrite, kind="toy-data", legacy=_is_toy_data)
    return out / "data.jsonl"


def read_prompts_jsonl(path: str | Path, image_root: str | Path | None = None) -> list[dict]:
    """Benchmark prompts: lines {"id", "image": path, "prompt": user turn} -> [{"id", "image": PIL, "prompt"}]."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    samples = []
    for n, record in iter_jsonl(path):
        where = f"{path}:{n}"
        prompt, image = record.get("prompt"), record.get("image")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataFileError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
        if not isinstance(image, str) or not image:
            raise DataFileError(f"{where}: 'image' must be a path string, got {image!r}")
        check_image(root / image, where)
        with PILImage.open(root / image) as im:
            samples.append(
                {
                    "id": str(record.get("id", f"{path.stem}-{n}")),
                    "image": im.convert("RGB"),
                    "prompt": prompt,
                }
            )
    if not samples:
        raise DataFileError(f"{path}: no prompts in file")
    return samples


def toy_prompts(num: int, seed: int = PROMPT_SEED, mixed: bool = False) -> list[dict]:
    """`num` unseen toy scenes with "Describe the image." (the long-answer case), or with
    `mixed`, each scene's own first question (every description prompt and short question, as
    in training). Each carries its `objects` and `reference` answer, so task accuracy can be
    scored (`answer_correct`)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    samples = [make_sample(seed, i) for i in range(num)]
    out = []
    for i, s in enumerate(samples):
        question = s["messages"][0]["content"].replace("<image>", "").strip()
        out.append(
            {
                "id": f"toy-{seed}-{i}",
                "image": s["image"],
                "prompt": question if mixed else "Describe the image.",
                "kind": prompt_kind(question) if mixed else "description",
                "objects": s["objects"],
                "reference": s["messages"][1]["content"] if mixed else "",
            }
        )
    return out
