"""Sweeps as a user runs them: `python -m slimnet.train -m …`, the report, the shared sparse phase."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY
from PIL import Image

from slimnet.engine.artifact import load_pruned
from slimnet.engine.budget import threshold_for_flops
from slimnet.engine.measure import count_flops
from slimnet.models import create_model
from slimnet.run.pipeline import train
from slimnet.run.sweep import pareto_front

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["experiment=smoke", "callbacks.progress_bar=false", "logger=none"]


def _multirun(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimnet.train", "-m", *SMOKE, f"hydra.sweep.dir={sweep_dir}",
                           f"prune.cache_dir={sweep_dir / 'cache'}", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def _results(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("[0-9]*/results.json"))]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep")
    proc = _multirun(sweep_dir, "+prune.thresh=0.1,0.2,0.3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def test_sweep_writes_csv_and_curve(sweep):
    rows = list(csv.DictReader(open(sweep / "sweep.csv")))
    assert [float(r["thresh"]) for r in rows] == [0.1, 0.2, 0.3]
    assert all(r["status"] == "ok" for r in rows)
    flops = [float(r["flops"]) for r in rows]
    assert flops[0] >= flops[1] >= flops[2] and flops[2] < float(rows[0]["flops_before"])
    with Image.open(sweep / "acc_vs_flops.png") as img:
        img.verify()  # a real PNG, not an empty file
        assert img.format == "PNG" and img.size[0] > 300


def test_sparse_phase_is_trained_once_per_sweep(sweep):
    results = _results(sweep)
    trained = [r["epochs_trained_here"]["sparse"] for r in results]
    assert sorted(trained) == [0, 0, 4]  # smoke: prune.epoch=4; one job trained it, two reused it
    reused = [r["sparse_phase"]["reused"] for r in results]
    assert reused.count(False) == 1 and len({r["sparse_phase"]["key"] for r in results}) == 1
    assert all(r["epochs_trained_here"]["finetune"] == 2 for r in results)  # every job fine-tuned


def test_reused_sparse_phase_gives_the_same_architecture(sweep, compose_cfg, tmp_path):
    job = next(r for r in _results(sweep) if r["prune"]["thresh"] == 0.3)
    assert job["sparse_phase"]["reused"]
    alone = train(compose_cfg(*TINY, "+prune.thresh=0.3"), tmp_path)  # trained inside, no cache
    assert alone["sparse_phase"]["reused"] is False
    assert job["channels"] == alone["channels"]
    assert job["threshold"] == pytest.approx(alone["threshold"])


def test_a_run_reusing_the_sparse_phase_ends_bit_identical_to_the_run_that_trained_it(
        compose_cfg, tmp_path, monkeypatch):
    # The cache key hashes slimnet's source; pinned, so an edit elsewhere mid-test cannot split the key.
    monkeypatch.setattr("slimnet.run.sparse_cache.code_version", lambda: "pinned")
    overrides = [*TINY, "prune.reuse_sparse=true", f"prune.cache_dir={tmp_path / 'cache'}", "latency.enabled=false",
                 "data.augment=true"]  # the augmentation's draws from torch's generator must line up too
    trained = train(compose_cfg(*overrides), tmp_path / "trained")
    reused = train(compose_cfg(*overrides), tmp_path / "reused")
    assert not trained["sparse_phase"]["reused"] and reused["sparse_phase"]["reused"]
    assert reused["epochs_trained_here"]["sparse"] == 0
    # What a reader compares across a sweep: the same number to the last digit, from the same weights.
    for key in ("val_acc_before_cut", "val_acc_after_cut", "val_acc", "test_acc"):
        assert reused[key] == trained[key], key
    a, b = (load_pruned(r["artifact"]).state_dict() for r in (trained, reused))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failing_job_is_listed_not_fatal(tmp_path):
    proc = _multirun(tmp_path, "prune.min_channels=2,0")  # 0 is invalid: that job fails validation
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["overrides"].split()[-1]: r for r in csv.DictReader(open(tmp_path / "sweep.csv"))}
    assert rows["prune.min_channels=2"]["status"] == "ok"
    assert rows["prune.min_channels=0"]["status"] == "failed"
    assert "min_channels" in rows["prune.min_channels=0"]["error"]
    assert (tmp_path / "acc_vs_flops.png").stat().st_size > 0


def test_joblib_launcher_runs_a_two_job_sweep(tmp_path):
    proc = _multirun(tmp_path, "hydra/launcher=local_parallel", "+prune.thresh=0.1,0.3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(tmp_path)
    assert len(results) == 2 and all(r["status"] == "ok" for r in results)
    assert sum(r["epochs_trained_here"]["sparse"] for r in results) == 4  # the lock: trained once
    assert (tmp_path / "sweep.csv").is_file()


@pytest.mark.parametrize("launcher, key", [("local_parallel", "n_jobs"), ("slurm", "gpus_per_node")])
def test_launcher_configs_compose(launcher, key):
    proc = subprocess.run([sys.executable, "-m", "slimnet.train", f"hydra/launcher={launcher}", "--cfg", "hydra"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"    {key}:" in proc.stdout


def _hand_set_vgg():
    torch.manual_seed(0)
    model = create_model("vgg", num_classes=4, in_channels=3, cfg=[16, "M", 32, "M", 32]).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features)
    return model


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_budget_mode_lands_within_one_channel_step(target):
    model, x = _hand_set_vgg(), torch.zeros(1, 3, 16, 16)
    flops0 = count_flops(model, x)[0]
    thresh, flops = threshold_for_flops(model, x, target)
    assert flops <= target * flops0
    # one step lower (the next smaller |γ| among the scores) would be over budget
    scores = sorted({float(v) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
                     for v in m.weight.detach().abs()})
    lower = [s for s in scores if s < thresh]
    assert lower, "the budget should need some cut"
    import slimnet

    probe = _hand_set_vgg()
    report = slimnet.prune(probe, x, thresh=lower[-1])
    assert report["flops_after"] > target * flops0


def test_budget_mode_through_the_pipeline(compose_cfg, tmp_path):
    results = train(compose_cfg(*TINY, "prune.target_flops=0.5"), tmp_path)
    assert results["policy"] == "target_flops"
    assert results["after"]["flops"] <= 0.5 * results["before"]["flops"]
    assert results["threshold"] is not None


def test_pareto_front():
    assert pareto_front([(3, 0.9), (1, 0.8), (2, 0.7), (4, 0.95)]) == [(1, 0.8), (3, 0.9), (4, 0.95)]


def test_curve_draws_each_job_as_what_it_is_and_merges_coinciding_points(tmp_path):
    from slimnet.run.sweep import _group_label, coinciding, kind_of, plot

    def row(job, thresh, flops, acc, percent=None):
        return {"job": job, "status": "ok", "thresh": thresh, "percent": percent, "target_flops": None,
                "flops": flops, "flops_before": 100e6, "flops_reduction": 1 - flops / 100e6, "test_acc": acc}

    # a short run: three thresholds below every |γ| cut nothing and land on one point
    rows = [row("0", 0.05, 100e6, 0.91), row("1", 0.1, 100e6, 0.91), row("2", 0.2, 100e6, 0.91),
            row("3", 0.5, 40e6, 0.90), row("4", None, 100e6, 0.92, percent=0)]
    assert [kind_of(r) for r in rows] == ["cut nothing"] * 3 + ["pruned", "unpruned"]
    groups = coinciding(rows, "test_acc")
    labels = sorted(_group_label(g) for g in groups)
    assert labels == ["p=0", "t=0.05, 0.1, 0.2 (3 jobs)", "t=0.5"]
    plot(rows, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 10_000
