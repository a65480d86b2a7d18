"""What every slimnet callback set for ultralytics shares: registering on a model, reaching the trainer's pieces.

Ultralytics' extension surface is ``model.add_callback(event, fn)`` (also on a trainer) with ``fn(trainer)``,
and the trainer's own ``model``, ``optimizer``, ``scheduler``, ``ema`` attributes. A ``Callbacks`` object
holds one feature's state and registers each of its methods named after an event listed in ``EVENTS``.
"""

from __future__ import annotations

import torch
from ultralytics.utils import LOGGER, colorstr
from ultralytics.utils.torch_utils import unwrap_model

PREFIX = colorstr("slimnet:")


class Callbacks:
    """A feature made of ultralytics callbacks: ``add_to(model)`` registers the methods named in ``EVENTS``.

    One instance serves one training run (a cut happens once per instance), as a Lightning callback
    serves one ``Trainer``.
    """

    EVENTS: tuple[str, ...] = ()

    def add_to(self, model):
        """Register on an ``ultralytics.YOLO`` model (or a trainer); returns ``self``."""
        if not hasattr(model, "add_callback"):
            raise TypeError(f"{type(self).__name__}.add_to needs an ultralytics model or trainer (with add_callback), "
                            f"not {type(model).__name__}")
        for event in self.EVENTS:
            if not any(fn == getattr(self, event) for fn in model.callbacks[event]):
                model.add_callback(event, getattr(self, event))
        return self

    def remove_from(self, model):
        """Unregister from ``model``; returns ``self``."""
        for event in self.EVENTS:
            model.callbacks[event] = [fn for fn in model.callbacks[event] if fn != getattr(self, event)]
        return self


def network(trainer) -> torch.nn.Module:
    """The trainer's model as the user built it (DDP and compile wrappers removed)."""
    return unwrap_model(trainer.model)


def info(message: str) -> None:
    LOGGER.info(f"{PREFIX} {message}")


def warn(message: str) -> None:
    LOGGER.warning(f"{PREFIX} {message}")


def check_trainer(trainer, where: str) -> None:
    """Fail before training on trainer settings under which parameters cannot be replaced mid-run."""
    args = trainer.args
    if getattr(args, "compile", False):
        raise ValueError(f"{where}: compile={args.compile!r} is not supported (the compiled graph keeps the uncut "
                         "shapes); train with compile=False")
    if getattr(args, "distill_model", None) is not None:
        raise ValueError(f"{where}: distillation (distill_model=...) is not supported; train without it")
    if getattr(args, "quantize", None) == 8:
        raise ValueError(f"{where}: quantization-aware training (quantize=8) is not supported; slim first, then "
                         "quantize the cut checkpoint")
    if getattr(args, "time", None):
        raise ValueError(f"{where}: time={args.time} re-estimates the epochs as training goes, so the cut epoch "
                         "could fall past the end; give epochs=... instead")
