"""A training loader that a killed run resumes exactly where its last checkpoint was taken.

    >>> sampler = ResumableSampler(dataset, shuffle=True, seed=0)   # order = f(seed, epoch)
    >>> sampler = ResumableSampler(clips, True, 0, group_batch=16)  # batches of like lengths
    >>> loader = ResumableLoader(dataset, sampler=sampler, batch_size=16, progress=trained)
    >>> state = loader.state_dict()       # Lightning stores it in every checkpoint
    >>> loader.load_state_dict(state)     # on resume: skip the batches already trained on

Lightning checkpoints any train loader with `state_dict` / `load_state_dict` (its `_Stateful`
protocol) and, on resume, expects it to yield only the rest of the epoch. The sampler is a
`DistributedSampler` (one replica on a single device), so its order depends on the seed and the
epoch alone, Lightning calls its `set_epoch` and leaves it in place under DDP; skipping happens
on indices, before any image is loaded or collated. How far the epoch got is what the trainer
counts as trained (`progress`), not what the loader has prefetched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers.trainer_pt_utils import get_length_grouped_indices


class ResumableSampler(DistributedSampler):
    """A shuffled (or ordered) sampler whose next iteration can start `skip` indices in.

    group_batch: batch size of a length-grouped order (transformers' `group_by_length`: shuffled,
    then sorted by the dataset's `lengths` within mega-batches of 50 batches), so that a batch
    of mixed-length video clips is not padded to its longest clip; each rank takes every
    `num_replicas`-th index of that order, so its batches stay grouped too."""

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        group_batch: int | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0  # indices of this rank to leave out of the next iteration only
        self.lengths = None
        if group_batch is not None:
            self.lengths = getattr(dataset, "lengths", None)
            if self.lengths is None or not shuffle:
                raise ValueError(
                    f"group_batch={group_batch} needs a shuffled dataset with per-row `lengths`, "
                    f"got {type(dataset).__name__} (shuffle={shuffle})"
                )
            self.group_batch = group_batch * num_replicas  # one global batch per group

    def _grouped(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = get_length_grouped_indices(self.lengths, self.group_batch, generator=g)
        order += order[: self.total_size - len(order)]  # even shares, as DistributedSampler
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        indices = self._grouped() if self.lengths is not None else list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """A DataLoader over a ResumableSampler that saves and restores its place in the epoch.

    progress: returns the batches of the current epoch that training has consumed (the
    trainer's count); without it, the batches this loader yielded are counted."""

    def __init__(
        self, dataset: Dataset, *, progress: Callable[[], int] | None = None, **kwargs
    ) -> None:
        super().__init__(dataset, **kwargs)
        # Lightning may rebuild the loader with a sampler of its own (`overfit_batches`):
        # then it is an ordinary loader whose state is empty
        self.resumable = isinstance(self.sampler, ResumableSampler)
        self.progress = progress
        self._yielded = 0

    def __iter__(self):
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if not self.resumable:
            return {}
        done = self.progress() if self.progress is not None else self._yielded
        return {"epoch": self.sampler.epoch, "batches": int(done), "seed": self.sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not self.resumable or not state:
            return
        if state.get("seed", self.sampler.seed) != self.sampler.seed:
            raise ValueError(
                f"checkpoint's data order used seed {state['seed']}, this run {self.sampler.seed}"
            )
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # saved at the end of an epoch: the next one starts whole
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = batches * self.batch_size
