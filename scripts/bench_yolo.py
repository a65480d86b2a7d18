"""yolov8n slimmed inside ultralytics' own trainer on a tiny generated data set, beside Torch-Pruning's yolov8 recipe.

    python scripts/bench_yolo.py                                  # ~5 min on 2 CPU cores
    python scripts/bench_yolo.py --epochs 30 --prune-epoch 20     # quicker, lower mAP
    python scripts/bench_yolo.py --skip-torch-pruning --out outputs/bench_yolo

CPU, offline (``YOLO_OFFLINE=1``; ultralytics' font download is switched off), yolov8n built from
``yolov8n.yaml`` (no pretrained weights), ``--images`` train and as many val images of 64 px (coloured
boxes on grey, two classes), AdamW lr 2e-3, batch 8, no mosaic. Prints a markdown table and writes
``<out>/bench_yolo.json``. Numbers for docs/loops/ultralytics.md.

1. **dense**: ``YOLO("yolov8n.yaml").train(epochs=E)``, plain ultralytics (λ = 0).
2. **slimnet**: ``slim_train(YOLO("yolov8n.yaml"), epochs=E, prune_epoch=P, lam=λ, target_flops=F)``:
   sparse to P, cut, fine-tune to E, all in ultralytics' trainer. mAP50-95 from ultralytics' own val:
   before the cut (``YOLO("sparse.pt").val()``, the model of the epoch before the cut), right after it
   (the trainer's validator on the cut model, ``report["after_cut"]``), after fine-tuning
   (``YOLO("best.pt").val()``). FLOPs at 640 px from ultralytics' ``model.info()`` (THOP) and from
   slimnet's ``count_flops`` (torch's FlopCounterMode), dense and cut.
3. **Torch-Pruning 1.6.1's yolov8 example** (``examples/yolov8/yolov8_pruning.py``): (a) its imports, as
   written, against this ultralytics; (b) its recipe on the dense model: C2f replaced by a two-conv C2f
   (its ``C2f_v2``, so ``chunk`` needs no special case), ``GroupNormPruner`` with
   ``GroupMagnitudeImportance`` and the Detect head ignored, one shot, ``pruning_ratio`` bisected to the
   FLOPs slimnet's cut kept; (c) plain ``model.train()`` on that pruned model; (d) the example's own
   workaround (the trainer trains the pruned module instead of rebuilding it, here by overriding
   ``get_model``), fine-tuned E - P epochs like slimnet's.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics is imported: no online checks

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def write_dataset(root: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """``n`` train and ``n`` val images of coloured boxes on grey (class 0 red, 1 green), YOLO labels
    (the generator of tests/test_loop_ultralytics.py)."""
    import cv2

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, lines = np.full((size, size, 3), 40, np.uint8), []
            for _ in range(rng.integers(1, 3)):
                c = int(rng.integers(0, 2))
                w, h = rng.integers(size // 5, size // 2, 2)
                x, y = rng.integers(0, size - w), rng.integers(0, size - h)
                img[y:y + h, x:x + w] = (60, 60, 220) if c == 0 else (60, 200, 60)  # BGR
                lines.append(f"{c} {(x + w / 2) / size:.5f} {(y + h / 2) / size:.5f} {w / size:.5f} {h / size:.5f}")
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), img)
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: green\n")
    return root / "data.yaml"


def offline() -> None:
    import ultralytics.data.utils
    import ultralytics.utils.checks

    ultralytics.utils.checks.ONLINE = False
    ultralytics.data.utils.check_font = lambda *args, **kwargs: None


def mAP(path, data: str, args: dict) -> float:
    from ultralytics import YOLO

    return float(YOLO(path).val(data=data, name="val", **args).box.map)


def flops(model: nn.Module, imgsz: int = 640) -> dict:
    """GFLOPs of one image: ultralytics' model_info (THOP) and slimnet's count_flops; parameters."""
    from ultralytics.utils.torch_utils import model_info

    from slimnet.engine.measure import count_flops

    model = copy.deepcopy(model).float().eval()
    _, params, _, gflops = model_info(model, imgsz=imgsz)
    counted, _ = count_flops(model, torch.zeros(1, 3, imgsz, imgsz))
    return {"ultralytics_gflops": round(gflops, 3), "slimnet_gflops": round(counted / 1e9, 3), "params": params}


def zeros_only_cut(sparse: Path, data: str, args: dict, thresh: float = 1e-2) -> dict:
    """The sparse model re-cut offline (``recut``) at ``thresh``: only the γ the penalty drove to (about) zero
    go, so the cut model should compute what the sparse one did (β folding keeps their constant outputs)."""
    from slimnet.loops.ultralytics import recut

    target = sparse.parent / f"recut_{thresh:g}.pt"
    report = recut(sparse, target, thresh=thresh, imgsz=64)
    return {"thresh": thresh, "flops_kept_64px": round(report.flops_after / report.flops_before, 3),
            "params": report.params_after, "map50_95_right_after_cut": mAP(target, data, args)}


# -- Torch-Pruning's recipe ---------------------------------------------------------------------------
class TwoConvC2f(nn.Module):
    """C2f with ``cv1`` split into two convs (Torch-Pruning's ``C2f_v2``): the same function, no ``chunk``."""

    def __init__(self, c2f):
        super().__init__()
        from ultralytics.nn.modules import Conv

        conv, c = c2f.cv1.conv, c2f.c
        self.cv0, self.cv1 = (Conv(conv.in_channels, c, 1, 1) for _ in range(2))
        for half, sl in ((self.cv0, slice(0, c)), (self.cv1, slice(c, 2 * c))):
            half.conv.weight.data.copy_(conv.weight.data[sl])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(half.bn, name).data.copy_(getattr(c2f.cv1.bn, name).data[sl])
        self.cv2, self.m = c2f.cv2, c2f.m
        for name in ("f", "i", "type", "np"):  # ultralytics' routing attributes
            if hasattr(c2f, name):
                setattr(self, name, getattr(c2f, name))

    def forward(self, x):
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def replace_c2f(module: nn.Module) -> None:
    from ultralytics.nn.modules import C2f

    for name, child in module.named_children():
        if isinstance(child, C2f):
            setattr(module, name, TwoConvC2f(child))
        else:
            replace_c2f(child)


def tp_prune(model: nn.Module, ratio: float) -> nn.Module:
    import torch_pruning as tp
    from ultralytics.nn.modules import Detect

    model = copy.deepcopy(model).float().train()
    replace_c2f(model)
    for p in model.parameters():
        p.requires_grad_(True)
    ignored = [m for m in model.modules() if isinstance(m, Detect)]
    pruner = tp.pruner.GroupNormPruner(model, torch.randn(1, 3, 64, 64), importance=tp.importance.GroupMagnitudeImportance(),
                                       iterative_steps=1, pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    return model.eval()


def torch_pruning_section(dense_best: Path, data: str, args: dict, target: float, epochs: int, out: dict) -> None:
    from ultralytics import YOLO

    from slimnet.engine.measure import count_flops

    section = out["torch_pruning"] = {"version": importlib.metadata.version("torch-pruning")}
    try:  # (a) the example's imports, as written
        importlib.import_module("ultralytics.yolo.engine.model")
        section["example_imports"] = "ok"
    except Exception as e:  # noqa: BLE001 - report whatever it is
        section["example_imports"] = f"{type(e).__name__}: {e}"

    dense = YOLO(dense_best).model
    full, _ = count_flops(copy.deepcopy(dense).float(), torch.zeros(1, 3, 64, 64))
    low, high, pruned, ratio = 0.0, 0.9, None, None
    start = time.perf_counter()
    try:  # (b) one shot, pruning_ratio bisected to slimnet's FLOPs
        for _ in range(7):
            mid = (low + high) / 2
            candidate = tp_prune(dense, mid)
            kept = count_flops(candidate, torch.zeros(1, 3, 64, 64))[0] / full
            if kept > target:
                low = mid
            else:
                high, pruned, ratio = mid, candidate, mid
    except Exception as e:  # noqa: BLE001
        section["prune_error"] = f"{type(e).__name__}: {e}"
        section["prune_traceback"] = traceback.format_exc(limit=4)
        return
    section.update(pruning_ratio=round(ratio, 3), prune_seconds=round(time.perf_counter() - start, 1),
                   **flops(pruned))
    holder = YOLO(dense_best)
    holder.model = copy.deepcopy(pruned)  # val fuses its model in place
    section["map_after_prune"] = float(holder.val(data=data, name="tp_val", **args).box.map)

    # (c) plain model.train() on the pruned model: ultralytics rebuilds it from its yaml
    plain = YOLO(dense_best)
    plain.model = copy.deepcopy(pruned)
    from ultralytics.nn.tasks import DetectionModel

    fresh = DetectionModel("yolov8n.yaml", nc=2, verbose=False).state_dict()  # what ultralytics rebuilds
    fitting = sum(k in fresh and v.shape == fresh[k].shape for k, v in pruned.state_dict().items())
    try:
        plain.train(data=data, epochs=1, name="tp_plain", **args)
        section["plain_train"] = {"params_after": sum(p.numel() for p in plain.model.parameters()),
                                  "c2f_type": type(plain.model.model[2]).__name__,
                                  "tensors_kept": f"{fitting}/{len(fresh)}"}
    except Exception as e:  # noqa: BLE001
        section["plain_train"] = {"error": f"{type(e).__name__}: {e}"}

    # (d) the example's workaround: the trainer trains the pruned module itself
    tuned = YOLO(dense_best)
    tuned.model = pruned
    tuned.add_callback("on_pretrain_routine_start",
                       lambda trainer: setattr(trainer, "get_model", lambda cfg=None, weights=None, verbose=True: pruned))
    tuned.train(data=data, epochs=epochs, name="tp_tune", **args)
    best = Path(tuned.trainer.best)
    section["map_after_finetune"] = mAP(best, data, args)
    section["best_pt_pickles"] = sorted(n for n in _pickled_globals(best)
                                        if not n.startswith(("torch", "ultralytics", "collections", "builtins", "__builtin__")))


def _pickled_globals(path: Path) -> set[str]:
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--prune-epoch", type=int, default=40)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--lam", type=float, default=1e-2)
    parser.add_argument("--target-flops", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="ultralytics' training seed (the data set is fixed)")
    parser.add_argument("--skip-torch-pruning", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="where runs and bench_yolo.json go (default: a temp dir)")
    opts = parser.parse_args()

    offline()
    from ultralytics import YOLO

    from slimnet.loops.ultralytics import slim_train

    torch.set_num_threads(min(2, torch.get_num_threads()))
    out_dir = (opts.out or Path(tempfile.mkdtemp(prefix="bench_yolo_"))).absolute()
    data = str(write_dataset(out_dir / "tiny", opts.images))
    args = {"imgsz": 64, "batch": 8, "workers": 0, "device": "cpu", "amp": False, "plots": False,
            "project": str(out_dir / "runs"), "exist_ok": True, "verbose": False}
    train = {**args, "mosaic": 0.0, "optimizer": "AdamW", "lr0": 0.002, "val": False, "seed": opts.seed}
    result = {"versions": {p: importlib.metadata.version(p) for p in ("ultralytics", "torch")},
              "setup": {k: v for k, v in vars(opts).items() if k != "out"}}
    t0 = time.perf_counter()

    dense = YOLO("yolov8n.yaml")
    dense.train(data=data, epochs=opts.epochs, name="dense", **train)
    dense_best = Path(dense.trainer.best)
    result["dense"] = {"map50_95": mAP(dense_best, data, args), **flops(YOLO(dense_best).model),
                       "seconds": round(time.perf_counter() - t0, 1)}

    t1 = time.perf_counter()
    run = slim_train(YOLO("yolov8n.yaml"), data=data, epochs=opts.epochs, prune_epoch=opts.prune_epoch,
                     lam=opts.lam, target_flops=opts.target_flops, name="slim", **train)
    weights = run.save_dir / "weights"
    r = run.report
    result["slimnet"] = {
        "map50_95_before_cut": mAP(weights / "sparse.pt", data, args),
        "map50_95_right_after_cut": r["after_cut"].get("metrics/mAP50-95(B)"),
        "map50_95_after_finetune": mAP(run.best, data, args),
        "threshold": r["threshold"], "frac_small_gamma_before_cut": run.history[opts.prune_epoch - 1]["frac_small"],
        "flops_kept_64px": round(r["flops_after"] / r["flops_before"], 3),
        "surgery_seconds": round(r["surgery_seconds"], 1),
        "dense_sparse": flops(YOLO(weights / "sparse.pt").model), "cut": flops(YOLO(run.best).model),
        "seconds": round(time.perf_counter() - t1, 1),
        "zeros_only": zeros_only_cut(weights / "sparse.pt", data, args),
    }
    if not opts.skip_torch_pruning:
        torch_pruning_section(dense_best, data, args, r["flops_after"] / r["flops_before"],
                              opts.epochs - opts.prune_epoch, result)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / "bench_yolo.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"\nwritten: {out_dir / 'bench_yolo.json'}")


if __name__ == "__main__":
    main()
