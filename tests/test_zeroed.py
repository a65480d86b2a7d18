"""Fake -> real (``slimnet.prune_zeroed``): zeroed filters and pruning masks become a smaller model.

The seed case is a conv whose filters were zeroed: the rewrite must shrink the conv *and* every layer
that reads it, and keep the outputs. Then the masks ``torch.nn.utils.prune`` and Lightning's
``ModelPruning(ln_structured)`` leave behind; a ResNet whose residual channel is zero in every producer
(and one where it is zero in only some, which must stay); the BatchNorm subtlety (a zero filter followed
by a BN emits a constant, which is folded exactly where that is possible and otherwise kept, unless
``exact=False``); grouped convs; and two real torchvision models masked layer by layer.
Everything is CPU, tiny inputs; the file takes a few seconds.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from pytorch_lightning.callbacks import ModelPruning
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import prune as torch_prune

from slimnet import load_pruned, prune_zeroed, save_pruned
from slimnet.models import create_model

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py


def _outputs(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _clean(model: nn.Module) -> None:
    """No masks, no hooks left: a plain dense model."""
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    assert not any(m._forward_pre_hooks for m in model.modules())


@torch.no_grad()
def _calibrate(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, γ and β, then eval mode (a trained model, as far as constants go)."""
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for bn in bns:
        bn.momentum = None
    model.train()
    model(torch.randn(8, *X.shape[1:], generator=gen))
    for bn in bns:
        bn.weight.copy_(torch.rand(bn.num_features, generator=gen) * 0.5 + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.2)
    return model.eval()


# --------------------------------------------------------------------------- the seed case


class Plain(nn.Module):
    """No BatchNorm at all: conv 3x3 -> relu -> conv 1x1 -> relu -> conv 3x3 -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(self.c(x).mean((2, 3)))


def test_zeroed_filters_shrink_the_layer_and_every_reader():
    torch.manual_seed(0)
    model = Plain()
    with torch.no_grad():
        model.a.weight[[1, 4, 6]] = 0
        model.a.bias[[1, 4, 6]] = 0
        # zero weights but a bias: relu(0.3) is a constant read by a zero-padded 3x3 conv, which sees
        # padding instead at the border, so it must stay; relu(-0.2) is zero, so that one can go
        model.b.weight[[0, 7]] = 0
        model.b.bias[[0, 7]] = torch.tensor([0.3, -0.2])
    ref = _outputs(model)

    with pytest.warns(UserWarning, match=r"kept 1 zeroed channel\(s\) in place, in b .*exact=False"):
        report = prune_zeroed(model, X)

    torch.testing.assert_close(_outputs(model), ref)
    assert (model.a.out_channels, model.a.bias.shape[0], model.b.in_channels) == (5, 5, 5)  # the reader too
    assert (model.b.out_channels, model.c.in_channels) == (7, 7)
    assert report["channels"] == {"a": [8, 5], "b": [8, 7]} and report["zeroed_kept"] == {"b": 1}
    assert report["params_after"] == sum(p.numel() for p in model.parameters()) < report["params_before"]
    assert model(X).shape == (2, 4)


def test_exact_false_removes_constants_too_exactly_away_from_borders():
    """A constant channel read by a zero-padded conv: removed and folded, only the border changes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    with torch.no_grad():
        model[0].weight[[2, 3]] = 0
        model[0].bias[[2, 3]] = torch.tensor([0.5, 0.7])  # relu keeps them: a constant 0.5 and 0.7
    ref = _outputs(model)
    report = prune_zeroed(model, X, exact=False)
    out = _outputs(model)
    assert model[0].out_channels == 6 and model[2].in_channels == 6
    assert report["folded"] == ["2"]
    torch.testing.assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])  # interior: exact
    assert not torch.allclose(out, ref)  # border: the conv read padding there, not 0.5 and 0.7


class Gated(nn.Module):
    """conv 1x1 -> relu -> × a per-sample gate computed from the image -> conv 1x1 -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        gate = torch.sigmoid(x.mean((1, 2, 3), keepdim=True))  # (N, 1, 1, 1): the same for every channel
        y = torch.relu(self.a(x)) * gate
        return self.fc(self.b(y).mean((2, 3)))


def test_a_channel_that_varies_with_the_input_is_not_taken_for_a_constant():
    """A zero filter with bias 0.5 gives 0.5·gate(x): constant over the image, not across images. One
    example image alone would make it look constant; prune_zeroed also reads a random batch."""
    torch.manual_seed(0)
    model = Gated()
    with torch.no_grad():
        model.a.weight[[2, 3]] = 0
        model.a.bias[[2, 3]] = torch.tensor([0.5, -0.5])  # relu: 0.5·gate (varies) and 0 (dead)
    ref = _outputs(model)
    with pytest.warns(UserWarning, match="kept 1 zeroed channel"):
        prune_zeroed(model, X[:1])
    assert (model.a.out_channels, model.b.in_channels) == (7, 7)
    torch.testing.assert_close(_outputs(model), ref)


# --------------------------------------------------------------------------- pruning masks


class ConvBN(nn.Module):
    """conv 3x3 -> BN -> relu -> conv 1x1 -> BN -> relu -> pool -> linear: 1x1 and linear readers."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("how", ["torch_prune", "lightning", "lightning_permanent"])
def test_structured_pruning_masks_become_a_smaller_model(how):
    """ln_structured zeroes half the filters of both convs; each zero filter's BN emits a constant
    (β - γμ/σ), which the 1x1 conv and the linear absorb exactly (bias / next BN's running mean)."""
    torch.manual_seed(0)
    model = _calibrate(ConvBN())
    targets = [(model.conv1, "weight"), (model.conv2, "weight")]
    if how == "torch_prune":
        for module, name in targets:
            torch_prune.ln_structured(module, name, amount=0.5, n=2, dim=0)
    else:
        cb = ModelPruning("ln_structured", parameters_to_prune=targets, use_global_unstructured=False,
                          amount=0.5, pruning_dim=0, pruning_norm=2, use_lottery_ticket_hypothesis=False)
        cb.setup(None, model, "fit")  # what Lightning calls on fit start
        cb.apply_pruning(0.5)  # what it does at an epoch's end
        if how == "lightning_permanent":
            cb.make_pruning_permanent(model)  # what it does at the end of training: plain zeros remain
    ref = _outputs(model)

    report = prune_zeroed(model, X)

    _clean(model)
    assert report["masks_removed"] == ([] if how == "lightning_permanent" else ["conv1.weight", "conv2.weight"])
    assert (model.conv1.out_channels, model.bn1.num_features, model.conv2.in_channels) == (4, 4, 4)
    assert (model.conv2.out_channels, model.bn2.num_features, model.fc.in_features) == (6, 6, 6)
    torch.testing.assert_close(_outputs(model), ref)
    assert sorted(report["folded"]) == ["conv2", "fc"]
    assert report["plan"].add_bias == []  # conv2 passed its constant to bn2's running mean


def test_a_new_bias_is_replayed_when_the_model_is_loaded(tmp_path):
    """A reader with no bias and no BN after it gets a bias; the plan records it, so loading works."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 4, 1, bias=False), nn.Flatten(), nn.LazyLinear(3))

    model = build()
    model(X)  # materialise the lazy linear
    _calibrate(model)
    with torch.no_grad():
        model[0].weight[[0, 5]] = 0
    ref = _outputs(model)
    report = prune_zeroed(model, X)
    assert report["plan"].add_bias == ["3"] and model[3].bias is not None
    torch.testing.assert_close(_outputs(model), ref)

    save_pruned(model, tmp_path / "p.pt")
    fresh = build()
    fresh(X)
    loaded = load_pruned(tmp_path / "p.pt", model=fresh)
    torch.testing.assert_close(_outputs(loaded), ref)


# --------------------------------------------------------------------------- residual groups


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return _calibrate(create_model("torchvision", num_classes=10, in_channels=3, name="resnet18"))


# layer1's residual channels are written by the stem and by both blocks' second convs
STREAM = ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
STREAM_BN = ["bn1", "layer1.0.bn2", "layer1.1.bn2"]


@torch.no_grad()
def _zero_stream(model, channels, producers, dead_bn: bool):
    for conv, bn in zip(STREAM, STREAM_BN):
        if conv in producers:
            model.get_submodule(conv).weight[channels] = 0
            if dead_bn:  # the BN then emits exactly zero: β = 0 and μ = 0
                model.get_submodule(bn).bias[channels] = 0
                model.get_submodule(bn).running_mean[channels] = 0


def test_residual_channel_zero_in_every_producer_is_removed_everywhere():
    model = _resnet18()
    _zero_stream(model, [3, 10, 40], STREAM, dead_bn=True)
    ref = _outputs(model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))

    report = prune_zeroed(model, X)

    widths = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, _ConvNd)}
    for conv in STREAM:
        assert widths[conv][0] == 61
    for reader in ("layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"):
        assert widths[reader][1] == 61
    assert set(report["channels"]) == set(STREAM) | set(STREAM_BN)
    # 61 instead of 64 inputs changes every downstream conv's summation order (and oneDNN's kernel
    # choice): equal up to float32 rounding through 18 layers, measured up to 2.6e-5 here
    torch.testing.assert_close(
        _outputs(model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))), ref,
        rtol=1e-4, atol=1e-4)


def test_residual_channel_zero_in_some_producers_stays():
    model = _resnet18()
    _zero_stream(model, [3, 10, 40], STREAM[:2], dead_bn=True)  # layer1.1.conv2 still writes them
    ref = _outputs(model)
    report = prune_zeroed(model, X)
    assert report["channels"] == {}
    torch.testing.assert_close(_outputs(model), ref)


def test_residual_constant_reaching_padded_convs_is_kept_unless_inexact_is_allowed():
    model = _resnet18()
    _zero_stream(model, [3, 10, 40], STREAM, dead_bn=False)  # each BN emits β - γμ/σ ≠ 0
    ref = _outputs(model)
    loose = copy.deepcopy(model)

    with pytest.warns(UserWarning, match="kept 3 zeroed channel"):
        report = prune_zeroed(model, X)
    assert report["channels"] == {} and report["zeroed_kept"]
    torch.testing.assert_close(_outputs(model), ref)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune_zeroed(loose, X, exact=False)
    assert loose.conv1.out_channels == 61
    err = (_outputs(loose) - ref).abs().max()
    assert 0 < err < 0.5 * ref.abs().max()  # only border pixels of 3x3 convs differ


# --------------------------------------------------------------------------- grouped convs


def test_grouped_conv_loses_the_same_number_per_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        model[0].weight[[0, 1, 5]] = 0  # 2 in group 0, 1 in group 1: only 1 per group can go
        model[0].bias[[0, 1, 5]] = 0
    ref = _outputs(model)
    prune_zeroed(model, X)
    assert (model[0].out_channels, model[2].in_channels, model[2].groups) == (6, 6, 2)
    assert model[2].weight.shape == (8, 3, 3, 3)
    torch.testing.assert_close(_outputs(model), ref)


# --------------------------------------------------------------------------- real networks


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_masked_torchvision_model_keeps_its_outputs(name):
    """ln_structured on every conv (30% of filters): the channels whose constant reaches only 1x1
    convs or the classifier go (a bottleneck's middle, an inverted residual's projection...); those
    read by zero-padded 3x3 convs stay. Either way the outputs do not move."""
    torch.manual_seed(0)
    model = _calibrate(create_model("torchvision", num_classes=10, in_channels=3, name=name))
    first = model.slimnet_meta["first_conv"]
    for module_name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and module_name != first and m.groups == 1:
            torch_prune.ln_structured(m, "weight", amount=0.3, n=2, dim=0)
    ref = _outputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the kept ones are announced; counted below
        report = prune_zeroed(model, X)
    _clean(model)
    torch.testing.assert_close(_outputs(model), ref)
    assert report["params_after"] < 0.95 * report["params_before"]
    assert report["zeroed_kept"]  # and the ones read by 3x3 convs were kept, said so
