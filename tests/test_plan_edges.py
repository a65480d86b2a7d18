"""Edges of the cut policy (issue 23): ties of equal |γ|, policies that remove nothing, γ that were never
sparsity-trained (frozen stages, FrozenBatchNorm2d), and a reported threshold that reproduces its cut.

Tiny models on 8x8 inputs; the file takes seconds.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d

import slimnet
from slimnet.engine.reach import reach_of
from slimnet.errors import NothingCutError, UserError
from slimnet.graph import trace_channel_groups

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py


def _chain(widths=(16, 24, 32)) -> nn.Sequential:
    """conv-BN-ReLU blocks, then a classifier: one norm per channel group."""
    layers, cin = [], 3
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 5))


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (_BatchNorm, FrozenBatchNorm2d))]


@torch.no_grad()
def _half_zero(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every other γ exactly 0 (what the λ controller and polarization's clamp leave), the rest in
    [0.2, 1); distinct β everywhere, so the tie at 0 has an order."""
    gen = torch.Generator().manual_seed(seed)
    for m in _bns(model):
        n = m.weight.numel()
        m.weight.copy_(0.2 + 0.8 * torch.rand(n, generator=gen))
        m.weight[::2] = 0.0
        m.bias.copy_(torch.randn(n, generator=gen))
    return model


@torch.no_grad()
def _random_gammas(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in _bns(model):
        n = m.weight.numel()
        m.weight.copy_(torch.rand(n, generator=gen))
        m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _quiet_prune(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return slimnet.prune(model, x, **kw)


# --------------------------------------------------------------------------- percent inside a tie


def test_percent_splits_a_tie_of_zero_gammas_lowest_beta_first():
    model = _half_zero(_chain())
    gammas = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    betas = {n: m.bias.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    total = sum(len(g) for g in gammas.values())  # 72 channels, 36 at γ = 0: a tie across the 30% mark

    report = _quiet_prune(model, X, percent=0.3)

    cut_beta, kept_zero_beta = [], []
    for name, gamma in gammas.items():
        kept = report.pass_plan.keep.get(name, {}).get("bn", list(range(len(gamma))))
        cut = sorted(set(range(len(gamma))) - set(kept))
        assert bool((gamma[cut] == 0).all())  # only tied zeros go
        cut_beta += betas[name][cut].tolist()
        kept_zero_beta += [float(betas[name][i]) for i in kept if gamma[i] == 0]
    assert len(cut_beta) == int(0.3 * total)  # the share asked for, not 0 (the old rule) nor the whole tie
    assert max(cut_beta) <= min(kept_zero_beta)  # lowest β first, across the whole network
    assert report.threshold == 0.0


def test_percent_on_a_fresh_model_cuts_every_layer_evenly():
    model = _chain((16, 32, 64))  # fresh: every γ is 1 and every β 0
    report = _quiet_prune(model, X, percent=0.3)
    for name, (before, after) in report.channels.items():
        if isinstance(model.get_submodule(name), nn.BatchNorm2d):
            assert 0.25 <= (before - after) / before <= 0.35, name  # 30% of every layer, none emptied first
    assert report.threshold == 1.0 and report.threshold_reproduces is False


# --------------------------------------------------------------------------- a cut that removes nothing


@pytest.mark.parametrize("policy", [{"percent": 0.3}, {"target_flops": 0.5}])
def test_a_cut_that_removes_nothing_raises_and_leaves_the_model_untouched(policy):
    model = _random_gammas(_chain())
    for bn in _bns(model):
        bn.weight.requires_grad_(False)  # every γ frozen: nothing may be ranked
    before = _state(model)
    with pytest.raises(NothingCutError) as info:
        _quiet_prune(model, X, **policy)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message  # the CLI prints it as one line
    assert "removes nothing" in message and "cut_frozen=True" in message
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not hasattr(model, "slimnet_plan")


def test_a_percent_held_by_min_channels_raises_naming_it():
    model = _random_gammas(_chain())
    before = _state(model)
    with pytest.raises(NothingCutError, match="min_channels=32"):
        _quiet_prune(model, X, percent=0.5, min_channels=32)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_threshold_inside_an_all_ones_tie_says_the_gammas_are_tied():
    model = _chain()  # fresh: all 72 |γ| are 1
    with pytest.warns(UserWarning, match="removed nothing") as record:
        report = slimnet.prune(model, X, thresh=0.5)
    message = next(str(w.message) for w in record if "removed nothing" in str(w.message))
    assert "all 72 rankable channels have |γ| = 1" in message and "cannot split them" in message
    assert "percent=" in message and "target_flops=" in message
    assert "would select" not in message  # no thresh=1 / 1 / 1 for three different shares
    assert not report.channels


# --------------------------------------------------------------------------- γ never sparsity-trained


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """A stem, a stage of two residual blocks, a strided stage: mmdet's ResNet in miniature."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(_Block(8, 8), _Block(8, 8))
        self.layer2 = nn.Sequential(_Block(8, 16, stride=2), _Block(16, 16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


def _frozen_stage() -> TinyResNet:
    """frozen_stages=1: the stem and the first stage have requires_grad=False, and γ that look weak
    next to the trained ones (ranked with them, they would go first)."""
    torch.manual_seed(0)
    model = _random_gammas(TinyResNet())
    with torch.no_grad():
        for bn in _bns(model.stem) + _bns(model.layer1):
            bn.weight.mul_(0.1)
    model.stem.requires_grad_(False)
    model.layer1.requires_grad_(False)
    return model


def _frozen_widths(model: TinyResNet) -> list[int]:
    return [model.stem[0].out_channels] + [b.conv1.out_channels for b in model.layer1]


def test_a_frozen_stage_is_kept_whole_and_named_in_reach_and_in_the_report():
    model = _frozen_stage()
    with pytest.warns(UserWarning, match="requires_grad=False"):
        r = slimnet.reach(model, X)
    assert len(r.frozen) == 3  # the stem's residual group, and each block's inner group
    assert all("requires_grad=False" in why and "cut_frozen=True" in why for _, why in r.frozen)
    assert "stem.0" in str(r) and "layer1.1.conv1" in str(r) and r.bn_channels < 1
    graph = trace_channel_groups(model, X)  # the CLI's preflight: a graph, and the model to mark it
    assert reach_of(graph, model).frozen == r.frozen

    report = _quiet_prune(model, X, percent=0.5)
    assert _frozen_widths(model) == [8, 8, 8]  # kept whole
    assert any(name.startswith("layer2") for name in report.channels)  # the trained stage is cut
    named = [w for w in report.warnings if "requires_grad=False" in w]
    assert len(named) == 1 and "stem.0" in named[0] and "layer1.0.conv1" in named[0]
    assert "cut_frozen=True" in named[0]


def test_cut_frozen_ranks_a_frozen_stage_as_before():
    model = _frozen_stage()
    _quiet_prune(model, X, percent=0.5, cut_frozen=True)
    assert all(w < 8 for w in _frozen_widths(model))
    model = _frozen_stage()
    _quiet_prune(model, X, target_flops=0.5, cut_frozen=True)
    assert any(w < 8 for w in _frozen_widths(model))


def _frozen_bn_net() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), FrozenBatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[1].weight[:4] = 0  # γ = 0 on half the channels: a cut at 1e-6 would take them
    return model


def test_frozen_batchnorm_is_kept_whole_by_default():
    model = _frozen_bn_net()
    with pytest.warns(UserWarning, match=r"FrozenBatchNorm2d.*cut_frozen=True"):
        report = slimnet.prune(model, X, thresh=1e-6)
    assert model[0].out_channels == 8 and not report.channels
    assert any("FrozenBatchNorm2d" in w for w in report.warnings)
    _quiet_prune(model, X, thresh=1e-6, cut_frozen=True)
    assert model[0].out_channels == 4


# --------------------------------------------------------------------------- the threshold reported


def _same_cut(a, b) -> None:
    assert a.pass_plan.keep == b.pass_plan.keep and a.pass_plan.attrs == b.pass_plan.attrs
    assert a.threshold == b.threshold


@pytest.mark.parametrize("policy", [{"target_flops": 0.4}, {"percent": 0.4}])
def test_the_reported_threshold_passed_back_gives_the_very_same_plan(policy):
    model = _random_gammas(_chain())
    fresh = copy.deepcopy(model)
    report = _quiet_prune(model, X, min_channels=4, **policy)
    assert report.threshold_reproduces is True
    again = _quiet_prune(fresh, X, thresh=report.threshold, min_channels=4)
    _same_cut(again, report)


@torch.no_grad()
def _floored_tie() -> nn.Sequential:
    """Layer 0 all under the cut but for two channels tied at 0.5 with one of layer 3: a percent that
    takes layer 0's pair (lower β) leaves them to min_channels, and cuts nothing above 0.1."""
    model = _chain((8, 8, 8))
    model[1].weight.copy_(torch.tensor([.05, .06, .07, .08, .09, .1, .5, .5]))
    model[1].bias.fill_(-1.0)
    model[4].weight.copy_(torch.tensor([.5, .9, .91, .92, .93, .94, .95, .96]))
    model[4].bias.fill_(1.0)
    model[7].weight.copy_(torch.linspace(.6, .99, 8))
    return model


def test_the_reported_threshold_is_the_largest_gamma_cut_not_one_min_channels_kept():
    model = _floored_tie()
    fresh = copy.deepcopy(model)
    report = _quiet_prune(model, X, percent=8 / 24, min_channels=2)  # the 8th smallest ends inside the 0.5 tie
    assert report.channels["1"] == [8, 2]  # layer 0: its six small γ cut, the 0.5 pair kept by min_channels
    assert report.threshold == pytest.approx(0.1) and report.threshold_reproduces is True
    _same_cut(_quiet_prune(fresh, X, thresh=report.threshold, min_channels=2), report)


@pytest.mark.parametrize("policy", [{"target_flops": 0.6}, {"percent": 0.3}])
def test_a_cut_that_splits_a_tie_says_a_threshold_cannot_reproduce_it(policy):
    model = _half_zero(_chain())
    fresh = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="would not reproduce") as record:
        report = slimnet.prune(model, X, **policy)
    assert report.threshold == 0.0 and report.threshold_reproduces is False
    (note,) = [w for w in report.warnings if "would not reproduce" in w]
    assert "splits a tie of 36 channels at |γ| = 0 (lowest β first)" in note
    key, value = next(iter(policy.items()))
    assert f"pass {key}={value} to reproduce it" in note
    assert any(note == str(w.message) for w in record)
    again = _quiet_prune(fresh, X, thresh=report.threshold)  # what the note warns of: the whole tie goes
    assert again.pass_plan.keep != report.pass_plan.keep
