"""ultralytics (YOLO): Network Slimming inside ultralytics' own trainer, through ``model.add_callback``.

Ultralytics is AGPL-3.0: it is imported here only (never by ``import slimnet``), and only when this
package is imported. See docs/loops/ultralytics.md.

* ``train``     -- ``slim_train(model, data, epochs, prune_epoch, lam=..., percent=...)``: the whole run
* ``sparsity``  -- ``SparsityCallbacks``: the γ penalty on the trainer's optimizer
* ``slimming``  -- ``SlimmingCallbacks``: the cut at an epoch; optimizer, EMA, ranking pointed at the cut model
* ``widths``    -- ``keep_cut_widths``: fine-tune / resume a cut checkpoint at its cut widths
* ``recut``     -- ``recut(sparse.pt, cut.pt, thresh=...)``: another threshold, without training again
* ``events``    -- ``Callbacks``: ``add_to(model)`` / ``remove_from(model)``
"""

from slimnet.loops.ultralytics.events import Callbacks
from slimnet.loops.ultralytics.recut import recut
from slimnet.loops.ultralytics.slimming import SlimmingCallbacks
from slimnet.loops.ultralytics.sparsity import SparsityCallbacks
from slimnet.loops.ultralytics.train import SlimRun, slim_train
from slimnet.loops.ultralytics.widths import CutWidths, keep_cut_widths

__all__ = ["Callbacks", "CutWidths", "SlimRun", "SlimmingCallbacks", "SparsityCallbacks", "keep_cut_widths", "recut",
           "slim_train"]
