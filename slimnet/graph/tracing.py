"""Capture a forward as a graph with module targets: ``torch.fx`` symbolic tracing first, ``torch.export``
(``slimnet.graph.capture``) when that fails, a :class:`TraceError` naming both causes when neither can.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from slimnet.errors import TraceError, first_line
from slimnet.graph.ops import NORM_TYPES, OPS
from slimnet.graph.shapes import _shapes


class _Tracer(fx.Tracer):
    """``fx.Tracer`` that also keeps any conv, linear or norm subclass as one leaf.

    Users subclass ``nn.Conv2d`` or ``_BatchNorm`` (or wrap them) outside ``torch.nn``; tracing into
    their ``forward`` would hide the layer we need to slice. ``leaf_modules`` lets a caller keep a
    module whose forward cannot be traced as a black box (its channels are then left whole). A module
    class registered in ``OPS.modules`` is a leaf too, so its handler sees it.
    """

    def __init__(self, leaf_types: tuple[type, ...] = ()):
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (_ConvNd, nn.Linear) + NORM_TYPES + self.leaf_types) or type(m) in OPS.modules:
            return True
        return super().is_leaf_module(m, qualname)


def symbolic_graph(model: nn.Module, leaf_types: tuple[type, ...]) -> fx.Graph:
    """The forward as an ``fx.Graph`` whose module targets are ``model``'s own qualified names (run it
    with ``fx.Interpreter(model, graph=graph)``: no ``GraphModule``, no code generation)."""
    tracer = _Tracer(leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many types; all mean "cannot capture this forward"
        where = ""
        for frame in reversed(err.__traceback__ and _frames(err.__traceback__) or []):
            if frame.startswith("forward of "):
                where = f" in {frame[len('forward of '):]}"
                break
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}{where}: {type(err).__name__}: "
            f"{first_line(err, 300)}") from err
    return graph


def _capture(model: nn.Module, leaf_types: tuple[type, ...], example_inputs: tuple) -> tuple[fx.Graph, dict]:
    """The forward as a graph with module targets, and each node's shape: ``torch.fx`` symbolic tracing
    first (10-30 ms), ``torch.export`` when that fails (0.2-3 s; it specialises shape checks and unpacks
    ``*args``), a :class:`TraceError` naming both causes when neither can."""
    try:
        graph = symbolic_graph(model, leaf_types)
    except TraceError as fx_err:
        from slimnet.graph.capture import export_graph  # only needed for forwards fx cannot read

        try:
            return export_graph(model, example_inputs, NORM_TYPES)
        except Exception as export_err:  # export raises many types; report its own words
            raise TraceError(
                f"cannot capture {type(model).__name__}'s forward. {fx_err} And torch.export failed: "
                f"{type(export_err).__name__}: {first_line(export_err, 300)}. Hint: pass the classes of the "
                "submodules these name in leaf_modules=[...] so they are kept whole (fx then traces around "
                "them), or rewrite data-dependent branches with torch.where."
            ) from export_err
    return graph, _shapes(model, graph, example_inputs)


def _frames(tb) -> list[str]:
    """Names of the ``forward`` methods on a traceback, innermost last (to name the failing module)."""
    out = []
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "forward":
            self_obj = tb.tb_frame.f_locals.get("self")
            if isinstance(self_obj, nn.Module):
                out.append(f"forward of {type(self_obj).__name__}")
        tb = tb.tb_next
    return out


def as_batch_of_two(example_inputs) -> tuple:
    """Train-mode BatchNorm needs more than one value per channel, so trace with a batch of two."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            x = x[:2] if x.shape[0] >= 2 else torch.cat([x, x], 0)
        out.append(x)
    return tuple(out)
