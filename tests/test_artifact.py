"""Pruned-model artifacts (``slimnet.engine.artifact``): data only, safe to load, never half-written.

A pruned model cannot be rebuilt from its architecture name alone (its widths changed), which is why
the artifact carries the plan next to the weights. These tests pin the promises of that format: a
roundtrip gives the same function, the file is plain ``weights_only`` data, anything else is refused
with a one-line error naming the file, and a failed save never destroys the previous file.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import slimnet.engine.artifact as artifact
from slimnet import prune
from slimnet.engine.artifact import atomic_save, load_pruned, save_pruned
from slimnet.models import create_model
from slimnet.models.build import build_model

ARTIFACT_KEYS = {"format", "state_dict", "plan", "model_config"}

# Registry configs: what a training run stores, enough for load_pruned(path) to rebuild the model.
CONFIGS = {
    "vgg": {"arch": "vgg", "num_classes": 10, "in_channels": 3, "cfg": [16, "M", 32, "M", 32]},
    "resnet": {"arch": "cifar_resnet", "num_classes": 10, "in_channels": 3, "depth": 8, "width": 8},
}


# --------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py


def _inputs() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _train_like_and_prune(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running stats and γ (so a wrong mapping of weights would show), then cut ~40%."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    model(torch.randn(4, 3, 32, 32, generator=gen))
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.weight.copy_(torch.rand(m.num_features, generator=gen))
            m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    model.eval()
    report = prune(model, _inputs(), percent=0.4)
    assert report["channels"], "the model should have been cut"
    return model


def _same_function(a: nn.Module, b: nn.Module) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(_inputs()), b(_inputs()))


def _tv_resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("torchvision", num_classes=10, in_channels=3, name="resnet18")


class Payload:
    """Would create ``marker`` when unpickled by a full (unsafe) unpickler."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


# --------------------------------------------------------------------------- roundtrips


@pytest.mark.parametrize("key", list(CONFIGS))
def test_registry_model_roundtrip_needs_no_model(key, tmp_path):
    model = _train_like_and_prune(build_model(CONFIGS[key]))
    path = tmp_path / "pruned.pt"
    save_pruned(model, path)

    loaded = load_pruned(path)  # rebuilt from the stored config alone

    assert type(loaded) is type(model)
    assert not any(m.training for m in loaded.modules())  # ready for inference, BN on running statistics
    assert loaded.slimnet_plan.keep == model.slimnet_plan.keep
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in model.parameters()]
    _same_function(loaded, model)


def test_torchvision_model_roundtrip_with_fresh_model(tmp_path):
    model = _train_like_and_prune(_tv_resnet18())
    path = tmp_path / "pruned.pt"
    save_pruned(model, path)

    loaded = load_pruned(path, model=_tv_resnet18(seed=1))  # differently initialised, unpruned

    assert loaded.fc.in_features == model.fc.in_features < 512
    _same_function(loaded, model)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_file_is_plain_weights_only_data(key, tmp_path):
    """Readable by torch.load(weights_only=True) with no slimnet code: tensors, strings, numbers."""
    model = _train_like_and_prune(build_model(CONFIGS[key]))
    path = tmp_path / "pruned.pt"
    save_pruned(model, path)

    data = torch.load(path, weights_only=True)

    assert set(data) == ARTIFACT_KEYS
    assert data["format"] == artifact.ARTIFACT_FORMAT
    assert isinstance(data["plan"], str) and json.loads(data["plan"])["keep"] == model.slimnet_plan.keep
    assert json.loads(data["model_config"]) == CONFIGS[key]
    assert all(isinstance(v, torch.Tensor) for v in data["state_dict"].values())
    assert data["state_dict"].keys() == model.state_dict().keys()


def test_artifact_without_config_asks_for_model(tmp_path):
    model = _train_like_and_prune(_tv_resnet18())  # create_model records no config; only build_model does
    path = tmp_path / "pruned.pt"
    save_pruned(model, path)
    assert torch.load(path, weights_only=True)["model_config"] == ""
    with pytest.raises(ValueError, match=r"model="):
        load_pruned(path)


def test_plan_for_another_architecture_is_refused(tmp_path):
    model = _train_like_and_prune(build_model(CONFIGS["vgg"]))
    path = tmp_path / "pruned.pt"
    save_pruned(model, path)
    with pytest.raises(ValueError, match="another architecture"):
        load_pruned(path, model=_tv_resnet18())


# --------------------------------------------------------------------------- unreadable files


def test_truncated_file_is_a_one_line_value_error_naming_the_file(tmp_path):
    model = _train_like_and_prune(build_model(CONFIGS["vgg"]))
    path = tmp_path / "pruned.pt"
    save_pruned(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # e.g. a copy interrupted mid-way

    with pytest.raises(ValueError) as info:
        load_pruned(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "pruned.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_pruned(path)


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_without_running(zipfile, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": artifact.ARTIFACT_FORMAT, "state_dict": Payload(marker)}, path,
               _use_new_zipfile_serialization=zipfile)

    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_pruned(path, model=nn.Linear(1, 1))
    assert not marker.exists()

    # The payload is live, proved without ever loading the file unsafely: the file holds its call
    # (torch stores pickles uncompressed) and that call creates the marker. So the test is not vacuous.
    raw = path.read_bytes()
    assert b"pathlib" in raw and b"touch" in raw
    call, args = Payload(marker).__reduce__()
    call(*args)
    assert marker.exists()


# --------------------------------------------------------------------------- atomic writes


def _failing_save(obj, f, *args, **kwargs):
    """torch.save that dies mid-write, as on a full disk."""
    f.write(b"PK\x03\x04 partial archive")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("via", ["atomic_save", "save_pruned"])
def test_failed_save_keeps_previous_file_and_leaves_no_temp(via, tmp_path, monkeypatch):
    model = _train_like_and_prune(build_model(CONFIGS["vgg"]))
    path = tmp_path / "pruned.pt"
    save_pruned(model, path)
    previous = path.read_bytes()

    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(OSError) as info:
        if via == "atomic_save":
            atomic_save({"anything": torch.zeros(3)}, path)
        else:
            save_pruned(model, path)
    assert info.value.errno == errno.ENOSPC  # the real cause reaches the caller
    monkeypatch.undo()

    assert path.read_bytes() == previous
    assert sorted(os.listdir(tmp_path)) == ["pruned.pt"]
    _same_function(load_pruned(path), model)  # and it still loads


def test_saved_file_has_normal_permissions(tmp_path):
    old_umask = os.umask(0o022)
    try:
        atomic_save({"x": torch.zeros(1)}, tmp_path / "a.pt")
        torch.save({"x": torch.zeros(1)}, tmp_path / "b.pt")
    finally:
        os.umask(old_umask)
    modes = {name: oct((tmp_path / name).stat().st_mode & 0o777) for name in ("a.pt", "b.pt")}
    assert modes == {"a.pt": "0o644", "b.pt": "0o644"}


def test_no_warnings_on_roundtrip(tmp_path):
    """torch.load's weights_only FutureWarning/UserWarnings would be noise in every user's log."""
    model = _train_like_and_prune(build_model(CONFIGS["resnet"]))
    path = tmp_path / "pruned.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_pruned(model, path)
        load_pruned(path)
