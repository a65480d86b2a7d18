"""The whole pipeline under DDP with two CPU processes (gloo): sparse -> surgery -> fine-tune -> test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import TINY

TESTS = Path(__file__).resolve().parent


def test_two_rank_ddp_prunes_identically_and_finishes(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(TESTS / "_ddp_run.py"), str(tmp_path), *TINY, "trainer.strategy=ddp",
         "trainer.devices=2", "trainer.accelerator=cpu"],
        cwd=TESTS, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["after"]["flops"] < results["before"]["flops"]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["phase"] == rank1["phase"] == "finetune"
    assert rank0["state_dict"].keys() == rank1["state_dict"].keys()
    for key, value in rank0["state_dict"].items():
        other = rank1["state_dict"][key]
        assert value.shape == other.shape, key  # the same architecture on both ranks
        if value.is_floating_point() and "running" not in key:  # BN statistics are per rank in DDP
            torch.testing.assert_close(value, other, msg=f"ranks diverged at {key}")
    widths = {k: v[1] for k, v in results["channels"].items()}
    assert rank0["state_dict"]["features.0.weight"].shape[0] == widths["features.0"]
