"""LightningDataModule over conversations: the toy world or LLaVA-style jsonl, via the target's processor.

    >>> dm = ConversationDataModule(target="checkpoints/toy-target", train_data="toy:20000")
    >>> dm = ConversationDataModule(target="llava-hf/llava-1.5-7b-hf", train_data="mix665k.jsonl",
    ...                             image_root="/data/coco")
    >>> dm.setup("fit"); batch = next(iter(dm.train_dataloader()))
    >>> batch["input_ids"].shape, batch["loss_mask"].shape     # (B, T) each, right-padded

A data spec is either `toy:N[:SEED]` (N toy-world conversations) or a path to a jsonl. Batches
carry input_ids, attention_mask, loss_mask (assistant tokens), the processor's vision tensors and
`overlong` = (rows truncated, rows skipped) for the model to log.

Images are verified once, in `prepare_data` (local rank 0 of each node), never on every rank.
Conversations longer than `max_length` (default: the target's context) are cut after their last
visual token; one that cannot be cut so (its images sit past the limit, or nothing of its answer
would remain) is skipped. Both are counted, never a crash hours into a run.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoProcessor

from covspec.data.chat import encode_conversation, pad_batch, truncate_encoding
from covspec.data.readers import read_conversations_jsonl, toy_dataset


def load_conversations(
    spec: str, image_root: str | None = None, default_seed: int = 0, verify_images: bool = True
):
    """`toy:N[:SEED]` or a jsonl path -> datasets.Dataset in the conversation schema."""
    if spec.startswith("toy:"):
        parts = spec.split(":")
        try:
            num = int(parts[1])
            seed = int(parts[2]) if len(parts) > 2 else default_seed
        except (IndexError, ValueError) as e:
            raise ValueError(f"toy data spec must be 'toy:N' or 'toy:N:SEED', got {spec!r}") from e
        return toy_dataset(num, seed)
    if not Path(spec).is_file():
        raise FileNotFoundError(f"data file not found: {spec}")
    return read_conversations_jsonl(spec, image_root=image_root, verify_images=verify_images)


def visual_placeholder_ids(processor) -> list[int]:
    """Token ids of the processor's image / video placeholders (LLaVA, Qwen, Idefics, ...)."""
    ids = []
    for name in ("image", "video"):
        value = getattr(processor, f"{name}_token_id", None)
        token = getattr(processor, f"{name}_token", None)
        if value is None and isinstance(token, str):
            value = processor.tokenizer.convert_tokens_to_ids(token)
        if isinstance(value, int) and value >= 0:
            ids.append(value)
    return ids


class Collator:
    """Encodes rows through the processor's chat template; picklable for worker processes."""

    def __init__(self, processor, max_length: int | None) -> None:
        self.processor = processor
        self.max_length = max_length
        self.visual_ids = visual_placeholder_ids(processor)

    def __call__(self, rows: list[dict]) -> dict:
        encs, truncated, skipped = [], 0, []
        for r in rows:
            enc = encode_conversation(
                self.processor, r["messages"], [r["image"]] if r.get("image") is not None else None
            )
            if self.max_length is not None:
                cut = truncate_encoding(enc, self.max_length, self.visual_ids)
                if cut is None:
                    skipped.append(r.get("id"))
                    continue
                truncated += cut is not enc
                enc = cut
            encs.append(enc)
        if not encs:
            raise ValueError(
                f"every conversation of a batch is over max_length={self.max_length} with its "
                f"images or answers past the limit: {skipped}; raise max_length or filter the data"
            )
        batch = pad_batch(encs, self.processor.tokenizer.pad_token_id)
        batch["overlong"] = torch.tensor([truncated, len(skipped)])
        return batch


class ConversationDataModule(L.LightningDataModule):
    def __init__(
        self,
        target: str,
        train_data: str = "toy:20000",
        val_data: str | None = "toy:200:777",
        image_root: str | None = None,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        max_length: int | None = None,
        seed: int = 0,
    ) -> None:
        """max_length: tokens per conversation, None for the target's context length."""
        super().__init__()
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or null, got {max_length}")
        self.save_hyperparameters()
        self.processor = None
        self.max_length = max_length
        self.train_set = self.val_set = None

    def prepare_data(self) -> None:
        """Local rank 0 only: read every data file once with image verification, so a missing
        or corrupt image fails here naming file:line, before any rank starts training."""
        for spec in (self.hparams.train_data, self.hparams.val_data):
            if spec and not spec.startswith("toy:"):
                load_conversations(spec, self.hparams.image_root, verify_images=True)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.processor is None:
            self.processor = AutoProcessor.from_pretrained(hp.target)
            if self.max_length is None:
                text = AutoConfig.from_pretrained(hp.target).get_text_config()
                self.max_length = getattr(text, "max_position_embeddings", None)
        # images were verified in prepare_data; every rank reads the rows only
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = load_conversations(hp.train_data, hp.image_root, hp.seed, False)
        if self.val_set is None and hp.val_data and stage in (None, "fit", "validate"):
            self.val_set = load_conversations(hp.val_data, hp.image_root, hp.seed + 1, False)

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            collate_fn=Collator(self.processor, self.max_length),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(
            self.val_set, self.hparams.val_batch_size or self.hparams.batch_size, shuffle=False
        )
