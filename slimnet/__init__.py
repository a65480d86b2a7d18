"""slimnet: Network Slimming (Liu et al., ICCV 2017) end to end, with real channel surgery.

Plain-PyTorch API (no Lightning or Hydra needed)::

    report = slimnet.prune(model, example_inputs, thresh=0.2)     # or percent=0.5
    report = slimnet.prune_zeroed(model, example_inputs)          # zeroed filters / prune masks -> real
    flops, params = slimnet.count_flops(model, example_inputs)
    slimnet.save_pruned(model, "pruned.pt")
    model = slimnet.load_pruned("pruned.pt")                      # or load_pruned(path, model=fresh)
"""

from slimnet.api import prune
from slimnet.artifact import load_pruned, save_pruned
from slimnet.graph import TraceError, trace_channel_groups
from slimnet.measure import count_flops, count_params
from slimnet.plan import PrunePlan
from slimnet.reach import Reach, reach
from slimnet.zeroed import prune_zeroed

__all__ = ["prune", "prune_zeroed", "count_flops", "count_params", "save_pruned", "load_pruned", "trace_channel_groups",
           "PrunePlan", "TraceError", "reach", "Reach"]
__version__ = "0.1.0"
