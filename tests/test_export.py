"""Export of pruned models (``slimnet.export``): the file a user deploys computes what PyTorch computes.

Each test loads the exported file the way a deployment would (onnxruntime, ``torch.jit.load``,
``torch.export.load``) and compares it with the pruned PyTorch model independently of the check built
into the command, then pins the command's promises: exit 0 and the file beside the artifact; real test
images when the run's data is known; exit 1 with one line naming the file when the export is wrong;
exit 2 with a hint when the input size cannot be known.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import slimnet
from slimnet import export as export_cli  # python -m slimnet.export
from slimnet.deploy import export
from slimnet.models.build import build_model

CONFIG = {"arch": "vgg", "num_classes": 4, "in_channels": 3, "cfg": [8, "M", 16]}
DATA = {"name": "synthetic", "num_classes": 4, "in_channels": 3, "image_size": 16}
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx/onnxscript/onnxruntime not installed "
                                                     "(pip install 'slimnet[export]')")


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py


def _pruned_model() -> torch.nn.Module:
    """The tiny VGG with varied γ and running stats (a wrong weight mapping would show), cut by 30%."""
    torch.manual_seed(0)
    model = build_model(CONFIG)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.1, 1.0)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    report = slimnet.prune(model, torch.zeros(1, 3, 16, 16), percent=0.3)
    assert report["flops_after"] < report["flops_before"]
    return model.eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir as ``python -m slimnet.train`` leaves it today: pruned.pt, results.json, .hydra/."""
    path = tmp_path_factory.mktemp("run")
    slimnet.save_pruned(_pruned_model(), path / "pruned.pt")
    (path / "results.json").write_text(json.dumps({"model_config": CONFIG, "test_acc": 0.5}))
    (path / ".hydra").mkdir()
    data = "\n".join(f"  {k}: {v}" for k, v in DATA.items())
    (path / ".hydra" / "config.yaml").write_text(f"data:\n{data}\n  seed: ${{seed}}\nseed: 0\n")
    return path


@pytest.fixture
def bare_artifact(tmp_path):
    """An artifact with nothing beside it: no results.json, no Hydra config."""
    slimnet.save_pruned(_pruned_model(), tmp_path / "model.pt")
    return tmp_path / "model.pt"


def _inputs(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _reference(artifact) -> torch.Tensor:
    with torch.inference_mode():
        return slimnet.load_pruned(artifact).eval()(_inputs())


# --------------------------------------------------------------------------------------------------


@needs_onnx
def test_cli_exports_run_dir_to_onnx_that_onnxruntime_runs(run_dir):
    result = subprocess.run([sys.executable, "-m", "slimnet.export", str(run_dir), "format=onnx"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    onnx_file = run_dir / "pruned.onnx"
    assert onnx_file.is_file()
    assert "synthetic test images" in result.stdout and "OK" in result.stdout  # real data, from .hydra
    # Independently of the command's own check; batch 5 also proves the batch axis is dynamic.
    session = export.onnx_session(onnx_file)
    out = session.run(None, {session.get_inputs()[0].name: _inputs().numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), _reference(run_dir / "pruned.pt"), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_torch_formats_roundtrip(bare_artifact, fmt, capsys):
    assert export_cli.main([str(bare_artifact), f"format={fmt}", "input_size=16", "batch=4"]) == 0
    path = bare_artifact.with_name("model" + export.SUFFIXES[fmt])
    assert path.is_file()
    assert "4 random normal inputs" in capsys.readouterr().out  # no data known: says so
    with torch.inference_mode():
        out = export.load_exported(path, fmt)(_inputs())
    torch.testing.assert_close(out, _reference(bare_artifact), atol=1e-5, rtol=1e-4)


def test_results_json_keys_give_shape_and_data(bare_artifact, tmp_path):
    """The keys asked of results.json: ``input_shape`` ([C, H, W]) and ``data`` (the run's data config)."""
    (tmp_path / "results.json").write_text(json.dumps({"input_shape": [3, 16, 16], "data": DATA}))
    report = export.export_artifact(bare_artifact, format="torchscript", out=tmp_path / "m.ts", batch=6)
    assert report.passed and report.inputs == "6 synthetic test images"
    (tmp_path / "results.json").write_text(json.dumps({"input_shape": [3, 16, 16]}))
    report = export.export_artifact(bare_artifact, format="torchscript", out=tmp_path / "m.ts", batch=6)
    assert report.passed and report.inputs.startswith("6 random normal inputs")


def test_wrong_export_fails_loudly(bare_artifact, monkeypatch, capsys):
    """An exporter that changes the function (here: perturbs a weight on its way out) is caught."""
    real = export.EXPORTERS["torchscript"]

    def perturbing(model, example, path, opset=None):
        model = copy.deepcopy(model)
        with torch.no_grad():
            next(model.parameters()).add_(0.05)
        return real(model, example, path, opset)

    monkeypatch.setitem(export.EXPORTERS, "torchscript", perturbing)
    assert export_cli.main([str(bare_artifact), "format=torchscript", "input_size=16"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "FAILED" in err and "tolerance" in err
    assert str(bare_artifact.with_name("model.torchscript.pt")) in err  # names the file not to deploy


def test_unknown_input_size_is_a_usage_error_with_hint(bare_artifact, capsys):
    assert export_cli.main([str(bare_artifact), "format=torchscript"]) == 2
    assert "input_size=" in capsys.readouterr().err


def test_missing_artifact_and_bad_flags(tmp_path, capsys):
    assert export_cli.main([str(tmp_path)]) == 2
    assert "pruned.pt: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main([str(tmp_path), "fromat=onnx"])
    assert exit_info.value.code == 2
    assert "format" in capsys.readouterr().err  # lists the valid keys
