"""Latency measurement (``slimnet.deploy.latency``): sane numbers, honest comparisons, loud gaps.

Timing tests on a shared machine must be loose: they assert facts that hold by a wide margin (a model
is as fast as itself within 2x; a net with 1/64 of the FLOPs is faster), with one thread so a busy
second core cannot stall the measurement.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from slimnet.deploy import latency
from slimnet.deploy.latency import compare_latency, interleaved_latency, measure_latency, speedup_columns
from slimnet.models import create_model

EXAMPLE = torch.zeros(1, 3, 16, 16)
STAT_KEYS = {"median_ms", "p10_ms", "p25_ms", "p75_ms", "p90_ms", "min_ms", "n"}


def _vgg(cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("vgg", num_classes=4, in_channels=3, cfg=cfg)


def test_measure_latency_rows_per_batch_and_mode_restored():
    model = _vgg([8, "M", 16]).train()
    result = measure_latency(model, EXAMPLE, batch_sizes=(1, 4), warmup=1, repeats=6, backends=("eager",),
                             threads=1)
    assert model.training  # measured in eval mode, handed back as it came
    assert [(r["backend"], r["batch"]) for r in result["rows"]] == [("eager", 1), ("eager", 4)]
    for row in result["rows"]:
        assert set(row) == STAT_KEYS | {"backend", "batch"} and row["n"] == 6
        assert 0 < row["min_ms"] <= row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
    assert result["setup"]["threads"] == 1 and result["setup"]["repeats"] == 6
    assert result["unavailable"] == {}


def test_model_against_itself_is_about_one():
    model = _vgg([16, "M", 32])
    result = compare_latency(model, copy.deepcopy(model), EXAMPLE, batch_sizes=(4,), warmup=2, repeats=20,
                             backends=("eager",), threads=1)
    (row,) = result["rows"]
    assert 0.5 < row["speedup"] < 2.0
    assert row["speedup_p25"] <= row["speedup_p75"]


def test_much_smaller_model_is_faster_at_batch_16():
    big, small = _vgg([64, "M", 128, "M", 256]), _vgg([8, "M", 16, "M", 32])  # ~64x fewer FLOPs
    result = compare_latency(big, small, EXAMPLE, batch_sizes=(16,), warmup=2, repeats=10,
                             backends=("eager",), threads=1, flops=(64.0, 1.0))
    (row,) = result["rows"]
    assert row["speedup"] > 2.0
    assert row["flops_speedup"] == 64.0 and row["efficiency"] == pytest.approx(row["speedup"] / 64.0)
    columns = speedup_columns(result)
    assert set(columns) == {"speedup_eager_b16", "efficiency_eager_b16", "ms_a_eager_b16", "ms_b_eager_b16"}


def test_interleaved_latency_names_each_model():
    models = {"a": _vgg([8]), "b": _vgg([4])}
    result = interleaved_latency(models, EXAMPLE, batch_sizes=(2,), warmup=1, repeats=4, backends=("eager",),
                                 threads=1)
    assert [r["model"] for r in result["rows"]] == ["a", "b"]


def test_backend_that_cannot_run_is_reported_not_hidden(monkeypatch):
    def no_compiler(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setitem(latency._BACKEND_FNS, "compile", no_compiler)
    result = measure_latency(_vgg([8]), EXAMPLE, batch_sizes=(1,), warmup=1, repeats=3,
                             backends=("eager", "compile"), threads=1)
    assert [r["backend"] for r in result["rows"]] == ["eager"]
    reason = "RuntimeError: InvalidCxxCompiler: No working C++ compiler found"  # the first line only
    assert result["unavailable"] == {"compile": reason}


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="choose from: eager, channels_last, compile, onnxruntime"):
        measure_latency(_vgg([8]), EXAMPLE, backends=("tensorrt",))


@pytest.mark.skipif(not importlib.util.find_spec("onnxruntime") or not importlib.util.find_spec("onnxscript"),
                    reason="onnxruntime/onnxscript not installed (pip install 'slimnet[export]')")
def test_onnxruntime_and_channels_last_backends_time_the_model():
    result = measure_latency(_vgg([8, "M", 16]), EXAMPLE, batch_sizes=(1, 4), warmup=1, repeats=3,
                             backends=("channels_last", "onnxruntime"), threads=1)
    assert result["unavailable"] == {}
    assert {(r["backend"], r["batch"]) for r in result["rows"]} == {
        ("channels_last", 1), ("channels_last", 4), ("onnxruntime", 1), ("onnxruntime", 4)}
    assert all(r["median_ms"] > 0 for r in result["rows"])
