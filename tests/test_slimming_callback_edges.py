"""SlimmingCallback at the edges of a user's own fit (tests/_own_module.py): the user's schedule and
optimizer state go on across the cut, no training sample reaches a checkpoint, strategies that own
their parameters are refused before training, and the cut is said on the console."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

import slimnet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _own_module import CUT, EPOCHS, ShapesData, UserModule

TESTS = Path(__file__).resolve().parent


class _Schedule(UserModule):
    """The user's module with another epoch-wise schedule."""

    def __init__(self, schedule: str):
        super().__init__()
        self.schedule = schedule

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        if self.schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
        else:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class _Rates(pl.Callback):
    """The learning rate every epoch trained with, and the scheduler's own count at the end."""

    def __init__(self):
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:  # after the cut, which happens at the epoch's start
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module):
        self.last_epoch = trainer.lr_scheduler_configs[0].scheduler.last_epoch


def _fit(tmp_path, schedule: str, slimming: slimnet.SlimmingCallback | None, extra=()) -> _Rates:
    pl.seed_everything(0)
    rates = _Rates()
    callbacks = [rates, *extra] + ([slimming] if slimming is not None else [])
    trainer = pl.Trainer(max_epochs=EPOCHS, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(_Schedule(schedule), datamodule=ShapesData())
    return rates


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_the_users_schedule_goes_on_across_the_cut(tmp_path, schedule):
    uncut = _fit(tmp_path / "uncut", schedule, None)
    cut = _fit(tmp_path / "cut", schedule, slimnet.SlimmingCallback(epoch=CUT, percent=0.5, module="net"))
    assert cut.lrs == uncut.lrs  # every epoch trained at the rate it would have had without a cut
    assert cut.last_epoch == uncut.last_epoch == EPOCHS


def test_restart_schedule_starts_the_schedule_again_at_the_cut(tmp_path):
    cut = _fit(tmp_path, "step", slimnet.SlimmingCallback(epoch=CUT, percent=0.5, module="net", restart_schedule=True))
    lr = UserModule().hparams.lr
    assert cut.lrs[CUT] == lr  # back at the start of the StepLR curve
    assert cut.last_epoch == EPOCHS - CUT


class _Moments(pl.Callback):
    """Adam's first moment and step count of one cut conv, before and after the cut."""

    def __init__(self):
        self.seen = {}

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == CUT - 1:
            state = trainer.optimizers[0].state[pl_module.net.body[4].weight]
            self.seen["before"], self.seen["step"] = state["exp_avg"].clone(), float(state["step"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == CUT and batch_idx == 0:
            opt = trainer.optimizers[0]
            state = opt.state.get(pl_module.net.body[4].weight, {})
            self.seen["after"] = state["exp_avg"].clone() if "exp_avg" in state else None
            self.seen["step_after"] = float(state["step"]) if "step" in state else None
            self.seen["keep"] = pl_module.net.slimnet_plan.keep["body.4"]
            self.seen["held"] = {id(p) for g in opt.param_groups for p in g["params"]}
            self.seen["params"] = {id(p) for p in pl_module.parameters()}
            self.seen["stale"] = [p for p in opt.state if id(p) not in self.seen["params"]]


def test_optimizer_state_of_the_surviving_channels_is_kept_by_default(tmp_path):
    probe = _Moments()
    _fit(tmp_path, "step", slimnet.SlimmingCallback(epoch=CUT, percent=0.5, module="net"), [probe])
    seen = probe.seen
    out, inp = torch.tensor(seen["keep"]["out"]), torch.tensor(seen["keep"]["in"])
    torch.testing.assert_close(seen["after"], seen["before"][out][:, inp])
    assert seen["step_after"] == seen["step"]  # Adam's bias correction goes on, not back to step 1
    assert seen["held"] == seen["params"] and not seen["stale"]  # the cut parameters only, no old state


def test_carry_optimizer_state_false_starts_the_moments_afresh(tmp_path):
    probe = _Moments()
    _fit(tmp_path, "step", slimnet.SlimmingCallback(epoch=CUT, percent=0.5, module="net", carry_optimizer_state=False),
         [probe])
    assert probe.seen["held"] == probe.seen["params"]
    assert probe.seen["after"] is None and probe.seen["step_after"] is None


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_no_training_sample_is_written_to_any_checkpoint(tmp_path):
    every_epoch = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1,
                                               monitor=None)
    slim = slimnet.SlimmingCallback(epoch=CUT, percent=0.5, module="net", save_sparse=True)
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=EPOCHS, callbacks=[slim, every_epoch], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(UserModule(), datamodule=ShapesData())
    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(files) == EPOCHS + 1  # one per epoch, and sparse.ckpt
    for path in files:
        ckpt = torch.load(path, weights_only=True)
        state = ckpt["callbacks"][slim.state_key]
        assert "fold_inputs" not in state
        images = [t for t in _tensors(state) if t.dim() >= 3 and tuple(t.shape[-3:]) == (3, 16, 16)]
        assert not images, f"{path.name} holds input samples"
        cut_done = state["done"]
        # before the cut: only per-feature statistics, what folding needs; after it: nothing at all
        assert ("fold_stats" in state) == (not cut_done and path.name in ("sparse.ckpt", f"epoch={CUT - 1}.ckpt"))
        if "fold_stats" in state:
            assert all(t.dim() == 1 for t in _tensors(state["fold_stats"]))


def test_the_cut_from_recorded_statistics_equals_the_cut_from_a_resume_at_it(tmp_path):
    """A fit resumed from sparse.ckpt folds the same constants as the fit that wrote it."""
    slim = slimnet.SlimmingCallback(epoch=CUT, percent=0.5, module="net", save_sparse=True)
    pl.seed_everything(0)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=None)
    trainer = pl.Trainer(max_epochs=CUT + 1, callbacks=[slim, ckpt_cb],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))

    class Snap(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == CUT:
                self.state = {k: v.clone() for k, v in pl_module.net.state_dict().items()}

    first, second = Snap(), Snap()
    trainer.callbacks.append(first)
    trainer.fit(UserModule(), datamodule=ShapesData())
    resumed = slimnet.SlimmingCallback(epoch=CUT, percent=0.5, module="net")
    again = pl.Trainer(max_epochs=CUT + 1, callbacks=[resumed, second], logger=False, enable_progress_bar=False,
                       enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    again.fit(UserModule(), datamodule=ShapesData(), ckpt_path=str(tmp_path / "ckpt" / "sparse.ckpt"))
    assert slim.report["folded"] and resumed.report["folded"] == slim.report["folded"]
    assert first.state.keys() == second.state.keys()
    for key in first.state:
        torch.testing.assert_close(second.state[key], first.state[key], rtol=0, atol=0)


def test_a_strategy_that_owns_the_parameters_is_refused_before_training():
    from pytorch_lightning.strategies import FSDPStrategy

    slim = slimnet.SlimmingCallback(epoch=1, percent=0.5, module="net")
    with pytest.raises(ValueError, match="FSDPStrategy is not supported.*strategy='ddp'"):
        slim.setup(SimpleNamespace(strategy=FSDPStrategy()), UserModule(), "fit")


def test_the_cut_is_said_on_the_console_of_a_plain_script(tmp_path):
    run = subprocess.run([sys.executable, str(TESTS / "_own_module.py"), str(tmp_path), "-1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    said = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("surgery at epoch")]
    assert len(said) == 1 and f"epoch {CUT}" in said[0] and "FLOPs" in said[0]
