"""LightningDataModule over conversations: the toy world or LLaVA-style jsonl, via the target's processor.

    >>> dm = ConversationDataModule(target="checkpoints/toy-target", train_data="toy:20000")
    >>> dm = ConversationDataModule(target="llava-hf/llava-1.5-7b-hf", train_data="mix665k.jsonl",
    ...                             image_root="/data/coco")
    >>> dm.setup("fit"); batch = next(iter(dm.train_dataloader()))
    >>> batch["input_ids"].shape, batch["loss_mask"].shape     # (B, T) each, right-padded

A data spec is either `toy:N[:SEED]` (N toy-world conversations) or a path to a jsonl. Batches
carry input_ids, attention_mask, loss_mask (assistant tokens) and the processor's vision tensors.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader
from transformers import AutoProcessor

from covspec.data.chat import encode_conversation, pad_batch
from covspec.data.readers import read_conversations_jsonl, toy_dataset


def load_conversations(spec: str, image_root: str | None = None, default_seed: int = 0):
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
    return read_conversations_jsonl(spec, image_root=image_root)


class Collator:
    """Encodes rows through the processor's chat template; picklable for worker processes."""

    def __init__(self, processor, max_length: int | None) -> None:
        self.processor = processor
        self.max_length = max_length

    def __call__(self, rows: list[dict]) -> dict:
        encs = [
            encode_conversation(
                self.processor,
                r["messages"],
                [r["image"]] if r.get("image") is not None else None,
                self.max_length,
            )
            for r in rows
        ]
        return pad_batch(encs, self.processor.tokenizer.pad_token_id)


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
        super().__init__()
        self.save_hyperparameters()
        self.processor = None
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.processor is None:
            self.processor = AutoProcessor.from_pretrained(self.hparams.target)
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = load_conversations(
                self.hparams.train_data, self.hparams.image_root, self.hparams.seed
            )
        if self.val_set is None and self.hparams.val_data and stage in (None, "fit", "validate"):
            self.val_set = load_conversations(
                self.hparams.val_data, self.hparams.image_root, self.hparams.seed + 1
            )

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            collate_fn=Collator(self.processor, self.hparams.max_length),
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
