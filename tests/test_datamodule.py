"""The conversation data module: images verified once, over-long conversations cut or skipped."""

import pytest
import torch

from covspec.data import readers
from covspec.data.chat import truncate_encoding
from covspec.data.datamodule import Collator, ConversationDataModule
from covspec.data.readers import toy_dataset, write_toy_jsonl

IMAGE = 9


def _enc(ids, loss):
    ids = torch.tensor([ids])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "loss_mask": torch.tensor([loss], dtype=torch.bool),
        "pixel_values": torch.zeros(1, 3, 4, 4),
    }


def test_truncate_encoding_cuts_after_the_last_visual_token():
    enc = _enc([1, IMAGE, IMAGE, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 1, 1, 1])
    assert truncate_encoding(enc, 8, [IMAGE]) is enc  # fits: untouched
    cut = truncate_encoding(enc, 6, [IMAGE])
    assert cut["input_ids"].tolist() == [[1, IMAGE, IMAGE, 2, 3, 4]]
    assert cut["loss_mask"].tolist() == [[False] * 4 + [True] * 2]
    assert cut["attention_mask"].shape == (1, 6)
    assert cut["pixel_values"] is enc["pixel_values"]  # vision tensors are kept whole
    assert truncate_encoding(enc, 2, [IMAGE]) is None  # the image would be cut
    assert truncate_encoding(enc, 4, [IMAGE]) is None  # no answer token would remain


def test_collator_counts_truncated_and_skipped_rows(micro_target_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(micro_target_dir)
    rows = list(toy_dataset(3, seed=5))
    full = Collator(processor, None)(rows)
    assert full["overlong"].tolist() == [0, 0]
    lengths = full["attention_mask"].sum(1).tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    last_visual = int((full["input_ids"][0] == image_id).nonzero()[-1])
    limit = min(lengths) - 1  # every row is over the limit, its image still fits
    assert limit > last_visual + 1
    batch = Collator(processor, limit)(rows)
    assert batch["overlong"].tolist() == [3, 0] and batch["input_ids"].shape[1] == limit
    empty = Collator(processor, last_visual)(rows)  # images past the limit: all skipped
    assert empty["overlong"].tolist() == [0, 3] and empty["input_ids"].shape[0] == 0
    skipped = Collator(processor, limit, length_policy="skip")(rows)  # never cut, skipped
    assert skipped["overlong"].tolist() == [0, 3] and skipped["input_ids"].shape[0] == 0
    with pytest.raises(ValueError, match="length_policy"):
        Collator(processor, limit, length_policy="drop")


def test_images_are_verified_once_in_prepare_data(micro_target_dir, tmp_path, monkeypatch):
    data = write_toy_jsonl(tmp_path / "toy", num=3, seed=2)
    calls = []
    original = readers.check_image
    monkeypatch.setattr(readers, "check_image", lambda *a: calls.append(a) or original(*a))
    dm = ConversationDataModule(
        target=str(micro_target_dir), train_data=str(data), val_data=None, batch_size=2
    )
    dm.prepare_data()  # local rank 0 of each node
    assert len(calls) == 3
    dm.setup("fit")  # every rank
    assert len(calls) == 3 and len(dm.train_set) == 3
    assert dm.max_length is not None  # the target's context by default
    (tmp_path / "toy" / "images" / f"{dm.train_set[0]['id']}.png").unlink()
    with pytest.raises(readers.DataFileError, match="data.jsonl:1: image file not found"):
        ConversationDataModule(target=str(micro_target_dir), train_data=str(data)).prepare_data()


def test_bad_max_length_refused():
    with pytest.raises(ValueError, match="max_length"):
        ConversationDataModule(target="x", max_length=0)


def test_holdout_moves_rows_from_training_to_validation(micro_target_dir):
    dm = ConversationDataModule(
        target=str(micro_target_dir), train_data="toy:20:3", val_data="holdout:5", batch_size=4
    )
    dm.prepare_data()
    dm.setup("fit")
    train, val = [r["id"] for r in dm.train_set], [r["id"] for r in dm.val_set]
    assert len(train) == 15 and len(val) == 5 and not set(train) & set(val)
    again = ConversationDataModule(
        target=str(micro_target_dir), train_data="toy:20:3", val_data="holdout:5", batch_size=4
    )
    again.setup("validate")  # the same rows, whichever stage asks first
    assert [r["id"] for r in again.val_set] == val
    for bad in ("holdout:0", "holdout:20", "holdout:x"):
        with pytest.raises(ValueError, match="holdout"):
            ConversationDataModule(
                target=str(micro_target_dir), train_data="toy:20:3", val_data=bad
            ).setup("fit")
