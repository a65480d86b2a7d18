"""The two callbacks in a LightningModule that knows nothing of slimnet (tests/_own_module.py): dict
batches and loss, AdamW with a schedule, the cut at an epoch, resume after a SIGKILL, loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import slimnet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _own_module import CUT, EPOCHS, ShapesData, SlimmableUserModule, UserModule, fit  # noqa: E402

TESTS = Path(__file__).resolve().parent
X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))


class _Probe(pl.Callback):
    """What the optimizer holds right after the cut, and whether the cut weights then train."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == CUT and batch_idx == 0:
            opt = trainer.optimizers[0]
            self.optimizer_type = type(opt).__name__
            self.held = {id(p) for g in opt.param_groups for p in g["params"]}
            self.params = {id(p) for p in pl_module.parameters()}
            self.first_conv = pl_module.net.body[0].weight.detach().clone()


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole")
    probe = _Probe()
    module, trainer = fit(run_dir, [probe])
    return run_dir, module, trainer, probe


def _widths(module) -> list[int]:
    return [m.num_features for m in module.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_cut_happens_at_the_epoch_and_the_users_optimizer_holds_exactly_the_cut_parameters(whole):
    _, module, trainer, probe = whole
    slim = next(cb for cb in trainer.callbacks if isinstance(cb, slimnet.SlimmingCallback))
    assert slim.done and slim.report["flops_after"] < slim.report["flops_before"]
    assert sum(_widths(module)) == 16  # percent=0.5 of the 32 BatchNorm channels
    assert module.net.head.in_features == _widths(module)[-1]  # the consumer was cut with its producer
    assert probe.optimizer_type == "AdamW"  # the module's own configure_optimizers, re-run
    assert probe.held == probe.params  # exactly the cut parameters, none of the old ones
    assert not torch.equal(module.net.body[0].weight, probe.first_conv)  # and training went on


def test_sigkill_after_the_cut_resumes_to_the_same_widths_and_weights(whole, tmp_path):
    _, module, _, _ = whole
    crash = subprocess.run([sys.executable, str(TESTS / "_own_module.py"), str(tmp_path), str(CUT + 1)],
                           cwd=TESTS, capture_output=True, text=True, timeout=300)
    assert crash.returncode == -9, crash.stderr[-2000:]  # a real crash, after the cut's epoch was saved
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == CUT
    resumed, _ = fit(tmp_path, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert _widths(resumed) == _widths(module)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), module.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_load_checkpoint_rebuilds_the_cut_module(whole):
    run_dir, module, _, _ = whole
    loaded = slimnet.load_checkpoint(run_dir / "checkpoints" / "last.ckpt", UserModule)
    assert not loaded.training and _widths(loaded) == _widths(module)
    torch.testing.assert_close(loaded(X), module.eval()(X))


def test_lightnings_own_loader_needs_the_mixin(whole):
    run_dir, module, _, _ = whole
    path = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(RuntimeError, match="size mismatch"):  # Lightning cannot know of the cut ...
        UserModule.load_from_checkpoint(path, weights_only=True)
    loaded = SlimmableUserModule.load_from_checkpoint(path, weights_only=True).eval()  # ... with it, it does
    torch.testing.assert_close(loaded(X), module.eval()(X))


def test_a_module_without_example_input_array_is_told_what_to_add(tmp_path):
    class NoExample(UserModule):
        def __init__(self):
            super().__init__()
            self.example_input_array = None

    trainer = pl.Trainer(max_epochs=2, callbacks=[slimnet.SlimmingCallback(epoch=1, percent=0.5, module="net")],
                         logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="example_input_array"):
        trainer.fit(NoExample(), datamodule=ShapesData())


def test_an_unknown_sub_module_is_named_before_training(tmp_path):
    trainer = pl.Trainer(max_epochs=2, callbacks=[slimnet.SlimmingCallback(epoch=1, percent=0.5, module="backbone")],
                         logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no sub-module 'backbone'.*net"):
        trainer.fit(UserModule(), datamodule=ShapesData())
    assert trainer.global_step == 0


def test_carry_optimizer_state_keeps_the_surviving_channels_moments(tmp_path):
    seen = {}

    class Before(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == CUT - 1:
                opt = trainer.optimizers[0]
                seen["exp_avg"] = opt.state[pl_module.net.body[4].weight]["exp_avg"].clone()

    class After(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == CUT:
                seen["after"] = trainer.optimizers[0].state[pl_module.net.body[4].weight]["exp_avg"].clone()
                seen["keep"] = pl_module.net.slimnet_plan.keep["body.4"]

    pl.seed_everything(0)
    slim = slimnet.SlimmingCallback(epoch=CUT, percent=0.5, module="net", carry_optimizer_state=True)
    trainer = pl.Trainer(max_epochs=CUT + 1, callbacks=[slimnet.SparsityCallback(lam=5e-2, until_epoch=CUT), Before(),
                                                        slim, After()], logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(UserModule(), datamodule=ShapesData())
    out, inp = torch.tensor(seen["keep"]["out"]), torch.tensor(seen["keep"]["in"])
    torch.testing.assert_close(seen["after"], seen["exp_avg"][out][:, inp])
