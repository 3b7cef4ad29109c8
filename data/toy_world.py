"""The toy world: seeded synthetic scenes of coloured shapes, with captions and questions.

No model hub is reachable from our machines and a random target makes acceptance lengths
meaningless, so the project builds a small but real VLM world from nothing. Every answer depends
on the pixels; every sample carries its ground-truth object list.

    >>> from covspec.data.toy_world import make_sample, parse_description
    >>> s = make_sample(seed=0, index=3)
    >>> s["image"].size, s["messages"][0]["content"].startswith("<image>")
    ((72, 72), True)
    >>> [(o["colour"], o["shape"], o["position"]) for o in s["objects"]]  # doctest: +SKIP
    [('red', 'circle', 'top left'), ...]
    >>> parse_description("There is a red circle in the top left.")
    [('red', 'circle', 'top left')]

Scenes are a 3x3 grid; each of 1-4 objects sits in its own cell with size and position jitter.
Descriptions list the objects in reading order (row-major) in varied phrasings, so the target's
next-token distribution has real entropy at clause starts while the content stays determined by
the image: the regime where speculative decoding pays most.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from covspec.data.toy_wording import (
    EXTRA_CLAUSES,
    EXTRA_INTROS,
    EXTRA_OUTROS,
    canonical,
    say,
    say_number,
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MAX_OBJECTS = 4
DEFAULT_IMAGE_SIZE = 72
PROMPT_SEED = 31_337  # the stream bench and sweep prompts come from, unseen by training

DESCRIBE_PROMPTS = (
    "Describe the image.",
    "Describe this scene in detail.",
    "What do you see in this picture?",
    "List every object in the image with its position.",
)
_INTROS = (
    "There {are} {n} {objects} in the image.",
    "The image shows {n} {shapes}.",
    "I can see {n} {objects}.",
    "This picture contains {n} {shapes}.",
    "",
)
_CLAUSES = (
    "There is a {obj} in the {pos}.",
    "A {obj} is in the {pos}.",
    "In the {pos} there is a {obj}.",
    "The {pos} holds a {obj}.",
    "I see a {obj} in the {pos}.",
)
_OUTROS = ("", "", "Nothing else is in the image.", "The background is plain.")


@dataclass(frozen=True)
class ToyObject:
    colour: str
    shape: str
    position: str
    cell: int  # row-major index into POSITIONS
    size: int  # pixels, full extent
    cx: int
    cy: int


def sample_objects(rng: random.Random, image_size: int = DEFAULT_IMAGE_SIZE) -> list[ToyObject]:
    """1..MAX_OBJECTS objects in distinct grid cells, sorted in reading order."""
    if image_size < 36:
        raise ValueError(f"image_size must be >= 36 to draw recognisable shapes, got {image_size}")
    cell_px = image_size // 3
    cells = sorted(rng.sample(range(9), rng.randint(1, MAX_OBJECTS)))
    objects = []
    for cell in cells:
        size = rng.randint(int(cell_px * 0.5), int(cell_px * 0.85))
        half = size / 2
        row, col = divmod(cell, 3)
        lo_x, lo_y = col * cell_px + half + 1, row * cell_px + half + 1
        hi_x, hi_y = (col + 1) * cell_px - half - 1, (row + 1) * cell_px - half - 1
        objects.append(
            ToyObject(
                colour=rng.choice(list(COLOURS)),
                shape=rng.choice(SHAPES),
                position=POSITIONS[cell],
                cell=cell,
                size=size,
                cx=round(rng.uniform(lo_x, max(lo_x, hi_x))),
                cy=round(rng.uniform(lo_y, max(lo_y, hi_y))),
            )
        )
    return objects


def render(objects: list[ToyObject], rng: random.Random, image_size: int) -> Image.Image:
    """Draw the objects on a light, slightly noisy background."""
    base = np.array([rng.randint(225, 255) for _ in range(3)], dtype=np.int16)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-6, 7, (image_size, image_size, 3))
    canvas = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        fill = tuple(int(np.clip(c + rng.randint(-20, 20), 0, 255)) for c in COLOURS[o.colour])
        h = o.size / 2
        box = (o.cx - h, o.cy - h, o.cx + h, o.cy + h)
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(o.cx, o.cy - h), (o.cx - h, o.cy + h), (o.cx + h, o.cy + h)], fill=fill)
    return canvas


def describe(objects: list[ToyObject], rng: random.Random, paraphrase: bool = False) -> str:
    """A long description naming every object as '<colour> <shape>' with its position.

    `paraphrase`: every colour, shape, position and count word drawn from its synonyms, and
    more phrasings (data/toy_wording.py)."""
    n = len(objects)
    intros, clauses, outros = _INTROS, _CLAUSES, _OUTROS
    if paraphrase:
        intros, clauses = intros + EXTRA_INTROS, clauses + EXTRA_CLAUSES
        outros = outros + EXTRA_OUTROS

    def word(w: str) -> str:
        return say(w, rng, paraphrase)

    intro = rng.choice(intros).format(
        are="is" if n == 1 else "are",
        n=say_number(n, rng, paraphrase),
        objects=word("object" if n == 1 else "objects"),
        shapes=word("shape" if n == 1 else "shapes"),
    )
    said = [
        rng.choice(clauses).format(obj=f"{word(o.colour)} {word(o.shape)}", pos=word(o.position))
        for o in objects
    ]
    parts = [intro, *said, rng.choice(outros)]
    return " ".join(p for p in parts if p)


_OBJ_RE = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")
_POS_RE = re.compile(r"\b(" + "|".join(sorted(POSITIONS, key=len, reverse=True)) + r")\b")


def parse_description(text: str) -> list[tuple[str, str, str | None]]:
    """(colour, shape, position) for every object a description names, in order.

    Position is the position phrase of the same sentence, or None when the sentence has none.
    Paraphrases ("crimson disc", "upper left") are read as their canonical words.
    """
    found = []
    for sentence in re.split(r"(?<=[.!?])\s+", canonical(text)):
        positions = _POS_RE.findall(sentence)
        for m in _OBJ_RE.finditer(sentence):
            found.append((m.group(1), m.group(2), positions[0] if len(positions) == 1 else None))
    return found


_COUNT_RE = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r") (?:objects?|shapes?)\b")


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def answer_correct(objects: list[dict], question: str, reference: str, answer: str) -> bool:
    """Task-level correctness of an answer to a toy question (the scene's ground truth decides).

    A description must name exactly the scene's objects as (colour, shape) multisets, every
    position it states must be that object's, and every count it states ("three shapes") must
    be the number of objects; a short answer must equal the reference up to case, punctuation
    and paraphrase (both read in canonical words: the toy world's short answers differ only by
    synonyms).
    """
    answer, reference = canonical(answer), canonical(reference)
    if question.replace("<image>", "").strip() in DESCRIBE_PROMPTS:
        if any(NUMBER_WORDS.index(n) != len(objects) for n in _COUNT_RE.findall(answer)):
            return False
        parsed = parse_description(answer)
        truth = Counter((o["colour"], o["shape"]) for o in objects)
        if Counter((c, s) for c, s, _ in parsed) != truth:
            return False
        places = {(o["colour"], o["shape"], o["position"]) for o in objects}
        return all(p is None or (c, s, p) in places for c, s, p in parsed)
    return _normalise(answer) == _normalise(reference)


def _unique(objects: list[ToyObject], key: str) -> list[ToyObject]:
    values = [getattr(o, key) for o in objects]
    return [o for o in objects if values.count(getattr(o, key)) == 1]


_CONTENT_RE = re.compile(
    r"\b("
    + "|".join(
        sorted(
            (*COLOURS, *SHAPES, *POSITIONS, "objects", "object", *NUMBER_WORDS),
            key=len,
            reverse=True,
        )
    )
    + r")\b"
)


def question_answer(
    objects: list[ToyObject], rng: random.Random, paraphrase: bool = False
) -> tuple[str, str]:
    """One short question about the scene and its answer (colour/shape/count/position/yes-no).

    Questions are always in canonical words; `paraphrase` draws the answer's content words from
    their synonyms."""
    question, answer = _question_answer(objects, rng)
    if not paraphrase:
        return question, answer

    # one uniform draw per content word of the answer, as descriptions do per mention
    def draw(m: re.Match) -> str:
        w = m.group(1)
        return (
            say_number(NUMBER_WORDS.index(w), rng, True) if w in NUMBER_WORDS else say(w, rng, True)
        )

    return question, _CONTENT_RE.sub(draw, answer)


def _question_answer(objects: list[ToyObject], rng: random.Random) -> tuple[str, str]:
    kinds = ["count", "what_at", "yes_no", "where"]
    if _unique(objects, "shape"):
        kinds.append("colour")
    if _unique(objects, "colour"):
        kinds.append("shape")
    kind = rng.choice(kinds)
    n = len(objects)
    if kind == "count":
        noun = "object" if n == 1 else "objects"
        return (
            "How many objects are there?",
            f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {noun}.",
        )
    if kind == "colour":
        o = rng.choice(_unique(objects, "shape"))
        return f"What colour is the {o.shape}?", f"The {o.shape} is {o.colour}."
    if kind == "shape":
        o = rng.choice(_unique(objects, "colour"))
        return f"What shape is the {o.colour} object?", f"It is a {o.shape}."
    if kind == "what_at":
        cell = rng.randrange(9)
        hit = [o for o in objects if o.cell == cell]
        answer = f"A {hit[0].colour} {hit[0].shape}." if hit else "Nothing."
        return f"What is in the {POSITIONS[cell]}?", answer
    if kind == "where":
        o = rng.choice(objects)
        same = [p for p in objects if (p.colour, p.shape) == (o.colour, o.shape)]
        where = " and the ".join(p.position for p in same)
        return f"Where is the {o.colour} {o.shape}?", f"In the {where}."
    present = rng.random() < 0.5
    if present:
        o = rng.choice(objects)
        colour, shape = o.colour, o.shape
    else:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        present = any((o.colour, o.shape) == (colour, shape) for o in objects)
    return f"Is there a {colour} {shape}?", "Yes." if present else "No."


PROMPT_KINDS = {
    "How many": "count",
    "What colour": "colour",
    "What shape": "shape",
    "What is in": "position",
    "Where is": "position",
    "Is there": "yes_no",
}


def prompt_kind(prompt: str) -> str:
    """The kind of a toy prompt: description, count, colour, shape, position, yes_no (other
    prompts: other). Reports break results down by it."""
    prompt = prompt.replace("<image>", "").strip()
    if prompt in DESCRIBE_PROMPTS:
        return "description"
    return next((k for head, k in PROMPT_KINDS.items() if prompt.startswith(head)), "other")


def distinct_turns(draw: Callable[[], tuple[str, str]], wanted: int) -> list[tuple[str, str]]:
    """Up to `wanted` (question, answer) pairs from `draw` with distinct questions (a few tries
    each, so a scene with fewer distinct questions gives fewer turns)."""
    turns: list[tuple[str, str]] = []
    for _ in range(wanted * 4):
        qa = draw()
        if qa[0] not in {q for q, _ in turns}:
            turns.append(qa)
        if len(turns) == wanted:
            break
    return turns


def chat_messages(turns: list[tuple[str, str]], placeholder: str) -> list[dict]:
    """LLaVA-style messages; the media placeholder opens the first user turn."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        content = (f"{placeholder}\n" if i == 0 else "") + question
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return messages


def make_sample(
    seed: int,
    index: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    describe_prob: float = 0.6,
    paraphrase: bool = False,
) -> dict:
    """Sample `index` of the stream `seed`: {"id", "image", "messages", "objects"}.

    With probability `describe_prob` the conversation is one description turn; otherwise it is
    1-3 short question turns. The image placeholder `<image>` opens the first user turn
    (LLaVA convention). `paraphrase`: the paraphrase world's answers (data/toy_wording.py); the
    scene, its pixels and the prompts' kinds are drawn first, so they match the canonical world's.
    """
    rng = random.Random(seed * 1_000_003 + index)
    objects = sample_objects(rng, image_size)
    image = render(objects, rng, image_size)
    if rng.random() < describe_prob:
        turns = [(rng.choice(DESCRIBE_PROMPTS), describe(objects, rng, paraphrase))]
    else:
        turns = distinct_turns(lambda: question_answer(objects, rng, paraphrase), rng.randint(1, 3))
    return {
        "id": f"{'toypara' if paraphrase else 'toy'}-{seed}-{index}",
        "image": image,
        "messages": chat_messages(turns, "<image>"),
        "objects": [asdict(o) for o in objects],
    }


def corpus_text(seed: int, num: int, paraphrase: bool = False) -> list[str]:
    """Every string the toy world can say (prompts and answers), for training a tokenizer."""
    texts = []
    for i in range(num):
        rng = random.Random(seed * 1_000_003 + i)
        objects = sample_objects(rng)
        texts.append(describe(objects, rng, paraphrase))
        texts.extend(question_answer(objects, rng, paraphrase))
    return texts + list(DESCRIBE_PROMPTS)
