"""A per-layer latency table: how a model's latency changes with the width of each channel group, measured.

    from slimnet.engine.latency_table import LatencySettings, latency_table
    table = latency_table(model, x)                         # measured here once, then read from the cache
    table = latency_table(model, x, LatencySettings(batch=16, threads=1))
    table.save("deploy.json")                               # measured on the deployment device ...
    table = latency_table(model, x, LatencySettings(device_name=...), table="deploy.json")   # ... used here

What is measured (``build_latency_table``), for each conv / linear *layer signature* of the model (the
layer's shapes, its input size and the BatchNorm that alone reads it; repeated blocks share one):

* **the rounding probes**: the layer timed at a few widths just under an aligned width ``A`` (``A``,
  ``A - s + 1`` and ``A - s`` for every candidate step ``s`` in ``settings.steps``), along its output
  channels and along its input channels, the other axis at full width. oneDNN (and GPU libraries) pad
  channels to blocks of 8 / 16 / 32: removing channels inside a block saves nothing, removing the whole
  block saves a step. ``detect_step`` keeps the largest ``s`` whose probes show exactly that (flat within
  the step, a drop across it): the width multiple that layer likes (1 when no step shows);
* **the grid**: the layer at every pair of input and output widths ``settings.grid`` × its full width
  (rounded to that step), so latency at any pair of widths is a bilinear interpolation in the table;
* **the calibration**: the whole model, a copy of it cut to half the width of every group, and every
  measured layer at full width, timed together (interleaved). Each layer's grid is scaled to its time
  here, so layers measured minutes apart agree with each other and with the model; what the layers leave
  of the model's time, ``fixed = a + b · v`` (``v``: the share of the layers' output activations kept), is
  fitted through the full and the half model: ``a`` the framework's overhead, ``b`` the activations,
  pooling and residual sums that shrink with the channels (``LatencyModel``).

Only the axes a cut can change are probed (an axis whose channels belong to a prunable group); a layer no
cut can change is not measured at all (its time is part of ``fixed``). Every set of timings is taken
interleaved (each probe called in turn, ABBA order, after ``warmup`` calls) and summarised by its median,
so the drift of a busy machine falls on all probes alike.

A table is plain JSON (``FORMAT``) keyed on what changes latency: the layer shapes and input size (the
model's signature), the device's name, the thread count, the dtype, the backend, the batch size and the
torch version. ``latency_table`` keeps one file per model and settings in the cache directory
(``$SLIMNET_CACHE/latency``, by default ``~/.cache/slimnet/latency``) and refuses, with a one-line
``LatencyTableError``, a table measured elsewhere (another device, thread count, dtype, backend, batch or
torch; or another model or input size). A table brought from the deployment device is accepted when
``settings.device_name`` names that device: nothing is then measured here, and the torch version is not
compared. The time spent building a table is kept in it (``seconds``) and reported.

Backends: ``eager`` (plain PyTorch, NCHW; the default), ``channels_last`` (eager in NHWC),
``torchscript`` (``torch.jit.trace`` + ``freeze``, which folds BatchNorm into the conv) and
``onnxruntime`` (each probe written as an ONNX graph, the model exported by ``torch.onnx``; needs onnx and
onnxruntime). No training framework is imported.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from slimnet.engine.atomic import atomic_write
from slimnet.engine.plan import plan_for
from slimnet.engine.surgery import apply_plan
from slimnet.errors import LatencyTableError, UnreadableFileError, first_line
from slimnet.graph import ChannelGraph, trace_channel_groups
from slimnet.modes import preserved_modes

FORMAT = "slimnet-latency-table/1"
BACKENDS = ("eager", "channels_last", "torchscript", "onnxruntime")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# what changes latency besides the layer shapes: a table measured with other values is refused
KEY_FIELDS = ("device", "threads", "dtype", "backend", "batch", "torch")

Call = Callable[[], object]


@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured, and what a table must have been measured with.

    Attributes:
        batch: the batch size latency is measured at (1: latency; 16: throughput).
        threads: intra-op threads (torch's and onnxruntime's). One gives steady numbers on a shared machine.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (probes and model are cast for timing only).
        backend: one of ``BACKENDS``.
        device: the torch device timed on (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        device_name: the deployment device a brought table was measured on (its ``key["device"]``); then
            nothing is timed here, a table is required, and the cut is not measured afterwards. None: here.
        grid: fractions of each layer's width at which the grid is measured (1.0 is always added).
        steps: candidate rounding steps (channel multiples) probed per layer; ``()`` probes none.
        warmup, repeats: untimed and timed calls per probe (medians of interleaved calls).
        model_repeats: timed calls of the whole model (building the table; checking the cut).
        tolerance: after the cut, a measured latency off the prediction by more than this (relative) warns.
        check: measure the cut model against the uncut one afterwards (costs a copy of the model).
        cache_dir: where tables are cached (None: ``$SLIMNET_CACHE/latency`` or ``~/.cache/slimnet/latency``).
    """

    batch: int = 1
    threads: int = 1
    dtype: str = "float32"
    backend: str = "eager"
    device: str = "cpu"
    device_name: str | None = None
    grid: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    steps: tuple[int, ...] = (2, 4, 8, 16, 32)
    warmup: int = 2
    repeats: int = 7
    model_repeats: int = 20
    # a quiet host's per-round spread: about ±5 %; a table built beside other work: 17 % off (docs/latency_budget.md)
    tolerance: float = 0.1
    check: bool = True
    cache_dir: str | None = None

    @classmethod
    def of(cls, value) -> LatencySettings:
        """Settings from None (the defaults), a mapping of fields, or settings."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if hasattr(value, "items"):
            names = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise LatencyTableError(f"latency settings: unknown key(s) {unknown}; known: "
                                        f"{', '.join(sorted(names))}")
            data = dict(value)
            for name in ("grid", "steps"):
                if name in data and data[name] is not None:
                    data[name] = tuple(data[name])
            return cls(**data)
        raise LatencyTableError(f"latency settings must be a mapping or LatencySettings, got {type(value).__name__}")

    @property
    def here(self) -> bool:
        """Whether the table is (or can be) measured on this machine."""
        return self.device_name is None

    def validate(self, have_table: bool = False) -> None:
        """One-line ``LatencyTableError`` when these settings cannot give a table (before anything is timed)."""
        if self.backend not in BACKENDS:
            raise LatencyTableError(f"latency backend {self.backend!r} is unknown; choose from: {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise LatencyTableError(f"latency dtype {self.dtype!r} is unknown; choose from: {', '.join(DTYPES)}")
        for name, low in (("batch", 1), ("threads", 1), ("warmup", 0), ("repeats", 2), ("model_repeats", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise LatencyTableError(f"latency {name}={value!r} must be an integer >= {low}")
        if not self.grid or not all(0 < f <= 1 for f in self.grid):
            raise LatencyTableError(f"latency grid={self.grid} must be fractions in (0, 1]")
        if not all(isinstance(s, int) and s >= 2 for s in self.steps):
            raise LatencyTableError(f"latency steps={self.steps} must be integers >= 2")
        if not self.tolerance > 0:
            raise LatencyTableError(f"latency tolerance={self.tolerance} must be > 0")
        if not self.here:
            if not have_table:
                raise LatencyTableError(f"latency device_name={self.device_name!r} names another device: bring the "
                                        "table measured there (latency_table=<path>), nothing is measured here")
            return
        if self.backend == "onnxruntime":
            try:
                import onnx  # noqa: F401
                import onnxruntime  # noqa: F401
            except ImportError:
                raise LatencyTableError("latency backend onnxruntime needs onnx and onnxruntime: pip install "
                                        "'slimnet[export]' (or use backend=eager)") from None
            if self.dtype != "float32" or not self.device.startswith("cpu"):
                raise LatencyTableError("latency backend onnxruntime is measured on the CPU in float32 only")
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise LatencyTableError(f"latency device {self.device!r}: {first_line(err)}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise LatencyTableError(f"latency device {self.device!r}: CUDA is not available here; measure on the "
                                    "CPU (device=cpu) or bring a table measured on the GPU")
        if device.type not in ("cpu", "cuda"):
            raise LatencyTableError(f"latency device {self.device!r}: only cpu and cuda can be timed")

    def key(self) -> dict:
        """What changes latency besides the layer shapes (``KEY_FIELDS``), for this machine or the named device."""
        return {"device": self.device_name if not self.here else device_name(self.device), "threads": self.threads,
                "dtype": self.dtype, "backend": self.backend, "batch": self.batch, "torch": torch.__version__}


def device_name(device: str = "cpu") -> str:
    """The device's name as a table records it: the CPU model and its SIMD level, or the GPU's name."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"cpu: {name} ({torch.backends.cpu.get_cpu_capability()})"


# --------------------------------------------------------------------------------------------------
# The model's layers
# --------------------------------------------------------------------------------------------------


@dataclass
class LayerCall:
    """One call of a conv / linear layer in the forward: its shapes (``spec``) and which axes a cut changes."""

    module: str
    spec: dict
    vary_in: bool = False
    vary_out: bool = False
    positions: int = 1  # output positions per sample (H·W of a conv's output): weighs its channels' activations

    @property
    def signature(self) -> str:
        return signature(self.spec)


def signature(spec: dict) -> str:
    """A layer's shapes as a short stable string (the table's key for its measurements)."""
    if spec["op"] == "linear":
        text = f"linear {spec['in']}->{spec['out']}"
    else:
        dims = "x".join(str(k) for k in spec["kernel"])
        text = (f"conv{len(spec['kernel'])}d {spec['in']}->{spec['out']} k{dims} s{_short(spec['stride'])} "
                f"p{_short(spec['padding'])} d{_short(spec['dilation'])} g{spec['groups']}")
        if spec["padding_mode"] != "zeros":
            text += f" {spec['padding_mode']}"
    text += f"{' bias' if spec['bias'] else ''}{' +bn' if spec['norm'] else ''} @{'x'.join(map(str, spec['input']))}"
    return text


def _short(value) -> str:
    if isinstance(value, str):
        return value
    return str(value[0]) if len(set(value)) == 1 else "x".join(map(str, value))


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, _ConvNd) and not m.transposed and m.weight.dim() in (3, 4, 5))


def _batch_of(example_inputs, n: int):
    """The inputs with batch size ``n``: each tensor's first sample repeated (values kept, shapes changed)."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    return tuple(x[:1].repeat(n, *([1] * (x.dim() - 1))) if isinstance(x, torch.Tensor) and x.dim() > 0 else x
                 for x in inputs)


@torch.no_grad()
def model_layers(model: nn.Module, example_inputs, graph: ChannelGraph) -> list[LayerCall]:
    """Every conv / linear call of one eval-mode forward, with its input size and whether a cut can change
    its input or output channels (an axis in a prunable group of ``graph``)."""
    calls: list[LayerCall] = []
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}

    def hook(m, args, out):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
            width = out.shape[-1] if isinstance(m, nn.Linear) else out.shape[1]
            calls.append(LayerCall(names[id(m)], _spec(m, x, graph.norm_after.get(names[id(m)])),
                                   positions=max(out.numel() // max(width * out.shape[0], 1), 1)))

    handles = [m.register_forward_hook(hook) for m in modules.values() if _is_layer(m)]
    try:
        with preserved_modes(model):
            model.eval()
            model(*_batch_of(example_inputs, 1))
    finally:
        for h in handles:
            h.remove()
    prunable = {g.id for g in graph.groups if g.prunable}
    for call in calls:
        axes = graph.axes
        if call.spec.get("dw"):
            call.vary_out = any(gid in prunable for gid, _, _ in axes.get((call.module, "dw"), ()))
        else:
            call.vary_in = any(gid in prunable for gid, _, _ in axes.get((call.module, "in"), ()))
            call.vary_out = any(gid in prunable for gid, _, _ in axes.get((call.module, "out"), ()))
    return calls


def _spec(m: nn.Module, x: torch.Tensor, norm: str | None) -> dict:
    if isinstance(m, nn.Linear):
        return {"op": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
                "norm": norm is not None, "input": list(x.shape[1:-1])}
    dw = m.groups > 1 and m.groups == m.in_channels == m.out_channels
    return {"op": "conv", "in": m.in_channels, "out": m.out_channels, "kernel": list(m.kernel_size),
            "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
            "dilation": list(m.dilation), "groups": m.groups, "dw": dw, "bias": m.bias is not None,
            "padding_mode": m.padding_mode, "norm": norm is not None, "input": list(x.shape[2:])}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def interleaved(calls: list[Call], warmup: int, repeats: int,
                sync: Callable[[], None] | None = None) -> list[list[float]]:
    """Seconds per call of each of ``calls``, timed in turn (ABBA order) after ``warmup`` calls of each."""
    for call in calls:
        for _ in range(warmup):
            call()
    if sync:
        sync()
    times: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    for r in range(repeats):
        for i in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            calls[i]()
            if sync:
                sync()
            times[i].append(time.perf_counter() - start)
    return times


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


@contextlib.contextmanager
def timing_context(settings: LatencySettings):
    """Fixed intra-op threads and inference mode for the whole measurement."""
    before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(before)


def _sync(settings: LatencySettings):
    dev = torch.device(settings.device)
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None


def _block(spec: dict, ci: int, co: int, settings: LatencySettings) -> tuple[nn.Module, torch.Tensor]:
    """The layer (and its BatchNorm) at widths ``ci`` -> ``co``, in eval mode, and an input for it."""
    dtype, device = DTYPES[settings.dtype], torch.device(settings.device)
    if spec["op"] == "linear":
        layer = nn.Linear(ci, co, bias=spec["bias"])
        norm = nn.BatchNorm1d(co) if spec["norm"] else None
        x = torch.randn(settings.batch, *spec["input"], ci)
    else:
        dims = len(spec["kernel"])
        groups = ci if spec["dw"] else spec["groups"]
        layer = getattr(nn, f"Conv{dims}d")(ci, co, spec["kernel"], spec["stride"], spec["padding"], spec["dilation"],
                                           groups=groups, bias=spec["bias"], padding_mode=spec["padding_mode"])
        norm = getattr(nn, f"BatchNorm{dims}d")(co) if spec["norm"] else None
        x = torch.randn(settings.batch, ci, *spec["input"])
    if norm is not None:
        norm.running_var.uniform_(0.5, 1.5)
    block = (nn.Sequential(layer, norm) if norm is not None else nn.Sequential(layer)).eval()
    return block.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype)


def _bind(block: nn.Module, x: torch.Tensor, spec: dict, settings: LatencySettings) -> Call:
    """One timed call of a probe block in the settings' backend."""
    if settings.backend == "eager":
        return lambda: block(x)
    if settings.backend == "channels_last":
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        if fmt is None:
            return lambda: block(x)
        block, x = block.to(memory_format=fmt), x.contiguous(memory_format=fmt)
        return lambda: block(x)
    if settings.backend == "torchscript":
        scripted = _torchscript(block, (x,))
        return lambda: scripted(x)
    session, feed = _onnx_probe(block, x, spec, settings)
    return lambda: session.run(None, feed)


def _torchscript(model: nn.Module, inputs: tuple):
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(model.eval(), inputs))


def _ort_session(data: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _onnx_probe(block: nn.Module, x: torch.Tensor, spec: dict, settings: LatencySettings):
    """The probe written directly as an ONNX graph (Conv / MatMul, BatchNormalization): no exporter to wait
    for, what onnxruntime runs for that layer in an exported model."""
    from onnx import TensorProto, helper, numpy_helper

    layer, norm = block[0], block[1] if len(block) > 1 else None
    inits, nodes = [numpy_helper.from_array(layer.weight.detach().numpy(), "W")], []
    if isinstance(layer, nn.Linear):
        inits[0] = numpy_helper.from_array(layer.weight.detach().t().contiguous().numpy(), "W")
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["y0"]))
        last = "y0"
        if layer.bias is not None:
            inits.append(numpy_helper.from_array(layer.bias.detach().numpy(), "B"))
            nodes.append(helper.make_node("Add", ["y0", "B"], ["y1"]))
            last = "y1"
        if norm is not None:  # BatchNorm1d over the last axis of a (N, F) input
            nodes.append(helper.make_node("Unsqueeze", [last, "axes"], ["y2"]))
            inits.append(numpy_helper.from_array(torch.tensor([-1]).numpy(), "axes"))
            last = "y2"
    else:
        pads = layer.padding
        attrs = {"kernel_shape": list(layer.kernel_size), "strides": list(layer.stride),
                 "dilations": list(layer.dilation), "group": layer.groups}
        if isinstance(pads, str):
            attrs["auto_pad"] = "SAME_UPPER" if pads == "same" else "VALID"
        else:
            attrs["pads"] = list(pads) * 2
        ins = ["x", "W"]
        if layer.bias is not None:
            inits.append(numpy_helper.from_array(layer.bias.detach().numpy(), "B"))
            ins.append("B")
        nodes.append(helper.make_node("Conv", ins, ["y0"], **attrs))
        last = "y0"
    if norm is not None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            inits.append(numpy_helper.from_array(getattr(norm, name).detach().numpy(), f"bn_{name}"))
        nodes.append(helper.make_node("BatchNormalization", [last, "bn_weight", "bn_bias", "bn_running_mean",
                                                             "bn_running_var"], ["y"], epsilon=norm.eps))
    else:
        nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = _ort_session(onnx_model.SerializeToString(), settings.threads)
    return session, {"x": x.numpy()}


def model_call(model: nn.Module, example_inputs, settings: LatencySettings) -> Call:
    """One timed forward of ``model`` (in eval mode) at the settings' batch, dtype, device and backend; the
    model itself is only read (a backend that converts works on a copy)."""
    inputs = tuple(x.to(device=settings.device, dtype=DTYPES[settings.dtype]) if isinstance(x, torch.Tensor)
                   and x.is_floating_point() else x for x in _batch_of(example_inputs, settings.batch))
    # a model trained in NHWC (channels_last=true) is timed as deployed: NCHW, unless the backend says otherwise
    nhwc = any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters())
    needs_copy = settings.backend != "eager" or settings.dtype != "float32" or settings.device != "cpu" or nhwc
    net = copy.deepcopy(model) if needs_copy else model
    if needs_copy:
        net = net.to(device=settings.device, dtype=DTYPES[settings.dtype]).eval()
        if nhwc:
            net = net.to(memory_format=torch.contiguous_format)
    if settings.backend == "eager":
        return lambda: net(*inputs)
    if settings.backend == "channels_last":
        net = net.to(memory_format=torch.channels_last)
        inputs = tuple(x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) and x.dim() == 4
                       else x for x in inputs)
        return lambda: net(*inputs)
    if settings.backend == "torchscript":
        try:
            scripted = _torchscript(net, inputs)
        except Exception as err:  # noqa: BLE001 - any failure: this backend cannot run the model
            raise LatencyTableError(f"latency backend torchscript cannot trace {type(model).__name__}: "
                                    f"{first_line(err)} (use backend=eager)") from None
        return lambda: scripted(*inputs)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), \
                tempfile.TemporaryDirectory(prefix="slimnet-latency-") as tmp:
            warnings.simplefilter("ignore")
            program = torch.onnx.export(net, inputs, dynamo=True, verbose=False)
            program.save(str(Path(tmp) / "model.onnx"), external_data=False)
            session = _ort_session((Path(tmp) / "model.onnx").read_bytes(), settings.threads)
    except Exception as err:  # noqa: BLE001
        raise LatencyTableError(f"latency backend onnxruntime cannot export {type(model).__name__}: "
                                f"{first_line(err)} (use backend=eager)") from None
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feed)


def time_models(models: list[nn.Module], example_inputs, settings: LatencySettings, repeats: int | None = None
                ) -> list[list[float]]:
    """Seconds per forward of each model, interleaved (ABBA), at the settings' batch, threads and backend."""
    with model_calls(models, example_inputs, settings) as calls:
        return interleaved(calls, max(settings.warmup, 2), repeats or settings.model_repeats, _sync(settings))


@contextlib.contextmanager
def model_calls(models: list[nn.Module], example_inputs, settings: LatencySettings):
    """One timed call per model, each in eval mode (restored after) under the settings' threads."""
    with contextlib.ExitStack() as stack:
        for m in models:
            stack.enter_context(preserved_modes(m))
            m.eval()
        stack.enter_context(timing_context(settings))
        yield [model_call(m, example_inputs, settings) for m in models]


# --------------------------------------------------------------------------------------------------
# Rounding steps and the grid
# --------------------------------------------------------------------------------------------------


def aligned_width(full: int, steps) -> int:
    """The width the rounding probes start under: a multiple of the largest step near half the layer (at most
    4 steps, where one step is still a clear share of the time); the layer's width if it is narrower."""
    big = max(steps) if steps else 1
    if full < 2 * big:
        return full
    return max(big, min(round(full / 2 / big), 4) * big)


def probe_widths(full: int, steps) -> list[int]:
    """Widths the rounding probes time: ``A`` and, for each step ``s`` with ``2s <= A``, both sides of the two
    step edges under it: ``A - s + 1``, ``A - s``, ``A - 2s + 1``, ``A - 2s`` (those above 0)."""
    a = aligned_width(full, steps)
    widths = {a}
    for s in steps:
        if 2 * s <= a:
            widths |= {w for w in (a - s + 1, a - s, a - 2 * s + 1, a - 2 * s) if w > 0}
    return sorted(widths)


def detect_step(ms: dict[int, float], full: int, steps) -> int:
    """The largest candidate step ``s`` that the probes ``ms`` (width -> ms) show as a staircase at the edges
    under the aligned width ``A`` (at ``A`` and ``A - s``, or only ``A`` when ``A - 2s`` is 0): inside a step,
    removing ``s - 1`` channels saves little (under 35 % of what the whole step saves), and the steps save at
    least half of their share of the time (``s / A`` each). 1 when no step shows."""
    a = aligned_width(full, steps)
    best = 1
    for s in sorted(steps):
        if 2 * s > a:
            continue
        tops = [t for t in (a, a - s) if t - s > 0 and all(w in ms for w in (t, t - s + 1, t - s))]
        if a not in tops:
            continue
        flat = sum(ms[t] - ms[t - s + 1] for t in tops)
        drop = sum(ms[t] - ms[t - s] for t in tops)
        if drop >= 0.5 * s / a * ms[a] * len(tops) and flat < 0.35 * drop:
            best = s
    return best


def grid_widths(full: int, fractions, step: int, multiple: int = 1) -> list[int]:
    """The grid's widths along one axis: each fraction of ``full`` rounded to a multiple of the layer's step
    (and of ``multiple``, a grouped conv's groups), and ``full`` itself."""
    unit = math.lcm(max(step, 1), multiple)
    widths = {full}
    for f in fractions:
        w = max(unit, round(f * full / unit) * unit)
        if w < full:
            widths.add(w)
    return sorted(widths)


# --------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------


def _monotone(ms: list[list[float]]) -> list[list[float]]:
    """The grid made non-decreasing along both axes (the mean of its running max from below and its running
    min from above): noise must not tell the knapsack that a wider layer is faster."""
    rows, cols = len(ms), len(ms[0])
    up = [row[:] for row in ms]
    for i in range(rows):
        for j in range(cols):
            up[i][j] = max(up[i][j], up[i - 1][j] if i else -math.inf, up[i][j - 1] if j else -math.inf)
    down = [row[:] for row in ms]
    for i in reversed(range(rows)):
        for j in reversed(range(cols)):
            down[i][j] = min(down[i][j], down[i + 1][j] if i + 1 < rows else math.inf,
                             down[i][j + 1] if j + 1 < cols else math.inf)
    return [[(a + b) / 2 for a, b in zip(ra, rb)] for ra, rb in zip(up, down)]


def _bracket(xs: list[int], x: float) -> tuple[int, int, float]:
    """Indices and weight for linear interpolation in ``xs`` (extrapolating past either end)."""
    if len(xs) == 1:
        return 0, 0, 0.0
    i = min(max(bisect.bisect_left(xs, x) - 1, 0), len(xs) - 2)
    return i, i + 1, (x - xs[i]) / (xs[i + 1] - xs[i])


@dataclass
class _Layer:
    module: str
    ins: list[int]
    outs: list[int]
    ms: list[list[float]]
    in_layout: list[tuple[int, int, int]] | None  # None: the input width never changes
    out_layout: list[tuple[int, int, int]] | None
    full_in: int
    full_out: int

    def time(self, widths: dict[int, int]) -> float:
        ci = self.full_in if self.in_layout is None else sum(widths.get(g, n) * k for g, n, k in self.in_layout)
        co = self.full_out if self.out_layout is None else sum(widths.get(g, n) * k for g, n, k in self.out_layout)
        i0, i1, wi = _bracket(self.ins, ci)
        j0, j1, wj = _bracket(self.outs, co)
        m = self.ms
        top = m[i0][j0] * (1 - wj) + m[i0][j1] * wj
        bottom = m[i1][j0] * (1 - wj) + m[i1][j1] * wj
        return max(top * (1 - wi) + bottom * wi, 0.0)


def _width(layout, widths: dict[int, int], full: int) -> int:
    if layout is None:
        return full
    return sum(widths.get(gid, size) * mult for gid, size, mult in layout)


class LatencyModel:
    """``L(widths) = fixed(widths) + Σ T_layer(widths)``: a table's prediction of the model's latency (ms) for
    kept widths per group id (absent groups are whole). ``fixed = a + b · v``, ``v`` the share of the
    layers' output activations (channels × positions) kept: the time outside the measured layers is partly
    the framework's (``a``) and partly activations, pooling and sums over the channels kept (``b``)."""

    def __init__(self, layers: dict[str, dict], model: dict, graph: ChannelGraph, calls: list[LayerCall]):
        self.layers: list[_Layer] = []
        self.touching: dict[int, list[int]] = {}
        self._sizes = {g.id: g.size for g in graph.groups}
        # kept activations = constant + Σ_g per_channel[g] · n_g, over every layer's output (channels × positions)
        self.per_channel: dict[int, float] = {}
        self.full_volume, constant = 0.0, 0.0
        for call in calls:
            dw = call.spec.get("dw", False)
            layout = graph.axes.get((call.module, "dw" if dw else "out"))
            self.full_volume += call.spec["out"] * call.positions
            if layout is None:
                constant += call.spec["out"] * call.positions
            for gid, _, mult in layout or ():
                self.per_channel[gid] = self.per_channel.get(gid, 0.0) + mult * call.positions
        self.full_volume = self.full_volume or 1.0
        self._constant = constant
        for call in calls:
            entry = layers.get(call.signature)
            if entry is None or not (call.vary_in or call.vary_out):
                continue
            spec = entry["spec"]
            dw = spec.get("dw", False)
            out_layout = graph.axes.get((call.module, "dw" if dw else "out"))
            in_layout = None if dw else graph.axes.get((call.module, "in"))
            layer = _Layer(call.module, list(entry["in"]), list(entry["out"]), _monotone(entry["ms"]),
                           in_layout if len(entry["in"]) > 1 else None, out_layout if len(entry["out"]) > 1 else None,
                           spec["in"], spec["out"])
            index = len(self.layers)
            self.layers.append(layer)
            for layout in (layer.in_layout, layer.out_layout):
                for gid, _, _ in layout or ():
                    if index not in self.touching.setdefault(gid, []):
                        self.touching[gid].append(index)
        self.full_layers = self.layers_total({})
        fixed = model.get("fixed")
        if fixed is None:  # a table without calibration: what the layers leave of the model, constant
            fixed = {"a_ms": max(float(model["ms"]) - self.full_layers, 0.0), "b_ms": 0.0}
        self.a, self.b = float(fixed["a_ms"]), float(fixed["b_ms"])

    def volume(self, widths: dict[int, int]) -> float:
        """The share of the layers' output activations kept at ``widths``."""
        kept = sum(c * widths.get(g, self._sizes[g]) for g, c in self.per_channel.items())
        return (self._constant + kept) / self.full_volume

    def fixed(self, widths: dict[int, int]) -> float:
        return self.a + self.b * self.volume(widths) if self.b else self.a

    def layers_total(self, widths: dict[int, int]) -> float:
        return sum(layer.time(widths) for layer in self.layers)

    def total(self, widths: dict[int, int]) -> float:
        return self.fixed(widths) + self.layers_total(widths)

    def layers_of(self, gids) -> list[int]:
        return sorted({i for g in gids for i in self.touching.get(g, ())})

    def delta(self, widths: dict[int, int], change: dict[int, int]) -> float:
        """``L(widths updated by change) - L(widths)``, over the layers the change touches (and ``fixed``)."""
        new = {**widths, **change}
        moved = sum(self.layers[i].time(new) - self.layers[i].time(widths) for i in self.layers_of(change))
        return moved + self.fixed_change(widths, change)

    def fixed_change(self, widths: dict[int, int], new: dict[int, int]) -> float:
        """``fixed(widths updated by new) - fixed(widths)``, over the groups ``new`` names."""
        if not self.b:
            return 0.0
        return self.b * sum(self.per_channel.get(g, 0.0) * (n - widths.get(g, self._sizes[g]))
                            for g, n in new.items()) / self.full_volume


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


@dataclass
class LatencyTable:
    """Measured latency per layer signature and of the whole model, and what it was measured with.

    ``layers[signature]``: ``{"spec", "in": [widths], "out": [widths], "ms": [[ms per (in, out)]],
    "in_step", "out_step", "probes": {"in": {width: ms}, "out": {width: ms}}}`` (a depthwise conv has
    one row: its input is its output). ``model``: ``{"signature", "input", "layers": {module: [signature
    per call]}, "ms", "p25_ms", "p75_ms"}``. ``key``: ``KEY_FIELDS``. ``seconds``: the cost of measuring it.
    """

    key: dict
    layers: dict[str, dict]
    model: dict
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    created: str = ""
    path: str | None = None  # where it was read from or written to
    source: str = "measured"  # "measured" (now), "cache" or "given" (a file or a table the caller passed)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "key": self.key, "seconds": self.seconds, "created": self.created,
                "settings": self.settings, "model": self.model, "layers": self.layers}

    def save(self, path) -> Path:
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=1)
        atomic_write(path, lambda f: f.write(text), binary=False)
        self.path = str(path)
        return path

    @classmethod
    def from_dict(cls, data: dict, path: str | None = None) -> LatencyTable:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise UnreadableFileError(f"{path or 'the data'} is not a slimnet latency table (format {got!r}, "
                                      f"expected {FORMAT!r})")
        layers = {}
        for sig, entry in data["layers"].items():
            probes = {axis: {int(w): float(v) for w, v in entry.get("probes", {}).get(axis, {}).items()}
                      for axis in ("in", "out")}
            layers[sig] = {**entry, "probes": probes}
        return cls(key=dict(data["key"]), layers=layers, model=dict(data["model"]),
                   seconds=float(data.get("seconds", 0)), settings=dict(data.get("settings", {})),
                   created=data.get("created", ""), path=path)

    @classmethod
    def load(cls, path) -> LatencyTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"latency table {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UnreadableFileError(f"latency table {path} is not readable JSON: {first_line(err)}") from None
        table = cls.from_dict(data, str(path))
        table.source = "given"
        return table

    def check(self, key: dict, calls: list[LayerCall], *, compare_torch: bool = True) -> None:
        """One-line ``LatencyTableError`` unless this table was measured with ``key`` for these layer calls."""
        where = f"latency table {self.path}" if self.path else "the latency table"
        names = [k for k in KEY_FIELDS if k != "torch" or compare_torch]
        differ = [k for k in names if self.key.get(k) != key.get(k)]
        if differ:
            theirs = ", ".join(f"{k}={self.key.get(k)!r}" for k in differ)
            ours = ", ".join(f"{k}={key.get(k)!r}" for k in differ)
            raise LatencyTableError(f"{where} was measured elsewhere ({theirs}; this cut wants {ours}): measure it "
                                    "here (latency_table=None) or bring one measured with these settings")
        recorded = self.model.get("layers", {})
        seen: dict[str, int] = {}
        for call in calls:
            i = seen[call.module] = seen.get(call.module, -1) + 1
            sigs = recorded.get(call.module, [])
            if i >= len(sigs) or sigs[i] != call.signature:
                had = f"it has {sigs[i]!r}" if i < len(sigs) else "it has no entry for that layer"
                raise LatencyTableError(f"{where} was measured for another model or input size: layer "
                                        f"{call.module!r} is {call.signature!r} here, {had}")
            entry = self.layers.get(call.signature)
            if entry is None:
                raise LatencyTableError(f"{where} has no measurements for {call.signature!r} ({call.module})")
            if call.vary_out and len(entry["out"]) < 2 or call.vary_in and len(entry["in"]) < 2:
                raise LatencyTableError(f"{where} measured {call.module!r} at one width only, but a cut can change it "
                                        "here: re-measure it with these prune settings")
        extra = set(recorded) - {c.module for c in calls}
        if extra:
            raise LatencyTableError(f"{where} was measured for another model: it has layer {min(extra)!r}, "
                                    "which this model does not run")


def model_signature(example_inputs, calls: list[LayerCall]) -> str:
    """The model's shapes as the table keys them: its input sizes and each layer call's signature."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    shapes = [list(x.shape[1:]) if isinstance(x, torch.Tensor) else repr(x) for x in inputs]
    text = json.dumps({"input": shapes, "layers": [[c.module, c.signature, c.vary_in, c.vary_out] for c in calls]})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(settings: LatencySettings, example_inputs, calls: list[LayerCall]) -> Path:
    """The cache file of a model's table under ``settings``: named by the model's shapes and by the key
    (and the grid and steps, which change what the table holds)."""
    root = Path(settings.cache_dir) if settings.cache_dir else Path(
        os.environ.get("SLIMNET_CACHE", Path.home() / ".cache" / "slimnet")) / "latency"
    what = json.dumps({"key": settings.key(), "grid": sorted(settings.grid), "steps": sorted(settings.steps)},
                      sort_keys=True)
    return root / f"{model_signature(example_inputs, calls)}-{hashlib.sha256(what.encode()).hexdigest()[:12]}.json"


def build_latency_table(model: nn.Module, example_inputs, settings=None, *, graph: ChannelGraph | None = None,
                        calls: list[LayerCall] | None = None, leaf_modules=()) -> LatencyTable:
    """Measure a model's latency table here (see the module's docstring); nothing is cached or read."""
    settings = LatencySettings.of(settings)
    settings.validate()
    start = time.perf_counter()
    if calls is None:
        graph = graph if graph is not None else trace_channel_groups(model, example_inputs, leaf_modules)
        calls = model_layers(model, example_inputs, graph)
    wanted: dict[str, dict] = {}  # signature -> {"spec", "in", "out"}: union of what its calls need
    for call in calls:
        if call.vary_in or call.vary_out:
            want = wanted.setdefault(call.signature, {"spec": call.spec, "in": False, "out": False})
            want["in"] |= call.vary_in
            want["out"] |= call.vary_out
    layers = {}
    sync = _sync(settings)
    with timing_context(settings):
        for sig, want in wanted.items():
            layers[sig] = _measure_layer(want["spec"], want["in"], want["out"], settings, sync)
    model_info = {"signature": model_signature(example_inputs, calls),
                  "input": [list(x.shape[1:]) for x in _batch_of(example_inputs, 1) if isinstance(x, torch.Tensor)],
                  "layers": {}}
    for call in calls:
        model_info["layers"].setdefault(call.module, []).append(call.signature)
    if graph is None:
        graph = trace_channel_groups(model, example_inputs, leaf_modules)
    model_info.update(_calibrate(model, example_inputs, graph, calls, layers, settings))
    kept = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()
            if k in ("grid", "steps", "warmup", "repeats", "model_repeats")}
    return LatencyTable(key=settings.key(), layers=layers, model=model_info, seconds=time.perf_counter() - start,
                        settings=kept, created=time.strftime("%Y-%m-%dT%H:%M:%S"), source="measured")


def _half_copy(model: nn.Module, graph: ChannelGraph) -> tuple[nn.Module | None, dict[int, int]]:
    """A copy of ``model`` with every prunable group (not tied to another) cut to about half its width, and
    those widths; ``(None, {})`` when nothing can be cut or the cut copy does not run."""
    tied = {g for tie in graph.ties for g, _ in tie}
    kept = {}
    for group in graph.groups:
        if not group.prunable or group.id in tied or group.size < 2:
            continue
        per = group.size // group.blocks
        n = max(1, per // 2)
        kept[group.id] = torch.tensor([b * per + i for b in range(group.blocks) for i in range(n)])
    if not kept:
        return None, {}
    half = copy.deepcopy(model)
    try:
        apply_plan(half, plan_for(graph, kept))
    except Exception:  # noqa: BLE001 - no calibration point: the prediction keeps `fixed` constant
        return None, {}
    return half, {g: len(idx) for g, idx in kept.items()}


def _calibrate(model: nn.Module, example_inputs, graph: ChannelGraph, calls: list[LayerCall], layers: dict,
               settings: LatencySettings) -> dict:
    """Time, interleaved, the model, a copy cut to half width, and each measured layer at full width: each
    layer's grid is scaled to its time here (so probes measured minutes apart agree with each other and with
    the model), and ``fixed = a + b · v`` is fitted through the time the layers leave of the full and the half
    model (``LatencyModel``). Model entries of the table: ``ms``, ``p25_ms``, ``p75_ms``, ``fixed``,
    ``calibration``."""
    half, half_widths = _half_copy(model, graph)
    sigs = list(layers)
    models = [model] + ([half] if half is not None else [])
    with model_calls(models, example_inputs, settings) as calls_:
        try:
            for sig in sigs:
                entry = layers[sig]
                spec = entry["spec"]
                block, x = _block(spec, spec["out"] if spec.get("dw") else spec["in"], spec["out"], settings)
                calls_.append(_bind(block, x, spec, settings))
            times = interleaved(calls_, max(settings.warmup, 2), settings.model_repeats, _sync(settings))
        except Exception as err:
            if half is None:
                raise
            # the half copy does not run in this backend: calibrate without it
            warnings.warn(f"latency table: the half-width copy cannot be timed ({first_line(err)}); "
                          "the time outside the layers is kept constant", stacklevel=3)
            return _calibrate(model, example_inputs, _no_groups(graph), calls, layers, settings)
    model_ms = sorted(t * 1e3 for t in times[0])
    q = statistics.quantiles(model_ms, n=4, method="inclusive")
    full_ms = statistics.median(model_ms)
    for sig, t in zip(sigs, times[len(models):]):
        entry = layers[sig]
        scale = median_ms(t) / entry["ms"][-1][-1] if entry["ms"][-1][-1] > 0 else 1.0
        entry["ms"] = [[v * scale for v in row] for row in entry["ms"]]
        entry["probes"] = {axis: {w: v * scale for w, v in p.items()} for axis, p in entry["probes"].items()}
        entry["scale"] = scale
    info = {"ms": full_ms, "p25_ms": q[0], "p75_ms": q[2], "fixed": {"a_ms": 0.0, "b_ms": 0.0}}
    predictor = LatencyModel(layers, info, graph, calls)
    layers_full = predictor.layers_total({})
    layer_scale = 1.0
    if layers_full > full_ms > 0:  # alone, the layers took longer than inside the model: scale them to it
        layer_scale = full_ms / layers_full
        for entry in layers.values():
            entry["ms"] = [[v * layer_scale for v in row] for row in entry["ms"]]
            entry["probes"] = {axis: {w: v * layer_scale for w, v in p.items()} for axis, p in entry["probes"].items()}
        predictor = LatencyModel(layers, info, graph, calls)
        layers_full = predictor.layers_total({})
    fixed_full = max(full_ms - layers_full, 0.0)
    a, b = fixed_full, 0.0
    calibration = {"layers_full_ms": layers_full, "layer_scale": layer_scale}
    if half is not None:
        half_ms = median_ms(times[1])
        v_half = predictor.volume(half_widths)
        layers_half = predictor.layers_total(half_widths)
        fixed_half = half_ms - layers_half
        if v_half < 1:
            b = min(max((fixed_full - fixed_half) / (1 - v_half), 0.0), fixed_full)
            a = fixed_full - b
        calibration.update({"half_ms": half_ms, "half_volume": v_half, "layers_half_ms": layers_half,
                            "half_predicted_ms": a + b * v_half + layers_half})
    info["fixed"] = {"a_ms": a, "b_ms": b}
    info["calibration"] = calibration
    return info


def _no_groups(graph: ChannelGraph) -> ChannelGraph:
    """The graph with nothing prunable (for a calibration without the half-width copy)."""
    return ChannelGraph(groups=[], axes=graph.axes, norm_after=graph.norm_after)


def _measure_layer(spec: dict, vary_in: bool, vary_out: bool, settings: LatencySettings, sync) -> dict:
    """The rounding probes, then the grid, of one layer signature (see the module's docstring)."""
    full_in, full_out = spec["in"], spec["out"]
    dw, grouped = spec.get("dw", False), spec.get("groups", 1) > 1 and not spec.get("dw", False)
    if dw:  # one width: the input is the output
        vary_in, vary_out = False, vary_in or vary_out
    probes: dict[str, dict[int, float]] = {"in": {}, "out": {}}
    steps = {"in": 1, "out": 1}
    if settings.steps and not grouped:  # a grouped conv's widths move by whole groups: no probes
        points = []
        for axis, full, vary in (("in", full_in, vary_in), ("out", full_out, vary_out)):
            if vary:
                points += [(axis, w) for w in probe_widths(full, settings.steps)]
        calls = []
        for axis, w in points:
            ci = w if axis == "in" else (w if dw else full_in)
            block, x = _block(spec, ci, w if axis == "out" else full_out, settings)
            calls.append(_bind(block, x, spec, settings))
        times = interleaved(calls, settings.warmup, settings.repeats, sync)
        for (axis, w), t in zip(points, times):
            probes[axis][w] = median_ms(t)
        for axis, full in (("in", full_in), ("out", full_out)):
            if probes[axis]:
                steps[axis] = detect_step(probes[axis], full, settings.steps)
    multiple = spec.get("groups", 1) if grouped else 1
    ins = grid_widths(full_in, settings.grid, steps["in"], multiple) if vary_in else [full_in]
    outs = grid_widths(full_out, settings.grid, steps["out"], multiple) if vary_out else [full_out]
    points = [(ci, co) for ci in ins for co in outs]
    calls = []
    for ci, co in points:
        block, x = _block(spec, co if dw else ci, co, settings)
        calls.append(_bind(block, x, spec, settings))
    times = interleaved(calls, settings.warmup, settings.repeats, sync)
    ms = [[0.0] * len(outs) for _ in ins]
    for (ci, co), t in zip(points, times):
        ms[ins.index(ci)][outs.index(co)] = median_ms(t)
    return {"spec": spec, "in": ins, "out": outs, "ms": ms, "in_step": steps["in"], "out_step": steps["out"],
            "probes": probes}


def latency_table(model: nn.Module, example_inputs, settings=None, table=None, *, graph: ChannelGraph | None = None,
                  leaf_modules=()) -> LatencyTable:
    """The model's latency table: ``table`` (a ``LatencyTable`` or a JSON path) checked against the model and
    the settings, else the cached one, else measured here and cached. One-line ``LatencyTableError`` for a
    table measured elsewhere or for another model, or when there is no way to measure one."""
    settings = LatencySettings.of(settings)
    settings.validate(have_table=table is not None)
    graph = graph if graph is not None else trace_channel_groups(model, example_inputs, leaf_modules)
    calls = model_layers(model, example_inputs, graph)
    key = settings.key()
    if table is not None:
        table = table if isinstance(table, LatencyTable) else LatencyTable.load(table)
        table.check(key, calls, compare_torch=settings.here)
        if table.source == "measured":
            table.source = "given"
        return table
    path = cache_path(settings, example_inputs, calls)
    if path.is_file():
        cached = LatencyTable.load(path)
        cached.check(key, calls)
        cached.source = "cache"
        return cached
    measured = build_latency_table(model, example_inputs, settings, graph=graph, calls=calls)
    with contextlib.suppress(OSError):  # a read-only cache costs a re-measure next time, nothing else
        measured.save(path)
    return measured


__all__ = ["BACKENDS", "FORMAT", "LatencyModel", "LatencySettings", "LatencyTable", "LatencyTableError", "LayerCall",
           "build_latency_table", "detect_step", "device_name", "latency_table", "model_layers", "time_models"]
