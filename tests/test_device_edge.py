"""The device-edge runtime: lossless protocols, honest byte accounting, the link and compute models."""

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from covspec.data.toy_world import make_sample
from covspec.inference.compute import MEASURED, PROFILES, Op
from covspec.inference.link import PRESETS, Link, RadioConfig, TraceChannel, resolve_channel
from covspec.inference.policies import LinkAwareDepth
from covspec.inference.protocols import PROTOCOLS, run_protocol
from covspec.inference.roles import Request
from covspec.inference.runner import SpecRunner
from covspec.inference.timeline import Timeline
from covspec.inference.tree import DraftSettings
from covspec.modeling.drafter import Drafter, DrafterConfig

MAX_NEW = 40
PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def runner(micro_target_dir):
    model = AutoModelForImageTextToText.from_pretrained(micro_target_dir).eval()
    return SpecRunner(model, AutoProcessor.from_pretrained(micro_target_dir), None)


def _reference(runner, image, prompt=PROMPT, n=MAX_NEW):
    inputs = runner.encode(image, prompt)
    with torch.no_grad():
        out = runner.model.generate(
            **inputs, do_sample=False, max_new_tokens=n, suppress_tokens=runner.suppress_tokens
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


class Ranked:
    """A scripted drafter that knows the greedy continuation: the right token is its top-1 with
    probability p_first, its second choice with probability p_second, else absent. Its second
    choice is what a tree branches into, so progressive uploads and trees get exercised."""

    def __init__(self, ref, vocab, p_first, p_second, seed=0):
        self.ref, self.vocab = ref, vocab
        self.p_first, self.p_second = p_first, p_second
        self.rng = random.Random(seed)
        self.committed = 1

    def _logits(self, index):
        want = self.ref[index] if index < len(self.ref) else 0
        wrong = (want + 1 + self.rng.randrange(self.vocab - 2)) % self.vocab
        u = self.rng.random()
        first, second = (
            (want, wrong)
            if u < self.p_first
            else (wrong, want)
            if u < self.p_first + self.p_second
            else (wrong, (wrong + 1) % self.vocab)
        )
        logits = torch.zeros(self.vocab)
        logits[first], logits[second] = 6.0, 5.0  # close margins: trees branch here
        return logits

    def root_logits(self):
        return self._logits(self.committed)

    def expand(self, tree, nodes):
        return torch.stack([self._logits(self.committed + tree.depths[n]) for n in nodes])

    def commit(self, features, emitted):
        self.committed += len(emitted)


TREE = DraftSettings(mode="tree", depth=4, top_k=2, beam=2, max_nodes=10)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("odds", [(1.0, 0.0), (0.6, 0.3), (0.0, 0.0)])
def test_lossless_protocols_equal_generate(runner, protocol, odds):
    vocab = runner.adapter.vocab_size
    for i in range(3):
        s = make_sample(52, i)
        ref = _reference(runner, s["image"])
        factory = lambda *_, ref=ref, i=i: Ranked(ref, vocab, *odds, seed=i)  # noqa: E731
        timeline = Timeline(Link(PRESETS["bad"], seed=i), PROFILES["a40-orin-7b"], vocab)
        got = run_protocol(
            protocol, runner, Request(s["image"], PROMPT, MAX_NEW), timeline, TREE,
            source_factory=factory,
        )  # fmt: skip
        assert got.tokens == ref, (protocol, odds, i)
        assert got.end_s > got.first_token_s > 0
        if protocol != "edge_only" and odds == (1.0, 0.0) and len(ref) > 8:
            assert got.tau > 3.0
        # every byte accounted is a message's size, and the per-forward records add up
        assert timeline.bytes["up"] == sum(m[2] for m in timeline.messages if m[0] == "up")
        assert timeline.bytes["down"] == sum(m[2] for m in timeline.messages if m[0] == "down")
        prompt_up = timeline.messages[0][2]
        assert sum(r.uplink_bytes for r in got.records) + prompt_up == timeline.bytes["up"]


def test_progressive_fetches_branches_and_decoupled_pipelines_chunks(runner):
    vocab = runner.adapter.vocab_size
    s = make_sample(53, 0)
    ref = _reference(runner, s["image"])
    phases = {}
    for protocol, odds in (("progressive", (0.5, 0.5)), ("decoupled", (1.0, 0.0))):
        factory = lambda *_, odds=odds: Ranked(ref, vocab, *odds, seed=1)  # noqa: E731
        got = run_protocol(
            protocol, runner, Request(s["image"], PROMPT, MAX_NEW), None, TREE,
            source_factory=factory,
        )  # fmt: skip
        assert got.tokens == ref
        phases[protocol] = {r.phase for r in got.records}
    assert "subtree" in phases["progressive"]  # the edge asked for a drafted branch
    assert "chunk" in phases["decoupled"]  # later chunks verified without a new round


def test_real_drafter_and_adaptive_depth_equal_generate(runner, micro_target_dir, tmp_path):
    torch.manual_seed(0)
    Drafter(DrafterConfig.for_target(runner.adapter)).save_pretrained(tmp_path)
    real = SpecRunner.from_folders(str(micro_target_dir), str(tmp_path))
    s = make_sample(54, 0)
    ref = _reference(real, s["image"])
    for protocol in PROTOCOLS:
        timeline = Timeline(Link(PRESETS["medium"], seed=0), MEASURED, real.adapter.vocab_size)
        got = run_protocol(protocol, real, Request(s["image"], PROMPT, MAX_NEW), timeline, TREE)
        assert got.tokens == ref, protocol
    policy = LinkAwareDepth(TREE, max_depth=8)
    timeline = Timeline(Link(PRESETS["bad"], seed=0), MEASURED, real.adapter.vocab_size)
    got = run_protocol("sync", real, Request(s["image"], PROMPT, MAX_NEW), timeline, policy)
    assert got.tokens == ref and len(policy.chosen) == got.rounds


def test_sampling_is_refused_by_greedy_only_protocols(runner):
    s = make_sample(55, 0)
    for protocol in ("decoupled", "progressive"):
        with pytest.raises(ValueError, match="greedily"):
            run_protocol(
                protocol, runner, Request(s["image"], PROMPT, 8, temperature=0.7), None, TREE,
                source_factory=lambda *_: Ranked([], runner.adapter.vocab_size, 1, 0),
            )  # fmt: skip
    with pytest.raises(ValueError, match="unknown protocol"):
        run_protocol("carrier-pigeon", runner, Request(s["image"], PROMPT, 8))


class _FakeTimeline:
    def __init__(self, rtt_ms):
        self.link = Link(
            PRESETS["good"]
            .with_rtt(rtt_ms)
            .__class__(
                "fixed",
                RadioConfig(20e6, 20.0, 0.0, fading="none"),
                RadioConfig(20e6, 20.0, 0.0, fading="none"),
                rtt_ms,
            )
        )

    def now(self, role="device"):
        return 0.0


def test_link_aware_depth_drafts_longer_under_a_long_rtt():
    def chosen(rtt_ms):
        policy = LinkAwareDepth(DraftSettings(mode="chain", depth=6), max_depth=12)
        policy.alpha, policy.step_s, policy.verify_s = 0.9, 0.002, 0.01
        return policy.settings(None, _FakeTimeline(rtt_ms)).depth

    assert chosen(1.0) < chosen(200.0) == 12
    weak = LinkAwareDepth(DraftSettings(mode="chain", depth=6), max_depth=12)
    weak.alpha, weak.step_s, weak.verify_s = 0.3, 0.002, 0.01
    assert weak.settings(None, _FakeTimeline(1.0)).depth <= 2  # a weak drafter drafts short


def test_link_is_deterministic_and_fifo():
    def arrivals(seed):
        link = Link(PRESETS["medium"], seed=seed)
        return [link.send("up", 20_000, 0.0) for _ in range(3)] + [link.send("down", 500, 0.01)]

    first = arrivals(0)
    assert first == arrivals(0) and first != arrivals(1)
    assert first[0] <= first[1] <= first[2] and first[2] > first[0]  # serialised, in order
    with pytest.raises(ValueError, match="direction"):
        Link(PRESETS["good"]).send("sideways", 1, 0.0)


def test_rate_follows_shannon_without_fading():
    radio = RadioConfig(10e6, 10.0, shadowing_sigma_db=0.0, fading="none", efficiency=0.5)
    cfg = PRESETS["good"].__class__("flat", radio, radio, rtt_ms=20.0, overhead_bytes=0)
    link = Link(cfg)
    rate = 0.5 * 10e6 * torch.log2(torch.tensor(11.0)).item()
    assert link.rate_bps("up", 0.3) == pytest.approx(rate)
    assert link.send("up", 10_000, 0.0) == pytest.approx(80_000 / rate + 0.010)


def test_trace_channel(tmp_path):
    path = tmp_path / "drive.csv"
    path.write_text("time_s,snr_db,rtt_ms,uplink_mbps,downlink_mbps\n0,10,30,8,16\n1.5,0,90,,\n")
    trace = TraceChannel.from_csv(path, PRESETS["medium"])
    link = Link(trace)
    assert link.rate_bps("up", 0.2) == pytest.approx(8e6) and link.rtt_ms(0.2) == 30
    assert link.rtt_ms(5.0) == 90  # the last row is held
    radio = PRESETS["medium"].uplink
    assert link.rate_bps("up", 2.0) == pytest.approx(radio.efficiency * radio.bandwidth_hz * 1.0)
    assert resolve_channel(str(path)).name == "trace:drive"
    assert resolve_channel("bad@rtt300").rtt_ms == 300
    bad = tmp_path / "bad.csv"
    bad.write_text("time_s,snr_db\n0,1\n")
    with pytest.raises(ValueError, match="rtt_ms"):
        TraceChannel.from_csv(bad, PRESETS["medium"])
    with pytest.raises(ValueError, match="unknown channel"):
        resolve_channel("lunar")
    # a message that outlasts its row: 1 s at 8 Mbit/s, the rest at the next row's rate
    rest = 8 * (2_000_000 + 48) - 8e6 * 1.0  # bits (48 B of headers) left at t = 1.5
    slow = radio.efficiency * radio.bandwidth_hz * 1.0  # snr 0 dB: log2(2) = 1 bit/s/Hz
    want = 1.5 + rest / slow + 0.030 / 2  # + half the RTT of the row the message started in
    assert Link(trace).send("up", 2_000_000, 0.5) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(
    "spec, rows, says",
    [
        ("good@rtt-50", None, "must be >= 0"),
        (None, "0,10,-30,8,16", "rtt_ms must be >= 0"),
        (None, "0,10,30,0,16", "rates > 0"),
    ],
)
def test_impossible_links_are_refused(spec, rows, says, tmp_path):
    if rows:
        spec = str(tmp_path / "t.csv")
        Path(spec).write_text(f"time_s,snr_db,rtt_ms,uplink_mbps,downlink_mbps\n{rows}\n")
    with pytest.raises(ValueError, match=says):
        resolve_channel(spec)
    with pytest.raises(ValueError, match="shadowing_corr_s"):
        replace(PRESETS["good"].uplink, shadowing_corr_s=0.0)


def test_roofline_prices_memory_and_compute_bound_calls():
    profile = PROFILES["a40-orin-7b"]
    verify = profile.seconds(Op("edge", "verify", 8, context=600))
    prefill = profile.seconds(Op("edge", "prefill", 600))
    step = profile.seconds(Op("edge", "step", 1, context=600))
    assert 0.015 < step < 0.05  # 7B bf16 weights over 0.7 x 696 GB/s
    assert verify < 1.2 * step  # 8 rows cost about one step: weight-bound
    assert prefill > 2 * step  # 600 rows: compute-bound
    draft = profile.seconds(Op("device", "draft", 6, forwards=6, context=600))
    assert draft > 5 * profile.seconds(Op("device", "draft", 1, forwards=1, context=600)) * 0.9
    assert MEASURED.seconds(Op("edge", "verify", 8, measured_s=0.123)) == 0.123


def test_lossy_rules_span_exact_to_accept_everything(runner, micro_target_dir, tmp_path):
    """An always-reject rule is greedy verification exactly; an always-accept rule takes every
    drafted node down the first-child path (WISV's lossy verifier at its two ends)."""
    from covspec.inference.acceptance import ConstantRule

    torch.manual_seed(1)
    Drafter(DrafterConfig.for_target(runner.adapter)).save_pretrained(tmp_path)
    real = SpecRunner.from_folders(str(micro_target_dir), str(tmp_path))
    s = make_sample(56, 0)
    ref = _reference(real, s["image"])
    for upload in ("full", "selective"):
        timeline = Timeline(Link(PRESETS["bad"], seed=0), MEASURED, real.adapter.vocab_size)
        reject = ConstantRule(False)
        got = run_protocol(
            "sync", real, Request(s["image"], PROMPT, MAX_NEW), timeline, TREE,
            rule=reject, upload=upload,
        )  # fmt: skip
        assert got.tokens == ref and reject.events  # mismatches seen, none accepted
        assert all(
            not e.accepted and e.target_hidden.shape == (real.adapter.hidden_size,)
            for e in reject.events
        )
        if upload == "selective":  # one fetch round trip per mismatch
            kinds = [m[1] for m in timeline.messages]
            assert kinds.count("HiddenRequest") == kinds.count("HiddenUpload") == len(reject.events)
    accept = ConstantRule(True)
    records = []
    chain = DraftSettings(mode="chain", depth=4)
    got = run_protocol(
        "sync", real, Request(s["image"], PROMPT, MAX_NEW), None, chain,
        observers=[records.append], rule=accept,
    )  # fmt: skip
    # every drafted node is accepted, every round (a random drafter's tokens, not the target's)
    assert records and all(r.accepted == r.drafted == 4 for r in records)
    assert got.tokens != ref


def test_typical_acceptance_spans_its_ends_and_uploads_no_drafter_state(
    runner, micro_target_dir, tmp_path
):
    """Medusa's typical acceptance: a threshold of 1 is greedy verification exactly, a threshold
    of 0 accepts every drafted node; it reads the target only, so no drafter state or
    confidence crosses the link (fewer uplink bytes than the head's full upload)."""
    from covspec.inference.acceptance import ConstantRule, TypicalRule

    torch.manual_seed(1)
    Drafter(DrafterConfig.for_target(runner.adapter)).save_pretrained(tmp_path)
    real = SpecRunner.from_folders(str(micro_target_dir), str(tmp_path))
    s = make_sample(56, 0)
    ref = _reference(real, s["image"])
    chain = DraftSettings(mode="chain", depth=4)

    def run(rule):
        records = []
        timeline = Timeline(Link(PRESETS["bad"], seed=0), MEASURED, real.adapter.vocab_size)
        got = run_protocol(
            "sync", real, Request(s["image"], PROMPT, MAX_NEW), timeline, chain,
            observers=[records.append], rule=rule,
        )  # fmt: skip
        return got, records

    never = TypicalRule(1.0, delta=1e9)  # min(1, huge * exp(-H)) = 1: only a sure token passes
    got, _ = run(never)
    assert got.tokens == ref and never.events and not any(e.accepted for e in never.events)
    always = TypicalRule(1.0, delta=0.0)  # threshold 0
    got, records = run(always)
    assert all(r.accepted == r.drafted == 4 for r in records) and got.tokens != ref
    head_like, head_records = run(
        ConstantRule(True)
    )  # uploads the drafter's states and confidences
    assert got.tokens == head_like.tokens
    assert sum(r.uplink_bytes for r in records) < sum(r.uplink_bytes for r in head_records)
    with pytest.raises(ValueError, match="epsilon"):
        TypicalRule(0.0)
