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


def test_auto_is_a_policy_of_its_own(compose_cfg):
    validate(compose_cfg(*TINY, "+prune.thresh=auto", "sparsity.kind=polarization"))
    with pytest.raises(ConfigError, match="or auto"):
        validate(compose_cfg(*TINY, "+prune.thresh=valley"))
    with pytest.raises(ValueError, match="'auto'"):
        slimnet.prune(_two_layers(), torch.randn(1, 3, 8, 8), thresh="valley")
