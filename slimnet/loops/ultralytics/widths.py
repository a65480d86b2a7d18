"""Cut widths that survive ultralytics' rebuild-from-yaml: the plan rides in the model's own ``yaml``.

Ultralytics pickles the whole model into ``best.pt`` / ``last.pt``, so ``YOLO("best.pt")`` is the cut model
as it was: predict, val and export need nothing from slimnet. But every start of training rebuilds the
model from its yaml, ``trainer.get_model(cfg=model.yaml, weights=model)`` (a fine-tune of a checkpoint, a
``resume=True``), at the yaml's widths, and copies over only the tensors whose shapes fit: a cut model
would silently go back to full width with most of its weights random. So:

* a cut model's plan (every kept channel, in the original model's numbering) is kept as JSON in
  ``model.yaml["slimnet_plan"]``: plain data that ultralytics pickles with the model, and no slimnet class
  in the file (``YOLO(path)`` loads it without slimnet installed, ``ULTRALYTICS_SAFE_LOAD=1`` too);
* ``CutWidths`` (``keep_cut_widths(model)``) wraps the trainer's ``get_model``: the model is built from
  the yaml, cut by that plan (``replay_plan``) and only then given the weights, every one of which must
  fit (a new class count may change the class outputs only, as in ultralytics).

The ``slimnet_plan`` attribute ``slimnet.prune`` leaves on a model (a ``PrunePlan``) is moved into the
yaml as soon as the model is cut or rebuilt (``settle``), so no checkpoint pickles it.
"""

from __future__ import annotations

import torch
from torch import nn

from slimnet.core.slimming import PLAN_KEY
from slimnet.engine.plan import PrunePlan
from slimnet.engine.surgery import replay_plan
from slimnet.loops.ultralytics.events import Callbacks, info

ATTR = "slimnet_plan"  # the attribute slimnet.prune and replay_plan set on a model


def plan_of(obj) -> PrunePlan | None:
    """The plan a model (or a checkpoint dict, or a yaml dict) was cut by; None if it is uncut."""
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj):  # a checkpoint
        obj = obj.get("ema") or obj.get("model")
    if isinstance(obj, nn.Module):
        plan = obj.__dict__.get(ATTR)
        if isinstance(plan, PrunePlan):
            return plan
        obj = getattr(obj, "yaml", None)
    if isinstance(obj, dict) and obj.get(PLAN_KEY):
        return PrunePlan.from_json(obj[PLAN_KEY])
    return None


def settle(model: nn.Module) -> None:
    """After a cut or a replay: move the plan from the ``slimnet_plan`` attribute into ``model.yaml`` (a new
    dict, as ultralytics shares one yaml between the model and its EMA). C2f's split width ``c`` follows
    the cut in the engine itself (``slimnet.graph.OPS.widths``)."""
    plan = model.__dict__.pop(ATTR, None)
    if isinstance(plan, PrunePlan):
        model.yaml = {**(getattr(model, "yaml", None) or {}), PLAN_KEY: plan.to_json()}


def unsettle(model: nn.Module) -> None:
    """Put the yaml's plan back on the attribute, so a second cut composes onto it (``PrunePlan.then``)."""
    plan = plan_of(model)
    if plan is not None:
        setattr(model, ATTR, plan)


def misfits(model: nn.Module, weights) -> list[str]:
    """The tensors of ``weights`` that do not fit ``model`` (by shape), besides the class outputs, whose
    width is the class count and which ultralytics itself re-initialises for a new data set."""
    source = (weights.get("ema") or weights.get("model")) if isinstance(weights, dict) else weights
    if not isinstance(source, nn.Module):
        return []
    head = model.model[-1] if isinstance(getattr(model, "model", None), nn.Sequential) else None
    branches = [seq for attr in ("cv3", "one2one_cv3") for seq in (getattr(head, attr, None) or ())]
    outputs = {name + "." for name, m in model.named_modules() if any(m is seq[-1] for seq in branches)}
    mine = model.state_dict()
    return [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(mine[k].shape)} in the model"
            for k, v in source.state_dict().items()
            if k in mine and v.shape != mine[k].shape and not any(k.startswith(o) for o in outputs)]


class CutWidths(Callbacks):
    """Keep a cut model at its cut widths whenever ultralytics rebuilds it (fine-tune, resume).

    Registered by ``SlimmingCallbacks`` itself; on its own with ``keep_cut_widths(model)`` to train a cut
    checkpoint further. It wraps this trainer's ``get_model`` (the instance's, not the class's; undone at
    ``teardown``): when the weights or the yaml carry a plan, the model is built, cut by the plan, then
    loaded. Without a plan it calls ultralytics' ``get_model`` unchanged.

    Raises:
        RuntimeError: a checkpoint tensor still does not fit the model cut by the plan (the plan and the
            weights come from different models).
    """

    EVENTS = ("on_pretrain_routine_start", "teardown")

    def on_pretrain_routine_start(self, trainer) -> None:
        """Runs in the trainer's ``__init__``, before ``Model.train`` or ``setup_model`` call ``get_model``."""
        original = trainer.get_model
        if getattr(original, "_slimnet_widths", False):
            return

        def get_model(cfg=None, weights=None, verbose=True):
            plan = plan_of(weights) or plan_of(cfg if isinstance(cfg, dict) else None)
            if plan is None:
                return original(cfg=cfg, weights=weights, verbose=verbose)
            model = original(cfg=cfg, weights=None, verbose=verbose)
            with torch.no_grad():
                replay_plan(model, plan)
            settle(model)
            if weights is not None:
                model.load(weights, verbose=verbose)
                wrong = misfits(model, weights)
                if wrong:
                    raise RuntimeError(f"keep_cut_widths: {len(wrong)} tensors of the checkpoint do not fit the model "
                                       f"cut by its plan ({wrong[0]}): the plan was made for another model")
            info(f"rebuilt at the cut widths ({sum(p.numel() for p in model.parameters()):,} parameters)")
            return model

        get_model._slimnet_widths = True
        trainer.get_model = get_model

    def teardown(self, trainer) -> None:
        if getattr(trainer.__dict__.get("get_model"), "_slimnet_widths", False):
            del trainer.get_model


def keep_cut_widths(model):
    """Make ``model.train(...)`` keep the cut widths of a cut checkpoint (``YOLO("best.pt")``).

    Example::

        model = keep_cut_widths(YOLO("runs/detect/slim/weights/best.pt"))
        model.train(data="data.yaml", epochs=30)   # fine-tunes the cut model, not a full-width rebuild

    Returns ``model``.
    """
    CutWidths().add_to(model)
    return model
