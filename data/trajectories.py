"""Acceptance-head trajectories as a LightningDataModule (parquet shards from collection).

    >>> dm = TrajectoryDataModule("checkpoints/trajectories/toy-text-only", val_fraction=0.2)
    >>> dm.setup("fit"); batch = next(iter(dm.train_dataloader()))
    >>> batch["target_hidden"].shape, batch["csi"].shape, batch["safe"].shape   # (B, Ht) (B, 3) (B,)

Rows come from `covspec collect-acceptance` (inference/trajectories.py): one per mismatch and
channel preset. The split is by sample, so validation conversations are unseen in training and
the calibration of thresholds (on validation) estimates the accuracy drop on new answers.
A shard missing a column fails naming the column and the file.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import lightning as L
import torch
from datasets import Dataset, concatenate_datasets, load_dataset
from torch.utils.data import DataLoader

REQUIRED = (
    "sample_id", "depth", "confidence", "target_hidden", "drafter_hidden", "safe",
    "lossless_correct", "preset", "csi", "round_cost_s",
)  # fmt: skip


class TrajectoryError(ValueError):
    """A trajectory folder that cannot be trained on; the message names the file or column."""


def load_trajectories(folder: str | Path) -> Dataset:
    folder = Path(folder)
    shards = sorted(folder.glob("shard-*.parquet"))
    if not shards:
        raise TrajectoryError(f"no shard-*.parquet in {folder}: run covspec collect-acceptance")
    parts = []
    for shard in shards:
        ds = load_dataset("parquet", data_files=str(shard), split="train")
        missing = [c for c in REQUIRED if c not in ds.column_names]
        if missing:
            raise TrajectoryError(f"{shard}: missing column(s) {missing}")
        parts.append(ds.select_columns(list(REQUIRED)))
    return concatenate_datasets(parts)


def split_by_sample(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Deterministic split on a hash of the sample id: a conversation is wholly in one side."""

    def is_val(row: dict) -> bool:
        return (zlib.crc32(f"{seed}/{row['sample_id']}".encode()) % 10_000) < val_fraction * 10_000

    val = ds.filter(is_val)
    train = ds.filter(lambda r: not is_val(r))
    return train, val


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    drafter = [r["drafter_hidden"] for r in rows]
    return {
        "target_hidden": torch.tensor([r["target_hidden"] for r in rows]),
        "drafter_hidden": torch.tensor(drafter) if drafter[0] else None,
        "confidence": torch.tensor([r["confidence"] for r in rows]),
        "csi": torch.tensor([r["csi"] for r in rows]),
        "safe": torch.tensor([r["safe"] for r in rows], dtype=torch.float32),
        "round_cost_s": torch.tensor([r["round_cost_s"] for r in rows]),
    }


class TrajectoryDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str,
        val_fraction: float = 0.2,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            ds = load_trajectories(self.hparams.data_dir)
            self.train_set, self.val_set = split_by_sample(
                ds, self.hparams.val_fraction, self.hparams.seed
            )
            if not len(self.train_set) or not len(self.val_set):
                raise TrajectoryError(
                    f"{self.hparams.data_dir}: {len(ds)} rows leave an empty split at "
                    f"val_fraction={self.hparams.val_fraction}; collect more samples"
                )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.hparams.batch_size, shuffle=True, collate_fn=collate
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, collate_fn=collate)
