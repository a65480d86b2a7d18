"""``train(cfg)``: one slimming run from a composed config, the function behind ``python -m slimnet.train``.

One pipeline for every task: it validates the config, lets the task (``cfg.task._target_``, a
``slimnet.tasks.plugin.TaskPlugin``) build its data and LightningModule, checks before training that the
model can be cut, fits (sparse phase, surgery, fine-tune) with the same callbacks, checkpoints and
``resume=`` for every task, shares a sweep's sparse phase, tests, and writes the run's report, its
summary table and the pruned artifact into ``run_dir``. Returns the results dict, so tests call exactly
what the command line calls.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from slimnet.deploy.latency import compare_latency, speedup_columns
from slimnet.engine.cut import find_kept_whole
from slimnet.engine.plan import restrict_to
from slimnet.engine.reach import Reach, reach_of
from slimnet.errors import ConfigError, first_line
from slimnet.graph import TraceError, trace_channel_groups
from slimnet.loops.lightning import GammaMonitor, PhaseTimer, SlimmingCallback, SparsityCallback
from slimnet.loops.lightning.checkpoint_io import SafeCheckpointIO
from slimnet.run.config import cut_policy, pruning_enabled, task_plugin, validate
from slimnet.run.console import progress_callbacks
from slimnet.run.results import summary_table, write_json
from slimnet.run.sparse_cache import SparseCache, sparse_key
from slimnet.tasks.plugin import TaskPlugin

log = logging.getLogger(__name__)


def _monitor(cfg: DictConfig, task: TaskPlugin) -> str | None:
    """The metric the best checkpoint is chosen by: ``auto`` is the task's validation metric."""
    monitor = cfg.callbacks.checkpoint.monitor
    return f"val/{task.metric}" if monitor == "auto" else monitor


def _callbacks(cfg: DictConfig, run_dir: Path, task: TaskPlugin, cache: SparseCache | None = None) -> list[pl.Callback]:
    ckpt = cfg.callbacks.checkpoint
    callbacks: list[pl.Callback] = [
        PhaseTimer(),
        ModelCheckpoint(dirpath=run_dir / "checkpoints", monitor=_monitor(cfg, task), mode=ckpt.mode,
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
        callbacks.append(SparsityCallback(lam=s.lam, lam_after=s.finetune_lam, module=task.sparse_module,
                                          until_epoch=p.epoch if pruning_enabled(cfg) else None,
                                          gamma_init=s.gamma_init, log_stats=True, kind=s.get("kind", "l1"),
                                          t=s.get("t", 1.4), bound=s.get("bound", 1.0), target=s.get("target"),
                                          eps=s.get("eps", 1e-2)))
    if pruning_enabled(cfg):
        callbacks.append(task.slimming_callback(
            epoch=p.epoch, **cut_policy(cfg.prune),
            min_channels=p.min_channels, round_to=p.round_to, fold_bias=p.fold_bias,
            cut_frozen=p.get("cut_frozen", False),
            evaluate=task.evaluate if p.eval_after_cut else None, save_sparse=True,
            on_sparse_saved=(lambda path: cache.publish(path, run_dir)) if cache is not None else None))
    if cfg.logger.tensorboard:
        callbacks += [GammaMonitor(histograms=cfg.callbacks.gamma_histograms, module=task.sparse_module),
                      LearningRateMonitor(logging_interval="epoch")]
    return callbacks


def _latency(cfg: DictConfig, task: TaskPlugin, flops_before: int, flops_after: int) -> dict | None:
    """Measured speed-up of the cut model over a freshly built unpruned one (weights do not matter)."""
    models = task.latency_models()
    if models is None:
        return None
    unpruned, pruned, example, what = models
    lat = cfg.latency
    comparison = compare_latency(unpruned, pruned, example, batch_sizes=tuple(lat.batch_sizes),
                                 repeats=lat.repeats, backends=tuple(lat.backends), threads=lat.threads,
                                 flops=(flops_before, flops_after))
    columns = speedup_columns(comparison)
    headline = f"speedup_eager_b{max(lat.batch_sizes)}"
    comparison["speedup"] = columns.get(headline)
    comparison["columns"] = columns
    comparison["measured"] = what
    return comparison


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


def _preflight(task: TaskPlugin, what: str, cut_frozen: bool = False) -> Reach:
    """Trace what the task cuts now: a model that cannot be slimmed fails before training, not at the
    prune epoch, and a user learns in seconds what share of it the cut can reach."""
    net, inputs, within = task.cut_net()
    try:
        graph = trace_channel_groups(net, inputs)  # TraceError names the module and the way on
        if found := find_kept_whole(net, inputs, graph=graph):  # modules only a cut model shows
            graph = trace_channel_groups(net, inputs, keep_whole=found)
    except TraceError:
        raise
    except RuntimeError as err:
        shape = tuple(inputs[0].shape[1:]) if isinstance(inputs[0], torch.Tensor) else "?"
        raise ConfigError(f"model {what} cannot run on inputs of shape {shape}: {first_line(err)}; "
                          "choose a model or data.image_size that fit") from None
    graph = restrict_to(graph, within)
    reach = reach_of(graph, net, cut_frozen=cut_frozen)  # marks frozen γ's groups as kept whole
    if not any(group.prunable for group in graph.groups):
        has_bn = any(group.norms for group in graph.groups)
        why = "has no BatchNorm: there is no γ to slim by" if not has_bn else \
            "has no channel group that can be cut safely (" + "; ".join(graph.warnings[:3]) + ")"
        raise ConfigError(f"model {what} {why}; use prune=none to train it without surgery")
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
    ckpt_path = _resolve_ckpt(cfg, run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    for key in ("thresh", "target_flops"):
        if cfg.prune.get(key) is not None and cfg.prune.percent is not None and pruning_enabled(cfg):
            log.info("prune.%s=%s is set and wins over prune.percent=%s", key, cfg.prune[key], cfg.prune.percent)

    task = task_plugin(cfg)(cfg, cfg.prune.epoch if pruning_enabled(cfg) else None)
    datamodule, module = task.build()
    reach = None
    if pruning_enabled(cfg):
        reach = _preflight(task, cfg.model.get("_target_") or "", cfg.prune.get("cut_frozen", False))
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
        results = _fit_and_report(cfg, run_dir, task, datamodule, module, ckpt_path, extra_callbacks, publisher)
    finally:
        if publisher is not None:
            publisher.release()  # if this job died before publishing, let the next one train the key
    results["reach"] = reach.to_dict() if reach is not None else None
    results["sparse_phase"] = {"reused": reused, "key": cache.key if cache is not None else None,
                               "trained_by": cache.trained_by() if cache is not None else None}
    if results.pop("is_global_zero"):
        write_json(results, run_dir / "results.json")
        log.info("%s\nresults in %s (%s)", summary_table(results, layers=task.layers()), run_dir,
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


def _fit_and_report(cfg, run_dir, task, datamodule, module, ckpt_path, extra_callbacks, publisher) -> dict:
    before = task.measure()
    widths_before = task.widths()
    progress, bar = progress_callbacks(cfg.callbacks.progress_bar)
    callbacks = _callbacks(cfg, run_dir, task, publisher) + progress + list(extra_callbacks)
    loggers = [TensorBoardLogger(save_dir=str(run_dir), name="tb", version="", default_hp_metric=False)] \
        if cfg.logger.tensorboard else []
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args["enable_progress_bar"] = bar
    trainer = pl.Trainer(**trainer_args, callbacks=callbacks, logger=loggers or False, default_root_dir=str(run_dir),
                         plugins=[SafeCheckpointIO()])

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - start
    val = dict(trainer.callback_metrics)  # read before testing replaces the callback metrics
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0] if cfg.test else {}
    task.finish()

    after = task.measure()
    widths_after = task.widths()
    slimming = next((cb for cb in callbacks if isinstance(cb, SlimmingCallback)), None)
    cut = slimming.report if slimming is not None and slimming.report else {}
    before_cut = cut.get("val_before_cut") or {}  # the last validation before the cut, or an evaluation of it
    prune_cfg = OmegaConf.to_container(cfg.prune, resolve=True)
    policy = cut_policy(cfg.prune) if pruning_enabled(cfg) else {}
    for key in ("thresh", "percent", "target_flops", "target_latency", "latency_table", "latency"):
        if key not in policy and not (key == "latency" and "target_latency" in policy):  # only the policy used
            prune_cfg.pop(key, None)
    timer = next(cb for cb in callbacks if isinstance(cb, PhaseTimer))
    sparsity = next((cb for cb in callbacks if isinstance(cb, SparsityCallback)), None)
    m = task.metric
    results = {
        "status": "ok",
        "task": task.name,
        "task_target": cfg.task._target_,  # what python -m slimnet.export asks for the task's own exporter
        "metric": f"test_{m}",  # the headline: what a sweep plots and a sweeper optimises
        **task.test_results(val, test),
        f"val_{m}_before_cut": task.headline(before_cut.get(f"val/{m}", before_cut.get("evaluate"))),
        f"val_{m}_after_cut": cut.get("after_cut"),
        "before": before,
        "after": after,
        "flops_reduction": 1 - after["flops"] / before["flops"],
        "params_reduction": 1 - after["params"] / before["params"],
        "threshold": cut.get("threshold") if cut.get("threshold") not in (None, -math.inf) else None,
        "policy": cut.get("policy"),
        "prune": prune_cfg,
        "channels": {n: [widths_before[n], w] for n, w in widths_after.items()},
        "floored_layers": cut.get("floored", []),
        "sparsity": {"kind": sparsity.kind, "target": sparsity.target, "eps": sparsity.eps,
                     "history": sparsity.history} if sparsity is not None else None,
        "warnings": cut.get("warnings", []),
        # target_latency: predicted and measured latency of the cut (median, p25-p75), each layer's rounding,
        # the table's source and cost (slimnet.engine.latency_budget)
        "latency_cut": cut.get("latency"),
        "seconds": {**timer.seconds, "surgery": cut.get("surgery_seconds", 0.0), "fit": fit_seconds},
        "epochs_trained_here": dict(timer.epochs_here),
        "model_config": task.model_config(),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        **task.extra_results(before, after),
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt") if cfg.callbacks.checkpoint.save_last else None,
        "artifact": None,
        "is_global_zero": trainer.is_global_zero,
    }
    if trainer.is_global_zero and cfg.latency.enabled and cut:
        results["latency"] = _latency(cfg, task, before["flops"], after["flops"])
    if cfg.save_artifact and trainer.is_global_zero:
        artifact = run_dir / "pruned.pt"
        task.save_artifact(artifact)
        results["artifact"] = str(artifact)
    if trainer.is_global_zero:
        for logger in loggers:
            logger.log_hyperparams(
                {**{f"prune/{k}": v for k, v in policy.items() if isinstance(v, (int, float, str))},
                 "prune/threshold_used": results["threshold"] or 0.0,
                 "sparsity/lam": cfg.sparsity.lam},
                {f"hp/test_{m}": results[f"test_{m}"] or 0.0, "hp/flops": after["flops"],
                 "hp/flops_reduction": results["flops_reduction"]})
    return results
