"""Export a pruned model for deployment, then prove the exported file computes what PyTorch computes.

    python -m slimnet.export outputs/2026-05-09/10-00-00                   # a run dir: its pruned.pt -> ONNX
    python -m slimnet.export outputs/.../pruned.pt format=torchscript batch=32
    python -m slimnet.export pruned.pt format=pt2 input_size=28 data=fashion_mnist
    python -m slimnet.export outputs/<detection run> format=torchscript  # slimnet/tasks/detection/export.py
    python -m slimnet.export --help

Formats:

- ``onnx``: ``torch.onnx.export(dynamo=True)`` (needs ``pip install slimnet[export]``), batch axis dynamic,
  one self-contained ``.onnx`` file; checked by running it in onnxruntime.
- ``torchscript``: ``torch.jit.trace`` + ``torch.jit.freeze``. torch 2.14 marks TorchScript deprecated
  (a FutureWarning) but it still traces and runs, and libtorch C++ still loads it; prefer ``pt2``.
- ``pt2``: ``torch.export`` saved with ``torch.export.save``, the format PyTorch is moving to.

The check: the PyTorch outputs are computed *before* exporting, on a batch of real test images when the
run's data is known (``results.json``'s ``data``, else the Hydra run's ``.hydra/config.yaml``), else on
random normal inputs (said so in the report). It passes when ``max|y_export - y_torch| <= atol + rtol *
max|y_torch|``; past that the command exits 1 with a one-line message.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from slimnet.errors import first_line
from slimnet.modes import preserved_modes

FORMATS = ("onnx", "torchscript", "pt2")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2"}
# fp32 sums run in another order in each runtime (and ONNX folds BatchNorm into the convs): measured
# diffs are 1e-10..1e-8 on vgg_small and resnet50, ~1e-6 of max|y| at worst; an export bug is ~1e-2 of it.
# atol is small because untrained nets have logits of ~1e-4 (classifier init N(0, 0.01)).
DEFAULT_ATOL, DEFAULT_RTOL = 1e-5, 1e-4


@dataclass
class ExportReport:
    """What ``export_and_check`` did: the file, the inputs it was checked on, and how close it came."""

    path: str
    format: str
    inputs: str  # what the check ran on, e.g. "8 fashion_mnist test images"
    max_abs_diff: float
    tolerance: float  # atol + rtol * max|y_torch|
    top1_agreement: float  # fraction of inputs whose arg-max class is the same
    passed: bool
    export_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        return (f"{self.format} check on {self.inputs}: max abs diff {self.max_abs_diff:.2e} "
                f"(tolerance {self.tolerance:.2e}), top-1 agreement {100 * self.top1_agreement:.0f}%: "
                f"{verdict}")


# --------------------------------------------------------------------------------------------------
# Exporters: (model in eval mode, example batch, path) -> path. A name -> function dict.
# --------------------------------------------------------------------------------------------------


def _batch_dim():
    return torch.export.Dim("batch")


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: Path, opset: int | None = None) -> Path:
    """ONNX via the dynamo exporter (torch's default since 2.9), batch axis dynamic, weights inline."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter is built on it)
    except ImportError:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'slimnet[export]'") from None
    program = torch.onnx.export(model, (example_input,), dynamo=True, opset_version=opset, verbose=False,
                                dynamic_shapes=({0: _batch_dim()},))
    program.save(str(path), external_data=False)  # one file to ship (models here are far below 2 GB)
    return path


def export_torchscript(model: nn.Module, example_input: torch.Tensor, path: Path, opset=None) -> Path:
    """``torch.jit.trace`` + ``freeze`` (constants folded, BatchNorm folded into convs)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is deprecated.*", category=FutureWarning)
        traced = torch.jit.freeze(torch.jit.trace(model, example_input))
        torch.jit.save(traced, str(path))
    return path


def export_pt2(model: nn.Module, example_input: torch.Tensor, path: Path, opset=None) -> Path:
    """``torch.export`` program, batch axis dynamic, saved with ``torch.export.save``."""
    program = torch.export.export(model, (example_input,), dynamic_shapes=({0: _batch_dim()},))
    torch.export.save(program, str(path))
    return path


EXPORTERS: dict[str, Callable[..., Path]] = {"onnx": export_onnx, "torchscript": export_torchscript,
                                             "pt2": export_pt2}


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session with ``threads`` intra-op threads (default: torch's thread count)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("running ONNX needs onnxruntime: pip install 'slimnet[export]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_exported(path: str | Path, format: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the exported file on a batch, the way a deployment would load it."""
    if format == "onnx":
        session = onnx_session(path)
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is deprecated.*", category=FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
        return lambda x: module(x)
    if format == "pt2":
        module = torch.export.load(str(path)).module()
        return lambda x: module(x)
    raise ValueError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")


def export_and_check(model: nn.Module, inputs: torch.Tensor, path: str | Path, format: str = "onnx", *,
                     atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, opset: int | None = None,
                     inputs_note: str = "") -> ExportReport:
    """Export ``model`` in eval mode to ``path`` and compare the file's outputs with PyTorch's on ``inputs``.

    The reference is computed before exporting, so an exporter that touched the model cannot hide it.
    Returns the report whether or not the check passed (``report.passed``); the file is left in place.
    The model's train/eval mode is restored afterwards.
    """
    if format not in EXPORTERS:
        raise ValueError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with preserved_modes(model):
        model.eval()
        with torch.inference_mode():
            reference = model(inputs).float()  # (B, classes)
        example = inputs[:2] if len(inputs) >= 2 else inputs.expand(2, *inputs.shape[1:])  # 1 specialises
        start = time.perf_counter()
        with torch.no_grad():
            EXPORTERS[format](model, example, path, opset=opset)
        seconds = time.perf_counter() - start
    with torch.inference_mode():
        exported = load_exported(path, format)(inputs).float()
    diff = float((exported - reference).abs().max()) if exported.shape == reference.shape else float("inf")
    tolerance = atol + rtol * float(reference.abs().max())
    agree = float((exported.argmax(1) == reference.argmax(1)).float().mean()) if diff != float("inf") else 0.0
    return ExportReport(path=str(path), format=format, inputs=inputs_note or f"{len(inputs)} inputs",
                        max_abs_diff=diff, tolerance=tolerance, top1_agreement=agree,
                        passed=diff <= tolerance, export_seconds=seconds)


# --------------------------------------------------------------------------------------------------
# From an artifact or run dir: find the input shape and real inputs
# --------------------------------------------------------------------------------------------------


def _run_facts(source: Path) -> tuple[Path, dict]:
    """``(artifact, facts)``; facts may hold ``input_shape`` ([C, H, W]) and ``data`` (a data config)."""
    artifact = source / "pruned.pt" if source.is_dir() else source
    if not artifact.is_file():
        hint = " (a run writes pruned.pt when save_artifact=true)" if source.is_dir() else ""
        raise FileNotFoundError(f"{artifact}: no such file{hint}")
    run_dir, facts = artifact.parent, {}
    if (run_dir / "results.json").is_file():
        try:
            results = json.loads((run_dir / "results.json").read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{run_dir / 'results.json'}: not valid JSON ({err})") from None
        facts.update({k: results[k] for k in ("input_shape", "data") if results.get(k)})
    hydra_config = run_dir / ".hydra" / "config.yaml"
    if "data" not in facts and hydra_config.is_file():
        from omegaconf import OmegaConf

        facts["data"] = OmegaConf.to_container(OmegaConf.load(hydra_config).data, resolve=True)
    return artifact, facts


def parse_size(size: str | int) -> tuple[int, int]:
    h, _, w = str(size).lower().partition("x")
    return int(h), int(w or h)


def _datamodule(data: dict):
    """A run's data config (``_target_``) or a registry name's (``data=fashion_mnist`` on the command line)."""
    if "_target_" in data:
        from slimnet.locate import locate

        return locate(data["_target_"])(**{k: v for k, v in data.items() if k != "_target_"})
    from slimnet.data import build_datamodule

    return build_datamodule(data["name"], **{k: v for k, v in data.items() if k != "name"})


def _data_name(data: dict) -> str:
    return data.get("name") or data["_target_"].rsplit(".", 1)[-1]


def check_inputs(facts: dict, model_config: dict | None, batch: int, input_size=None,
                 data: str = "auto") -> tuple[torch.Tensor, str]:
    """A batch to check an export on, and what it is: real test images where the data is known.

    ``data``: ``auto`` (the run's data), ``random``, or a dataset registry name (its default config).
    """
    data_cfg = {"auto": facts.get("data"), "random": None}.get(data, {"name": data})
    if data_cfg:
        try:
            dm = _datamodule(data_cfg)
            dm.setup("test")
            n = min(batch, len(dm.test_set))
            images = torch.stack([dm.test_set[i][0] for i in range(n)])  # (B, C, H, W), normalised
            return images, f"{n} {_data_name(data_cfg)} test images"
        except Exception as err:  # noqa: BLE001 - data not on this machine: say so, fall back
            why = f"{_data_name(data_cfg)} test set unavailable: {first_line(err, 120)}"
    else:
        why = "no dataset known; pass data=<name> for real images"
    if input_size is not None:
        channels = (model_config or {}).get("in_channels") or (facts.get("input_shape") or [None])[0]
        if channels is None:
            raise ValueError("input_size given but the channel count is unknown: the artifact has no "
                             "model config. Hint: export from the run dir, whose results.json knows it")
        shape = [int(channels), *parse_size(input_size)]
    elif facts.get("input_shape"):
        shape = list(facts["input_shape"])
    else:
        raise ValueError("the input size is unknown (no results.json input_shape or run data beside the "
                         "artifact). Hint: pass input_size=H or input_size=HxW, e.g. input_size=28")
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, *shape, generator=gen), f"{batch} random normal inputs ({why})"


def export_artifact(source: str | Path, format: str = "onnx", out: str | Path | None = None, batch: int = 8,
                    opset: int | None = None, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                    input_size=None, data: str = "auto") -> ExportReport:
    """What ``python -m slimnet.export`` does: load a pruned artifact (or a run dir's), export, check."""
    from slimnet.engine.artifact import load_pruned

    if format not in EXPORTERS:
        raise ValueError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")
    artifact, facts = _run_facts(Path(source))
    model = load_pruned(artifact).eval()  # built from the artifact's model config (else a clear error)
    inputs, note = check_inputs(facts, getattr(model, "slimnet_config", None), batch, input_size, data)
    stem = artifact.name.removesuffix(".pt")
    path = Path(out) if out else artifact.with_name(stem + SUFFIXES[format])
    return export_and_check(model, inputs, path, format, atol=atol, rtol=rtol, opset=opset, inputs_note=note)
