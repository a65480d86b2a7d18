"""β folding: move what removed channels still feed into the network into the biases that remain.

After sparsity training a channel's γ is ~0 but its β is not, so the channel is not zero: it emits the
constant ``act(β)`` (through a BN in eval mode, ``act(β - γ·μ/σ)`` in general). Cutting it also cuts that
constant out of every layer that reads it. Folding puts it back: for a consumer ``y = W x + b`` losing
inputs ``R`` whose values are the constants ``c``, ``y = W[:, kept] x[kept] + (b + W[:, R] c)``.

How the constants are found: forward pre-hooks on every conv and linear record the per-feature mean,
minimum and maximum of its input, during a forward in eval mode on the example inputs (the one that
counts FLOPs, when the batch has one sample). Measuring at each consumer's input, instead of computing
``act(β)`` from the norm, covers every path a channel takes (a residual sum, an SE multiply, a depthwise
conv, a concat, flatten into a linear) without modelling any of them. Where a feature is constant its
exact value is used; otherwise its mean (the best constant in the least-squares sense).

Exactness: a constant channel folds exactly into a linear layer and a conv without zero padding. A conv
with zero padding sees the constant everywhere but at the border (where it reads padding instead), so
there the fold is exact in the interior only. Where the folded constant goes, in order: the consumer's
bias; else the running mean of a BatchNorm that alone reads the consumer's output (a shift of the BN's
input is undone by shifting its mean by the same amount); else a new bias, recorded in the plan.

Knows nothing of Lightning or Hydra.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from slimnet.engine.plan import PrunePlan
from slimnet.engine.surgery import add_zero_bias, as_index
from slimnet.graph import NORM_TYPES, ChannelGraph


def _consumer(module: nn.Module) -> bool:
    """A layer whose removed inputs' constants fold into its bias: what a transposed conv makes of a
    constant input varies with the output position (its taps overlap by stride), so it takes none."""
    return isinstance(module, nn.Linear) or (isinstance(module, _ConvNd) and not module.transposed)


def _reader(module: nn.Module) -> bool:
    """A layer whose input statistics are recorded (a transposed conv's too: zero inputs cut exactly)."""
    return isinstance(module, (nn.Linear, _ConvNd))


@dataclass
class FeatureStats:
    """Per input feature of one layer: mean over calls of the per-call mean, and min / max over all."""

    total: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    calls: int = 1

    @property
    def constant(self) -> torch.Tensor:
        return self.low == self.high

    @property
    def value(self) -> torch.Tensor:
        """The feature's value where constant (exactly), else its mean."""
        return torch.where(self.constant, self.low, self.total / self.calls)


class InputStats:
    """Forward pre-hooks recording :class:`FeatureStats` of the input of every conv and linear layer.

    Example::

        stats = InputStats(model)
        with stats.recording():
            model(x)
        stats["features.3"].value  # (in_channels,)
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.stats: dict[str, FeatureStats] = {}

    def __getitem__(self, name: str) -> FeatureStats:
        return self.stats[name]

    def get(self, name: str) -> FeatureStats | None:
        return self.stats.get(name)

    def state_dict(self) -> dict[str, dict]:
        """Per layer, the three per-feature vectors and the call count: small, and no input sample."""
        return {name: {"total": s.total, "low": s.low, "high": s.high, "calls": s.calls}
                for name, s in self.stats.items()}

    def to(self, device) -> InputStats:
        for s in self.stats.values():
            s.total, s.low, s.high = s.total.to(device), s.low.to(device), s.high.to(device)
        return self

    def load_state_dict(self, state: dict[str, dict]) -> None:
        self.stats = {name: FeatureStats(s["total"], s["low"], s["high"], int(s["calls"])) for name, s in state.items()}

    @contextlib.contextmanager
    def recording(self, enabled: bool = True):
        handles = []
        if enabled:
            for name, m in self.model.named_modules():
                if _reader(m):
                    handles.append(m.register_forward_pre_hook(self._hook(name)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str):
        def record(module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.dim() < 2:
                return
            x = x.detach().float()
            # a conv's features are its channels (dim 1); a linear's are its last dim
            dims = [0, *range(2, x.dim())] if isinstance(module, _ConvNd) else list(range(x.dim() - 1))
            mean, low, high = x.mean(dims), x.amin(dims), x.amax(dims)
            seen = self.stats.get(name)
            if seen is None or seen.total.shape != mean.shape:
                self.stats[name] = FeatureStats(mean, low, high)
            else:
                seen.total += mean
                seen.low, seen.high = torch.minimum(seen.low, low), torch.maximum(seen.high, high)
                seen.calls += 1
        return record


def _zero_padded(conv: _ConvNd) -> bool:
    """Whether a conv pads its input with zeros (then a constant input is not constant at the border)."""
    if conv.padding_mode != "zeros":
        return False  # reflect / replicate / circular padding of a constant is that constant
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def exactly_removable(module: nn.Module, stats: FeatureStats, fold: bool) -> torch.Tensor:
    """Per input feature of ``module``: would removing it (folding its value if ``fold``) keep outputs?

    True where the feature is always zero, or (with folding) a constant that reaches a linear layer or
    a conv without zero padding.
    """
    zero = stats.constant & (stats.low == 0)
    if not fold or not _consumer(module):
        return zero
    if isinstance(module, _ConvNd) and _zero_padded(module):
        return zero
    return stats.constant


def _contribution(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """``W @ values`` per output channel, summed over kernel positions (a conv's interior response)."""
    w = module.weight.detach().float()
    if isinstance(module, nn.Linear):
        return w @ values
    # The response to a constant input, away from borders: Σ_i Σ_k W[o, i, k] v[i], as one matrix-vector
    # product per conv-group with v repeated over the kernel positions (reads W once, no temporary).
    groups, out, per_in = module.groups, w.shape[0], w.shape[1]
    kernel = w[0, 0].numel()
    w = w.reshape(groups, out // groups, per_in * kernel)
    v = values.view(groups, per_in, 1).expand(-1, -1, kernel).reshape(groups, per_in * kernel, 1)
    return torch.bmm(w, v).flatten()


@dataclass
class FoldResult:
    folded: list[str] = field(default_factory=list)  # consumers whose bias (or BN mean) took constants
    new_bias: list[str] = field(default_factory=list)  # consumers given a bias to take them


@torch.no_grad()
def fold_removed_inputs(model: nn.Module, graph: ChannelGraph, plan: PrunePlan, stats: InputStats) -> FoldResult:
    """Before ``plan`` is applied: add what each consumer's removed inputs contribute to its bias.

    Works in the model's current numbering (call it before ``apply_plan``); the biases and running
    means it changes are then cut along with everything else.
    """
    modules = dict(model.named_modules())
    result = FoldResult()
    for name, axes in plan.keep.items():
        module, measured = modules[name], stats.get(name)
        if "in" not in axes or measured is None or not _consumer(module):
            continue
        removed = torch.ones(measured.total.numel(), dtype=torch.bool)
        removed[as_index(axes["in"])] = False
        values = torch.where(removed.to(measured.total.device), measured.value, 0.0)
        if not bool(values.any()):
            continue
        delta = _contribution(module, values)
        norm = modules.get(graph.norm_after.get(name, ""))
        if module.bias is not None:
            module.bias.add_(delta.to(module.bias))
        elif isinstance(norm, NORM_TYPES):
            if norm.running_mean is not None:  # without running stats the BN re-centres every batch
                norm.running_mean.sub_(delta.to(norm.running_mean))
        else:
            add_zero_bias(module)
            module.bias.add_(delta.to(module.bias))
            result.new_bias.append(name)
        result.folded.append(name)
    return result
