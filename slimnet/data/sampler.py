"""The training order: a new shuffle every epoch, a function of ``(seed, epoch)`` alone.

torch's ``RandomSampler`` seeds each epoch's permutation with a draw from the global generator, so the
order depends on everything that drew from it before: an evaluation at the start of an epoch, a
callback, or a resumed run, which starts its first training iterator before the epoch-start hooks
where an uninterrupted run starts it after them. Seeded from ``(seed, epoch)``, a resumed run, a run
reusing a shared sparse phase and an uninterrupted run train on the same batches whatever else ran.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler


def epoch_seed(seed: int, epoch: int) -> int:
    """A generator seed for one epoch. Hashed, not ``seed + epoch``: runs with seeds 0 and 1 must not
    share their orders one epoch apart (and torch's CPU generator keeps only the low 32 bits)."""
    digest = hashlib.sha256(f"slimnet-shuffle/{int(seed)}/{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class EpochShuffle(RandomSampler):
    """A ``RandomSampler`` whose permutation for epoch ``e`` comes from its own generator, seeded with
    ``epoch_seed(seed, e)``.

    Lightning calls ``set_epoch(e)`` before each training epoch starts drawing batches (as it does for
    ``DistributedSampler``, which replaces this one under DDP and is seeded by ``seed + epoch``). Without
    it each pass takes the next epoch, so a plain loop over the loader still gets a new order every time.
    """

    def __init__(self, data_source: Sized, seed: int):
        super().__init__(data_source, generator=torch.Generator())
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        # A generator function: this runs at the first batch, after Lightning's set_epoch, even when
        # the loader's iterator was created earlier (as it is when a fit resumes).
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch))
        self.epoch += 1
        yield from super().__iter__()
