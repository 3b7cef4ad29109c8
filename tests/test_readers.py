import json

import pytest
from datasets import Image

from covspec.data.readers import (
    CONVERSATION_FEATURES,
    DataFileError,
    read_conversations_jsonl,
    toy_dataset,
    write_toy_jsonl,
)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "set"
    write_toy_jsonl(out, num=6, seed=1)
    return out


def test_toy_jsonl_round_trips_through_reader(toy_dir):
    lines = [json.loads(x) for x in (toy_dir / "data.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all({"id", "image", "messages", "objects"} <= set(x) for x in lines)
    ds = read_conversations_jsonl(toy_dir / "data.jsonl")
    assert ds.features == CONVERSATION_FEATURES
    assert ds[0]["messages"] == lines[0]["messages"]
    assert ds[0]["image"].size == (72, 72)


def test_toy_dataset_has_reader_schema():
    ds = toy_dataset(4, seed=1)
    assert isinstance(ds.features["image"], Image)
    for key, feature in CONVERSATION_FEATURES.items():
        assert ds.features[key] == feature
    assert ds[2]["objects"][0]["colour"]


def test_llava_conversations_layout_accepted(toy_dir, tmp_path):
    line = {
        "id": "x",
        "image": str(toy_dir / "images" / "toy-1-0.png"),
        "conversations": [
            {"from": "human", "value": "<image>\nHi"},
            {"from": "gpt", "value": "Hello."},
        ],
    }
    path = tmp_path / "llava.jsonl"
    path.write_text(json.dumps(line) + "\n")
    ds = read_conversations_jsonl(path)
    assert ds[0]["messages"] == [
        {"role": "user", "content": "<image>\nHi"},
        {"role": "assistant", "content": "Hello."},
    ]


def _write(tmp_path, toy_dir, bad_line: str):
    good = (toy_dir / "data.jsonl").read_text().splitlines()[0]
    good = json.dumps({**json.loads(good), "image": str(toy_dir / json.loads(good)["image"])})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + bad_line + "\n")
    return path


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        (
            '{"id": "a", "image": "missing.png", "messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}]}',
            "not found",
        ),
        ('{"id": "a", "image": "IMG", "messages": []}', "empty conversation"),
        (
            '{"id": "a", "image": "IMG", "messages": [{"role": "user", "content": "<image>q"}]}',
            "no assistant",
        ),
        (
            '{"id": "a", "image": "CORRUPT", "messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}]}',
            "corrupt",
        ),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, toy_dir, bad, message):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    bad = bad.replace("IMG", str(toy_dir / "images" / "toy-1-0.png")).replace(
        "CORRUPT", str(corrupt)
    )
    path = _write(tmp_path, toy_dir, bad)
    with pytest.raises(DataFileError, match=message) as err:
        read_conversations_jsonl(path)
    assert f"{path}:2" in str(err.value)


def test_no_half_written_output_on_failure(tmp_path):
    out = tmp_path / "toy"
    with pytest.raises(ValueError, match="36"):
        write_toy_jsonl(out, num=2, image_size=12)
    assert not out.exists()
