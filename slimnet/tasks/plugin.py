"""``TaskPlugin``: what a task plugs into the one run pipeline (``slimnet.run.pipeline.train``).

The pipeline does everything every run does: the config checks, seeding, the preflight reach check,
the shared sparse phase of a sweep, the sparsity and slimming callbacks, checkpoints and ``resume=``,
the Trainer, fit and test, FLOPs and widths before and after, latency, ``pruned.pt``, ``results.json``
and the summary table. A task supplies only what is its own:

* its data and its LightningModule (``build``),
* what to cut: the network the cut traces, its example input and the scope (``cut_net``), the module
  whose γ the sparsity step penalises (``sparse_module``) and the slimming callback (``slimming_callback``),
* its metric (``metric``: logged as ``val/<metric>`` and ``test/<metric>``) and the evaluation at the cut,
* its measurements (``measure``: FLOPs and parameters of what is cut, and anything more it reports),
* how its cut model is saved and rebuilt (``save_artifact``, ``model_config``), and optionally exported.

A run's config names its task the way Hydra names any swappable object: ``task._target_`` (the
``conf/task/*.yaml`` files are the short names: ``task=detection``). A new task is a subclass here and a
config file; nothing in ``run/`` changes (docs/architecture.md).
"""

from __future__ import annotations

import abc

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn

from slimnet.loops.lightning import SlimmingCallback


class TaskPlugin(abc.ABC):
    """One task of the command-line run. Subclasses set ``name`` and ``metric`` and implement the rest.

    Built as ``plugin = cls(cfg, prune_epoch)`` from the composed run config (``prune_epoch``: the epoch
    the run cuts at, None for a run without a cut), after ``cls.check(cfg)`` passed and the seed was set;
    ``build()`` comes next, then every other method may be called.
    """

    name: str = ""     # results.json's "task"
    metric: str = ""   # headline metric: logged as val/<metric>, test/<metric>; results' val_<metric>, test_<metric>
    # ``export(source, format, **flags) -> ExportReport`` for a task whose model needs its own exporter
    # (``python -m slimnet.export <run dir>``); None: the run's pruned.pt goes to slimnet.deploy.export
    export = None

    def __init__(self, cfg: DictConfig, prune_epoch: int | None = None):
        self.cfg, self.prune_epoch = cfg, prune_epoch
        self.datamodule: pl.LightningDataModule | None = None
        self.module: pl.LightningModule | None = None

    # -- before anything is built -----------------------------------------------------------------
    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        """Raise ``ConfigError`` for a mistake in the task's own keys (model, data, scope) that the config
        alone shows. The pipeline's shared checks (prune, sparsity, optim, trainer) run besides."""

    # -- building -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def build(self) -> tuple[pl.LightningDataModule, pl.LightningModule]:
        """The data module (checked: missing data fails now) and the LightningModule to fit."""

    # -- what to cut --------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def sparse_module(self) -> str:
        """Dotted name, in the LightningModule, of the network whose γ the sparsity step penalises."""

    @abc.abstractmethod
    def cut_net(self) -> tuple[nn.Module, tuple, str | None]:
        """``(net, inputs, within)``: the module the cut traces, its example inputs and the scope inside
        it (dotted prefix; None: all of it). The preflight traces exactly this."""

    @abc.abstractmethod
    def slimming_callback(self, **kwargs) -> SlimmingCallback:
        """The slimming callback for this task, with the pipeline's ``kwargs`` (policy, epoch, …)."""

    # -- measuring ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def measure(self) -> dict:
        """``{"flops", "params", …}`` of the part that is cut, at its current widths (one input)."""

    @abc.abstractmethod
    def widths(self) -> dict[str, int]:
        """Output width of every layer of the part that is cut, by name."""

    def layers(self) -> set[str] | None:
        """The layer names the summary lists (None: all in ``widths``)."""
        return None

    def evaluate(self, trainer: pl.Trainer, module: pl.LightningModule):
        """The validation metric right after the cut, before fine-tuning: a number, or a dict holding
        ``metric`` and more. None if there is no validation data."""

    def headline(self, value) -> float | None:
        """The number ``metric`` names in an ``evaluate`` or test result."""
        return value.get(self.metric) if isinstance(value, dict) else value

    def test_results(self, val: dict, test: dict) -> dict:
        """The run's metric keys in results.json, from the last validation's and the test's logged values
        (``val/<metric>``, ``test/<metric>``; ``test`` is empty when ``test=false``)."""
        def value(d, key):
            v = d.get(key)
            return float(v) if v is not None else None

        return {f"val_{self.metric}": value(val, f"val/{self.metric}"),
                f"test_{self.metric}": value(test, f"test/{self.metric}")}

    def finish(self) -> None:
        """After fit and test, before the final measurements and the artifact (e.g. back to NCHW)."""

    def latency_models(self) -> tuple[nn.Module, nn.Module, torch.Tensor, str] | None:
        """``(unpruned, pruned, example, what)`` to time against each other (a freshly built unpruned
        model: weights do not change latency), or None when the task has nothing to time."""
        return None

    def extra_results(self, before: dict, after: dict) -> dict:
        """Task-specific keys of results.json (``before`` / ``after``: the two ``measure()`` results)."""
        return {}

    # -- saving -------------------------------------------------------------------------------------
    def model_config(self) -> dict | None:
        """The call that rebuilds the unpruned network (results.json's ``model_config``)."""
        return None

    @abc.abstractmethod
    def save_artifact(self, path) -> None:
        """Write the cut network as ``pruned.pt`` (``slimnet.save_pruned``: weights, plan, model config)."""
