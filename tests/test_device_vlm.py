"""The small-VLM device drafter: lossless drafting with its own cache, loading, accounting."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from covspec.data.toy_world import make_sample
from covspec.inference.compute import PROFILES
from covspec.inference.link import PRESETS, Link
from covspec.inference.protocols import PROTOCOLS, run_protocol
from covspec.inference.roles import Request
from covspec.inference.runner import SpecRunner
from covspec.inference.timeline import Timeline
from covspec.inference.tree import DraftSettings
from covspec.inference.vlm_drafter import is_device_vlm
from covspec.modeling.adapters import TargetMismatchError

MAX_NEW = 32
PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def small_dir(micro_small_dir):
    return micro_small_dir


def _reference(runner, image):
    inputs = runner.encode(image, PROMPT)
    with torch.no_grad():
        out = runner.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=MAX_NEW,
            suppress_tokens=runner.suppress_tokens,
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_small_vlm_drafter_equals_generate(micro_target_dir, small_dir, mode):
    assert is_device_vlm(small_dir)
    runner = SpecRunner.from_folders(str(micro_target_dir), str(small_dir))
    assert runner.device_vlm is not None and runner.drafter is None
    settings = DraftSettings(mode=mode, depth=4, top_k=2, beam=2, max_nodes=8, branch_margin=None)
    for i in range(3):
        s = make_sample(61, i)
        got = runner.generate(s["image"], PROMPT, MAX_NEW, settings)
        assert got.tokens == _reference(runner, s["image"]), (mode, i)
        assert got.rounds >= 1


def test_drafting_itself_is_accepted(micro_target_dir):
    """The target as its own device drafter: every drafted token is accepted (cache handling
    across rounds, pending tokens of the last level included, is exact)."""
    model = AutoModelForImageTextToText.from_pretrained(micro_target_dir).eval()
    runner = SpecRunner(model, AutoProcessor.from_pretrained(micro_target_dir), None, model)
    s = make_sample(62, 0)
    for mode in ("chain", "tree"):
        got = runner.generate(s["image"], PROMPT, MAX_NEW, DraftSettings(mode=mode, depth=3))
        assert got.tokens == _reference(runner, s["image"])
        full = [a == n for a, n in zip(got.accepted_per_depth, got.attempts_per_depth, strict=True)]
        assert all(full) and got.tau > 3.0


def test_every_protocol_and_no_feature_downlink(micro_target_dir, small_dir):
    runner = SpecRunner.from_folders(str(micro_target_dir), str(small_dir))
    s = make_sample(63, 0)
    ref = _reference(runner, s["image"])
    for protocol in PROTOCOLS:
        timeline = Timeline(
            Link(PRESETS["medium"]), PROFILES["a40-orin-7b"], runner.adapter.vocab_size
        )
        got = run_protocol(protocol, runner, Request(s["image"], PROMPT, MAX_NEW), timeline,
                           DraftSettings(mode="tree", depth=3))  # fmt: skip
        assert got.tokens == ref, protocol
        if protocol != "edge_only":
            kinds = {m[1]: m[2] for m in timeline.messages if m[0] == "down"}
            assert kinds["FeatureDownlink"] < 40  # header + the first token: no features
            assert timeline.compute_model.drafter.name.startswith("LLaVA-OneVision-0.5B")


def test_other_tokenizer_refused(micro_target_dir, tmp_path):
    from tests.tiny_vlms import llava

    model, _ = llava()
    model.save_pretrained(tmp_path)
    AutoProcessor.from_pretrained(micro_target_dir).save_pretrained(tmp_path)
    # same processor files, but rewrite the tokenizer's vocabulary: another tokenizer
    import json

    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab[first + "x"] = vocab.pop(first)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(TargetMismatchError, match="another tokenizer"):
        SpecRunner.from_folders(str(micro_target_dir), str(tmp_path))
