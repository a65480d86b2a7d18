"""``recut``: cut a sparse ultralytics checkpoint at another threshold, without training again.

``SlimmingCallbacks`` keeps the sparse model of the epoch before the cut as ``weights/sparse.pt``;
``recut("sparse.pt", "cut.pt", thresh=...)`` cuts it offline and writes an ultralytics checkpoint of the
cut model (``YOLO("cut.pt")`` predicts, validates, exports; ``keep_cut_widths`` fine-tunes it).
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import torch
from ultralytics import __version__
from ultralytics.nn.tasks import load_checkpoint

from slimnet.engine.atomic import atomic_write
from slimnet.engine.cut import prune
from slimnet.loops.ultralytics.events import info, warn
from slimnet.loops.ultralytics.widths import settle, unsettle
from slimnet.modes import preserved_modes


def recut(source, target, *, thresh: float | None = None, percent: float | None = None,
          target_flops: float | None = None, imgsz: int = 640, min_channels: int = 1, round_to: int = 1,
          fold_bias: bool = True, within=None):
    """Cut the model of the ultralytics checkpoint ``source`` by |γ| and write it to ``target``.

    A checkpoint holds the EMA, whose parameters ultralytics marks ``requires_grad=False``: every γ is
    ranked as trained (``cut_frozen=True``), also those a ``freeze=`` kept frozen (restrict with
    ``within=``). β folding has no data here: it uses the constants a zero image gives, exact for the
    channels whose γ the penalty put at 0 and an approximation for the others. Returns the
    ``PruneReport``; raises ``NothingCutError`` for a ``percent`` or ``target_flops`` removing nothing.

    Example::

        report = recut("runs/detect/slim/weights/sparse.pt", "cut_0.05.pt", thresh=0.05)
        YOLO("cut_0.05.pt").val(data="data.yaml")
    """
    model, ckpt = load_checkpoint(source)  # ultralytics' own format, loaded by ultralytics
    model = model.float()
    channels = (getattr(model, "yaml", None) or {}).get("channels", 3)
    unsettle(model)  # a model cut before: this cut composes onto its plan
    with torch.no_grad(), preserved_modes(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune(model.eval(), torch.zeros(1, channels, imgsz, imgsz), thresh=thresh, percent=percent,
                       target_flops=target_flops, min_channels=min_channels, round_to=round_to,
                       fold_bias=fold_bias, within=within, cut_frozen=True)
    for message in dict.fromkeys(str(w.message) for w in caught):  # through ultralytics' log, once each
        warn(message)
    settle(model)
    saved = {"date": ckpt.get("date"), "version": __version__, "license": ckpt.get("license"), "epoch": -1,
             "model": copy.deepcopy(model).half(), "train_args": ckpt.get("train_args", {}),
             "train_metrics": None, "train_results": None}
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    atomic_write(Path(target), lambda f: f.write(buffer.getvalue()))
    info(f"{source} cut to {target}: FLOPs {report.flops_before / 1e9:.3f}G -> {report.flops_after / 1e9:.3f}G, "
         f"params {report.params_before:,} -> {report.params_after:,}")
    return report
