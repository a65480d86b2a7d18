"""Distillation in the fine-tune phase: the cut model learns from the uncut sparse model it came from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY

from slimnet.config import ConfigError
from slimnet.module import SlimModule
from slimnet.pipeline import train
from slimnet.sparsity import bn_gammas

TESTS = Path(__file__).resolve().parent
VGG = {"arch": "vgg", "cfg": [8, "M", 16, "M", 16], "num_classes": 5, "in_channels": 3}
OPTIM = {"name": "sgd", "lr": 0.1}


def _module(alpha: float) -> SlimModule:
    torch.manual_seed(0)
    return SlimModule(VGG, OPTIM, distill={"alpha": alpha, "temperature": 4.0}, prune_epoch=1)


def _zero_some_gammas(module: SlimModule) -> list[int]:
    """Turn off every other channel of each norm (γ = 0; β stays, so folding must carry it)."""
    widths = []
    with torch.no_grad():
        for gamma in bn_gammas(module.model):
            gamma[::2] = 0.0
            widths.append(gamma.numel() - len(range(0, gamma.numel(), 2)))
    return widths


def test_teacher_is_the_uncut_model_without_its_dead_channels():
    module = _module(alpha=0.5).eval()
    kept = _zero_some_gammas(module)
    x = torch.randn(8, 3, 16, 16)
    expected = module.model(x)
    module.keep_teacher(x)
    teacher = module.teacher
    assert [g.numel() for g in bn_gammas(teacher)] == kept  # the γ = 0 channels are gone
    torch.testing.assert_close(teacher(x), expected)  # ... exactly: their β was folded forward
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # Not a submodule: the optimizer, the state_dict and DDP see only the model being trained.
    assert not any(k.startswith("_teacher") or "teacher" in k for k in module.state_dict())
    assert {id(p) for p in module.parameters()} == {id(p) for p in module.model.parameters()}


def test_no_teacher_is_kept_when_distillation_is_off():
    module = _module(alpha=0.0)
    module.keep_teacher(torch.randn(2, 3, 16, 16))
    assert module.teacher is None


def test_distilled_run_trains_and_reports(compose_cfg, tmp_path):
    results = train(compose_cfg(*TINY, "distill.alpha=0.5"), tmp_path)
    assert results["after"]["flops"] < results["before"]["flops"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    teacher = last["slimnet"]["teacher"]
    # The teacher is the model as it was at the cut: wider than the fine-tuned one, narrower than the
    # unpruned one only by the channels the sparse phase switched off.
    norms = {k.removesuffix(".running_mean"): v.numel() for k, v in teacher["state_dict"].items()
             if k.endswith("running_mean")}
    assert norms and all(results["channels"][n][1] <= w <= results["channels"][n][0] for n, w in norms.items())
    assert sum(results["channels"][n][1] for n in norms) < sum(norms.values())


def test_distilled_fine_tune_resumes_with_the_same_teacher(compose_cfg, tmp_path):
    whole = train(compose_cfg(*TINY, "distill.alpha=0.5"), tmp_path / "whole")
    crashed = tmp_path / "crashed"
    proc = subprocess.run([sys.executable, str(TESTS / "_crash_run.py"), str(crashed), "5", "3", *TINY,
                           "distill.alpha=0.5"], cwd=TESTS, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9  # SIGKILL in the fine-tune phase (smoke: surgery at epoch 4 of 6)
    resumed = train(compose_cfg(*TINY, "distill.alpha=0.5", "ckpt_path=last"), crashed)
    assert resumed["channels"] == whole["channels"]
    # The resumed fine-tune learned from the same teacher: it ends with the same weights.
    weights = [torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
               for d in (tmp_path / "whole", crashed)]
    torch.testing.assert_close(weights[1], weights[0])


@pytest.mark.parametrize("override", ["distill.alpha=1.5", "distill.alpha=-0.1", "distill.temperature=0"])
def test_bad_distillation_settings_fail_before_training(compose_cfg, tmp_path, override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        train(compose_cfg(*TINY, override), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
