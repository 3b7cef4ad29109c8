"""A seconds-long micro version of `covspec toy-target`: same code path, tiny sizes."""

import json
import os
import subprocess
import sys

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


def test_folder_loads_with_auto_classes_and_gives_identical_logits(micro_target, tmp_path):
    out, report = micro_target
    assert {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        REPORT_NAME,
    } <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(".*tmp*")), "temporary folder left behind"
    s = make_sample(5, 0)
    s["image"].save(tmp_path / "scene.png")
    (tmp_path / "messages.json").write_text(json.dumps(s["messages"]))
    # a fresh interpreter that never imports covspec: transformers' Auto classes alone
    script = f"""
import json, sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
processor = AutoProcessor.from_pretrained({str(out)!r})
model = AutoModelForImageTextToText.from_pretrained({str(out)!r}).eval()
messages = json.load(open({str(tmp_path / "messages.json")!r}))
text = processor.apply_chat_template(messages, tokenize=False)
inputs = processor(images=[Image.open({str(tmp_path / "scene.png")!r})], text=text, return_tensors="pt")
with torch.no_grad():
    torch.save(model(**inputs).logits, {str(tmp_path / "logits.pt")!r})
assert not any(m.startswith("covspec") for m in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env)
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    text = processor.apply_chat_template(s["messages"], tokenize=False)
    inputs = processor(images=[s["image"]], text=text, return_tensors="pt")
    with torch.no_grad():
        ours = model(**inputs).logits
    theirs = torch.load(tmp_path / "logits.pt", weights_only=True)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    assert report["num_scenes"] == 2 and set(report) >= {"object_accuracy", "train_seconds"}


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
