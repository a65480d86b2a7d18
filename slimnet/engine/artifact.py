"""Save and load pruned models as data, never as pickled modules.

An artifact is one ``torch.save`` file holding only tensors, strings and numbers, so
``torch.load(weights_only=True)`` reads it:

- ``state_dict``: the pruned weights;
- ``plan``: the ``PrunePlan`` as JSON (kept indices per module axis, in the original numbering);
- ``model_config``: JSON of the call that builds the *unpruned* model (a registry ``arch`` or a user's
  ``_target_`` with its arguments), when known.

Loading builds the unpruned model (from the config, or the one the caller passes), replays the plan to
get the pruned shapes, then loads the weights: the plan and the weights always travel together.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from slimnet.engine.atomic import atomic_write
from slimnet.engine.plan import PrunePlan
from slimnet.engine.surgery import replay_plan
from slimnet.errors import UnreadableFileError, first_line

ARTIFACT_FORMAT = "slimnet-pruned/1"


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` that leaves the previous file intact if it fails (temporary file + rename)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def safe_load(path: str | os.PathLike, map_location="cpu"):
    """``torch.load(weights_only=True)`` with a one-line error naming the file when it is unreadable."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as err:  # truncated zip, foreign pickle, refused global: all mean "not ours"
        raise UnreadableFileError(f"{path}: not a loadable slimnet/PyTorch file ({first_line(err)})") from None


def save_pruned(model: nn.Module, path: str | os.PathLike, model_config: dict | None = None) -> None:
    """Write ``model``'s weights with the plan it was cut by (and how to build it) to ``path``."""
    plan = getattr(model, "slimnet_plan", None) or PrunePlan()
    config = model_config if model_config is not None else getattr(model, "slimnet_config", None)
    atomic_save(
        {
            "format": ARTIFACT_FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "plan": plan.to_json(),
            "model_config": json.dumps(config) if config is not None else "",
        },
        path,
    )


def load_pruned(path: str | os.PathLike, model: nn.Module | None = None, map_location="cpu") -> nn.Module:
    """Rebuild a pruned model from an artifact written by ``save_pruned``, in eval mode.

    Args:
        path: the artifact.
        model: a freshly built *unpruned* model of the same architecture; needed when the artifact
            carries no model config (a model not built by slimnet's registry).
    """
    data = safe_load(path, map_location=map_location)
    if not isinstance(data, dict) or data.get("format") != ARTIFACT_FORMAT:
        raise UnreadableFileError(f"{path}: not a slimnet pruned-model artifact (expected format {ARTIFACT_FORMAT})")
    plan = PrunePlan.from_json(data["plan"])
    if model is None:
        if not data["model_config"]:
            raise ValueError(f"{path}: this artifact has no model config; "
                             "call load_pruned(path, model=<a freshly built unpruned model>)")
        from slimnet.locate import TargetImportError
        from slimnet.models.build import build_model  # the registry or the user's callable, no training code

        config = json.loads(data["model_config"])
        try:
            model = build_model(config)
        except TargetImportError as err:
            raise TargetImportError(f"{path}: the model was built by {config.get('_target_')}, {err}; or call "
                                    "load_pruned(path, model=<a freshly built unpruned model>)") from None
    replay_plan(model, plan)
    model.load_state_dict(data["state_dict"])
    return model.eval()  # ready for inference, as load_checkpoint; call .train() to fine-tune it further
