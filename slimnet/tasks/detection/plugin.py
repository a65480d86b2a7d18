"""``Detection``: a torchvision detector in the run pipeline (``task=detection``; ``experiment=detection``).

    python -m slimnet.train experiment=detection                  # synthetic shapes, Faster R-CNN resnet18
    python -m slimnet.train experiment=detection prune.scope=backbone+neck model.kind=retinanet

What is the task's own: the detector (``model._target_``, ``build_detector``) inside a ``DetectionTask``
(loss, COCO mAP), the part the scope names (``prune.scope``: backbone, backbone+neck, all), cut through
the detector's trunk so channels leaving the scope are cut on both sides, and its measurements: the cut
part's FLOPs and the whole detector's (at ``data.image_size`` after the detector's own resize; Faster
R-CNN counted on its test-time proposal budget). Everything else (resume, the shared sparse phase,
the preflight, pruned.pt, the summary) is the one pipeline's.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from slimnet.data.custom import build_custom_datamodule
from slimnet.engine.artifact import save_pruned
from slimnet.engine.cut import layer_widths
from slimnet.engine.measure import count_flops, count_params
from slimnet.errors import ConfigError, first_line
from slimnet.models.build import build_model
from slimnet.sparsity.norms import unfreeze_batchnorm
from slimnet.tasks.detection.export import export_detector
from slimnet.tasks.detection.scope import SCOPES
from slimnet.tasks.detection.task import DetectionTask
from slimnet.tasks.detection.trunk import DetectorSlimmingCallback, DetectorTrunk
from slimnet.tasks.plugin import TaskPlugin

log = logging.getLogger(__name__)


def unfreeze_for_sparsity(detector, model_config: dict) -> dict:
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


class Detection(TaskPlugin):
    """Object detection: a ``DetectionTask`` around a torchvision detector, COCO mAP, the scope cut."""

    name, metric = "detection", "map"
    export = staticmethod(export_detector)  # python -m slimnet.export <run dir | .ckpt>: ONNX or TorchScript

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        if cfg.finetune.get("distill"):
            raise ConfigError("finetune.distill is for classification: a detector's losses match anchors and "
                              "proposals inside torchvision's heads, not logits a teacher could share; set "
                              "finetune.distill=false")
        scope = cfg.prune.get("scope") or "backbone"
        if scope not in SCOPES:
            raise ConfigError(f"prune.scope={scope!r} is not one a detector can be cut in; choose one of: "
                              f"{', '.join(SCOPES)} (the heads' class and box outputs are never cut)")

    def build(self):
        cfg = self.cfg
        self.datamodule = build_custom_datamodule(OmegaConf.to_container(cfg.data, resolve=True))
        config = {**OmegaConf.to_container(cfg.model, resolve=True), "num_classes": self.datamodule.num_classes}
        try:
            detector = build_model(config)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {first_line(err)}") from None
        config = detector.slimnet_config
        if self.prune_epoch is not None and cfg.sparsity.lam:
            config = unfreeze_for_sparsity(detector, config)
        self.config = config
        self.module = DetectionTask(config, image_size=self.datamodule.image_size, lr=cfg.optim.lr, model=detector,
                                    momentum=cfg.optim.get("momentum", 0.9), weight_decay=cfg.optim.weight_decay)
        self.scope = self.module.prune_scope(cfg.prune.get("scope") or "backbone")
        return self.datamodule, self.module

    # -- what to cut --------------------------------------------------------------------------------
    @property
    def sparse_module(self) -> str:
        return self.scope.module

    def cut_net(self):
        # traced on the detector's trunk, so channels leaving the scope are cut on both sides
        return DetectorTrunk(self.module.model), self.scope.trunk_input, self.scope.within

    def slimming_callback(self, **kwargs) -> DetectorSlimmingCallback:
        # DetectionTask's schedule reads the global step: the optimizer is pointed at the cut parameters
        # in place, with its momentum, and the curve goes on (the callback's defaults)
        return DetectorSlimmingCallback(module=self.scope.detector, example_input=self.scope.trunk_input,
                                        within=self.scope.within, **kwargs)

    # -- measuring ----------------------------------------------------------------------------------
    def _part(self):
        return self.module.get_submodule(self.scope.module)

    def measure(self) -> dict:
        detector = self.module.flops()
        if self.scope.scope == "all":
            flops, params = detector["total"], count_params(self.module.model)
        else:
            flops, params = count_flops(self._part(), self.scope.example_input)
        return {"flops": flops, "params": params, "detector_flops": detector}

    def widths(self) -> dict[str, int]:
        return layer_widths(self._part())

    def layers(self) -> set[str]:
        return {n for n, m in self._part().named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}

    def evaluate(self, trainer, module):
        """COCO mAP (``map``) and mAP@.5 (``map_50``) on the validation set right after the cut."""
        loader = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else None
        return module.map_on(loader) if loader else None

    def test_results(self, val: dict, test: dict) -> dict:
        results = super().test_results(val, test)
        results["test_map_50"] = float(test["test/map_50"]) if "test/map_50" in test else None
        return results

    def latency_models(self):
        unpruned = DetectorTrunk(build_model(self.config)).to(self.scope.trunk_input[0].device)
        return (unpruned, DetectorTrunk(self.module.model), self.scope.trunk_input[0],
                "the detector's trunk: backbone, FPN and the heads' layers (no anchors, NMS or RoI pooling)")

    def extra_results(self, before: dict, after: dict) -> dict:
        size = self.module.image_size
        return {
            "scope": {"name": self.scope.scope, "module": self.scope.module},
            "flops_note": f"one {size[0]}x{size[1]} image after the detector's resize",
            "detector_flops_reduction": 1 - after["detector_flops"]["total"] / before["detector_flops"]["total"],
        }

    # -- saving -------------------------------------------------------------------------------------
    def model_config(self) -> dict:
        return self.config

    def save_artifact(self, path) -> None:
        save_pruned(self.module.model, path, model_config=self.config)
