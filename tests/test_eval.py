"""`covspec eval` end to end on the micro toy target with a random drafter, on local copies of
the five benchmarks: reports, losslessness, resuming, refusals, bad rows."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForImageTextToText

from covspec.data.benchmarks import load_benchmark
from covspec.inference.eval_report import parse_choice
from covspec.inference.evaluate import run_eval
from covspec.inference.runner import SpecRunner
from covspec.inference.tree import DraftSettings
from covspec.modeling.adapters import adapter_for
from covspec.modeling.drafter import Drafter, DrafterConfig
from covspec.modeling.tokens import fingerprint_vocab
from covspec.scripts.cli import main
from tests import bench_fixtures as fx
from tests.tiny_vlms import qwen_with_processor

CATEGORIES = {
    "llava-bench": {"conv", "detail", "complex"},
    "mmmu": {"Art", "Art_Theory", "Math"},
    "mmbench": {"attribute_recognition", "spatial_relationship"},
    "video-mme": {"short", "medium", "long"},
    "mvbench": {"action_count", "object_shuffle"},
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return fx.write_all(tmp_path_factory.mktemp("benchmarks"))


@pytest.fixture(scope="module")
def drafter_dir(micro_target_dir, tmp_path_factory):
    model = AutoModelForImageTextToText.from_pretrained(micro_target_dir)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("drafter")
    Drafter(DrafterConfig.for_target(adapter_for(model))).save_pretrained(out)
    return out


def _eval(micro_target_dir, drafter_dir, name, data_dir, out, *extra):
    argv = ["eval", "--target", str(micro_target_dir), "--drafter", str(drafter_dir)]
    argv += ["--benchmark", name, "--data-dir", str(data_dir), "--out", str(out)]
    return main(argv + ["--max-new-tokens", "12", "--num-frames", "2", "--depth", "3", *extra])


def _lines(path):
    return path.with_suffix(".samples.jsonl").read_text().splitlines()


@pytest.mark.parametrize("name", sorted(CATEGORIES))
def test_eval_every_benchmark_end_to_end(micro_target_dir, drafter_dir, dirs, tmp_path, name):
    out = tmp_path / f"{name}.json"
    assert _eval(micro_target_dir, drafter_dir, name, dirs[name], out) == 0
    report = json.loads(out.read_text())
    n = len(load_benchmark(name, data_dir=str(dirs[name])))
    assert report["num_samples"] == n and report["skipped"]["count"] == 0
    assert set(report["per_category"]) == CATEGORIES[name]
    assert "bonus token included" in report["tau_definition"]
    for mode in ("chain", "tree"):
        overall = report["overall"][mode]
        assert overall["identical_fraction"] == 1.0  # lossless: token ids equal generate's
        assert 1.0 <= overall["tau"] <= 4.0  # depth 3: at most 3 drafts + the bonus
        assert len(overall["acceptance_per_depth"]) == 3 and overall["speedup"] > 0
        for stats in report["per_category"].values():
            assert stats[mode]["identical_fraction"] == 1.0 and stats[mode]["tau"] >= 1.0
    assert (report["overall"]["accuracy"] is None) == (name == "llava-bench")
    md = out.with_suffix(".md").read_text()
    assert "| all |" in md and all(f"| {c} |" in md for c in CATEGORIES[name])
    assert out.with_suffix(".png").stat().st_size > 0
    assert len(_lines(out)) == 1 + n


def test_resume_skips_finished_samples(micro_target_dir, drafter_dir, dirs, tmp_path):
    out = tmp_path / "mmbench.json"
    args = (micro_target_dir, drafter_dir, "mmbench", dirs["mmbench"], out)
    assert _eval(*args, "--limit", "2") == 0  # as if killed after 2 samples
    first = _lines(out)
    assert len(first) == 3 and json.loads(out.read_text())["num_samples"] == 2
    with out.with_suffix(".samples.jsonl").open("a") as f:
        f.write('{"id": "1002", "categ')  # killed in the middle of writing a line
    assert _eval(*args) == 0
    lines = _lines(out)
    assert lines[:3] == first  # the finished samples were not redone
    ids = [json.loads(line)["id"] for line in lines[1:]]
    assert ids == ["1000", "1002", "1001", "1003"]  # --limit 2 took rows spread over the 4
    report = json.loads(out.read_text())
    assert report["num_samples"] == 4 and report["overall"]["tree"]["identical_fraction"] == 1.0
    assert _eval(*args) == 0 and _lines(out) == lines  # nothing left to do


def test_other_settings_are_refused_unless_fresh(micro_target_dir, drafter_dir, dirs, tmp_path, capsys):  # fmt: skip
    out = tmp_path / "llava.json"
    args = (micro_target_dir, drafter_dir, "llava-bench", dirs["llava-bench"], out)
    assert _eval(*args, "--limit", "1") == 0
    assert _eval(*args, "--depth", "4") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "--fresh" in err and "settings" in err
    assert _eval(*args, "--depth", "4", "--fresh") == 0
    assert json.loads(out.read_text())["num_samples"] == 3


def test_bad_rows_fail_naming_them_or_are_skipped(micro_target_dir, drafter_dir, dirs, tmp_path, capsys):  # fmt: skip
    root = tmp_path / "vm"
    shutil.copytree(dirs["video-mme"], root)
    (root / "data" / "toyvid1.mp4").unlink()
    out = tmp_path / "vm.json"
    args = (micro_target_dir, drafter_dir, "video-mme", root, out)
    assert _eval(*args) == 2
    assert "video-mme row 001-1: video not found" in capsys.readouterr().err
    assert _eval(*args, "--skip-bad", "--fresh") == 0
    report = json.loads(out.read_text())
    assert report["num_samples"] == 2 and report["skipped"]["count"] == 1
    assert report["skipped"]["rows"][0]["id"] == "001-1"
    lines = _lines(out)
    assert _eval(*args, "--skip-bad") == 0 and _lines(out) == lines  # not retried
    # 8 frames of 81 visual tokens each exceed the micro target's 512-token context: the row
    # is refused before any processor or model call fails deep inside transformers
    assert _eval(*args, "--num-frames", "8", "--fresh", "--out", str(tmp_path / "long.json")) == 2
    assert "video-mme row 000-1: prompt of" in capsys.readouterr().err


def test_qwen_target_eval_is_lossless(dirs, tmp_path):
    """Several images per prompt (MMMU) and video frames (as images: this processor has no
    video processor) through an M-RoPE target, runner against generate."""
    torch.manual_seed(0)
    model, processor = qwen_with_processor("qwen2_5_vl")
    vocab = fingerprint_vocab(processor.tokenizer.get_vocab())  # an in-memory target's
    drafter = Drafter(DrafterConfig.for_target(adapter_for(model), tokenizer_fingerprint=vocab))
    runner = SpecRunner(model, processor, drafter)
    modes = [DraftSettings(mode="chain", depth=3), DraftSettings(mode="tree", depth=3)]
    for name in ("mmmu", "mvbench"):
        bench = load_benchmark(name, data_dir=str(dirs[name]), num_frames=2)
        report = run_eval(runner, bench, tmp_path / f"{name}.json", 10, modes)
        assert report["num_samples"] == len(bench)
        for mode in ("chain", "tree"):
            assert report["overall"][mode]["identical_fraction"] == 1.0


def test_parse_choice():
    choices = {"A": "red circle", "B": "blue square", "C": "green", "D": "four"}
    assert parse_choice("B", choices) == "B"
    assert parse_choice("(C) green", choices) == "C"
    assert parse_choice("D. four", choices) == "D"
    assert parse_choice("The answer is C.", choices) == "C"
    assert parse_choice("A bird sits on it", choices) is None  # "A" is an article here
    assert parse_choice("It is a blue square.", choices) == "B"  # the option's text
    assert parse_choice("nothing", choices) is None
    assert parse_choice("B", {}) is None
    # a declared letter wins over letters in the explanation; only "A"/"I" can be words
    assert parse_choice("B is the best option.", choices) == "B"
    assert parse_choice("D is correct.", choices) == "D"
    assert parse_choice("B is correct, not A.", choices) == "B"
    assert parse_choice("Option B is correct, not D.", choices) == "B"
    assert parse_choice("The answer is B because it contains vitamin C.", choices) == "B"
    pets = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
    assert parse_choice("The answer is a dog.", pets) == "B"  # "a" is no letter here
    walk = "Let us check each option. Option A: yes. Option B: no. Therefore the answer is C."
    assert parse_choice(walk, pets) == "C"  # the last statement counts
    assert parse_choice("Option A is incorrect; the correct answer is (C).", pets) == "C"
    # option text as whole words, the longest match first: "12" is not "2", "not" is not "no"
    numbers = {"A": "2", "B": "12", "C": "3", "D": "4"}
    assert parse_choice("There are 12 people.", numbers) == "B"
    assert parse_choice("I do not know", {"A": "Yes", "B": "No"}) is None
    assert parse_choice("No, it is not.", {"A": "Yes", "B": "No"}) == "B"


def test_methods_run_in_a_seeded_shuffled_order_per_sample():
    """Not a rotation, which only ever gives cyclic shifts of one order (each method timed right
    after the same one); the same sample index gives the same order."""
    from types import SimpleNamespace

    from covspec.inference.evaluate import _run_sample

    calls = []

    def method(name):
        def run(media, prompt):
            calls.append(name)
            result = SimpleNamespace(
                tokens=[5, 6], rounds=1, drafted=2, attempts_per_depth=[1], accepted_per_depth=[1]
            )
            return [5, 6], result

        return run

    methods = {name: method(name) for name in ("hf_greedy", "chain", "tree", "adaptive")}
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: "A")
    runner = SimpleNamespace(
        device=torch.device("cpu"), processor=SimpleNamespace(tokenizer=tokenizer)
    )
    sample = SimpleNamespace(id="s", category="c", answer=None, prompt="p", choices=None)
    orders = []
    for k in (*range(8), 3):
        calls.clear()
        record = _run_sample(runner, sample, methods, None, k, warm=False)
        assert sorted(calls) == sorted(methods) and record["methods"]["tree"]["identical"]
        orders.append(tuple(calls))
    assert orders[3] == orders[-1]
    first = orders[0]
    shifts = {first[i:] + first[:i] for i in range(len(first))}
    assert set(orders) - shifts


def test_warm_up_falls_on_the_first_sample_that_runs(
    micro_target_dir, drafter_dir, dirs, tmp_path, monkeypatch
):
    """A refused first row (with --skip-bad) must not use up the warm-up; each row's method
    order is seeded by its id, so a resumed run times it in the same order."""
    import covspec.inference.evaluate as ev

    warmed, seeds = [], []
    real_run = ev._run_sample

    def spy(runner, sample, methods, media, order_seed, warm):
        warmed.append((sample.id, warm))
        seeds.append(order_seed)
        return real_run(runner, sample, methods, media, order_seed, warm)

    first = {}

    def refuse_first(runner, media, prompt, max_new):
        first.setdefault("id", prompt)
        return "too long" if prompt == first["id"] else None

    monkeypatch.setattr(ev, "_run_sample", spy)
    monkeypatch.setattr(ev, "_refusal", refuse_first)
    out = tmp_path / "mmbench.json"
    args = (micro_target_dir, drafter_dir, "mmbench", dirs["mmbench"], out)
    assert _eval(*args, "--limit", "3", "--skip-bad") == 0
    assert [w for _, w in warmed] == [True, False]
    import zlib

    assert seeds == [zlib.crc32(i.encode()) for i, _ in warmed]
