"""What the command line shows: progress, slimnet's own lines, and nothing a user must learn to ignore.

Only ``python -m slimnet.train`` and ``python -m slimnet.export`` call :func:`quiet_third_party`; a user
importing slimnet into their own training code keeps their own logging and warnings untouched.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

# Third-party warnings that say nothing a slimnet user can act on (each checked against a real run).
_IGNORED_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning 2.6 against torch 2.14's pytree
    r"The number of training batches .* is smaller than the logging interval",  # short runs, tiny data
    r".*dirpath has changed from",  # a reused sparse phase's checkpoint came from another run directory
    r".*does not have many workers which may be a bottleneck",  # in-memory data sets need no workers
    r"Checkpoint directory .* exists and is not empty",  # a resumed run writes into its own folder
    r".*`training_step` returned `None`",
)


def quiet_third_party() -> None:
    """Lightning's info lines (tips banner, "GPU available", "Seed set") and the warnings above off."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


class ConsoleFormatter(logging.Formatter):
    """Console lines without timestamps or logger names (the run's train.log keeps both): a plain
    message for information, ``warning:``/``error:`` in front of the rest."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class ProgressAwareHandler(logging.StreamHandler):
    """A console handler that prints above an active progress bar instead of gluing onto its line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class EpochProgressBar(TQDMProgressBar):
    """Lightning's bar for training epochs only: no validation/sanity bars between them, and only the
    metrics a user reads (loss, validation accuracy or mAP)."""

    _SHOWN = ("train/loss", "val/acc", "val/map", "val/loss")

    def init_validation_tqdm(self):
        return Tqdm(disable=True)  # the epoch's bar shows val metrics when validation ends

    def init_sanity_tqdm(self):
        return Tqdm(disable=True)

    def init_test_tqdm(self):
        return Tqdm(disable=True)  # a few seconds; the summary table follows

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        return {k.replace("_step", ""): v for k, v in metrics.items()
                if k.replace("_step", "") in self._SHOWN and not k.endswith("_epoch")}


class EpochLines(pl.Callback):
    """One log line per epoch, for output that is not a terminal (a file, CI, a job scheduler), where a
    redrawn progress bar would be hundreds of lines of carriage returns."""

    def __init__(self):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        shown = [f"{k} {float(m[k]):.4f}" for k in ("train/loss_epoch", "val/acc", "val/map", "val/map_50") if k in m]
        logging.getLogger("slimnet").info("epoch %d/%d: %s (%.0f s)", trainer.current_epoch + 1, trainer.max_epochs,
                                          ", ".join(shown), time.perf_counter() - self.start)


def progress_callbacks(enabled: bool) -> tuple[list[pl.Callback], bool]:
    """The progress display for a run, and ``enable_progress_bar`` for the Trainer: a bar on a terminal,
    one line per epoch otherwise, nothing when disabled."""
    if not enabled:
        return [], False
    if sys.stderr.isatty():
        return [EpochProgressBar()], True
    return [EpochLines()], False
