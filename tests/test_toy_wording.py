"""The paraphrase world: same scenes, answers in synonyms, judged by meaning."""

import random
from collections import Counter

import numpy as np
import pytest

from covspec.data.toy_wording import SYNONYMS, canonical
from covspec.data.toy_world import (
    DESCRIBE_PROMPTS,
    answer_correct,
    corpus_text,
    describe,
    make_sample,
    parse_description,
    question_answer,
    sample_objects,
)


def test_scenes_pixels_and_prompts_are_the_canonical_worlds():
    for i in range(40):
        a, b = make_sample(7, i), make_sample(7, i, paraphrase=True)
        assert a["objects"] == b["objects"]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        assert a["messages"][0] == b["messages"][0]  # the first prompt is drawn before any word
        assert b["id"] == f"toypara-7-{i}" and a["id"] == f"toy-7-{i}"
        # the first answer means the same thing in both worlds
        q = a["messages"][0]["content"]
        ref, para = a["messages"][1]["content"], b["messages"][1]["content"]
        assert answer_correct(a["objects"], q, ref, para)


def test_canonical_text_is_a_fixed_point_and_paraphrases_map_back():
    for text in corpus_text(0, 300):
        assert canonical(text) == text
    assert (
        canonical("The left side has a violet wedge.") == "The middle left has a purple triangle."
    )
    # "middle" is the center cell alone, never inside "middle left" or "top middle"
    assert canonical("In the middle, the middle left, the top middle.") == (
        "In the center, the middle left, the top center."
    )
    assert canonical("I count 3 items and 1 figure.") == "I count three objects and one shape."


@pytest.mark.parametrize("seed", range(3))
def test_paraphrased_descriptions_round_trip_and_vary(seed):
    rng = random.Random(seed)
    used = Counter()
    for _ in range(200):
        objects = sample_objects(rng)
        text = describe(objects, rng, paraphrase=True)
        assert parse_description(text) == [(o.colour, o.shape, o.position) for o in objects]
        used.update(w for alts in SYNONYMS.values() for w in alts if f" {w}" in f" {text}")
    # every colour, shape and position synonym is actually said
    said = {w for w, alts in SYNONYMS.items() if w not in ("object", "shape") for w in alts}
    assert not said - set(used), sorted(said - set(used))
    objects = sample_objects(random.Random(1))
    assert len({describe(objects, random.Random(i), paraphrase=True) for i in range(40)}) > 30


def test_paraphrased_short_answers_match_the_reference_by_meaning():
    rng = random.Random(4)
    differ = 0
    for _ in range(300):
        objects = sample_objects(rng)
        state = rng.getstate()
        q, ref = question_answer(objects, rng)
        rng.setstate(state)  # the same question again, its answer in synonyms
        q2, para = question_answer(objects, rng, paraphrase=True)
        assert q == q2
        differ += para != ref
        assert answer_correct([o.__dict__ for o in objects], q, ref, para)
    assert differ > 50


def test_wrong_content_in_synonyms_is_still_wrong():
    s = make_sample(3, 1, describe_prob=1.0, paraphrase=True)
    q, a = s["messages"][0]["content"], s["messages"][1]["content"]
    o = s["objects"][0]
    wrong = "orange" if o["colour"] != "orange" else "red"
    alt = SYNONYMS[wrong][0]  # a wrong colour said as a synonym
    assert answer_correct(s["objects"], q, a, a)
    said = next(w for w in (o["colour"], *SYNONYMS[o["colour"]]) if w in a)
    assert not answer_correct(s["objects"], q, a, a.replace(said, alt, 1))
    n = len(s["objects"])
    assert not answer_correct(s["objects"], q, a, f"I see {(n + 1) % 10} items. " + a)
    assert q.replace("<image>", "").strip() in DESCRIBE_PROMPTS


def test_toypara_spec_and_bad_specs():
    from covspec.data.datamodule import load_conversations

    ds = load_conversations("toypara:5:3")
    assert ds[0]["id"] == "toypara-3-0" and len(ds) == 5
    assert load_conversations("toy:5:3")[0]["id"] == "toy-3-0"
    for bad in ("toypara:x", "toypara:5:3:9", "toy:"):
        with pytest.raises(ValueError, match="toy"):
            load_conversations(bad)


def test_paraphrase_target_settings_digest_and_video_refusal():
    from covspec.training.toy_target import ToyTargetSettings
    from covspec.training.toy_video_target import ToyVideoTargetSettings

    # the canonical digest is unchanged by the new field: targets cached before it stay valid
    assert ToyTargetSettings().digest() == "5babfc730476d4bc"
    assert ToyTargetSettings(paraphrase=True).digest() != ToyTargetSettings().digest()
    assert ToyTargetSettings(paraphrase=True).corpus() != ToyTargetSettings().corpus()
    with pytest.raises(ValueError, match="paraphrase"):
        ToyVideoTargetSettings(paraphrase=True)
