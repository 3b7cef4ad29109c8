"""Paraphrase freedom for the toy world: synonyms a scene can be said in, and their canonical form.

    >>> from covspec.data.toy_wording import canonical, say
    >>> canonical("A crimson disc sits in the upper left. I count 3 items.")
    'A red circle sits in the top left. I count three objects.'
    >>> say("red", random.Random(0), paraphrase=True) in ("red", "crimson")
    True

The canonical toy world names every colour, shape, position and count one way, so a draft token
the target would not have chosen is nearly always wrong content: there is nothing for a lossy
acceptance rule (WISV) to accept. Real answers are not like that: "crimson" for "red", "upper
left" for "top left", "3" for "three" mean the same thing. The paraphrase world
(`make_sample(..., paraphrase=True)`) draws every such word from its synonyms, uniformly and per
mention, and adds clause phrasings; its scenes and pixels are the canonical world's, byte for
byte. `canonical` maps any wording back, so `parse_description` and `answer_correct` judge both
worlds by meaning. Synonyms are chosen so that no phrase of one meaning is another's: the map is
a longest-first phrase substitution, and canonical text maps to itself.
"""

from __future__ import annotations

import random
import re

# canonical word or phrase -> its paraphrases (the canonical one is always a choice too)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson",),
    "green": ("emerald",),
    "blue": ("azure",),
    "yellow": ("golden",),
    "purple": ("violet",),
    "orange": ("amber",),
    "circle": ("disc",),
    "square": ("block",),
    "triangle": ("wedge",),
    "top left": ("upper left",),
    "top center": ("top middle",),
    "top right": ("upper right",),
    "middle left": ("left side",),
    "center": ("middle",),
    "middle right": ("right side",),
    "bottom left": ("lower left",),
    "bottom center": ("bottom middle",),
    "bottom right": ("lower right",),
    "object": ("item",),
    "objects": ("items",),
    "shape": ("figure",),
    "shapes": ("figures",),
}
DIGITS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# extra phrasings of the paraphrase world (the canonical world's own come first in toy_world)
EXTRA_INTROS = (
    "Here {are} {n} {objects}.",
    "The scene has {n} {shapes}.",
)
EXTRA_CLAUSES = (
    "A {obj} sits in the {pos}.",
    "You can see a {obj} in the {pos}.",
    "The {pos} has a {obj}.",
)
EXTRA_OUTROS = ("That is all.",)

_TO_CANONICAL = {alt: word for word, alts in SYNONYMS.items() for alt in alts}
_TO_CANONICAL.update(dict(zip(DIGITS, _NUMBER_WORDS, strict=True)))
assert not set(_TO_CANONICAL) & set(SYNONYMS), "a paraphrase must not be a canonical word"
# canonical phrases map to themselves and take part in the longest-first match, so "middle"
# (center) is never read inside "middle left" and canonical text is a fixed point
_PHRASES = {**{w: w for w in SYNONYMS}, **_TO_CANONICAL}
_PHRASE_RE = re.compile(
    r"\b(" + "|".join(re.escape(a) for a in sorted(_PHRASES, key=len, reverse=True)) + r")\b"
)


def say(word: str, rng: random.Random, paraphrase: bool) -> str:
    """`word` itself, or (paraphrase world) one of its synonyms drawn uniformly, itself included.

    The canonical world draws nothing here, so its samples stay byte-identical."""
    if not paraphrase or word not in SYNONYMS:
        return word
    return rng.choice((word, *SYNONYMS[word]))


def say_number(n: int, rng: random.Random, paraphrase: bool) -> str:
    """The number word, or (paraphrase world) the word or its digit."""
    return rng.choice((_NUMBER_WORDS[n], DIGITS[n])) if paraphrase else _NUMBER_WORDS[n]


def canonical(text: str) -> str:
    """`text` with every paraphrase replaced by its canonical word or phrase.

    No toy phrasing starts a sentence with a paraphrased word, so matching is case-sensitive."""
    return _PHRASE_RE.sub(lambda m: _PHRASES[m.group(1)], text)
