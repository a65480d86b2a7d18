"""Your model and your data through the command line (``_target_``), the artifact reloaded in a fresh
process, and the typo catalogue: misspelt keys fail in one line before any training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TINY

from slimnet.run.config import ConfigError
from slimnet.run.pipeline import train

NETS = '''
from torch import nn


class TinyCNN(nn.Module):
    """A user's network: takes num_classes, not in_channels (it assumes RGB)."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def headless(width: int = 8):
    """A builder taking no num_classes at all: the classes come from its output."""
    return TinyCNN(width, num_classes=3)
'''

DATA = '''
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class MyDataModule(pl.LightningDataModule):
    """A user's data module: its tensors in root/data.pt; says nothing about classes unless asked to."""

    def __init__(self, root: str, batch_size: int = 16, say_classes: bool = True):
        super().__init__()
        self.root, self.batch_size = root, batch_size
        if say_classes:
            self.num_classes = 3

    def setup(self, stage=None):
        data = torch.load(f"{self.root}/data.pt", weights_only=True)
        n = len(data["y"])
        self.train_set = TensorDataset(data["x"][: n // 2], data["y"][: n // 2])
        self.val_set = TensorDataset(data["x"][n // 2:], data["y"][n // 2:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self):
        return self.val_dataloader()
'''

SHORT = ["trainer.max_epochs=3", "prune.epoch=2", "sparsity.lam=2e-2", "prune.percent=0.5", "prune.min_channels=1",
         "logger=none", "callbacks.progress_bar=false", "latency.repeats=3", "prune.reuse_sparse=false"]


@pytest.fixture(scope="module")
def user_project(tmp_path_factory):
    """A folder with a package ``userpkg`` (a network and a data module) and its data, as a user has."""
    import torch

    root = tmp_path_factory.mktemp("project")
    (root / "userpkg").mkdir()
    (root / "userpkg" / "__init__.py").write_text("")
    (root / "userpkg" / "nets.py").write_text(textwrap.dedent(NETS))
    (root / "userpkg" / "data.py").write_text(textwrap.dedent(DATA))
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (96,), generator=g)
    x = torch.randn(96, 3, 16, 16, generator=g) * 0.3 + y.view(-1, 1, 1, 1).float()
    torch.save({"x": x, "y": y}, root / "data.pt")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def _custom(root: Path, *extra: str) -> list[str]:
    return ["model=custom", "model._target_=userpkg.nets.TinyCNN", "+model.width=8", "data=custom",
            "data._target_=userpkg.data.MyDataModule", f"+data.root={root}", *SHORT, *extra]


def test_cli_trains_and_cuts_your_model_on_your_data_and_the_artifact_reloads_elsewhere(user_project, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"),) if p)}
    proc = subprocess.run([sys.executable, "-m", "slimnet.train", *_custom(user_project), f"hydra.run.dir={run_dir}"],
                          cwd=user_project, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["model_config"] == {"_target_": "userpkg.nets.TinyCNN", "width": 8, "num_classes": 3}
    assert results["after"]["flops"] < results["before"]["flops"]

    load = ("import slimnet, torch; m = slimnet.load_pruned(r'{}').eval(); "
            "print(tuple(m(torch.zeros(2, 3, 16, 16)).shape), m.features[0].out_channels)").format(run_dir / "pruned.pt")
    here = subprocess.run([sys.executable, "-c", load], cwd=user_project, capture_output=True, text=True, timeout=120)
    assert here.returncode == 0, here.stderr[-2000:]
    shape, width = here.stdout.split(")")[0] + ")", int(here.stdout.split(")")[1])
    assert shape == "(2, 3)" and width == results["channels"]["features.0"][1] < 8

    elsewhere = subprocess.run([sys.executable, "-c", load], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert elsewhere.returncode != 0
    last = elsewhere.stderr.strip().splitlines()[-1]
    assert "userpkg.nets.TinyCNN" in last and "PYTHONPATH" in last and "load_pruned(path, model=" in last


def test_a_builder_without_num_classes_gets_them_from_its_output(user_project, tmp_path, compose_cfg):
    cfg = compose_cfg(*_custom(user_project, "model._target_=userpkg.nets.headless", "+data.say_classes=false"))
    results = train(cfg, tmp_path)
    assert results["model_config"] == {"_target_": "userpkg.nets.headless", "width": 8}
    assert results["test_acc"] is not None


def test_a_data_module_that_does_not_say_its_classes_is_told_what_to_add(user_project, tmp_path, compose_cfg):
    cfg = compose_cfg("model=vgg", "model.cfg=[4]", "data=custom", "data._target_=userpkg.data.MyDataModule",
                      f"+data.root={user_project}", "+data.say_classes=false", *SHORT)
    with pytest.raises(ConfigError, match="num_classes attribute"):
        train(cfg, tmp_path)


@pytest.mark.parametrize("override, message", [
    ("+prune.tresh=0.2", r"prune.tresh is not a setting \(did you mean prune.thresh\?\)"),
    ("+sparsity.lamda=1e-3", r"did you mean sparsity.lam\?"),
    ("+finetune.lrr=0.1", r"did you mean finetune.lr\?"),
    ("+optim.momentun=0.9", r"did you mean optim.momentum\?"),
    ("+trainer.max_epoch=3", r"did you mean trainer.max_epochs\?"),
    ("+model.depht=3", r"model.depht is not a setting"),
    ("+data.batchsize=8", r"did you mean data.batch_size\?"),
    ("+latency.repeat=3", r"did you mean latency.repeats\?"),
    ("+sed=1", r"did you mean seed\?"),
])
def test_misspelt_keys_fail_in_one_line_before_training(compose_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as err:
        train(compose_cfg(*TINY, override), tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "checkpoints").exists()


def test_misspelt_custom_model_argument_is_named(user_project, compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean model.width\?"):
        train(compose_cfg(*_custom(user_project, "+model.widht=4")), tmp_path)


def test_a_typo_on_the_command_line_prints_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "slimnet.train", *TINY, "+prune.tresh=0.2",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "prune.tresh" in lines[0] and "did you mean prune.thresh" in lines[0], lines


def test_only_the_policy_used_is_recorded(compose_cfg, tmp_path):
    results = train(compose_cfg(*TINY, "+prune.thresh=0.3"), tmp_path)
    assert results["policy"] == "thresh" and results["prune"]["thresh"] == 0.3
    assert "percent" not in results["prune"] and "target_flops" not in results["prune"]


@pytest.mark.parametrize("group", ["model", "data"])
def test_custom_without_a_target_says_what_to_set(compose_cfg, tmp_path, group):
    with pytest.raises(ConfigError, match=rf"{group}=custom needs {group}._target_="):
        train(compose_cfg(f"{group}=custom", *SHORT), tmp_path)


def test_the_run_says_what_the_cut_can_reach_before_training(compose_cfg, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="slimnet"):
        results = train(compose_cfg(*TINY), tmp_path)
    reach = results["reach"]
    assert reach["bn_channels"] == 1.0 and 0.9 < reach["flops"] <= 1.0 and reach["frozen"] == []  # a plain VGG
    first_epoch = next(i for i, r in enumerate(caplog.records) if "surgery at epoch" in r.getMessage())
    said = [i for i, r in enumerate(caplog.records) if "surgery can reach 100%" in r.getMessage()]
    assert said and said[0] < first_epoch  # said before any training, not after the sparse phase
