"""The valley cut (``thresh="auto"``): each layer at the gap of its own |γ|; a single pile has no valley,
and the cut says so and keeps that layer whole."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TINY
from torch import nn

import slimnet
from slimnet.engine.valley import find_valley
from slimnet.errors import ConfigError
from slimnet.run.config import validate


def _two_layers() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 4))


def _bimodal(n: int, low: int, low_top: float, high: tuple[float, float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.rand(low, generator=g) * low_top, high[0] + torch.rand(n - low, generator=g) * (high[1] - high[0])])
    return values[torch.randperm(n, generator=g)]


def test_constructed_bimodal_gammas_are_cut_at_each_layers_own_gap():
    model = _two_layers()
    with torch.no_grad():  # two layers, two different valleys: 0.02 | 0.07 and 0.1 | 0.9
        model[1].weight.copy_(_bimodal(32, 12, 0.02, (0.07, 0.4), seed=0))
        model[4].weight.copy_(_bimodal(48, 30, 0.1, (0.9, 1.5), seed=1))
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = slimnet.prune(model, x, thresh="auto")
    assert report.channels["0"] == [32, 20] and report.channels["3"] == [48, 18]  # exactly the low clusters
    valleys = report.details["valleys"]
    assert 0.02 < valleys["1"] < 0.07 and 0.1 < valleys["4"] < 0.9  # each threshold inside its own gap
    assert not report.threshold_reproduces  # one global threshold would cut into layer 1's upper cluster
    assert any("2 of 2 BatchNorm layers cut at the valley" in str(w.message) for w in caught)


def test_a_single_pile_has_no_valley_and_the_cut_says_what_it_did():
    model = _two_layers()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model[1].weight.copy_(torch.rand(32, generator=g) * 0.2)  # L1's one pile
        model[4].weight.copy_(_bimodal(48, 20, 0.01, (0.5, 1.0), seed=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = slimnet.prune(model, torch.randn(2, 3, 8, 8), thresh="auto")
    assert "0" not in report.channels and report.channels["3"] == [48, 28]
    assert report.details["valleys"]["1"] is None
    message = next(str(w.message) for w in caught if "no valley" in str(w.message))
    assert "1 showed no valley" in message and "kept whole: 1" in message and "percent=" in message


def test_valley_detection_rates_on_drawn_gammas():
    """The constants' promise, on fixed draws: piles of 64 rarely show a valley; two clusters of 32 do."""
    g = torch.Generator().manual_seed(0)
    piles = [torch.rand(64, generator=g), torch.randn(64, generator=g).abs() * 0.2,
             -torch.log(torch.rand(64, generator=g)) * 0.1, 0.5 + 0.1 * torch.randn(64, generator=g), torch.ones(64)]
    false = sum(find_valley(p).threshold is not None for p in piles for _ in range(1))
    false += sum(find_valley(torch.rand(64, generator=g)).threshold is not None for _ in range(200))
    assert false <= 3
    found = 0
    for i in range(200):
        v = _bimodal(32, 10, 0.05, (0.3, 1.0), seed=100 + i)
        valley = find_valley(v)
        found += valley.threshold is not None and valley.below == 10
    assert found >= 190


def test_a_trained_polarized_layer_with_stragglers_in_its_valley_is_cut_at_the_dip():
    """The measured shape (docs/bench_distill.md): a pile at exactly 0, a few channels still on their way
    down through the valley, the upper cluster: no empty stretch, but a dip in the density."""
    g = torch.Generator().manual_seed(5)
    found = []
    for _ in range(50):
        v = torch.cat([torch.zeros(50), torch.rand(8, generator=g) * 0.15, 0.2 + torch.rand(70, generator=g) * 0.15])
        found.append(find_valley(v[torch.randperm(128, generator=g)]))
    assert all(f.kind == "dip" and 50 <= f.below <= 58 and 0.05 < f.threshold < 0.2 for f in found)


def test_a_few_outliers_above_a_long_tail_are_not_an_upper_cluster():
    """A pile at 0 fading into a long tail, and two outliers far above it: the empty stretch before the
    outliers is not a valley (it would cut all but two channels); only the exact zeros go."""
    g = torch.Generator().manual_seed(6)
    v = torch.cat([torch.zeros(20), torch.rand(42, generator=g) * 0.38, torch.tensor([0.6, 0.61])])
    valley = find_valley(v)
    assert valley.kind == "zeros" and valley.below == 20 and valley.above == 44


def test_a_pile_at_zero_under_a_spread_is_rarely_split_inside_the_spread():
    """20 channels at 0 under 44 spread uniformly: only the zeros are a cluster, so a cut above them is a
    false valley; the dip test must rarely see one in the spread's noise."""
    g = torch.Generator().manual_seed(7)
    draws = [find_valley(torch.cat([torch.zeros(20), torch.rand(44, generator=g)])) for _ in range(200)]
    assert sum(d.below > 20 for d in draws) <= 10  # measured 2-3 %
    assert all(d.below >= 20 for d in draws)  # the zeros always go: they are dead channels


def test_a_pile_without_a_valley_loses_only_its_exact_zeros_and_the_cut_says_so():
    model = _two_layers()
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        pile = torch.rand(32, generator=g) * 0.2
        pile[:5] = 0.0  # dead channels (the proximal step's exact zeros)
        model[1].weight.copy_(pile)
        model[4].weight.copy_(_bimodal(48, 20, 0.01, (0.5, 1.0), seed=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = slimnet.prune(model, torch.randn(2, 3, 8, 8), thresh="auto")
    assert report.channels["0"] == [32, 27] and report.channels["3"] == [48, 28]
    assert 0 < report.details["valleys"]["1"] < float(pile[pile > 0].min())
    message = next(str(w.message) for w in caught if "no valley" in str(w.message))
    assert "1 showed no valley and lost only their channels at exactly γ = 0 (5 in all): 1" in message
    assert "percent=" in message


def test_cutting_only_the_exact_zeros_leaves_the_outputs_unchanged():
    """γ = 0 makes a channel the constant β, which the surgery folds into the next layer's bias: exactly
    where the next conv reads no zero padding (at a padded border the fold is approximate: engine/fold.py)."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 48, 3),
                          nn.BatchNorm2d(48), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 4))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for bn in (model[1], model[4]):
            gamma = 0.5 + torch.rand(bn.num_features, generator=g)  # one pile, no valley
            gamma[:6] = 0.0
            bn.weight.copy_(gamma)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    before = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = slimnet.prune(model, x, thresh="auto")
    assert report.channels["0"] == [32, 26] and report.channels["3"] == [48, 42]
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_auto_is_a_policy_of_its_own(compose_cfg):
    validate(compose_cfg(*TINY, "+prune.thresh=auto", "sparsity.kind=polarization"))
    with pytest.raises(ConfigError, match="or auto"):
        validate(compose_cfg(*TINY, "+prune.thresh=valley"))
    with pytest.raises(ValueError, match="'auto'"):
        slimnet.prune(_two_layers(), torch.randn(1, 3, 8, 8), thresh="valley")
