"""Channel slicing (``x[:, :n]``, ``x[:, n:]``) and ``torch.stack`` (issue 16): ghostnet, dpn and
skresnet's ops, on tiny hand-built look-alikes, then on the timm models themselves when timm is there.

Exactness as in ``test_reach.py``: zero γ and β of random channels (they emit exactly zero), prune, and
the outputs must not move.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from test_reach import X, _cb, _kill_weak
from torch import nn

import slimnet
import slimnet.engine.surgery
from slimnet.graph import trace_channel_groups

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py


@torch.no_grad()
def _zero_in_groups(model: nn.Module, share: float = 0.4, seed: int = 0, x: torch.Tensor = X) -> None:
    """Random γ, β and statistics, then γ = β = 0 on a random ``share`` of each cuttable group's channels
    in every norm of the group (a channel one norm zeroes but another does not still carries a signal)."""
    _kill_weak(model, 0.0, seed)
    modules = dict(model.named_modules())
    for m in modules.values():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.mul_(0.5).add_(0.5)  # live channels: |γ| >= 0.5, far above the cut's threshold
    gen = torch.Generator().manual_seed(seed)
    for group in trace_channel_groups(model, x).groups:
        if not group.prunable:
            continue
        dead = torch.randperm(group.size, generator=gen)[: int(share * group.size)]
        for ref in group.norms:
            modules[ref.module].weight[ref.offset + dead] = 0
            modules[ref.module].bias[ref.offset + dead] = 0


# --------------------------------------------------------------------------- slicing


class Ghost(nn.Module):
    """timm's GhostModule: a conv, a depthwise "cheap" conv of its output, cat, keep the first ``out_chs``.
    With an odd ``out_chs`` the slice drops the last cheap channel."""

    def __init__(self, cin: int, out_chs: int):
        super().__init__()
        self.out_chs = out_chs
        init = math.ceil(out_chs / 2)
        self.primary_conv = _cb(cin, init)
        self.cheap_operation = _cb(init, init, 3, groups=init)

    def forward(self, x):
        x1 = self.primary_conv(x)
        return torch.cat([x1, self.cheap_operation(x1)], 1)[:, :self.out_chs, :, :]


class GhostNet(nn.Module):
    def __init__(self, out_chs: int):
        super().__init__()
        self.stem, self.ghost, self.head = _cb(3, 8, 3), Ghost(8, out_chs), nn.Conv2d(out_chs, 2, 1)

    def forward(self, x):
        return self.head(self.ghost(self.stem(x)))


class DualPath(nn.Module):
    """timm's DualPathBlock: a residual part (the first ``num_1x1_c`` channels) and a dense part."""

    def __init__(self, cin: int = 8, c: int = 6, inc: int = 3):
        super().__init__()
        self.num_1x1_c, self.inc = c, inc
        self.proj, self.body = _cb(cin, c + 2 * inc), _cb(cin, c + inc, 3)

    def forward(self, x):
        s = self.proj(x)
        s1, s2 = s[:, :self.num_1x1_c], s[:, self.num_1x1_c:]
        y = self.body(x)
        return torch.cat([s1 + y[:, :self.num_1x1_c], s2, y[:, self.num_1x1_c:]], 1)


class DPNLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = _cb(3, 8, 3), DualPath(), nn.Conv2d(15, 4, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


class FixedSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = _cb(3, 8), nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.head(self.stem(x)[:, :5])  # 5 written in the code: cannot follow a cut


@pytest.mark.parametrize("out_chs", [8, 7])
def test_ghost_slice_is_cut_exactly_and_its_bound_rewritten(out_chs):
    graph = trace_channel_groups(GhostNet(out_chs), X)
    assert graph.group_of("ghost.primary_conv.0").prunable and not graph.warnings
    model = GhostNet(out_chs).eval()
    _zero_in_groups(model, seed=1)
    ref = model(X)
    report = slimnet.prune(model, X, thresh=0.1, fold_bias=False)
    kept = model.ghost.primary_conv[0].out_channels
    assert kept < math.ceil(out_chs / 2) and model.head.in_channels < out_chs
    assert model.ghost.out_chs == model.head.in_channels  # the bound describes the cut width
    torch.testing.assert_close(model(X), ref)
    fresh = GhostNet(out_chs)
    slimnet.engine.surgery.replay_plan(fresh, slimnet.PrunePlan.from_json(report["plan"].to_json()))
    assert fresh.ghost.out_chs == model.ghost.out_chs


def test_dual_path_slices_share_their_attribute_and_are_cut_exactly():
    graph = trace_channel_groups(DPNLike(), X)
    residual = graph.groups[graph.axes[("block.proj.0", "out")][0][0]]
    assert "block.body.0" in residual.producers  # s1 + y[:, :c]: the two prefixes are one group
    assert residual.prunable and not graph.warnings
    model = DPNLike().eval()
    _zero_in_groups(model, seed=2)
    ref = model(X)
    slimnet.prune(model, X, thresh=0.1, fold_bias=False)
    block = model.block
    assert block.num_1x1_c < 6 and model.head.in_channels < 15
    # the block's output is [residual, proj's dense part, body's dense part]: the bound is the residual's width
    assert block.num_1x1_c == block.proj[0].out_channels + block.body[0].out_channels - model.head.in_channels
    torch.testing.assert_close(model(X), ref)


def test_slice_bound_written_in_the_code_is_left_whole_with_a_named_warning():
    graph = trace_channel_groups(FixedSlice(), X)
    assert not graph.group_of("stem.0").prunable
    assert any("channel slice" in w and "bound fixed in the model's code" in w and "stem.0" in w for w in graph.warnings)


def test_slices_off_the_channel_axis_pass_channels_through():
    class Crop(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.head = _cb(3, 8), _cb(8, 2)

        def forward(self, x):
            return self.head(self.stem(x)[:, :, 1:, ...][..., :-1])

    graph = trace_channel_groups(Crop(), X)
    assert graph.group_of("stem.0").prunable and "head.0" in graph.group_of("stem.0").consumers


# --------------------------------------------------------------------------- stack


class SelectiveKernel(nn.Module):
    """timm's SelectiveKernel: paths stacked at dim 1, an attention over the paths from their sum
    (``view(B, P, C // P, H, W)`` of one conv's ``P*C`` outputs, softmax over the paths), weighted sum."""

    def __init__(self, c: int = 8, paths: int = 2):
        super().__init__()
        self.num_paths = paths
        self.paths = nn.ModuleList(_cb(c, c, 3, dilation=1) for _ in range(paths))
        self.fc_reduce, self.bn, self.fc_select = nn.Conv2d(c, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, c * paths, 1)

    def forward(self, x):
        x = torch.stack([op(x) for op in self.paths], dim=1)  # (B, P, C, H, W)
        a = self.fc_select(torch.relu(self.bn(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True)))))
        B, C, H, W = a.shape
        a = torch.softmax(a.view(B, self.num_paths, C // self.num_paths, H, W), dim=1)
        return torch.sum(x * a, dim=1)


class SKNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.sk, self.head = _cb(3, 8, 3), SelectiveKernel(), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.sk(self.stem(x)))


class StackThenIndex(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = _cb(3, 8), _cb(3, 8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.stack([self.a(x), self.b(x)], 1)[:, 0])  # indexing stacked channels: not modelled


def test_stacked_paths_and_their_attention_are_one_group_cut_exactly():
    graph = trace_channel_groups(SKNet(), X)
    group = graph.group_of("sk.paths.0.0")
    assert {"sk.paths.0.0", "sk.paths.1.0", "sk.fc_select"} <= set(group.producers)  # paths and attention
    assert [(g, size) for g, size, _ in graph.axes[("sk.fc_select", "out")]] == [(group.id, 8), (group.id, 8)]
    assert group.prunable and not graph.warnings
    model = SKNet().eval()
    _zero_in_groups(model, seed=4)
    ref = model(X)
    slimnet.prune(model, X, thresh=0.1, fold_bias=False)
    kept = model.sk.paths[0][0].out_channels
    assert kept < 8 and model.sk.fc_select.out_channels == 2 * kept and model.head.in_channels == kept
    torch.testing.assert_close(model(X), ref)


def test_an_op_on_stacked_channels_it_does_not_model_leaves_them_whole():
    graph = trace_channel_groups(StackThenIndex(), X)
    assert not graph.group_of("a.0").prunable
    assert any("a.0" in w and "channels moved off dim 1" in w for w in graph.warnings)


# --------------------------------------------------------------------------- the timm models themselves


@pytest.mark.parametrize("name, reach_at_least", [("ghostnet_100", 0.95), ("dpn68", 0.95), ("skresnet18", 0.5)])
def test_timm_models_with_slices_and_stacks_are_cut_exactly(name, reach_at_least):
    timm = pytest.importorskip("timm", reason="timm is a test-only extra: pip install slimnet[thirdparty]")
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = slimnet.reach(model, x)
        _zero_in_groups(model, seed=5, x=x)
    assert r.bn_channels >= reach_at_least  # before: ghostnet 9%, dpn68 65%, skresnet18 4%
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = slimnet.prune(model, x, thresh=0.1, fold_bias=False)
    assert report["flops_after"] < 0.9 * report["flops_before"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


class _DecoySize(nn.Module):
    """``half`` equals the split size, but the forward computes it from ``width``: a rewrite of ``half``
    would not reach the forward."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16)
        self.width, self.half = 16, 8
        self.a = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x):
        p, q = self.bn(self.conv(x)).split(self.width // 2, 1)
        return torch.cat([self.a(p), self.b(q)], 1)


def test_a_rewritten_size_the_forward_does_not_read_rolls_the_cut_back():
    import slimnet

    torch.manual_seed(0)
    model = _DecoySize().eval()
    with torch.no_grad():
        model.bn.weight.fill_(1.0)
        model.bn.weight[[0, 1, 8, 9]] = 0.0  # the same count in both halves: the split may be rewritten
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"half.*left as it was"):
        slimnet.prune(model, torch.randn(1, 3, 4, 4), thresh=0.5, min_channels=1)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.half == 8 and not hasattr(model, "slimnet_plan")
