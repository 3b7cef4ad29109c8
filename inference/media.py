"""What a prompt shows the target: any number of images, and optionally one video's frames.

    >>> media = as_media([page1, page2])                 # MMMU-style several images
    >>> media = Media(images=[], video=frames)           # a clip, frames already sampled
    >>> runner.generate(media, "What happens?")          # a bare PIL image still works too
    >>> media.save(buffer, format="PNG")                 # what the device would upload

`save` writes every image and frame one after another, so the link accounting (which sizes a
request's visual input by saving it as PNG) prices a multi-image or video prompt by all of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Media:
    images: list[Image.Image] = field(default_factory=list)
    video: list[Image.Image] | None = None  # frames of one clip, in time order

    def __post_init__(self) -> None:
        for i, im in enumerate([*self.images, *(self.video or [])]):
            if not isinstance(im, Image.Image):
                raise ValueError(f"media item {i} is a {type(im).__name__}, not a PIL image")
        if self.video is not None and not self.video:
            raise ValueError("a video needs at least one frame, got an empty frame list")

    @property
    def empty(self) -> bool:
        return not self.images and not self.video

    def save(self, fp: Any, format: str = "PNG") -> None:
        for im in [*self.images, *(self.video or [])]:
            im.save(fp, format=format)


@dataclass
class Encoded:
    """A prompt already through the target's processor: the runner uses `inputs` as they are
    (a policy that had to look at the tokens first does not pay the processor twice)."""

    media: Media | None
    inputs: Any  # the processor's BatchFeature, on the target's device

    def save(self, fp: Any, format: str = "PNG") -> None:  # the link accounting prices media
        if self.media is not None:
            self.media.save(fp, format=format)


def as_media(visual: Any) -> Media | None:
    """None, a PIL image, a sequence of them, or a Media -> Media (None when nothing to show)."""
    if visual is None:
        return None
    if isinstance(visual, Media):
        media = visual
    elif isinstance(visual, Image.Image):
        media = Media([visual])
    elif isinstance(visual, Sequence) and not isinstance(visual, (str, bytes)):
        media = Media(list(visual))
    else:
        raise ValueError(
            f"expected a PIL image, a list of them or a Media, got {type(visual).__name__}"
        )
    return None if media.empty else media
