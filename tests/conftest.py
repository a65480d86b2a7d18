"""Shared fixtures: the real Hydra config, composed and shrunk for tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny ops: with another process busy on the 2 cores, torch's
    thread pool spends most of its time waiting (50x slower here). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compose_cfg():
    """``compose_cfg(*overrides)`` -> the same DictConfig ``python -m slimnet.train`` would get."""

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


# Overrides that turn any run into a seconds-long one on synthetic data.
TINY = [
    "experiment=smoke",
    "callbacks.progress_bar=false",
    "logger=none",
    "prune.reuse_sparse=false",  # tests that share a sparse phase say so, with their own cache dir
    "latency.repeats=3",  # the measurement still runs (it is part of the report), just briefly
]
