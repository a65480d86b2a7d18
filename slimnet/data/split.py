"""The validation split: held out from the *training* files with a private, fixed-seed generator, so it
is the same on every run and the test files are only opened for ``stage="test"``."""

from __future__ import annotations

import torch


def _num_val(val_size: int | float, n: int) -> int:
    """Turn ``val_size`` (a count, or a fraction of the ``n`` training images) into a count."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ValueError(f"val_size must be an int count or a float fraction, got {val_size!r}")
    if isinstance(val_size, float):
        if not 0.0 <= val_size < 1.0:
            raise ValueError(f"val_size fraction must be in [0, 1), got {val_size}")
        k = round(val_size * n)
    else:
        k = val_size
    if not 0 <= k < n:
        raise ValueError(
            f"val_size={val_size} leaves no training images out of {n}; set data.val_size below {n}"
        )
    return k


def _split_indices(n: int, val_size: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx) from a permutation of a private, seeded generator: same split every run,
    independent of the global RNG state that Lightning's ``seed_everything`` controls."""
    k = _num_val(val_size, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    # Sorted, so the in-memory gather walks memory in order; the train loader shuffles anyway.
    return perm[k:].sort().values, perm[:k].sort().values
