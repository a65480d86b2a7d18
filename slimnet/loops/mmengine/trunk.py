"""What the mmengine hooks trace and cut in an OpenMMLab model, by ``scope``.

An mmengine model's ``forward(inputs, data_samples, mode)`` cannot be traced as a whole when it is a
detector (anchors, NMS, per-image lists of results), yet a cut that crosses the backbone's boundary
needs one graph from the image tensor to whatever reads the backbone's outputs. So the hooks trace a
small wrapper, holding the model's own sub-modules under the model's own names (``backbone.layer2.0.conv1``,
``neck.lateral_convs.3.conv``): a plan made on the wrapper *is* a plan of the model, replays on a freshly
built one, and travels in the checkpoint.

=================  ================================================================================
``scope``          traced, and what may be cut
=================  ================================================================================
``"all"``          the whole model in ``mode="tensor"`` (a classifier, any model whose tensor forward
                   is plain tensor code); every group, its raw outputs (logits) kept whole
``"backbone"``     ``backbone`` → ``neck`` (if the model has one), as every mmdet/mmseg/mmpose/mmpretrain
                   ``extract_feat`` runs them; groups whose norms lie in the backbone: the neck's input
                   convs (FPN's lateral convs) lose the same channels
``"backbone+neck"``  the same graph; groups in the backbone or the neck. The neck's outputs are the
                   graph's outputs, kept whole: the heads read them and are never touched
=================  ================================================================================

The input of the backbone scopes is the tensor the model's ``data_preprocessor`` gives (normalised,
padded), which is exactly what ``extract_feat`` hands the backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from slimnet.core.submodule import ModelView

SCOPES = ("all", "backbone", "backbone+neck")


def check_scope(scope: str, who: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"{who}: scope={scope!r} is unknown; choose one of: {', '.join(SCOPES)}")
    return scope


def _flat(out) -> tuple:
    """The tensors of a nested output (tuples, lists, dicts), in order: the traced graph's outputs."""
    if isinstance(out, torch.Tensor) or not isinstance(out, (tuple, list, dict)):
        return (out,)
    values = out.values() if isinstance(out, dict) else out
    return tuple(t for v in values for t in _flat(v))


class Trunk(ModelView):
    """``backbone`` (→ ``neck``) of an OpenMMLab model as one traceable module, under the model's names.

    ``forward(x)``: ``x`` is the (N, C, H, W) batch the backbone receives; returns the neck's outputs
    (the backbone's, without a neck) as a flat tuple.
    """

    def __init__(self, model: nn.Module, who: str = "SlimnetSlimmingHook"):
        super().__init__(model)
        children = dict(model.named_children())
        backbone = children.get("backbone")
        if backbone is None:
            names = ", ".join(children) or "none"
            raise ValueError(f"{who}: {type(model).__name__} has no `backbone` sub-module; use scope='all' "
                             f"(its children are: {names})")
        self.backbone = backbone
        neck = children.get("neck")
        if neck is not None:
            self.neck = neck

    @property
    def has_neck(self) -> bool:
        return "neck" in self._modules

    def forward(self, x: torch.Tensor) -> tuple:
        features = self.backbone(x)  # a tuple of (N, C_i, H_i, W_i), one per stage it returns
        if self.has_neck:
            features = self.neck(features)
        return _flat(features)


class WholeModel(ModelView):
    """An mmengine ``BaseModel`` run as ``model(x, mode="tensor")``, traceable, under the model's names.

    The model's ``forward`` is called unbound (not through ``__call__``), so the tracer records the
    calls to its children, which are this wrapper's children under the same names.
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(name, buffer)

    def forward(self, x: torch.Tensor) -> tuple:
        return _flat(type(self._model).forward(self._model, x, None, mode="tensor"))


def traced(model: nn.Module, scope: str, who: str = "SlimnetSlimmingHook") -> tuple:
    """``(net, within, fed)`` for ``scope``: the module traced and cut, the part of it whose groups may be
    cut (``slimnet.prune``'s ``within``), and the module whose first input is ``net``'s input in training."""
    if scope == "all":
        return WholeModel(model), None, model
    trunk = Trunk(model, who)
    if scope == "backbone+neck":
        if not trunk.has_neck:
            raise ValueError(f"{who}: {type(model).__name__} has no `neck`; use scope='backbone'")
        return trunk, ["backbone", "neck"], trunk.backbone
    return trunk, "backbone", trunk.backbone


def penalised(model: nn.Module, scope: str, who: str = "SlimnetSparsityHook") -> nn.Module:
    """The module whose BatchNorm γ the sparsity hook penalises for ``scope``."""
    if scope == "all":
        return model
    trunk = Trunk(model, who)
    if scope == "backbone+neck":
        if not trunk.has_neck:
            raise ValueError(f"{who}: {type(model).__name__} has no `neck`; use scope='backbone'")
        return trunk
    return trunk.backbone
