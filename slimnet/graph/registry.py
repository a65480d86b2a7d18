"""The op table: which handler says what an op does to channels. Extend it for your own ops.

The channel analysis walks the traced graph once; for every ``call_function``, ``call_method`` and
``call_module`` node it looks the op up here and calls its handler, which returns the layout of the
op's output (or leaves the channels it touches whole). An op the table does not hold is *unknown*: the
channels it touches are left whole, with a warning naming it. So registering a handler is how you let
surgery cut through an op of your own.

A handler is ``handler(analysis, node) -> layout``: ``node`` is the ``torch.fx.Node``, ``analysis`` the
walk in progress, whose few public helpers a handler needs:

- ``analysis.input_layout(node)``: the layout of the op's first argument (None when it carries no
  channels); ``analysis.tensor_layout(arg)`` for any other argument;
- ``analysis.shape(arg)``: a node's output shape (``torch.Size``) or None;
- ``analysis.union(a, b, reason)``: merge two layouts channel by channel (both then cut alike);
- ``analysis.unknown(node, what)``: give up on this op: its channels are left whole, with a warning;
- ``analysis.modules[node.target]``: the module a ``call_module`` node calls.

Ready-made handlers cover most needs (``from slimnet.graph import ...``):

- ``channelwise``: channel ``c`` in, channel ``c`` out (activations, pooling, dropout, scaling);
- ``elementwise``: an element-wise op of two tensors (``a + b``, ``a * gate``): their channels are merged;
- ``opaque``: an op you know mixes channels: left whole, as an unknown op is, but without the guess.

Example: a custom activation traced as a function, and a custom module kept as one leaf::

    from slimnet.graph import OPS, channelwise, elementwise

    OPS.functions[my_package.fancy_act] = channelwise     # a torch function or any traced callable
    OPS.methods["fancy_act"] = channelwise                # a tensor method, by name: x.fancy_act()
    OPS.modules[my_package.ChannelGate] = elementwise     # a module class (and its subclasses); the tracer
                                                          # keeps it whole, so the handler sees it

Lookups: functions by identity, methods by name, modules along the class's MRO. Graphs captured by
``torch.export`` (when fx cannot trace the forward) hold ATen ops: ``slimnet.graph.capture`` maps the ones it
knows back to torch functions, so a handler registered for an ATen op (``torch.ops.aten.x.default``)
reaches those graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Handler = Callable  # (analysis, node) -> layout | tuple of layouts | None


def reads_stacked(handler: Handler) -> Handler:
    """Mark a handler that understands tensors whose channels moved off dim 1 (``spaces.Stacked``).

    Every other handler is skipped for such inputs: the op is unknown and its channels are left whole.
    """
    handler.reads_stacked = True
    return handler


@dataclass
class OpTable:
    """Handlers by op: ``functions`` (callables, by identity), ``methods`` (tensor method names) and
    ``modules`` (module classes, matched along the MRO). Plain dicts: add, replace or remove entries."""

    functions: dict[object, Handler] = field(default_factory=dict)
    methods: dict[str, Handler] = field(default_factory=dict)
    modules: dict[type, Handler] = field(default_factory=dict)
    # Width attributes the traced forward does not show, by the class's dotted name (no import needed):
    # ``fn(module) -> {attr: value}``, recomputed after every cut and replay. E.g. ultralytics' C2f traces
    # ``chunk(2)`` but its export path (``forward_split``) splits at ``self.c``.
    widths: dict[str, Callable] = field(default_factory=dict)

    def derived_widths(self, module) -> dict:
        """The width attributes ``widths`` recomputes for ``module`` (empty for most modules)."""
        for cls in type(module).__mro__:
            fn = self.widths.get(f"{cls.__module__}.{cls.__qualname__}")
            if fn is not None:
                return fn(module)
        return {}

    def function(self, node) -> Handler | None:
        """The handler of a ``call_function`` or ``call_method`` node, or None."""
        if node.op == "call_method":
            return self.methods.get(node.target)
        try:
            return self.functions.get(node.target)
        except TypeError:  # an unhashable target
            return None

    def module(self, module) -> Handler | None:
        """The handler of a module, looked up along its class's MRO, or None."""
        for cls in type(module).__mro__:
            if cls in self.modules:
                return self.modules[cls]
        return None

    def register(self, targets, handler: Handler, kind: str = "functions") -> None:
        """``handler`` for every target in ``targets`` of one ``kind``: functions, methods or modules."""
        table = getattr(self, kind)
        for target in targets:
            table[target] = handler
