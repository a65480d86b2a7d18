"""The op table (``slimnet.graph.OPS``): a handler a user registers for an op of their own is used, so
surgery cuts through that op instead of leaving its channels whole."""

from __future__ import annotations

import pytest
import torch
from test_graph_slice_stack import _zero_in_groups
from test_reach import X, _cb
from torch import fx, nn

import slimnet
from slimnet.graph import OPS, channelwise, trace_channel_groups

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py


def fancy_act(x: torch.Tensor) -> torch.Tensor:
    """A user's activation: channel c in, channel c out."""
    return x * torch.sigmoid(1.5 * x)


fx.wrap("fancy_act")  # fx records a call to it (one node) instead of tracing through it


class Gate(nn.Module):
    """A user's module, channel-wise too, whose forward the tracer would otherwise walk into."""

    def forward(self, x):
        return x.clamp(-3, 3) * 0.5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.gate, self.mid, self.head = _cb(3, 8), Gate(), _cb(8, 8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.mid(self.gate(fancy_act(self.stem(x)))))


def test_a_registered_function_handler_lets_the_cut_through_and_stays_exact(monkeypatch):
    graph = trace_channel_groups(Net(), X)  # unregistered: an unknown op, its channels left whole
    assert not graph.group_of("stem.0").prunable
    assert any("fancy_act" in w and "stem.0" in w for w in graph.warnings)

    monkeypatch.setitem(OPS.functions, fancy_act, channelwise)
    monkeypatch.setitem(OPS.modules, Gate, channelwise)  # also kept as one leaf by the tracer
    graph = trace_channel_groups(Net(), X)
    stem = graph.group_of("stem.0")
    assert stem.prunable and "mid.0" in stem.consumers and not graph.warnings
    model = Net().eval()
    _zero_in_groups(model, seed=6)
    ref = model(X)
    slimnet.prune(model, X, thresh=0.1, fold_bias=False)
    assert model.stem[0].out_channels < 8 and model.mid[0].in_channels == model.stem[0].out_channels
    torch.testing.assert_close(model(X), ref)
