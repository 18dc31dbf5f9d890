"""A resumable, world-size-agnostic distributed sampler.

Each epoch has one global permutation (seeded by ``seed + epoch``). The position in the epoch is the
number of *global* samples already consumed, so a run can resume mid-epoch, even on another
world size: rank ``r`` of ``W`` reads ``perm[start + r :: W]``. Only whole global batches are
used (the remainder of an epoch is dropped, as with ``drop_last``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Yield this rank's sample indices of the current epoch, from the current position on."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"dataset has {num_samples} samples, fewer than one global batch "
                f"({batch_size} x {world_size} ranks)"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    @property
    def global_batch(self) -> int:
        """Samples consumed by one step of all ranks together."""
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Whole global batches in one epoch."""
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Move to ``epoch``, skipping its first ``start`` global samples (whole global batches)."""
        if start % self.global_batch:
            raise ValueError(
                f"start {start} is not a multiple of the global batch {self.global_batch}"
            )
        self.epoch = epoch
        self.start = start

    def _permutation(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[int]:
        end = self.batches_per_epoch * self.global_batch
        return iter(self._permutation()[self.start + self.rank : end : self.world_size].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch * self.global_batch - self.start) // self.world_size
