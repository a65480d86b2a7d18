"""Latency as a user measures it: warm-up, many timed calls, median and spread, per batch size and backend.

    from slimnet.deploy.latency import measure_latency, compare_latency, speedup_columns
    lat = measure_latency(model, torch.zeros(1, 1, 28, 28))                       # one model
    cmp = compare_latency(unpruned, pruned, torch.zeros(1, 1, 28, 28), flops=(f_before, f_after))
    speedup_columns(cmp)   # {"speedup_eager_b16": 2.31, "efficiency_eager_b16": 0.93, ...} for a CSV

How, and why:

* Each timed sample is one forward call, timed with ``time.perf_counter``, in eval mode under
  ``torch.inference_mode()``, after ``warmup`` untimed calls (which also absorb ``torch.compile``'s
  compilation and onnxruntime's first-run allocations). Inputs are random normal: latency does not
  depend on the values.
* Several models are timed interleaved, call by call, in ABBA order (A B, B A, A B, ...), so drift of a
  shared machine (another job starting, the CPU clocking down) hits all alike and none always runs right
  after another. Speed-up is median(A) / median(B); the spread of the per-round ratios A_i / B_i
  (p25..p75) says how far to trust it.
* The thread count is fixed for the whole measurement (torch's current count unless ``threads`` is
  given), used by every backend (onnxruntime gets it as intra-op threads), and recorded with the
  machine's load average, so numbers from a busy machine can be recognised. On a machine shared with
  other jobs, ``threads=1`` gives far steadier numbers: a second thread waits on a core that is busy.
* Backends (``BACKENDS``): ``eager`` (plain PyTorch, NCHW), ``channels_last`` (eager on a copy of the
  model in NHWC memory format, the input converted in each call), ``compile`` (``torch.compile``,
  inductor, one static graph per batch size; needs a C++ compiler on CPU), ``onnxruntime`` (the model
  exported by ``slimnet.deploy.export.export_onnx``; needs ``slimnet[export]``). A backend that cannot
  run here is reported under ``unavailable`` with the reason, never silently replaced by another.

Only models taking one tensor are supported. Measuring ``compile`` resets torch.compile's caches
(``torch._dynamo.reset()``), so other compiled models of the process recompile on their next call.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimnet.engine.latency_table import interleaved  # the ABBA timing loop, one for both rooms
from slimnet.errors import first_line
from slimnet.modes import preserved_modes

BACKENDS = ("eager", "channels_last", "compile", "onnxruntime")
DEFAULT_BACKENDS = ("eager", "compile", "onnxruntime")
# A run's report should cost seconds: vgg_small takes ~1 ms at batch 1 and ~10 ms at batch 16 on one core.
DEFAULT_WARMUP, DEFAULT_REPEATS = 5, 30

Call = Callable[[], Any]  # one forward on a bound input: what gets timed


# --------------------------------------------------------------------------------------------------
# Backends: backend(model, example, threads, workdir) -> bind(x) -> call()
# --------------------------------------------------------------------------------------------------


def _eager(model: nn.Module, example: torch.Tensor, threads: int, workdir: Path):
    return lambda x: (lambda: model(x))


def _channels_last(model: nn.Module, example: torch.Tensor, threads: int, workdir: Path):
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)  # a copy: the caller's stays NCHW
    return lambda x: (lambda: nhwc(x.contiguous(memory_format=torch.channels_last)))


def _compile(model: nn.Module, example: torch.Tensor, threads: int, workdir: Path):
    compiled = torch.compile(model, dynamic=False)  # a static graph per batch size: what deployment runs
    return lambda x: (lambda: compiled(x))


def _onnxruntime(model: nn.Module, example: torch.Tensor, threads: int, workdir: Path):
    from slimnet.deploy.export import export_onnx, onnx_session

    fd, path = tempfile.mkstemp(suffix=".onnx", dir=workdir)
    os.close(fd)
    with torch.no_grad():  # not inference_mode: torch.export refuses inference tensors
        export_onnx(model, example.expand(2, *example.shape[1:]).contiguous(), Path(path))
    session = onnx_session(path, threads)
    name = session.get_inputs()[0].name

    def bind(x: torch.Tensor) -> Call:
        feed = {name: x.numpy()}  # a deployment hands onnxruntime numpy arrays
        return lambda: session.run(None, feed)

    return bind


_BACKEND_FNS = {"eager": _eager, "channels_last": _channels_last, "compile": _compile,
                "onnxruntime": _onnxruntime}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in seconds)
    q = statistics.quantiles(ms, n=20, method="inclusive")  # 5 %, 10 %, ..., 95 %
    return {"median_ms": statistics.median(ms), "p10_ms": q[1], "p25_ms": q[4], "p75_ms": q[14],
            "p90_ms": q[17], "min_ms": ms[0], "n": len(ms)}


@contextlib.contextmanager
def _fixed_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_name() -> str:
    """The CPU's model name (``platform.processor()`` is empty on Linux): hosts of one machine kind
    differ, and a timing means little without it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _setup(threads: int, warmup: int, repeats: int, batch_sizes) -> dict:
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {"threads": threads, "warmup": warmup, "repeats": repeats, "batch_sizes": list(batch_sizes),
            "order": "interleaved ABBA", "torch": torch.__version__, "onnxruntime": ort_version,
            "cpu": cpu_name(), "cores": os.cpu_count(),
            "load_avg_1m_before": round(os.getloadavg()[0], 2)}


def _time_models(models: list[nn.Module], example_input: torch.Tensor, batch_sizes, warmup: int, repeats: int,
                 backends, threads: int | None) -> tuple[dict, dict, dict]:
    """``(setup, times, unavailable)``; ``times[(backend, batch)]`` holds one list of seconds per model."""
    unknown = [b for b in backends if b not in _BACKEND_FNS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from: {', '.join(BACKENDS)}")
    if repeats < 2 or warmup < 0 or not batch_sizes:
        raise ValueError(f"need repeats >= 2, warmup >= 0 and a batch size, got repeats={repeats}, "
                         f"warmup={warmup}, batch_sizes={batch_sizes}")
    threads = threads or torch.get_num_threads()
    setup = _setup(threads, warmup, repeats, batch_sizes)
    example = example_input[:1]  # (1, C, H, W)
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, *example.shape[1:], generator=gen) for b in batch_sizes}
    times, unavailable = {}, {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_fixed_threads(threads))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slimnet-latency-")))
        for m in models:
            stack.enter_context(preserved_modes(m))
            m.eval()
        if "compile" in backends:
            torch._dynamo.reset()  # fresh caches, and room for a graph per model and batch size: past
            # the recompile limit dynamo would silently run eager and we would time the wrong thing
            limit = max(torch._dynamo.config.recompile_limit, 2 * len(models) * len(batch_sizes))
            stack.enter_context(torch._dynamo.config.patch(recompile_limit=limit))
        for backend in backends:
            try:
                binders = [_BACKEND_FNS[backend](m, example, threads, workdir) for m in models]
                with torch.inference_mode():
                    for b in batch_sizes:
                        calls = [bind(inputs[b]) for bind in binders]
                        times[(backend, b)] = interleaved(calls, warmup, repeats)
            except Exception as err:
                if backend == "eager":
                    raise  # the model itself does not run: not a backend problem
                unavailable[backend] = f"{type(err).__name__}: {first_line(err)}"
                times = {k: v for k, v in times.items() if k[0] != backend}
    setup["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    return setup, times, unavailable


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def measure_latency(model: nn.Module, example_input: torch.Tensor, batch_sizes=(1, 16),
                    warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS, backends=DEFAULT_BACKENDS,
                    threads: int | None = None) -> dict:
    """Latency of ``model`` per backend and batch size.

    Args:
        model: a model taking one tensor; measured in eval mode, its train/eval mode restored after.
        example_input: a tensor shaped like the model's input, ``(N, C, H, W)``; only its shape is used.
        batch_sizes: batch 1 (latency) and a throughput batch by default.
        warmup, repeats: untimed and timed calls per backend and batch size.
        backends: any of ``BACKENDS``: ``"eager"``, ``"channels_last"``, ``"compile"``, ``"onnxruntime"``.
        threads: intra-op threads for every backend (default: ``torch.get_num_threads()``).

    Returns:
        plain JSON: ``{"setup": {threads, repeats, torch, load_avg_1m_before/after, ...},
        "rows": [{"backend", "batch", "median_ms", "p10_ms", "p25_ms", "p75_ms", "p90_ms", "min_ms", "n"}],
        "unavailable": {backend: reason}}``.
    """
    result = interleaved_latency({"model": model}, example_input, batch_sizes, warmup, repeats, backends,
                                 threads)
    for row in result["rows"]:
        del row["model"]
    return result


def interleaved_latency(models: Mapping[str, nn.Module], example_input: torch.Tensor, batch_sizes=(1, 16),
                        warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS,
                        backends=DEFAULT_BACKENDS, threads: int | None = None) -> dict:
    """Latency of several models taking the same input, timed call by call in turn (ABC CBA ...).

    Same arguments and result as ``measure_latency``, with a ``"model"`` name in each row.
    """
    setup, times, unavailable = _time_models(list(models.values()), example_input, batch_sizes, warmup,
                                             repeats, backends, threads)
    rows = [{"backend": backend, "batch": b, "model": name, **_stats(t)}
            for (backend, b), per_model in times.items() for name, t in zip(models, per_model)]
    return {"setup": setup, "rows": rows, "unavailable": unavailable}


def compare_latency(model_a: nn.Module, model_b: nn.Module, example_input: torch.Tensor, batch_sizes=(1, 16),
                    warmup: int = DEFAULT_WARMUP, repeats: int = DEFAULT_REPEATS, backends=DEFAULT_BACKENDS,
                    threads: int | None = None, flops: tuple[int, int] | None = None) -> dict:
    """Time ``model_a`` and ``model_b`` interleaved (ABBA); speed-up of B over A = median(A) / median(B).

    Same arguments as ``measure_latency``; ``flops=(flops_a, flops_b)`` (e.g. ``count_flops`` before and
    after pruning) adds ``flops_speedup`` = flops_a / flops_b (what FLOPs promise) and ``efficiency`` =
    speedup / flops_speedup (what was delivered of it: 1.0 means latency fell as much as FLOPs did).

    Returns:
        ``{"setup": {...}, "rows": [{"backend", "batch", "a": stats, "b": stats, "speedup",
        "speedup_p25", "speedup_p75", ["flops_speedup", "efficiency"]}], "unavailable": {...}}``.
    """
    setup, times, unavailable = _time_models([model_a, model_b], example_input, batch_sizes, warmup, repeats,
                                             backends, threads)
    rows = []
    for (backend, b), (ta, tb) in times.items():
        a, bstats = _stats(ta), _stats(tb)
        q = statistics.quantiles([x / y for x, y in zip(ta, tb)], n=4, method="inclusive")  # same rounds
        row = {"backend": backend, "batch": b, "a": a, "b": bstats,
               "speedup": a["median_ms"] / bstats["median_ms"], "speedup_p25": q[0], "speedup_p75": q[2]}
        if flops is not None:
            row["flops_speedup"] = flops[0] / flops[1]
            row["efficiency"] = row["speedup"] / row["flops_speedup"]
        rows.append(row)
    return {"setup": setup, "rows": rows, "unavailable": unavailable}


def speedup_columns(comparison: dict) -> dict[str, float]:
    """Flat columns of a ``compare_latency`` result, for a CSV or a metrics logger.

    ``{"speedup_eager_b16": 2.3, "efficiency_eager_b16": 0.92, "ms_a_eager_b16": 9.9, "ms_b_eager_b16": 4.3}``
    """
    columns = {}
    for row in comparison["rows"]:
        key = f"{row['backend']}_b{row['batch']}"
        columns[f"speedup_{key}"] = row["speedup"]
        if "efficiency" in row:
            columns[f"efficiency_{key}"] = row["efficiency"]
        columns[f"ms_a_{key}"] = row["a"]["median_ms"]
        columns[f"ms_b_{key}"] = row["b"]["median_ms"]
    return columns
