"""Every message's size formula equals the length of the bytes it serialises to."""

import pytest
import torch

from covspec.inference.messages import (
    HEADER_BYTES,
    Correction,
    DraftUpload,
    FeatureDownlink,
    FeaturePayload,
    HiddenRequest,
    HiddenUpload,
    MismatchNack,
    ProgressiveUpload,
    PromptUpload,
    TokenStream,
    VerifyResult,
    id_bytes,
)

PLAIN = FeaturePayload(values=torch.randn(5, 48).to(torch.float16))
BF16 = FeaturePayload(values=torch.randn(3, 48).to(torch.bfloat16))
CODEC = FeaturePayload(
    codes=torch.randint(-127, 128, (5, 8), dtype=torch.int8),
    scales=torch.rand(5).to(torch.float16),
)
TREE = DraftUpload(tokens=torch.tensor([5, 9, 700, 3]), parents=torch.tensor([-1, 0, 0, 2]))

MESSAGES = {
    "prompt": PromptUpload(image_bytes=1234, prompt="Describe the image, é."),
    "downlink": FeatureDownlink(torch.tensor([1, 2, 3, 4, 5]), PLAIN, first_token=7),
    "downlink-codec": FeatureDownlink(torch.tensor([1, 2, 3, 4, 5]), CODEC, first_token=7),
    "downlink-visual": FeatureDownlink(torch.tensor([1, 2, 3]), BF16, 7, visual=BF16),
    "downlink-text-only": FeatureDownlink(torch.tensor([1, 2]), FeaturePayload(), 7),
    "chain": DraftUpload(tokens=torch.tensor([5, 9, 700]), parents=torch.arange(-1, 2), chain=True),
    "tree": TREE,
    "tree-sampling": DraftUpload(
        tokens=torch.tensor([5, 9]),
        parents=torch.tensor([-1, -1]),
        prob_nodes=torch.tensor([0]),
        draft_probs=torch.rand(1, 640),
    ),
    "verdict-chain": VerifyResult(torch.tensor([0, 1]), 42, PLAIN, chain=True, drafted=3),
    "verdict-tree": VerifyResult(torch.tensor([1, 3]), 42, CODEC, drafted=4),
    "correction": Correction(torch.tensor([], dtype=torch.long), 42, FeaturePayload(), chunk=2),
    "progressive": ProgressiveUpload(torch.tensor([5, 9, 11]), [(1, 300), (2, 12)]),
    "nack": MismatchNack(depth=2, token=300),
    "token": TokenStream(token=70_000),
    "hidden-request": HiddenRequest(node=255),
    "hidden-upload": HiddenUpload(torch.randn(2, 48).to(torch.float16)),
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
@pytest.mark.parametrize("vocab", [640, 32_000, 152_064])
def test_size_formula_equals_serialised_bytes(name, vocab):
    message = MESSAGES[name]
    if name == "token" and vocab <= 65_536:
        message = TokenStream(token=vocab - 1)
    assert len(message.serialise(vocab)) == message.nbytes(vocab)


def test_every_message_class_is_sized_above():
    import covspec.inference.messages as m

    sized = {type(x) for x in MESSAGES.values()}
    assert set(m.Message.__args__) <= sized  # a new message type needs its size test
    with pytest.raises(ValueError, match="node index 256"):
        HiddenRequest(node=256)


def test_sizes_follow_their_parts():
    assert id_bytes(256) == 1 and id_bytes(640) == 2 and id_bytes(65_536) == 2
    assert id_bytes(65_537) == 4
    # feature rows dominate the verdict: 5 rows x 48 x 2 bytes, + count, 2 ids, bonus, header
    assert MESSAGES["verdict-chain"].nbytes(640) == HEADER_BYTES + 1 + 2 + 5 * 48 * 2
    # a codec sends r int8 + a float16 scale per row
    assert CODEC.nbytes() == 5 * (8 + 2)
    # a tree carries one parent index per node, a chain none
    assert TREE.nbytes(640) - HEADER_BYTES == 4 * 2 + 4 * 1
    assert MESSAGES["chain"].nbytes(640) - HEADER_BYTES == 3 * 2
