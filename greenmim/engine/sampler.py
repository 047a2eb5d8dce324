"""A distributed sampler that can resume mid-epoch and seeds every sample's augmentation.

Exact resume needs two things a plain :class:`~torch.utils.data.DistributedSampler` does not give:

* **skip the samples already seen this epoch** without loading them: :meth:`ResumableDistributedSampler.set_start`;
* **augmentation that does not depend on worker count or position in the epoch**: with
  ``seeded=True`` the sampler yields ``(index, seed)`` pairs, and :class:`SeededDataset` runs the
  wrapped dataset's ``__getitem__`` under a private torch/python RNG seeded with ``seed``. The seed
  is a function of ``(base seed, epoch, index)`` only, so random crops and flips are the same
  whatever ``num_workers`` is and whether the run was resumed.
"""
from __future__ import annotations

import random
from typing import Iterator, Tuple, Union

import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch (a 63-bit mix of the three numbers)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(index) * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return (x ^ (x >> 32)) & (2**63 - 1)


class ResumableDistributedSampler(Sampler):
    """Shuffled, rank-sharded indices with resume-in-epoch support.

    Same partitioning as :class:`torch.utils.data.DistributedSampler` (permute with ``seed + epoch``,
    pad or drop to a multiple of ``num_replicas``, then take every ``num_replicas``-th index from
    ``rank``), so every rank gets a disjoint shard and ``len(sampler)`` samples per epoch.

    Args:
        length: dataset length.
        num_replicas, rank: the process group's world size and this process' rank.
        shuffle: permute every epoch (False: dataset order).
        seed: base seed, identical on all ranks.
        drop_last: drop the tail instead of padding with repeated indices.
        seeded: yield ``(index, sample_seed)`` pairs for :class:`SeededDataset`.
    """

    def __init__(
        self,
        length: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        seeded: bool = False,
    ):
        if length <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.length = length
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.seeded = seeded
        self.epoch = 0
        self.start = 0
        if drop_last and length >= num_replicas:
            self.num_samples = length // num_replicas
        else:
            self.num_samples = -(-length // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` and start from its beginning."""
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's shard (call after :meth:`set_epoch`)."""
        self.start = max(0, int(start))

    def indices(self) -> list:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.num_samples * self.num_replicas
        if total > len(order):
            order += (order * (total // len(order) + 1))[: total - len(order)]
        order = order[:total]
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[Union[int, Tuple[int, int]]]:
        """The rest of this rank's shard from :meth:`set_start`, listed once per epoch (no Python call per sample)."""
        order = self.indices()[self.start :]
        return iter([(index, sample_seed(self.seed, self.epoch, index)) for index in order] if self.seeded else order)

    def __len__(self) -> int:
        return self.num_samples - self.start


class SeededDataset(Dataset):
    """Wraps a map-style dataset so that ``ds[(index, seed)]`` is reproducible.

    The wrapped ``__getitem__`` runs with torch's CPU RNG and python's ``random`` seeded by ``seed``;
    the caller's RNG states are restored afterwards, so the training process' own streams (dropout,
    masks) are untouched even with ``num_workers=0``. A plain integer key is passed through.
    With ``with_seed=True`` a seeded sample comes as ``(sample, seed)``, for a collate function that
    draws more per-sample randomness from the seed (the pretraining masks).

    The wrapped dataset is :attr:`dataset`; nothing of it is forwarded (a DataLoader asks its dataset
    for ``__getitems__``: a forwarded one, e.g. a :class:`~torch.utils.data.Subset`'s, would take the
    ``(index, seed)`` keys past the seeding).
    """

    def __init__(self, dataset: Dataset, with_seed: bool = False):
        self.dataset = dataset
        self.with_seed = with_seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                sample = self.dataset[index]
                return (sample, seed) if self.with_seed else sample
            finally:
                random.setstate(py_state)
