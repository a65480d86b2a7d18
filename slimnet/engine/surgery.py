"""Apply a ``PrunePlan`` to modules: slice their parameters for real, leaving a smaller dense model.

Each module axis in the plan is cut with ``index_select``; the module's size attributes
(``out_channels``, ``in_features``, ``num_features``, ``groups``…) are updated with the tensors, so the
module still describes its weights. Parameters are replaced by new ``nn.Parameter`` objects that keep
``requires_grad`` and the memory format (an NHWC model stays NHWC); callers that hold an optimizer must
rebuild it (``SlimModule`` does).

A grouped conv keeps its ``groups``: every conv-group keeps the same number of inputs (and of outputs),
so its weight ``(out, in/G, k, k)`` is cut block by block: output rows with ``index_select``, and in the
rows of conv-group ``g`` the columns of the inputs that group ``g`` keeps.

The plan may also name layers that received a bias when β folding had nowhere else to put a constant
(``add_bias``): replaying it creates a zero bias there first, so the pruned ``state_dict`` loads.

All or nothing: :func:`check_plan` checks every axis of a plan against the model (modules, kinds,
index ranges, order, a grouped conv's equal blocks) before anything is cut, and :func:`transaction`
puts every touched tensor and size attribute back if a step still fails, so a model is never left
half-cut.

Knows nothing of Lightning or Hydra.
"""

from __future__ import annotations

import contextlib
from array import array

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from slimnet.engine.plan import PrunePlan
from slimnet.graph import NORM_TYPES, OPS

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # by tensor rank


def _same_layout(data: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``data`` in ``like``'s memory format: ``index_select`` and ``gather`` return NCHW even from an NHWC
    tensor, and a model trained or deployed channels-last should stay so after the cut."""
    fmt = _CHANNELS_LAST.get(like.dim())
    if fmt is not None and not like.is_contiguous() and like.is_contiguous(memory_format=fmt):
        return data.contiguous(memory_format=fmt)
    return data


def _slice_param(module: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    param = getattr(module, name, None)
    if param is None:
        return
    data = _same_layout(param.data.index_select(dim, index.to(param.device)), param.data)
    if isinstance(param, nn.Parameter):
        setattr(module, name, nn.Parameter(data, requires_grad=param.requires_grad))
    else:  # a buffer
        setattr(module, name, data)


def _per_block(index: torch.Tensor, size: int, groups: int, what: str) -> torch.Tensor:
    """Kept indices into an axis of ``groups`` equal blocks, as ``(groups, k)`` offsets within each block."""
    block = size // groups
    which = index // block
    counts = torch.bincount(which, minlength=groups)
    if len(index) % groups or not bool((counts == len(index) // groups).all()) or not bool(
            (index[1:] > index[:-1]).all()):
        raise ValueError(f"cannot cut the {what} of a conv with groups={groups}: every conv-group must keep "
                         f"the same number of channels, in order (kept per group: {counts.tolist()})")
    return (index - which * block).view(groups, -1)


def _cut_conv(m: _ConvNd, kind: str, index: torch.Tensor) -> None:
    if m.transposed:  # weight (in, out / groups, *kernel); the graph cuts only groups=1 ones
        if m.groups != 1 or kind not in ("out", "in"):
            raise ValueError(f"cannot cut axis {kind!r} of a transposed conv with groups={m.groups}")
        _slice_param(m, "weight", index, 1 if kind == "out" else 0)
        if kind == "out":
            _slice_param(m, "bias", index, 0)
            m.out_channels = len(index)
        else:
            m.in_channels = len(index)
        return
    if kind == "out":
        if m.groups > 1:
            _per_block(index, m.out_channels, m.groups, "outputs")  # validation only: rows stay in order
        _slice_param(m, "weight", index, 0)
        _slice_param(m, "bias", index, 0)
        m.out_channels = len(index)
    elif kind == "in" and m.groups == 1:
        _slice_param(m, "weight", index, 1)
        m.in_channels = len(index)
    elif kind == "in":  # grouped: the rows of conv-group g keep the columns of g's kept inputs
        local = _per_block(index, m.in_channels, m.groups, "inputs").to(m.weight.device)  # (G, k)
        w = m.weight.data
        rows = w.view(m.groups, w.shape[0] // m.groups, *w.shape[1:])  # (G, out/G, in/G, *kernel)
        pick = local.view(m.groups, 1, -1, *([1] * (w.dim() - 2))).expand(-1, rows.shape[1], -1, *w.shape[2:])
        data = _same_layout(rows.gather(2, pick).reshape(w.shape[0], local.shape[1], *w.shape[2:]), w)
        m.weight = nn.Parameter(data, requires_grad=m.weight.requires_grad)
        m.in_channels = len(index)
    elif kind == "dw":  # depthwise: filter c reads channel c only
        _slice_param(m, "weight", index, 0)
        _slice_param(m, "bias", index, 0)
        m.in_channels = m.out_channels = m.groups = len(index)
    else:
        raise ValueError(f"cannot cut axis {kind!r} of a conv")


def _cut_linear(m: nn.Linear, kind: str, index: torch.Tensor) -> None:
    if kind == "out":
        _slice_param(m, "weight", index, 0)
        _slice_param(m, "bias", index, 0)
        m.out_features = len(index)
    elif kind == "in":
        _slice_param(m, "weight", index, 1)
        m.in_features = len(index)
    else:
        raise ValueError(f"cannot cut axis {kind!r} of a linear layer")


def _cut_norm(m: nn.Module, kind: str, index: torch.Tensor) -> None:
    if kind != "bn":
        raise ValueError(f"cannot cut axis {kind!r} of a norm")
    for name in ("weight", "bias", "running_mean", "running_var"):  # parameters or (FrozenBatchNorm2d) buffers
        _slice_param(m, name, index, 0)
    if hasattr(m, "num_features"):  # FrozenBatchNorm2d has none: its size is its buffers'
        m.num_features = len(index)


def as_index(idx) -> torch.Tensor:
    """A plan's list of ints as a long tensor (via ``array``: ~10x faster than ``torch.as_tensor(list)``)."""
    if isinstance(idx, torch.Tensor):
        return idx.long()
    return torch.frombuffer(array("q", idx), dtype=torch.long) if len(idx) else torch.empty(0, dtype=torch.long)


def _cutter(module: nn.Module):
    if isinstance(module, _ConvNd):
        return _cut_conv
    if isinstance(module, nn.Linear):
        return _cut_linear
    if isinstance(module, NORM_TYPES):
        return _cut_norm
    raise TypeError(f"slimnet cannot cut a {type(module).__name__}")


def add_zero_bias(module: nn.Module) -> None:
    """Give a bias-less conv or linear a zero bias (same dtype, device and ``requires_grad`` as its weight)."""
    if getattr(module, "bias", None) is None:
        w = module.weight
        module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                   requires_grad=w.requires_grad)


_KINDS = {_cut_conv: ("out", "in", "dw"), _cut_linear: ("out", "in"), _cut_norm: ("bn",)}


def _axis_size(module: nn.Module, kind: str) -> int:
    if isinstance(module, _ConvNd):
        return module.out_channels if kind == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if kind == "out" else module.in_features
    return module.weight.shape[0] if getattr(module, "weight", None) is not None else module.running_mean.shape[0]


def check_plan(model: nn.Module, plan: PrunePlan) -> None:
    """Raise, naming every offending layer, unless ``apply_plan(model, plan)`` can cut every axis.

    Touches nothing: call it before any tensor changes (β folding included), so a plan that cannot be
    applied leaves the model exactly as it was.
    """
    modules = dict(model.named_modules())
    missing = [name for name in [*plan.keep, *plan.add_bias, *plan.attrs] if name not in modules]
    if missing:
        raise ValueError(f"plan names modules this model does not have: {missing[:5]}; "
                         "was the plan made for another architecture or config?")
    problems = []
    for name, values in plan.attrs.items():
        for attr, value in values.items():
            current = getattr(modules[name], attr, None)
            if type(current) is not type(value) and not (isinstance(current, (list, tuple)) and isinstance(value, list)):
                problems.append(f"'{name}'.{attr} is {current!r}, cannot become {value!r}")
    for name in plan.add_bias:
        if not isinstance(modules[name], (_ConvNd, nn.Linear)):
            problems.append(f"'{name}' ({type(modules[name]).__name__}) cannot take a bias")
    for name, axes in plan.keep.items():
        module = modules[name]
        try:
            cut = _cutter(module)
        except TypeError as err:
            problems.append(f"'{name}': {err}")
            continue
        for kind, idx in axes.items():
            if kind not in _KINDS[cut]:
                problems.append(f"'{name}' ({type(module).__name__}) has no axis {kind!r}")
                continue
            index, size = as_index(idx), _axis_size(module, kind)
            if len(index) == 0 or (index[1:] <= index[:-1]).any() or index[0] < 0 or index[-1] >= size:
                problems.append(f"'{name}' axis {kind!r}: kept indices must be increasing, in [0, {size}), "
                                "and at least one")
            elif isinstance(module, _ConvNd) and module.groups > 1 and kind in ("out", "in"):
                try:
                    _per_block(index, size, module.groups, "outputs" if kind == "out" else "inputs")
                except ValueError as err:
                    problems.append(f"'{name}': {err}")
    if problems:
        raise ValueError(f"plan cannot be applied, nothing was changed: {'; '.join(problems[:5])}"
                         + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
                         + ". Hint: a plan made for this model by slimnet never does this; re-plan after "
                         "any change to the model.")


@contextlib.contextmanager
def transaction(model: nn.Module, names):
    """On an exception inside, put back the tensors and size attributes of the named modules.

    Cuts replace parameters (the old objects are kept here); folding changes biases and running means
    in place (their values are cloned here). Costs one small clone per bias and running mean.
    """
    modules = dict(model.named_modules())
    saved = []
    for name in dict.fromkeys(names):
        m = modules.get(name)
        if m is None:
            continue
        values = {k: (t, t.detach().clone()) for k, t in [*m._parameters.items(), *m._buffers.items()]
                  if t is not None and k in ("bias", "running_mean")}
        attrs = {k: v for k, v in m.__dict__.items()  # sizes, and split sizes a plan rewrites
                 if not k.startswith("_") and isinstance(v, (int, list, tuple))}
        saved.append((m, dict(m._parameters), dict(m._buffers), attrs, values))
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for m, params, buffers, attrs, values in saved:
                m._parameters.clear()
                m._parameters.update(params)
                m._buffers.clear()
                m._buffers.update(buffers)
                m.__dict__.update(attrs)
                for tensor, value in values.values():
                    tensor.copy_(value)
        raise


def apply_plan(model: nn.Module, plan: PrunePlan, *, checked: bool = False) -> None:
    """Cut ``model`` in place to the widths ``plan`` keeps, counted in the model's current channels.

    All or nothing: the plan is checked first (``checked=True``: the caller just did), and any failure
    while cutting puts the model back.
    """
    if not checked:
        check_plan(model, plan)
    modules = dict(model.named_modules())
    with transaction(model, [*plan.add_bias, *plan.keep, *plan.attrs]):
        _apply_checked(modules, plan)


def _apply_checked(modules: dict, plan: PrunePlan) -> None:
    for name, values in plan.attrs.items():  # split sizes the forward reads: a tuple stays a tuple
        for attr, value in values.items():
            current = getattr(modules[name], attr)
            setattr(modules[name], attr, tuple(value) if isinstance(current, tuple) else value)
    for name in plan.add_bias:
        add_zero_bias(modules[name])
    for name, axes in plan.keep.items():
        module, cut = modules[name], _cutter(modules[name])
        for kind, idx in axes.items():
            cut(module, kind, as_index(idx))
    for module in modules.values():  # widths a forward the trace did not follow reads (graph.OPS.widths)
        for attr, value in OPS.derived_widths(module).items():
            setattr(module, attr, value)


def replay_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Cut a freshly built (unpruned) model to a plan's shapes, e.g. before loading pruned weights."""
    apply_plan(model, plan)
    model.slimnet_plan = plan
    return model
