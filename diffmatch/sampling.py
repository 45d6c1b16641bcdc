"""The random streams of the training sets: one per sample and epoch, the same in any DataLoader worker.

A training set's key ``epoch * len(dataset) + index`` names sample ``index`` as drawn in ``epoch``;
``EpochSampler`` hands out such keys, and ``sample_rng`` is the stream a key's sample draws from.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import DistributedSampler


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample: the same in any worker process."""
    return np.random.default_rng([seed, epoch, index])


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` whose keys carry the epoch, ``epoch * len(dataset) + index``: the training
    sets draw new augmentations every epoch, also in DataLoader workers that live across epochs."""

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * len(self.dataset)
        return (offset + index for index in super().__iter__())
