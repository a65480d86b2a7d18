"""The plain-PyTorch API: a budget cut, the typed report, and an optimizer carried over a cut."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import slimnet


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.0, 1.0)  # distinct |γ|, so every policy has something to rank
    return net


X = torch.randn(2, 3, 12, 12)


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_prune_to_a_flops_budget(target):
    model = _net()
    report = slimnet.prune(model, X, target_flops=target)
    assert report.flops_after <= target * report.flops_before
    assert report.flops_after == slimnet.count_flops(model, X)[0]
    assert report.flops_reduction == pytest.approx(1 - report.flops_after / report.flops_before)
    assert model(X).shape == (2, 5)


def test_budget_and_threshold_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        slimnet.prune(_net(), X, thresh=0.1, target_flops=0.5)


def test_the_report_is_typed_and_serialises():
    report = slimnet.prune(_net(), X, percent=0.5)
    assert isinstance(report, slimnet.PruneReport)
    assert isinstance(report.pass_plan, slimnet.PrunePlan) and report.pass_plan.keep
    assert report["channels"] is report.channels  # old dict-style access still reads the fields
    data = json.loads(json.dumps(report.to_dict()))  # JSON-ready: no tensors, no plan objects
    assert data["flops_after"] == report.flops_after and "plan" not in data


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    lambda params: torch.optim.AdamW(params, lr=1e-3),
])
def test_carry_optimizer_state_slices_each_state_like_its_weight(make):
    model = _net()
    old = make(model.parameters())
    for _ in range(3):
        old.zero_grad()
        model(X).square().mean().backward()
        old.step()
    conv = model[6]
    before = {k: v.clone() for k, v in old.state[conv.weight].items()}
    grouped_before = {k: v.clone() for k, v in old.state[model[3].weight].items()}
    report = slimnet.prune(model, X, percent=0.5)
    new = make(model.parameters())
    carried = slimnet.carry_optimizer_state(old, new, model, report)
    assert carried == len(list(model.parameters()))
    keep = report.pass_plan.keep["6"]
    out, inp = torch.tensor(keep["out"]), torch.tensor(keep["in"])
    for key, value in before.items():
        if value.dim():  # momentum / moments: the surviving rows and columns, exactly
            torch.testing.assert_close(new.state[conv.weight][key], value[out][:, inp])
        else:  # Adam's step count is carried as it was
            torch.testing.assert_close(new.state[conv.weight][key], value)
    # the grouped conv: each kept filter keeps the state of the inputs its own group kept
    shape = model[3].weight.shape
    for key, value in grouped_before.items():
        if value.dim():
            assert new.state[model[3].weight][key].shape == shape
    new.zero_grad()
    model(X).square().mean().backward()
    new.step()  # and the optimizer works with what it was given
