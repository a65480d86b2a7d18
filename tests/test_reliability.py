"""Faults a long run must survive: SIGKILL and resume, NaN loss, full disk, bad files, bad directories."""

from __future__ import annotations

import errno
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY

from slimnet.engine.artifact import load_pruned
from slimnet.run.config import ConfigError
from slimnet.run.pipeline import train

TESTS = Path(__file__).resolve().parent
AUGMENT = "data.augment=true"  # its draws from torch's generator must line up after a resume too


def _crash(run_dir: Path, epoch: int, batch: int, *overrides: str) -> int:
    proc = subprocess.run([sys.executable, str(TESTS / "_crash_run.py"), str(run_dir), str(epoch), str(batch),
                           *TINY, *overrides], cwd=TESTS, capture_output=True, text=True, timeout=300)
    return proc.returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, AUGMENT])
    GlobalHydra.instance().clear()
    return train(cfg, tmp_path_factory.mktemp("whole"))


# smoke: 6 epochs, surgery at the start of epoch 4. Killed in epoch 4, a run resumes at the cut (from the
# end of epoch 3), as every job reusing a shared sparse phase does.
@pytest.mark.parametrize("phase, epoch", [("sparse", 2), ("cut", 4), ("finetune", 5)])
def test_sigkill_then_resume_matches_an_uninterrupted_run(compose_cfg, tmp_path, uninterrupted, phase, epoch):
    assert _crash(tmp_path, epoch, 3, AUGMENT) == -9  # killed mid-epoch, after last.ckpt of the previous epoch
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == epoch - 1 and last["slimnet"]["phase"] == ("sparse" if epoch <= 4 else "finetune")
    resumed = train(compose_cfg(*TINY, AUGMENT, "ckpt_path=last"), tmp_path)
    assert resumed["channels"] == uninterrupted["channels"]  # the same architecture, cut once
    assert resumed["test_acc"] == uninterrupted["test_acc"]
    assert resumed["threshold"] == pytest.approx(uninterrupted["threshold"])
    a, b = (load_pruned(r["artifact"]).state_dict() for r in (resumed, uninterrupted))
    assert all(torch.equal(a[k], b[k]) for k in b)  # bit-identical weights, not just the same accuracy


def test_resume_shortcut_rebuilds_the_saved_config(tmp_path):
    from slimnet.run.pipeline import resumed_config

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 3\nckpt_path: null\nresume: null\n")
    cfg, run_dir = resumed_config(tmp_path)
    assert cfg.ckpt_path == "last" and cfg.seed == 3 and run_dir == tmp_path
    with pytest.raises(ConfigError, match="no .hydra/config.yaml"):
        resumed_config(tmp_path / "elsewhere")


class _PoisonAt(pl.Callback):
    """Turn one weight into NaN at the start of an epoch, as a diverging run would."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                next(pl_module.model.parameters()).fill_(float("nan"))


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(compose_cfg, tmp_path):
    with pytest.raises(FloatingPointError, match=r"epoch 2, step \d+"):
        train(compose_cfg(*TINY), tmp_path, extra_callbacks=[_PoisonAt(2)])
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_disk_full_while_checkpointing_leaves_the_previous_last_ckpt(compose_cfg, tmp_path, monkeypatch):
    import slimnet.engine.artifact as artifact

    real_save, calls = torch.save, {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(artifact.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train(compose_cfg(*TINY), tmp_path)
    monkeypatch.setattr(artifact.torch, "save", real_save)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1  # the previous one, whole
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_checkpoint_is_refused(compose_cfg, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, bad, pickle_module=pickle)
    with pytest.raises(ValueError, match="evil.ckpt"):
        train(compose_cfg(*TINY, f"ckpt_path={bad}"), tmp_path / "run")
    assert not marker.exists()


def test_truncated_checkpoint_gives_one_line_naming_the_file(compose_cfg, tmp_path):
    ckpt = tmp_path / "half.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:500])
    with pytest.raises(ValueError, match="half.ckpt") as info:
        train(compose_cfg(*TINY, f"ckpt_path={ckpt}"), tmp_path / "run")
    assert "\n" not in str(info.value)


def test_unwritable_output_directory_fails_before_training(compose_cfg, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="not writable"):
        train(compose_cfg(*TINY), blocker / "run")


def test_missing_checkpoint_path_is_a_config_error(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        train(compose_cfg(*TINY, f"ckpt_path={tmp_path / 'nope.ckpt'}"), tmp_path)


def test_checkpoints_carry_every_random_stream_seed_everything_seeds(tmp_path):
    import random

    import numpy as np

    from slimnet.tasks.classification.module import _rng_state, _set_rng_state

    def draws():
        return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist(), np.random.randn()

    np.random.randn()  # leaves a cached Gaussian in numpy's state
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = draws()
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # as every checkpoint is loaded
    assert draws() == expected
