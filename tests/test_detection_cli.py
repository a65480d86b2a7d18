"""``python -m slimnet.train experiment=detection`` end to end on a tiny synthetic set: the backbone cut
at the epoch, mAP and FLOPs in results.json, the checkpoint reloaded at the cut widths."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from slimnet.run.config import ConfigError
from slimnet.run.pipeline import train

pytest.importorskip("pycocotools", reason="mAP needs the detection extra: pip install -e '.[detection]'")

TINY_DETECTION = ["experiment=detection", "model=detector", "model.min_size=64", "model.max_size=64",
                  "model.norm=batchnorm_eval", "data.image_size=64", "data.train_size=8", "data.val_size=4",
                  "data.test_size=4", "data.batch_size=4", "data.min_object_size=10", "data.max_object_size=30",
                  "trainer.max_epochs=2", "prune.epoch=1", "prune.min_channels=4", "sparsity.lam=1e-4",
                  "callbacks.progress_bar=false", "logger=none", "prune.reuse_sparse=false", "latency.repeats=3",
                  "latency.batch_sizes=[1,2]"]


def test_detection_experiment_cuts_the_backbone_and_reports_map(compose_cfg, tmp_path, single_thread, caplog):
    with caplog.at_level(logging.INFO, logger="slimnet.run.pipeline"):
        results = train(compose_cfg(*TINY_DETECTION, "logger=tensorboard"), tmp_path)
    assert any((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "results.json").read_text())["task"] == "detection"
    assert 0.0 <= results["test_map"] <= 1.0 and 0.0 <= results["test_map_50"] <= 1.0
    assert results["scope"]["module"] == "model.backbone.body"
    assert 0.0 <= results["val_map"] <= 1.0
    after_cut = results["val_map_after_cut"]  # measured on the cut model before fine-tuning
    assert set(after_cut) == {"map", "map_50"} and 0.0 <= after_cut["map"] <= after_cut["map_50"] <= 1.0
    assert results["after"]["flops"] < results["before"]["flops"]  # the body was really cut
    before, after = results["before"]["detector_flops"], results["after"]["detector_flops"]
    assert after["total"] < before["total"] and after["heads"] == before["heads"]  # heads kept whole

    from slimnet.loops.lightning.checkpoint import load_checkpoint
    from slimnet.tasks.detection.task import DetectionTask

    reloaded = load_checkpoint(results["checkpoint"], DetectionTask)
    widths = {n: [b, a] for n, (b, a) in results["channels"].items()}
    for name, (_, width) in widths.items():
        module = reloaded.model.backbone.body.get_submodule(name)
        assert (getattr(module, "out_channels", None) or module.num_features) == width
    # the body's stage outputs were cut on both sides: the FPN's lateral convs read the cut widths
    fpn, body = reloaded.model.backbone.fpn, reloaded.model.backbone.body
    stages = [body.get_submodule(name) for name in body.return_layers]
    assert [b[0].in_channels for b in fpn.inner_blocks] == [s[-1].bn2.num_features for s in stages]
    assert any(n.startswith("layer") and n.endswith("bn2") for n in results["channels"])
    with torch.no_grad():
        (out,) = reloaded([torch.rand(3, 64, 64)])
    assert set(out) == {"boxes", "scores", "labels"}

    # what every run of the one pipeline has: the preflight's reach, measured latency, pruned.pt, the summary
    assert 0.0 < results["reach"]["flops"] <= 1.0 and results["reach"]["bn_channels"] > 0.0
    assert results["latency"]["speedup"] > 0 and "trunk" in results["latency"]["measured"]
    from slimnet import load_pruned

    artifact = load_pruned(results["artifact"])  # the detector rebuilt from its _target_ and cut by the plan
    assert [b[0].in_channels for b in artifact.backbone.fpn.inner_blocks] == [b[0].in_channels for b in fpn.inner_blocks]
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        ours, theirs = artifact([image])[0], reloaded.model.eval()([image])[0]
    torch.testing.assert_close(ours["scores"], theirs["scores"])  # the same weights as the last checkpoint
    summary = next(r.message for r in caplog.records if "before cut" in r.message)
    assert "val map" in summary and "test map" in summary and "layer" in summary



def test_a_detection_run_resumes_across_the_cut(compose_cfg, tmp_path, single_thread):
    """``resume=<run dir>`` as the CLI does it (the run's own saved config, ckpt_path=last): a run stopped
    after the cut goes on at the cut widths, the plan replayed before the weights load, cut once."""
    from omegaconf import OmegaConf

    from slimnet.run.pipeline import resumed_config

    first = train(compose_cfg(*TINY_DETECTION, "trainer.max_epochs=2", "prune.epoch=1"), tmp_path)  # "stopped"
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(compose_cfg(*TINY_DETECTION, "trainer.max_epochs=3", "prune.epoch=1"), tmp_path / ".hydra" / "config.yaml")
    cfg, run_dir = resumed_config(tmp_path)
    resumed = train(cfg, run_dir)
    assert resumed["epochs_trained_here"] == {"sparse": 0, "finetune": 1}  # only the epoch that was left
    assert resumed["after"]["flops"] == first["after"]["flops"]  # same widths as the cut run ended with
    assert resumed["channels"] == first["channels"]  # against the unpruned widths: the one cut, not two
    assert resumed["threshold"] == first["threshold"]  # the cut's report, restored with the callback's state
    assert 0.0 <= resumed["test_map"] <= 1.0


def test_scope_all_cuts_the_whole_detector_but_its_answers(compose_cfg, tmp_path, single_thread):
    results = train(compose_cfg(*TINY_DETECTION, "prune.scope=all", "model.kind=fasterrcnn", "test=false",
                                "+model.detector_kwargs.rpn_post_nms_top_n_test=50"), tmp_path)
    assert results["scope"]["module"] == "model"
    assert results["after"]["flops"] < results["before"]["flops"] == results["before"]["detector_flops"]["total"]

    from slimnet.loops.lightning.checkpoint import load_checkpoint
    from slimnet.tasks.detection.task import DetectionTask

    reloaded = load_checkpoint(results["checkpoint"], DetectionTask).model
    predictor = reloaded.roi_heads.box_predictor
    assert predictor.cls_score.out_features == results["model_config"]["num_classes"] + 1
    assert reloaded.rpn.head.cls_logits.out_channels == reloaded.rpn.anchor_generator.num_anchors_per_location()[0]


def test_frozen_batchnorm_is_made_trainable_when_sparsity_is_on(compose_cfg, tmp_path, single_thread, caplog):
    """A detector built as torchvision's pretrained ones (FrozenBatchNorm2d) with sparsity on: the CLI
    converts its norms (and says so) instead of refusing, cuts, and the checkpoint reloads."""
    with caplog.at_level(logging.INFO, logger="slimnet.tasks.detection.plugin"):
        results = train(compose_cfg(*TINY_DETECTION, "model.norm=frozen", "test=false"), tmp_path)
    assert any("converted" in r.message and "FrozenBatchNorm2d" in r.message for r in caplog.records)
    assert results["model_config"]["norm"] == "batchnorm_eval"  # what rebuilds the converted detector
    assert results["after"]["flops"] < results["before"]["flops"]

    from slimnet.loops.lightning.checkpoint import load_checkpoint
    from slimnet.tasks.detection.task import DetectionTask

    reloaded = load_checkpoint(results["checkpoint"], DetectionTask)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in reloaded.modules())


def test_frozen_to_trainable_conversion_keeps_the_detectors_eval_outputs(single_thread):
    from test_detection_norms import _randomise_frozen

    from slimnet.tasks.detection.plugin import unfreeze_for_sparsity
    from slimnet.tasks.detection.models import build_detector

    config = {"kind": "retinanet", "backbone": "resnet18", "num_classes": 2, "min_size": 64, "max_size": 64,
              "fpn_channels": 64, "norm": "frozen"}
    torch.manual_seed(0)
    detector = build_detector(**config).eval()
    _randomise_frozen(detector)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = detector.backbone(x)
    new_config = unfreeze_for_sparsity(detector, config)
    norms = [m for m in detector.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.weight.requires_grad for m in norms)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in detector.modules())
    assert new_config == {**config, "norm": "batchnorm_eval"}
    detector.train()  # EvalModeBatchNorm2d: training mode still normalises with the loaded statistics
    with torch.no_grad():
        after = detector.backbone(x)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("override, message", [
    ("prune.scope=heads", "prune.scope"),
    ("model._target_=slimnet.tasks.detection.models.nope", "nope"),
    # the preflight: frozen norms and no sparsity to unfreeze them leave nothing to cut in the backbone
    ("model.norm=frozen sparsity.lam=0", "no channel group that can be cut"),
    ("finetune.distill=true", "finetune.distill is for classification"),
])
def test_detection_config_errors_come_before_training(compose_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(compose_cfg(*TINY_DETECTION, *override.split()), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_a_detection_sweep_report_plots_map_against_flops(compose_cfg, tmp_path, single_thread):
    from slimnet.run.sweep import report

    jobs = {}
    for job, percent in (("0", 0.2), ("1", 0.5)):  # a sweep's jobs share one sparse phase, as classification's
        jobs[job] = train(compose_cfg(*TINY_DETECTION, f"prune.percent={percent}", "prune.reuse_sparse=true",
                                      f"prune.cache_dir={tmp_path / 'cache'}"), tmp_path / job)
    assert not jobs["0"]["sparse_phase"]["reused"] and jobs["1"]["sparse_phase"]["reused"]
    assert jobs["1"]["sparse_phase"]["trained_by"] == str(tmp_path / "0")
    assert jobs["1"]["epochs_trained_here"]["sparse"] == 0  # the second job trained only its fine-tune
    csv_path, png_path = report(tmp_path)
    import csv

    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    assert len(rows) == 2 and all(r["test_map"] != "" and r["detector_flops"] != "" for r in rows)
    assert float(rows[1]["flops"]) < float(rows[0]["flops"])  # the larger cut, the fewer FLOPs
    assert png_path.stat().st_size > 0


def test_bad_coco_data_stops_the_cli_in_one_line_before_training(compose_cfg, tmp_path):
    from test_detection_data import write_coco

    train_split = write_coco(tmp_path / "train", boxes=[[5, 5, 10, 10], [55.0, 5.0, 20.0, 10.0], [5, 5, 10, 10]])
    val_split = write_coco(tmp_path / "val")
    overrides = [o for o in TINY_DETECTION if not o.startswith("data.") or o == "data.batch_size=4"]
    cfg = compose_cfg(*overrides, "data=coco", f"data.train_images={train_split[0]}",
                      f"data.train_annotations={train_split[1]}", f"data.val_images={val_split[0]}",
                      f"data.val_annotations={val_split[1]}", "data.num_workers=0", "data.image_size=64")
    with pytest.raises((ValueError, ConfigError), match="outside its image") as info:
        train(cfg, tmp_path / "run")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
