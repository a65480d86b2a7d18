"""``conf/experiment/``: every preset composes and validates, sets what it says (also keys of
train.yaml itself), and the paper presets carry Liu et al.'s settings and run end to end (tiny CIFAR)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR
from test_data import make_cifar10, make_cifar100, no_cifar_md5  # noqa: F401 (a fixture)

from slimnet.engine.measure import count_flops
from slimnet.models import create_model
from slimnet.run.config import validate
from slimnet.run.pipeline import train

EXPERIMENTS = sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml"))

# Liu et al. 2017 (ANCHORS.md): data set, model, λ, share of channels pruned, params and FLOPs of the
# unpruned model as the paper gives them (20.04M / 7.97e8 for VGG-19, 1.70M / 4.99e8 for ResNet-164).
PAPER = {
    "vgg19_cifar10": ("cifar10", "vgg19", 1e-4, 0.7, 20.04e6, 7.97e8),
    "vgg19_cifar100": ("cifar100", "vgg19", 1e-4, 0.5, None, 7.97e8),  # the paper gives no CIFAR-100 count
    "resnet164_cifar10": ("cifar10", "resnet164", 1e-5, 0.4, 1.70e6, 4.99e8),
}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(compose_cfg, name):
    validate(compose_cfg(f"experiment={name}"))


def test_an_experiment_overrides_keys_of_train_yaml_itself(compose_cfg):
    # train.yaml's own keys (finetune, latency, ...) come before the experiment in its defaults list:
    # with them after it, the paper presets silently fine-tuned at the default lr 0.02 cosine.
    assert compose_cfg().finetune.lr == 0.02
    cfg = compose_cfg("experiment=vgg19_cifar10")
    assert (cfg.finetune.lr, cfg.finetune.schedule) == (0.1, "multistep")
    assert compose_cfg("experiment=smoke").finetune.lr == 0.05
    assert compose_cfg("experiment=vgg19_cifar10", "finetune.lr=0.3").finetune.lr == 0.3  # the command line still wins


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_experiments_carry_the_papers_settings(compose_cfg, name):
    data, arch, lam, percent, params, flops = PAPER[name]
    cfg = compose_cfg(f"experiment={name}")
    classes = 10 if data == "cifar10" else 100
    assert (cfg.data._target_, cfg.data.num_classes, cfg.data.batch_size) == ("slimnet.data.CIFARDataModule", classes, 64)
    assert cfg.model._target_ == f"slimnet.models.{'vgg' if arch.startswith('vgg') else 'cifar_resnet'}.{arch}"
    assert (cfg.sparsity.lam, cfg.sparsity.gamma_init, cfg.prune.percent) == (lam, 0.5, percent)
    assert (cfg.prune.epoch, cfg.trainer.max_epochs) == (160, 320)  # 160 sparse + 160 fine-tune epochs
    o = cfg.optim
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.schedule, list(o.milestones), o.gamma) == (
        "sgd", 0.1, 0.9, 1e-4, "multistep", [0.5, 0.75], 0.1)
    assert (cfg.finetune.lr, cfg.finetune.schedule) == (0.1, "multistep")  # the schedule again, from 0.1
    kwargs = {k: v for k, v in cfg.model.items() if k != "_target_"}
    model = create_model(arch, num_classes=classes, in_channels=3, **kwargs).eval()
    got_flops, got_params = count_flops(model, torch.randn(1, 3, 32, 32))
    assert got_flops == pytest.approx(flops, rel=0.01)
    if params is not None:
        assert got_params == pytest.approx(params, rel=0.005)


@pytest.mark.parametrize("name", ["resnet164_cifar10", "vgg19_cifar100"])
def test_paper_experiment_runs_end_to_end_on_tiny_cifar(compose_cfg, tmp_path, no_cifar_md5, name):  # noqa: F811
    """The preset itself (model, data module, paper schedule, surgery of 164 layers with residual
    coupling) for one sparse and one fine-tune epoch of a few images."""
    (make_cifar100 if name.endswith("cifar100") else make_cifar10)(tmp_path)
    cfg = compose_cfg(
        f"experiment={name}", f"data.root={tmp_path}", "data.download=false", "data.val_size=10",
        "data.batch_size=10", "data.num_workers=0", "trainer.max_epochs=2", "prune.epoch=1",
        "trainer.limit_train_batches=1", "callbacks.progress_bar=false", "logger=none",
        "prune.reuse_sparse=false", "latency.enabled=false", "save_artifact=false")
    results = train(cfg, tmp_path / "run")
    assert results["policy"] == "percent" and results["data"]["num_classes"] == cfg.data.num_classes
    assert results["after"]["flops"] < results["before"]["flops"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["model_config"]["_target_"] == cfg.model._target_
    assert saved["model_config"]["num_classes"] == cfg.data.num_classes == (100 if name.endswith("cifar100") else 10)


@pytest.mark.parametrize("name", sorted(p.stem for p in Path(CONF_DIR, "model").glob("*.yaml")
                                        if p.stem not in ("custom", "detector", "detector_fasterrcnn")))
def test_every_model_config_is_a_target_hydra_instantiates(compose_cfg, name):
    """One config style: a model file names its builder by _target_, which Hydra's own instantiate calls."""
    from hydra.utils import instantiate
    from torch import nn

    cfg = compose_cfg(f"model={name}").model
    assert set(cfg) & {"arch", "name"} <= {"name"} and cfg._target_.startswith("slimnet.models.")
    if name in ("vgg19", "resnet164"):
        return  # built above at the paper's size
    assert isinstance(instantiate(cfg, num_classes=10, in_channels=3), nn.Module)


@pytest.mark.parametrize("name", sorted(p.stem for p in Path(CONF_DIR, "data").glob("*.yaml")))
def test_every_data_config_is_a_target(compose_cfg, name):
    from omegaconf import OmegaConf

    cfg = compose_cfg(f"data={name}").data
    assert "name" not in cfg and (OmegaConf.is_missing(cfg, "_target_") or cfg._target_.startswith("slimnet."))
