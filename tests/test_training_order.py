"""The training order of the built-in data modules: a new shuffle each epoch, from (seed, epoch) alone."""

from __future__ import annotations

import torch

from slimnet.data import SyntheticDataModule
from slimnet.data.sampler import EpochShuffle


def _order(sampler: EpochShuffle, epoch: int | None = None) -> list[int]:
    if epoch is not None:
        sampler.set_epoch(epoch)
    return list(sampler)


def test_each_epoch_order_depends_on_seed_and_epoch_only():
    data = range(50)
    torch.manual_seed(1)
    first = _order(EpochShuffle(data, seed=0), epoch=3)
    torch.manual_seed(2)
    torch.rand(100)  # whatever drew from torch's generator before (an evaluation, a callback)
    assert _order(EpochShuffle(data, seed=0), epoch=3) == first
    assert sorted(first) == list(data)
    assert _order(EpochShuffle(data, seed=0), epoch=4) != first
    assert _order(EpochShuffle(data, seed=1), epoch=3) != first
    # seeds one apart do not share their orders one epoch apart (as seed + epoch would)
    assert _order(EpochShuffle(data, seed=1), epoch=0) != _order(EpochShuffle(data, seed=0), epoch=1)


def test_a_plain_loop_gets_a_new_order_every_pass():
    sampler = EpochShuffle(range(50), seed=0)
    passes = [list(sampler) for _ in range(3)]
    assert passes == [_order(EpochShuffle(range(50), seed=0), epoch=e) for e in range(3)]
    assert passes[0] != passes[1] != passes[2]


def test_set_epoch_applies_to_an_iterator_created_before_it():
    # A resumed fit creates its first training iterator before Lightning calls set_epoch(epoch).
    dm = SyntheticDataModule(batch_size=16)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = iter(loader)
    loader.sampler.set_epoch(5)
    resumed = next(batches)[1]

    fresh = SyntheticDataModule(batch_size=16)
    fresh.setup("fit")
    loader = fresh.train_dataloader()
    loader.sampler.set_epoch(5)
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(next(iter(loader))[1], resumed)
