"""Build a model from a plain config dict, and remember that dict on the model.

Two kinds of config, both the whole recipe of a model (what checkpoints and pruned artifacts store, so a
model can be rebuilt without training code):

- a registry name: ``{"arch": "vgg_small", "num_classes": 10, "in_channels": 1, **options}``;
- any importable callable returning an ``nn.Module``: ``{"_target_": "mypkg.nets.TinyCNN", "width": 16}``.
  ``num_classes`` / ``in_channels`` are passed only if the callable takes them; the stored config holds
  exactly the arguments it was called with.
"""

from __future__ import annotations

from torch import nn

from slimnet.locate import accepted, locate, unknown_keywords
from slimnet.models.registry import create_model

# Filled in from the data when the callable takes them.
DATA_ARGS = ("num_classes", "in_channels")


def target_arguments(config: dict) -> dict:
    """The keyword arguments a ``_target_`` config calls its callable with (data arguments it does not
    take dropped; other unknown keywords raise a one-line ``TypeError``)."""
    fn = locate(config["_target_"])
    kwargs = {k: v for k, v in config.items() if k != "_target_"}
    takes = accepted(fn, DATA_ARGS)
    kwargs = {k: v for k, v in kwargs.items() if k not in DATA_ARGS or k in takes}
    unknown = unknown_keywords(fn, kwargs)
    if unknown:
        raise TypeError(f"{config['_target_']} takes no argument {', '.join(map(repr, unknown))}; "
                        f"remove model.{unknown[0]} or check its spelling")
    return kwargs


def build_model(config: dict) -> nn.Module:
    """Build from a registry ``arch`` or a ``_target_``, with ``model.slimnet_config`` = the recipe."""
    config = dict(config)
    if "_target_" in config:
        kwargs = target_arguments(config)
        model = locate(config["_target_"])(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{config['_target_']} returned a {type(model).__name__}, not an nn.Module")
        model.slimnet_config = {"_target_": config["_target_"], **kwargs}
        return model
    if "arch" not in config:
        raise ValueError(f"model config needs an 'arch' (a registry name) or a '_target_' (a dotted path to a "
                         f"callable returning an nn.Module), got keys {sorted(config)}")
    rest = {k: v for k, v in config.items() if k != "arch"}
    model = create_model(config["arch"], **rest)
    model.slimnet_config = config
    return model
