"""The model's outputs: their channels are kept, except outputs a model returns for their shape only."""

from __future__ import annotations

import torch
from torch import fx, nn

# Outputs a model returns for their spatial shape only, never read channel by channel, so a cut may narrow
# them: model class (``module.qualname``, matched along the MRO) -> keys in the output's structure. Add an
# entry for your own model the same way. ultralytics' Detect head returns ``{"boxes", "scores", "feats"}``
# in training (and ``(y, that dict)`` in eval); ``feats`` are the neck outputs it reads, returned so the loss
# can lay its anchor grid: ``v8DetectionLoss`` reads them only through ``make_anchors(feats)`` and
# ``feats[0].shape[2:]`` (ultralytics 8.4). Keeping them whole kept the Detect inputs whole.
SHAPE_ONLY_OUTPUTS: dict[str, tuple[str, ...]] = {"ultralytics.nn.tasks.DetectionModel": ("feats",)}


def shape_only_output_keys(model: nn.Module) -> frozenset:
    """The output keys of ``model`` that :data:`SHAPE_ONLY_OUTPUTS` declares read for their shape only."""
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(model).__mro__}
    return frozenset(k for name, keys in SHAPE_ONLY_OUTPUTS.items() if name in names for k in keys)


def output_leaves(node: fx.Node) -> list[tuple[tuple, object]]:
    """``(key path, value)`` of every leaf the output node returns (export graphs carry the paths of
    their flat outputs in ``meta["output_paths"]``)."""
    paths = node.meta.get("output_paths")
    if paths is not None:
        return list(zip(paths, node.args[0]))
    return torch.utils._pytree.tree_flatten_with_path(node.args[0])[0]


def path_key(entry) -> object:
    """The name of one step of a pytree key path: a dict key or an attribute (dataclass outputs)."""
    return getattr(entry, "key", getattr(entry, "name", None))
