"""The IDX file format (LeCun's MNIST format, also Fashion-MNIST's), plain or .gz, read and validated.

An IDX file is a big-endian int32 magic number (its low byte is the number of dims), one big-endian
int32 per dim, then the raw data. Only uint8 data is read here.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path

import torch

from slimnet.errors import first_line

_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801  # uint8 data, 3 dims / 1 dim


def _idx_open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _idx_header(path: Path, magic: int) -> tuple[int, ...]:
    """Read and check an IDX header (magic, then one big-endian int32 per dim) without reading data."""
    ndim = magic & 0xFF
    try:
        with _idx_open(path) as f:
            head = f.read(4 + 4 * ndim)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: not a readable IDX file ({first_line(err)})") from None
    if len(head) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    (got,) = struct.unpack(">i", head[:4])
    if got != magic:
        raise ValueError(f"{path}: bad IDX magic number 0x{got:08x}, expected 0x{magic:08x}")
    return struct.unpack(f">{ndim}i", head[4:])


def read_idx(path: str | os.PathLike, magic: int) -> torch.Tensor:
    """Parse a uint8 IDX file (plain or .gz) into a tensor shaped by its header dims."""
    path = Path(path)
    dims = _idx_header(path, magic)
    offset = 4 + 4 * len(dims)
    try:
        with _idx_open(path) as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # a truncated .gz fails here with EOFError
        raise ValueError(f"{path}: corrupt IDX file ({first_line(err)})") from None
    expected = offset + math.prod(dims)
    if len(raw) != expected:
        raise ValueError(
            f"{path}: truncated or corrupt IDX file ({len(raw)} bytes, header implies {expected})"
        )
    # bytearray: torch.frombuffer wants a writable buffer; one copy of the file, then a view.
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=offset).view(*dims)
