"""Lightning checkpoint I/O that never leaves a half-written file and never unpickles code.

Saving goes through a temporary file, fsync and rename (``slimnet.engine.atomic``), so a crash or a full disk
while writing ``last.ckpt`` leaves the previous ``last.ckpt`` intact. Loading always uses
``torch.load(weights_only=True)``: a checkpoint carrying a malicious pickle is refused, and an
unreadable file gives one line naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

from slimnet.engine.artifact import atomic_save, safe_load


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local saves and ``weights_only=True`` loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO takes no storage_options")
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path)  # remote filesystems: fsspec's transaction
        atomic_save(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        return safe_load(path, map_location=map_location if map_location is not None else "cpu")
