"""Channel surgery end to end (``slimnet.prune``): policy -> plan -> a smaller dense model.

The key property is *equivalence*: a channel whose BN has γ = β = 0 outputs exactly zero, so removing
it (and every weight that reads it) must not change the model's output. Checked on every architecture
family we ship, through the real tracer, policy and surgery. The rest pins the policy semantics of
Liu et al. 2017 (global raw |γ| ranking) and the guarantees a user relies on (modes, requires_grad,
classifier and input untouched, iterative passes replayable from the plan alone).
Everything runs on CPU at 16x16/32x32, batch 2; the file takes a few seconds.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from slimnet import prune
from slimnet.engine.measure import count_flops
from slimnet.engine.surgery import replay_plan
from slimnet.graph import trace_channel_groups
from slimnet.models import create_model

NUM_CLASSES = 10

# (registry name, kwargs): one entry per architecture family, the smallest that still has the feature.
MODELS = {
    "vgg": ("vgg", {"cfg": [16, "M", 32, "M", 64]}),
    "resnet_basic": ("cifar_resnet", {"depth": 8, "block": "basic", "width": 8}),
    "resnet_bottleneck": ("cifar_resnet", {"depth": 11, "block": "bottleneck", "width": 4}),
    "tv_resnet18": ("torchvision", {"name": "resnet18"}),
    "tv_resnet50": ("torchvision", {"name": "resnet50"}),
    "catnet": (None, {}),  # CatNet below: depthwise, concat, flatten into Linear
}


# --------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py



class CatNet(nn.Module):
    """What the zoo above lacks: a depthwise conv, a channel concat (two-part input axis at offsets
    0 and 8) and ``x.view(n, -1)`` of a 2x2 map into the classifier (4 features per channel)."""

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        def cbr(cin, cout, k, groups=1):
            conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = cbr(in_channels, 8, 3)
        self.dw = cbr(8, 8, 3, groups=8)
        self.side = cbr(8, 6, 1)
        self.fuse = cbr(14, 12, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(12 * 4, num_classes)
        self.slimnet_meta = {"first_conv": "stem.0", "classifier": "fc"}

    def forward(self, x):
        x = self.stem(x)
        x = self.fuse(torch.cat([self.dw(x), self.side(x)], 1))
        x = self.pool(x)
        return self.fc(x.view(x.size(0), -1))


def _build(key: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if key == "catnet":
        return CatNet(NUM_CLASSES, 3)
    arch, kwargs = MODELS[key]
    return create_model(arch, num_classes=NUM_CLASSES, in_channels=3, **kwargs)


def _inputs(size: int = 32, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _bns(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def _realistic_eval_bn(model: nn.Module, seed: int = 0) -> None:
    """Running stats from one train-mode batch (so activations stay O(1) through 50 layers), random
    γ in [0.5, 1] and β, a classifier giving O(1) logits (VGG's N(0, 0.01) init gives ~0.05), then eval
    mode: the state of a trained model, as far as the output scale goes."""
    gen = torch.Generator().manual_seed(seed)
    fc = model.get_submodule(model.slimnet_meta["classifier"])
    fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen) / fc.in_features**0.5)
    for bn in _bns(model):
        bn.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    model.train()
    model(torch.randn(8, 3, 32, 32, generator=gen))
    model.eval()
    for bn in _bns(model):
        bn.weight.copy_(torch.rand(bn.num_features, generator=gen) * 0.5 + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.2)


@torch.no_grad()
def _kill_random_channels(model: nn.Module, graph, frac: float = 0.4, seed: int = 0) -> dict[int, int]:
    """γ = β = 0 for a random ~frac of each prunable group's channels, in every norm of the group
    (a channel is only dead if it is zero on every path, e.g. both sides of a residual add)."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    killed = {}
    for group in graph.groups:
        if not group.prunable:
            continue
        n = min(max(1, round(frac * group.size)), group.size - 1)  # keep one: min_channels is not under test
        idx = torch.randperm(group.size, generator=gen)[:n]
        for ref in group.norms:
            bn = modules[ref.module]
            bn.weight[ref.offset + idx] = 0
            bn.bias[ref.offset + idx] = 0
        killed[group.id] = n
    return killed


def _axis_width(module: nn.Module, kind: str) -> int:
    """Current size of one sliceable axis, read from the weights (not from the size attributes)."""
    if kind == "bn":
        return module.running_mean.shape[0] if module.running_mean is not None else module.weight.shape[0]
    if kind in ("out", "dw"):
        return module.weight.shape[0]
    return module.weight.shape[1] * (module.groups if isinstance(module, _ConvNd) else 1)


def _assert_dense_and_consistent(model: nn.Module) -> None:
    """Every module's size attributes describe its tensors, and nothing is masked or hooked."""
    assert not any("weight_orig" in k or "weight_mask" in k for k in model.state_dict())
    for name, m in model.named_modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), name
        assert not parametrize.is_parametrized(m), name
        if isinstance(m, _ConvNd):
            assert m.weight.shape == (m.out_channels, m.in_channels // m.groups, *m.kernel_size), name
            assert m.bias is None or m.bias.shape == (m.out_channels,), name
        elif isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features), name
            assert m.bias is None or m.bias.shape == (m.out_features,), name
        elif isinstance(m, _BatchNorm):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                assert t is None or t.shape == (m.num_features,), name


def _vgg_with_gammas(*gammas) -> nn.Module:
    """A VGG with one conv per stage and the given γ per BN (channel counts follow the γ lists)."""
    cfg = []
    for g in gammas:
        cfg += [len(g), "M"]
    torch.manual_seed(0)
    model = create_model("vgg", num_classes=NUM_CLASSES, in_channels=3, cfg=cfg[:-1])
    with torch.no_grad():
        for bn, g in zip(_bns(model), gammas):
            bn.weight.copy_(torch.as_tensor(g, dtype=torch.float32))
    return model


def _gammas(model: nn.Module) -> list[list[float]]:
    """γ per BN layer, rounded so that float32 storage compares equal to the decimal literals."""
    return [[round(g, 5) for g in bn.weight.detach().tolist()] for bn in _bns(model)]


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("key", list(MODELS))
def test_removing_dead_channels_keeps_outputs(key):
    model = _build(key)
    x = _inputs()
    _realistic_eval_bn(model)
    graph = trace_channel_groups(model, x)
    killed = _kill_random_channels(model, graph)
    assert killed, "the model should have prunable groups"
    with torch.no_grad():
        ref = model(x)
    assert 0.1 < ref.abs().max() < 100  # outputs on a scale where default float32 tolerances mean something

    report = prune(model, x, thresh=1e-8)

    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref)
    assert not model.training

    # Every sliced axis lost exactly the dead channels of each group it sees (times the flatten block).
    modules = dict(model.named_modules())
    for (name, kind), parts in graph.axes.items():
        expected = sum((size - killed.get(gid, 0)) * mult for gid, size, mult in parts)
        assert _axis_width(modules[name], kind) == expected, (name, kind)
    # ...which is what the report says about producers.
    for gid, n in killed.items():
        for producer in graph.groups[gid].producers:
            assert report["channels"][producer] == [graph.groups[gid].size, graph.groups[gid].size - n]


@pytest.mark.parametrize("key", ["vgg", "resnet_bottleneck", "tv_resnet18"])
def test_pruned_model_is_smaller_and_dense(key):
    model = _build(key)
    x = _inputs()
    _realistic_eval_bn(model)
    report = prune(model, x, percent=0.4)

    assert report["params_after"] < report["params_before"]
    assert report["flops_after"] < report["flops_before"]
    assert count_flops(model, x) == (report["flops_after"], report["params_after"])  # the report is the model
    assert report["params_after"] == sum(p.numel() for p in model.parameters())
    _assert_dense_and_consistent(model)
    assert model(x).shape == (2, NUM_CLASSES)


def test_pruned_vgg_is_exactly_a_smaller_vgg():
    """The paper rebuilds a pruned VGG from its surviving widths: our surgery must give that very model."""
    model = _build("vgg")
    x = _inputs()
    _realistic_eval_bn(model)
    prune(model, x, percent=0.5)
    widths = [bn.num_features for bn in _bns(model)]
    assert widths != [16, 32, 64]
    rebuilt = create_model("vgg", num_classes=NUM_CLASSES, in_channels=3,
                           cfg=[widths[0], "M", widths[1], "M", widths[2]])
    rebuilt.load_state_dict(model.state_dict())  # strict: same names, same shapes
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


# --------------------------------------------------------------------------- policies


def test_percent_is_a_global_raw_ranking():
    """percent=0.5 removes the 12 smallest of 24 |γ| network-wide, wherever they are.

    Layer A holds 7 of the 12 smallest, so it loses 7 of 8 channels; layer B holds none and keeps all.
    A per-layer normalised ranking (γ / layer mean) would have cut every layer about evenly.
    """
    a = [0.05, 0.30, 0.01, 0.07, 0.03, 0.02, 0.06, 0.04]
    b = [0.95, 0.90, 0.93, 0.91, 0.97, 0.92, 0.94, 0.96]
    c = [0.60, 0.10, 0.29, 0.80, 0.20, 0.70, 0.28, 0.25]
    model = _vgg_with_gammas(a, b, c)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer should need the min_channels floor here
        report = prune(model, _inputs(16), percent=0.5)

    assert report["threshold"] == pytest.approx(0.29)  # the 12th smallest |γ|
    # Survivors are the entries above the 12th smallest, in their original channel order.
    assert _gammas(model) == [[0.30], b, [0.60, 0.80, 0.70]]
    assert sum(len(g) for g in _gammas(model)) == 24 // 2


def test_percent_zero_prunes_nothing_even_dead_channels():
    model = _vgg_with_gammas([0.0, 0.5, 0.0, 0.5], [0.5] * 4, [0.0] * 3 + [0.5])
    params = sum(p.numel() for p in model.parameters())
    report = prune(model, _inputs(16), percent=0.0)
    assert report["channels"] == {}
    assert report["params_after"] == params
    assert not model.slimnet_plan.keep


def test_percent_never_prunes_more_than_asked_with_tied_gammas():
    model = _vgg_with_gammas([0.5] * 8, [0.5] * 8, [0.5] * 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune(model, _inputs(16), percent=0.5)
    assert sum(len(g) for g in _gammas(model)) >= 24 // 2


@pytest.mark.parametrize("thresh", [0.0, 0.1, 0.25, 0.5])
def test_thresh_keeps_abs_gamma_strictly_above(thresh):
    """|γ| > thresh, exactly: negative γ count by magnitude, and γ == thresh is removed."""
    a = [-0.9, 0.05, 0.2, -0.01, 0.5, 0.1, 0.0, 0.3]
    b = [0.7, -0.25, 0.25, 0.6, 0.1, 0.8, 0.0, -0.55]
    model = _vgg_with_gammas(a, b, [1.0] * 4)
    report = prune(model, _inputs(16), thresh=thresh)
    assert report["threshold"] == thresh
    assert _gammas(model) == [[g for g in a if abs(g) > thresh], [g for g in b if abs(g) > thresh], [1.0] * 4]


def test_min_channels_floor_keeps_strongest_and_warns_naming_the_layer():
    weak = [0.01, 0.04, 0.02, 0.05, 0.03, 0.00, 0.01, 0.02]
    model = _vgg_with_gammas([0.9] * 8, weak, [0.8] * 8)
    with pytest.warns(UserWarning, match=r"min_channels=2.*features\.4"):
        report = prune(model, _inputs(16), thresh=0.1, min_channels=2)
    assert _gammas(model) == [[0.9] * 8, [0.04, 0.05], [0.8] * 8]  # strongest 2, in order
    assert report["channels"]["features.4"] == [8, 2]
    assert report["floored"] == ["features.4"]


def test_thresh_above_every_gamma_warns_it_removed_everything():
    model = _vgg_with_gammas([0.9] * 8, [0.5] * 8, [0.7] * 8)
    with pytest.warns(UserWarning) as record:
        prune(model, _inputs(16), thresh=1.0, min_channels=3)
    assert any("removed everything it could" in str(w.message) for w in record)
    assert [bn.num_features for bn in _bns(model)] == [3, 3, 3]
    assert model(_inputs(16)).shape == (2, NUM_CLASSES)  # still a working (tiny) model


@pytest.mark.parametrize("round_to", [4, 8])
def test_round_to_rounds_kept_counts_up(round_to):
    gen = torch.Generator().manual_seed(0)
    strong_counts = [5, 13, 32, 0]  # channels per layer with |γ| > 0.5, out of 32
    gammas = []
    for n in strong_counts:
        g = torch.rand(32, generator=gen) * 0.4  # weak: below 0.5
        g[torch.randperm(32, generator=gen)[:n]] = 0.6 + torch.rand(n, generator=gen) * 0.4
        gammas.append(g.tolist())
    model = _vgg_with_gammas(*gammas)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the empty layer hits the min_channels floor, on purpose
        prune(model, _inputs(16), thresh=0.5, round_to=round_to)

    for before, after, n in zip(gammas, _gammas(model), strong_counts):
        assert len(after) == min(32, math.ceil(max(n, 1) / round_to) * round_to)
        strong = [g for g in before if g > 0.5]
        # never prunes what thresh alone would keep
        assert [g for g in after if g > 0.5] == [round(g, 5) for g in strong]


def test_plan_records_the_policy_that_was_applied():
    model = _vgg_with_gammas([0.9, 0.05] * 4, [0.9] * 8, [0.9] * 8)
    report = prune(model, _inputs(16), thresh=0.1, percent=0.9)  # documented: thresh wins
    assert [bn.num_features for bn in _bns(model)] == [4, 8, 8]
    assert report["plan"].policy["thresh"] == 0.1
    assert report["plan"].policy["percent"] is None


# --------------------------------------------------------------------------- what prune must not change


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_prune_preserves_modes_and_requires_grad(mode):
    model = _build("resnet_basic")
    _realistic_eval_bn(model)
    model.train(mode != "eval")
    if mode == "mixed":
        model.layer1.eval()  # a frozen stage
    # Freeze parameters of layers that will be cut (their Parameters get replaced by surgery).
    model.conv1.weight.requires_grad_(False)
    model.layer1[0].bn1.bias.requires_grad_(False)
    model.fc.weight.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    report = prune(model, _inputs(), percent=0.4)

    assert "conv1" in report["channels"] and "layer1.0.bn1" in report["channels"]  # they were cut
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("key", list(MODELS))
def test_classifier_outputs_and_input_channels_are_never_cut(key):
    model = _build(key)
    meta = model.slimnet_meta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = prune(model, _inputs(), thresh=10.0)  # above every γ: cut everything that can be cut
    modules = dict(model.named_modules())
    assert report["channels"]  # something was cut
    assert modules[meta["first_conv"]].in_channels == 3
    assert modules[meta["first_conv"]].weight.shape[1] == 3
    assert modules[meta["classifier"]].out_features == NUM_CLASSES
    assert model(_inputs()).shape == (2, NUM_CLASSES)


def test_model_without_batchnorm_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    model(_inputs(8))
    with pytest.raises(ValueError, match=r"no BatchNorm.*slim"):
        prune(model, _inputs(8), thresh=0.1)


# --------------------------------------------------------------------------- iterative pruning


@pytest.mark.parametrize("fold_bias", [False, True])
def test_two_passes_compose_into_one_replayable_plan(fold_bias):
    model = _build("resnet_basic")
    x = _inputs()
    _realistic_eval_bn(model)
    original = copy.deepcopy(model)

    first = prune(model, x, percent=0.3, fold_bias=fold_bias)["plan"]
    widths_after_first = {n: bn.num_features for n, bn in model.named_modules() if isinstance(bn, _BatchNorm)}
    second = prune(model, x, percent=0.3, fold_bias=fold_bias)["plan"]
    assert second is model.slimnet_plan
    widths = {n: bn.num_features for n, bn in model.named_modules() if isinstance(bn, _BatchNorm)}
    assert any(widths[n] < widths_after_first[n] for n in widths)  # the second pass did cut more
    assert set(first.keep) <= set(second.keep)

    # The composed plan, applied to the *original* weights, selects exactly the surviving weights:
    # its indices are in the original numbering. (β folding then moves the removed channels' constants
    # into biases and BN running means, so with it only those differ, never a shape.)
    replayed = replay_plan(copy.deepcopy(original), model.slimnet_plan)
    sd_pruned, sd_replayed = model.state_dict(), replayed.state_dict()
    assert sd_pruned.keys() == sd_replayed.keys()
    for k in sd_pruned:
        assert sd_pruned[k].shape == sd_replayed[k].shape, k
        if not fold_bias or not k.endswith(("running_mean", "bias")):
            assert torch.equal(sd_pruned[k], sd_replayed[k]), k

    # A freshly built (differently initialised) model + the plan + the pruned state_dict = the model.
    fresh = replay_plan(_build("resnet_basic", seed=123), model.slimnet_plan)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


# --------------------------------------------------------------------------- β folding


class FoldNet(nn.Module):
    """conv 3x3 -> BN -> relu -> conv 1x1 (no bias; a BN follows) -> BN -> relu -> 2x2 pool -> view -> fc.

    The removed channels of the first group reach a 1x1 conv, those of the second a linear layer
    through flatten (4 features each): both are places where folding is exact."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * 4, NUM_CLASSES)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(x.view(x.size(0), -1))


@torch.no_grad()
def _weak_channels_with_bias(model: nn.Module, bns, gamma: float, seed: int = 0) -> None:
    """Non-trivial statistics; then channels 1, 4, 6 of each BN get |γ| = gamma and β in [0.3, 0.8]
    (what sparsity training leaves: γ near zero, β not), the others γ in [0.5, 1]."""
    gen = torch.Generator().manual_seed(seed)
    for bn in bns:
        bn.momentum = None
    model.train()
    model(torch.randn(8, 3, 16, 16, generator=gen))
    model.eval()
    for bn in bns:
        bn.weight.copy_(torch.rand(bn.num_features, generator=gen) * 0.5 + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.2)
        bn.weight[[1, 4, 6]] = gamma
        bn.bias[[1, 4, 6]] = torch.rand(3, generator=gen) * 0.5 + 0.3


@pytest.mark.parametrize("gamma", [0.0, 0.01])
def test_fold_bias_puts_the_removed_channels_constant_back(gamma):
    """γ = 0, β ≠ 0: each removed channel emits relu(β); folded into the 1x1 conv (through bn2's running
    mean) and the linear's bias, the cut is exact. With γ small but not zero, folding the mean still
    recovers almost all of it; without folding the outputs move."""
    torch.manual_seed(0)
    model = FoldNet()
    _weak_channels_with_bias(model, [model.bn1, model.bn2], gamma)
    x = _inputs(16)
    with torch.no_grad():
        ref = model(x)
    unfolded = copy.deepcopy(model)
    thresh = gamma + 1e-6

    report = prune(model, x, thresh=thresh)
    prune(unfolded, x, thresh=thresh, fold_bias=False)

    assert model.conv1.out_channels == model.conv2.out_channels == 5 and model.fc.in_features == 20
    assert sorted(report["folded"]) == ["conv2", "fc"] and report["plan"].add_bias == []
    assert model.conv2.bias is None  # bn2's running mean took the constant instead
    with torch.no_grad():
        out, out_unfolded = model(x), unfolded(x)
    err_unfolded = (out_unfolded - ref).abs().max()
    assert err_unfolded > 0.05
    if gamma == 0:
        torch.testing.assert_close(out, ref)
    else:
        assert (out - ref).abs().max() < 0.2 * err_unfolded


def test_fold_bias_is_exact_inside_a_padded_conv_and_better_overall():
    """A 3x3 zero-padded reader: the constant is folded for every output pixel, but border pixels had
    read padding for part of their window, so only the interior is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1))
    _weak_channels_with_bias(model, [model[1]], 0.0)
    x = _inputs(16)
    with torch.no_grad():
        ref = model(x)
    unfolded = copy.deepcopy(model)
    prune(model, x, thresh=1e-6)
    prune(unfolded, x, thresh=1e-6, fold_bias=False)
    with torch.no_grad():
        out, out_unfolded = model(x), unfolded(x)
    assert model[3].in_channels == 5
    torch.testing.assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])
    assert (out - ref).norm() < 0.5 * (out_unfolded - ref).norm()
