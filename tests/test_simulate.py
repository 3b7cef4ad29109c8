"""`covspec simulate`: report schema, files, and refusals (tiny target, a few tokens)."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from covspec.data.readers import toy_prompts
from covspec.inference.simulate import SimulationPlan, simulate
from covspec.inference.simulate_report import write_report
from covspec.inference.tree import DraftSettings
from covspec.modeling.adapters import adapter_for
from covspec.modeling.drafter import Drafter, DrafterConfig
from covspec.scripts.cli import main

FIELDS = {
    "protocol", "channel", "compute", "latency_per_token_ms", "latency_per_answer_ms",
    "edge_compute_per_token_ms", "uplink_bytes_per_token", "downlink_bytes_per_token",
    "rounds_per_answer", "tau", "identical_fraction", "speedup_vs_edge_only",
}  # fmt: skip


@pytest.fixture(scope="module")
def drafter_dir(micro_target_dir, tmp_path_factory):
    target = AutoModelForImageTextToText.from_pretrained(micro_target_dir)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("drafters") / "d"
    Drafter(DrafterConfig.for_target(adapter_for(target))).save_pretrained(out)
    return out


def test_report_rows_and_files(micro_target_dir, drafter_dir, tmp_path):
    plan = SimulationPlan(
        drafters=[str(drafter_dir)],
        methods=["edge_only", "sync", "sync_adaptive", "decoupled", "progressive"],
        channels=["good", "bad"],
        computes=["measured", "a40-orin-7b"],
        rtt_sweep_ms=[10, 200],
    )
    report = simulate(str(micro_target_dir), plan, toy_prompts(2), 12)
    table = [r for r in report["rows"] if r["section"] == "table"]
    sweep = [r for r in report["rows"] if r["section"] == "sweep"]
    assert len(table) == 2 * 2 * 5 and len(sweep) == 2 * 5
    for row in report["rows"]:
        assert set(row) >= FIELDS
        assert row["identical_fraction"] == 1.0  # every protocol is lossless
        if row["protocol"] == "edge_only":
            assert row["speedup_vs_edge_only"] == pytest.approx(1.0) and row["tau"] == 1.0
    # the link is simulated: the bad channel is slower than the good one for every protocol
    for method in plan.methods:
        good, bad = (
            next(r for r in table if r["protocol"] == method and r["channel"] == c and r["compute"] == "a40-orin-7b")
            for c in ("good", "bad")
        )  # fmt: skip
        assert bad["latency_per_token_ms"] > good["latency_per_token_ms"]
    path = write_report(report, tmp_path / "sim.json")
    assert json.loads(path.read_text())["rows"] == report["rows"]
    assert "| edge_only |" in path.with_suffix(".md").read_text()
    assert path.with_suffix(".png").stat().st_size > 0
    assert (tmp_path / "sim-timeline.png").stat().st_size > 0


def test_bad_requests_are_refused(micro_target_dir, drafter_dir, capsys):
    with pytest.raises(ValueError, match="unknown protocol"):
        SimulationPlan([str(drafter_dir)], ["smoke_signals"], ["good"], ["measured"], [])
    with pytest.raises(ValueError, match="unknown channel"):
        SimulationPlan([str(drafter_dir)], ["sync"], ["lunar"], ["measured"], [])
    with pytest.raises(ValueError, match="unknown compute"):
        SimulationPlan([str(drafter_dir)], ["sync"], ["good"], ["abacus"], [])
    with pytest.raises(ValueError, match="max_depth 4"):  # before any model loads
        SimulationPlan([str(drafter_dir)], ["sync_adaptive"], ["good"], ["measured"], [],
                       settings=DraftSettings(depth=8), max_depth=4)  # fmt: skip
    plan = SimulationPlan([str(drafter_dir)], ["sync"], ["good"], ["measured"], [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        simulate(str(micro_target_dir), plan, toy_prompts(1), 0)
    code = main(["simulate", "--target", str(micro_target_dir), "--drafter", str(drafter_dir),
                 "--channel", "lunar"])  # fmt: skip
    assert code == 2 and "unknown channel" in capsys.readouterr().err


def test_an_elastic_drafter_is_simulated_once_per_price(micro_target_dir, drafter_dir, tmp_path):
    target = AutoModelForImageTextToText.from_pretrained(micro_target_dir)
    torch.manual_seed(0)
    compressor = {"options": ["pool:4", "pool:1"], "gate": "critic"}
    cfg = DrafterConfig.for_target(
        adapter_for(target), visual_prefix="compressed", compressor=compressor
    )
    elastic = Drafter(cfg)
    with torch.no_grad():  # predicted losses: all 81 rows beat pool:4 by 0.1 when rows are free
        elastic.compressor.gate.net[2].bias.copy_(torch.tensor([0.2, 0.1]))
    elastic.save_pretrained(tmp_path / "elastic")
    plan = SimulationPlan(
        drafters=[str(tmp_path / "elastic"), str(drafter_dir)],
        methods=["sync"], channels=["bad"], computes=["measured"], rtt_sweep_ms=[],
        gate_cost_weights=[0.0, 1000.0],
    )  # fmt: skip
    report = simulate(str(micro_target_dir), plan, toy_prompts(2), 6)
    rows = {r["drafter"]: r for r in report["rows"] if r["protocol"] == "sync"}
    assert set(rows) == {"elastic@cw0", "elastic@cw1000", "d"}
    assert all(r["identical_fraction"] == 1.0 for r in rows.values())
    # priced down to pool:4's 9 rows from up to 81: fewer prefix bytes cross the link
    cheap, dear = (
        rows[k]["prompt_downlink_bytes_per_answer"] for k in ("elastic@cw1000", "elastic@cw0")
    )
    assert cheap < dear
    with pytest.raises(ValueError, match="no gate to price|need a drafter with a gated"):
        plan.drafters, plan.gate_cost_weights = [str(drafter_dir)], [0.1]
        simulate(str(micro_target_dir), plan, toy_prompts(1), 2)
