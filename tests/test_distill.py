"""Distillation from the uncut model during the fine-tune: the loss is the formula, the teacher is a
frozen copy taken at the cut and never updated, a resumed fine-tune restores it from the sparse
checkpoint (not from a copy in every checkpoint), and a config without a cut says so in one line."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY

import slimnet
from slimnet.core.distill import Distillation, distillation_loss
from slimnet.errors import ConfigError
from slimnet.run.pipeline import train

DISTIL = [*TINY, "finetune.distill=true", "latency.enabled=false"]


def test_the_loss_is_the_formula_on_a_handful_of_logits():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.5, 4.0]])
    t = 3.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):  # Σ p_t log(p_t / p_s), by hand
        zs, zt = sum(math.exp(v / t) for v in s_row), sum(math.exp(v / t) for v in t_row)
        ps, pt = [math.exp(v / t) / zs for v in s_row], [math.exp(v / t) / zt for v in t_row]
        expected += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    expected *= t * t / len(student)
    assert distillation_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)

    distil = Distillation(temperature=t, weight=0.25)
    distil.teacher = torch.nn.Identity()  # a teacher whose "logits" are its input
    hard = torch.tensor(0.7)
    mixed = distil.loss(student, teacher, hard)
    assert mixed.item() == pytest.approx(0.75 * 0.7 + 0.25 * expected, rel=1e-6)
    assert Distillation().loss(student, teacher, hard) is hard  # no teacher yet: the hard loss alone


@pytest.mark.parametrize("kwargs, message", [({"temperature": 0}, "temperature"), ({"weight": 1.5}, "weight")])
def test_bad_distillation_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Distillation(**kwargs)


class _Probe(pl.Callback):
    """What the fine-tune's teacher is at its first and last fine-tune epoch."""

    def __init__(self):
        self.first = self.last = None

    def _look(self, pl_module):
        distil = getattr(pl_module, "slimnet_distillation", None)
        if distil is None or not distil.ready:
            return None
        t = distil.teacher
        return {"state": {k: v.clone() for k, v in t.state_dict().items()}, "training": t.training,
                "grad": any(p.requires_grad for p in t.parameters()),
                "in_module": any(m is t for m in pl_module.modules())}

    def on_train_epoch_start(self, trainer, pl_module):
        seen = self._look(pl_module)
        if seen is not None and self.first is None:
            self.first = seen

    def on_train_end(self, trainer, pl_module):
        self.last = self._look(pl_module)


class _StopAt(pl.Callback):
    """A run that dies as epoch ``epoch`` starts (the checkpoints of the epochs before it written)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"stopped at epoch {self.epoch}")


def _sparse_weights(run_dir) -> dict:
    state = torch.load(run_dir / "checkpoints" / "sparse.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def test_the_teacher_is_the_uncut_model_frozen_and_never_updated(compose_cfg, tmp_path, single_thread):
    probe = _Probe()
    results = train(compose_cfg(*DISTIL), tmp_path, extra_callbacks=[probe])
    assert results["after"]["flops"] < results["before"]["flops"]
    first, last = probe.first, probe.last
    assert first is not None and last is not None
    assert not last["training"] and not last["grad"] and not last["in_module"]
    for key, value in first["state"].items():  # unchanged by a whole fine-tune
        assert torch.equal(last["state"][key], value), key
    sparse = _sparse_weights(tmp_path)  # ... and exactly the model at the end of the sparse phase
    assert set(sparse) == set(first["state"]) and all(torch.equal(first["state"][k], sparse[k]) for k in sparse)
    cut = slimnet.load_pruned(results["artifact"]).state_dict()
    assert any(cut[k].shape != sparse[k].shape for k in cut)  # the student was cut, the teacher was not


def test_a_resumed_fine_tune_restores_the_teacher_from_the_sparse_checkpoint(compose_cfg, tmp_path, single_thread):
    whole = train(compose_cfg(*DISTIL), tmp_path / "whole")  # 6 epochs: cut at 4
    with pytest.raises(RuntimeError, match="stopped"):  # stopped after the first fine-tune epoch
        train(compose_cfg(*DISTIL), tmp_path / "part", extra_callbacks=[_StopAt(5)])
    last = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(k.startswith("model.") for k in last["state_dict"])  # no teacher in the checkpoint
    assert len(last["state_dict"]) == len(slimnet.load_pruned(whole["artifact"]).state_dict())
    probe = _Probe()
    resumed = train(compose_cfg(*DISTIL, "ckpt_path=last"), tmp_path / "part", extra_callbacks=[probe])
    assert probe.first is not None, "the resumed fine-tune had no teacher"
    sparse = _sparse_weights(tmp_path / "part")
    assert all(torch.equal(probe.first["state"][k], v) for k, v in sparse.items())
    a, b = (slimnet.load_pruned(r["artifact"]).state_dict() for r in (resumed, whole))
    assert all(torch.equal(a[k], b[k]) for k in b)  # as if never interrupted


def test_a_missing_sparse_checkpoint_stops_a_distilled_resume_in_one_line(compose_cfg, tmp_path, single_thread):
    with pytest.raises(RuntimeError, match="stopped"):
        train(compose_cfg(*DISTIL), tmp_path, extra_callbacks=[_StopAt(5)])
    (tmp_path / "checkpoints" / "sparse.ckpt").unlink()
    with pytest.raises(ValueError, match="teacher's weights were in .*sparse.ckpt, which is gone") as info:
        train(compose_cfg(*DISTIL, "ckpt_path=last"), tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, message", [
    (["prune.epoch=null"], "finetune.distill=true needs a cut"),
    (["finetune.distill_weight=2"], "finetune.distill_weight"),
])
def test_distillation_config_errors_come_before_training(compose_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        train(compose_cfg(*DISTIL, *overrides), tmp_path)
    assert "\n" not in str(info.value) and not (tmp_path / "checkpoints").exists()


def test_the_callback_needs_the_network_the_teacher_copies():
    with pytest.raises(ValueError, match="module="):
        slimnet.SlimmingCallback(epoch=1, percent=0.5, distill=True)


def test_a_users_module_distils_with_one_line(tmp_path, single_thread):
    """Your own LightningModule: ``SlimmingCallback(distill=True)`` and ``slimnet.distilled`` in the step."""

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
            self.example_input_array = torch.zeros(1, 3, 8, 8)
            self.soft = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            logits = self.net(x)
            hard = torch.nn.functional.cross_entropy(logits, y)
            loss = slimnet.distilled(self, x, logits, hard)
            self.soft.append(loss is not hard)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g))
    module = Net()
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[slimnet.SlimmingCallback(epoch=2, percent=0.5, module="net", distill=True)])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert module.soft == [False] * 8 + [True] * 4  # the teacher's term from the cut on, not before
