"""Carry an optimizer's per-parameter state (momentum, Adam's moments, step counts) over a cut.

Surgery replaces every cut parameter by a smaller one, so an optimizer built before the cut holds state
for tensors that no longer exist. ``carry_optimizer_state`` gives a new optimizer, built over the cut
model, the state of the surviving channels: each state tensor shaped like its parameter is sliced by
running the very same surgery on a stand-in module whose "parameters" are that state, so the state is
cut exactly as the weights were (grouped and depthwise convs included); scalars (``step``) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from slimnet.engine.plan import PrunePlan
from slimnet.engine.surgery import _cutter, as_index


class ParamSnapshot:
    """What a model's parameters were before a cut: the parameter objects by name, and a shallow copy
    of each module (its size attributes: ``groups``, ``in_channels``…), which is all that slicing the
    optimizer state needs afterwards. Cheap: no tensor is copied."""

    def __init__(self, model: nn.Module):
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self.modules: dict[str, nn.Module] = {}
        for name, module in model.named_modules():
            if module._parameters:
                shadow = copy.copy(module)
                shadow._parameters, shadow._buffers, shadow._modules = dict(module._parameters), {}, {}
                self.modules[name] = shadow


def _sliced_state(shadow: nn.Module, axes: dict, states: dict[str, dict], key: str) -> dict[str, torch.Tensor]:
    """Cut ``states[param][key]`` (for each parameter of one module) the way the module was cut."""
    stand_in = copy.copy(shadow)
    stand_in._parameters = {}
    for pname, param in shadow._parameters.items():
        if param is None:
            stand_in._parameters[pname] = None
            continue
        value = states.get(pname, {}).get(key)
        if not isinstance(value, torch.Tensor) or value.shape != param.shape:
            value = torch.zeros_like(param)  # a placeholder; never handed on
        stand_in._parameters[pname] = nn.Parameter(value.detach(), requires_grad=False)
    cut = _cutter(stand_in)
    for kind, idx in axes.items():
        cut(stand_in, kind, as_index(idx))
    return {pname: p.data for pname, p in stand_in._parameters.items() if p is not None}


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer, model: nn.Module,
                          report) -> int:
    """Give ``new`` (built over the cut ``model``) the state ``old`` held for the surviving channels.

    Args:
        old: the optimizer used before the cut.
        new: a fresh optimizer over the cut model's parameters (its hyper-parameters, e.g. the learning
            rate, are left as built).
        model: the cut model (the one given to ``slimnet.prune``).
        report: what ``slimnet.prune`` returned for this cut (it remembers the parameters before it).

    Returns:
        how many parameters received state.

    Example::

        report = slimnet.prune(model, x, percent=0.5)
        new = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        slimnet.carry_optimizer_state(old, new, model, report)
    """
    if getattr(report, "before", None) is None:
        raise ValueError("carry_optimizer_state needs the report slimnet.prune returned for this cut")
    return carry_state(old, new, report.before, model, report.pass_plan)


def carry_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer, before: ParamSnapshot,
                model: nn.Module, plan: PrunePlan) -> int:
    """``carry_optimizer_state`` from a ``ParamSnapshot`` taken before the cut and the cut's own plan."""
    now = dict(model.named_parameters())
    held_by_new = {id(p) for group in new.param_groups for p in group["params"]}
    by_module: dict[str, dict[str, tuple[nn.Parameter, nn.Parameter]]] = {}
    for name, old_param in before.params.items():
        new_param = now.get(name)
        if new_param is None or id(new_param) not in held_by_new or old_param not in old.state:
            continue
        module, _, pname = name.rpartition(".")
        by_module.setdefault(module, {})[pname] = (old_param, new_param)
    carried = 0
    for module, params in by_module.items():
        axes = plan.keep.get(module)
        states = {pname: old.state[old_param] for pname, (old_param, _) in params.items()}
        if not axes or all(old_p is new_p for old_p, new_p in params.values()):
            for pname, (_, new_param) in params.items():  # this module was not cut: state as it was
                new.state[new_param] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                        for k, v in states[pname].items()}
                carried += 1
            continue
        keys = {k for state in states.values() for k in state}
        sliced = {k: _sliced_state(before.modules[module], axes, states, k) for k in keys
                  if any(isinstance(s.get(k), torch.Tensor) and s[k].shape == params[p][0].shape
                         for p, s in states.items())}
        for pname, (old_param, new_param) in params.items():
            state = {}
            for k, v in states[pname].items():
                if k in sliced and isinstance(v, torch.Tensor) and v.shape == old_param.shape:
                    state[k] = sliced[k][pname].clone()
                else:
                    state[k] = v.clone() if isinstance(v, torch.Tensor) else v
            new.state[new_param] = state
            carried += 1
    return carried


def retarget_optimizer(optimizer: torch.optim.Optimizer, before: ParamSnapshot, model: nn.Module,
                       plan: PrunePlan, keep_state: bool = True) -> int:
    """Point ``optimizer`` at the cut ``model``'s parameters, in place, so nothing built on it restarts.

    Each cut parameter takes the place of the one it replaced in its param group, a bias the cut added
    (β folding) joins its weight's group, and (``keep_state``) the state of the surviving channels moves
    to the new tensors (``carry_state``). The optimizer object, its hyper-parameters and every
    scheduler stepping it are untouched: a StepLR, a cosine or a OneCycle schedule goes on where it
    was instead of warming up again. ``keep_state=False`` drops all state (a fresh start of moments).

    Returns how many parameters received state.
    """
    now = dict(model.named_parameters())
    replaced = {id(old): now[name] for name, old in before.params.items() if name in now and now[name] is not old}
    groups_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    added = {}  # new parameters (a folded bias) -> the group holding their module's weight
    for name, param in now.items():
        if name in before.params:
            continue
        module = name.rpartition(".")[0]
        sibling = next((old for n, old in before.params.items() if n.rpartition(".")[0] == module and id(old) in groups_of),
                       None)
        if sibling is not None:
            added[param] = groups_of[id(sibling)]
    old_state = {p: s for p, s in optimizer.state.items()}
    for group in optimizer.param_groups:
        group["params"] = [replaced.get(id(p), p) for p in group["params"]]
        group["params"] += [p for p, owner in added.items() if owner is group]
    if not keep_state:
        optimizer.state.clear()
        return 0
    # carry_state reads the old parameters' entries and writes the new ones'; then the old ones go.
    carried = carry_state(optimizer, optimizer, before, model, plan)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for param in old_state:
        if id(param) not in held:
            del optimizer.state[param]
    return carried
