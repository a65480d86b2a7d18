"""slimnet: Network Slimming (Liu et al., ICCV 2017) end to end, with real channel surgery.

Plain PyTorch (no Lightning or Hydra needed)::

    report = slimnet.prune(model, example_inputs, thresh=0.2)     # or percent=0.5, or target_flops=0.3
    report = slimnet.prune_zeroed(model, example_inputs)          # zeroed filters / prune masks -> real
    slimnet.attach_l1(optimizer, model, lam=1e-4)                 # the sparsity step, at every step()
    slimnet.carry_optimizer_state(old_opt, new_opt, model, report)  # momentum of surviving channels
    flops, params = slimnet.count_flops(model, example_inputs)
    slimnet.save_pruned(model, "pruned.pt")
    model = slimnet.load_pruned("pruned.pt")                      # or load_pruned(path, model=fresh)

Your LightningModule::

    trainer = pl.Trainer(callbacks=[slimnet.SparsityCallback(lam=1e-4, until_epoch=8),
                                    slimnet.SlimmingCallback(epoch=8, percent=0.5, module="net")])
    module = slimnet.load_checkpoint(path, MyModule)              # or: class MyModule(slimnet.Slimmable, ...)
    # SlimmingCallback(..., distill=True): fine-tune towards the uncut model; in training_step:
    loss = slimnet.distilled(self, x, logits, loss)
"""

from slimnet.core.distill import Distillation, distilled
from slimnet.engine.artifact import load_pruned, save_pruned
from slimnet.engine.cut import prune
from slimnet.engine.measure import count_flops, count_params
from slimnet.engine.optim_state import carry_optimizer_state
from slimnet.engine.plan import PrunePlan
from slimnet.engine.reach import Reach, reach
from slimnet.engine.report import PruneReport
from slimnet.engine.zeroed import prune_zeroed
from slimnet.errors import NothingCutError
from slimnet.graph import TraceError, trace_channel_groups
from slimnet.sparsity.step import L1Step, add_l1_subgradient, attach_l1, l1_proximal_step

# The Lightning side loads on first use: the engine above imports without Lightning's start-up cost.
_LAZY = {
    "SparsityCallback": "slimnet.loops.lightning.sparsity_callback",
    "SlimmingCallback": "slimnet.loops.lightning.slimming_callback",
    "Slimmable": "slimnet.loops.lightning.checkpoint",
    "load_checkpoint": "slimnet.loops.lightning.checkpoint",
}

__all__ = ["prune", "prune_zeroed", "count_flops", "count_params", "save_pruned", "load_pruned", "trace_channel_groups",
           "PrunePlan", "PruneReport", "TraceError", "attach_l1", "add_l1_subgradient", "l1_proximal_step", "L1Step",
           "carry_optimizer_state", "SparsityCallback", "SlimmingCallback", "Slimmable", "load_checkpoint",
           "reach", "Reach", "NothingCutError", "Distillation", "distilled"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slimnet' has no attribute {name!r}")
