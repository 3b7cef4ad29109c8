import pytest
import torch

from covspec.modeling.adapters import TargetMismatchError, adapter_for
from tests.tiny_vlms import FAMILIES


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    model, inputs = FAMILIES[request.param]()
    return request.param, model.eval(), inputs


@torch.no_grad()
def test_hidden_states_equal_hf_output_hidden_states(family):
    name, model, inputs = family
    adapter = adapter_for(model)
    layers = list(range(adapter.num_layers + 1))  # embeddings, every layer, final norm
    out = adapter.forward(inputs, layer_ids=layers)
    ref = model(**adapter.model_inputs(inputs), output_hidden_states=True)
    assert len(ref.hidden_states) == adapter.num_layers + 1
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    for i in layers:
        torch.testing.assert_close(
            out.hidden_states[i], ref.hidden_states[i], rtol=0, atol=0, msg=f"{name} layer {i}"
        )


@torch.no_grad()
def test_text_forward_continues_like_the_full_forward(family):
    """After an image prefill, a text-only continuation through the language model directly,
    at the adapter's text positions, gives the full forward's logits and hidden states (what
    the runner verifies with; for M-RoPE families the positions carry the rope delta)."""
    name, model, inputs = family
    adapter = adapter_for(model)
    if adapter.tree_decoding_blocker:
        pytest.skip(f"{name}: {adapter.tree_decoding_blocker}")
    layers = list(range(adapter.num_layers + 1))
    new = torch.tensor([[5, 6, 7]]).expand(inputs["input_ids"].shape[0], 3)
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], new], 1))
    if "attention_mask" in full:
        full["attention_mask"] = torch.ones_like(full["input_ids"])
    ref = adapter.forward(full, layers)
    pre = adapter.forward(inputs, [], use_cache=True)
    past = inputs["input_ids"].shape[1]
    pos = adapter.text_position_ids(
        torch.arange(past, past + 3)[None].expand(new.shape[0], 3), adapter.rope_offset(inputs)
    )
    out = adapter.text_forward(new, layers, cache=pre.cache, position_ids=pos, use_cache=True)
    torch.testing.assert_close(out.logits, ref.logits[:, -3:], rtol=1e-5, atol=1e-5)
    for i in layers:
        torch.testing.assert_close(
            out.hidden_states[i],
            ref.hidden_states[i][:, -3:],
            rtol=1e-5,
            atol=1e-5,
            msg=f"{name} {i}",
        )


@torch.no_grad()
def test_visual_mask_counts_visual_features(family):
    name, model, inputs = family
    adapter = adapter_for(model)
    mask = adapter.forward(inputs).visual_mask
    assert mask.dtype == torch.bool and mask.shape == inputs["input_ids"].shape
    assert int(mask.sum()) == adapter.count_visual_features(inputs) > 0
    text_ids = inputs["input_ids"][~mask]
    assert not torch.isin(text_ids, torch.tensor(adapter.visual_token_ids())).any()


def test_exposes_embeddings_and_head(family):
    _, model, _ = family
    adapter = adapter_for(model)
    assert adapter.input_embeddings().weight.shape == (adapter.vocab_size, adapter.hidden_size)
    assert adapter.lm_head().weight.shape == (adapter.vocab_size, adapter.hidden_size)
    assert len(adapter.decoder_layers()) == adapter.num_layers


def test_bad_layer_ids_refused(family):
    _, model, inputs = family
    adapter = adapter_for(model)
    with pytest.raises(TargetMismatchError, match=str(adapter.num_layers + 3)):
        adapter.forward(inputs, layer_ids=[1, adapter.num_layers + 3])


def test_unknown_family_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=1,
        )
    )
    with pytest.raises(TargetMismatchError, match="llama"):
        adapter_for(model)


@torch.no_grad()
def test_logits_from_hidden_equal_the_models_logits(family):
    """Training computes teacher logits at answer positions only, from the final normed state."""
    name, model, inputs = family
    adapter = adapter_for(model)
    out = adapter.forward(inputs, layer_ids=[adapter.num_layers])
    got = adapter.logits_from_hidden(out.hidden_states[adapter.num_layers][:, 2:5])
    torch.testing.assert_close(got, out.logits[:, 2:5], rtol=1e-6, atol=1e-6, msg=name)
    kept = adapter.forward(inputs, layer_ids=[adapter.num_layers], logits_to_keep=1)
    assert kept.logits.shape[1] == 1  # the family honours logits_to_keep


GRIDS = {  # the fixtures' visual blocks, in sequence order (None: runs are square images)
    "llava_next": [(4, 4), (8, 9)],  # base view, then 2x2 tiles of 4x4 + a newline column
    "llava_onevision": [(4, 4), (8, 9)] + [(2, 2)] * 4 + [(1, 1)],  # + 4 pooled frames, newline
    "qwen2_vl": [(2, 2)] + [(2, 2)] * 2,  # 4x4 patches merged 2x2; the video's 2 time steps
    "qwen2_5_vl": [(2, 2)] + [(2, 2)] * 2,
}


def test_visual_grids_tile_the_visual_tokens(family):
    from covspec.modeling.drafter_inputs import block_spans, image_runs

    name, model, inputs = family
    adapter = adapter_for(model)
    grids = adapter.visual_grids(inputs)
    mask = adapter.visual_mask(inputs["input_ids"])
    assert grids is None if name not in GRIDS else grids == [GRIDS[name]]
    spans = block_spans(image_runs(mask[0]), None if grids is None else grids[0])
    covered = sorted(p for s, _ in spans for p in range(s.start, s.stop))
    assert covered == mask[0].nonzero()[:, 0].tolist()  # every visual position, once
    if grids is not None:
        with pytest.raises(ValueError, match="visual"):
            block_spans(image_runs(mask[0]), grids[0][:-1])


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("size", [(32, 32), (20, 32), (32, 12), (16, 31)])
def test_anyres_grid_matches_hf_packing(name, size):
    """Where HF's pack_image_features puts the newline rows: every (cols + 1)-th position of
    the tile block, after side x side base positions, for unpadded non-square images too."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from tests.tiny_vlms import FAMILIES

    torch.manual_seed(0)
    model = FAMILIES[name]()[0].eval()
    adapter = adapter_for(model)
    vc, d = model.config.vision_config, model.config.text_config.hidden_size
    side = vc.image_size // vc.patch_size
    crops = image_size_to_num_patches(size, model.config.image_grid_pinpoints, vc.image_size)
    feats = [torch.zeros(crops, side * side, d)]
    marker = torch.ones(d)
    if name == "llava_next":
        packed, _ = model.model.pack_image_features(feats, torch.tensor([size]), "default", marker)
    else:
        packed, _ = model.model.pack_image_features(feats, torch.tensor([size]), marker)
    newline = packed[0][:, 0].eq(1).nonzero()[:, 0].tolist()
    (base, (rows, cols)) = adapter._anyres_blocks(size)
    assert base == (side, side) and packed[0].shape[0] == side * side + rows * cols
    assert newline == [side * side + r * cols + cols - 1 for r in range(rows)]


@torch.no_grad()
def test_onevision_multi_image_samples_are_base_views_back_to_back():
    """HF tiles an image only when it is alone in its sample; two images adjacent in one run
    are each a base view and a newline token, and the model's own forward agrees."""
    from covspec.modeling.drafter_inputs import block_spans, image_runs
    from tests.tiny_vlms import IMAGE, _ids, _text, llava_onevision

    torch.manual_seed(0)
    model = llava_onevision()[0].eval()
    adapter = adapter_for(model)
    inputs = {
        "input_ids": _ids(_text(2), [IMAGE] * 17, [IMAGE] * 17, _text(3, 1)),
        "pixel_values": torch.randn(2, 5, 3, 16, 16),
        "image_sizes": torch.tensor([[32, 32], [32, 32]]),
        "batch_num_images": torch.tensor([2]),
    }
    model(**inputs)  # HF accepts this layout: 17 tokens per image
    grids = adapter.visual_grids(inputs)
    assert grids == [[(4, 4), (1, 1), (4, 4), (1, 1)]]
    spans = block_spans(image_runs(adapter.visual_mask(inputs["input_ids"])[0]), grids[0])
    assert [s.stop - s.start for s, _ in spans] == [16, 1, 16, 1]
