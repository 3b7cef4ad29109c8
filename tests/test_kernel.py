"""The runner's fused drafter path computes what the module (transformers' Llama layer) computes."""

import pytest
import torch
from transformers import DynamicCache

from covspec.inference.features import FeatureDecoder, FeatureEncoder
from covspec.inference.kernel import DrafterKernel
from covspec.inference.tree import additive_mask
from covspec.modeling.adapters import adapter_for
from covspec.modeling.drafter import Drafter, DrafterConfig
from tests.tiny_vlms import llava


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    model, _ = llava()
    return adapter_for(model.eval())


def _causal(n: int, past: int) -> torch.Tensor:
    return torch.full((n, past + n), torch.finfo(torch.float32).min).triu(past + 1)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the shipped shape: one layer, heads as the target
        {"num_hidden_layers": 2, "num_key_value_heads": 1},  # deeper, grouped-query attention
        {"draft_vocab_size": 40},  # pruned draft vocabulary with its own head
        {"step_bias": True},  # HiViS extra
    ],
)
def test_kernel_equals_module_with_cache(adapter, overrides):
    torch.manual_seed(1)
    d = Drafter(DrafterConfig.for_target(adapter, **overrides)).attach_target(adapter).eval()
    with torch.no_grad():
        for p in d.parameters():  # non-trivial norms and biases-free weights everywhere
            p.add_(0.1 * torch.randn_like(p))
    dim = d.config.hidden_size
    kernel = DrafterKernel(d)
    kv = kernel.new_cache(32)
    cache = DynamicCache(config=d.config.llama_config())
    with torch.inference_mode():
        # committed prefix (causal), then a tree level: two siblings and a grandchild of one
        e, f = torch.randn(7, dim), torch.randn(7, dim)
        ref = d(e[None], f[None], torch.arange(7)[None], _causal(7, 0)[None, None], cache=cache)
        got = kernel.run(kv, e, f, torch.arange(7), _causal(7, 0))
        torch.testing.assert_close(got, ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kernel.logits(got), d.logits(ref)[0], rtol=1e-5, atol=1e-5)

        e, f = torch.randn(3, dim), torch.randn(3, dim)
        mask = additive_mask(3, 10, 7, [0, 1, 2, 2], [7, 8, 7, 9], torch.float32)
        pos = torch.tensor([7, 7, 8])
        ref = d(e[None], f[None], pos[None], mask, cache=cache)
        got = kernel.run(kv, e, f, pos, mask[0, 0])
        torch.testing.assert_close(got, ref[0], rtol=1e-5, atol=1e-5)
        assert kv.length == 10

        # dropping the tree and appending again matches a cropped DynamicCache
        kv.truncate(7)
        cache.crop(-3)
        e, f = torch.randn(2, dim), torch.randn(2, dim)
        ref = d(e[None], f[None], torch.tensor([[7, 8]]), _causal(2, 7)[None, None], cache=cache)
        got = kernel.run(kv, e, f, torch.tensor([7, 8]), _causal(2, 7))
        torch.testing.assert_close(got, ref[0], rtol=1e-5, atol=1e-5)


def test_kernel_cache_overflow_is_refused(adapter):
    d = Drafter(DrafterConfig.for_target(adapter)).attach_target(adapter).eval()
    kernel = DrafterKernel(d)
    kv = kernel.new_cache(4)
    dim = d.config.hidden_size
    with pytest.raises(ValueError, match="holds 4 entries"):
        kernel.run(kv, torch.randn(5, dim), torch.randn(5, dim), torch.arange(5), _causal(5, 0))


@pytest.mark.parametrize("variant", ["visual_free", "full_visual", "text_only"])
def test_kernel_inputs_equal_the_drafter_pieces(adapter, variant):
    torch.manual_seed(2)
    config = DrafterConfig.for_target(adapter, variant=variant, max_draft_steps=4, step_bias=True)
    d = Drafter(config).attach_target(adapter).eval()
    with torch.no_grad():
        d.step_bias.add_(torch.randn_like(d.step_bias))
    kernel = DrafterKernel(d)
    ids = torch.tensor([3, 1, 4, 1, 5])
    states = torch.randn(5, len(d.config.fused_layer_ids) * d.config.target_hidden_size)
    previous = torch.randn(2, d.config.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(kernel.embed(ids), d.embed(ids[None])[0])
        like = kernel.embed(ids)
        # the feature path split over the link: edge encoder, device decoder
        sent = FeatureEncoder(d)(states)
        torch.testing.assert_close(
            FeatureDecoder(d)(sent, 5), d.project_features(states[None], like[None])[0]
        )
        for step in (2, 3, 4, 7):  # past max_draft_steps the last bias row is reused
            torch.testing.assert_close(
                kernel.step_feature(previous, step), d.step_feature(previous, step)
            )


@pytest.mark.parametrize("rank", [None, 8])
def test_feature_path_over_the_wire(adapter, rank):
    """float16 rows, or the codec's int8 codes + float16 scales, decode to the drafter's
    projection within the wire rounding; the codec sends far fewer bytes."""
    torch.manual_seed(3)
    d = Drafter(DrafterConfig.for_target(adapter, feature_codec_rank=rank)).attach_target(adapter)
    states = torch.randn(7, len(d.config.fused_layer_ids) * d.config.target_hidden_size)
    sent = FeatureEncoder(d, wire_dtype=torch.float16)(states)
    with torch.no_grad():
        want = d.eval().project_features(states, like=states[:, : d.config.hidden_size])
    got = FeatureDecoder(d)(sent, 7)
    # float16 rows round at ~1e-3 relative, int8 codes at ~1/254 of each row's range: 2% of
    # the values' range holds both and still fails a decoder that is off by a few percent
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item())
    assert len(sent.serialise()) == sent.nbytes()
    if rank:
        assert sent.nbytes() == 7 * (rank + 2)  # int8 codes + one float16 scale per row
    else:
        assert sent.nbytes() == 7 * d.config.hidden_size * 2
