import pytest

from covspec.data.chat import ConversationError, encode_conversation, pad_batch
from covspec.data.toy_world import corpus_text, make_sample
from covspec.modeling.toy_vlm import ToyVLMSpec, build_processor, train_tokenizer


@pytest.fixture(scope="module")
def processor():
    return build_processor(train_tokenizer(corpus_text(0, 300), 400), ToyVLMSpec())


def test_loss_mask_covers_exactly_the_answers(processor):
    for i in range(20):
        s = make_sample(0, i)
        enc = encode_conversation(processor, s["messages"], [s["image"]])
        ids, mask = enc["input_ids"][0], enc["loss_mask"][0]
        answers = [m["content"] for m in s["messages"] if m["role"] == "assistant"]
        tok = processor.tokenizer
        assert tok.decode(ids[mask]) == "".join(a + "<|im_end|>\n" for a in answers)
        assert (
            int((ids == tok.convert_tokens_to_ids("<image>")).sum())
            == ToyVLMSpec().num_image_tokens
        )


def test_unknown_text_has_no_unknown_tokens(processor):
    text = "Ünïcødé 🙂 zebra 42"
    ids = processor.tokenizer(text)["input_ids"]
    assert processor.tokenizer.decode(ids) == text


def test_pad_batch(processor):
    encs = [
        encode_conversation(processor, make_sample(0, i)["messages"], [make_sample(0, i)["image"]])
        for i in range(3)
    ]
    batch = pad_batch(encs, processor.tokenizer.pad_token_id)
    longest = max(e["input_ids"].shape[1] for e in encs)
    assert batch["input_ids"].shape == (3, longest) == batch["loss_mask"].shape
    assert batch["pixel_values"].shape[0] == 3
    assert batch["attention_mask"].sum() == sum(e["input_ids"].shape[1] for e in encs)


def test_bad_conversations_refused(processor):
    with pytest.raises(ConversationError, match="empty"):
        encode_conversation(processor, [])
    with pytest.raises(ConversationError, match="role"):
        encode_conversation(processor, [{"role": "bot", "content": "x"}])
