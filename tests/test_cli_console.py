"""What a user sees on the command line: one-line errors (the traceback only with debug=true), no
folder left by a run that failed before training, the resume command on Ctrl-C, a resumed run logging
into its own folder, and no third-party noise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from conftest import TINY

from slimnet.run.interrupt import ResumeHint
from slimnet.run.pipeline import train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["experiment=smoke", "logger=none", "latency.enabled=false", "prune.reuse_sparse=false",
        "trainer.max_epochs=2", "prune.epoch=1"]


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "slimnet.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_config_error_is_one_line_and_leaves_no_folder(tmp_path):
    run_dir = tmp_path / "day" / "run"
    out = _cli("prune.epoch=500", f"hydra.run.dir={run_dir}")
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == 1
    assert lines == ["error: prune.epoch=500 must be < trainer.max_epochs=16, or the model is never cut; "
                     "lower prune.epoch or raise trainer.max_epochs"]
    assert not run_dir.exists() and not run_dir.parent.exists()  # neither the run's nor the day's folder


@pytest.mark.parametrize("args, named", [
    (["model=resnet99"], ["model=resnet99", "did you mean model=resnet56?", "vgg_small", "model=custom"]),
    (["-m", "experiment=smoke,smok"], ["experiment=smok", "did you mean experiment=smoke?", "vgg19_cifar10"]),
])
def test_an_unknown_config_is_one_line_listing_the_choices(tmp_path, args, named):
    out = _cli(*args, cwd=tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # not Hydra's 19 lines
    assert out.stderr.startswith("error: ") and all(text in out.stderr for text in named), out.stderr
    assert not (tmp_path / "outputs").exists()  # refused before Hydra made a run folder


def test_known_configs_pass_the_check_to_hydra(tmp_path):
    out = _cli("model=vgg", "hydra/launcher=local_parallel", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "_target_: slimnet.models.vgg.vgg\n" in out.stdout


def test_debug_shows_the_traceback(tmp_path):
    out = _cli("prune.epoch=500", "debug=true", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "ConfigError" in out.stderr


def test_a_run_prints_progress_and_results_without_third_party_noise(tmp_path):
    run_dir = tmp_path / "run"
    out = _cli(*FAST, f"hydra.run.dir={run_dir}")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-2000:]
    for noise in ("Tip:", "LeafSpec", "GPU available", "log_every_n_steps", "Seed set", "Validation DataLoader"):
        assert noise not in text, noise
    assert "epoch 2/2" in text and "surgery at epoch 1" in text  # an epoch line per epoch (not a terminal)
    assert f"results in {run_dir}" in text
    # the resumed run logs on in its own folder; the folder Hydra made for the resume command goes
    fresh = tmp_path / "resume-fresh"
    before = (run_dir / "train.log").read_text()
    out = _cli(f"resume={run_dir}", f"hydra.run.dir={fresh}")
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]
    assert not fresh.exists()
    assert len((run_dir / "train.log").read_text()) > len(before)


class _CtrlC(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt


def test_ctrl_c_says_the_resume_command(compose_cfg, tmp_path, caplog, single_thread):
    cfg = compose_cfg(*TINY, "trainer.max_epochs=3", "prune.epoch=2")
    try:
        with pytest.raises(SystemExit), caplog.at_level("WARNING", logger="slimnet"):
            train(cfg, tmp_path, extra_callbacks=[ResumeHint(tmp_path), _CtrlC()])
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C after one
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()  # epoch 0 finished and was saved
    assert f"python -m slimnet.train resume={os.path.relpath(tmp_path)}" in caplog.text \
        or f"python -m slimnet.train resume={tmp_path}" in caplog.text


def test_ctrl_c_before_any_checkpoint_says_nothing_was_saved(compose_cfg, tmp_path, caplog, single_thread):
    class CtrlCAtOnce(pl.Callback):
        def on_train_batch_start(self, *args):
            raise KeyboardInterrupt

    cfg = compose_cfg(*TINY, "trainer.max_epochs=3", "prune.epoch=2")
    try:
        with pytest.raises(SystemExit), caplog.at_level("WARNING", logger="slimnet"):
            train(cfg, tmp_path, extra_callbacks=[ResumeHint(tmp_path), CtrlCAtOnce()])
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert "nothing was saved to resume from" in caplog.text


def test_a_folder_named_slimnet_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    (tmp_path / "slimnet").mkdir()  # e.g. the clone itself, seen from its parent folder
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([sys.executable, "-c", "import slimnet; print(slimnet.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip("slimnet is not installed (pip install -e . --config-settings editable_mode=compat)")
    assert found.stdout.strip().endswith("__init__.py"), "a namespace package shadows the installed slimnet"


def test_keep_false_drops_the_checkpoints_of_a_finished_run(compose_cfg, tmp_path, caplog, single_thread):
    with caplog.at_level("INFO"):
        train(compose_cfg(*TINY, "callbacks.checkpoint.keep=false"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    assert (tmp_path / "pruned.pt").is_file() and (tmp_path / "results.json").is_file()
    assert "checkpoints/" in caplog.text and "deleted" in caplog.text
