"""Qwen2-VL / Qwen2.5-VL in the runner: M-RoPE positions under a tree, lossless decoding.

Tiny random targets with a real processor (tests/tiny_vlms.py), two images per prompt so the
rope delta is far from zero. References are HF's own: sequential decoding through the model's
forward (which adds its stored `rope_deltas`) and `generate`.
"""

import copy

import pytest
import torch

from covspec.data.toy_world import make_sample
from covspec.inference.drafting import keep_cache_positions
from covspec.inference.protocols import run_protocol
from covspec.inference.roles import Request
from covspec.inference.runner import SpecRunner
from covspec.inference.tree import DraftSettings, DraftTree, tree_attention_mask
from covspec.modeling.adapters import adapter_for
from covspec.modeling.drafter import Drafter, DrafterConfig
from covspec.modeling.tokens import fingerprint_vocab
from tests.test_runner import Scripted
from tests.tiny_vlms import FAMILIES, qwen_with_processor

MAX_NEW = 20
PROMPT = "Describe the image."


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request):
    torch.manual_seed(0)
    model, processor = qwen_with_processor(request.param)
    return SpecRunner(model, processor, None)


def _images(seed: int) -> list:
    return [make_sample(seed, 0)["image"], make_sample(seed, 1)["image"]]


def _reference(runner, images, n=MAX_NEW):
    inputs = runner.encode(images, PROMPT)
    out = runner.model.generate(
        **inputs, do_sample=False, max_new_tokens=n, suppress_tokens=runner.suppress_tokens
    )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _tree():
    tree = DraftTree(root_token=40)
    a = tree.add(0, 41, -1.0)
    tree.add(0, 42, -2.0)
    b = tree.add(a, 43, -3.0)
    tree.add(a, 44, -4.0)
    tree.add(b, 45, -5.0)
    return tree, tree.select()


@torch.no_grad()
def test_rope_offset_is_hf_rope_delta(qwen):
    inputs = qwen.encode(_images(50), PROMPT)
    qwen.model(**inputs)  # HF stores its delta on the model at a prefill
    offset = qwen.adapter.rope_offset(inputs)
    assert offset == int(qwen.model.model.rope_deltas) < -10  # 2 x 16 visual tokens, 8x8 grids
    assert qwen.adapter.rope_offset(qwen.encode(None, PROMPT)) == 0  # text only: plain positions


def _tree_equals_sequential(model, adapter, inputs) -> None:
    """Every tree node's logits through the runner's path (language model, 3D positions
    past + depth + delta, 4D tree mask) equal HF decoding that node's path token by token."""
    past = inputs["input_ids"].shape[1]
    pre = adapter.forward(inputs, use_cache=True)
    offset = adapter.rope_offset(inputs)
    assert offset < 0  # visual blocks advance positions by their grid, not their token count
    tree, order = _tree()
    ids = torch.tensor([[tree.tokens[n] for n in order]])
    depths = torch.tensor([[past + tree.depths[n] for n in order]])
    mask = tree_attention_mask(tree, order, past, torch.float32)

    def tree_logits(offset_used: int) -> torch.Tensor:
        pos = adapter.text_position_ids(depths, offset_used)
        assert pos.shape == (3, 1, len(order))
        out = adapter.text_forward(
            ids, (), cache=copy.deepcopy(pre.cache), position_ids=pos, attention_mask=mask
        )
        return out.logits[0]

    got, unshifted = tree_logits(offset), tree_logits(0)
    model(**adapter.model_inputs(inputs))  # HF's stored delta: this prompt's
    for i, node in enumerate(order):
        path = torch.tensor([[tree.tokens[n] for n in tree.ancestors(node)]])
        seq = model(input_ids=path, cache=copy.deepcopy(pre.cache), use_cache=True)
        torch.testing.assert_close(got[i], seq.logits[0, -1], atol=1e-5, rtol=1e-5)
    # the test can fail: positions without the delta miss the same tolerance
    assert not torch.allclose(unshifted, got, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_tree_forward_equals_sequential_decoding(qwen):
    """Two images from the processor."""
    _tree_equals_sequential(qwen.model, qwen.adapter, qwen.encode(_images(51), PROMPT))


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_tree_forward_after_an_image_and_a_video(family):
    """The M-RoPE delta of an image plus a 2-frame video grid (no processor needed)."""
    torch.manual_seed(0)
    model, inputs = FAMILIES[family]()
    _tree_equals_sequential(model.eval(), adapter_for(model), inputs)


@torch.no_grad()
def test_pruned_cache_continues_like_sequential(qwen):
    adapter = qwen.adapter
    inputs = qwen.encode(_images(52), PROMPT)
    past = inputs["input_ids"].shape[1]
    pre = adapter.forward(inputs, use_cache=True)
    offset = adapter.rope_offset(inputs)
    tree, order = _tree()
    cache = copy.deepcopy(pre.cache)
    adapter.text_forward(
        torch.tensor([[tree.tokens[n] for n in order]]),
        (),
        cache=cache,
        position_ids=adapter.text_position_ids(
            torch.tensor([[past + tree.depths[n] for n in order]]), offset
        ),
        attention_mask=tree_attention_mask(tree, order, past, torch.float32),
    )
    kept = [0, order[1], order[4]]  # root, a, a's second child: not a prefix of `order`
    keep_cache_positions(cache, past, [order.index(n) for n in kept])
    pos = adapter.text_position_ids(torch.tensor([[past + len(kept)]]), offset)
    nxt = adapter.text_forward(torch.tensor([[3]]), (), cache=cache, position_ids=pos)
    qwen.model(**inputs)
    ref = qwen.model(
        input_ids=torch.tensor([[tree.tokens[n] for n in kept] + [3]]),
        cache=copy.deepcopy(pre.cache),
        use_cache=True,
    )
    torch.testing.assert_close(nxt.logits[0, -1], ref.logits[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_greedy_runner_equals_generate(qwen, mode):
    vocab = qwen.adapter.vocab_size
    for i, p_right in enumerate((1.0, 0.6, 0.0)):
        images = _images(60 + i)
        ref = _reference(qwen, images)
        factory = lambda *_, ref=ref, p=p_right, i=i: Scripted(ref, vocab, p, seed=i)  # noqa: E731
        settings = DraftSettings(mode=mode, depth=4, top_k=3, beam=3, max_nodes=10)
        got = qwen.generate(images, PROMPT, MAX_NEW, settings, source_factory=factory)
        assert got.tokens == ref, (mode, p_right)
        if p_right == 1.0 and len(ref) > 8:
            assert got.tau > 3.0
        if p_right == 0.0:
            assert got.tau == pytest.approx(1.0)


def test_edge_only_steps_equal_generate(qwen):
    images = _images(63)
    got = run_protocol("edge_only", qwen, Request(images[0], PROMPT, MAX_NEW))
    assert got.tokens == _reference(qwen, images[:1])


def test_real_drafter_is_lossless(qwen):
    torch.manual_seed(1)
    vocab = fingerprint_vocab(qwen.processor.tokenizer.get_vocab())  # an in-memory target's
    drafter = Drafter(DrafterConfig.for_target(qwen.adapter, tokenizer_fingerprint=vocab))
    real = SpecRunner(qwen.model, qwen.processor, drafter)
    images = _images(64)
    ref = _reference(real, images)
    for mode in ("chain", "tree"):
        got = real.generate(images, PROMPT, MAX_NEW, DraftSettings(mode=mode, depth=3))
        assert got.tokens == ref, mode
