"""mmengine (mmdetection, mmsegmentation, mmpose, mmyolo, mmpretrain): two hooks that slim a model a
``Runner`` trains, registered in mmengine's ``HOOKS`` registry when this package is imported.

    custom_imports = dict(imports=["slimnet.loops.mmengine"], allow_failed_imports=False)
    custom_hooks = [
        dict(type="SlimnetSparsityHook", lam=1e-4, until_epoch=8, scope="backbone"),
        dict(type="SlimnetSlimmingHook", epoch=8, thresh=0.17, scope="backbone"),
    ]

* ``sparsity_hook``  -- ``SlimnetSparsityHook``: the γ penalty at every optimizer update (``core.Sparsity``)
* ``slimming_hook``  -- ``SlimnetSlimmingHook``: the cut at an epoch or iteration (``core.Slimming``)
* ``trunk``          -- what is traced per ``scope``: the whole model, or backbone → neck
* ``checkpoint``     -- the plan in ``checkpoint["meta"]["slimnet"]``; ``load_checkpoint`` for inference
* ``runner_access``  -- the runner's model, optimizers, a batch for the trace, DDP and EMA after a cut

Needs ``pip install mmengine`` (``slimnet[mmengine]``); nothing else in slimnet imports it. See
docs/loops/mmengine.md.
"""

import importlib.util

if importlib.util.find_spec("mmengine") is None:
    raise ImportError("slimnet.loops.mmengine needs mmengine: pip install 'slimnet[mmengine]' (or mmengine)")

from slimnet.loops.mmengine.checkpoint import checkpoint_plan, load_checkpoint, replay_checkpoint
from slimnet.loops.mmengine.slimming_hook import SlimnetSlimmingHook
from slimnet.loops.mmengine.sparsity_hook import SlimnetSparsityHook
from slimnet.loops.mmengine.trunk import SCOPES, Trunk, WholeModel

__all__ = ["SCOPES", "SlimnetSlimmingHook", "SlimnetSparsityHook", "Trunk", "WholeModel", "checkpoint_plan",
           "load_checkpoint", "replay_checkpoint"]
