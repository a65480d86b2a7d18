"""``train(cfg)``: one slimming run from a composed config, the function behind ``python -m slimnet.train``.

Validates the config, builds data, model, module and callbacks, fits (sparse phase, surgery, fine-tune),
tests, and writes the run's report and pruned artifact into ``run_dir``. Returns the results dict, so
tests call exactly what the command line calls.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from slimnet.data import build_datamodule
from slimnet.data.custom import DataFacts, build_custom_datamodule, describe
from slimnet.deploy.latency import compare_latency, speedup_columns
from slimnet.engine.artifact import save_pruned
from slimnet.engine.cut import layer_widths
from slimnet.engine.measure import count_flops
from slimnet.engine.reach import Reach, reach_of
from slimnet.errors import first_line
from slimnet.graph import TraceError, trace_channel_groups
from slimnet.loops.lightning import GammaMonitor, PhaseTimer, SlimmingCallback, SparsityCallback
from slimnet.loops.lightning.checkpoint_io import SafeCheckpointIO
from slimnet.models.build import build_model
from slimnet.modes import preserved_modes
from slimnet.run.config import ConfigError, cut_policy, pruning_enabled, validate
from slimnet.run.console import progress_callbacks
from slimnet.run.results import summary_table, write_json
from slimnet.run.sparse_cache import SparseCache, sparse_key
from slimnet.tasks.classification.module import SlimModule

log = logging.getLogger(__name__)


def _val_accuracy(trainer: pl.Trainer, module: SlimModule) -> float | None:
    """Validation accuracy at the cut (``SlimmingCallback`` runs it with the random streams isolated: a
    loader's iterator draws a seed, and a run resumed at the cut evaluates once more; docs/reliability.md)."""
    loader = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else None
    return module.accuracy_on(loader) if loader else None


def _callbacks(cfg: DictConfig, run_dir: Path, example_input: torch.Tensor,
               cache: SparseCache | None = None) -> list[pl.Callback]:
    ckpt = cfg.callbacks.checkpoint
    callbacks: list[pl.Callback] = [
        PhaseTimer(),
        ModelCheckpoint(dirpath=run_dir / "checkpoints", monitor=ckpt.monitor, mode=ckpt.mode,
                        save_top_k=1, filename="best-{epoch}"),
    ]
    if ckpt.save_last:
        # Lightning 2.6's save_last writes last.ckpt only on epochs where a top-k checkpoint was saved;
        # an unmonitored checkpoint named "last" is written every epoch, which is what resuming needs.
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None,
                                         save_top_k=1, enable_version_counter=False))
    s, p = cfg.sparsity, cfg.prune
    if s.lam or s.finetune_lam or s.gamma_init is not None:
        # The same callback a user adds to their own LightningModule: the L1 step on the network's γ.
        callbacks.append(SparsityCallback(lam=s.lam, lam_after=s.finetune_lam, module="model",
                                          until_epoch=p.epoch if pruning_enabled(cfg) else None,
                                          gamma_init=s.gamma_init, log_stats=True, kind=s.get("kind", "l1"),
                                          t=s.get("t", 1.4), bound=s.get("bound", 1.0), target=s.get("target"),
                                          eps=s.get("eps", 1e-2)))
    if pruning_enabled(cfg):
        callbacks.append(SlimmingCallback(
            epoch=p.epoch, module="model", example_input=example_input, module_input=True,
            **cut_policy(cfg.prune),
            min_channels=p.min_channels, round_to=p.round_to, fold_bias=p.fold_bias,
            # the fine-tune phase has its own optimizer and schedule (SlimModule's finetune config)
            restart_schedule=True, carry_optimizer_state=False, cut_frozen=p.get("cut_frozen", False),
            evaluate=_val_accuracy if p.eval_after_cut else None, save_sparse=True,
            on_sparse_saved=(lambda path: cache.publish(path, run_dir)) if cache is not None else None))
    if cfg.logger.tensorboard:
        callbacks += [GammaMonitor(histograms=cfg.callbacks.gamma_histograms, module="model"),
                      LearningRateMonitor(logging_interval="epoch")]
    return callbacks


def _latency(cfg: DictConfig, module: SlimModule, example: torch.Tensor, flops_before: int, flops_after: int) -> dict:
    """Measured speed-up of the cut model over a freshly built unpruned one (weights do not matter)."""
    lat = cfg.latency
    unpruned = build_model(module.model.slimnet_config).to(example.device)
    comparison = compare_latency(unpruned, module.model, example, batch_sizes=tuple(lat.batch_sizes),
                                 repeats=lat.repeats, backends=tuple(lat.backends), threads=lat.threads,
                                 flops=(flops_before, flops_after))
    columns = speedup_columns(comparison)
    headline = f"speedup_eager_b{max(lat.batch_sizes)}"
    comparison["speedup"] = columns.get(headline)
    comparison["columns"] = columns
    return comparison


def build_data(cfg: DictConfig) -> tuple[pl.LightningDataModule, DataFacts]:
    """The run's data module (slimnet's or the user's ``_target_``) and what the run needs to know of it."""
    data_args = OmegaConf.to_container(cfg.data, resolve=True)
    if "_target_" in data_args:
        datamodule = build_custom_datamodule(data_args)
    else:
        datamodule = build_datamodule(data_args.pop("name"), **data_args)
        datamodule.check()  # missing or corrupt data fails now, not after the first epoch
    return datamodule, describe(datamodule)


def _output_classes(model: torch.nn.Module, example: torch.Tensor) -> int:
    with torch.no_grad(), preserved_modes(model):
        out = model.eval()(example)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(f"the model's output has shape {getattr(out, 'shape', type(out).__name__)}; the "
                          "classification task needs (batch, classes) logits")
    return out.shape[1]


def build_module(cfg: DictConfig, facts: DataFacts) -> SlimModule:
    """The model (registry ``arch`` or the user's ``_target_``) inside a ``SlimModule``."""
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    model_config.setdefault("in_channels", facts.in_channels)
    if facts.num_classes is not None:
        model_config.setdefault("num_classes", facts.num_classes)
    elif "_target_" not in model_config and "num_classes" not in model_config:
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
        finetune=OmegaConf.to_container(cfg.finetune, resolve=True),
        prune_epoch=cfg.prune.epoch if pruning_enabled(cfg) else None,
        num_classes=num_classes,
        model=model,
        channels_last=bool(cfg.get("channels_last", False)),
        example_input_array=facts.example,
    )


def record_failure(run_dir: str | Path, err: BaseException) -> None:
    """A failed job's results.json, so a sweep report lists it as failed instead of losing it."""
    write_json({"status": "failed", "error": f"{type(err).__name__}: {err}"}, Path(run_dir) / "results.json")


def resumed_config(run_dir: str | Path) -> tuple[DictConfig, Path]:
    """The config a run in ``run_dir`` was started with, set to resume from its ``last.ckpt``."""
    run_dir = Path(run_dir)
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"resume={run_dir}: no .hydra/config.yaml there; give the directory of a slimnet run")
    cfg = OmegaConf.load(saved)
    cfg.ckpt_path, cfg.resume = "last", None
    return cfg, run_dir


def _check_writable(run_dir: Path) -> None:
    """Fail now, not at the first checkpoint an epoch later, if the run directory cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output directory {run_dir} is not writable ({err.strerror}); "
                          "point hydra.run.dir at a writable folder") from None


def _preflight(model: torch.nn.Module, example: torch.Tensor, arch: str, cut_frozen: bool = False) -> Reach:
    """Trace the model now: a model that cannot be slimmed fails before training, not at the prune epoch,
    and a user learns in seconds what share of it the cut can reach."""
    try:
        graph = trace_channel_groups(model, example)  # TraceError names the module and the way on
    except TraceError:
        raise
    except RuntimeError as err:
        raise ConfigError(f"model {arch} cannot run on inputs of shape {tuple(example.shape[1:])}: {first_line(err)}; "
                          "choose a model or data.image_size that fit") from None
    reach = reach_of(graph, model, cut_frozen=cut_frozen)  # marks frozen γ's groups as kept whole
    if not any(group.prunable for group in graph.groups):
        has_bn = any(group.norms for group in graph.groups)
        why = "has no BatchNorm: there is no γ to slim by" if not has_bn else \
            "has no channel group that can be cut safely (" + "; ".join(graph.warnings[:3]) + ")"
        raise ConfigError(f"model {arch} {why}; use prune=none to train it without surgery")
    return reach


def _single_process(cfg: DictConfig) -> bool:
    """Whether this run trains in one process (the sparse cache's lock is per process, not per rank)."""
    devices, strategy = cfg.trainer.get("devices", "auto"), str(cfg.trainer.get("strategy", "auto"))
    if "ddp" in strategy or "fsdp" in strategy or "deepspeed" in strategy:
        return False
    if devices == "auto":
        return torch.cuda.device_count() <= 1
    return devices == 1 or devices == [0] or devices == "1"


def _resolve_ckpt(cfg: DictConfig, run_dir: Path) -> str | None:
    """``ckpt_path=last`` means this run directory's ``checkpoints/last.ckpt``."""
    ckpt = cfg.ckpt_path
    if ckpt == "last":
        ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    if ckpt is not None and not Path(ckpt).is_file():
        raise ConfigError(f"ckpt_path={ckpt} does not exist; give a Lightning checkpoint to resume from")
    return ckpt


def train(cfg: DictConfig, run_dir: str | Path, extra_callbacks: list[pl.Callback] = ()) -> dict:
    """Run the pipeline described by ``cfg``; everything it writes goes under ``run_dir``.

    ``extra_callbacks`` are appended to the run's own (tests use them to inject faults).
    """
    run_dir = Path(run_dir)
    validate(cfg)
    _check_writable(run_dir)
    if cfg.get("task", "classification") == "detection":
        from slimnet.run.detection import train_detection

        return train_detection(cfg, run_dir, extra_callbacks)
    ckpt_path = _resolve_ckpt(cfg, run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    for key in ("thresh", "target_flops"):
        if cfg.prune.get(key) is not None and cfg.prune.percent is not None and pruning_enabled(cfg):
            log.info("prune.%s=%s is set and wins over prune.percent=%s", key, cfg.prune[key], cfg.prune.percent)

    datamodule, facts = build_data(cfg)
    module = build_module(cfg, facts)
    example = facts.example
    reach = None
    if pruning_enabled(cfg):
        reach = _preflight(module.model, example, cfg.model.get("arch") or cfg.model.get("_target_"),
                           cfg.prune.get("cut_frozen", False))
        log.info("%s", reach)  # before training: what the sparse phase works towards

    # Jobs that differ only after the prune epoch share one sparse phase (see sparse_cache.py).
    cache, reused = None, False
    if (ckpt_path is None and pruning_enabled(cfg) and cfg.prune.epoch > 0 and cfg.prune.reuse_sparse
            and _single_process(cfg)):
        cache = SparseCache(cfg.prune.cache_dir, sparse_key(cfg))
        hit = cache.lookup_or_lock()
        if hit is not None:
            ckpt_path, reused = str(hit), True
            log.info("reusing the sparse phase trained by %s (%s)", cache.trained_by(), hit)
    publisher = cache if cache is not None and not reused else None
    try:
        results = _fit_and_report(cfg, run_dir, datamodule, module, example, ckpt_path, extra_callbacks, publisher)
    finally:
        if publisher is not None:
            publisher.release()  # if this job died before publishing, let the next one train the key
    results["reach"] = reach.to_dict() if reach is not None else None
    results["sparse_phase"] = {"reused": reused, "key": cache.key if cache is not None else None,
                               "trained_by": cache.trained_by() if cache is not None else None}
    if results.pop("is_global_zero"):
        write_json(results, run_dir / "results.json")
        log.info("%s\nresults in %s (%s)", summary_table(results, layers=_producers(module.model)), run_dir,
                 _disk_note(run_dir, keep=cfg.callbacks.checkpoint.get("keep", True)))
    return results


def _megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6 if path.exists() else 0.0


def _disk_note(run_dir: Path, keep: bool) -> str:
    """What the run leaves on disk, and the way to keep less: checkpoints are most of it."""
    checkpoints = run_dir / "checkpoints"
    size = _megabytes(checkpoints)
    if not keep:
        shutil.rmtree(checkpoints, ignore_errors=True)
        return f"{_megabytes(run_dir):.0f} MB; checkpoints/ ({size:.0f} MB) deleted: callbacks.checkpoint.keep=false"
    return (f"{_megabytes(run_dir):.0f} MB, of which checkpoints/ {size:.0f} MB for resuming and re-cutting; "
            "callbacks.checkpoint.keep=false drops them when a run ends well")


def _producers(model: torch.nn.Module) -> set[str]:
    """The layers whose widths a reader looks for (convolutions and linears, not their norms)."""
    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                                                                   torch.nn.Linear))}


def _fit_and_report(cfg, run_dir, datamodule, module, example, ckpt_path, extra_callbacks, publisher) -> dict:
    flops_before, params_before = count_flops(module.model, example)
    widths_before = layer_widths(module.model)
    progress, bar = progress_callbacks(cfg.callbacks.progress_bar)
    callbacks = _callbacks(cfg, run_dir, example, publisher) + progress + list(extra_callbacks)
    loggers = [TensorBoardLogger(save_dir=str(run_dir), name="tb", version="", default_hp_metric=False)] \
        if cfg.logger.tensorboard else []
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args["enable_progress_bar"] = bar
    trainer = pl.Trainer(**trainer_args, callbacks=callbacks, logger=loggers or False, default_root_dir=str(run_dir),
                         plugins=[SafeCheckpointIO()])

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - start
    val_acc = trainer.callback_metrics.get("val/acc")
    test_acc = None
    if cfg.test:
        test_acc = trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]

    # The trained model leaves in the default (NCHW) layout: the latency baseline, the artifact and every
    # user's plain input use it; channels_last was a training speed choice, not part of the model.
    module.model.to(memory_format=torch.contiguous_format)
    flops_after, params_after = count_flops(module.model, example)
    widths_after = layer_widths(module.model)
    slimming = next((cb for cb in callbacks if isinstance(cb, SlimmingCallback)), None)
    cut = slimming.report if slimming is not None and slimming.report else {}
    before_cut = cut.get("val_before_cut") or {}  # the last validation before the cut, or an evaluation of it
    prune_cfg = OmegaConf.to_container(cfg.prune, resolve=True)
    policy = cut_policy(cfg.prune) if pruning_enabled(cfg) else {}
    for key in ("thresh", "percent", "target_flops"):  # record only the policy the cut used
        if key not in policy:
            prune_cfg.pop(key, None)
    timer = next(cb for cb in callbacks if isinstance(cb, PhaseTimer))
    sparsity = next((cb for cb in callbacks if isinstance(cb, SparsityCallback)), None)
    results = {
        "status": "ok",
        "val_acc": float(val_acc) if val_acc is not None else None,
        "test_acc": float(test_acc) if test_acc is not None else None,
        "val_acc_before_cut": before_cut.get("val/acc", before_cut.get("evaluate")),
        "val_acc_after_cut": cut.get("after_cut"),
        "before": {"flops": flops_before, "params": params_before},
        "after": {"flops": flops_after, "params": params_after},
        "flops_reduction": 1 - flops_after / flops_before,
        "params_reduction": 1 - params_after / params_before,
        "threshold": cut.get("threshold") if cut.get("threshold") not in (None, -math.inf) else None,
        "policy": cut.get("policy"),
        "prune": prune_cfg,
        "channels": {n: [widths_before[n], w] for n, w in widths_after.items()},
        "floored_layers": cut.get("floored", []),
        "sparsity": {"kind": sparsity.kind, "target": sparsity.target, "eps": sparsity.eps,
                     "history": sparsity.history} if sparsity is not None else None,
        "warnings": cut.get("warnings", []),
        "seconds": {**timer.seconds, "surgery": cut.get("surgery_seconds", 0.0), "fit": fit_seconds},
        "epochs_trained_here": dict(timer.epochs_here),
        "model_config": module.model.slimnet_config if hasattr(module.model, "slimnet_config") else None,
        "input_shape": list(example.shape[1:]),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "artifact": None,
        "is_global_zero": trainer.is_global_zero,
    }
    if trainer.is_global_zero and cfg.latency.enabled and cut:
        results["latency"] = _latency(cfg, module, example, flops_before, flops_after)
    if cfg.save_artifact and trainer.is_global_zero:
        artifact = run_dir / "pruned.pt"
        save_pruned(module.model, artifact)
        results["artifact"] = str(artifact)
    if trainer.is_global_zero:
        for logger in loggers:
            logger.log_hyperparams(
                {**{f"prune/{k}": v for k, v in policy.items()}, "prune/threshold_used": results["threshold"] or 0.0,
                 "sparsity/lam": cfg.sparsity.lam},
                {"hp/test_acc": results["test_acc"] or 0.0, "hp/flops": flops_after,
                 "hp/flops_reduction": results["flops_reduction"]})
    return results
