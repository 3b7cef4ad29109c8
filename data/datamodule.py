"""LightningDataModule over conversations: the toy world or LLaVA-style jsonl, via the target's processor.

    >>> dm = ConversationDataModule(target="checkpoints/toy-target", train_data="toy:20000")
    >>> dm = ConversationDataModule(target="llava-hf/llava-1.5-7b-hf", train_data="mix665k.jsonl",
    ...                             image_root="/data/coco")
    >>> dm.setup("fit"); batch = next(iter(dm.train_dataloader()))
    >>> batch["input_ids"].shape, batch["loss_mask"].shape     # (B, T) each, right-padded

A data spec is `toy:N[:SEED]` (N toy-world conversations; `toypara:` for the paraphrase world) or a path to a jsonl;
`val_data: holdout:N` holds N training conversations out for validation instead. Batches
carry input_ids, attention_mask, loss_mask (assistant tokens), the processor's vision tensors and
`overlong` = (rows truncated, rows skipped) for the model to log.

Rows are checked when read (image tags against images, empty turns: file:line named), images
verified once, in `prepare_data` (local rank 0 of each node), never on every rank.
Conversations longer than `max_length` (default: the target's context) are cut after their last
visual token (`length_policy: truncate`; one that cannot be cut so is skipped) or skipped
(`length_policy: skip`). Both are counted and logged, never a crash hours into a run. The train
loader is resumable mid-epoch (data/resumable.py): a killed run continues with the same batches.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoProcessor

from covspec.data.chat import (
    ConversationError,
    encode_conversation,
    frames_as_images,
    pad_batch,
    truncate_encoding,
)
from covspec.data.readers import read_conversations_jsonl, toy_dataset
from covspec.data.resumable import ResumableLoader, ResumableSampler
from covspec.data.toy_video import LENGTH_SPREADS, ToyVideoClips
from covspec.modeling.identity import resolve_source


def load_conversations(
    spec: str, image_root: str | None = None, default_seed: int = 0, verify_images: bool = True
):
    """`toy:N[:SEED]`, `toypara:N[:SEED]` (the paraphrase world's conversations),
    `toyvideo:N[:SEED[:MIN-MAX[:log]]]` (N clips of MIN..MAX frames, default 2-16, uniform or
    log-uniform, drawn on access) or a jsonl path -> a dataset in the conversation schema."""
    if spec.startswith("toyvideo:"):
        parts = spec.split(":")
        try:
            num = int(parts[1])
            seed = int(parts[2]) if len(parts) > 2 else default_seed
            lo, hi = (int(x) for x in parts[3].split("-")) if len(parts) > 3 else (2, 16)
            spread = parts[4] if len(parts) > 4 else "uniform"
            if len(parts) > 5 or spread not in LENGTH_SPREADS:
                raise ValueError
        except (IndexError, ValueError) as e:
            raise ValueError(
                f"toy video data spec must be 'toyvideo:N[:SEED[:MIN-MAX[:log]]]', got {spec!r}"
            ) from e
        return ToyVideoClips(num, seed, lo, hi, spread=spread)
    if spec.startswith(("toy:", "toypara:")):
        parts = spec.split(":")
        try:
            num = int(parts[1])
            seed = int(parts[2]) if len(parts) > 2 else default_seed
            if len(parts) > 3:
                raise ValueError
        except (IndexError, ValueError) as e:
            raise ValueError(
                f"toy data spec must be '{parts[0]}:N' or '{parts[0]}:N:SEED', got {spec!r}"
            ) from e
        return toy_dataset(num, seed, paraphrase=parts[0] == "toypara")
    if not Path(spec).is_file():
        raise FileNotFoundError(f"data file not found: {spec}")
    return read_conversations_jsonl(spec, image_root=image_root, verify_images=verify_images)


def holdout(rows, spec: str, seed: int):
    """`holdout:N`: N conversations of the training data, drawn by `seed`, become the
    validation set and leave the training set (a corpus that ships no validation split)."""
    try:
        num = int(spec.removeprefix("holdout:"))
    except ValueError:
        raise ValueError(f"holdout spec must be 'holdout:N', got {spec!r}") from None
    if not 0 < num < len(rows):
        raise ValueError(f"{spec}: must hold out between 1 and {len(rows) - 1} of {len(rows)} rows")
    if not hasattr(rows, "select"):
        raise ValueError(f"{spec} needs a jsonl or toy image dataset, not {type(rows).__name__}")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    val, train = sorted(order[:num]), sorted(order[num:])
    return rows.select(train), rows.select(val)


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


LENGTH_POLICIES = ("truncate", "skip")


class Collator:
    """Encodes rows through the processor's chat template; picklable for worker processes.

    A conversation over `max_length` tokens is cut after its last visual token (`truncate`,
    when something of its answer remains) or skipped (`skip`, or when it cannot be cut). A
    batch whose every row was skipped comes out empty (batch size 0), never as an error."""

    def __init__(self, processor, max_length: int | None, length_policy: str = "truncate") -> None:
        if length_policy not in LENGTH_POLICIES:
            raise ValueError(
                f"length_policy must be one of {LENGTH_POLICIES}, got {length_policy!r}"
            )
        self.processor = processor
        self.max_length = max_length
        self.length_policy = length_policy
        self.visual_ids = visual_placeholder_ids(processor)

    def _encode(self, row: dict) -> dict:
        images = [row["image"]] if row.get("image") is not None else None
        messages = row["messages"]
        if row.get("video") is not None:
            if getattr(self.processor, "video_processor", None) is not None:
                raise ConversationError(
                    f"row {row.get('id')!r}: training on video through a video processor is not "
                    "supported; this target's processor would need frames as images"
                )
            images, messages = list(row["video"]), frames_as_images(messages, len(row["video"]))
        try:
            return encode_conversation(self.processor, messages, images)
        except Exception as e:  # name the row: the reader cannot see what the processor refuses
            raise ConversationError(f"row {row.get('id')!r}: {e}") from e

    def __call__(self, rows: list[dict]) -> dict:
        encs, truncated, skipped = [], 0, 0
        for r in rows:
            enc = self._encode(r)
            if self.max_length is not None and enc["input_ids"].shape[1] > self.max_length:
                cut = None
                if self.length_policy == "truncate":
                    cut = truncate_encoding(enc, self.max_length, self.visual_ids)
                if cut is None:
                    skipped += 1
                    continue
                truncated += 1
                enc = cut
            encs.append(enc)
        if encs:
            batch = pad_batch(encs, self.processor.tokenizer.pad_token_id)
        else:
            empty = torch.zeros(0, 0, dtype=torch.long)
            batch = {"input_ids": empty, "attention_mask": empty, "loss_mask": empty.bool()}
        batch["overlong"] = torch.tensor([truncated, skipped])
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
        length_policy: str = "truncate",
        seed: int = 0,
        group_by_length: bool = False,
    ) -> None:
        """max_length: tokens per conversation, None for the target's context length;
        length_policy: `truncate` or `skip` a longer conversation (both counted and logged);
        seed: of toy streams without one and of the shuffled order (per epoch);
        group_by_length: training batches of clips of like lengths (a dataset with `lengths`,
        e.g. `toyvideo:` clips of mixed lengths), so a short clip is not padded to a long one."""
        super().__init__()
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or null, got {max_length}")
        if length_policy not in LENGTH_POLICIES:
            raise ValueError(
                f"length_policy must be one of {LENGTH_POLICIES}, got {length_policy!r}"
            )
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.processor = None
        self.max_length = max_length
        self.train_set = self.val_set = None

    def prepare_data(self) -> None:
        """Local rank 0 only: read every data file once with image verification, so a missing
        or corrupt image fails here naming file:line, before any rank starts training."""
        for spec in (self.hparams.train_data, self.hparams.val_data):
            if spec and not spec.startswith(("toy:", "toypara:", "toyvideo:", "holdout:")):
                load_conversations(spec, self.hparams.image_root, verify_images=True)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.processor is None:
            target = resolve_source(hp.target, "target")  # a missing folder never hits the Hub
            self.processor = AutoProcessor.from_pretrained(target)
            if self.max_length is None:
                text = AutoConfig.from_pretrained(target).get_text_config()
                self.max_length = getattr(text, "max_position_embeddings", None)
        # images were verified in prepare_data; every rank reads the rows only
        held = str(hp.val_data or "").startswith("holdout:")
        if (self.train_set is None and stage in (None, "fit")) or (held and self.val_set is None):
            rows = load_conversations(hp.train_data, hp.image_root, hp.seed, False)
            self.train_set, self.val_set = (
                holdout(rows, hp.val_data, hp.seed) if held else (rows, self.val_set)
            )
        if self.val_set is None and hp.val_data and stage in (None, "fit", "validate"):
            self.val_set = load_conversations(hp.val_data, hp.image_root, hp.seed + 1, False)

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            collate_fn=Collator(self.processor, self.max_length, self.hparams.length_policy),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def _trained_batches(self) -> int:
        """Batches of the current epoch that training consumed (what a checkpoint covers)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled by (seed, epoch), resumable mid-epoch (data/resumable.py); under DDP each
        rank takes its own share, so Lightning keeps this sampler."""
        trainer, hp = self.trainer, self.hparams
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        return ResumableLoader(
            self.train_set,
            sampler=ResumableSampler(
                self.train_set,
                True,
                hp.seed,
                replicas,
                rank,
                group_batch=hp.batch_size if hp.group_by_length else None,
            ),  # fmt: skip
            progress=self._trained_batches if trainer else None,
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            collate_fn=Collator(self.processor, self.max_length, hp.length_policy),
            persistent_workers=hp.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(
            self.val_set, self.hparams.val_batch_size or self.hparams.batch_size, shuffle=False
        )
