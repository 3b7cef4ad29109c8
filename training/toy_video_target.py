"""The toy video target: the toy target's LLaVA, trained from scratch on toy video clips.

    >>> from covspec.training.toy_target import build_toy_target
    >>> from covspec.training.toy_video_target import ToyVideoTargetSettings
    >>> build_toy_target("checkpoints/toy-video-target", ToyVideoTargetSettings())  # cached

A clip reaches the model as its frames, one image each, in time order (`frames_as_images`): the
way the runner and lmms-eval show video to a family without a video processor. transformers'
video processors (LLaVA-OneVision's, Qwen2-VL's) need torchvision, which does not install beside
this project's CPU torch, so the toy video target is the image toy target's family with a
coarser patch grid: 72x72 frames in 24x24 patches give 9 visual tokens per frame, one per grid
cell, so 8 frames are 72 visual tokens and 576 frames 5,184, the range the video length sweep
covers. Rotary positions reach 8,192 tokens.

The tower learns per-patch colour, shape and cell on single frames of clips, as in the image
target (training/toy_target.py). The language stage is different, because "where does the red
square move to" needs a lookup by name across the clip's visual tokens that a language model
trained from scratch is slow to find (training/toy_symbolic.py):
with `symbolic=True` Llama learns on symbolic frames (the ground truth's colour, shape and cell
embeddings in the image slots, nothing rendered), every `where_every`-th step a batch of
2-frame clips asking where every object moves, every `long_every`-th step one or a few clips
of up to `long_max_frames` frames (without them the model, having seen only short clips,
answers a 256-frame clip with "orange orange orange ..."), the other steps captions and event
questions on clips of `min_frames`..`max_frames` frames; then `align_steps` regress the
projector onto the symbolic embeddings, and `pixel_polish` steps train projector + Llama on
rendered frames, every other one a long clip: what the projector gives is near the symbolic
embeddings, not equal to them, and Llama trained on symbolic frames alone answers some clips
with "A red red red red ...", a colour read off the background slots.
`symbolic=False` trains projector + Llama on rendered frames instead.
`event_accuracy` asks every event question a clip supports (where each object moves to, how
many objects appear, which appears first, which leaves) on unseen clips and compares the greedy
answer with the ground truth.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, fields, replace

import torch
from tqdm.auto import tqdm

from covspec.data.chat import encode_conversation, encode_image_slots, frames_as_images
from covspec.data.toy_video import (
    LENGTH_SPREADS,
    VIDEO_DESCRIBE_PROMPTS,
    Track,
    caption,
    clip_frame,
    clip_length,
    clip_story,
    event_questions,
    frame_objects,
    make_clip,
)
from covspec.data.toy_world import corpus_text
from covspec.modeling.toy_vlm import ToyVLMSpec
from covspec.training.toy_symbolic import SymbolicFrames, align_projector, symbolic_loss
from covspec.training.toy_target import (
    EVAL_SEED,
    ToyTargetSettings,
    greedy_answers,
    patch_labels,
    train_language,
)

WHERE_TO_STREAM = 3  # seed offset of the dense where-to clips (seed + 1: vision, + 2: corpus)
PIXEL_STREAM = 4  # of the pixel polish's clips (its where-to stream would be + 4 + 3: unused)
# the settings of the stages after the symbolic language stage (none with symbolic=False)
AFTER_SYMBOLIC = ("align_steps", "align_lr", "pixel_polish", "pixel_lr", "pixel_step_frames")


def video_spec() -> ToyVLMSpec:
    return ToyVLMSpec(patch_size=24, max_position_embeddings=8192)


@dataclass(frozen=True)
class ToyVideoTargetSettings(ToyTargetSettings):
    spec: ToyVLMSpec = field(default_factory=video_spec)
    vision_steps: int = 1500  # cheap here (9 patches a frame) and what event questions rest on
    vision_batch: int = 64
    lm_steps: int = 1900
    lm_batch: int = 16
    symbolic: bool = True  # the language stage on symbolic frames, then `align_steps`
    where_every: int = 2  # every k-th language step: 2-frame clips, every where-to; 0 = none
    align_steps: int = 300  # projector regression onto the symbolic frames (symbolic only)
    align_lr: float = 2e-3
    min_frames: int = 2
    max_frames: int = 32
    # of clip lengths: log-uniform spends as much on 2-8 frames as on 8-32 (the long clips,
    # where a drafter is tested, without paying for them in every batch)
    frame_spread: str = "log"
    # every k-th language step (not a where-to one): clips of max_frames+1..long_max_frames
    # frames, log-uniform, max(1, long_step_frames // frames) of them, so the model has seen the
    # positions and the attention spread of the sweep's long clips; 0 = none
    long_every: int = 12
    long_max_frames: int = 576
    long_step_frames: int = 256
    # after the projector regression (symbolic only): language steps on rendered frames,
    # projector and Llama, the even ones captions and event questions on clips of
    # min_frames..max_frames frames, the odd ones long clips (max_frames+1..long_max_frames,
    # whatever long_every says) as many as fit in `pixel_step_frames` frames. The symbolic stage
    # never shows Llama the projector's real output, which is near the symbolic embeddings but
    # not equal to them; without this polish the target loops on some clips ("A red red red
    # red ..."), reading a colour off the background slots; 0 = none
    pixel_polish: int = 120
    pixel_lr: float = 3e-4
    pixel_step_frames: int = 256
    describe_prob: float = 0.3  # of a training clip's conversation being its caption
    max_questions: int = 3  # event questions per question conversation
    eval_samples: int = 100  # clips per evaluated frame count
    eval_frames: tuple[int, ...] = (4, 16)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.paraphrase:
            raise ValueError("the toy video world has no paraphrase variant: paraphrase=True")
        if self.frame_spread not in LENGTH_SPREADS:
            raise ValueError(
                f"frame_spread must be one of {LENGTH_SPREADS}, got {self.frame_spread!r}"
            )
        if not 2 <= self.min_frames <= self.max_frames:
            raise ValueError(
                f"need 2 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}"
            )
        if not 0.0 <= self.describe_prob <= 1.0 or self.max_questions < 1:
            raise ValueError(
                f"need 0 <= describe_prob <= 1 and max_questions >= 1, got "
                f"{self.describe_prob}, {self.max_questions}"
            )
        if not self.eval_frames or min(self.eval_frames) < 2:
            raise ValueError(f"eval_frames must be frame counts >= 2, got {self.eval_frames}")
        if not isinstance(self.where_every, int) or self.where_every < 0:
            raise ValueError(f"where_every must be an integer >= 0, got {self.where_every}")
        if self.align_lr <= 0:
            raise ValueError(f"align_lr must be > 0, got {self.align_lr}")
        after = {k: getattr(self, k) for k in AFTER_SYMBOLIC}
        changed = {k for k, v in after.items() if v != _DEFAULTS[k]}
        if not self.symbolic and changed - ({"pixel_polish"} if not self.pixel_polish else set()):
            raise ValueError(
                f"{after} set the stages after the symbolic language stage; with "
                "symbolic=False there are none"
            )
        grid = self.spec.image_size // self.spec.patch_size
        if self.symbolic and grid % 3:
            raise ValueError(
                f"symbolic frames label each patch with its cell: the patch grid must divide into "
                f"the 3x3 cells, got {grid}x{grid} (image_size {self.spec.image_size}, "
                f"patch_size {self.spec.patch_size})"
            )
        self._check_long_steps()
        self._check_pixel_polish()

    def _check_pixel_polish(self) -> None:
        pixel = {k: getattr(self, k) for k in ("pixel_polish", "pixel_lr", "pixel_step_frames")}
        counts = (self.pixel_polish, self.pixel_step_frames)
        if (
            not all(isinstance(v, int) for v in counts)
            or (self.pixel_polish < 0 or self.pixel_polish == 1 or self.pixel_step_frames < 1)
            or self.pixel_lr <= 0
        ):
            raise ValueError(
                "the pixel polish needs integers pixel_polish = 0 or >= 2 (every other step is a "
                f"long clip), pixel_step_frames >= 1 and pixel_lr > 0, got {pixel}"
            )
        if self.symbolic and self.pixel_polish:
            try:  # refused now, not after the stages before the polish
                self.pixel_stage()
            except ValueError as err:
                raise ValueError(f"the pixel polish's long clips: {err}") from err

    def _check_long_steps(self) -> None:
        long = {k: getattr(self, k) for k in ("long_every", "long_max_frames", "long_step_frames")}
        if not all(isinstance(v, int) for v in long.values()) or self.long_every < 0:
            raise ValueError(f"long-clip steps need integers, long_every >= 0, got {long}")
        if not self.long_every:
            return
        positions = self.long_max_frames * self.spec.num_image_tokens
        if (
            not self.max_frames < self.long_max_frames
            or positions >= self.spec.max_position_embeddings
        ):
            raise ValueError(
                f"need max_frames ({self.max_frames}) < long_max_frames and the longest clip's "
                f"{positions} visual tokens < max_position_embeddings "
                f"({self.spec.max_position_embeddings}), got {long}"
            )
        if self.long_step_frames < 1 or not any(map(self.long_step, range(self.lm_steps))):
            raise ValueError(
                f"need long_step_frames >= 1 and a long-clip step among the {self.lm_steps} "
                f"language steps (where_every {self.where_every}), got {long}"
            )

    def num_frames(self, index: int) -> int:
        spread = self.frame_spread
        return clip_length(self.seed, index, self.min_frames, self.max_frames, spread)

    def where_step(self, step: int) -> bool:
        return bool(self.where_every) and step % self.where_every == 0

    def long_step(self, step: int) -> bool:
        every = self.long_every
        return bool(every) and step % every == every - 1 and not self.where_step(step)

    def long_frames(self, step: int) -> int:
        return clip_length(self.seed, step, self.max_frames + 1, self.long_max_frames, "log")

    def step_batch(self, step: int) -> int:
        if not self.long_step(step):
            return self.lm_batch
        return min(self.lm_batch, max(1, self.long_step_frames // self.long_frames(step)))

    def corpus(self) -> list[str]:
        texts = corpus_text(self.seed, 1000) + list(VIDEO_DESCRIBE_PROMPTS)
        for i in range(3000):
            clip = make_clip(self.seed + 2, i, 4)
            tracks = [Track(**t) for t in clip["tracks"]]
            texts.append(caption(tracks))
            texts += [f"{q} {a}" for _, q, a in event_questions(tracks)]
        return texts

    def vision_draw(self):
        def draw(k: int) -> tuple:
            num = self.num_frames(k)
            return clip_frame(self.seed + 1, k, num, k % num, self.spec.image_size)

        return draw

    def lm_clip(self, k: int) -> tuple[int, int, int, bool]:
        """(stream seed, index, frames, where-to only) of language-stage conversation `k`."""
        step = k // self.lm_batch
        if self.where_step(step):
            return self.seed + WHERE_TO_STREAM, k, 2, True
        if self.long_step(step):
            return self.seed, k, self.long_frames(step), False
        # one length per batch (k counts conversations): nothing is padded to a longer clip
        return self.seed, k, self.num_frames(step), False

    def lm_encode(self, processor):
        size, describe, questions = self.spec.image_size, self.describe_prob, self.max_questions

        def encode(k: int) -> dict:
            seed, index, num, where_to = self.lm_clip(k)
            clip = make_clip(seed, index, num, size, describe, questions, where_to)
            messages = frames_as_images(clip["messages"], num)
            return encode_conversation(processor, messages, clip["frames"])

        return encode

    def symbolic_encode(self, processor):
        """`lm_encode`'s conversations as `encode_image_slots` rows with `visual_labels`
        (frames x patches, 3): the same token ids, and the ground truth for every slot."""
        size, describe, questions = self.spec.image_size, self.describe_prob, self.max_questions
        grid = size // self.spec.patch_size
        tokens = self.spec.num_image_tokens

        def encode(k: int) -> dict:
            seed, index, num, where_to = self.lm_clip(k)
            clip = clip_story(seed, index, num, size, describe, questions, where_to)
            enc = encode_image_slots(processor, frames_as_images(clip["messages"], num), tokens)
            objects = [frame_objects(clip["tracks"], f, num, size) for f in range(num)]
            labels = torch.cat([patch_labels(o, grid) for o in objects])  # (num * P, 3)
            return {**enc, "visual_labels": labels}

        return encode

    def pixel_stage(self) -> ToyVideoTargetSettings:
        """The settings `train_language` runs the pixel polish with: clips no other stage draws
        (stream seed + PIXEL_STREAM), every other step a long clip, no where-to-only steps."""
        return replace(
            self,
            seed=self.seed + PIXEL_STREAM,
            lm_steps=self.pixel_polish,
            lm_lr=self.pixel_lr,
            # a fresh optimiser on a trained model: a short warm-up, ~8% of the steps
            warmup_steps=max(1, self.pixel_polish // 12),
            where_every=0,
            long_every=2,
            long_step_frames=self.pixel_step_frames,
            pixel_polish=0,  # these settings are the polish, not a recipe with one
        )

    def total_steps(self) -> int:
        after = self.align_steps + self.pixel_polish if self.symbolic else 0
        return super().total_steps() + after

    def train_language_stage(self, model, processor, bar: tqdm) -> None:
        if not self.symbolic:
            train_language(model, processor, self, bar, self.lm_encode(processor))
            return
        frames = SymbolicFrames(self.spec.text_hidden)
        encode, loss = self.symbolic_encode(processor), symbolic_loss(frames)
        train_language(model, processor, self, bar, encode, loss, frames.parameters())
        draw = self.vision_draw()
        align_projector(model, processor, frames, draw, self.align_steps, self.align_lr, bar)
        if self.pixel_polish:
            pixel = self.pixel_stage()
            train_language(model, processor, pixel, bar, pixel.lm_encode(processor))

    def evaluate(self, model, processor) -> dict:
        return event_accuracy(
            model, processor, self.eval_samples, self.eval_frames, self.spec.image_size
        )


_DEFAULTS = {f.name: f.default for f in fields(ToyVideoTargetSettings)}


def _norm(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def event_accuracy(
    model,
    processor,
    num: int,
    frames: tuple[int, ...] = (4, 16),
    image_size: int = 72,
    seed: int = EVAL_SEED,
) -> dict:
    """Fraction of event questions answered exactly right on `num` unseen clips per frame count
    (every question a clip supports), overall, per question kind, per frame count and, for
    where-to questions, per number of objects in the clip. `where_to_guess_rate` is what naming
    the end cell of a uniformly drawn object of the clip would score on the same where-to
    questions: the level of a target that finds objects but cannot tell which one is asked."""
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    guess: list[float] = []
    example = ""
    for num_frames in frames:
        prompts, images, truths = [], [], []
        for i in range(num):
            clip = make_clip(seed, i, num_frames, image_size)
            tracks = [Track(**t) for t in clip["tracks"]]
            for kind, question, answer in event_questions(tracks):
                messages = frames_as_images(
                    [{"role": "user", "content": f"<video>\n{question}"}], num_frames
                )
                prompts.append(
                    processor.apply_chat_template(
                        messages, tokenize=False, add_generation_prompt=True
                    )
                )
                images.append(clip["frames"])
                truths.append((kind, answer, len(tracks)))
        answers = greedy_answers(model, processor, prompts, images, max_new_tokens=16)
        example = example or answers[0]
        for (kind, truth, objects), answer in zip(truths, answers, strict=True):
            ok = _norm(answer) == _norm(truth)
            keys = ["all", kind, f"frames={num_frames}"]
            if kind == "where_to":
                keys.append(f"where_to/objects={objects}")
                guess.append(1 / objects)
            for key in keys:
                right[key] += ok
                total[key] += 1
    per = {k: right[k] / total[k] for k in total}
    return {
        "event_accuracy": per.pop("all"),
        "event_accuracy_by": per,
        "where_to_guess_rate": sum(guess) / len(guess),
        "num_questions": total["all"],
        "clips_per_frame_count": num,
        "eval_seed": seed,
        "example": example,
    }
