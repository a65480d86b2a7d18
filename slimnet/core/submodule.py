"""Find the part of a LightningModule that is slimmed, and the input that part sees.

The callbacks are told a dotted name (``"backbone"``, ``"model.body"``) or nothing (the whole module).
Their example input is the LightningModule's own ``example_input_array``; for a sub-module, the input it
receives is recorded by running the whole module once on that array with a forward pre-hook, so a
detector's backbone gets the batched image tensor the detector's transform makes, whatever the module's
batch structure.
"""

from __future__ import annotations

import torch
from torch import nn

from slimnet.modes import preserved_modes


def resolve_submodule(root: nn.Module, name: str | None, who: str) -> nn.Module:
    """``root.get_submodule(name)`` (``root`` itself for None), with a one-line error naming the choices."""
    if not name:
        return root
    try:
        return root.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in root.named_children()) or "none"
        raise ValueError(f"{who}: {type(root).__name__} has no sub-module {name!r}; its children are: "
                         f"{children} (give a dotted name like 'backbone.body')") from None


def _as_args(example) -> tuple:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


@torch.no_grad()
def submodule_input(root: nn.Module, name: str | None, example, who: str) -> tuple:
    """The positional inputs ``root``'s sub-module ``name`` receives when ``root`` runs on ``example``
    (in eval mode; modes restored). For the whole module, ``example`` itself."""
    args = _as_args(example)
    if not name:
        return args
    target = resolve_submodule(root, name, who)
    seen: list[tuple] = []

    def record(module, inputs):
        if not seen:
            seen.append(tuple(inputs))

    handle = target.register_forward_pre_hook(record)
    try:
        with preserved_modes(root):
            root.eval()
            root(*args) if not isinstance(example, dict) else root(**example)
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"{who}: {type(root).__name__}.forward on its example input never calls {name!r}; "
                         "name a sub-module the forward pass uses, or pass example_input= for it")
    return seen[0]



class ModelView(nn.Module):
    """A traceable module made of a model's own sub-modules (a detector's trunk, an OpenMMLab model's
    backbone and neck), whose cut plan is the model's.

    ``prune`` leaves ``slimnet_plan`` on the module it traced; on a view that attribute lives on the
    model, so whoever replays a checkpoint on the model sees it is already cut, and the other way round.
    Subclasses register the model's children under the model's own names, so the plan made on the view
    is a plan of the model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.__dict__["_model"] = model  # not a sub-module: the view's names are the model's

    @property
    def slimnet_plan(self):
        return getattr(self._model, "slimnet_plan", None)

    @slimnet_plan.setter
    def slimnet_plan(self, plan) -> None:
        self._model.slimnet_plan = plan
