import pytest
import torch
from transformers import AutoConfig, AutoModel, DynamicCache

from covspec.modeling.adapters import TargetMismatchError, adapter_for
from covspec.modeling.drafter import Drafter, DrafterConfig
from covspec.modeling.drafter_config import default_fused_layer_ids
from covspec.modeling.ttt import ttt_unroll
from covspec.modeling.vocab import build_draft_vocab
from tests.tiny_vlms import llava


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    model, inputs = llava()
    return adapter_for(model.eval()), inputs


def _drafter(adapter, **kw):
    torch.manual_seed(1)
    d = Drafter(DrafterConfig.for_target(adapter, **kw)).attach_target(adapter).eval()
    if d.config.step_bias:
        with torch.no_grad():
            d.step_bias.normal_()  # non-zero, so the test sees the bias path
    return d


def test_default_layer_ids_cover_depth():
    assert default_fused_layer_ids(32) == [2, 16, 29]  # EAGLE-3's (2, L//2, L-3)
    assert default_fused_layer_ids(8) == [2, 4, 5]
    for n in range(1, 40):
        ids = default_fused_layer_ids(n)
        assert ids == sorted(set(ids)) and all(1 <= i <= n for i in ids)


def _sequential(d, embeds, feats, t, k):
    """Inference: prefill the context 0..t-k+1 with target features, then draft k-1 steps."""
    n = t - k + 1
    cache = DynamicCache(config=d.config.llama_config())
    pos = torch.arange(n + 1)[None]
    mask = torch.full((n + 1, n + 1), torch.finfo(feats.dtype).min).triu(1)[None, None]
    h = d(embeds[:, : n + 1], feats[:, : n + 1], pos, mask, cache=cache)[:, -1:]
    for j in range(2, k + 1):
        p = n + j - 1
        h = d(
            embeds[:, p : p + 1],
            d.step_feature(h, j),
            torch.tensor([[p]]),
            torch.zeros(1, 1, 1, p + 1),
            cache=cache,
        )
    return h[:, 0]


@pytest.mark.parametrize(
    "variant,step_bias", [("visual_free", False), ("visual_free", True), ("text_only", False)]
)
def test_unroll_equals_sequential_drafting(target, variant, step_bias):
    adapter, _ = target
    d = _drafter(adapter, variant=variant, max_draft_steps=4, step_bias=step_bias)
    s, dim = 7, adapter.hidden_size
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, s, dim, generator=g)
    feats = d.project_features(
        torch.randn(1, s, len(d.config.fused_layer_ids) * dim, generator=g), like=embeds
    )
    with torch.no_grad():
        outs = ttt_unroll(d, embeds, feats, torch.ones(1, s, dtype=torch.bool), steps=4)
        assert len(outs) == 4 and all(o.shape == (1, s, dim) for o in outs)
        for k in range(1, 5):
            for t in range(k - 1, s):
                torch.testing.assert_close(
                    outs[k - 1][:, t], _sequential(d, embeds, feats, t, k), atol=1e-5, rtol=1e-5
                )


def test_unroll_feeds_on_own_outputs_after_step_one(target):
    adapter, _ = target
    d = _drafter(adapter, max_draft_steps=3)
    s, dim = 6, adapter.hidden_size
    embeds = torch.randn(1, s, dim)
    states = torch.randn(1, s, len(d.config.fused_layer_ids) * dim)
    valid = torch.ones(1, s, dtype=torch.bool)
    with torch.no_grad():
        base = ttt_unroll(d, embeds, d.project_features(states, like=embeds), valid, 3)
        changed = states.clone()
        changed[:, 3] += 5.0  # the target's feature at position 3 only
        new = ttt_unroll(d, embeds, d.project_features(changed, like=embeds), valid, 3)
    # depth 2 at position 4 drafts after context 0..3: it sees the change through its own
    # step-1 output; depth 3 at position 4 has context 0..2 only and must not see it
    assert not torch.allclose(base[1][:, 4], new[1][:, 4])
    torch.testing.assert_close(base[2][:, 4], new[2][:, 4])
    torch.testing.assert_close(base[0][:, 2], new[0][:, 2])


def test_save_load_identical_logits_and_no_target_weights(target, tmp_path):
    adapter, _ = target
    d = _drafter(adapter)
    d.save_pretrained(tmp_path)
    names = set(
        __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            tmp_path / "model.safetensors"
        )
    )
    assert (
        not any("embed" in n and "norm" not in n for n in names) and "lm_head.weight" not in names
    )
    assert AutoConfig.from_pretrained(tmp_path).model_type == "covspec_drafter"
    loaded = AutoModel.from_pretrained(tmp_path).attach_target(adapter).eval()
    x, f = torch.randn(1, 5, adapter.hidden_size), torch.randn(1, 5, adapter.hidden_size)
    pos = torch.arange(5)[None]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.logits(loaded(x, f, pos)), d.logits(d(x, f, pos)), rtol=0, atol=0
        )


def test_mismatched_target_refused(target, tmp_path):
    adapter, _ = target
    _drafter(adapter).save_pretrained(tmp_path)
    from tests.tiny_vlms import qwen2_vl

    other = adapter_for(qwen2_vl()[0])
    with pytest.raises(TargetMismatchError, match="model type 'llava'"):
        Drafter.from_pretrained(tmp_path).attach_target(other)
    with pytest.raises(TargetMismatchError, match="tokenizer fingerprint"):
        Drafter.from_pretrained(tmp_path, tokenizer_fingerprint="abc").attach_target(
            adapter, tokenizer_fingerprint="def"
        )
    with pytest.raises(TargetMismatchError, match="outside"):
        Drafter(DrafterConfig.for_target(adapter, fused_layer_ids=[1, 9])).attach_target(adapter)


def test_draft_vocab(target, tmp_path):
    adapter, _ = target
    counts = torch.zeros(adapter.vocab_size)
    counts[[5, 9, 2, 40]] = torch.tensor([10.0, 3.0, 7.0, 1.0])
    ids = build_draft_vocab(counts, 3)
    assert ids.tolist() == [2, 5, 9]
    d = _drafter(adapter, draft_vocab_size=3)
    assert not d.has_draft_vocab()
    d.set_draft_vocab(ids)
    assert d.has_draft_vocab()
    torch.testing.assert_close(d.lm_head.weight, adapter.lm_head().weight[ids])
    d.save_pretrained(tmp_path)
    loaded = Drafter.from_pretrained(tmp_path).attach_target(adapter)
    # EAGLE-3 storage: d2t holds offsets (target = draft + d2t[draft]), t2d the membership mask
    assert loaded.d2t.tolist() == [2, 4, 7]
    assert loaded.t2d.nonzero()[:, 0].tolist() == [2, 5, 9]
    assert loaded.to_target_ids(torch.tensor([0, 2])).tolist() == [2, 9]
    with pytest.raises(ValueError, match="draft vocab size"):
        build_draft_vocab(counts, 0)


def test_bad_config_refused():
    with pytest.raises(ValueError, match="variant"):
        DrafterConfig(variant="half_visual")


def test_old_layout_and_mismatched_weights_refused(target, tmp_path):
    from safetensors.torch import load_file, save_file

    from covspec.modeling.drafter import DrafterWeightsError

    adapter, _ = target
    _drafter(adapter).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dim = adapter.hidden_size
    save_file(
        {**weights, "in_proj.weight": torch.zeros(dim, 2 * dim)}, tmp_path / "model.safetensors"
    )
    with pytest.raises(DrafterWeightsError, match="pre-EAGLE-3 layout"):
        Drafter.from_pretrained(tmp_path)
    weights.pop("layers.0.hidden_norm.weight")
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(DrafterWeightsError, match="missing: \\['layers.0.hidden_norm.weight'\\]"):
        Drafter.from_pretrained(tmp_path)


def test_eagle3_first_layer_reads_embedding_and_feature(target):
    """q/k/v take [input_layernorm(embedding); hidden_norm(feature)]; the residual is the feature."""
    adapter, _ = target
    d = _drafter(adapter)
    first = d.layers[0]
    dim = adapter.hidden_size
    assert first.self_attn.q_proj.in_features == 2 * dim
    assert first.self_attn.k_proj.in_features == 2 * dim
    assert d.fc.in_features == len(d.config.fused_layer_ids) * dim
    e, f = torch.randn(1, 4, dim), torch.randn(1, 4, dim)
    pos = torch.arange(4)[None]
    with torch.no_grad():
        cos_sin = d.rotary(f, pos)
        x = torch.cat([first.input_layernorm(e), first.hidden_norm(f)], -1)
        attn, _ = first.self_attn(hidden_states=x, position_embeddings=cos_sin, attention_mask=None)
        h = f + attn
        want = h + first.mlp(first.post_attention_layernorm(h))
        torch.testing.assert_close(d(e, f, pos), want)
