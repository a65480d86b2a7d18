"""Cut LightningModules from checkpoints: ``load_checkpoint`` and the ``Slimmable`` mixin.

A checkpoint of a cut run holds the weights at the cut widths; the plan they were cut by is in the
``SlimmingCallback``'s state (``checkpoint["callbacks"]``). Building the module afresh gives the full
widths, so the plan is replayed on it before the weights load — which Lightning's own
``load_from_checkpoint`` cannot know to do unless the module opts in with ``Slimmable``.
"""

from __future__ import annotations

import os

import pytorch_lightning as pl
from torch import nn

from slimnet.core.slimming import PLAN_KEY
from slimnet.engine.artifact import safe_load
from slimnet.engine.plan import PrunePlan
from slimnet.engine.surgery import replay_plan
from slimnet.errors import UnreadableFileError


def checkpoint_plans(checkpoint: dict) -> list[tuple[str | None, PrunePlan]]:
    """``(sub-module name, plan)`` of every cut recorded in a Lightning checkpoint."""
    plans = []
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get(PLAN_KEY):
            plans.append((state.get("module"), PrunePlan.from_json(state[PLAN_KEY])))
    return plans


def replay_checkpoint_plans(module: nn.Module, checkpoint: dict) -> int:
    """Cut a freshly built module to the widths its checkpoint was saved at; returns the plans replayed.

    Parts that already carry a plan (the callback replayed it in ``setup``) are left alone.
    """
    replayed = 0
    for name, plan in checkpoint_plans(checkpoint):
        target = module.get_submodule(name) if name else module
        if getattr(target, "slimnet_plan", None) is None:
            replay_plan(target, plan)
            replayed += 1
    return replayed


class Slimmable:
    """Mixin: lets ``MyModule.load_from_checkpoint(path)`` rebuild the cut widths before the weights load.

    Example::

        class MyModule(slimnet.Slimmable, pl.LightningModule): ...

    Put it first among the bases; a module that overrides ``on_load_checkpoint`` must call ``super()``.
    """

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        replay_checkpoint_plans(self, checkpoint)
        super().on_load_checkpoint(checkpoint)


def load_checkpoint(path: str | os.PathLike, cls: type[pl.LightningModule], map_location="cpu",
                    strict: bool = True, **kwargs) -> pl.LightningModule:
    """A LightningModule of class ``cls`` with the cut widths and weights of a checkpoint, in eval mode.

    ``cls`` is built from the hyper-parameters the checkpoint saved (``save_hyperparameters``), updated
    with ``kwargs`` (pass what was not saved, e.g. a network object). The file is read with
    ``weights_only=True``.
    """
    checkpoint = safe_load(path, map_location=map_location)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UnreadableFileError(f"{path}: not a Lightning checkpoint (no state_dict)")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    try:
        module = cls(**{**hparams, **kwargs})
    except TypeError as err:
        raise TypeError(f"load_checkpoint: cannot build {cls.__name__} from the checkpoint's hyper-parameters "
                        f"({err}); pass the missing arguments as keywords") from None
    replay_checkpoint_plans(module, checkpoint)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return module.eval()
