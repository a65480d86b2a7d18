"""``prune(target_latency=…)``: the knapsack against brute force, the latency table's cache and its refusals,
the one-line errors, the warning when measurement and prediction disagree, and real cuts on tiny tables.

Nothing here depends on how fast this machine is: the knapsack and the refusals run on constructed tables
(no timing); the real cuts assert what holds whatever the timings (a cut happens, widths are multiples
of the steps the report names, the cache is reused); the warning test uses a table that is wrong by a
factor no noise can bridge.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import warnings
from pathlib import Path

import pytest
import torch

from slimnet.engine import latency_table as lt
from slimnet.engine.cut import prune
from slimnet.engine.latency_budget import prediction_gap, solve_choices
from slimnet.engine.latency_table import (
    LatencySettings,
    LatencyTable,
    LatencyTableError,
    detect_step,
    latency_table,
    model_layers,
    probe_widths,
)
from slimnet.graph import trace_channel_groups
from slimnet.models import create_model

X = torch.zeros(1, 3, 16, 16)
CFG = [16, "M", 16, "M", 16]  # three convs, one group each, a chain: features.0 -> .4 -> .8 -> classifier
PRODUCERS = ["features.0", "features.4", "features.8"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Every test here runs with one intra-op thread (tiny ops on a shared machine)."""


def _vgg(seed: int = 0, cfg=CFG) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("vgg", num_classes=4, in_channels=3, cfg=cfg).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.01, 1.0)  # distinct |γ|: one optimum
    return model


def _one_line(err) -> None:
    assert "\n" not in str(err.value) and str(err.value)


# --------------------------------------------------------------------------------------------------
# A constructed table (no timing)
# --------------------------------------------------------------------------------------------------


def _ceil(w: int, step: int) -> int:
    return math.ceil(w / step) * step


def _toy_time(spec: dict, ci: int, co: int, stair: int = 1) -> float:
    """A made-up layer time: an overhead, and MACs (the padded widths × output positions) at a per-kind rate."""
    rate = 0.002 if spec["op"] == "conv" else 0.001
    return 0.01 + rate * _ceil(ci, stair) * _ceil(co, stair) * math.prod(spec["input"]) / 64


def _fake_table(model, time_fn, *, steps=(), fixed: float = 0.05) -> LatencyTable:
    """A table measured nowhere: every width of every layer a cut can change, from ``time_fn(spec, ci, co)``."""
    graph = trace_channel_groups(model, X)
    calls = model_layers(model, X, graph)
    layers, full = {}, fixed
    for call in calls:
        spec = call.spec
        full += time_fn(spec, spec["in"], spec["out"]) if (call.vary_in or call.vary_out) else 0.0
        if not (call.vary_in or call.vary_out) or call.signature in layers:
            continue
        ins = list(range(1, spec["in"] + 1)) if call.vary_in else [spec["in"]]
        outs = list(range(1, spec["out"] + 1)) if call.vary_out else [spec["out"]]
        probes = {"in": {w: time_fn(spec, w, spec["out"]) for w in probe_widths(spec["in"], steps)}
                  if call.vary_in and steps else {},
                  "out": {w: time_fn(spec, spec["in"], w) for w in probe_widths(spec["out"], steps)}
                  if call.vary_out and steps else {}}
        layers[call.signature] = {"spec": spec, "in": ins, "out": outs, "in_step": 1, "out_step": 1,
                                  "ms": [[time_fn(spec, ci, co) for co in outs] for ci in ins], "probes": probes}
    model_info = {"signature": lt.model_signature(X, calls), "input": [list(X.shape[1:])], "ms": full,
                  "layers": {}, "fixed": {"a_ms": fixed, "b_ms": 0.0}}
    for call in calls:
        model_info["layers"].setdefault(call.module, []).append(call.signature)
    return LatencyTable(key=LatencySettings().key(), layers=layers, model=model_info,
                        settings={"steps": list(steps)}, source="given")


def _brute_force(model, time_fn, options, target: float, fixed: float = 0.05) -> tuple[int, ...]:
    """Every combination of kept widths of the chain's three groups: the most |γ| kept within budget."""
    gammas = [model.features[i + 1].weight.detach().abs() for i in (0, 4, 8)]
    specs = {c.module: c.spec for c in model_layers(model, X, trace_channel_groups(model, X))}

    def latency(n1, n2, n3):
        return (fixed + time_fn(specs["features.0"], 3, n1) + time_fn(specs["features.4"], n1, n2)
                + time_fn(specs["features.8"], n2, n3) + time_fn(specs["classifier"], n3, 4))

    budget = target * latency(16, 16, 16)
    best, best_value = None, -1.0
    for widths in itertools.product(options, repeat=3):
        if latency(*widths) <= budget * (1 + 1e-9):  # as the search counts it: floats summed differently
            value = sum(float(torch.topk(g, n).values.sum()) for g, n in zip(gammas, widths))
            if value > best_value:
                best, best_value = widths, value
    return best


def _widths(report) -> tuple[int, ...]:
    return tuple(report["latency"]["rounding"][p]["channels"][1] for p in PRODUCERS)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_knapsack_picks_what_brute_force_picks_on_a_coupled_table(seed):
    """Each layer's time depends on two groups (its input and output): the costs are not additive, and
    the search still lands on the exhaustive optimum, at every budget."""
    for target in (0.3, 0.45, 0.6, 0.8):
        model = _vgg(seed)
        table = _fake_table(model, _toy_time)
        expected = _brute_force(model, _toy_time, range(1, 17), target)
        report = prune(model, X, target_latency=target, latency_table=table, latency_settings={"check": False},
                       fold_bias=False)
        assert _widths(report) == expected, (target, _widths(report), expected)
        assert report["latency"]["predicted"]["fraction"] <= target + 1e-9
        assert report["latency"]["measured"] is None and model(X).shape == (1, 4)


def test_knapsack_rounds_to_the_step_the_table_shows_and_matches_brute_force():
    """Latency that moves in steps of 4 channels: every group is rounded to 4 (the report says so) and the
    pick is brute force's over the multiples of 4."""
    def stairs(spec, ci, co):
        return _toy_time(spec, ci, co, stair=4)

    for target in (0.35, 0.55, 0.75):
        model = _vgg(3)
        expected = _brute_force(model, stairs, (4, 8, 12, 16), target)
        report = prune(model, X, target_latency=target, latency_table=_fake_table(model, stairs, steps=(2, 4)),
                       latency_settings={"check": False}, fold_bias=False)
        rounding = report["latency"]["rounding"]
        assert {rounding[p]["step"] for p in PRODUCERS} == {4}
        assert all(w % 4 == 0 for w in _widths(report))
        assert _widths(report) == expected


def test_solve_choices_is_exact_on_separable_instances():
    rng = random.Random(0)
    for _ in range(40):
        units = rng.randint(2, 5)
        values = [sorted(rng.uniform(0, 10) for _ in range(rng.randint(2, 5))) for _ in range(units)]
        costs = [sorted(rng.uniform(-5, 5) for _ in v) for v in values]
        low, high = sum(min(c) for c in costs), sum(max(c) for c in costs)
        capacity = rng.uniform(low, high)
        picks = solve_choices(values, costs, capacity)
        best = max((p for p in itertools.product(*[range(len(v)) for v in values])
                    if sum(c[j] for c, j in zip(costs, p)) <= capacity),
                   key=lambda p: sum(v[j] for v, j in zip(values, p)))
        assert tuple(picks) == best
    assert solve_choices([[1.0, 2.0]], [[5.0, 6.0]], 4.0) is None  # even the cheapest is over


def test_detect_step_on_staircases():
    for step in (1, 4, 8, 16, 32):
        ms = {w: 0.1 + 0.01 * _ceil(w, step) for w in probe_widths(256, (2, 4, 8, 16, 32))}
        assert detect_step(ms, 256, (2, 4, 8, 16, 32)) == step
    flat = {w: 1.0 for w in probe_widths(64, (2, 4, 8))}  # nothing saves anything: no step to prefer
    assert detect_step(flat, 64, (2, 4, 8)) == 1


# --------------------------------------------------------------------------------------------------
# The table's key, cache and refusals
# --------------------------------------------------------------------------------------------------


def test_cache_path_is_keyed_on_what_changes_latency(tmp_path):
    model = _vgg()
    calls = model_layers(model, X, trace_channel_groups(model, X))
    base = LatencySettings(cache_dir=str(tmp_path))
    path = lt.cache_path(base, X, calls)
    for change in ({"threads": 2}, {"dtype": "bfloat16"}, {"backend": "torchscript"}, {"batch": 16},
                   {"device_name": "cpu: another CPU"}):
        assert lt.cache_path(LatencySettings(**{**base.__dict__, **change}), X, calls) != path, change
    assert lt.cache_path(LatencySettings(**{**base.__dict__, "repeats": 20}), X, calls) == path  # not latency
    bigger = torch.zeros(1, 3, 32, 32)
    other = model_layers(model, bigger, trace_channel_groups(model, bigger))
    assert lt.cache_path(base, bigger, other) != path  # the input size changes every layer's shape
    wider = _vgg(cfg=[16, "M", 32, "M", 16])
    assert lt.cache_path(base, X, model_layers(wider, X, trace_channel_groups(wider, X))) != path


def test_table_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    model = _vgg()
    settings = LatencySettings(cache_dir=str(tmp_path), grid=(0.5, 1.0), steps=(), repeats=2, warmup=0,
                               model_repeats=2)
    first = latency_table(model, X, settings)
    assert first.source == "measured" and first.seconds > 0 and first.path and first.path.startswith(str(tmp_path))
    saved = json.loads(Path(first.path).read_text())
    assert saved["format"] == lt.FORMAT and saved["key"]["threads"] == 1 and saved["key"]["backend"] == "eager"

    def no_measuring(*args, **kwargs):
        raise AssertionError("the cached table should have been used")

    monkeypatch.setattr(lt, "build_latency_table", no_measuring)
    again = latency_table(model, X, settings)
    assert again.source == "cache" and again.layers == first.layers
    with pytest.raises(AssertionError):  # another thread count is another table
        latency_table(model, X, LatencySettings(**{**settings.__dict__, "threads": 2}))


@pytest.mark.parametrize("field,value", [("threads", 8), ("device", "cpu: some other CPU (AVX2)"), ("dtype", "float16"),
                                         ("backend", "onnxruntime"), ("batch", 16), ("torch", "1.13.0")])
def test_a_table_measured_elsewhere_is_refused_in_one_line(tmp_path, field, value):
    model = _vgg()
    table = _fake_table(model, _toy_time)
    table.key = {**table.key, field: value}
    path = table.save(tmp_path / "elsewhere.json")
    with pytest.raises(LatencyTableError) as err:
        prune(model, X, target_latency=0.5, latency_table=path, latency_settings={"check": False})
    _one_line(err)
    assert "measured elsewhere" in str(err.value) and f"{field}=" in str(err.value)
    assert all(m.weight.shape[0] == 16 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_a_table_for_another_input_size_or_model_is_refused_in_one_line():
    model = _vgg()
    table = _fake_table(model, _toy_time)
    with pytest.raises(LatencyTableError) as err:
        prune(model, torch.zeros(1, 3, 32, 32), target_latency=0.5, latency_table=table,
              latency_settings={"check": False})
    _one_line(err)
    assert "another model or input size" in str(err.value) and "features.0" in str(err.value)
    with pytest.raises(LatencyTableError) as err:
        prune(_vgg(cfg=[16, "M", 24, "M", 16]), X, target_latency=0.5, latency_table=table,
              latency_settings={"check": False})
    _one_line(err)


def test_a_table_from_the_deployment_device_is_used_when_named(tmp_path):
    """A table measured on another device is refused unless the settings name that device; then nothing is
    measured here (not even the cut: its latency there is unknown here), and torch versions may differ."""
    model = _vgg()
    table = _fake_table(model, _toy_time)
    table.key = {**table.key, "device": "cuda: Jetson Orin", "torch": "2.3.0"}
    path = table.save(tmp_path / "orin.json")
    report = prune(model, X, target_latency=0.5, latency_table=path,
                   latency_settings={"device_name": "cuda: Jetson Orin"})
    assert report.channels and report["latency"]["measured"] is None
    assert "another device" in report["latency"]["measured_skipped"]
    assert report["latency"]["table"]["source"] == "given"


# --------------------------------------------------------------------------------------------------
# One-line errors before anything is measured
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0, 1, 1.5, -0.2, float("nan"), "half", True])
def test_target_latency_outside_0_1_is_a_one_line_error_before_measuring(monkeypatch, tmp_path, target):
    def no_measuring(*args, **kwargs):
        raise AssertionError("nothing may be measured for an invalid target")

    monkeypatch.setattr(lt, "build_latency_table", no_measuring)
    monkeypatch.setattr(lt, "interleaved", no_measuring)
    model = _vgg()
    with pytest.raises(ValueError) as err:
        prune(model, X, target_latency=target, latency_settings={"cache_dir": str(tmp_path)})
    _one_line(err)
    assert "target_latency" in str(err.value) and "(0, 1)" in str(err.value)


def test_no_way_to_measure_and_two_policies_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(lt, "build_latency_table", lambda *a, **k: pytest.fail("measured"))
    model = _vgg()
    cases = [({"target_latency": 0.5, "latency_settings": {"device_name": "cuda: Jetson Orin"}}, "bring the table"),
             ({"target_latency": 0.5, "latency_settings": {"backend": "tensorrt"}}, "unknown"),
             ({"target_latency": 0.5, "latency_settings": {"threads": 0}}, "threads"),
             ({"target_latency": 0.5, "latency_settings": {"repeat": 3}}, "unknown key"),
             ({"target_latency": 0.5, "target_flops": 0.5}, "not two policies"),
             ({"target_latency": 0.5, "thresh": 0.1}, "not two policies")]
    for kwargs, words in cases:
        with pytest.raises(ValueError) as err:
            prune(model, X, **kwargs)
        _one_line(err)
        assert words in str(err.value), (kwargs, str(err.value))


# --------------------------------------------------------------------------------------------------
# Prediction against measurement
# --------------------------------------------------------------------------------------------------


def test_prediction_gap_names_both_numbers():
    predicted = {"before_ms": 10.0, "after_ms": 5.0}
    close = {"before_ms": 9.0, "after_ms": 4.8, "fraction": 4.8 / 9.0, "fraction_p25": 0.5, "fraction_p75": 0.56}
    assert prediction_gap(predicted, close, 0.25) is None
    far = {"before_ms": 9.0, "after_ms": 8.1, "fraction": 0.9, "fraction_p25": 0.85, "fraction_p75": 0.95}
    message = prediction_gap(predicted, far, 0.25)
    assert "\n" not in message and "8.1 ms" in message and "5 ms" in message and "0.90" in message
    assert "0.50" in message


def test_a_measured_latency_far_from_the_prediction_is_a_warning_with_both_numbers():
    """The table claims the last conv (4x4 pixels, a sliver of the real time) is nearly all of it: the
    predicted cut keeps a fifth of the latency, the real model hardly gets faster."""
    model = _vgg(cfg=[32, "M", 32, "M", 16])

    def lopsided(spec, ci, co):
        return 100.0 * co / 16 if spec["input"] == [4, 4] else 1e-4

    table = _fake_table(model, lopsided, fixed=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune(model, X, target_latency=0.2, latency_table=table,
                       latency_settings={"model_repeats": 6, "warmup": 1}, fold_bias=False)
    latency = report["latency"]
    assert latency["predicted"]["fraction"] <= 0.2 + 1e-9 and report.channels == {
        "features.8": [16, 3], "features.9": [16, 3]}
    measured = latency["measured"]
    assert measured["fraction"] > 0.4 and measured["repeats"] == 6  # the real model: far slower than predicted
    messages = [str(w.message) for w in caught if "far from the predicted" in str(w.message)]
    assert len(messages) == 1 and messages[0] in report.warnings
    assert f"{measured['after_ms']:.4g} ms" in messages[0]
    assert f"{latency['predicted']['after_ms']:.4g} ms" in messages[0]


# --------------------------------------------------------------------------------------------------
# Real cuts on tiny tables
# --------------------------------------------------------------------------------------------------

TINY = {"grid": (0.5, 1.0), "steps": (2, 4), "warmup": 1, "repeats": 3, "model_repeats": 4}


def _check_rounding(report) -> None:
    rounding = report["latency"]["rounding"]
    assert rounding
    for layer, r in rounding.items():
        before, after = r["channels"]
        assert r["step"] >= 1 and (after % r["step"] == 0 or after == before), (layer, r)
    for layer, (before, after) in report.channels.items():
        if layer in rounding:
            assert rounding[layer]["channels"] == [before, after]


def _within_budget_or_deepest(report, caught, target: float) -> None:
    """Timing decides whether the target is reachable on a tiny model (the framework's overhead is most
    of its time): either the prediction meets it, or the deepest cut was taken and said so."""
    latency = report["latency"]
    if latency["feasible"]:
        assert latency["predicted"]["fraction"] <= target + 1e-9
    else:
        assert any("the deepest cut" in str(w.message) for w in caught)
    assert latency["predicted"]["fraction"] < 1


def test_prune_target_latency_on_a_small_vgg_with_a_real_table(tmp_path):
    model = _vgg(cfg=[32, "M", 64, "M", 64])
    settings = {**TINY, "batch": 8, "cache_dir": str(tmp_path)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune(model, X, target_latency=0.8, latency_settings=settings)
    assert report.channels and report.flops_after < report.flops_before
    _within_budget_or_deepest(report, caught, 0.8)
    latency = report["latency"]
    assert latency["table"]["source"] == "measured" and latency["table"]["seconds"] > 0
    assert latency["measured"]["before_ms"] > 0 and latency["measured"]["fraction_p25"] <= latency["measured"][
        "fraction_p75"]
    assert set(latency["rounding"]) == set(PRODUCERS)
    _check_rounding(report)
    assert model(X).shape == (1, 4) and report.plan.policy["target_latency"] == 0.8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = prune(_vgg(cfg=[32, "M", 64, "M", 64]), X, target_latency=0.8, latency_settings=settings)
    assert again["latency"]["table"]["source"] == "cache"
    assert again.channels == report.channels  # same model, same table: same cut


def test_prune_target_latency_on_a_small_resnet_with_a_real_table(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=4, in_channels=3).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.01, 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune(model, X, target_latency=0.8, min_channels=2,
                       latency_settings={**TINY, "batch": 8, "cache_dir": str(tmp_path), "check": False})
    assert report.channels and report["latency"]["measured"] is None
    _within_budget_or_deepest(report, caught, 0.8)
    _check_rounding(report)
    rounding = report["latency"]["rounding"]
    residual = ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]  # one group: one rounding
    assert len({json.dumps(rounding[layer]) for layer in residual}) == 1
    assert all(r["channels"][1] >= 2 for r in rounding.values())  # min_channels holds
    assert model(X).shape == (1, 4)
