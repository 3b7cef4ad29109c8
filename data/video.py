"""Video frames for the target, sampled uniformly over a clip, decoded by PyAV (FFmpeg).

    >>> frames = sample_frames("clips/abc.mp4", 8)      # 8 PIL RGB frames, in time order
    >>> frames = sample_frames("frames_dir/", 8)         # a folder of JPEG/PNG frames works too
    >>> write_video("clip.mp4", frames, fps=4)           # what the tests' fixtures use

Frame indices are `linspace(0, n - 1, num_frames)` truncated to integers, the rule lmms-eval's
video loaders use, so a clip gives the frames people evaluate on. Each wanted frame is reached by
seeking to the keyframe before it and decoding forward, so an hour-long Video-MME clip costs
`num_frames` short decodes, not a full pass. Any decoding problem raises `VideoError` with the
path; callers turn it into an error that names the benchmark row.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


class VideoError(ValueError):
    """A clip that is missing, empty or cannot be decoded; the message names the path."""


def frame_indices(total: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread over `total` frames (lmms-eval's linspace rule)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total < 1:
        raise ValueError(f"a clip needs at least one frame, got {total}")
    return np.linspace(0, total - 1, num_frames, dtype=int).tolist()


def sample_frames(path: str | Path, num_frames: int) -> list[Image.Image]:
    """`num_frames` RGB frames spread uniformly over the clip at `path` (a file or a folder
    of frame images). Raises VideoError for a missing or undecodable clip."""
    path = Path(path)
    if path.is_dir():
        return _folder_frames(path, num_frames)
    if not path.is_file():
        raise VideoError(f"video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            total, rate = stream.frames, stream.average_rate
            if total <= 0:  # Matroska / WebM headers do not say: count packets, decode none
                total = sum(1 for packet in container.demux(stream) if packet.size)
                container.seek(stream.start_time or 0, stream=stream, backward=True)
            if total <= 0:
                raise VideoError("the video stream holds no frames")
            if rate and stream.time_base:
                frames = _seek_frames(container, stream, total, rate, num_frames)
            else:  # no clock to seek by: one decoding pass keeping only the wanted frames
                frames = _streamed_frames(container, stream, total, num_frames)
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot decode video {path}: {e}") from e
    if len(frames) != num_frames:
        raise VideoError(f"{path}: decoded {len(frames)} of {num_frames} wanted frames")
    return frames


def _seek_frames(container, stream, total: int, rate: Fraction, num_frames: int) -> list:
    start = stream.start_time or 0
    frames = []
    for index in frame_indices(total, num_frames):
        # the wanted frame's timestamp, less half a frame so rounding in pts cannot skip it
        target = start + int((Fraction(index) - Fraction(1, 2)) / rate / stream.time_base)
        container.seek(max(target, start), stream=stream, backward=True, any_frame=False)
        frame = next(
            (f for f in container.decode(stream) if f.pts is None or f.pts >= target), None
        )
        if frame is None:
            # the stream ended before the wanted time: the container overstated its length
            raise VideoError(f"no frame at index {index} of {total}")
        frames.append(frame.to_image().convert("RGB"))
    return frames


def _streamed_frames(container, stream, total: int, num_frames: int) -> list[Image.Image]:
    wanted = frame_indices(total, num_frames)
    keep = set(wanted)
    seen: dict[int, Image.Image] = {}
    for i, frame in enumerate(container.decode(stream)):
        if i in keep:
            seen[i] = frame.to_image().convert("RGB")
        if i >= wanted[-1]:
            break
    if len(seen) < len(keep):
        raise VideoError(f"decoded {len(seen)} of the {len(keep)} frames wanted of {total}")
    return [seen[i] for i in wanted]


def _folder_frames(path: Path, num_frames: int) -> list[Image.Image]:
    """Some benchmarks ship clips as folders of frames (MVBench's TVQA and NTU subsets)."""
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise VideoError(f"frame folder {path} holds no {'/'.join(FRAME_SUFFIXES)} files")
    frames = []
    for i in frame_indices(len(files), num_frames):
        try:
            with Image.open(files[i]) as im:
                frames.append(im.convert("RGB"))
        except OSError as e:
            raise VideoError(f"unreadable frame {files[i]}: {e}") from e
    return frames


def write_video(path: str | Path, frames: list[Image.Image], fps: int = 4) -> Path:
    """Encode `frames` (same size, even width and height) as MPEG-4 Part 2, a codec every
    FFmpeg build has; written to a temporary name, then renamed."""
    if not frames:
        raise ValueError("write_video needs at least one frame")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = 4  # a few keyframes, so readers must really seek
        for im in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(im.convert("RGB"))))
        container.mux(stream.encode())
    tmp.rename(path)
    return path
