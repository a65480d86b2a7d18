"""The ultralytics adapter: sparse training, the cut and the fine-tune of yolov8n inside ultralytics' own trainer.

CPU only and offline: the model is built from ``yolov8n.yaml`` (no weights download), on a handful of 64-px
images written into tmp_path; ultralytics' online checks and its font download are switched off.
"""

from __future__ import annotations

import os
import pickletools
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics is imported: no online checks, no analytics
pytest.importorskip("ultralytics", reason="the ultralytics adapter needs: pip install ultralytics")

from ultralytics import YOLO
from ultralytics.nn.tasks import DetectionModel, torch_safe_load

from slimnet.engine.cut import layer_widths
from slimnet.loops.ultralytics import (
    SlimmingCallbacks,
    SparsityCallbacks,
    keep_cut_widths,
    recut,
    slim_train,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "loops" / "ultralytics.md"
MARKER = "<!-- tested: tests/test_loop_ultralytics.py runs this block as written -->"
NAMES = {0: "red", 1: "green"}


def write_tiny_dataset(root: Path, n: int = 8, size: int = 64, seed: int = 0) -> Path:
    """``n`` train and ``n`` val images of coloured boxes on grey (class 0 red, 1 green), YOLO labels."""
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
    names = "".join(f"  {k}: {v}\n" for k, v in NAMES.items())
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return root / "data.yaml"


@pytest.fixture(scope="module")
def offline():
    """No network: ultralytics' ONLINE flag (pip update, AutoUpdate) and its Arial.ttf download."""
    import ultralytics.data.utils
    import ultralytics.utils.checks

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ultralytics.utils.checks, "ONLINE", False)
        mp.setattr(ultralytics.data.utils, "check_font", lambda *args, **kwargs: None)
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, offline) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def _train_args(tmp: Path, **extra) -> dict:
    return dict(imgsz=64, batch=4, workers=0, device="cpu", amp=False, plots=False, project=str(tmp / "runs"),
                verbose=False, **extra)


def _doc_block() -> str:
    text = DOC.read_text()
    assert MARKER in text, "docs/loops/ultralytics.md lost its tested example"
    return re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.DOTALL)[1]


def _head_outputs(model) -> list[int]:
    head = model.model[-1]
    return [seq[-1].out_channels for seq in [*head.cv2, *head.cv3]] + [head.dfl.conv.in_channels]


def _pickled_globals(path: Path) -> set[str]:
    """Every class or function a torch checkpoint's pickle names (what unpickling must import)."""
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


# -- the documented example: sparse -> cut -> fine-tune -> val / predict / export -> train further --------
@pytest.fixture(scope="module")
def documented(tiny, tmp_path_factory):
    pytest.importorskip("onnx", reason="the example exports to ONNX: pip install onnx onnxruntime")
    where = tiny.parent.parent
    cwd = os.getcwd()
    os.chdir(where)  # the example reads tiny/data.yaml and writes runs/ where it runs
    try:
        scope: dict = {}
        exec(compile(_doc_block(), str(DOC), "exec"), scope)
    finally:
        os.chdir(cwd)
    return scope


def test_the_cut_model_is_smaller_and_fine_tuning_keeps_its_widths(documented):
    run = documented["run"]
    full = layer_widths(DetectionModel("yolov8n.yaml", nc=len(NAMES), verbose=False))
    cut = layer_widths(YOLO(run.best).model)
    assert cut.keys() == full.keys()
    assert sum(cut.values()) < 0.85 * sum(full.values())
    assert all(cut[k] <= full[k] for k in full)
    assert run.report["flops_after"] < 0.8 * run.report["flops_before"]
    assert {k: [full[k], cut[k]] for k in full if cut[k] != full[k]} == run.report["channels"]
    # the model slim_train leaves behind is the cut one, and so is each later training's result
    assert layer_widths(documented["model"].model) == cut
    assert layer_widths(documented["tuned"].model) == cut
    assert layer_widths(YOLO(Path(documented["tuned"].trainer.best)).model) == cut
    assert YOLO(run.save_dir / "weights" / "last.pt").model.yaml["slimnet_plan"]


def test_the_detect_head_outputs_are_never_cut(documented):
    full = _head_outputs(DetectionModel("yolov8n.yaml", nc=len(NAMES), verbose=False))
    assert full == [64] * 3 + [len(NAMES)] * 3 + [16]  # 4 x reg_max box logits, class scores, dfl
    assert _head_outputs(YOLO(documented["run"].best).model) == full
    assert _head_outputs(documented["tuned"].model) == full


def test_the_cut_checkpoint_predicts_validates_and_exports(documented):
    ort = pytest.importorskip("onnxruntime")
    boxes = documented["boxes"]
    assert boxes.data.shape[1] == 6  # x1 y1 x2 y2 conf cls: ultralytics' own post-processing ran
    metrics = documented["metrics"]
    assert 0 <= metrics.box.map <= 1 and metrics.speed["inference"] > 0
    # the ONNX file computes what the cut PyTorch model computes
    model = YOLO(documented["run"].best).model.float().eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)[0]
    session = ort.InferenceSession(str(documented["onnx_file"]), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert got.shape == tuple(expected.shape) == (1, 4 + len(NAMES), 8 * 8 + 4 * 4 + 2 * 2)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-3, atol=1e-3)


def test_cut_checkpoints_need_no_slimnet_to_load(documented):
    weights = documented["run"].save_dir / "weights"
    for name in ("best.pt", "last.pt"):
        named = _pickled_globals(weights / name)
        assert any(n.startswith("ultralytics.") for n in named)  # the scan sees the classes it must
        assert not [n for n in named if n.startswith("slimnet")], name
        ckpt, _ = torch_safe_load(weights / name, safe_only=True)  # ultralytics' weights_only allow-list
        assert layer_widths(ckpt["model"]) == layer_widths(YOLO(documented["run"].best).model)
    # before the cut: the sparse model (full width) and the best checkpoint of the sparse phase, kept aside
    full = layer_widths(DetectionModel("yolov8n.yaml", nc=len(NAMES), verbose=False))
    assert layer_widths(YOLO(weights / "sparse.pt").model) == full
    assert (weights / "sparse_best.pt").exists()


def test_recut_cuts_the_sparse_checkpoint_again_without_training(documented, tmp_path):
    weights = documented["run"].save_dir / "weights"
    report = recut(weights / "sparse.pt", tmp_path / "recut.pt", percent=0.5, imgsz=64)
    model = YOLO(tmp_path / "recut.pt").model  # an ordinary ultralytics checkpoint
    full = layer_widths(YOLO(weights / "sparse.pt").model)
    widths = layer_widths(model)
    assert {k: [full[k], widths[k]] for k in full if widths[k] != full[k]} == report.channels != {}
    assert sum(widths.values()) < sum(layer_widths(YOLO(documented["run"].best).model).values())  # 50 % > 30 %
    assert _head_outputs(model) == _head_outputs(YOLO(weights / "sparse.pt").model)
    assert model.yaml["slimnet_plan"] and not [n for n in _pickled_globals(tmp_path / "recut.pt") if "slimnet" in n]
    with torch.no_grad():
        assert model.float().eval()(torch.zeros(1, 3, 64, 64))[0].shape == (1, 4 + len(NAMES), 84)


# -- resume ----------------------------------------------------------------------------------------
class _Crash(Exception):
    pass


def test_a_run_resumed_after_the_cut_keeps_the_cut_widths(tiny, tmp_path):
    def crash_after_second_epoch(trainer):  # after last.pt of epoch 1 is written (the cut was at its start)
        if trainer.epoch == 1:
            raise _Crash

    model = YOLO("yolov8n.yaml")
    SparsityCallbacks(lam=1e-3, until_epoch=1).add_to(model)
    SlimmingCallbacks(epoch=1, percent=0.3).add_to(model)
    model.add_callback("on_fit_epoch_end", crash_after_second_epoch)
    with pytest.raises(_Crash):
        model.train(data=str(tiny), epochs=3, name="crash", **_train_args(tmp_path))
    last = tmp_path / "runs" / "crash" / "weights" / "last.pt"
    cut = layer_widths(YOLO(last).model)
    assert sum(cut.values()) < sum(layer_widths(DetectionModel("yolov8n.yaml", nc=2, verbose=False)).values())

    resumed = YOLO(last)
    slimming = SlimmingCallbacks(epoch=1, percent=0.3).add_to(resumed)
    resumed.train(resume=True)
    assert resumed.trainer.start_epoch == 2 and slimming.done and slimming.report is None  # not cut again
    assert layer_widths(resumed.model) == cut
    assert layer_widths(YOLO(last).model) == cut


def test_a_resumed_sparse_phase_goes_on_with_the_lambda_controller_it_had(tiny, tmp_path):
    def crash_after_first_epoch(trainer):  # after last.pt of epoch 0 is written
        raise _Crash

    model = YOLO("yolov8n.yaml")
    first = SparsityCallbacks(lam=1e-3, target=0.5).add_to(model)
    model.add_callback("on_fit_epoch_end", crash_after_first_epoch)
    with pytest.raises(_Crash):
        model.train(data=str(tiny), epochs=2, name="crash_sparse", **_train_args(tmp_path))
    state = first.core.controller.state_dict()
    assert state["step"] > 0 and state["lam"] != 1e-3  # the controller moved λ during epoch 0

    resumed = YOLO(tmp_path / "runs" / "crash_sparse" / "weights" / "last.pt")
    second = SparsityCallbacks(lam=1e-3, target=0.5).add_to(resumed)
    at_start = []
    resumed.add_callback("on_train_epoch_start", lambda trainer: at_start.append(second.core.controller.state_dict()))
    resumed.train(resume=True)
    assert at_start[0] == state  # not restarted from lam
    assert [h["epoch"] for h in second.history] == [0, 1]  # epoch 0's entry came with it


def test_a_nan_in_the_epoch_of_the_cut_stops_with_the_way_on_which_folds_with_recorded_statistics(tiny, tmp_path):
    def diverge_in_the_cut_epoch(trainer):  # what a NaN loss leaves behind, seen by the recovery check
        if trainer.epoch == 1:
            trainer.loss = torch.tensor(float("nan"))

    model = YOLO("yolov8n.yaml")
    SlimmingCallbacks(epoch=1, percent=0.3).add_to(model)
    model.add_callback("on_train_epoch_end", diverge_in_the_cut_epoch)
    with pytest.raises(RuntimeError, match=r"NaN/Inf in epoch 1, the epoch of the cut: .*resume=True\) repeats the cut"):
        model.train(data=str(tiny), epochs=3, name="nan", val=False, **_train_args(tmp_path))

    # the way on it names: resume at the cut, which folds with the statistics recorded before it
    weights = tmp_path / "runs" / "nan" / "weights"
    assert (weights / "slimnet_fold_stats.pt").is_file()  # written beside last.pt of epoch 0
    resumed, slimming, seen = YOLO(weights / "last.pt"), SlimmingCallbacks(epoch=1, percent=0.3), []
    resumed.add_callback("on_train_epoch_start", lambda trainer: seen.append(slimming.core.fold_stats is not None))
    slimming.add_to(resumed)  # after the probe: it sees the state right before the cut
    resumed.train(resume=True)
    assert seen[0] and slimming.report is not None and slimming.report["folded"]
    assert not (weights / "slimnet_fold_stats.pt").exists()  # spent with the cut


# -- the γ step rides on ultralytics' optimizer -------------------------------------------------------
def test_the_gamma_step_is_taken_once_per_optimizer_step_and_again_after_the_cut(tiny, tmp_path):
    """SGD, lr 0.01 held constant (lrf=1, no warmup), momentum μ=0.937, Nesterov; 8 images in batches of 4
    accumulated to nbs=8: one optimizer step per epoch, clipped at norm 10. λ=5 dominates ∂L/∂γ, so the
    mean γ falls by about lr·λ·(1+μ) in the first step, lr·λ·(1+μ+μ²) in the second (its momentum carried
    over the cut). A step per batch would fall twice as far; a step before clipping, or one left on the
    optimizer's old parameters after the cut, less (the latter: 0.070 instead of 0.141)."""
    lr, lam, mu = 0.01, 5.0, 0.937
    model = YOLO("yolov8n.yaml")
    sparsity = SparsityCallbacks(lam=lam).add_to(model)
    SlimmingCallbacks(epoch=1, percent=0.3).add_to(model)
    after_cut = []
    model.add_callback("on_train_epoch_start", lambda trainer: after_cut.append(
        torch.cat([m.weight.detach().abs().flatten() for m in trainer.model.modules()
                   if isinstance(m, torch.nn.BatchNorm2d)]).mean().item()))
    model.train(data=str(tiny), epochs=2, name="gamma", optimizer="SGD", lr0=lr, lrf=1.0, momentum=mu,
                warmup_epochs=0, nbs=8, **_train_args(tmp_path))
    first, second = sparsity.history
    assert after_cut[0] == 1.0  # ultralytics' BatchNorm init
    assert 1 - first["mean"] == pytest.approx(lr * lam * (1 + mu), abs=0.05 * lr * lam)  # measured: exact to 1e-6
    assert after_cut[1] - second["mean"] == pytest.approx(lr * lam * (1 + mu + mu * mu), abs=0.05 * lr * lam)


# -- user errors, before any training -------------------------------------------------------------------
def test_mistakes_fail_before_training_with_the_fix(tiny, tmp_path):
    model = YOLO("yolov8n.yaml")
    with pytest.raises(ValueError, match="epoch=3 is not before the last epoch"):
        slim_train(model, data=str(tiny), epochs=3, prune_epoch=3, percent=0.3, lam=1e-3)
    with pytest.raises(ValueError, match="train on one device"):
        slim_train(model, data=str(tiny), epochs=3, prune_epoch=1, percent=0.3, lam=1e-3, device="0,1")
    with pytest.raises(ValueError, match="needs thresh"):
        SlimmingCallbacks(epoch=1)
    with pytest.raises(ValueError, match="compile=False"):
        slim_train(model, data=str(tiny), epochs=3, prune_epoch=1, percent=0.3, lam=1e-3, compile=True,
                   name="compiled", **_train_args(tmp_path))
    assert not (tmp_path / "runs" / "compiled" / "weights" / "last.pt").exists()
    left = [fn for fns in model.callbacks.values() for fn in fns
            if isinstance(getattr(fn, "__self__", None), (SlimmingCallbacks, SparsityCallbacks))]
    assert not left  # slim_train unregisters them, also after a failure


def test_keep_cut_widths_refuses_weights_that_do_not_fit_their_plan(tiny, tmp_path, documented):
    plan = YOLO(documented["run"].best).model.yaml["slimnet_plan"]
    full = DetectionModel("yolov8n.yaml", nc=len(NAMES), verbose=False)  # full-width weights carrying a cut plan
    full.yaml = {**full.yaml, "slimnet_plan": plan}
    torch.save({"model": full, "train_args": {}}, tmp_path / "mismatch.pt")
    model = keep_cut_widths(YOLO(tmp_path / "mismatch.pt"))
    with pytest.raises(RuntimeError, match="do not fit the model cut by its plan"):
        model.train(data=str(tiny), epochs=1, name="bad", **_train_args(tmp_path))
