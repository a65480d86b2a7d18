"""Build a model from a plain config dict, and remember that dict on the model.

``{"arch": "vgg_small", "num_classes": 10, "in_channels": 1, **options}`` is the whole recipe of a model:
it is what checkpoints and pruned artifacts store, so a model can be rebuilt without training code.
"""

from __future__ import annotations

from torch import nn

from slimnet.models.registry import create_model


def build_model(config: dict) -> nn.Module:
    """``create_model(config["arch"], **rest)``, with ``model.slimnet_config = config``."""
    config = dict(config)
    if "arch" not in config:
        raise ValueError(f"model config needs an 'arch' (a registry name), got keys {sorted(config)}")
    rest = {k: v for k, v in config.items() if k != "arch"}
    model = create_model(config["arch"], **rest)
    model.slimnet_config = config
    return model
