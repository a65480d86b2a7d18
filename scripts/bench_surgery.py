"""Surgery on the torchvision zoo: wall time against Torch-Pruning, and accuracy right after the cut.

    python scripts/bench_surgery.py                    # ~10 min on 2 CPU cores; writes docs/bench_surgery.{md,json}
    python scripts/bench_surgery.py --models resnet50 vgg16_bn --repeats 3 --skip-accuracy
    python scripts/bench_surgery.py --ckpt outputs/<run>/checkpoints/sparse.ckpt   # accuracy on your sparse model
    python scripts/bench_surgery.py --skip-speed --skip-accuracy --thirdparty     # third-party models only (~5 min)

Skipped sections keep their last results from ``docs/bench_surgery.json``.

Torch-Pruning is an optional, benchmark-only dependency (``pip install torch-pruning``); slimnet never
imports it. Without it the Torch-Pruning columns are left empty.

1. **Speed.** Each torchvision model (``weights=None``, γ drawn uniform in [0, 1]) at 224x224 (299 for
   Inception v3), batch 1, one intra-op thread by default (the cores are shared; both tools get the same).
   slimnet: ``slimnet.prune(percent=0.5)`` on a fresh deep copy; *surgery* is trace + plan + β fold + cut,
   from the report's ``seconds``; *report* is the rest of ``prune()``: FLOPs counted on traced shapes and
   the one real forward that records the inputs β folding needs; then ``prune()``'s total, and its total
   with ``fold_bias=False`` (like for like: Torch-Pruning folds nothing) over Torch-Pruning's. Torch-Pruning:
   ``MetaPruner(model, x, BNScaleImportance(), global_pruning=True, pruning_ratio=0.5,
   ignored_layers=[classifier])`` constructed and stepped on a fresh deep copy: its whole cost (it traces
   with a real forward when built). Median of ``--repeats`` runs each, interleaved, same process.
2. **Accuracy right after the cut, before fine-tuning**, with and without β folding: ``vgg_small`` sparsity-
   trained on Fashion-MNIST for ``--epochs`` epochs by a plain loop (SGD 0.05, momentum 0.9, Nesterov,
   wd 1e-4; λ = 2e-3 on every γ via ``slimnet.sparsity.step.add_l1_subgradient``; γ initialised to 0.5, as in
   Liu et al.), or the model of a Lightning checkpoint (``--ckpt``; keys prefixed ``model.``). Pruned at
   several ``percent`` values; folding measures removed channels on a zero image (what the training
   callback passes today) and on a batch of 256 real training images.
3. **Third-party models** (``--thirdparty``; needs ``pip install slimnet[thirdparty]``, models whose package
   is missing are skipped): ultralytics YOLOv8n, timm models the issue named, a segmentation-models-pytorch
   FPN (its forward checks the input size, so fx cannot trace it), and a torchvision resnet50 with
   FrozenBatchNorm2d, all untrained (``weights=None``). Per model: the share of BN channels and of FLOPs
   surgery can reach (``slimnet.engine.reach``); exactness (γ uniform in [0, 1), γ = β = 0 below 0.3, then
   ``prune(thresh=0.1, fold_bias=False)``: outputs must not move); ``prune(percent=0.5, fold_bias=False)``
   wall time, report included; and Torch-Pruning's ``MetaPruner(BNScaleImportance(), global_pruning=True,
   pruning_ratio=0.5)`` build + step on the same model: its time and the FLOPs it kept, or its error.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import slimnet
from slimnet.data import FashionMNISTDataModule
from slimnet.graph.outputs import shape_only_output_keys
from slimnet.models import create_model
from slimnet.models.build import build_model
from slimnet.sparsity.step import add_l1_subgradient, bn_gammas, init_gammas

try:  # optional, for the comparison only
    import torch_pruning as tp
except ImportError:
    tp = None

ROOT = Path(__file__).resolve().parents[1]
ZOO = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg11_bn", "vgg16_bn", "mobilenet_v2",
    "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "densenet121",
    "googlenet", "inception_v3", "shufflenet_v2_x1_0", "mnasnet1_0",
]
KWARGS = {"googlenet": {"aux_logits": False, "init_weights": False},
          "inception_v3": {"aux_logits": False, "init_weights": False}}
RATIO = 0.5


# --------------------------------------------------------------------------- speed


def _zoo_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {}))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, _BatchNorm):
                bn.weight.copy_(torch.rand(bn.num_features, generator=gen))
    return model.eval()


def _classifier(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _nofold_total(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slimnet.prune(model, x, percent=RATIO, fold_bias=False)
    return time.perf_counter() - start


def _slimnet_once(model: nn.Module, x: torch.Tensor) -> dict:
    model_for_nofold = copy.deepcopy(model)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ShuffleNet's "kept whole" warning; counted in the report
        report = slimnet.prune(model, x, percent=RATIO)
    total = time.perf_counter() - start
    with torch.no_grad():
        ok = model(x).shape == (1, 1000)
    s = report["seconds"]
    return {"surgery": s["surgery"], "trace": s["trace"], "plan": s["plan"], "fold": s["fold"], "cut": s["cut"],
            "flops_forwards": s["measure"] + s["measure_after"], "prune_total": total, "works": ok,
            "prune_nofold": _nofold_total(copy.deepcopy(model_for_nofold), x),
            "params_kept": report["params_after"] / report["params_before"]}


def _tp_once(model: nn.Module, x: torch.Tensor) -> dict:
    params_before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    try:
        pruner = tp.pruner.MetaPruner(model, x, tp.importance.BNScaleImportance(), global_pruning=True,
                                      pruning_ratio=RATIO, ignored_layers=[_classifier(model)])
        pruner.step()
    except Exception as err:  # noqa: BLE001 - e.g. ShuffleNet: ZeroDivisionError inside Torch-Pruning
        return {"error": f"{type(err).__name__}: {str(err)[:80]}"}
    seconds = time.perf_counter() - start
    try:
        with torch.no_grad():
            ok = model(x).shape == (1, 1000)
    except Exception:  # noqa: BLE001 - a broken pruned model is a result to report
        ok = False
    return {"seconds": seconds, "works": ok, "params_kept": sum(p.numel() for p in model.parameters()) / params_before}


def bench_speed(models: list[str], repeats: int) -> list[dict]:
    rows = []
    for name in models:
        base = _zoo_model(name)
        size = 299 if name == "inception_v3" else 224
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        ours, theirs = [], []
        for _ in range(repeats):  # interleaved, each on a fresh copy made before its clock starts
            ours.append(_slimnet_once(copy.deepcopy(base), x))
            if tp is not None:
                theirs.append(_tp_once(copy.deepcopy(base), x))
        row = {"model": name, "size": size}
        for key in ("surgery", "trace", "plan", "fold", "cut", "flops_forwards", "prune_total", "prune_nofold"):
            row[key] = statistics.median(r[key] for r in ours)
        row["works"] = all(r["works"] for r in ours)
        row["params_kept"] = ours[0]["params_kept"]
        if theirs and "error" in theirs[0]:
            row["tp_error"] = theirs[0]["error"]
        elif theirs:
            row["tp_seconds"] = statistics.median(r["seconds"] for r in theirs)
            row["tp_works"] = all(r["works"] for r in theirs)
            row["tp_params_kept"] = theirs[0]["params_kept"]
            row["ratio"] = row["surgery"] / row["tp_seconds"]
            row["nofold_ratio"] = row["prune_nofold"] / row["tp_seconds"]
        rows.append(row)
        print(_speed_line(row), flush=True)
    return rows


def _speed_line(r: dict) -> str:
    tp_cell = (f"{r['tp_seconds']:.3f}" if "tp_seconds" in r else r.get("tp_error", "n/a"))
    ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
    return (f"{r['model']:20s} surgery {r['surgery']:.3f} s (trace {r['trace']:.3f}, plan {r['plan']:.3f}, fold "
            f"{r['fold']:.3f}, cut {r['cut']:.3f}); report {r['flops_forwards']:.3f}; prune(fold_bias=False) "
            f"{r['prune_nofold']:.3f}; TP {tp_cell} {ratio}")


# --------------------------------------------------------------------------- third-party models


def _frozen_resnet50():
    from torchvision.ops.misc import FrozenBatchNorm2d

    return torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)


def _yolov8n():
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolov8n.yaml", verbose=False)


def _timm(name: str):
    def build():
        import timm

        return timm.create_model(name, pretrained=False)
    return build


def _smp_fpn():
    import segmentation_models_pytorch as smp

    return smp.FPN("resnet18", encoder_weights=None, classes=2)


# name -> (builder, input size); third-party packages are imported only when their model is built
THIRDPARTY = {
    "resnet50 (torchvision)": (lambda: torchvision.models.resnet50(weights=None), 224),
    "resnet50, FrozenBatchNorm2d": (_frozen_resnet50, 224),
    "yolov8n (ultralytics)": (_yolov8n, 320),
    "mixnet_s (timm)": (_timm("mixnet_s"), 224),
    "ghostnet_100 (timm)": (_timm("ghostnet_100"), 224),
    "skresnet18 (timm)": (_timm("skresnet18"), 224),
    "dpn68 (timm)": (_timm("dpn68"), 224),
    "fpn_resnet18 (smp)": (_smp_fpn, 224),
}


def _norms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, slimnet.graph.NORM_TYPES) and getattr(m, "weight", None)
            is not None]


@torch.no_grad()
def _random_gammas(model: nn.Module) -> nn.Module:
    """γ uniform in [0, 1): untrained models have every γ = 1, and tied scores rank nothing."""
    gen = torch.Generator().manual_seed(0)
    for m in _norms(model):
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen))
    return model


@torch.no_grad()
def _kill_weak(model: nn.Module, thresh: float = 0.3) -> None:
    _random_gammas(model)
    for m in _norms(model):
        dead = m.weight < thresh
        m.weight[dead] = 0
        m.bias[dead] = 0


def _exact(build, x: torch.Tensor) -> str:
    """Outputs unchanged by the cut; outputs returned for their shape only (YOLOv8's ``feats``,
    ``slimnet.graph.SHAPE_ONLY_OUTPUTS``) may narrow, and must keep every other dim."""
    model = build().eval()
    shape_only = shape_only_output_keys(model)
    _kill_weak(model)

    def outputs():
        with torch.no_grad():
            leaves = torch.utils._pytree.tree_flatten_with_path(model(x))[0]
        return [(any(getattr(k, "key", None) in shape_only for k in path), t) for path, t in leaves
                if isinstance(t, torch.Tensor)]

    ref = outputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slimnet.prune(model, x, thresh=0.1, fold_bias=False)
    out = outputs()
    same = len(out) == len(ref) and all(
        (a.shape[:1] + a.shape[2:] == b.shape[:1] + b.shape[2:]) if narrow
        else (a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-4))
        for (narrow, a), (_, b) in zip(out, ref))
    return "exact" if same else "CHANGED"


def _tp_thirdparty(model: nn.Module, x: torch.Tensor) -> dict:
    flops_before = slimnet.count_flops(model, x)[0]
    start = time.perf_counter()
    try:
        heads = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1:]
        pruner = tp.pruner.MetaPruner(model, x, tp.importance.BNScaleImportance(), global_pruning=True,
                                      pruning_ratio=RATIO, ignored_layers=heads)
        pruner.step()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            model.eval()(x)
    except Exception as err:  # noqa: BLE001 - its failures are results
        return {"tp_error": f"{type(err).__name__}: {str(err).splitlines()[0][:70] if str(err) else ''}"}
    return {"tp_seconds": seconds, "tp_flops_kept": slimnet.count_flops(model, x)[0] / flops_before}


def bench_thirdparty(repeats: int) -> list[dict]:
    rows = []
    for name, (build, size) in THIRDPARTY.items():
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        try:
            base = _random_gammas(build().eval())
        except ImportError as err:
            print(f"{name}: skipped ({err})", flush=True)
            continue
        row = {"model": name, "size": size}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = slimnet.reach(base, x)
            row.update(bn_reach=r.bn_channels, flops_reach=r.flops, frozen_groups=len(r.frozen))
            row["exact"] = _exact(build, x)
            times, kept = [], None
            for _ in range(repeats):
                model = copy.deepcopy(base)
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    report = slimnet.prune(model, x, percent=RATIO, fold_bias=False)
                times.append(time.perf_counter() - start)
                kept = report["flops_after"] / report["flops_before"]
            row.update(prune_seconds=statistics.median(times), flops_kept=kept)
        except slimnet.TraceError as err:
            row["refused"] = str(err).splitlines()[0][:160]
        if tp is not None:
            runs = [_tp_thirdparty(copy.deepcopy(base), x) for _ in range(repeats)]
            row.update(runs[0])
            if "tp_seconds" in row:
                row["tp_seconds"] = statistics.median(r["tp_seconds"] for r in runs)
        rows.append(row)
        print(_thirdparty_line(row), flush=True)
    return rows


def _thirdparty_line(r: dict) -> str:
    if "refused" in r:
        return f"{r['model']:28s} refused: {r['refused']}"
    tp_cell = (f"TP {r['tp_seconds']:.2f} s, FLOPs kept {r['tp_flops_kept']:.0%}" if "tp_seconds" in r
               else f"TP {r.get('tp_error', 'n/a')}")
    return (f"{r['model']:28s} reach: BN {r['bn_reach']:.0%}, FLOPs {r['flops_reach']:.0%}; {r['exact']}; "
            f"prune {r['prune_seconds']:.2f} s, FLOPs kept {r['flops_kept']:.0%}; {tp_cell}")


# --------------------------------------------------------------------------- accuracy after the cut


@torch.no_grad()
def _accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def _sparse_model(dm, epochs: int, ckpt: str | None) -> tuple[nn.Module, str]:
    if ckpt:
        data = torch.load(ckpt, map_location="cpu", weights_only=True)
        config = (data.get("hyper_parameters") or {}).get("model_config") or {
            "arch": "vgg_small", "num_classes": 10, "in_channels": 1}
        model = build_model(dict(config))
        model.load_state_dict({k[len("model."):]: v for k, v in data["state_dict"].items() if k.startswith("model.")})
        return model, f"checkpoint {ckpt}"
    torch.manual_seed(0)
    model = create_model("vgg_small", num_classes=10, in_channels=1)
    init_gammas(model, 0.5)  # Liu et al. 2017: a smaller start lets L1 reach zero sooner
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    gammas = bn_gammas(model)
    model.train()
    for _ in range(epochs):
        for x, y in dm.train_dataloader():
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            add_l1_subgradient(gammas, 2e-3)
            optimizer.step()
    return model.eval(), f"vgg_small, {epochs} epoch(s) of sparsity training (λ = 2e-3, γ init 0.5)"


def bench_accuracy(epochs: int, ckpt: str | None, percents: list[float]) -> dict:
    dm = FashionMNISTDataModule(batch_size=128, augment=False)
    dm.setup("fit")
    dm.setup("test")
    start = time.perf_counter()
    model, source = _sparse_model(dm, epochs, ckpt)
    train_seconds = time.perf_counter() - start
    test = dm.test_dataloader()
    batches = iter(dm.train_dataloader())
    real = torch.cat([next(batches)[0], next(batches)[0]])[:256]  # 256 training images
    zero = dm.example_input(1)
    gammas = torch.cat([g.detach().abs() for g in bn_gammas(model)])
    result = {"source": source, "train_seconds": train_seconds, "sparse_acc": _accuracy(model, test),
              "gamma_below_1e-2": float((gammas < 1e-2).float().mean()),
              "gamma_below_1e-3": float((gammas < 1e-3).float().mean()), "rows": []}
    print(f"sparse model: test acc {result['sparse_acc']:.4f}; |γ| < 1e-2: {result['gamma_below_1e-2']:.1%}",
          flush=True)
    for percent in percents:
        row = {"percent": percent}
        for label, fold, example in (("no_fold", False, zero), ("fold_zero_image", True, zero),
                                     ("fold_real_batch", True, real)):
            pruned = copy.deepcopy(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = slimnet.prune(pruned, example, percent=percent, fold_bias=fold)
            row[label] = _accuracy(pruned, test)
            row["threshold"] = report["threshold"]
            row["flops_kept"] = report["flops_after"] / report["flops_before"]
        result["rows"].append(row)
        print(f"percent {percent:.2f} (|γ| <= {row['threshold']:.3g}, FLOPs kept {row['flops_kept']:.1%}): "
              f"no fold {row['no_fold']:.4f}, fold (zero image) {row['fold_zero_image']:.4f}, "
              f"fold (real batch) {row['fold_real_batch']:.4f}", flush=True)
    return result


# --------------------------------------------------------------------------- report


def _markdown(speed: list[dict], accuracy: dict | None, meta: dict, thirdparty: list[dict] | None = None,
              thirdparty_meta: dict | None = None) -> str:
    lines = ["# Surgery benchmark (`scripts/bench_surgery.py`)", "",
             (f"torch {meta['torch']}, torchvision {meta['torchvision']}, Torch-Pruning {meta['torch_pruning']}, "
              f"{meta['threads']} intra-op thread(s), median of {meta['repeats']} runs; generated {meta['date']}."
              + (f" {meta['note']}" if meta.get("note") else "")), ""]
    if speed:
        lines += ["## Surgery wall time at 224x224 (Inception v3: 299x299), batch 1, prune 50% by BN |γ|", "",
                  ("surgery = trace + plan + β fold + cut. *report*: the rest of `prune()` — FLOPs counted on traced "
                   "shapes (no forward) and the one real forward that records the inputs folding needs. "
                   "`fold_bias=False`: `prune()`'s whole call without folding, like for like with Torch-Pruning. "
                   "Torch-Pruning: `MetaPruner(BNScaleImportance(), global_pruning=True, pruning_ratio=0.5)` "
                   "build + step."), "",
                  ("| model | slimnet surgery (s) | trace | plan | fold | cut | report (s) | `prune()` total (s) "
                   "| `fold_bias=False` total (s) | Torch-Pruning (s) | surgery / TP | `fold_bias=False` / TP "
                   "| params kept (ours / TP) |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in speed:
            tp_cell = f"{r['tp_seconds']:.3f}" if "tp_seconds" in r else r.get("tp_error", "n/a")
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else "–"
            nofold = f"{r['prune_nofold']:.3f}" if "prune_nofold" in r else "–"
            nofold_ratio = f"{r['nofold_ratio']:.2f}" if "nofold_ratio" in r else "–"
            kept = f"{r['params_kept']:.0%}" + (f" / {r['tp_params_kept']:.0%}" if "tp_params_kept" in r else "")
            lines.append(f"| {r['model']} | {r['surgery']:.3f} | {r['trace']:.3f} | {r['plan']:.3f} | {r['fold']:.3f} "
                         f"| {r['cut']:.3f} | {r['flops_forwards']:.3f} | {r['prune_total']:.3f} | {nofold} | {tp_cell} "
                         f"| {ratio} | {nofold_ratio} | {kept} |")
        compared = [r for r in speed if "ratio" in r]
        if compared:
            worst = max(compared, key=lambda r: r["ratio"])
            failed = [r["model"] for r in speed if "tp_error" in r]
            nofold = [r for r in compared if "nofold_ratio" in r]
            whole_call = ""
            if nofold:
                r50 = next((f"{r['nofold_ratio']:.2f}x" for r in nofold if r["model"] == "resnet50"), "not run")
                whole_call = (f"The whole `prune(fold_bias=False)` call, report included, takes ≤ 0.5x on "
                              f"{sum(r['nofold_ratio'] <= 0.5 for r in nofold)} of {len(nofold)} (resnet50: {r50}). ")
            lines += ["", (f"slimnet's surgery takes ≤ 0.5x Torch-Pruning's time on "
                           f"{sum(r['ratio'] <= 0.5 for r in compared)} of {len(compared)} models both handle "
                           f"(median ratio {statistics.median(r['ratio'] for r in compared):.2f}, worst "
                           f"{worst['ratio']:.2f} on {worst['model']})"
                           + (f"; Torch-Pruning fails on {', '.join(failed)}" if failed else "") + ". " + whole_call
                           + "Channel counts differ because the policies differ: slimnet ranks raw |γ| globally and "
                           "keeps a residual channel if any of its norms ranks it high; Torch-Pruning normalises "
                           "per group.")]
        lines.append("")
    if accuracy:
        lines += ["## Test accuracy right after the cut, before any fine-tuning", "",
                  (f"Model: {accuracy['source']}; Fashion-MNIST test set. Sparse model: "
                   f"{accuracy['sparse_acc']:.2%}; |γ| < 1e-2 for {accuracy['gamma_below_1e-2']:.1%} of channels, "
                   f"< 1e-3 for {accuracy['gamma_below_1e-3']:.1%}."), "",
                  ("| percent pruned | threshold on \\|γ\\| | FLOPs kept | no folding | folding, zero image | "
                   "folding, 256 real images |"), "|---:|---:|---:|---:|---:|---:|"]
        for r in accuracy["rows"]:
            lines.append(f"| {r['percent']:.0%} | {r['threshold']:.3g} | {r['flops_kept']:.1%} | {r['no_fold']:.2%} "
                         f"| {r['fold_zero_image']:.2%} | {r['fold_real_batch']:.2%} |")
        lines.append("")
    if thirdparty:
        m = thirdparty_meta or {}
        lines += ["## Third-party models: what surgery reaches", "",
                  (f"`python scripts/bench_surgery.py --skip-speed --skip-accuracy --thirdparty` "
                   f"({m.get('versions', '')}; {m.get('threads', 1)} intra-op thread(s), median of "
                   f"{m.get('repeats', 1)} runs; generated {m.get('date', '')}). Untrained models. *Reach*: "
                   "`slimnet.engine.reach` — BN channels in cuttable groups, and FLOPs of conv/linear layers with a "
                   "cuttable channel axis. *Exact*: γ = β = 0 below 0.3, `prune(thresh=0.1, fold_bias=False)`, "
                   "outputs unchanged. *prune()*: `percent=0.5, fold_bias=False`, wall time with its report. "
                   "Torch-Pruning: `MetaPruner(BNScaleImportance(), global_pruning=True, pruning_ratio=0.5)` "
                   "build + step."), "",
                  ("| model | input | BN channels reached | FLOPs reached | groups left whole | exact | "
                   "`prune()` (s) | FLOPs kept | Torch-Pruning (s) | TP FLOPs kept |"),
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for r in thirdparty:
            if "refused" in r:
                lines.append(f"| {r['model']} | {r['size']} | – | – | – | refused: {r['refused']} | – | – | "
                             f"{r.get('tp_error', '–')} | – |")
                continue
            tp_cell = (f"{r['tp_seconds']:.2f} | {r['tp_flops_kept']:.0%}" if "tp_seconds" in r
                       else f"{r.get('tp_error', 'not installed')} | –")
            lines.append(f"| {r['model']} | {r['size']} | {r['bn_reach']:.0%} | {r['flops_reach']:.0%} | "
                         f"{r['frozen_groups']} | {r['exact']} | {r['prune_seconds']:.2f} | {r['flops_kept']:.0%} | "
                         f"{tp_cell} |")
        lines += ["", ("`slimnet.engine.reach` names every group it leaves whole, and why. ghostnet and dpn68 slice channels "
                       "with `x[:, :n]` / `x[:, n:]`, n a module attribute (`out_chs`, `num_1x1_c`): each part is "
                       "its own channel space and the cut rewrites n. skresnet18 stacks its two paths "
                       "(`torch.stack`) and weighs them by an attention whose filters come in one block per path: "
                       "one group with the paths; its residual streams stay whole because its selective kernel "
                       "splits them with `torch.split(x, self.in_channels // self.num_paths, 1)` (a size no single "
                       "attribute holds). mixnet_s splits with `torch.split(x, self.splits, 1)`: the cut rewrites "
                       "`self.splits` (and the plan replays it). YOLOv8n goes through `torch.export` (fx cannot "
                       "iterate C2f's `chunk`); its neck outputs, also returned as `feats` for the loss's anchor "
                       "grid (read for H, W only), are cut like any tensor (`slimnet.graph.SHAPE_ONLY_OUTPUTS`), so "
                       "the Detect head's inputs are cut too; its predictions keep their width (*exact*: the "
                       "predictions are unchanged, `feats` keep their grid). The smp FPN checks its input size in "
                       "`forward`, so it too is captured by `torch.export`; export's capture is most of both "
                       "models' prune() time. FrozenBatchNorm2d: Torch-Pruning removes nothing (its importance "
                       "reads parameters; the γ here are buffers). Before the graph modelled channel slices, "
                       "stacks and outputs read for their shape (the same day, same host): yolov8n 92% of BN "
                       "channels (3 groups whole: the Detect inputs), ghostnet_100 9% (FLOPs 6%), skresnet18 4% "
                       "(0%), dpn68 65% (97%)."), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=ZOO)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--ckpt", default=None, help="a Lightning checkpoint of a sparsity-trained model")
    parser.add_argument("--percents", type=float, nargs="*", default=[0.3, 0.5, 0.7])
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--thirdparty", action="store_true", help="run the third-party section")
    parser.add_argument("--note", default=None, help="a sentence on the run's conditions, shown under the title")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "torch_pruning": importlib.metadata.version("torch-pruning") if tp else "not installed",
            "threads": args.threads, "repeats": args.repeats, "date": time.strftime("%Y-%m-%d")}
    store = ROOT / "docs" / "bench_surgery.json"
    last = json.loads(store.read_text()) if store.exists() else {}  # skipped sections keep these
    speed = last.get("speed", []) if args.skip_speed else bench_speed(args.models, args.repeats)
    accuracy = last.get("accuracy") if args.skip_accuracy else bench_accuracy(args.epochs, args.ckpt, args.percents)
    if args.skip_speed and args.skip_accuracy and "meta" in last:
        meta = last["meta"]
    if args.note:
        meta["note"] = args.note
    thirdparty, thirdparty_meta = last.get("thirdparty"), last.get("thirdparty_meta")
    if args.thirdparty:
        versions = []
        for package in ("torch", "torch-pruning", "ultralytics", "timm", "segmentation-models-pytorch"):
            try:
                versions.append(f"{package} {importlib.metadata.version(package)}")
            except importlib.metadata.PackageNotFoundError:
                versions.append(f"{package} not installed")
        thirdparty_meta = {"versions": ", ".join(versions), "threads": args.threads, "repeats": args.repeats,
                           "date": time.strftime("%Y-%m-%d")}
        thirdparty = bench_thirdparty(args.repeats)
    (ROOT / "docs").mkdir(exist_ok=True)
    store.write_text(json.dumps({"meta": meta, "speed": speed, "accuracy": accuracy, "thirdparty": thirdparty,
                                 "thirdparty_meta": thirdparty_meta}, indent=2) + "\n")
    (ROOT / "docs" / "bench_surgery.md").write_text(
        _markdown(speed, accuracy, meta, thirdparty, thirdparty_meta) + "\n")
    print(f"wrote {ROOT / 'docs' / 'bench_surgery.md'}")


if __name__ == "__main__":
    main()
