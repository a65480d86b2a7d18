"""Save and restore a model's train/eval mode and ``requires_grad`` flags around an operation."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def preserved_modes(model: nn.Module):
    """Restore each submodule's ``training`` flag on exit (by name, so it survives surgery)."""
    modes = {name: m.training for name, m in model.named_modules()}
    try:
        yield
    finally:
        for name, m in model.named_modules():
            if name in modes:
                m.training = modes[name]  # per-module: train() would recurse
