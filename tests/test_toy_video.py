import json

import numpy as np
import pytest

from covspec.data.toy_video import Track, make_clip
from covspec.data.toy_world import COLOURS, NUMBER_WORDS, POSITIONS
from covspec.data.video import sample_frames, write_video


def _bytes(clip):
    return [f.tobytes() for f in clip["frames"]]


@pytest.mark.parametrize("num_frames", [2, 9, 64])
def test_clips_are_deterministic_and_have_their_frame_count(num_frames):
    a, b = make_clip(0, 3, num_frames), make_clip(0, 3, num_frames)
    assert len(a["frames"]) == num_frames and a["frames"][0].size == (72, 72)
    assert _bytes(a) == _bytes(b) and a["tracks"] == b["tracks"] and a["messages"] == b["messages"]
    assert _bytes(make_clip(0, 4, num_frames)) != _bytes(a)
    assert a["messages"][0]["content"].startswith("<video>\n")


def test_too_short_clips_are_refused():
    with pytest.raises(ValueError, match="at least 2 frames"):
        make_clip(0, 0, 1)


def test_ground_truth_round_trips_and_is_what_the_frames_and_answers_show():
    for i in range(40):
        clip = make_clip(7, i, 12)
        tracks = [Track(**t) for t in json.loads(json.dumps(clip["tracks"]))]
        by_name = {t.name: t for t in tracks}
        # one word names an object: colours and shapes are distinct within a clip
        assert len({t.colour for t in tracks}) == len({t.shape for t in tracks}) == len(tracks)
        msgs = clip["messages"]
        for user, reply in zip(msgs[::2], msgs[1::2], strict=True):
            q, a = user["content"].replace("<video>\n", ""), reply["content"]
            if q.startswith("Where does the "):
                name = q[15:-9]
                assert a == f"The {name} moves to the {POSITIONS[by_name[name].end]}."
            elif q.startswith("How many"):
                assert a == f"{NUMBER_WORDS[len(tracks)].capitalize()}."
            elif q.startswith("Which object appears first"):
                assert a == f"The {min(tracks, key=lambda t: t.appear).name}."
            elif q.startswith("Which object leaves"):
                assert a == f"The {next(t for t in tracks if t.leave is not None).name}."
            else:  # a caption: every motion, from its start cell to its end cell
                for t in tracks:
                    assert f"{t.name}" in a and POSITIONS[t.end] in a
        text = " ".join(m["content"] for m in clip["messages"])
        if "leaves" in text:
            assert any(t.leave is not None and t.name in text for t in tracks)
        if len(tracks) == 1:  # alone in the clip: its colour where the track says it is
            t, frames = tracks[0], clip["frames"]
            for f in (0, 11):
                o = t.at(f, 12, 72)
                pixel = np.asarray(frames[f])[o.cy, o.cx].astype(int)
                assert np.abs(pixel - np.array(COLOURS[t.colour])).max() <= 40
        for t in tracks:
            if t.leave is not None:
                assert t.at(t.leave, 12, 72) is None and t.at(t.leave - 1, 12, 72) is not None
            assert t.at(t.appear, 12, 72) is not None
            assert t.appear == 0 or t.at(t.appear - 1, 12, 72) is None


def test_a_clip_written_as_mp4_reads_back_with_every_frame(tmp_path):
    clip = make_clip(1, 2, 8)
    path = write_video(tmp_path / "clip.mp4", clip["frames"])
    frames = sample_frames(path, 8)
    assert len(frames) == 8
    diff = np.abs(np.asarray(frames[0], dtype=int) - np.asarray(clip["frames"][0], dtype=int))
    assert diff.mean() < 12  # lossy codec, same picture


@pytest.mark.parametrize("fmt", ["mp4", "frames"])
def test_toy_data_video_writes_clips_that_the_video_reader_loads(tmp_path, fmt):
    from covspec.scripts.cli import main

    main(["toy-data", "--video", "--out", str(tmp_path / "v"), "--num", "2", "--frames", "6",
          "--format", fmt])  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "v/data.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["toyvideo-0-0-6", "toyvideo-0-1-6"]
    for r in records:
        assert r["tracks"] == make_clip(0, int(r["id"].split("-")[2]), 6)["tracks"]
        assert len(sample_frames(tmp_path / "v" / r["video"], 6)) == 6
    with pytest.raises(ValueError, match="fmt"):
        from covspec.data.toy_video import write_toy_video

        write_toy_video(tmp_path / "w", 1, fmt="gif")
