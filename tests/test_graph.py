"""Channel-group tracing (``slimnet.graph``): which layers must be cut together, and what is left whole.

A wrong group is a silent bug: surgery would slice a conv's filters without slicing the layers that
read them (a shape error at best, a wrong model at worst). So the central test is a *golden* one: a
hand-written net covering every coupling pattern, with the expected groups written out by hand.
Everything runs on CPU with 8x8 inputs; the file takes about a second.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from slimnet import prune
from slimnet.graph import ChannelGraph, TraceError, trace_channel_groups
from slimnet.models import create_model

X = torch.randn(2, 3, 8, 8)


# --------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py



def _norm_names(group) -> list[str]:
    return sorted(r.module for r in group.norms)


def _dw_names(group) -> list[str]:
    return sorted(r.module for r in group.refs if r.kind == "dw")


def _used_groups(graph: ChannelGraph):
    """Groups that some parameter axis sees (spaces nothing reads, e.g. a model input never used, aside)."""
    return [g for g in graph.groups if g.refs]


def _facts(group) -> tuple:
    """(size, producers, norms, consumers): who writes, ranks and reads a group's channels."""
    return group.size, group.producers, _norm_names(group), group.consumers


def _cbr(cin: int, cout: int, **kw) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False, **kw)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())


# --------------------------------------------------------------------------- golden nets


class Golden(nn.Module):
    """stem -> residual block -> {depthwise branch, 1x1 side branch} -> cat -> fuse conv -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.b_conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b_bn1 = nn.BatchNorm2d(8)
        self.b_conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b_bn2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise: groups == channels
        self.dw_bn = nn.BatchNorm2d(8)
        self.side = nn.Conv2d(8, 6, 1, bias=False)
        self.side_bn = nn.BatchNorm2d(6)
        self.fuse = nn.Conv2d(14, 12, 1, bias=False)
        self.fuse_bn = nn.BatchNorm2d(12)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.relu(self.stem_bn(self.stem(x)))
        y = self.relu(self.b_bn1(self.b_conv1(x)))
        x = self.relu(self.b_bn2(self.b_conv2(y)) + x)  # identity shortcut
        a = self.relu(self.dw_bn(self.dw(x)))
        b = self.relu(self.side_bn(self.side(x)))
        x = self.relu(self.fuse_bn(self.fuse(torch.cat([a, b], dim=1))))  # dw branch first, then side
        return self.fc(torch.flatten(self.pool(x), 1))


class FlattenNet(nn.Module):
    """conv-bn-relu on a 2x2 map, flattened into a Linear: each channel feeds 4 consecutive features."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        if self.how == "view_dynamic":
            x = x.view(x.size(0), -1)
        elif self.how == "reshape_dynamic":
            x = x.reshape(x.size(0), -1)
        elif self.how == "torch_flatten":
            x = torch.flatten(x, 1)
        elif self.how == "nn_flatten":
            x = self.flat(x)
        elif self.how == "view_hard_batch":
            x = x.view(-1, 24)  # works today, but 24 is stale as soon as conv loses a channel
        elif self.how == "view_hard_channels":
            x = x.view(x.size(0), 24)
        return self.fc(x)


def test_golden_groups():
    graph = trace_channel_groups(Golden(), X)
    assert graph.warnings == []
    assert len(_used_groups(graph)) == 6

    # Model input: read by the stem only, frozen (the data decides its 3 channels).
    inp = graph.group_of("stem", "in")
    assert (inp.size, inp.producers, inp.consumers) == (3, [], ["stem"])
    assert any("model input" in r for r in inp.frozen_by) and not inp.prunable

    # The residual trunk: the add ties the stem's channels to the block's second conv, so both BNs
    # rank the same channels; the depthwise conv filters channel c with filter c, so it (and its BN)
    # ride along instead of starting a new group.
    trunk = graph.group_of("stem", "out")
    assert trunk.size == 8
    assert trunk.producers == ["b_conv2", "stem"]
    assert _norm_names(trunk) == ["b_bn2", "dw_bn", "stem_bn"]
    assert trunk.consumers == ["b_conv1", "fuse", "side"]
    assert _dw_names(trunk) == ["dw"]
    assert graph.group_of("dw", "dw") is trunk
    assert graph.group_of("b_bn2", "bn") is graph.group_of("stem_bn", "bn") is trunk
    assert trunk.prunable and trunk.frozen_by == []

    inner = graph.group_of("b_conv1", "out")
    assert _facts(inner) == (8, ["b_conv1"], ["b_bn1"], ["b_conv2"])
    assert inner.prunable

    side = graph.group_of("side", "out")
    assert _facts(side) == (6, ["side"], ["side_bn"], ["fuse"])
    assert side.prunable

    # The concat consumer's input axis is two parts, laid side by side in cat order.
    assert graph.axes[("fuse", "in")] == [(trunk.id, 8, 1), (side.id, 6, 1)]
    fuse_in_trunk = [r for r in trunk.refs if (r.module, r.kind) == ("fuse", "in")]
    fuse_in_side = [r for r in side.refs if (r.module, r.kind) == ("fuse", "in")]
    assert [(r.offset, r.mult) for r in fuse_in_trunk] == [(0, 1)]
    assert [(r.offset, r.mult) for r in fuse_in_side] == [(8, 1)]

    fuse = graph.group_of("fuse", "out")
    assert _facts(fuse) == (12, ["fuse"], ["fuse_bn"], ["fc"])
    assert fuse.prunable

    # Classifier outputs are the classes: frozen.
    out = graph.group_of("fc", "out")
    assert (out.size, out.producers, out.consumers) == (5, ["fc"], [])
    assert any("model output" in r for r in out.frozen_by) and not out.prunable


@pytest.mark.parametrize("how", ["view_dynamic", "reshape_dynamic", "torch_flatten", "nn_flatten"])
def test_flatten_into_linear_has_mult_hw(how):
    """Channel c of a 2x2 map becomes features 4c..4c+3 of the Linear: cutting it cuts 4 columns."""
    graph = trace_channel_groups(FlattenNet(how), X)
    group = graph.group_of("conv", "out")
    assert group.prunable and group.consumers == ["fc"]
    assert graph.axes[("fc", "in")] == [(group.id, 6, 4)]
    (ref,) = [r for r in group.refs if r.module == "fc"]
    assert (ref.kind, ref.offset, ref.mult) == ("in", 0, 2 * 2)


@pytest.mark.parametrize("how", ["view_hard_batch", "view_hard_channels"])
def test_hard_coded_reshape_freezes(how):
    """A literal feature count would break after a cut: the channels before it must be left whole."""
    graph = trace_channel_groups(FlattenNet(how), X)
    group = graph.group_of("conv", "out")
    assert not group.prunable
    assert any("hard-coded" in r for r in group.frozen_by)
    assert any("hard-coded" in w for w in graph.warnings)


# --------------------------------------------------------------------------- what freezes


class MiddleOp(nn.Module):
    """a -> <op> -> b -> c -> fc; only the channels around <op> are in question."""

    OPS = {
        "roll": lambda x: torch.roll(x, 1, dims=1),  # permutes channels: a cut would mis-align them
        "permute": lambda x: x.permute(0, 1, 3, 2),
        "flip": lambda x: torch.flip(x, dims=[1]),
    }

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.a, self.b, self.c = _cbr(3, 8), _cbr(8, 8), _cbr(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.OPS[self.op](self.a(x))
        return self.fc(self.c(self.b(x)).mean((2, 3)))


@pytest.mark.parametrize("op", sorted(MiddleOp.OPS))
def test_unknown_op_freezes_only_what_it_touches(op):
    graph = trace_channel_groups(MiddleOp(op), X)
    before = graph.group_of("a.0", "out")
    after = graph.group_of("b.0", "in")  # the op's output: a fresh space, also of unknown meaning
    for group in (before, after):
        assert not group.prunable
        assert any(f"unknown op {op}" in r for r in group.frozen_by), group.frozen_by
    assert any(op in w for w in graph.warnings)
    # Past the next conv the channels are understood again.
    assert graph.group_of("b.0", "out").prunable
    assert graph.group_of("c.0", "out").prunable


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = _cbr(3, 8), _cbr(8, 8, groups=2), _cbr(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.c(self.b(self.a(x))).mean((2, 3)))


def test_grouped_conv_couples_blocks_of_its_in_and_out_groups():
    """A groups=2 conv: its input and output channels each split into 2 blocks that must keep equal
    counts (conv-group g reads input block g only); the groups themselves stay separate and prunable."""
    graph = trace_channel_groups(GroupedNet(), X)
    assert graph.warnings == []
    before, after = graph.group_of("a.0", "out"), graph.group_of("b.1", "bn")
    assert before is not after
    assert _facts(before) == (8, ["a.0"], ["a.1"], ["b.0"]) and before.blocks == 2 and before.prunable
    assert _facts(after) == (8, ["b.0"], ["b.1"], ["c.0"]) and after.blocks == 2 and after.prunable
    assert graph.group_of("c.0", "out").blocks == 1


class MisalignedGroupedNet(nn.Module):
    """A groups=2 conv reading cat(6 channels, 2 channels): its blocks of 4 straddle the two layers."""

    def __init__(self):
        super().__init__()
        self.a, self.a2 = _cbr(3, 6), _cbr(3, 2)
        self.b, self.c = _cbr(8, 8, groups=2), _cbr(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.cat([self.a(x), self.a2(x)], 1)
        return self.fc(self.c(self.b(x)).mean((2, 3)))


def test_grouped_conv_on_misaligned_parts_freezes_them():
    """Cutting one group of a groups=2 conv would need a matching cut in the other: when its blocks do
    not line up with the layers feeding it, the channels it reads are left whole."""
    graph = trace_channel_groups(MisalignedGroupedNet(), X)
    for group in (graph.group_of("a.0", "out"), graph.group_of("a2.0", "out")):
        assert not group.prunable
        assert any("grouped conv 'b.0' (groups=2)" in r for r in group.frozen_by)
    assert graph.group_of("b.0", "out").prunable and graph.group_of("b.0", "out").blocks == 2
    assert graph.group_of("c.0", "out").prunable


@pytest.mark.parametrize("mode", ["thresh", "exact"])
def test_grouped_conv_is_cut_evenly_and_stays_grouped(mode):
    torch.manual_seed(0)
    model = GroupedNet().eval()
    with torch.no_grad():
        for bn in (model.a[1], model.b[1]):
            bn.running_mean.normal_()
            bn.bias.normal_()
        # a.1: block 0 has 3 strong channels, block 1 has 1; b.1: 1 and 2
        model.a[1].weight.copy_(torch.tensor([0.9, 0.8, 0.0, 0.7, 0.0, 0.0, 0.6, 0.0]))
        model.b[1].weight.copy_(torch.tensor([0.0, 0.0, 0.5, 0.0, 0.9, 0.0, 0.8, 0.0]))
        if mode == "exact":  # dead channels: zero γ and β
            for bn in (model.a[1], model.b[1]):
                bn.bias[bn.weight == 0] = 0
        ref = model(X)
    prune(model, X, thresh=0.1)
    b = model.b[0]
    # each conv-group keeps as many as its block with the most strong channels: 3 and 2 per group
    assert (b.groups, b.in_channels, b.out_channels) == (2, 6, 4)
    assert b.weight.shape == (4, 3, 3, 3)
    assert model.a[0].out_channels == 6 and model.c[0].in_channels == 4
    gammas = model.a[1].weight.tolist()  # the strongest 3 per block, in order (ties among the zeros)
    assert gammas[:3] == pytest.approx([0.9, 0.8, 0.7]) and sorted(gammas[3:]) == pytest.approx([0, 0, 0.6])
    with torch.no_grad():
        out = model(X)
    if mode == "exact":
        torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------- untraceable forwards


class Branchy(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot capture it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return x


class WithBranchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.br, self.b = _cbr(3, 8), Branchy(), _cbr(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.b(self.br(self.a(x))).mean((2, 3)))


def test_data_dependent_control_flow_raises_with_hint():
    with pytest.raises(TraceError) as info:
        trace_channel_groups(WithBranchy(), X)
    message = str(info.value)
    assert "Hint" in message and "leaf_modules" in message
    assert "Branchy" in message  # names the submodule to pass, not just the top-level model


def test_leaf_modules_make_tracing_succeed_and_keep_the_leaf_whole():
    graph = trace_channel_groups(WithBranchy(), X, leaf_modules=[Branchy])
    assert not any(module.startswith("br.") for module, _ in graph.axes)  # nothing inside is sliced
    for group in (graph.group_of("a.0", "out"), graph.group_of("b.0", "in")):
        assert not group.prunable
        assert any("Branchy" in r for r in group.frozen_by)
    assert graph.group_of("b.0", "out").prunable

    # End to end: a threshold above every γ cuts `b` to one channel but leaves the leaf's layers whole.
    model = WithBranchy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune(model, X, thresh=10.0, leaf_modules=[Branchy])
    assert (model.br.conv.in_channels, model.br.conv.out_channels, model.br.bn.num_features) == (8, 8, 8)
    assert model.a[0].out_channels == 8 and model.b[0].out_channels == 1


# --------------------------------------------------------------------------- tracing has no side effects


def _snapshot(model: nn.Module):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    momenta = {name: m.momentum for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    return state, modes, momenta


def _assert_same(before, after):
    (s0, m0, mo0), (s1, m1, mo1) = before, after
    assert s0.keys() == s1.keys()
    changed = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert changed == [], f"tracing changed {changed}"
    assert m0 == m1
    assert mo0 == mo1


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_tracing_leaves_model_unchanged(mode):
    """Tracing runs a train-mode forward; it must not move BN statistics nor flip any module's mode."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet", num_classes=10, in_channels=3, depth=8, width=4)
    model.layer1[0].bn1.momentum = None  # cumulative averaging: a different update rule
    with torch.no_grad():
        model.train()
        for _ in range(2):  # non-trivial running stats and num_batches_tracked
            model(torch.randn(4, 3, 8, 8) * 3 + 1)
    if mode == "eval":
        model.eval()
    elif mode == "mixed":
        model.layer2.eval()  # e.g. a frozen stage during fine-tuning
    before = _snapshot(model)
    trace_channel_groups(model, X)
    _assert_same(before, _snapshot(model))


class MakesItsOwnTensor(nn.Module):
    """Its forward makes a CPU tensor: shapes cannot come from meta tensors, so one real forward runs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _cbr(3, 8), _cbr(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.a(x)
        x = x * torch.ones((x.shape[0], 1, 1, 1))  # a per-sample factor: channels untouched
        return self.fc(self.b(x).mean((2, 3)))


def test_forward_meta_tensors_cannot_run_falls_back_to_a_real_one_without_side_effects():
    model = MakesItsOwnTensor()
    model.train()
    before = _snapshot(model)
    graph = trace_channel_groups(model, X)
    _assert_same(before, _snapshot(model))
    assert graph.warnings == []
    assert _facts(graph.group_of("a.0", "out")) == (8, ["a.0"], ["a.1"], ["b.0"])
    assert graph.group_of("a.0", "out").prunable


def test_tracing_leaves_instance_norm_running_stats_unchanged():
    model = nn.Sequential(_cbr(3, 8), nn.Conv2d(8, 8, 1), nn.InstanceNorm2d(8, track_running_stats=True))
    model.eval()
    before = _snapshot(model)
    trace_channel_groups(model, X)
    _assert_same(before, _snapshot(model))


# --------------------------------------------------------------------------- norms outside nn.BatchNorm2d


class OutsideNorm(_BatchNorm):
    """A user-defined norm deriving from torch's _BatchNorm, defined outside torch.nn."""

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input, got {input.dim()}D")


@pytest.mark.parametrize("norm_cls", [nn.SyncBatchNorm, OutsideNorm], ids=["SyncBatchNorm", "OutsideNorm"])
def test_other_batchnorm_classes_rank_and_get_cut(norm_cls):
    assert not issubclass(norm_cls, nn.BatchNorm2d)  # the point: recognised by _BatchNorm, not BN2d
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm_cls(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    graph = trace_channel_groups(model, X)
    group = graph.group_of("0", "out")
    assert _norm_names(group) == ["1"] and group.prunable

    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.9, 0.0, 0.8, 0.0, 0.7, 0.0, 0.6, 0.0]))
    prune(model, X, thresh=0.1)
    assert (model[0].out_channels, model[1].num_features, model[3].in_channels) == (4, 4, 4)
    assert isinstance(model[1], norm_cls)
