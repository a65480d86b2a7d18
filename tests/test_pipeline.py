"""The pipeline as a user runs it: the real CLI and ``train(cfg)`` on tiny synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY

import slimnet
from slimnet.data import SyntheticDataModule
from slimnet.engine.artifact import load_pruned
from slimnet.loops.lightning import SlimmingCallback, SparsityCallback
from slimnet.run.config import ConfigError
from slimnet.run.pipeline import train
from slimnet.tasks.classification.module import FINETUNE, SlimModule

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimnet.train", *overrides], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_plus_thresh_prunes_and_artifact_reloads(tmp_path):
    """`python -m slimnet.train +prune.thresh=…` exactly as a user types it (the `+` included)."""
    run_dir = tmp_path / "run"
    proc = _run_cli("experiment=smoke", "+prune.thresh=0.3", f"hydra.run.dir={run_dir}",
                    "callbacks.progress_bar=false", f"prune.cache_dir={tmp_path / 'cache'}", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["policy"] == "thresh" and results["threshold"] == pytest.approx(0.3)
    assert results["after"]["flops"] < results["before"]["flops"]
    assert results["after"]["params"] < results["before"]["params"]
    assert 0 <= results["test_acc"] <= 1 and 0 <= results["val_acc"] <= 1
    assert any(after < before for before, after in results["channels"].values())
    assert "wins over prune.percent" in proc.stderr + proc.stdout  # the log says which policy was used
    assert (run_dir / "tb").is_dir() and any((run_dir / "tb").rglob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    # The artifact rebuilds the pruned model with no training code and no model argument.
    model = load_pruned(run_dir / "pruned.pt").eval()
    widths = {n: a for n, (_, a) in results["channels"].items()}
    for name, module in model.named_modules():
        if name in widths:
            assert (getattr(module, "out_channels", None) or getattr(module, "num_features", None)
                    or getattr(module, "out_features", None)) == widths[name]
    flops_loaded = slimnet.count_flops(model, torch.zeros(1, 3, 16, 16))[0]
    assert flops_loaded == results["after"]["flops"]


@pytest.mark.parametrize("override", ["prune.thresh=0.3", "prune.percent=0.5"])
def test_plain_overrides_work_too(compose_cfg, tmp_path, override):
    cfg = compose_cfg(*TINY, override)
    results = train(cfg, tmp_path)
    assert results["policy"] == override.split("=")[0].split(".")[1]
    assert results["after"]["flops"] < results["before"]["flops"]
    assert results["input_shape"] == [3, 16, 16] and results["data"]["_target_"] == "slimnet.data.SyntheticDataModule"
    eager16 = next(r for r in results["latency"]["rows"] if r["backend"] == "eager" and r["batch"] == 16)
    assert eager16["a"]["median_ms"] > 0 and eager16["b"]["median_ms"] > 0
    assert results["latency"]["speedup"] == eager16["speedup"]
    assert (tmp_path / "results.json").is_file()


def test_artifact_matches_in_memory_model(compose_cfg, tmp_path):
    cfg = compose_cfg(*TINY)
    results = train(cfg, tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module = SlimModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu",
                                             weights_only=True).eval()
    assert state["slimnet"]["phase"] == FINETUNE
    loaded = load_pruned(results["artifact"]).eval()
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(loaded(x), module.model(x))


def test_unpruned_baseline_keeps_every_channel(compose_cfg, tmp_path):
    cfg = compose_cfg(*TINY, "prune.epoch=null", "sparsity.lam=0")
    results = train(cfg, tmp_path)
    assert results["after"] == results["before"]
    assert results["threshold"] is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("prune.thresh=-0.1", "prune.thresh"),
        ("prune.thresh=nan", "prune.thresh"),
        ("prune.percent=1.0", "prune.percent"),
        ("prune.percent=-0.2", "prune.percent"),
        ("prune.epoch=6", "trainer.max_epochs"),
        ("prune.epoch=-1", "prune.epoch"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 trains nothing"),  # blames max_epochs, not prune.epoch
        ("model._target_=slimnet.models.vgg.vgg9000", "vgg9000"),
        ("data._target_=slimnet.data.MNIST3D", "MNIST3D"),
        ("task._target_=slimnet.data.SyntheticDataModule", "not a slimnet.tasks.plugin.TaskPlugin"),
        ("+model.arch=vgg ~model._target_", "model.arch named it before slimnet 0.2"),
        ("prune.target_flops=1.5", "target_flops"),
        ("+prune.thresh=0.1 prune.target_flops=0.5", "both set"),
    ],
)
def test_bad_config_fails_before_training(compose_cfg, tmp_path, override, message):
    cfg = compose_cfg(*TINY, *override.split())
    with pytest.raises(ConfigError, match=message):
        train(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained


def test_model_without_batchnorm_is_refused_before_training(compose_cfg, tmp_path):
    cfg = compose_cfg(*TINY, "model=torchvision", "model.name=squeezenet1_0", "~model.cfg", "data.image_size=64")
    with pytest.raises(ConfigError, match="no BatchNorm"):
        train(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_model_too_deep_for_the_image_size_is_refused_before_training(compose_cfg, tmp_path):
    cfg = compose_cfg(*TINY, "model=torchvision", "model.name=squeezenet1_0", "~model.cfg")  # 16x16 images
    with pytest.raises(ConfigError, match="cannot run on inputs of shape"):
        train(cfg, tmp_path)


def test_missing_fashion_mnist_names_the_fix(compose_cfg, tmp_path):
    cfg = compose_cfg("data=fashion_mnist", f"data.root={tmp_path / 'nowhere'}", "logger=none")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        train(cfg, tmp_path)


class _OptimizerProbe(pl.Callback):
    """Right after surgery: does the optimizer hold exactly the model's parameters, and do they move?"""

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.same_params = None
        self.before = None
        self.changed = None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            self.same_params = in_optimizer == {id(p) for p in pl_module.model.parameters()}
            self.before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            self.changed = {n: not torch.equal(p, self.before[n]) for n, p in pl_module.model.named_parameters()}


def test_optimizer_after_surgery_holds_the_new_parameters_and_they_train():
    torch.manual_seed(0)
    dm = SyntheticDataModule(batch_size=32, augment=False)
    module = SlimModule(
        model_config={"arch": "vgg", "cfg": [8, "M", 16], "num_classes": dm.num_classes, "in_channels": 3},
        optim={"name": "sgd", "lr": 0.05, "schedule": "constant", "weight_decay": 0.0},
        finetune={"lr": 0.01, "schedule": "cosine"}, prune_epoch=1)
    sparsity = SparsityCallback(lam=0.05, until_epoch=1, module="model", gamma_init=0.5)
    slim = SlimmingCallback(epoch=1, module="model", example_input=dm.example_input(), module_input=True, percent=0.5,
                            restart_schedule=True, carry_optimizer_state=False)  # as the pipeline builds it
    probe = _OptimizerProbe(epoch=1)
    trainer = pl.Trainer(max_epochs=2, callbacks=[sparsity, slim, probe], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    assert slim.report["flops_after"] < slim.report["flops_before"]
    assert probe.same_params is True
    assert probe.changed and all(probe.changed.values()), probe.changed
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.01)  # fine-tune lr
    assert module.phase == FINETUNE


def test_l1_subgradient_is_added_once_per_optimizer_step():
    """With lr=1 and zero cross-entropy gradient on γ, γ moves by exactly λ·sign(γ) per step."""
    from slimnet.sparsity.step import add_l1_subgradient

    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -0.5, 0.2, -0.1]))
    bn.weight.grad = torch.zeros(4)
    add_l1_subgradient([bn.weight], 1e-2)
    torch.testing.assert_close(bn.weight.grad, torch.tensor([1e-2, -1e-2, 1e-2, -1e-2]))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)  # no grad: skipped, no error
    add_l1_subgradient([frozen], 1e-2)
    assert frozen.grad is None
