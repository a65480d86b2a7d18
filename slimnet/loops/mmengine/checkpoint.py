"""Cut mmengine checkpoints: the plan rides in ``checkpoint["meta"]["slimnet"]``, and a freshly built
model is cut to it before the weights load.

Inside a ``Runner`` the ``SlimnetSlimmingHook`` does this in ``after_load_checkpoint`` (which mmengine
calls before it loads the state dict), so ``resume=True``, ``load_from=`` and mmdet's ``tools/test.py``
open a cut checkpoint as long as the config keeps the hook. Outside a runner (mmdet's ``init_detector``,
``DetInferencer``, a script) use ``load_checkpoint(model, path)`` instead of mmengine's.
"""

from __future__ import annotations

from mmengine.runner.checkpoint import _load_checkpoint, _load_checkpoint_to_model
from torch import nn

from slimnet.core import Slimming
from slimnet.core.slimming import PLAN_KEY
from slimnet.engine.optim_state import ParamSnapshot, retarget_optimizer
from slimnet.engine.plan import PrunePlan
from slimnet.loops.mmengine.runner_access import optimizers_of, slimnet_meta


def checkpoint_plan(checkpoint: dict) -> PrunePlan | None:
    """The plan a checkpoint's model was cut by (None: not cut, or not from a slimnet run)."""
    state = slimnet_meta(checkpoint).get("slimming") or {}
    return PrunePlan.from_json(state[PLAN_KEY]) if state.get(PLAN_KEY) else None


def replay_checkpoint(model: nn.Module, checkpoint: dict, optim_wrapper=None) -> bool:
    """Cut a freshly built ``model`` to the widths ``checkpoint`` was saved at, before its weights load.

    ``optim_wrapper`` (the runner's, when already built over the full-width model) is pointed at the cut
    parameters by name, with no state yet: the checkpoint's optimizer state, saved at the cut widths,
    loads into it next. Returns whether the model was cut (False: no plan, or already cut).
    """
    before = ParamSnapshot(model)
    if not Slimming.replay(model, slimnet_meta(checkpoint).get("slimming") or {}):
        return False
    for optimizer in optimizers_of(optim_wrapper):
        retarget_optimizer(optimizer, before, model, model.slimnet_plan, keep_state=False)
    return True


def load_checkpoint(model: nn.Module, filename: str, map_location="cpu", strict: bool = False,
                    revise_keys=((r"^module\.", ""),)) -> dict:
    """mmengine's ``load_checkpoint`` for a model that may have been cut: the plan in the checkpoint's
    meta is replayed on ``model`` (built at full width from its config) first, then the weights load.

    The file is read by mmengine's own loader (``torch.load``): under torch >= 2.6 an mmengine training
    checkpoint (numpy objects in its message hub) needs ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` like any
    other mmengine load; the ``pruned.pt`` the slimming hook writes loads with ``weights_only=True``
    through ``slimnet.load_pruned(path, model)`` instead.

    Example (mmdet)::

        model = init_detector(cfg, checkpoint=None, device="cpu")
        slimnet.loops.mmengine.load_checkpoint(model, "work_dirs/run/epoch_12.pth")
    """
    checkpoint = _load_checkpoint(filename, map_location=map_location)
    replay_checkpoint(model, checkpoint)
    return _load_checkpoint_to_model(model, checkpoint, strict, revise_keys=list(revise_keys))
