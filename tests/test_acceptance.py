"""The acceptance head pipeline on a tiny target: trajectories, training, calibration, use."""

import json

import lightning as L
import pytest
import torch
from transformers import AutoModelForImageTextToText

from covspec.data.readers import toy_prompts
from covspec.data.toy_world import make_sample
from covspec.data.trajectories import TrajectoryDataModule, TrajectoryError
from covspec.inference.calibrate import (
    CalibrationError,
    Trial,
    binomial_upper,
    calibrate_head,
    save_calibration,
    search_threshold,
)
from covspec.inference.runner import SpecRunner
from covspec.inference.simulate import SimulationPlan, simulate
from covspec.inference.trajectories import collect
from covspec.inference.tree import DraftSettings
from covspec.modeling.acceptance_head import AcceptanceHead, drafter_fingerprint
from covspec.modeling.adapters import TargetMismatchError, adapter_for
from covspec.modeling.drafter import Drafter, DrafterConfig
from covspec.training.acceptance import AcceptanceHeadTraining, ExportAcceptanceHead, calibrate

MAX_NEW = 16


@pytest.fixture(scope="module")
def pipeline(micro_target_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("acceptance")
    target = AutoModelForImageTextToText.from_pretrained(micro_target_dir)
    torch.manual_seed(0)
    Drafter(DrafterConfig.for_target(adapter_for(target))).save_pretrained(root / "drafter")
    runner = SpecRunner.from_folders(str(micro_target_dir), str(root / "drafter"))
    samples = [make_sample(77, i, describe_prob=1.0) for i in range(6)]
    summary = collect(
        runner, samples, root / "traj", MAX_NEW, DraftSettings(mode="chain", depth=3), shard_size=3
    )
    return root, runner, summary


def test_trajectories_are_labelled_sharded_and_resumable(pipeline):
    root, runner, summary = pipeline
    shards = sorted((root / "traj").glob("shard-*.parquet"))
    assert len(shards) == 2 and summary["mismatches"] > 0
    assert summary["examples"] == 3 * summary["mismatches"]  # one row per channel preset
    assert summary["safe"] + summary["unsafe"] == summary["mismatches"]
    stamp = [p.stat().st_mtime_ns for p in shards]
    collect(runner, [], root / "traj", MAX_NEW)  # nothing new to do: shards untouched
    assert [p.stat().st_mtime_ns for p in shards] == stamp
    dm = TrajectoryDataModule(str(root / "traj"), val_fraction=0.5, batch_size=8)
    dm.setup("fit")
    train_ids, val_ids = set(dm.train_set["sample_id"]), set(dm.val_set["sample_id"])
    assert train_ids and val_ids and not train_ids & val_ids  # split by conversation
    batch = next(iter(dm.train_dataloader()))
    assert batch["target_hidden"].shape[1] == runner.adapter.hidden_size
    assert batch["csi"].shape[1] == 3 and set(batch["safe"].tolist()) <= {0.0, 1.0}


def test_missing_column_is_named(pipeline, tmp_path):
    from datasets import load_dataset

    root, _, _ = pipeline
    ds = load_dataset(
        "parquet", data_files=str(next((root / "traj").glob("*.parquet"))), split="train"
    )
    ds.remove_columns(["csi"]).to_parquet(str(tmp_path / "shard-00000.parquet"))
    with pytest.raises(TrajectoryError, match=r"missing column\(s\) \['csi'\]"):
        TrajectoryDataModule(str(tmp_path)).setup("fit")


def test_head_trains_calibrates_exports_and_refuses_other_drafters(
    pipeline, micro_target_dir, tmp_path
):
    root, runner, _ = pipeline
    module = AcceptanceHeadTraining(
        str(micro_target_dir), str(root / "drafter"), projection_size=8, hidden_size=16
    )
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, num_sanity_val_steps=0,
        callbacks=[ExportAcceptanceHead(str(tmp_path / "head"))],
    )  # fmt: skip
    dm = TrajectoryDataModule(str(root / "traj"), val_fraction=0.5, batch_size=16)
    trainer.fit(module, datamodule=dm)
    head = AcceptanceHead.from_pretrained(tmp_path / "head")
    assert set(head.config.thresholds) == {"good", "medium", "bad"}
    report = json.loads((tmp_path / "head" / "metrics.json").read_text())
    for preset, c in report["calibration"].items():
        assert c["estimated_accuracy_drop"] <= c["budget"] + 1e-9, preset
    head.check_pair(runner.adapter, drafter_fingerprint(runner.drafter))
    other = Drafter(DrafterConfig.for_target(runner.adapter))
    with pytest.raises(TargetMismatchError, match="drafter"):
        head.check_pair(runner.adapter, drafter_fingerprint(other), "another drafter")
    plan = SimulationPlan(
        [str(root / "drafter")], ["edge_only", "sync"], ["bad"], ["measured"], [],
        accept_head=str(tmp_path / "head"), typical=[1e-9],
    )  # fmt: skip
    samples = [
        dict(s, prompt="Describe the image.") for s in [make_sample(78, 0, describe_prob=1.0)]
    ]
    rep = simulate(str(micro_target_dir), plan, samples, MAX_NEW)
    rows = {r["protocol"]: r for r in rep["rows"]}
    assert {"sync_head_full", "sync_head_selective", "sync_typical@1e-09"} <= set(rows)
    assert rows["sync"]["identical_fraction"] == 1.0 and rows["sync"]["task_accuracy"] is not None
    assert rows["sync"]["mismatch_accept_rate"] is None  # lossless rows decide nothing
    assert rows["sync"]["answers_broken"] == rows["sync"]["answers_mended"] == 0
    assert rep["greedy_task_accuracy"] == rows["sync"]["task_accuracy"]
    typical = rows["sync_typical@1e-09"]  # a random drafter's mismatches, nearly all accepted
    assert typical["mismatches_per_answer"] > 0 and typical["mismatch_accept_rate"] > 0.5
    # per-depth acceptance counts what the rule let through, so the lenient rule scores higher
    assert 0 <= rows["sync"]["acceptance_rate"] < typical["acceptance_rate"] <= 1
    assert len(rows["sync"]["acceptance_per_depth"]) == plan.settings.depth
    lossy = rows["sync_head_full"]
    flips = (lossy["answers_broken"] - lossy["answers_mended"]) / rep["num_samples"]
    assert lossy["task_accuracy"] == pytest.approx(rep["greedy_task_accuracy"] - flips)
    with pytest.raises(ValueError, match="typical"):
        SimulationPlan(
            [str(root / "drafter")], ["sync"], ["bad"], ["measured"], [], typical=[0.1, 0.1]
        )
    # the selective upload sends no drafter states up front
    assert (
        rows["sync_head_selective"]["decode_uplink_bytes_per_token"]
        < rows["sync_head_full"]["decode_uplink_bytes_per_token"]
    )
    _closed_loop_calibration_rewrites_the_head(runner, head, tmp_path / "head")


def _closed_loop_calibration_rewrites_the_head(runner, head, folder):
    settings = DraftSettings(mode="chain", depth=3)
    scenes = toy_prompts(2, seed=5, mixed=True)
    with pytest.raises(ValueError, match="unknown channel preset"):
        calibrate_head(runner, head, scenes, {"awful": 0.1}, settings, MAX_NEW)
    with pytest.raises(ValueError, match="ground truth"):
        no_truth = [{k: v for k, v in scenes[0].items() if k != "objects"}]
        calibrate_head(runner, head, no_truth, {"bad": 0.1}, settings, MAX_NEW)
    trained, good = head.threshold("bad"), head.threshold("good")
    # two answers: the 90% bound of 0 broken is 0.68, within a 0.7 budget
    report = calibrate_head(runner, head, scenes, {"bad": 0.7}, settings, MAX_NEW, step=1.0)
    bad = report["presets"]["bad"]
    assert bad["trials"][0]["threshold"] == pytest.approx(trained)  # starts at the trained one
    assert bad["accuracy_drop_bound"] >= bad["accuracy_drop"]
    assert bad["accuracy_drop_bound"] <= 0.7 and bad["answers"] == len(scenes)
    # each candidate reaches the rule: the good preset starts below every logit (accepts all)
    # and must climb past the bad one's share (none, above every logit) to be chosen
    head.config.thresholds.update(bad=1e9, good=-1e9)
    ends = calibrate_head(
        runner, head, scenes, {"bad": 0.99, "good": 0.98}, settings, MAX_NEW, step=1e9,
        max_steps=2, confidence=0.0,
    )["presets"]  # fmt: skip
    assert ends["bad"]["accepted_rate"] == 0.0 and ends["good"]["accepted_rate"] == 0.0
    assert ends["good"]["trials"][0]["accepted_rate"] == 1.0
    head.config.thresholds.update(bad=trained, good=good)
    save_calibration(head, report, folder)
    again = AcceptanceHead.from_pretrained(folder)
    assert again.config.thresholds["bad"] == pytest.approx(bad["threshold"])
    assert set(again.config.thresholds) == {"good", "medium", "bad"}  # the others kept
    assert "closed_loop_calibration" in json.loads((folder / "metrics.json").read_text())
    assert (folder / "README.md").read_text().count("## Closed-loop calibration") == 1


def test_closed_loop_search_raises_the_threshold_until_drop_and_cap_hold():
    def measure(t: float) -> Trial:  # a higher threshold breaks fewer answers, accepts less
        return Trial(t, max(0, 6 - int(t)), 0, 100, 1 / (1 + t), 2.0)

    chosen, trials = search_threshold(measure, 0.0, 0.02, None, 1.0, 10)
    assert chosen.threshold == 4.0 and [t.threshold for t in trials] == [0, 1, 2, 3, 4]
    chosen, _ = search_threshold(measure, 0.0, 0.02, 0.1, 1.0, 10)  # a worse channel's share
    assert chosen.threshold == 9.0
    with pytest.raises(CalibrationError, match="no threshold"):
        search_threshold(measure, 0.0, 0.0, None, 1.0, 3)
    # Clopper-Pearson: no event in n has the closed form 1 - (1 - confidence)^(1/n)
    assert binomial_upper(0, 100, 0.95) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-6)
    assert binomial_upper(5, 1000, 0.9) > binomial_upper(4, 1000, 0.9) > 0.004
    # within 3%: 3 broken of 100 by the raw rate, only 0 by the 90% bound (1 of 100: 3.8%)
    assert search_threshold(measure, 0.0, 0.03, None, 1.0, 10)[0].threshold == 3.0
    assert search_threshold(measure, 0.0, 0.03, None, 1.0, 10, 0.9)[0].threshold == 6.0


def test_calibration_keeps_the_estimated_drop_within_budget():
    logits = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.0])
    safe = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    samples = ["a", "b", "c", "a", "b", "d"]
    out = calibrate(logits, safe, ["bad"] * 6, samples, {"bad": 0.25})
    # accepting down to 1.0 breaks answer "c" only: 1/4 answers = the budget; 0.5 would break "b"
    assert out["bad"]["threshold"] == 0.5  # the next lower logit: accepts > 0.5
    assert out["bad"]["estimated_accuracy_drop"] == pytest.approx(0.25)
    strict = calibrate(logits, safe, ["good"] * 6, samples, {"good": 0.0})
    assert strict["good"]["threshold"] == 1.5  # stops before the first unsafe
    # a near tie below an accepted logit is not accepted with it
    tie = torch.tensor([2.0, 2.0 - 4e-7, -1.0])
    near = calibrate(tie, torch.tensor([1.0, 0.0, 1.0]), ["bad"] * 3, ["a", "b", "c"], {"bad": 0.0})
    assert near["bad"]["estimated_accuracy_drop"] == 0.0 and near["bad"]["accepted_rate"] == 1 / 3
    assert (tie > near["bad"]["threshold"]).tolist() == [True, False, False]
    # a better channel's share is capped at a worse one's (here its logits rank higher)
    both = calibrate(
        torch.cat([logits, logits + 5]), torch.cat([safe, torch.ones(6)]), ["bad"] * 6 + ["good"] * 6,
        samples * 2, {"bad": 0.25, "good": 0.003},
    )  # fmt: skip
    assert both["good"]["accepted_rate"] <= both["bad"]["accepted_rate"] + 1e-6


def test_head_loading_is_strict_and_the_drafter_fingerprint_survives_bf16(tmp_path):
    from safetensors.torch import load_file, save_file

    from covspec.modeling.acceptance_head import AcceptanceHeadConfig

    head = AcceptanceHead(AcceptanceHeadConfig(target_hidden_size=8, drafter_hidden_size=8))
    head.save_pretrained(tmp_path / "ok")
    assert (
        AcceptanceHead.from_pretrained(tmp_path / "ok").config.csi_features
        == head.config.csi_features
    )
    head.save_pretrained(tmp_path / "missing")
    weights = load_file(tmp_path / "missing" / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if k != "mlp.0.weight"},
        tmp_path / "missing" / "model.safetensors",
    )
    with pytest.raises(ValueError, match="missing: \\['mlp.0.weight'\\]"):
        AcceptanceHead.from_pretrained(tmp_path / "missing")
    head.config.csi_features = list(reversed(head.config.csi_features))  # same width, other order
    head.save_pretrained(tmp_path / "reordered")
    with pytest.raises(ValueError, match="csi_features"):
        AcceptanceHead.from_pretrained(tmp_path / "reordered")
    drafter = torch.nn.Linear(16, 16)
    fp32 = drafter_fingerprint(drafter)
    assert drafter_fingerprint(drafter.to(torch.bfloat16)) == fp32  # the runner casts to bf16
    with torch.no_grad():
        drafter.weight[0, 0] += 1.0
    assert drafter_fingerprint(drafter) != fp32
    # a head an earlier version trained recorded the float32 digest: still recognised
    drafter = torch.nn.Linear(16, 16)  # float32 values bfloat16 cannot hold exactly
    assert drafter_fingerprint(drafter, legacy=True) != drafter_fingerprint(drafter)
    old = AcceptanceHead(
        AcceptanceHeadConfig(
            target_hidden_size=8, drafter_hidden_size=8,
            drafter_fingerprint=drafter_fingerprint(drafter, legacy=True),
        )
    )  # fmt: skip
    from types import SimpleNamespace

    adapter = SimpleNamespace(
        config=SimpleNamespace(model_type=None), vocab_size=None, hidden_size=None
    )
    both = {drafter_fingerprint(drafter), drafter_fingerprint(drafter, legacy=True)}
    old.check_pair(adapter, both)
    with pytest.raises(TargetMismatchError, match="drafter"):
        old.check_pair(adapter, {drafter_fingerprint(drafter)})
