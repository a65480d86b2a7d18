"""Ctrl-C: say how to go on. Lightning stops gracefully and exits; this says the exact command that
resumes the run from its last finished epoch (``checkpoints/last.ckpt``), or that nothing was saved yet."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

import pytorch_lightning as pl

log = logging.getLogger("slimnet")


def resume_command(run_dir: str | Path) -> str:
    """``python -m slimnet.train resume=<run_dir>``, the path relative to here when it is below here."""
    path = os.path.relpath(run_dir)
    if path.startswith(".."):
        path = str(Path(run_dir).resolve())
    return f"python -m slimnet.train resume={shlex.quote(path)}"


def resume_hint(run_dir: str | Path) -> str:
    if (Path(run_dir) / "checkpoints" / "last.ckpt").is_file():
        return f"interrupted; resume from the last finished epoch with:\n  {resume_command(run_dir)}"
    return "interrupted before the first epoch ended: nothing was saved to resume from; run the command again"


class ResumeHint(pl.Callback):
    """Logs :func:`resume_hint` when a fit is interrupted with Ctrl-C (Lightning then exits with status 1)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            log.warning("%s", resume_hint(self.run_dir))
