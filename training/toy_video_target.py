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

Same two stages as the image target (training/toy_target.py): the tower learns per-patch colour,
shape and cell on single frames of clips, then projector + Llama learn captions and event
questions on clips of `min_frames`..`max_frames` frames. `event_accuracy` asks every event
question a clip supports (where each object moves to, how many objects appear, which appears
first, which leaves) on unseen clips and compares the greedy answer with the ground truth.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from covspec.data.chat import encode_conversation, frames_as_images
from covspec.data.toy_video import (
    LENGTH_SPREADS,
    VIDEO_DESCRIBE_PROMPTS,
    Track,
    caption,
    clip_frame,
    clip_length,
    event_questions,
    make_clip,
)
from covspec.data.toy_world import corpus_text
from covspec.modeling.toy_vlm import ToyVLMSpec
from covspec.training.toy_target import EVAL_SEED, ToyTargetSettings, greedy_answers


def video_spec() -> ToyVLMSpec:
    return ToyVLMSpec(patch_size=24, max_position_embeddings=8192)


@dataclass(frozen=True)
class ToyVideoTargetSettings(ToyTargetSettings):
    spec: ToyVLMSpec = field(default_factory=video_spec)
    vision_steps: int = 1500  # cheap here (9 patches a frame) and what event questions rest on
    vision_batch: int = 64
    lm_steps: int = 1500
    lm_batch: int = 16
    min_frames: int = 2
    max_frames: int = 32
    # of clip lengths: log-uniform spends as much on 2-8 frames as on 8-32 (the long clips,
    # where a drafter is tested, without paying for them in every batch)
    frame_spread: str = "log"
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

    def num_frames(self, index: int) -> int:
        spread = self.frame_spread
        return clip_length(self.seed, index, self.min_frames, self.max_frames, spread)

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

    def lm_encode(self, processor):
        def encode(k: int) -> dict:
            # one length per batch (k counts conversations): nothing is padded to a longer clip
            num = self.num_frames(k // self.lm_batch)
            clip = make_clip(
                self.seed, k, num, self.spec.image_size, self.describe_prob, self.max_questions
            )
            messages = frames_as_images(clip["messages"], num)
            return encode_conversation(processor, messages, clip["frames"])

        return encode

    def evaluate(self, model, processor) -> dict:
        return event_accuracy(
            model, processor, self.eval_samples, self.eval_frames, self.spec.image_size
        )


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
