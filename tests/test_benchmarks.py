"""Benchmark loaders on tiny local copies of each benchmark's Hub schema (tests/bench_fixtures.py):
lmms-eval's prompt formats, several images and sampled video frames per sample, bad rows."""

import json

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from covspec.data.benchmarks import BENCHMARKS, BadSampleError, load_benchmark
from covspec.data.video import VideoError, frame_indices, sample_frames, write_video
from tests import bench_fixtures as fx

MC = "Answer with the option's letter from the given choices directly."


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return fx.write_all(tmp_path_factory.mktemp("benchmarks"))


def _samples(name, data_dir, **kw):
    bench = load_benchmark(name, data_dir=str(data_dir), **kw)
    return bench, list(bench.samples())


def test_llava_bench(dirs):
    bench, samples = _samples("llava-bench", dirs["llava-bench"])
    assert bench.ids() == ["0", "1", "2"]
    assert [s.category for s in samples] == ["conv", "detail", "complex"]
    s = samples[1]
    assert s.prompt == "What do you see?"  # lmms-eval: the question, no pre/post prompt
    assert len(s.images) == 1 and s.images[0].mode == "RGB" and s.video is None
    assert s.answer is None and s.choices == {}


def test_mmmu_prompt_images_and_subjects(dirs):
    _, samples = _samples("mmmu", dirs["mmmu"])
    by_id = {s.id: s for s in samples}
    assert [s.category for s in samples] == ["Art", "Art_Theory", "Math", "Math"]
    art = by_id["validation_Art_1"]
    opts = "\n".join(f"{c}. {t}" for c, t in art.choices.items())
    question = art.prompt.split("\n")[0]
    assert question.startswith("<image 1> What colour is the")  # references stay in the text
    assert art.prompt == f"{question}\n{opts}\n\n{MC}"
    assert len(art.images) == 1 and art.answer in "ABCD" and len(art.choices) == 4
    two = by_id["validation_Math_3"]  # <image 2> is referenced from an option
    assert len(two.images) == 2 and two.images[0].tobytes() != two.images[1].tobytes()
    open_q = by_id["validation_Math_4"]
    assert open_q.prompt.endswith("\n\nAnswer the question using a single word or phrase.")
    assert open_q.answer is None and open_q.choices == {}


def test_mmbench_hint_options_and_config_folder(dirs):
    bench, samples = _samples("mmbench", dirs["mmbench"])  # reads en/dev-*.parquet
    assert bench.ids() == ["1000", "1001", "1002", "1003"]
    plain, hinted, three = samples[0], samples[1], samples[3]
    listed = "\n".join(f"{c}. {t}" for c, t in plain.choices.items())
    assert plain.prompt.endswith(f"? There are several options:\n{listed}\n\n{MC}")
    assert not plain.prompt.startswith("Look")
    assert hinted.prompt.startswith("Look at the shapes. What colour")
    assert list(three.choices) == ["A", "B", "C"] and three.answer in three.choices
    assert {s.category for s in samples} == {"attribute_recognition", "spatial_relationship"}


def test_video_mme_frames_and_durations(dirs):
    _, samples = _samples("video-mme", dirs["video-mme"], num_frames=3)
    assert [s.category for s in samples] == ["short", "medium", "long"]
    s = samples[0]
    assert s.images == [] and len(s.video) == 3 and s.video[0].size == (72, 72)
    assert s.prompt.startswith("Select the best answer to the following multiple-choice")
    assert s.prompt.endswith(f"\nD. {s.choices['D']}\n\n{MC}")
    assert s.answer in "ABCD"
    # the frames are the clip's, spread from first to last
    clip = fx.clip(73)
    first = np.asarray(s.video[0], dtype=float) - np.asarray(clip[0], dtype=float)
    last = np.asarray(s.video[-1], dtype=float) - np.asarray(clip[-1], dtype=float)
    assert np.abs(first).mean() < 12 and np.abs(last).mean() < 12  # lossy codec


def test_mvbench_tasks_and_answers(dirs):
    bench, samples = _samples("mvbench", dirs["mvbench"], num_frames=2)
    assert bench.ids() == ["object_shuffle-0", "object_shuffle-1", "action_count-0", "action_count-1"]  # fmt: skip
    s = samples[0]
    opts = "".join(f"({c}) {t}\n" for c, t in s.choices.items())
    assert s.prompt == f"Question:How many objects are there?\nOption:\n{opts}Only give the best option.\n"  # fmt: skip
    assert s.category == "object_shuffle" and len(s.video) == 2
    records = json.loads((dirs["mvbench"] / "json" / "object_shuffle.json").read_text())
    assert s.choices[s.answer] == records[0]["answer"]
    one = load_benchmark("mvbench", data_dir=str(dirs["mvbench"]), config="action_count")
    assert one.ids() == ["action_count-0", "action_count-1"]


def test_names_splits_limits_and_files(dirs):
    with pytest.raises(ValueError, match="unknown benchmark 'mmmlu'") as e:
        load_benchmark("mmmlu")
    for name in BENCHMARKS:
        assert name in str(e.value)
    assert load_benchmark("Video_MME", data_dir=str(dirs["video-mme"])).spec.name == "video-mme"
    assert len(load_benchmark("mmbench", data_dir=str(dirs["mmbench"]), limit=2)) == 2
    with pytest.raises(ValueError, match=r"no files of split 'test'.*\['dev'\]"):
        load_benchmark("mmbench", data_dir=str(dirs["mmbench"]), split="test")
    single = next((dirs["mmmu"] / "data").glob("*.parquet"))  # one parquet file
    assert len(load_benchmark("mmmu", data_dir=str(single))) == 4
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark("mmmu", data_dir=str(dirs["mmmu"] / "nowhere"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['index'"):
        load_benchmark("mmbench", data_dir=str(single))  # MMMU's schema is not MMBench's
    with pytest.raises(ValueError, match="num_frames"):
        load_benchmark("video-mme", data_dir=str(dirs["video-mme"]), num_frames=0)
    with pytest.raises(ValueError, match="clips from disk.*lmms-lab/Video-MME"):
        load_benchmark("video-mme")  # a Hub id alone has no clips: refused before any download


def test_hub_ids_go_through_load_dataset(dirs, monkeypatch):
    """No hub here: check that a Hub id reaches `load_dataset` with the benchmark's config and
    split, and that the same code then serves the rows."""
    from datasets import Dataset

    import covspec.data.tables as tables

    local = Dataset.from_parquet(str(next((dirs["mmbench"] / "en").glob("*.parquet"))))
    calls = []

    def fake(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return local

    monkeypatch.setattr(tables, "load_dataset", fake)
    bench = load_benchmark("mmbench")
    assert calls == [("lmms-lab/MMBench", "en", "dev")]
    assert [s.id for s in bench.samples()] == ["1000", "1001", "1002", "1003"]
    with pytest.raises(ValueError, match=r"mmmu data has no column\(s\) \['id'\]"):
        load_benchmark("mmmu", data_dir="MMMU/MMMU", config="Art", split="dev")  # the fake's rows
    assert calls[-1] == ("MMMU/MMMU", "Art", "dev")


def _rewrite_parquet(src, dst, change):
    table = pq.read_table(src)
    rows = table.to_pylist()
    change(rows)
    dst.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), dst)
    return dst


def test_bad_image_rows_name_the_row_or_are_skipped(dirs, tmp_path):
    src = next((dirs["llava-bench"] / "data").glob("*.parquet"))

    def damage(rows):
        rows[1]["image"] = None  # missing
        rows[2]["image"] = {"bytes": b"not a png", "path": "x.png"}  # corrupt

    _rewrite_parquet(src, tmp_path / "lb" / "train-00000-of-00001.parquet", damage)
    with pytest.raises(BadSampleError, match="llava-bench row 1: image is missing"):
        list(load_benchmark("llava-bench", data_dir=str(tmp_path / "lb")).samples())
    bench = load_benchmark("llava-bench", data_dir=str(tmp_path / "lb"), skip_bad=True)
    assert [s.id for s in bench.samples()] == ["0"]
    assert [rid for rid, _ in bench.skipped] == ["1", "2"]
    assert "not a readable image" in bench.skipped[1][1]

    def unreferenced(rows):
        rows[0]["question"] = "Compare <image 1> with <image 3>."

    mm = next((dirs["mmmu"] / "data").glob("*.parquet"))
    _rewrite_parquet(mm, tmp_path / "mm" / "validation-00000-of-00001.parquet", unreferenced)
    with pytest.raises(BadSampleError, match="mmmu row validation_Art_1: image_3 is missing"):
        list(load_benchmark("mmmu", data_dir=str(tmp_path / "mm")).samples())


def test_bad_videos_name_the_row_or_are_skipped(dirs, tmp_path):
    import shutil

    root = tmp_path / "vm"
    shutil.copytree(dirs["video-mme"], root)
    (root / "data" / "toyvid1.mp4").unlink()  # missing
    (root / "data" / "toyvid2.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage")  # broken
    with pytest.raises(BadSampleError, match=r"video-mme row 001-1: video not found"):
        list(load_benchmark("video-mme", data_dir=str(root)).samples())
    bench = load_benchmark("video-mme", data_dir=str(root), skip_bad=True)
    assert [s.id for s in bench.samples()] == ["000-1"]
    assert [rid for rid, _ in bench.skipped] == ["001-1", "002-1"]
    assert "cannot decode video" in bench.skipped[1][1] or "no video stream" in bench.skipped[1][1]
    hub_style = load_benchmark("video-mme", data_dir=str(root / "videomme"))  # metadata only
    with pytest.raises(BadSampleError, match="000-1: video not found"):
        next(hub_style.samples())


def test_sample_frames_seek_to_the_linspace_frames(tmp_path):
    frames = fx.clip(5, frames=23)
    path = write_video(tmp_path / "c.mp4", frames, fps=5)
    got = sample_frames(path, 6)
    with av.open(str(path)) as c:  # reference: decode everything, pick the indices
        every = [f.to_image().convert("RGB") for f in c.decode(video=0)]
    assert frame_indices(23, 6) == [0, 4, 8, 13, 17, 22]
    for im, i in zip(got, frame_indices(23, 6), strict=True):
        assert np.array_equal(np.asarray(im), np.asarray(every[i])), i
    # Matroska does not record its frame count: packets are counted, then the same seeks
    mkv = write_video(tmp_path / "c.mkv", frames, fps=5)
    with av.open(str(mkv)) as c:
        assert c.streams.video[0].frames == 0  # what makes this path necessary
    for im, i in zip(sample_frames(mkv, 6), frame_indices(23, 6), strict=True):
        assert np.array_equal(np.asarray(im), np.asarray(every[i])), i
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, im in enumerate(frames[:5]):
        im.save(folder / f"{i:03d}.png")
    picked = sample_frames(folder, 3)  # indices 0, 2, 4 of a frame folder
    assert [np.array_equal(np.asarray(a), np.asarray(frames[i])) for a, i in zip(picked, (0, 2, 4), strict=True)] == [True] * 3  # fmt: skip
    with pytest.raises(VideoError, match="not found"):
        sample_frames(tmp_path / "none.mp4", 2)
    with pytest.raises(ValueError, match="num_frames"):
        frame_indices(10, 0)
