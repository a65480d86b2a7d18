"""Surgery's reach (issue 16): chunk/split, forwards fx cannot read, all-or-nothing cuts, and saying what
is left whole.

Exactness is checked the way a user would: zero γ and β of the channels a cut will remove (so they emit
exactly zero), prune, and the outputs must not move. Tiny models, 8x8 inputs; the file takes seconds.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import slimnet
import slimnet.engine.surgery
from slimnet.engine.cut import run_surgery
from slimnet.engine.plan import PlanDecision, PrunePlan
from slimnet.graph import TraceError, trace_channel_groups

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py


def _cb(cin: int, cout: int, k: int = 1, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False, **kw), nn.BatchNorm2d(cout), nn.SiLU())


@torch.no_grad()
def _kill_weak(model: nn.Module, thresh: float, seed: int = 0) -> None:
    """Random γ in [0, 1), random statistics; channels with γ below ``thresh`` get γ = β = 0 (they emit 0)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.weight.copy_(torch.rand(m.num_features, generator=gen))
            m.bias.copy_(torch.randn(m.num_features, generator=gen))
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            dead = m.weight < thresh
            m.weight[dead], m.bias[dead] = 0, 0


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_identical(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k


# --------------------------------------------------------------------------- chunk and split


class C2fLike(nn.Module):
    """ultralytics' C2f: cv1 -> chunk(2) -> the second half through residual bottlenecks -> cat all -> cv2."""

    def __init__(self, c: int = 8, n: int = 2):
        super().__init__()
        self.stem = _cb(3, 16, 3)
        self.cv1 = _cb(16, 2 * c)
        self.m = nn.ModuleList(nn.Sequential(_cb(c, c, 3), _cb(c, c, 3)) for _ in range(n))
        self.cv2 = _cb((2 + n) * c, 16)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        a, b = self.cv1(self.stem(x)).chunk(2, 1)
        y = [a, b]
        for m in self.m:
            y.append(y[-1] + m(y[-1]))
        return self.head(self.cv2(torch.cat(y, 1)))


def test_chunk_parts_are_their_own_spaces_tied_to_equal_counts():
    graph = trace_channel_groups(C2fLike(), X)
    first, second = graph.groups[graph.axes[("cv1.0", "out")][0][0]], graph.groups[graph.axes[("cv1.0", "out")][1][0]]
    assert [p[1] for p in graph.axes[("cv1.0", "out")]] == [8, 8]  # cv1's filters: two spaces of 8
    assert first.prunable and second.prunable and first.id != second.id
    assert "m.0.1.0" in second.producers and "m.0.1.0" not in first.producers  # the residual joins half 2 only
    assert sorted(g for g, _ in next(t for t in graph.ties if first.id in dict(t))) == sorted([first.id, second.id])
    assert graph.warnings == []


def test_chunk_model_cut_is_exact_with_equal_halves():
    model = C2fLike().eval()
    _kill_weak(model, 0.5)
    ref = model(X)
    slimnet.prune(model, X, thresh=0.1, fold_bias=False)
    assert model.cv1[0].out_channels % 2 == 0 and model.cv1[0].out_channels < 16  # chunk(2) still splits evenly
    half = model.cv1[0].out_channels // 2
    assert model.m[0][0][0].in_channels == half
    torch.testing.assert_close(model(X), ref)


class SplitFixed(nn.Module):
    """``split`` with sizes written in the code: they cannot follow a cut."""

    def __init__(self):
        super().__init__()
        self.cv1, self.a, self.b, self.head = _cb(3, 8), _cb(4, 4), _cb(4, 4), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        p, q = self.cv1(x).split([4, 4], 1)
        return self.head(torch.cat([self.a(p), self.b(q)], 1))


class SplitFromShape(nn.Module):
    """``split`` with sizes computed from the tensor's shape: they follow the cut like ``chunk``."""

    def __init__(self):
        super().__init__()
        self.cv1, self.a, self.b, self.head = _cb(3, 8), _cb(4, 4), _cb(4, 4), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.cv1(x)
        p, q = y.split(y.shape[1] // 2, 1)
        return self.head(torch.cat([self.a(p), self.b(q)], 1))


def test_split_with_sizes_in_code_is_left_whole_with_a_named_warning():
    graph = trace_channel_groups(SplitFixed(), X)
    assert not graph.group_of("cv1.0").prunable
    assert any("split" in w and "fixed in the model's code" in w and "cv1.0" in w for w in graph.warnings)
    model = SplitFixed().eval()
    _kill_weak(model, 0.5)
    with pytest.warns(UserWarning, match="cv1.0 kept whole"):
        slimnet.prune(model, X, thresh=0.1)
    assert model.cv1[0].out_channels == 8 and model(X).shape == (2, 2, 8, 8)


def test_split_with_sizes_from_the_shape_is_cut_exactly():
    model = SplitFromShape().eval()
    _kill_weak(model, 0.5, seed=3)
    ref = model(X)
    slimnet.prune(model, X, thresh=0.1, fold_bias=False)
    assert model.cv1[0].out_channels < 8 and model.a[0].in_channels == model.b[0].in_channels
    torch.testing.assert_close(model(X), ref)


class MixedSplit(nn.Module):
    """timm's MixedConv2d: ``torch.split(x, self.splits, 1)``, a different conv per part, cat."""

    def __init__(self):
        super().__init__()
        self.cv1 = _cb(3, 12)
        self.splits = [4, 8]
        self.convs = nn.ModuleList([_cb(4, 4, 3, groups=4), _cb(8, 8, 5, groups=8)])
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        parts = torch.split(self.cv1(x), self.splits, 1)
        return self.head(torch.cat([c(p) for c, p in zip(self.convs, parts)], 1))


class SplitByInt(nn.Module):
    """ultralytics' C2f.forward_split: ``split((self.c, self.c), 1)``."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.c = c
        self.cv1, self.m, self.cv2 = _cb(3, 2 * c), _cb(c, c, 3), _cb(3 * c, 6)

    def forward(self, x):
        a, b = self.cv1(x).split((self.c, self.c), 1)
        return self.cv2(torch.cat([a, b, self.m(b)], 1))


def test_split_sizes_in_a_list_attribute_are_rewritten_and_replay():
    model = MixedSplit().eval()
    _kill_weak(model, 0.5, seed=1)
    ref = model(X)
    report = slimnet.prune(model, X, thresh=0.1, fold_bias=False)
    kept = [model.convs[0][0].out_channels, model.convs[1][0].out_channels]
    assert model.splits == kept and sum(kept) == model.cv1[0].out_channels < 12  # parts cut independently
    torch.testing.assert_close(model(X), ref)
    fresh = MixedSplit()
    slimnet.engine.surgery.replay_plan(fresh, slimnet.PrunePlan.from_json(report["plan"].to_json()))
    assert fresh.splits == kept  # a plan saved as JSON rewrites the sizes of a freshly built model too


def test_split_sizes_from_an_int_attribute_keep_equal_parts():
    model = SplitByInt().eval()
    _kill_weak(model, 0.5, seed=2)
    ref = model(X)
    slimnet.prune(model, X, thresh=0.1, fold_bias=False)
    assert model.cv1[0].out_channels == 2 * model.c and model.c < 4 and model.m[0].in_channels == model.c
    torch.testing.assert_close(model(X), ref)


# --------------------------------------------------------------------------- all or nothing


class CatGrouped(nn.Module):
    """The issue's repro: cat(a, b) -> Conv2d(8, 8, groups=2), block g of the conv reading part g."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _cb(3, 4), _cb(3, 4)
        self.g = nn.Conv2d(8, 8, 1, groups=2)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.g(torch.cat([self.a(x), self.b(x)], 1)))


def test_grouped_conv_fed_by_a_cat_keeps_equal_counts_per_group_and_is_exact():
    model = CatGrouped().eval()
    _kill_weak(model, 0.0)
    with torch.no_grad():  # `a` has three weak channels, `b` one: counts differ unless the plan ties them
        for bn, dead in ((model.a[1], [0, 1, 2]), (model.b[1], [3])):
            bn.weight[dead], bn.bias[dead] = 0, 0
            bn.weight[[i for i in range(4) if i not in dead]] = 1.0
    ref = model(X)
    slimnet.prune(model, X, thresh=0.1, fold_bias=False)
    assert model.a[0].out_channels == model.b[0].out_channels == 3  # b's need (3) wins; a keeps 3 too
    assert model.g.in_channels == 6 and model.g.groups == 2
    torch.testing.assert_close(model(X), ref)  # a keeps one zero channel: still exact


def test_a_plan_that_cannot_be_applied_leaves_the_model_bit_identical():
    model = CatGrouped().eval()
    _kill_weak(model, 0.3)
    before = _state(model)
    params = {k: id(v) for k, v in model.named_parameters()}

    def unequal(graph, stats):  # what the old plan did: 1 of a's channels, 3 of b's, into a groups=2 conv
        plan = PrunePlan(keep={"a.0": {"out": [0]}, "a.1": {"bn": [0]}, "b.0": {"out": [0, 1, 2]},
                               "b.1": {"bn": [0, 1, 2]}, "g": {"in": [0, 4, 5, 6]}})
        return PlanDecision(plan=plan, threshold=None, kept={})

    with pytest.raises(ValueError, match=r"nothing was changed.*'g'.*same number of channels"):
        run_surgery(model, X, unequal, fold_bias=True, measure_inputs=True)
    _assert_identical(model, before)
    assert {k: id(v) for k, v in model.named_parameters()} == params  # the same Parameter objects, too
    assert model.g.in_channels == 8 and model.a[0].out_channels == 4


def test_a_failure_while_cutting_puts_every_tensor_back(monkeypatch):
    model = CatGrouped().eval()
    _kill_weak(model, 0.5)
    before = _state(model)
    import slimnet.engine.surgery as surgery

    real = surgery._cut_conv

    def fail_on_g(m, kind, index):
        if m is model.g:
            raise RuntimeError("disk on fire")
        return real(m, kind, index)

    monkeypatch.setattr(surgery, "_cut_conv", fail_on_g)
    monkeypatch.setitem(surgery._KINDS, fail_on_g, ("out", "in", "dw"))
    with pytest.raises(RuntimeError, match="disk on fire"):
        slimnet.prune(model, X, thresh=0.1)  # folding has changed biases and `a` is cut when `g` fails
    _assert_identical(model, before)


# --------------------------------------------------------------------------- a second capture path


class Untraceable(nn.Module):
    """``*args`` in forward and a shape check: torch.fx cannot trace either."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _cb(3, 8, 3), _cb(8, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, *args, **kwargs):
        h = x.shape[-1]
        if h % 4:
            raise ValueError("input size must be a multiple of 4")
        y = self.b(self.a(x))
        for extra in args:
            y = y + extra
        return self.fc(y.mean((2, 3)))


def test_forward_fx_cannot_trace_is_captured_by_export_and_cut_in_the_users_modules():
    model = Untraceable().eval()
    _kill_weak(model, 0.5)
    a_conv = model.a[0]
    ref = model(X)
    report = slimnet.prune(model, X, thresh=0.1, fold_bias=False)
    assert model.a[0] is a_conv and a_conv.out_channels < 8  # the user's own module object, cut
    assert report["flops_after"] < report["flops_before"] == slimnet.count_flops(Untraceable(), X)[0]
    assert report["flops_after"] == slimnet.count_flops(model, X)[0]
    torch.testing.assert_close(model(X), ref)


def test_forward_fx_cannot_trace_costs_one_real_forward_report_and_folding_included():
    model, calls = Untraceable().eval(), []
    _kill_weak(model, 0.5)
    fake = torch._subclasses.fake_tensor.FakeTensor  # torch.export runs the forward on fake tensors: free
    model.register_forward_pre_hook(lambda m, a: None if isinstance(a[0], fake) else calls.append(1))
    slimnet.prune(model, X, thresh=0.1)
    assert calls == [1]  # positions for the FLOPs and the constants folding needs, from the same forward


class Hopeless(nn.Module):
    """A branch on a tensor's *value*: neither fx nor export can capture it."""

    def __init__(self):
        super().__init__()
        self.a = _cb(3, 8)

    def forward(self, x, *args):
        y = self.a(x)
        return y if y.sum() > 0 else -y


def test_refusal_names_both_causes():
    with pytest.raises(TraceError) as info:
        trace_channel_groups(Hopeless(), X)
    message = str(info.value)
    assert "torch.fx" in message and "torch.export" in message and "Hint" in message
    assert "data-dependent" in message.lower() or "guard" in message.lower()  # export's real cause, in its words


# --------------------------------------------------------------------------- saying what is out of reach


class HalfFrozen(nn.Module):
    """Two equal branches; the second one's output goes through an op we do not model (a cumsum over
    channels), so its group is frozen: half the BN channels, a known share of the FLOPs."""

    def __init__(self):
        super().__init__()
        self.p, self.q = _cb(3, 8), _cb(3, 8)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.cat([self.p(x), self.q(x).cumsum(1)], 1).mean((2, 3)))


def test_reach_reports_the_frozen_share_and_warns_once_per_frozen_group():
    with pytest.warns(UserWarning) as record:
        r = slimnet.reach(HalfFrozen(), X)
    assert r.bn_channels == pytest.approx(0.5)
    conv_flops = 2 * 3 * 8 * 64  # per conv: 2 x (3 x 8 weights) x 64 positions; fc: 2 x 16 x 4
    assert r.flops_total == 2 * conv_flops + 2 * 16 * 4
    assert r.flops == pytest.approx((conv_flops + 2 * 16 * 4) / r.flops_total)  # p and fc's inputs
    assert [layers for layers, _ in r.frozen] == ["q.0"] and "cumsum" in r.frozen[0][1]
    named = [str(w.message) for w in record if "q.0" in str(w.message)]
    assert len(named) == 1 and "kept whole" in named[0] and "cumsum" in named[0]
    assert "50%" in str(r) and r.to_dict()["frozen"] == [["q.0", r.frozen[0][1]]]


class GateOnCat(nn.Module):
    """A gate (one conv's output) multiplying a concatenation: the gate's channels are cut to match the parts."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.gate = _cb(3, 4), _cb(3, 4), _cb(3, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1) * self.gate(x))


def test_gate_on_a_concatenation_is_cut_part_by_part():
    graph = trace_channel_groups(GateOnCat(), X)
    assert [p[1] for p in graph.axes[("gate.0", "out")]] == [4, 4]  # the gate's filters: two runs of 4
    assert graph.group_of("a.0").prunable and graph.warnings == []
    model = GateOnCat().eval()
    _kill_weak(model, 0.5, seed=4)
    ref = model(X)
    slimnet.prune(model, X, thresh=0.1, fold_bias=False)
    assert model.gate[0].out_channels == model.a[0].out_channels + model.b[0].out_channels < 8
    torch.testing.assert_close(model(X), ref)


class Mismatch(nn.Module):
    """cat(a, b) + c where c's channels also feed a grouped conv (blocks of 2 that must stay equal): c cannot
    be cut at a's boundary, so no unknown op, and still every group of the sum is frozen."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = _cb(3, 3), _cb(3, 5), _cb(3, 8)
        self.g = nn.Conv2d(8, 8, 1, groups=4)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        c = self.c(x)
        gc = self.g(c)  # first: c's blocks are fixed before the sum asks to cut c after channel 3
        return self.head(torch.cat([torch.cat([self.a(x), self.b(x)], 1) + c, gc], 1))


def test_frozen_by_mismatched_add_is_named():
    graph = trace_channel_groups(Mismatch(), X)
    frozen = [w for w in graph.warnings if "kept whole" in w]
    assert len(frozen) == 3 and all("different channel layouts" in w for w in frozen)
    assert sorted(w.split(" kept whole")[0] for w in frozen) == ["a.0", "b.0", "c.0"]


# --------------------------------------------------------------------------- FrozenBatchNorm2d


def test_frozen_batchnorm_resnet_backbone_is_cut_exactly():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                n = m.weight.numel()
                m.weight.copy_(torch.rand(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                dead = torch.rand(n, generator=gen) < 0.3  # zero γ and β on random channels
                m.weight[dead], m.bias[dead] = 0, 0
    x = torch.randn(1, 3, 32, 32, generator=gen)
    ref = model(x)
    report = slimnet.prune(model, x, thresh=1e-6, fold_bias=False, cut_frozen=True)  # γ set by hand, as if trained
    assert model.layer1[0].conv1.out_channels < 64 and model.layer1[0].bn1.weight.shape == (
        model.layer1[0].conv1.out_channels,)
    assert report["params_after"] < report["params_before"]
    torch.testing.assert_close(model(x), ref)


def test_frozen_batchnorm_beta_is_folded():
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), FrozenBatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1, bias=False), FrozenBatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].weight[:4] = 0  # γ = 0, β > 0: the channel emits the constant relu(β)
        model[1].bias.copy_(torch.linspace(0.1, 0.8, 8))
    ref = model(X)
    slimnet.prune(model, X, thresh=1e-6, cut_frozen=True)
    assert model[0].out_channels == 4
    torch.testing.assert_close(model(X), ref)  # 1x1 conv, no padding: the fold is exact


# --------------------------------------------------------------------------- the report is cheap


def test_report_flops_match_flop_counter_and_fold_needs_one_forward():
    model = C2fLike().eval()
    _kill_weak(model, 0.5)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    report = slimnet.prune(model, X, thresh=0.1, fold_bias=False)
    assert calls == []  # FLOPs before and after from shapes: no real forward at all
    assert report["flops_after"] == slimnet.count_flops(model, X)[0]
    model, calls = C2fLike().eval(), []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    slimnet.prune(model, X, percent=0.3)
    assert calls == [1]  # folding reads its constants from one real forward


class _ShapeReader(nn.Module):
    """Ultralytics' Attention in miniature: ``v`` is viewed as heads with sizes from attributes (a count
    the graph cannot follow, so ``v`` stays whole), and viewed back with ``C`` read from the *input's*
    shape at run time. The trace cannot tie that ``C`` to the input's channels (``torch.export`` even writes
    it into the graph as a number), so only running the cut model shows it."""

    def __init__(self, c: int, heads: int = 2, branch: bool = False):
        super().__init__()
        self.heads, self.dim, self.branch = heads, c // heads, branch
        self.v = nn.Conv2d(c, c, 1, bias=False)
        self.proj = _cb(c, c)

    def forward(self, x):
        B, C, H, W = x.shape
        if self.branch and H % 2:  # control flow on a shape: fx cannot trace it, torch.export can
            x = x[:, :, :-1]
        v = self.v(x).view(B, self.heads, self.dim, H * W)
        attn = (v.transpose(-2, -1) @ v).softmax(-1)
        return x + self.proj((v @ attn).view(B, C, H, W))


class _WithShapeReader(nn.Module):
    def __init__(self, branch: bool):
        super().__init__()
        self.stem, self.attn, self.body = _cb(3, 16, 3), _ShapeReader(16, branch=branch), _cb(16, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.body(self.attn(self.stem(x))))


@pytest.mark.parametrize("branch", [False, True], ids=["fx", "export"])
def test_a_module_reading_channels_from_a_shape_is_kept_whole_and_the_rest_cut_exactly(branch):
    model = _WithShapeReader(branch).eval()
    _kill_weak(model, 0.4)
    ref = model(X)
    with pytest.warns(UserWarning, match=r"'attn' \(_ShapeReader\) reads a channel count the trace does not show"):
        report = slimnet.prune(model, X, thresh=0.2)
    assert model.stem[0].out_channels == 16 and model.attn.proj[0].out_channels == 16  # the attention's input
    assert model.body[0].out_channels < 16 and report["flops_after"] < report["flops_before"]  # the rest is cut
    torch.testing.assert_close(model(X), ref, rtol=1e-4, atol=1e-4)


def test_a_cut_model_that_fails_in_the_models_own_forward_is_put_back_with_one_line():
    class RootReads(nn.Module):  # _ShapeReader's trick in the root's own forward: nothing narrower to keep whole
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = _cb(3, 8), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            heads = self.b(x).view(x.shape[0], 2, 4, -1)
            return self.head(y + self.c(heads.view(x.shape[0], y.shape[1], *x.shape[2:])))

    model = RootReads().eval()
    _kill_weak(model, 0.4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"^prune: the cut model does not run \(.*left as it was") as caught:
        slimnet.prune(model, X, thresh=0.2)
    assert "\n" not in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.a[0].out_channels == 8


# --------------------------------------------------------------------------- transposed convs


class _Decoder(nn.Module):
    """A decoder's up-sampling step (YOLO-seg's proto, a UNet's): a transposed conv between two BN groups."""

    def __init__(self, groups: int = 1, branch: bool = False):
        super().__init__()
        self.branch = branch
        self.stem = _cb(3, 8, 3)
        self.up = nn.Sequential(nn.ConvTranspose2d(8, 6, 2, stride=2, groups=groups, bias=False), nn.BatchNorm2d(6),
                                nn.SiLU())
        self.up2 = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)  # with a bias, overlapping taps
        self.head = _cb(4, 5)

    def forward(self, x):
        if self.branch and x.shape[2] % 2:  # control flow on a shape: captured by torch.export
            x = x[:, :, :-1]
        return self.head(self.up2(self.up(self.stem(x))))


@pytest.mark.parametrize("branch", [False, True], ids=["fx", "export"])
def test_a_transposed_conv_is_cut_on_both_axes_exactly_with_flops_and_replay(branch):
    model = _Decoder(branch=branch).eval()
    _kill_weak(model, 0.4)
    ref = model(X)
    report = slimnet.prune(model, X, thresh=0.2)
    up, up2 = model.up[0], model.up2
    assert up.in_channels == model.stem[0].out_channels < 8 and up.weight.shape[0] == up.in_channels
    assert up.out_channels == model.up[1].num_features < 6 and up.weight.shape[1] == up.out_channels
    assert up2.in_channels == up.out_channels and up2.weight.shape[0] == up2.in_channels
    torch.testing.assert_close(model(X), ref, rtol=1e-4, atol=1e-4)  # zero channels out: outputs unchanged
    # a transposed conv spends one MAC per weight per *input* position; the report counts as flop_counter does
    assert report["flops_before"] == slimnet.count_flops(_Decoder(branch=branch), X)[0]
    assert report["flops_after"] == slimnet.count_flops(model, X)[0]
    fresh = _Decoder(branch=branch).eval()
    slimnet.engine.surgery.replay_plan(fresh, slimnet.PrunePlan.from_json(report["plan"].to_json()))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(X), ref, rtol=1e-4, atol=1e-4)


def test_a_grouped_transposed_conv_keeps_its_channels_and_says_so():
    model = _Decoder(groups=2).eval()
    _kill_weak(model, 0.4)
    ref = model(X)
    with pytest.warns(UserWarning, match=r"grouped ConvTranspose2d \('up.0'\)"):
        slimnet.prune(model, X, thresh=0.2)
    assert model.up[0].in_channels == 8 and model.up[0].out_channels == 6  # both of its groups whole
    torch.testing.assert_close(model(X), ref)


def test_reach_counts_a_module_reading_channels_from_a_shape_as_out_of_reach():
    model = _WithShapeReader(branch=False).eval()
    with pytest.warns(UserWarning):
        r = slimnet.reach(model, X)
    assert any("'attn' (_ShapeReader) reads a channel count" in reason for _, reason in r.frozen)
    assert r.bn_channels < 1.0  # the stem's and the attention's norms: the body's group is still in reach
    assert not any("body" in layers for layers, _ in r.frozen)
