"""Model registry: a name -> builder dict in the style of timm's ``register_model`` / ``create_model``.

Why a registry and not an if/elif factory: Hydra configs name models by string (``model.name=vgg19``),
each model file registers itself next to its definition, and tests can iterate over every registered
model (``list_models()``) without a second list that could drift out of date.

Every builder has the signature ``fn(num_classes: int, in_channels: int, **kwargs) -> nn.Module``.
Each entry also carries a small metadata dict, like timm's ``pretrained_cfg``:

``family``      which file/architecture family the model belongs to ("vgg", "cifar_resnet", ...).
``first_conv``  qualified module name of the conv that reads the image. Its *input* channels are fixed
                by the data, so channel pruning must never remove them.
``classifier``  qualified module name of the final layer. Its *outputs* are the classes; never pruned.
``source``      where the architecture / defaults come from (provenance).

Some values are only known once a model is built (the torchvision adapter finds the first conv by
walking the instance). ``create_model`` therefore stores the resolved metadata on the instance as
``model.slimnet_meta``; a builder may fill in instance-specific values by setting that attribute itself.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable

from torch import nn

ModelBuilder = Callable[..., nn.Module]

# name -> builder, name -> static metadata. Module-level dicts, filled at import time by the
# ``@register_model`` decorators in the model files (``slimnet/models/__init__.py`` imports them).
_MODELS: dict[str, ModelBuilder] = {}
_METADATA: dict[str, dict[str, Any]] = {}

# Attribute under which ``create_model`` leaves the resolved metadata on each instance.
META_ATTR = "slimnet_meta"


def register_model(
    name: str,
    *,
    family: str | None = None,
    first_conv: str | None = None,
    classifier: str | None = None,
    **extra: Any,
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering ``fn(num_classes, in_channels, **kwargs) -> nn.Module`` under ``name``.

    ``family``, ``first_conv`` and ``classifier`` (module names) and any ``extra`` keys become the
    entry's metadata, see the module docstring. The decorated function is returned unchanged.
    """

    def decorator(fn: ModelBuilder) -> ModelBuilder:
        # Raise instead of silently overwriting: two files registering one name is a copy-paste bug.
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].__module__})")
        _MODELS[name] = fn
        _METADATA[name] = {"family": family, "first_conv": first_conv, "classifier": classifier, **extra}
        return fn

    return decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style ``pattern`` (``"resnet*"``)."""
    names = sorted(_MODELS)
    return fnmatch.filter(names, pattern) if pattern else names


def model_builder(name: str) -> ModelBuilder:
    """The callable registered as ``name`` (what a config's keys are checked against)."""
    return _MODELS[_lookup(name)]


def _lookup(name: str) -> str:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return name


def model_metadata(name: str) -> dict[str, Any]:
    """A copy of the static metadata registered for ``name`` (values may be ``None``, see module doc)."""
    return dict(_METADATA[_lookup(name)])


def create_model(name: str, /, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` for ``num_classes`` outputs and ``in_channels`` input planes.

    ``name`` is positional-only so that builders may take a ``name`` keyword of their own, as the
    torchvision adapter does: ``create_model("torchvision", 10, 1, name="resnet50")``.
    Extra ``kwargs`` go to the builder; an unknown keyword raises the builder's ``TypeError``.
    """
    builder = _MODELS[_lookup(name)]
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        # bool is an int subclass; True classes / channels is always a config mistake.
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    model = builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
    # Static metadata first, then whatever the builder resolved for this particular instance.
    resolved = {"model": name, **_METADATA[name], **getattr(model, META_ATTR, {})}
    setattr(model, META_ATTR, resolved)
    return model
