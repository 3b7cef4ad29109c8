import json

import pytest
import torch

from covspec.data.readers import DataFileError, read_prompts_jsonl, toy_prompts
from covspec.inference.bench import run_bench
from covspec.inference.bench_report import (
    markdown_table,
    pareto_lines,
    per_prompt_oracle_tau,
    seed_lines,
    tau_difference_interval,
    write_report,
)
from covspec.inference.tree import DraftSettings
from covspec.modeling.adapters import adapter_for
from covspec.modeling.drafter import Drafter, DrafterConfig

METHOD_FIELDS = {
    "kind",
    "drafter",
    "mode",
    "tokens_per_s",
    "speedup",
    "tau",
    "mean_drafted",
    "acceptance_per_depth",
    "identical_fraction",
}


@pytest.fixture(scope="module")
def drafter_dir(micro_target_dir, tmp_path_factory):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    adapter = adapter_for(AutoModelForImageTextToText.from_pretrained(micro_target_dir))
    out = tmp_path_factory.mktemp("drafters") / "micro-drafter"
    Drafter(DrafterConfig.for_target(adapter)).save_pretrained(out)
    return out


def test_bench_refuses_zero_new_tokens(micro_target_dir, drafter_dir):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        run_bench(str(micro_target_dir), [str(drafter_dir)], toy_prompts(1), 0)


def test_bench_report_has_the_promised_fields(micro_target_dir, drafter_dir, tmp_path):
    max_new = 8
    settings = dict(
        chain=DraftSettings(mode="chain", depth=3),
        tree=DraftSettings(mode="tree", depth=3, max_nodes=6),
    )
    report = run_bench(
        str(micro_target_dir), [str(drafter_dir)], toy_prompts(2), max_new, warmup=1, **settings
    )
    path = write_report(report, tmp_path / "bench.json")
    data = json.loads(path.read_text())
    assert {
        "target",
        "num_samples",
        "max_new_tokens",
        "torch_threads",
        "methods",
        "samples",
    } <= set(data)
    assert set(data["methods"]) == {
        "hf_greedy",
        "hf_prompt_lookup",
        "micro-drafter/chain",
        "micro-drafter/tree",
    }
    for name, m in data["methods"].items():
        assert set(m) >= METHOD_FIELDS, name
        assert m["kind"] == ("speculative" if "/" in name else "baseline")
        assert (m["tau"] is None) == (m["kind"] == "baseline")
        if m["kind"] == "speculative":
            assert m["identical_fraction"] == 1.0  # greedy speculative decoding is lossless
            assert len(m["acceptance_per_depth"]) == 3 and m["mode"] in ("chain", "tree")
        ms = m["ms_per_sample"]
        assert ms["total"] > 0
        if m["kind"] == "speculative":
            phases = ("encode", "prefill", "drafter_prefill", "draft", "verify", "commit")
            assert all(ms[p] > 0 for p in phases), ms
            assert sum(ms[p] for p in phases) <= ms["total"] and ms["other"] >= 0
    assert data["methods"]["hf_greedy"]["speedup"] == pytest.approx(1.0)
    assert [s["id"] for s in data["samples"]] == ["toy-31337-0", "toy-31337-1"]
    for sample in data["samples"]:  # token ids are stored and are what "identical" compares
        ids = sample["token_ids"]
        assert set(ids) == set(data["methods"]) and all(len(t) <= max_new for t in ids.values())
        assert ids["micro-drafter/tree"] == ids["hf_greedy"]
    assert (tmp_path / "bench.md").read_text().count("|") > 10 and (
        tmp_path / "bench.png"
    ).stat().st_size > 0


def test_prompts_jsonl_errors_name_the_line(tmp_path):
    toy_prompts(1)[0]["image"].save(tmp_path / "a.png")
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"id": "a", "image": "a.png", "prompt": "Describe."}\n{"id": "b", "image": "nope.png", "prompt": "x"}\n'
    )
    with pytest.raises(DataFileError, match=f"{path}:2: image file not found"):
        read_prompts_jsonl(path)
    path.write_text(
        '{"id": "a", "image": "a.png", "prompt": "Describe."}\n{"id": "b", "image": "a.png"\n'
    )
    with pytest.raises(DataFileError, match=f"{path}:2: not valid JSON"):
        read_prompts_jsonl(path)
    path.write_text('{"id": "a", "image": "a.png", "prompt": "Describe."}\n')
    assert read_prompts_jsonl(path)[0]["image"].size == (72, 72)


def test_bench_in_bfloat16_states_its_dtype(micro_target_dir, drafter_dir):
    report = run_bench(
        str(micro_target_dir), [str(drafter_dir)], toy_prompts(2), 8, warmup=0, dtype="bfloat16"
    )
    assert report["dtype"] == "bfloat16"
    assert report["methods"]["hf_greedy"]["identical_fraction"] == 1.0  # the reference itself
    for name, m in report["methods"].items():  # bf16 rounding may part a row from greedy's
        assert (m["tau"] is None) == (m["kind"] == "baseline"), name
    assert "bfloat16" in markdown_table(report)
    with pytest.raises(ValueError, match="dtype"):
        run_bench(str(micro_target_dir), [str(drafter_dir)], toy_prompts(1), 4, dtype="int8")


def test_bench_reports_prefix_cost_gate_choices_and_the_pareto_plot(
    micro_target_dir, drafter_dir, tmp_path
):
    from transformers import AutoModelForImageTextToText

    adapter = adapter_for(AutoModelForImageTextToText.from_pretrained(micro_target_dir))
    torch.manual_seed(0)
    gated = DrafterConfig.for_target(
        adapter, visual_prefix="compressed", compressor={"options": ["pool:4", "pool:2"]}
    )
    Drafter(gated).save_pretrained(tmp_path / "gated")
    Drafter(DrafterConfig.for_target(adapter, variant="full_visual")).save_pretrained(
        tmp_path / "full"
    )
    fixed = DrafterConfig.for_target(
        adapter, visual_prefix="compressed", compressor={"options": ["pool:2"]}
    )
    Drafter(fixed).save_pretrained(tmp_path / "pool2")
    drafters = [str(drafter_dir), str(tmp_path / "gated"), str(tmp_path / "full")]
    drafters.append(str(tmp_path / "pool2"))
    samples = toy_prompts(3, mixed=True)
    report = run_bench(str(micro_target_dir), drafters, samples, 6, warmup=0)
    m = report["methods"]
    assert m["micro-drafter/tree"]["visual_prefix_tokens"] == 0.0
    assert m["full/tree"]["visual_prefix_tokens"] == 81.0  # every visual token of a 9x9 grid
    assert m["gated/tree"]["visual_prefix_tokens"] in (9.0, 25.0)  # the gate's pick, all alike
    assert all(m[f"{d}/tree"]["drafter_ms_per_step"] > 0 for d in ("micro-drafter", "gated"))
    choices = m["gated/tree"]["gate_choices"]
    assert sum(sum(c.values()) for c in choices.values()) == 3
    assert set(choices) == {s["kind"] for s in samples}
    assert m["micro-drafter/tree"]["gate_choices"] is None
    per_kind = m["gated/tree"]["tau_per_kind"]
    assert set(per_kind) == {s["kind"] for s in samples}
    assert min(per_kind.values()) <= m["gated/tree"]["tau"] <= max(per_kind.values())
    assert m["hf_greedy"]["tau_per_kind"] is None
    kinds = {d: m[f"{d}/tree"]["prefix_kind"] for d in ("micro-drafter", "gated", "full", "pool2")}
    assert kinds == {
        "micro-drafter": "free",
        "gated": "gated",
        "full": "full",
        "pool2": "primitive",
    }
    # each sample keeps every speculative method's decode tokens and rounds (paired statistics)
    for name in ("gated/tree", "pool2/tree"):
        pairs = [s["decode"][name] for s in report["samples"]]
        assert sum(p[0] for p in pairs) / sum(p[1] for p in pairs) == m[name]["tau"]
    assert all("hf_greedy" not in s["decode"] for s in report["samples"])
    (line,) = [x for x in pareto_lines(report) if x]
    assert "95% paired bootstrap interval" in line
    assert "a per-prompt oracle over the 2 fixed drafters reaches" in line
    rival = max(("pool2", "full"), key=lambda d: m[f"{d}/tree"]["tau"])  # both carry >= rows
    verdict = "on or above" if m["gated/tree"]["tau"] >= m[f"{rival}/tree"]["tau"] else "below"
    assert f"{verdict} the fixed primitives' front" in line and f"`{rival}/tree` at" in line
    assert "for `micro-drafter/tree` (no visual rows)" in line
    write_report(report, tmp_path / "b.json")
    assert (tmp_path / "b-pareto.png").stat().st_size > 0
    assert "Gate choices of" in (tmp_path / "b.md").read_text()
    assert "tau per prompt kind" in (tmp_path / "b.md").read_text()


def test_bench_runs_a_critic_gated_drafter_once_per_price(micro_target_dir, drafter_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    adapter = adapter_for(AutoModelForImageTextToText.from_pretrained(micro_target_dir))
    torch.manual_seed(0)
    options = {"options": ["pool:4", "pool:1"]}
    for name, gate in (("critic", "critic"), ("gumbel", "gumbel")):
        cfg = DrafterConfig.for_target(
            adapter, visual_prefix="compressed", compressor={**options, "gate": gate}
        )
        Drafter(cfg).save_pretrained(tmp_path / name)
    drafters = [str(drafter_dir), str(tmp_path / "critic")]
    report = run_bench(
        str(micro_target_dir), drafters, toy_prompts(2, mixed=True), 4, warmup=0,
        modes=("tree",), gate_cost_weights=[0.0, 1000.0],
    )  # fmt: skip
    m = report["methods"]
    assert set(m) == {"hf_greedy", "hf_prompt_lookup", "micro-drafter/tree", "critic@cw0/tree",
                      "critic@cw1000/tree"}  # fmt: skip
    assert m["critic@cw1000/tree"]["visual_prefix_tokens"] == 9.0  # priced down to pool:4
    assert m["critic@cw0/tree"]["gate_cost_weight"] == 0.0
    assert m["critic@cw1000/tree"]["gate_cost_weight"] == 1000.0
    assert m["micro-drafter/tree"]["gate_cost_weight"] is None
    assert all(x["identical_fraction"] == 1.0 for x in m.values())
    page = markdown_table(report)
    assert "at cost weight 1000 (share of prompts per kind)" in page
    assert "`critic@cw0/tree` carries" in page and "`critic@cw1000/tree` carries 9.0" in page
    write_report(report, tmp_path / "p.json")
    assert (tmp_path / "p-pareto.png").stat().st_size > 0
    with pytest.raises(ValueError, match="need a drafter with a gated compressor"):
        run_bench(str(micro_target_dir), [str(drafter_dir)], [], 4, gate_cost_weights=[0.1])
    with pytest.raises(ValueError, match="repeat"):
        run_bench(str(micro_target_dir), drafters, [], 4, gate_cost_weights=[0.1, 0.1])
    with pytest.raises(ValueError, match="only a critic gate"):
        run_bench(str(micro_target_dir), [str(tmp_path / "gumbel")], [], 4, gate_cost_weights=[0.1])


def test_every_method_runs_without_autograd(micro_target_dir, drafter_dir):
    seen = []

    class Spy:  # a policy: the bench calls it like the runner, inside its own loop
        def __init__(self, runners):
            self.runner = runners["micro-drafter"]

        def generate(self, image, prompt, max_new_tokens, settings):
            seen.append(torch.is_inference_mode_enabled())
            return self.runner.generate(image, prompt, max_new_tokens, settings)

    run_bench(str(micro_target_dir), [str(drafter_dir)], toy_prompts(2), 3, policies={"spy": Spy})
    assert seen and all(seen)


def test_pareto_lines_compare_only_with_primitives_carrying_as_many_rows():
    def m(kind, rows, tau, speedup, mode="tree"):
        return {"mode": mode, "prefix_kind": kind, "visual_prefix_tokens": rows, "tau": tau,
                "speedup": speedup}  # fmt: skip

    report = {
        "methods": {
            "g/tree": m("gated", 10.0, 6.0, 2.0),
            "g/chain": m("gated", 10.0, 5.0, 1.0, "chain"),
            "small/tree": m("primitive", 9.0, 6.5, 2.1),  # fewer rows: not a rival
            "big/tree": m("primitive", 25.0, 5.9, 1.9),
            "free/tree": m("free", 0.0, 5.7, 1.96),
            "full/tree": m("full", 81.0, 6.01, 1.99),
            "hf_greedy": {"mode": None, "prefix_kind": None},
        }
    }
    (line,) = [x for x in pareto_lines(report) if x]
    assert line.startswith("`g/tree` carries 10.0 rows for tau 6.000, below")
    assert "`full/tree` at 6.010" in line and "2.00x vs 1.96x for `free/tree`" in line
    report["methods"]["full/tree"]["tau"] = 5.95  # the full prefix is the 81-row primitive
    assert "on or above the fixed primitives' front" in pareto_lines(report)[1]
    assert "`full/tree` at 5.950" in pareto_lines(report)[1]
    report["methods"]["big/tree"]["tau"] = 6.2
    assert (
        "below the fixed primitives' front: the best with >= 10.0 rows is `big/tree`"
        in (pareto_lines(report)[1])
    )
    for name in ("big/tree", "full/tree"):
        del report["methods"][name]
    assert "no fixed primitive carries as many rows" in pareto_lines(report)[1]


def test_seed_lines_group_replicates_with_their_seed_zero_drafter():
    methods = {
        name: {"tau": tau}
        for name, tau in [
            ("d/tree", 6.0), ("d-seed1/tree", 5.5), ("d-seed2/tree", 5.8), ("d/chain", 5.0),
            ("e-seed1/tree", 4.0),  # no seed-0 drafter benched beside it: not a group
        ]
    }  # fmt: skip
    samples = [{"decode": {"d/tree": [6 * r, r], "d-seed1/tree": [11 * r, 2 * r]}} for r in (2, 3)]
    (line,) = [x for x in seed_lines({"methods": methods, "samples": samples}) if x]
    assert line.startswith("Training seeds of `d` (tree): seeds 0, 1, 2 reach tau 6.000, 5.500,")
    assert "(spread 0.500)" in line and "`e" not in line
    # the paired interval where both decodes were recorded, none where they were not
    assert "seed 1 against seed 0 (difference -0.500, 95% paired" in line
    assert line.endswith("; seed 2 against seed 0.")
    assert seed_lines({"methods": {"d/tree": {"tau": 6.0}}}) == []


def test_tau_difference_interval_is_paired_over_samples():
    # a beats b by exactly one token per round on every sample: no spread at all
    same = [{"decode": {"a": [6 * r, r], "b": [5 * r, r]}} for r in (3, 5, 8, 13)]
    diff, low, high = tau_difference_interval(same, "a", "b")
    assert diff == pytest.approx(1.0) and low == pytest.approx(1.0) and high == pytest.approx(1.0)
    # one sample where a loses widens the interval below zero; the point estimate is the
    # ratio of sums, as the report's tau
    mixed = same + [{"decode": {"a": [10, 10], "b": [60, 10]}}]
    diff, low, high = tau_difference_interval(mixed, "a", "b")
    assert diff == pytest.approx((6 * 29 + 10) / 39 - (5 * 29 + 60) / 39)
    assert low < 0 < high
    assert tau_difference_interval(mixed, "a", "missing") is None


def test_per_prompt_oracle_takes_each_prompts_fewest_rounds():
    samples = [
        {"decode": {"a": [12, 2], "b": [12, 3]}},
        {"decode": {"a": [10, 5], "b": [10, 2]}},
    ]
    assert per_prompt_oracle_tau(samples, ["a", "b"]) == pytest.approx(22 / 4)
    assert per_prompt_oracle_tau(samples, ["a"]) == pytest.approx(22 / 7)
    assert per_prompt_oracle_tau(samples, ["a", "missing"]) is None
    # a prompt the methods decoded to different lengths is left out, not won by the shorter
    uneven = samples + [{"decode": {"a": [3, 3], "b": [40, 4]}}]
    assert per_prompt_oracle_tau(uneven, ["a", "b"]) == pytest.approx(22 / 4)


def test_per_depth_counts_sum_across_answers_of_different_depths():
    from covspec.inference.bench import _add_per_depth

    # a policy that ties depth to the clip drafts 2 deep on one answer and 3 on the next
    assert _add_per_depth([], [4, 3]) == [4, 3]
    assert _add_per_depth([4, 3], [5, 2, 1]) == [9, 5, 1]
    assert _add_per_depth([9, 5, 1], [1]) == [10, 5, 1]


def test_repeats_keep_each_methods_fastest_round_and_report_unstable_tokens(
    micro_target_dir, drafter_dir, monkeypatch
):
    import dataclasses

    import covspec.inference.bench as bench

    # the bench's clock, faked so that no load on the machine can change which round is kept:
    # every reading advances it 1 ms, and the slow method's late rounds add 10 s
    clock = {"t": 0.0}

    def fake_now(device) -> float:
        clock["t"] += 0.001
        return clock["t"]

    monkeypatch.setattr(bench, "now", fake_now)
    calls = {"slow": 0, "flaky": 0}

    class Slow:  # late in round 1 of sample 1 and round 2 of sample 2: neither is kept
        def __init__(self, runners):
            self.runner = runners["micro-drafter"]

        def generate(self, image, prompt, max_new_tokens, settings):
            calls["slow"] += 1
            if calls["slow"] in (1, 4):
                clock["t"] += 10.0
            return self.runner.generate(image, prompt, max_new_tokens, settings)

    class Flaky(Slow):  # one token short every other round
        def generate(self, image, prompt, max_new_tokens, settings):
            calls["flaky"] += 1
            out = self.runner.generate(image, prompt, max_new_tokens, settings)
            return dataclasses.replace(out, tokens=out.tokens[: -(calls["flaky"] % 2) or None])

    report = run_bench(
        str(micro_target_dir), [str(drafter_dir)], toy_prompts(2), 4, warmup=0, repeats=2,
        modes=("tree",), policies={"slow": Slow, "flaky": Flaky}, prompt_lookup=False,
    )  # fmt: skip
    assert calls == {"slow": 4, "flaky": 4}  # two samples, two rounds each
    assert "hf_prompt_lookup" not in report["methods"] and report["repeats"] == 2
    assert all(s["seconds"]["slow/tree"] < 1.0 for s in report["samples"])
    methods = report["methods"]
    assert methods["flaky/tree"]["repeats_disagreed"] == 2
    assert methods["slow/tree"]["repeats_disagreed"] == 0
    assert methods["micro-drafter/tree"]["identical_fraction"] == 1.0
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        run_bench(str(micro_target_dir), [str(drafter_dir)], toy_prompts(1), 4, repeats=0)


def test_rounds_shuffle_the_order_so_no_method_always_follows_the_same_one(
    micro_target_dir, drafter_dir
):
    calls = []

    def spy(name):
        class Spy:
            def __init__(self, runners):
                self.runner = runners["micro-drafter"]

            def generate(self, image, prompt, max_new_tokens, settings):
                calls.append(name)
                return self.runner.generate(image, prompt, max_new_tokens, settings)

        return Spy

    policies = {n: spy(n) for n in "abc"}
    run_bench(
        str(micro_target_dir), [str(drafter_dir)], toy_prompts(3), 2, warmup=0, repeats=2,
        modes=("tree",), policies=policies, prompt_lookup=False,
    )  # fmt: skip
    rounds = [tuple(calls[i : i + 3]) for i in range(0, len(calls), 3)]
    assert len(rounds) == 6 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    # a rotating order only ever gives cyclic shifts of one order: each method behind the same one
    shifts = {("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b")}
    assert set(rounds) - shifts
