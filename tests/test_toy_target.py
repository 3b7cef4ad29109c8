"""A seconds-long micro version of `covspec toy-target`: same code path, tiny sizes."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from covspec.data.toy_world import make_sample
from covspec.modeling.toy_vlm import ToyVLMSpec
from covspec.training.toy_target import REPORT_NAME, ToyTargetSettings, build_toy_target

MICRO = ToyTargetSettings(
    spec=ToyVLMSpec(
        vision_hidden=32,
        vision_layers=1,
        vision_heads=2,
        text_hidden=32,
        text_layers=2,
        text_heads=2,
        text_intermediate=64,
        vocab_size=320,
    ),
    vision_steps=2,
    vision_batch=4,
    lm_steps=30,
    lm_batch=4,
    warmup_steps=1,
    eval_samples=2,
)


@pytest.fixture(scope="module")
def micro_target(micro_target_dir):
    return micro_target_dir, json.loads((micro_target_dir / REPORT_NAME).read_text())


def test_folder_loads_with_auto_classes_and_gives_identical_logits(micro_target):
    out, report = micro_target
    assert {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        REPORT_NAME,
    } <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(".*tmp*")), "temporary folder left behind"
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    s = make_sample(5, 0)
    text = processor.apply_chat_template(s["messages"], tokenize=False)
    inputs = processor(images=[s["image"]], text=text, return_tensors="pt")
    again = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, again(**inputs).logits, rtol=0, atol=0)
    assert 0.0 <= report["object_accuracy"] <= 1.0 and report["num_scenes"] == 2


def test_second_call_is_cached_and_force_retrains(tmp_path, micro_target):
    out, report = tmp_path / "copy", micro_target[1]
    import shutil

    shutil.copytree(micro_target[0], out)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build_toy_target(out, MICRO) == report
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    rebuilt = build_toy_target(out, MICRO, force=True)
    assert (out / "model.safetensors").stat().st_mtime_ns != stamp
    assert (
        json.loads((out / REPORT_NAME).read_text())["settings_digest"] == rebuilt["settings_digest"]
    )


def test_cli_toy_data(tmp_path):
    from covspec.scripts.cli import main

    assert main(["toy-data", "--out", str(tmp_path / "d"), "--num", "3", "--seed", "2"]) == 0
    assert len((tmp_path / "d" / "data.jsonl").read_text().splitlines()) == 3
    assert main(["toy-data", "--out", str(tmp_path / "e"), "--num", "0"]) == 2
