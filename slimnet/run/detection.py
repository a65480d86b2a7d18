"""``train_detection(cfg)``: one slimming run of a torchvision detector, the CLI's ``task=detection``.

    python -m slimnet.train experiment=detection                  # synthetic shapes, Faster R-CNN resnet18
    python -m slimnet.train experiment=detection prune.scope=backbone+neck model.kind=retinanet

The same two callbacks as every other run, pointed at the part of the detector the scope names; the
task (loss, mAP) is ``DetectionTask``. Results: COCO mAP@[.5:.95] and mAP@.5 from torchmetrics, the
cut part's FLOPs and the whole detector's (at ``data.image_size``, after the detector's own resize;
Faster R-CNN counted on its test-time proposal budget) before and after, in ``results.json``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torchvision.ops.misc import FrozenBatchNorm2d

from slimnet.data.custom import build_custom_datamodule
from slimnet.engine.cut import layer_widths
from slimnet.engine.measure import count_flops, count_params
from slimnet.errors import first_line
from slimnet.loops.lightning import GammaMonitor, PhaseTimer, SparsityCallback
from slimnet.loops.lightning.checkpoint_io import SafeCheckpointIO
from slimnet.run.config import ConfigError, cut_policy
from slimnet.run.console import progress_callbacks
from slimnet.run.results import write_json
from slimnet.sparsity.norms import unfreeze_batchnorm

log = logging.getLogger(__name__)

SCOPES = ("backbone", "backbone+neck", "all")


def validate_detection(cfg: DictConfig) -> None:
    p = cfg.prune
    if p.epoch is not None:
        if p.get("scope", "backbone") not in SCOPES:
            raise ConfigError(f"prune.scope={p.get('scope')!r} is not one a detector can be cut in; choose one of: "
                              f"{', '.join(SCOPES)} (the heads' class and box outputs are never cut)")
        if not 0 <= p.epoch < cfg.trainer.max_epochs:
            raise ConfigError(f"prune.epoch={p.epoch} must be in [0, trainer.max_epochs={cfg.trainer.max_epochs})")


def _unfreeze_for_sparsity(detector, model_config: dict) -> dict:
    """FrozenBatchNorm2d has no γ for the L1 step to push: swap it for trainable BatchNorm that keeps
    normalising with the loaded statistics (``EvalModeBatchNorm2d``; identical eval outputs), and say
    so. Returns the config that rebuilds the converted detector (``norm=batchnorm_eval``), so the
    checkpoint reloads with ``load_checkpoint``."""
    n = sum(isinstance(m, FrozenBatchNorm2d) for m in detector.modules())
    if not n:
        return model_config
    unfreeze_batchnorm(detector, eval_mode=True)
    log.info("sparsity is on: converted %d FrozenBatchNorm2d layers to trainable BatchNorm2d on their loaded "
             "running statistics (model.norm=batchnorm_eval; eval outputs unchanged)", n)
    return {**model_config, "norm": "batchnorm_eval"}


def _part_flops(task, scope) -> tuple[int, int]:
    """FLOPs and parameters of the scope's part (the whole detector's at its test-time budget for ``all``)."""
    if scope.scope == "all":
        return task.flops()["total"], count_params(task.model)
    return count_flops(task.get_submodule(scope.module), scope.example_input)


def _val_map(trainer: pl.Trainer, task) -> dict[str, float] | None:
    loader = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else None
    return task.map_on(loader) if loader else None


def train_detection(cfg: DictConfig, run_dir: str | Path, extra_callbacks=()) -> dict:
    from slimnet.tasks.detection.models import build_detector  # torchvision detection, only for this task
    from slimnet.tasks.detection.task import DetectionTask
    from slimnet.tasks.detection.trunk import DetectorSlimmingCallback

    run_dir = Path(run_dir)
    validate_detection(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_custom_datamodule(OmegaConf.to_container(cfg.data, resolve=True))
    if hasattr(datamodule, "check"):
        datamodule.check()
    model_config = {**OmegaConf.to_container(cfg.model, resolve=True), "num_classes": datamodule.num_classes}
    pruning = cfg.prune.epoch is not None and bool(cut_policy(cfg.prune))
    try:
        detector = build_detector(**model_config)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {first_line(err)}") from None
    if pruning and cfg.sparsity.lam:
        model_config = _unfreeze_for_sparsity(detector, model_config)
    task = DetectionTask(model_config, image_size=datamodule.image_size, lr=cfg.optim.lr, model=detector,
                         momentum=cfg.optim.get("momentum", 0.9), weight_decay=cfg.optim.weight_decay)
    scope = task.prune_scope(cfg.prune.get("scope") or "backbone")
    target = task.get_submodule(scope.module)
    (part_before, params_before), detector_before = _part_flops(task, scope), task.flops()
    widths_before = layer_widths(target)

    p, s = cfg.prune, cfg.sparsity
    callbacks: list[pl.Callback] = [PhaseTimer(), ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last",
                                                                   monitor=None, save_top_k=1,
                                                                   enable_version_counter=False)]
    if pruning and s.lam:
        callbacks.append(SparsityCallback(lam=s.lam, lam_after=s.finetune_lam, until_epoch=p.epoch, module=scope.module,
                                          gamma_init=s.gamma_init, kind=s.get("kind", "l1"), target=s.get("target")))
    slimming = None
    if pruning:
        # traced on the detector's trunk, so channels leaving the scope are cut on both sides
        slimming = DetectorSlimmingCallback(epoch=p.epoch, module=scope.detector, example_input=scope.trunk_input,
                                            within=scope.within, min_channels=p.min_channels, round_to=p.round_to,
                                            fold_bias=p.fold_bias, cut_frozen=p.get("cut_frozen", False),
                                            evaluate=_val_map if p.eval_after_cut else None,
                                            **cut_policy(p))
        callbacks.append(slimming)
    progress, bar = progress_callbacks(cfg.callbacks.progress_bar)
    callbacks += progress
    trainer_args = {**OmegaConf.to_container(cfg.trainer, resolve=True), "enable_progress_bar": bar}
    loggers = []
    if cfg.logger.tensorboard:  # mAP, losses, λ and γ statistics, and the γ histograms of the cut part
        loggers = [TensorBoardLogger(save_dir=str(run_dir), name="tb", version="", default_hp_metric=False)]
        callbacks.append(GammaMonitor(histograms=cfg.callbacks.gamma_histograms, module=scope.module))
    trainer = pl.Trainer(**trainer_args, callbacks=callbacks + list(extra_callbacks), logger=loggers or False,
                         default_root_dir=str(run_dir), plugins=[SafeCheckpointIO()])
    start = time.perf_counter()
    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    fit_seconds = time.perf_counter() - start
    val_map = trainer.callback_metrics.get("val/map")  # read before testing replaces the callback metrics
    metrics = trainer.test(task, datamodule=datamodule, verbose=False)[0] if cfg.test else {}

    (part_after, params_after), detector_after = _part_flops(task, scope), task.flops()
    cut = slimming.report if slimming is not None and slimming.report else {}
    widths_after = layer_widths(target)
    results = {
        "status": "ok", "task": "detection",
        "test_map": metrics.get("test/map"), "test_map_50": metrics.get("test/map_50"),
        "val_map": float(val_map) if val_map is not None else None,
        "scope": {"name": p.get("scope") or "backbone", "module": scope.module},
        "flops_note": f"one {task.image_size[0]}x{task.image_size[1]} image after the detector's resize",
        "before": {"flops": part_before, "params": params_before, "detector_flops": detector_before},
        "after": {"flops": part_after, "params": params_after, "detector_flops": detector_after},
        "flops_reduction": 1 - part_after / part_before,
        "params_reduction": 1 - params_after / params_before,
        "detector_flops_reduction": 1 - detector_after["total"] / detector_before["total"],
        "val_map_after_cut": cut.get("after_cut"),  # {map, map_50} right after the cut, before fine-tuning
        "threshold": cut.get("threshold"), "policy": cut.get("policy"),
        "channels": {n: [widths_before[n], w] for n, w in widths_after.items() if w != widths_before[n]},
        "warnings": cut.get("warnings", []),
        "seconds": {"fit": fit_seconds, **next(cb for cb in callbacks if isinstance(cb, PhaseTimer)).seconds},
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),  # slimnet.load_checkpoint(path, DetectionTask)
        "model_config": model_config,
    }
    if trainer.is_global_zero:
        write_json(results, run_dir / "results.json")
        log.info("results in %s: test mAP %s, mAP@.5 %s; %s FLOPs %.1fM -> %.1fM, detector %.1fM -> %.1fM",
                 run_dir / "results.json", results["test_map"], results["test_map_50"], scope.module,
                 part_before / 1e6, part_after / 1e6, detector_before["total"] / 1e6, detector_after["total"] / 1e6)
    return results
