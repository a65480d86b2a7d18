"""Lightning: the two callbacks that slim a LightningModule, the monitors, and checkpoint support.

* ``sparsity_callback`` -- ``SparsityCallback``: the γ penalty at every optimizer step
* ``slimming_callback`` -- ``SlimmingCallback``: the cut at an epoch (over ``slimnet.core.Slimming``)
* ``monitors``          -- ``GammaMonitor`` (γ histograms, channel counts), ``PhaseTimer``, ``cut_done``
* ``checkpoint``        -- ``Slimmable``, ``load_checkpoint``: cut checkpoints load at the cut widths
* ``checkpoint_io``     -- ``SafeCheckpointIO``: atomic saves, ``weights_only`` loads
"""

from slimnet.loops.lightning.checkpoint import Slimmable, load_checkpoint
from slimnet.loops.lightning.checkpoint_io import SafeCheckpointIO
from slimnet.loops.lightning.monitors import GammaMonitor, PhaseTimer, cut_done
from slimnet.loops.lightning.slimming_callback import SlimmingCallback
from slimnet.loops.lightning.sparsity_callback import SparsityCallback

__all__ = ["GammaMonitor", "PhaseTimer", "SafeCheckpointIO", "Slimmable", "SlimmingCallback", "SparsityCallback",
           "cut_done", "load_checkpoint"]
