import copy
import random

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from covspec.data.toy_world import make_sample
from covspec.inference.drafting import keep_cache_positions
from covspec.inference.runner import SpecRunner, build_prompt
from covspec.inference.tree import (
    DraftSettings,
    DraftTree,
    grow,
    tree_attention_mask,
    verify_sampling,
)
from covspec.modeling.adapters import TargetMismatchError, adapter_for
from covspec.modeling.drafter import Drafter, DrafterConfig
from tests.tiny_vlms import FAMILIES

MAX_NEW = 40


@pytest.fixture(scope="module")
def runner(micro_target_dir):
    model = AutoModelForImageTextToText.from_pretrained(micro_target_dir).eval()
    return SpecRunner(model, AutoProcessor.from_pretrained(micro_target_dir), None)


def _reference(runner, image, prompt, n=MAX_NEW):
    inputs = runner.encode(image, prompt)
    with torch.no_grad():
        out = runner.model.generate(
            **inputs, do_sample=False, max_new_tokens=n, suppress_tokens=runner.suppress_tokens
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


class Scripted:
    """A fake drafter that knows the greedy continuation and is right with probability `p_right`."""

    def __init__(self, ref, vocab, p_right, margin=8.0, seed=0):
        self.ref, self.vocab, self.p_right, self.margin = ref, vocab, p_right, margin
        self.rng = random.Random(seed)
        self.committed = 1

    def _logits(self, index):
        want = self.ref[index] if index < len(self.ref) else 0
        tok = (
            want
            if self.rng.random() < self.p_right
            else (want + 1 + self.rng.randrange(self.vocab - 1)) % self.vocab
        )
        logits = torch.zeros(self.vocab)
        logits[tok] = self.margin
        logits[(tok + 7) % self.vocab] = self.margin / 2
        return logits

    def root_logits(self):
        return self._logits(self.committed)

    def expand(self, tree, nodes):
        return torch.stack([self._logits(self.committed + tree.depths[n]) for n in nodes])

    def commit(self, features, emitted):
        self.committed += len(emitted)


@pytest.mark.parametrize("p_right", [1.0, 0.0, 0.6])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_greedy_equals_generate(runner, p_right, mode):
    vocab = runner.adapter.vocab_size
    for i in range(3):
        s = make_sample(42, i)
        prompt = s["messages"][0]["content"].replace("<image>\n", "")
        ref = _reference(runner, s["image"], prompt)
        factory = lambda *_, ref=ref, i=i: Scripted(ref, vocab, p_right, seed=i)  # noqa: E731
        settings = DraftSettings(mode=mode, depth=5, top_k=3, beam=3, max_nodes=12)
        got = runner.generate(s["image"], prompt, MAX_NEW, settings, source_factory=factory)
        assert got.tokens == ref
        if p_right == 1.0 and len(ref) > 6:
            assert got.tau > 3.0
        if p_right == 0.0:
            assert got.tau == pytest.approx(1.0) and sum(got.accepted_per_depth) == 0


def test_real_drafter_greedy_equals_generate(runner, micro_target_dir, tmp_path):
    torch.manual_seed(0)
    d = Drafter(DrafterConfig.for_target(runner.adapter))
    d.save_pretrained(tmp_path)
    real = SpecRunner.from_folders(str(micro_target_dir), str(tmp_path))
    s = make_sample(43, 0)
    ref = _reference(real, s["image"], "Describe the image.")
    for mode in ("chain", "tree"):
        got = real.generate(
            s["image"], "Describe the image.", MAX_NEW, DraftSettings(mode=mode, depth=4)
        )
        assert got.tokens == ref


def test_tree_mask_and_cache_pruning_equal_sequential(runner):
    s = make_sample(44, 0)
    inputs = runner.encode(s["image"], "Describe the image.")
    past = inputs["input_ids"].shape[1]
    with torch.no_grad():
        pre = runner.model(**inputs, use_cache=True)
        tree = DraftTree(root_token=5)
        a = tree.add(0, 7, -1.0)
        tree.add(0, 9, -2.0)
        b = tree.add(a, 11, -3.0)
        e = tree.add(a, 12, -4.0)
        order = tree.select()
        assert order[:3] == [0, a, b]  # depth-first: the top path is a prefix
        cache = copy.deepcopy(pre.cache)
        ids = torch.tensor([[tree.tokens[n] for n in order]])
        pos = torch.tensor([[past + tree.depths[n] for n in order]])
        mask = tree_attention_mask(tree, order, past, torch.float32)
        tree_logits = runner.model(
            input_ids=ids, position_ids=pos, attention_mask=mask, cache=cache, use_cache=True
        ).logits[0]
        for i, node in enumerate(order):
            path = [tree.tokens[n] for n in tree.ancestors(node)]
            seq = runner.model(
                input_ids=torch.tensor([path]), cache=copy.deepcopy(pre.cache), use_cache=True
            ).logits[0, -1]
            torch.testing.assert_close(tree_logits[i], seq, atol=1e-5, rtol=1e-5)
        # keep a path (a prefix of `order`: cropped; or not: gathered), then one more step must
        # equal decoding that path sequentially
        for kept in ((0, a, b), (0, a, e)):
            pruned = copy.deepcopy(cache)
            keep_cache_positions(pruned, past, [order.index(n) for n in kept])
            nxt = runner.model(input_ids=torch.tensor([[3]]), cache=pruned, use_cache=True)
            ref = runner.model(
                input_ids=torch.tensor([[tree.tokens[n] for n in kept] + [3]]),
                cache=copy.deepcopy(pre.cache),
                use_cache=True,
            )
            torch.testing.assert_close(nxt.logits[0, -1], ref.logits[0, -1], atol=1e-5, rtol=1e-5)


def test_sampling_verification_reproduces_target_distribution():
    """Statistical: 40k rounds over a 5-token vocabulary, 2 children drawn without replacement;
    the emitted first token's distribution must match the target's to within 0.01 per token
    (about 4 standard errors)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.3, 0.15, 0.1])
    q = torch.tensor([0.5, 0.1, 0.1, 0.2, 0.1])
    counts = torch.zeros(5)
    n = 40_000
    for _ in range(n):
        tree = DraftTree(root_token=0)
        tree.draft_probs[0] = q
        gumbel = -torch.log(-torch.log(torch.rand(5, generator=gen)))
        for tok in (q.log() + gumbel).topk(2).indices.tolist():
            tree.add(0, tok, 0.0)
        order = tree.select()
        path, bonus = verify_sampling(tree, order, p.expand(len(order), 5), gen)
        counts[tree.tokens[path[0]] if path else bonus] += 1
    assert (counts / n - p).abs().max() < 0.01, counts / n


class Flat:
    def __init__(self, vocab, margin):
        self.vocab, self.margin = vocab, margin

    def _one(self):
        probs = torch.full((self.vocab,), (1 - 0.5 - self.margin) / (self.vocab - 2))
        probs[0], probs[1] = 0.5, 0.5 - self.margin
        return probs.log()

    def root_logits(self):
        return self._one()

    def expand(self, tree, nodes):
        return torch.stack([self._one() for _ in nodes])


def test_margin_gating_shortens_and_branches():
    deep = DraftTree(root_token=0)
    grow(deep, Flat(10, 0.4), DraftSettings(mode="chain", depth=6, stop_margin=0.2))
    assert max(deep.depths) == 6
    shallow = DraftTree(root_token=0)
    grow(shallow, Flat(10, 0.05), DraftSettings(mode="chain", depth=6, stop_margin=0.2))
    assert len(shallow) == 1  # low margin at the root: nothing drafted
    sure = DraftTree(root_token=0)
    grow(sure, Flat(10, 0.4), DraftSettings(mode="tree", depth=3, top_k=3, branch_margin=0.2))
    assert len(sure) == 4  # confident everywhere: a chain
    unsure = DraftTree(root_token=0)
    grow(
        unsure,
        Flat(10, 0.05),
        DraftSettings(mode="tree", depth=3, top_k=3, beam=2, branch_margin=0.2),
    )
    assert len(unsure.children[0]) == 3  # unsure: parallel branches


def test_bad_requests(runner, micro_target_dir, tmp_path):
    s = make_sample(45, 0)
    assert (
        runner.generate(s["image"], "Describe the image.", 0, source_factory=lambda *_: None).tokens
        == []
    )
    limit = runner.adapter.text_config.max_position_embeddings
    with pytest.raises(ValueError, match=f"context of {limit}"):
        runner.generate(s["image"], "Describe the image.", limit, source_factory=lambda *_: None)
    with pytest.raises(ValueError, match="no drafter"):
        runner.generate(s["image"], "Describe the image.", 5)
    other = DrafterConfig.for_target(
        runner.adapter, target_vocab_size=runner.adapter.vocab_size + 1
    )
    Drafter(other).save_pretrained(tmp_path)
    with pytest.raises(TargetMismatchError, match="vocab size"):
        SpecRunner.from_folders(str(micro_target_dir), str(tmp_path))
    assert "<image>" in build_prompt(runner.processor, "hi")


def test_sampling_generation_runs_and_is_seeded(runner, micro_target_dir, tmp_path):
    torch.manual_seed(0)
    Drafter(DrafterConfig.for_target(runner.adapter)).save_pretrained(tmp_path)
    real = SpecRunner.from_folders(str(micro_target_dir), str(tmp_path))
    s = make_sample(46, 0)
    for mode in ("chain", "tree"):
        settings = DraftSettings(mode=mode, depth=3, top_k=2, beam=2)
        a = real.generate(
            s["image"], "Describe the image.", 20, settings, temperature=0.8, top_p=0.9, seed=3
        )
        b = real.generate(
            s["image"], "Describe the image.", 20, settings, temperature=0.8, top_p=0.9, seed=3
        )
        assert a.tokens == b.tokens and 0 < len(a.tokens) <= 20
        assert not set(a.tokens) & set(real.suppress_tokens)


@pytest.mark.parametrize("family", ["gemma3"])  # Qwen2(.5)-VL: tests/test_qwen_runner.py
def test_runner_refuses_families_it_cannot_verify_yet(family):
    model, _ = FAMILIES[family]()
    with pytest.raises(TargetMismatchError, match=f"does not support {family}"):
        SpecRunner(model.eval(), None, None)


def test_only_a_gated_drafter_takes_a_price(micro_target_dir, tmp_path):
    from covspec.inference.runner import priced_drafters

    micro_model = AutoModelForImageTextToText.from_pretrained(micro_target_dir)
    adapter = adapter_for(micro_model)
    plain = tmp_path / "plain"
    Drafter(DrafterConfig.for_target(adapter)).save_pretrained(plain)
    gated = tmp_path / "gated"
    compressor = {"options": ["pool:4", "pool:2"], "gate": "critic"}
    cfg = DrafterConfig.for_target(adapter, visual_prefix="compressed", compressor=compressor)
    Drafter(cfg).save_pretrained(gated)
    runs = priced_drafters([str(plain), str(gated)], [0.0, 0.05])
    assert [(w, n) for _, w, n in runs] == [
        (None, "plain"),
        (0.0, "gated@cw0"),
        (0.05, "gated@cw0.05"),
    ]
    assert priced_drafters([str(plain)]) == [(str(plain), None, "plain")]
    processor = AutoProcessor.from_pretrained(micro_target_dir)
    runner = SpecRunner.for_drafter_folder(micro_model, processor, str(gated), 0.05)
    assert runner.drafter.compressor.config.cost_weight == 0.05
    with pytest.raises(ValueError, match="no visual compressor"):
        SpecRunner.for_drafter_folder(micro_model, processor, str(plain), 0.05)
