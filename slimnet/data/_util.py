"""Small helpers the data modules share: a config's image size as (H, W)."""

from __future__ import annotations

from collections.abc import Sequence


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``32`` or ``(32, 32)`` -> ``(32, 32)`` (Hydra hands lists, so accept any 2-sequence)."""
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {size!r}")
    return size  # type: ignore[return-value]

