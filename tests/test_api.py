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


def _half_dead_net() -> nn.Sequential:
    """Half of every norm's γ exactly zero (what the λ controller or polarization's clamp leave)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                        nn.Conv2d(24, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                nn.init.uniform_(m.weight, 0.2, 1.0)
                m.weight[::2] = 0.0
                m.bias.copy_(torch.linspace(-1, 1, m.num_features)[torch.randperm(m.num_features)])
    return net


def test_a_budget_stops_inside_a_tie_of_zero_gammas_cutting_the_lowest_beta_first():
    model = _half_dead_net()
    every_zero = slimnet.prune(_half_dead_net(), X, thresh=0.0)  # all tied zeros: the old budget cut
    target = 0.6
    assert every_zero.flops_after < 0.5 * target * every_zero.flops_before  # cutting the whole tie overshoots
    betas = {n: m.bias.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    report = slimnet.prune(model, X, target_flops=target)
    assert every_zero.flops_after < report.flops_after <= target * report.flops_before
    assert report.threshold == 0.0  # the real |γ| of the last channel cut, not a tie-broken score
    split = 0
    for name, kept in report.pass_plan.keep.items():
        if name in betas and "bn" in kept:
            zero = torch.arange(0, len(betas[name]), 2)
            kept_zero = [i for i in kept["bn"] if i in zero.tolist()]
            cut_zero = [i for i in zero.tolist() if i not in kept["bn"]]
            if kept_zero and cut_zero:  # a tie split inside this layer: the cut ones had the lower β
                assert betas[name][cut_zero].max() <= betas[name][kept_zero].min()
                split += 1
    assert split  # the budget stopped inside the tie somewhere


def test_tie_breaking_keeps_the_order_of_distinct_scores():
    from slimnet.engine.plan import group_scores, tie_broken
    from slimnet.graph import trace_channel_groups

    model = _half_dead_net()
    graph = trace_channel_groups(model, X)
    plain = group_scores(graph, model)
    broken = tie_broken(plain, graph, model)
    a = torch.cat([plain[g] for g in plain]).double()
    b = torch.cat([broken[g] for g in plain])
    assert len(torch.unique(b)) == len(b)  # every tie split
    distinct = a[:, None] < a[None, :]
    assert bool((b[:, None] < b[None, :])[distinct].all())  # strictly lower stays strictly lower
    alone = (a[:, None] == a[None, :]).sum(1) == 1
    assert torch.equal(b[alone], a[alone])  # untied scores are not moved


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


def test_a_threshold_that_removes_nothing_says_so_and_suggests_one():
    model = _net()  # every |γ| in [0, 1): a threshold of 0 keeps them all
    with pytest.warns(UserWarning, match=r"removed nothing at \|γ\| threshold 0.*would select 30 / 50 / 70%"):
        report = slimnet.prune(model, X, thresh=0.0)
    assert report.flops_after == report.flops_before
    assert any("removed nothing" in w for w in report.warnings)  # in the report, not only on stderr
