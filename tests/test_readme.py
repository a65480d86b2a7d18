"""The README's worked example of the two callbacks in a user's LightningModule runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tested: tests/test_readme.py runs this block -->"


def _block() -> str:
    text = README.read_text()
    assert MARKER in text, "the README lost its tested example"
    return re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.DOTALL)[1]


def test_readme_callback_example_cuts_a_users_module(tmp_path, capsys):
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the example's Trainer writes lightning_logs/ where it runs
    try:
        torch.manual_seed(0)
        scope: dict = {}
        exec(compile(_block(), str(README), "exec"), scope)
    finally:
        os.chdir(cwd)
    cut = scope["cut"]
    widths = [m.num_features for m in cut.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert sum(widths) == 24  # percent=0.5 of the 48 BatchNorm channels
    assert cut.net[-1].in_features == widths[-1]  # the classifier reads the cut channels
    assert cut(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert "Conv2d(3, " in capsys.readouterr().out
