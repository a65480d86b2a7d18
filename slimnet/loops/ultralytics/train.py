"""``slim_train``: sparsity training, the cut and the fine-tune of an ultralytics model in one call."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slimnet.core import Slimming
from slimnet.loops.ultralytics.slimming import SlimmingCallbacks
from slimnet.loops.ultralytics.sparsity import SparsityCallbacks


@dataclass
class SlimRun:
    """What ``slim_train`` did: ultralytics' own metrics of the final model, the cut's report (FLOPs and
    parameters before and after, the layers cut, ``val_before_cut`` / ``after_cut``), λ and the γ
    statistics per epoch, and where the checkpoints are (``best`` and ``last`` are the cut model)."""

    metrics: object
    report: dict
    history: list[dict] = field(default_factory=list)
    save_dir: Path | None = None

    @property
    def best(self) -> Path:
        return self.save_dir / "weights" / "best.pt"

    @property
    def last(self) -> Path:
        return self.save_dir / "weights" / "last.pt"


def slim_train(model, data: str, epochs: int, prune_epoch: int, *, lam: float, thresh: float | None = None,
               percent: float | None = None, target_flops: float | None = None, lam_after: float = 0.0,
               kind: str = "l1", mode: str = "auto", gamma_init: float | None = None, min_channels: int = 1,
               round_to: int = 1, fold_bias: bool = True, within=None, val_after_cut: bool = True,
               **train_args) -> SlimRun:
    """Train ``model`` (an ``ultralytics.YOLO``) sparse for ``prune_epoch`` epochs, cut it, fine-tune it to ``epochs``.

    Epochs ``[0, prune_epoch)`` train with λ·|γ| on every BatchNorm γ (``SparsityCallbacks``); at the start
    of epoch ``prune_epoch`` the model is cut (``SlimmingCallbacks``: ``thresh``, ``percent`` or
    ``target_flops``); the remaining epochs fine-tune it with λ = ``lam_after``, all in ultralytics' own
    trainer, its optimizer, schedule, EMA, validation and checkpoints. ``train_args`` go to
    ``model.train`` (``imgsz``, ``batch``, ``optimizer``, ``device``...).

    Afterwards ``model`` is the cut model (ultralytics loads ``best.pt`` back into it) and keeps its
    widths in later ``model.train(...)`` calls (``keep_cut_widths`` stays registered); the slimming and
    sparsity callbacks are removed.

    Raises:
        ValueError: before training, ``prune_epoch`` not before ``epochs``, no policy, a multi-GPU
            ``device`` (ultralytics' DDP runs a subprocess that drops every callback), or what
            ``SlimmingCallbacks`` / ``SparsityCallbacks`` refuse.
        RuntimeError: the run ended before the cut.

    Example::

        run = slim_train(YOLO("yolov8n.yaml"), data="coco8.yaml", epochs=60, prune_epoch=30, percent=0.4,
                         lam=1e-3, optimizer="SGD")
        print(run.report["flops_before"], "->", run.report["flops_after"])
    """
    Slimming(prune_epoch, thresh, percent, target_flops, where="slim_train").check(epochs)
    if "," in str(train_args.get("device") or ""):
        raise ValueError(f"slim_train: device={train_args['device']!r} is multi-GPU, which ultralytics runs in a "
                         "subprocess without the callbacks; train on one device (device=0)")
    sparsity = SparsityCallbacks(lam, until_epoch=prune_epoch, lam_after=lam_after, mode=mode, gamma_init=gamma_init,
                                 kind=kind)
    slimming = SlimmingCallbacks(prune_epoch, thresh, percent, target_flops, min_channels=min_channels,
                                 round_to=round_to, fold_bias=fold_bias, within=within, val_after_cut=val_after_cut)
    sparsity.add_to(model)
    slimming.add_to(model)
    try:
        metrics = model.train(data=data, epochs=epochs, **train_args)
    finally:
        sparsity.remove_from(model)
        slimming.remove_from(model, keep_widths=True)
    if not slimming.done:
        raise RuntimeError(f"slim_train: the run ended before epoch {prune_epoch}, so nothing was cut")
    save_dir = Path(model.trainer.save_dir) if getattr(model, "trainer", None) is not None else None
    return SlimRun(metrics=metrics, report=slimming.report or {}, history=list(sparsity.history), save_dir=save_dir)
