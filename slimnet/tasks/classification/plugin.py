"""``Classification``: the classification task of the run pipeline (``task=classification``, the default).

Data: any LightningDataModule yielding ``(images, labels)`` (slimnet's own, or the user's ``_target_``);
the model: any ``nn.Module`` returning ``(batch, classes)`` logits (a registry builder or the user's
``_target_``), trained inside a ``SlimModule``. The whole model is cut; the metric is accuracy.
"""

from __future__ import annotations

import logging
import re

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from slimnet.core.distill import Distillation
from slimnet.data.custom import DataFacts, build_custom_datamodule, describe
from slimnet.engine.artifact import save_pruned
from slimnet.engine.cut import layer_widths
from slimnet.engine.measure import count_flops
from slimnet.errors import ConfigError, first_line
from slimnet.loops.lightning import SlimmingCallback
from slimnet.models.build import build_model
from slimnet.modes import preserved_modes
from slimnet.tasks.classification.module import SlimModule
from slimnet.tasks.classification.optimizers import OPTIMIZERS, SCHEDULES
from slimnet.tasks.plugin import TaskPlugin

log = logging.getLogger(__name__)

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _output_classes(model: nn.Module, example: torch.Tensor) -> int:
    with torch.no_grad(), preserved_modes(model):
        out = model.eval()(example)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(f"the model's output has shape {getattr(out, 'shape', type(out).__name__)}; the "
                          "classification task needs (batch, classes) logits")
    return out.shape[1]


def build_data(cfg: DictConfig) -> tuple[pl.LightningDataModule, DataFacts]:
    """The run's data module (``data._target_``, checked now) and what the run needs to know of it."""
    datamodule = build_custom_datamodule(OmegaConf.to_container(cfg.data, resolve=True))
    return datamodule, describe(datamodule)


def build_module(cfg: DictConfig, facts: DataFacts, prune_epoch: int | None) -> SlimModule:
    """The model (``model._target_``) inside a ``SlimModule``; the data fills in classes and channels."""
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    model_config.setdefault("in_channels", facts.in_channels)
    if facts.num_classes is not None:
        model_config.setdefault("num_classes", facts.num_classes)
    elif "num_classes" not in model_config and model_config.get("_target_", "").startswith("slimnet.models."):
        raise ConfigError("the data module does not say how many classes there are: give it a num_classes "
                          "attribute (self.num_classes = 10) or set +model.num_classes=10")
    try:
        model = build_model(model_config)
    except (TypeError, ValueError) as err:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unknown:  # a builder taking **kwargs passed a typo on to the class
            raise ConfigError(f"model.{unknown[1]} is not a setting of this model ({first_line(err)})") from None
        raise ConfigError(f"model: {first_line(err)}") from None
    num_classes = model_config.get("num_classes") or _output_classes(model, facts.example)
    if "num_classes" not in model.slimnet_config and facts.num_classes is None:
        log.info("%s takes no num_classes and the data module does not say: %d classes, from the model's output",
                 model_config.get("_target_"), num_classes)
    return SlimModule(
        model_config=model.slimnet_config,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        finetune={k: v for k, v in OmegaConf.to_container(cfg.finetune, resolve=True).items()
                  if not k.startswith("distill")},  # the optimizer's keys; distillation is the callback's
        prune_epoch=prune_epoch,
        num_classes=num_classes,
        model=model,
        channels_last=bool(cfg.get("channels_last", False)),
        example_input_array=facts.example,
    )


class Classification(TaskPlugin):
    """Image classification: a ``SlimModule`` around the model, accuracy, the whole model cut."""

    name, metric = "classification", "acc"

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        """SlimModule's optimizer and each phase's schedule are names of its tables."""
        if cfg.optim.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name={cfg.optim.name!r} is unknown; choose one of: {', '.join(OPTIMIZERS)}")
        for where in ("optim", "finetune"):
            schedule = cfg[where].get("schedule")
            if schedule is not None and schedule not in SCHEDULES:
                raise ConfigError(f"{where}.schedule={schedule!r} is unknown; choose one of: {', '.join(SCHEDULES)}")

    def build(self):
        self.datamodule, facts = build_data(self.cfg)
        self.example = facts.example
        self.module = build_module(self.cfg, facts, self.prune_epoch)
        return self.datamodule, self.module

    @property
    def sparse_module(self) -> str:
        return "model"

    def cut_net(self):
        return self.module.model, (self.example,), None

    def slimming_callback(self, **kwargs) -> SlimmingCallback:
        # the fine-tune phase has its own optimizer and schedule (SlimModule's finetune config)
        f = self.cfg.finetune
        distill = Distillation(f.distill_temperature, f.distill_weight, where="finetune.distill") \
            if f.get("distill") else None
        return SlimmingCallback(module="model", example_input=self.example, module_input=True,
                                restart_schedule=True, carry_optimizer_state=False, distill=distill, **kwargs)

    def measure(self) -> dict:
        flops, params = count_flops(self.module.model, self.example)
        return {"flops": flops, "params": params}

    def widths(self) -> dict[str, int]:
        return layer_widths(self.module.model)

    def layers(self) -> set[str]:
        """Convolutions and linears, not their norms: the widths a reader looks for."""
        return {n for n, m in self.module.model.named_modules() if isinstance(m, _LAYERS)}

    def evaluate(self, trainer, module):
        """Validation accuracy at the cut (``SlimmingCallback`` runs it with the random streams isolated:
        a loader's iterator draws a seed, and a run resumed at the cut evaluates once more)."""
        loader = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else None
        return module.accuracy_on(loader) if loader else None

    def finish(self) -> None:
        # The trained model leaves in the default (NCHW) layout: the latency baseline, the artifact and every
        # user's plain input use it; channels_last was a training speed choice, not part of the model.
        self.module.model.to(memory_format=torch.contiguous_format)

    def latency_models(self):
        unpruned = build_model(self.module.model.slimnet_config).to(self.example.device)
        return unpruned, self.module.model, self.example, "the whole model"

    def extra_results(self, before: dict, after: dict) -> dict:
        return {"input_shape": list(self.example.shape[1:])}

    def model_config(self) -> dict | None:
        return getattr(self.module.model, "slimnet_config", None)

    def save_artifact(self, path) -> None:
        save_pruned(self.module.model, path)
