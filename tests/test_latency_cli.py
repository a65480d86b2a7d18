"""``prune.target_latency`` through the one pipeline: the cut aims at measured latency, results.json and
the summary say predicted and measured latency, bad settings fail before training, and a sweep draws
accuracy against measured latency beside FLOPs."""

from __future__ import annotations

import csv
import logging

import pytest
from conftest import TINY

from slimnet.errors import ConfigError
from slimnet.run.pipeline import train

FAST_TABLE = ["prune.latency.threads=1"]


def test_a_latency_budget_run_reports_predicted_and_measured_latency(compose_cfg, tmp_path, single_thread, caplog):
    # wide enough that the convolutions, not the framework's overhead, are most of the latency
    cfg = compose_cfg(*TINY, "prune.target_latency=0.6", "model.cfg=[32,M,64,64]", "data.image_size=32",
                      "prune.min_channels=4", *FAST_TABLE, f"prune.latency.cache_dir={tmp_path / 'cache'}")
    with caplog.at_level(logging.INFO, logger="slimnet.run.pipeline"):
        results = train(cfg, tmp_path / "run")
    assert results["policy"] == "target_latency" and results["prune"]["target_latency"] == 0.6
    latency = results["latency_cut"]
    assert latency["feasible"] and latency["predicted"]["fraction"] <= 0.6 + 1e-9  # within the budget it predicted
    assert latency["measured"]["after_ms"] > 0 and latency["measured"]["repeats"] > 0
    assert latency["table"]["source"] == "measured" and list((tmp_path / "cache").rglob("*.json"))
    assert results["after"]["flops"] < results["before"]["flops"]
    assert all(isinstance(v.get("step"), int) for v in latency["rounding"].values())  # each layer's rounding
    summary = next(r.message for r in caplog.records if "before cut" in r.message)
    assert "latency (target_latency): predicted" in summary and "measured" in summary


@pytest.mark.parametrize("overrides, message", [
    (["prune.target_latency=1.5"], "target_latency"),
    (["prune.target_latency=0.5", "+prune.thresh=0.1"], "keep one of them"),
    (["prune.target_latency=0.5", "prune.latency.backend=tensorrt"], "backend"),
])
def test_latency_config_errors_come_before_training(compose_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        train(compose_cfg(*TINY, *overrides), tmp_path)
    assert "\n" not in str(info.value) and not (tmp_path / "checkpoints").exists()


def test_a_sweep_draws_accuracy_against_measured_latency(compose_cfg, tmp_path, single_thread):
    from slimnet.run.sweep import report

    cache = f"prune.latency.cache_dir={tmp_path / 'cache'}"
    for job, policy in (("0", "prune.target_flops=0.5"), ("1", "prune.target_latency=0.5")):
        train(compose_cfg(*TINY, policy, *FAST_TABLE, cache, "latency.batch_sizes=[1,2]"), tmp_path / job)
    csv_path, _ = report(tmp_path)
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    assert [r["target_latency"] for r in rows] == ["", "0.5"]
    assert all(float(r["latency_ms_measured"]) > 0 for r in rows)
    assert (tmp_path / "acc_vs_latency.png").stat().st_size > 0
