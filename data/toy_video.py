"""The toy video world: seeded clips of moving shapes whose questions need several frames.

    >>> clip = make_clip(seed=0, index=3, num_frames=16)
    >>> clip["frames"]        # 16 PIL frames, in time order
    >>> clip["tracks"]        # per object: colour, shape, start/end cell, appear/leave frame
    >>> clip["messages"]      # a caption or 1-3 questions with their answers (LLaVA chat form)

An object keeps its colour name and shape for the whole clip (no two objects of a clip share a
colour or a shape, so either word alone names one), moves in a straight line from the
centre of one grid cell to another between the frame it appears and the frame it leaves, and is
drawn only in between. Captions and questions are about events, not one frame: where each
object moves, which appears first, how many objects appear over the clip, which one leaves.
Everything is a pure function of (seed, index, num_frames, image_size), so a clip can be
rebuilt from its id and its ground truth (`tracks`) is plain JSON. `covspec toy-data --video`
writes clips as mp4 files or frame folders beside a `data.jsonl` (`write_toy_video`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from covspec.data.toy_world import (
    COLOURS,
    DEFAULT_IMAGE_SIZE,
    NUMBER_WORDS,
    POSITIONS,
    PROMPT_SEED,
    SHAPES,
    ToyObject,
    chat_messages,
    distinct_turns,
    render,
)
from covspec.data.video import write_video
from covspec.modeling.outputs import check_replaceable, write_folder

MAX_TRACKS = 3  # <= len(SHAPES): shapes are distinct within a clip
VIDEO_DESCRIBE_PROMPTS = ("Describe the video.", "What happens in this clip?")


@dataclass(frozen=True)
class Track:
    colour: str
    shape: str
    start: int  # row-major cell index into POSITIONS
    end: int
    appear: int  # first frame it is drawn on
    leave: int | None  # first frame it is gone, None when it stays to the end
    size: int  # pixels, full extent

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def at(self, frame: int, num_frames: int, image_size: int) -> ToyObject | None:
        """The object as drawn on `frame`, or None when it is not in the frame."""
        last = num_frames if self.leave is None else self.leave
        if not self.appear <= frame < last:
            return None
        t = (frame - self.appear) / max(1, last - 1 - self.appear)  # 0 -> 1 over its life
        (r0, c0), (r1, c1) = divmod(self.start, 3), divmod(self.end, 3)
        cell = image_size / 3
        cx = round((c0 + (c1 - c0) * t + 0.5) * cell)
        cy = round((r0 + (r1 - r0) * t + 0.5) * cell)
        near = round(r0 + (r1 - r0) * t) * 3 + round(c0 + (c1 - c0) * t)
        return ToyObject(self.colour, self.shape, POSITIONS[near], near, self.size, cx, cy)


def sample_tracks(rng: random.Random, num_frames: int, image_size: int) -> list[Track]:
    """1..MAX_TRACKS objects with distinct colours, shapes, start cells and end cells, each
    moving to another cell; the first appears on frame 0, others may appear later, at most one
    leaves early."""
    if num_frames < 2:
        raise ValueError(f"a clip needs at least 2 frames, got {num_frames}")
    if image_size < 36:
        raise ValueError(f"image_size must be >= 36 to draw recognisable shapes, got {image_size}")
    count = rng.randint(1, MAX_TRACKS)
    # distinct colours and distinct shapes: either word alone picks an object out, so asking
    # about one never needs the colour-shape conjunction across frames
    kinds = list(zip(rng.sample(list(COLOURS), count), rng.sample(SHAPES, count), strict=True))
    leaver = rng.randrange(len(kinds)) if len(kinds) > 1 and rng.random() < 0.5 else None
    cell_px = image_size // 3
    starts = rng.sample(range(9), len(kinds))  # distinct start cells
    tracks, ends = [], set()
    for i, ((colour, shape), start) in enumerate(zip(kinds, starts, strict=True)):
        # distinct end cells too: no object ends hidden under another
        end = rng.choice([c for c in range(9) if c != start and c not in ends])
        ends.add(end)
        appear = 0 if i == 0 else rng.randrange(0, max(1, num_frames // 2))
        leave = None
        if i == leaver and num_frames - appear >= 3:
            leave = rng.randrange(appear + 2, num_frames)
        size = rng.randint(int(cell_px * 0.5), int(cell_px * 0.8))
        tracks.append(Track(colour, shape, start, end, appear, leave, size))
    return tracks


def caption(tracks: list[Track]) -> str:
    """What happens, in order of appearance: every motion, and who leaves."""
    ordered = sorted(tracks, key=lambda t: (t.appear, t.name))
    n = len(ordered)
    parts = [f"The video shows {NUMBER_WORDS[n]} {'object' if n == 1 else 'objects'}."]
    for t in ordered:
        how = "starts" if t.appear == 0 else "appears"
        article = "An" if t.name[0] in "aeiou" else "A"
        parts.append(
            f"{article} {t.name} {how} in the {POSITIONS[t.start]} and moves to the "
            f"{POSITIONS[t.end]}."
        )
        if t.leave is not None:
            parts.append(f"The {t.name} leaves.")
    return " ".join(parts)


def event_questions(tracks: list[Track]) -> list[tuple[str, str, str]]:
    """Every (kind, question, answer) the clip supports: where each object moves to, the
    count, and which appears first / leaves where that is defined; what evaluation asks."""
    # the answer names the object again ("The red square moves to ..."): its name, the token
    # before the cell, is what the cell is looked up from in the visual tokens
    out = [
        (
            "where_to",
            f"Where does the {t.name} move to?",
            f"The {t.name} moves to the {POSITIONS[t.end]}.",
        )
        for t in tracks
    ]
    n = len(tracks)
    out.append(
        ("count", "How many objects appear in the video?", f"{NUMBER_WORDS[n].capitalize()}.")
    )
    if len({t.appear for t in tracks}) == n > 1:
        first = min(tracks, key=lambda x: x.appear)
        out.append(("first", "Which object appears first?", f"The {first.name}."))
    leaver = next((t for t in tracks if t.leave is not None), None)
    if leaver is not None:
        out.append(("leaves", "Which object leaves the video?", f"The {leaver.name}."))
    return out


def frame_objects(tracks: list[dict], frame: int, num_frames: int, image_size: int) -> list[dict]:
    """The objects drawn on `frame` of a clip, from its ground truth (`clip["tracks"]`)."""
    drawn = [Track(**t).at(frame, num_frames, image_size) for t in tracks]
    return [asdict(o) for o in drawn if o is not None]


def question_answer(tracks: list[Track], rng: random.Random) -> tuple[str, str]:
    """One event question and its answer: a kind drawn uniformly, then (where_to) an object."""
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for kind, question, answer in event_questions(tracks):
        by_kind.setdefault(kind, []).append((question, answer))
    kind = rng.choice(list(by_kind))
    return rng.choice(by_kind[kind]) if kind == "where_to" else by_kind[kind][0]


LENGTH_SPREADS = ("uniform", "log")


def clip_length(
    seed: int, index: int, min_frames: int, max_frames: int, spread: str = "uniform"
) -> int:
    """The frame count of clip `index` in a stream of mixed-length clips: uniform over
    min..max frames, or `log`-uniform (as many clips of 2-4 frames as of 32-64: a wide range
    whose long clips stay a minority of the compute)."""
    rng = random.Random(index * 7919 + seed)
    if spread == "uniform":
        return rng.randint(min_frames, max_frames)
    if spread == "log":
        frames = math.exp(rng.uniform(math.log(min_frames), math.log(max_frames + 1)))
        return min(max_frames, int(frames))
    raise ValueError(f"spread must be one of {LENGTH_SPREADS}, got {spread!r}")


def _clip_world(seed: int, index: int, num_frames: int, image_size: int):
    """(rng, tracks, style) of a clip: what its frames and its conversation are drawn from."""
    rng = random.Random((seed * 1_000_003 + index) * 131 + num_frames)
    tracks = sample_tracks(rng, num_frames, image_size)
    style = rng.getrandbits(32)  # one background and palette jitter for every frame
    return rng, tracks, style


def _frame(tracks: list[Track], style: int, f: int, num_frames: int, image_size: int) -> tuple:
    drawn = [o for t in tracks if (o := t.at(f, num_frames, image_size)) is not None]
    return render(drawn, random.Random(style), image_size), drawn


def clip_frame(
    seed: int, index: int, num_frames: int, frame: int, image_size: int = DEFAULT_IMAGE_SIZE
) -> tuple[Image.Image, list[dict]]:
    """Frame `frame` of `make_clip(seed, index, num_frames, image_size)` and the objects on it,
    drawn alone (the vision stage of the toy video target needs one frame per clip)."""
    _, tracks, style = _clip_world(seed, index, num_frames, image_size)
    image, drawn = _frame(tracks, style, frame, num_frames, image_size)
    return image, [asdict(o) for o in drawn]


def clip_story(
    seed: int,
    index: int,
    num_frames: int = 8,
    image_size: int = DEFAULT_IMAGE_SIZE,
    describe_prob: float = 0.5,
    max_questions: int = 2,
    where_to_only: bool = False,
) -> dict:
    """`make_clip` without drawing the frames: {"id", "tracks", "messages"}, equal to the
    clip's for the same arguments (what a language stage on symbolic frames trains on)."""
    rng, tracks, _ = _clip_world(seed, index, num_frames, image_size)
    story = _story(rng, tracks, describe_prob, max_questions, where_to_only)
    return {"id": f"toyvideo-{seed}-{index}-{num_frames}", **story}


def _story(
    rng: random.Random,
    tracks: list[Track],
    describe_prob: float,
    max_questions: int,
    where_to_only: bool,
) -> dict:
    """The conversation about `tracks`, drawn from `rng` where `_clip_world` left it (so a clip
    and its story agree whichever of `make_clip` / `clip_story` built them)."""
    if where_to_only:  # every object's where-to question, in one conversation
        turns = [(q, a) for kind, q, a in event_questions(tracks) if kind == "where_to"]
        rng.shuffle(turns)
    elif rng.random() < describe_prob:
        turns = [(rng.choice(VIDEO_DESCRIBE_PROMPTS), caption(tracks))]
    else:
        turns = distinct_turns(lambda: question_answer(tracks, rng), rng.randint(1, max_questions))
    return {"tracks": [asdict(t) for t in tracks], "messages": chat_messages(turns, "<video>")}


def make_clip(
    seed: int,
    index: int,
    num_frames: int = 8,
    image_size: int = DEFAULT_IMAGE_SIZE,
    describe_prob: float = 0.5,
    max_questions: int = 2,
    where_to_only: bool = False,
) -> dict:
    """Clip `index` of the stream `seed`: {"id", "frames", "tracks", "messages"}; a caption turn
    with probability `describe_prob`, else 1..max_questions event questions (`<video>` opens
    the first turn); `where_to_only`: where every object moves to, and nothing else."""
    rng, tracks, style = _clip_world(seed, index, num_frames, image_size)
    story = _story(rng, tracks, describe_prob, max_questions, where_to_only)
    frames = [_frame(tracks, style, f, num_frames, image_size)[0] for f in range(num_frames)]
    return {"id": f"toyvideo-{seed}-{index}-{num_frames}", **story, "frames": frames}


class ToyVideoClips(torch.utils.data.Dataset):
    """`num` clips of stream `seed`, each built when it is read (clips are cheap to draw and
    heavy to hold), with min_frames..max_frames frames drawn per index (`spread`: uniform or
    log-uniform). Rows follow the conversation schema with `video` (the frames) in place of
    `image`; `lengths` (frames per clip) lets a sampler batch clips of equal length."""

    def __init__(
        self,
        num: int,
        seed: int = 0,
        min_frames: int = 2,
        max_frames: int = 16,
        image_size: int = DEFAULT_IMAGE_SIZE,
        spread: str = "uniform",
    ) -> None:
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        if not 2 <= min_frames <= max_frames:
            raise ValueError(f"need 2 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
        if spread not in LENGTH_SPREADS:
            raise ValueError(f"spread must be one of {LENGTH_SPREADS}, got {spread!r}")
        self.num, self.seed, self.image_size = num, seed, image_size
        self.min_frames, self.max_frames, self.spread = min_frames, max_frames, spread

    def __len__(self) -> int:
        return self.num

    def num_frames(self, index: int) -> int:
        return clip_length(self.seed, index, self.min_frames, self.max_frames, self.spread)

    @property
    def lengths(self) -> list[int]:
        return [self.num_frames(i) for i in range(self.num)]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num:
            raise IndexError(f"clip {index} of {self.num}")
        clip = make_clip(self.seed, index, self.num_frames(index), self.image_size)
        return {"id": clip["id"], "video": clip["frames"], "messages": clip["messages"]}


def toy_video_prompts(
    num: int, num_frames: int, seed: int = PROMPT_SEED, image_size: int = DEFAULT_IMAGE_SIZE
) -> list[dict]:
    """`num` unseen clips of `num_frames` frames with "Describe the video." (the long answer),
    each with its `frames` and ground-truth `tracks`, for the bench's video length sweep."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    out = []
    for i in range(num):
        clip = make_clip(seed, i, num_frames, image_size)
        out.append(
            {
                "id": clip["id"],
                "frames": clip["frames"],
                "prompt": VIDEO_DESCRIBE_PROMPTS[0],
                "kind": "description",
                "tracks": clip["tracks"],
            }
        )
    return out


def write_toy_video(
    out: str | Path,
    num: int,
    seed: int = 0,
    num_frames: int = 8,
    image_size: int = DEFAULT_IMAGE_SIZE,
    fmt: str = "mp4",
    overwrite: bool = False,
) -> Path:
    """Write `out/data.jsonl` and each clip as `videos/<id>.mp4` (`fmt="mp4"`) or as a folder
    of PNG frames (`fmt="frames"`), the two inputs `data.video.sample_frames` reads; each
    record holds its `video` path, `messages`, `tracks` (ground truth) and `num_frames`."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if fmt not in ("mp4", "frames"):
        raise ValueError(f"fmt must be 'mp4' or 'frames', got {fmt!r}")
    out = Path(out)
    check_replaceable(out, overwrite)  # before generating anything

    def write(tmp: Path) -> None:
        (tmp / "videos").mkdir()
        with (tmp / "data.jsonl").open("w", encoding="utf-8") as f:
            for i in tqdm(range(num), desc="toy video", unit="clip"):
                clip = make_clip(seed, i, num_frames, image_size)
                rel = f"videos/{clip['id']}" + (".mp4" if fmt == "mp4" else "")
                if fmt == "mp4":
                    write_video(tmp / rel, clip["frames"])
                else:
                    (tmp / rel).mkdir()
                    for k, frame in enumerate(clip["frames"]):
                        frame.save(tmp / rel / f"{k:05d}.png")
                record = {key: clip[key] for key in ("id", "messages", "tracks")}
                f.write(json.dumps({**record, "video": rel, "num_frames": num_frames}) + "\n")

    write_folder(out, write, overwrite=overwrite, kind="toy-video")
    return out / "data.jsonl"
