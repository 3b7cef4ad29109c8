"""Lookup supervision of the toy video target: pointers from the ground truth, the loss equal to
the model's own attention, and a head that learns from it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from covspec.data.chat import encode_conversation, frames_as_images, pad_batch
from covspec.data.toy_video import Track, make_clip
from covspec.modeling.toy_vlm import build_config, build_processor, train_tokenizer
from covspec.training.toy_lookup import (
    LookupSupervision,
    capture_attention_input,
    lookup_loss,
)
from covspec.training.toy_target import _pointer_rows, lm_loss
from covspec.training.toy_video_target import ToyVideoTargetSettings, lookup_pointers
from tests.test_video_mode import MICRO_VIDEO


@pytest.fixture(scope="module")
def micro():
    tok = train_tokenizer(MICRO_VIDEO.corpus()[:400], MICRO_VIDEO.spec.vocab_size, 1024)
    processor = build_processor(tok, MICRO_VIDEO.spec)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(build_config(MICRO_VIDEO.spec, tok))
    model.set_attn_implementation("eager")  # so attentions can be read back
    return model, processor


def _encoded(processor, index: int, frames: int = 4, describe: float = 1.0):
    clip = make_clip(3, index, frames, describe_prob=describe, max_questions=3)
    enc = encode_conversation(processor, frames_as_images(clip["messages"], frames), clip["frames"])
    return enc, clip


def test_pointers_read_each_position_off_the_token_that_shows_the_object(micro):
    _, processor = micro
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    seen = 0
    for index in range(12):
        for describe in (0.0, 1.0):  # event questions, then captions
            enc, clip = _encoded(processor, index, describe=describe)
            tracks = [Track(**t) for t in clip["tracks"]]
            ids = enc["input_ids"][0]
            visual = (ids == image_id).nonzero()[:, 0].tolist()
            for query, key in lookup_pointers(processor, enc, tracks, 4):
                said = processor.tokenizer.decode(ids[query + 1 : query + 8])  # the position
                frame, cell = divmod(visual.index(key), 9)
                shown = [t.at(frame, 4, 72) for t in tracks]
                assert any(
                    o is not None and o.cell == cell and said.lstrip().startswith(o.position)
                    for o in shown
                )
                assert processor.tokenizer.decode(ids[query - 2 : query + 1]).endswith("the")
                assert enc["loss_mask"][0, query + 1]  # an answer token is what it predicts
                seen += 1
    assert seen > 30
    with pytest.raises(ValueError, match="3x3 cells"):
        lookup_pointers(processor, enc, tracks, 3)  # 36 tokens are not 3 square grids


def test_lookup_loss_is_the_heads_own_attention(micro):
    model, processor = micro
    encs = [_encoded(processor, i)[0] for i in range(3)]
    clips = [make_clip(3, i, 4, describe_prob=1.0, max_questions=3) for i in range(3)]
    for enc, clip in zip(encs, clips, strict=True):
        enc["pointers"] = lookup_pointers(processor, enc, [Track(**t) for t in clip["tracks"]], 4)
    pointers = _pointer_rows(encs)
    batch = pad_batch(encs, processor.tokenizer.pad_token_id)
    sup = LookupSupervision(layer=1, head=1)
    with capture_attention_input(model, sup.layer) as seen, torch.no_grad():
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")},
                    output_attentions=True)  # fmt: skip
        ours = lookup_loss(model, sup, seen, pointers, batch["attention_mask"])
    b, q, k = pointers.unbind(-1)
    reference = -out.attentions[1][b, 1, q, k].log().mean()
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="head 5"):
        lookup_loss(model, LookupSupervision(1, 5), seen, pointers, batch["attention_mask"])
    with pytest.raises(ValueError, match="layer 7"), capture_attention_input(model, 7):
        pass


def test_supervised_head_learns_to_look_and_unsupervised_loss_is_unchanged(micro):
    model, processor = micro
    encs = []
    for i in range(4):
        enc, clip = _encoded(processor, i)
        enc["pointers"] = lookup_pointers(processor, enc, [Track(**t) for t in clip["tracks"]], 4)
        encs.append(enc)
    pointers = _pointer_rows(encs)
    batch = pad_batch(encs, processor.tokenizer.pad_token_id)
    sup = LookupSupervision(layer=1, head=0, weight=1.0)

    def attention_to_keys() -> float:
        with capture_attention_input(model, 1) as seen, torch.no_grad():
            lm_loss(model, batch)
            return lookup_loss(model, sup, seen, pointers, batch["attention_mask"]).item()

    torch.manual_seed(0)
    with torch.no_grad():
        plain = lm_loss(model, batch)
        assert lm_loss(model, batch, None, pointers) == plain  # no supervision: the LM loss
        assert lm_loss(model, batch, sup, pointers[:0]) == plain  # no pointers: the LM loss
    before = attention_to_keys()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        opt.zero_grad()
        lm_loss(model, batch, sup, pointers).backward()
        opt.step()
    assert attention_to_keys() < 0.5 * before


def test_lookup_settings_are_checked():
    with pytest.raises(ValueError, match="lookup_layer"):
        ToyVideoTargetSettings(lookup_layer=8)
    with pytest.raises(ValueError, match="lookup_weight"):
        ToyVideoTargetSettings(lookup_weight=-1.0)
    assert ToyVideoTargetSettings(lookup_weight=0.0).lookup() is None
    with pytest.raises(ValueError, match=">= 0"):
        LookupSupervision(layer=-1)
