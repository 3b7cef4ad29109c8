import random
from collections import Counter

import numpy as np
import pytest

from covspec.data.toy_world import (
    COLOURS,
    POSITIONS,
    SHAPES,
    describe,
    make_sample,
    parse_description,
    question_answer,
    sample_objects,
)


def test_deterministic_per_seed():
    a, b = make_sample(3, 17), make_sample(3, 17)
    assert a["messages"] == b["messages"] and a["objects"] == b["objects"]
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    c = make_sample(4, 17)
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))


def test_scene_vocabulary_and_layout():
    seen = Counter()
    for i in range(300):
        objs = make_sample(1, i)["objects"]
        assert 1 <= len(objs) <= 4
        assert len({o["cell"] for o in objs}) == len(objs)
        assert [o["cell"] for o in objs] == sorted(o["cell"] for o in objs)
        for o in objs:
            seen[o["colour"]] += 1
            seen[o["shape"]] += 1
            seen[o["position"]] += 1
            assert o["position"] == POSITIONS[o["cell"]]
    assert all(seen[k] for k in (*COLOURS, *SHAPES, *POSITIONS))
    assert len(COLOURS) >= 6 and len(SHAPES) == 3 and len(POSITIONS) == 9


@pytest.mark.parametrize("seed", range(5))
def test_descriptions_round_trip_to_objects(seed):
    rng = random.Random(seed)
    for _ in range(100):
        objects = sample_objects(rng)
        text = describe(objects, rng)
        assert parse_description(text) == [(o.colour, o.shape, o.position) for o in objects]


def test_descriptions_vary_in_phrasing():
    rng = random.Random(0)
    objects = sample_objects(rng)
    assert len({describe(objects, random.Random(i)) for i in range(40)}) > 10


def test_pixels_carry_the_answer():
    """Each object's colour is the dominant non-background colour at its centre."""
    for i in range(30):
        s = make_sample(2, i)
        pixels = np.asarray(s["image"]).astype(int)
        for o in s["objects"]:
            y = o["cy"] + (o["size"] // 4 if o["shape"] == "triangle" else 0)
            got = pixels[y, o["cx"]]
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - got).sum())
            assert nearest == o["colour"]


def test_questions_are_answered_from_objects():
    rng = random.Random(5)
    kinds = Counter()
    for _ in range(300):
        objects = sample_objects(rng)
        q, a = question_answer(objects, rng)
        kinds[q.split()[0] + " " + q.split()[1]] += 1
        if q.startswith("How many"):
            assert (
                str(len(objects)) in a or ["zero", "one", "two", "three", "four"][len(objects)] in a
            )
        if q.startswith("Is there a"):
            colour, shape = q[len("Is there a ") : -1].split()
            assert (a == "Yes.") == any((o.colour, o.shape) == (colour, shape) for o in objects)
    assert len(kinds) >= 6


def test_bad_image_size_refused():
    with pytest.raises(ValueError, match="12"):
        sample_objects(random.Random(0), image_size=12)


def test_answer_correct_checks_objects_positions_and_counts():
    from covspec.data.toy_world import answer_correct

    s = make_sample(3, 1, describe_prob=1.0)
    q, a = s["messages"][0]["content"], s["messages"][1]["content"]
    assert answer_correct(s["objects"], q, a, a)
    n = len(s["objects"])
    wrong_count = ["zero", "one", "two", "three", "four", "five"][(n + 1) % 6]
    assert not answer_correct(s["objects"], q, a, f"The image shows {wrong_count} shapes. " + a)
    first = s["objects"][0]
    swapped = a.replace(first["colour"], "zzz", 1)
    assert not answer_correct(s["objects"], q, a, swapped)  # an object named wrong
    qa = make_sample(5, 2, describe_prob=0.0)
    q, ref = qa["messages"][0]["content"], qa["messages"][1]["content"]
    assert answer_correct(qa["objects"], q, ref, ref.upper() + "!")
    assert not answer_correct(qa["objects"], q, ref, "Something else.")
