"""The framework-free slimming core: what a training-loop adapter (Lightning's callbacks, mmengine's
hooks and ultralytics' callbacks) needs to cut a network at an epoch and keep training.

``Sparsity`` holds the γ penalty over a run (λ per epoch, the controller, the step hooked onto the
loop's optimizers, γ statistics). ``Slimming`` holds when and how to cut, the fold statistics recorded before the cut, the cut itself,
the optimizers carried over it, and the state to save and replay. ``Distillation`` keeps a frozen copy of
the uncut network as the fine-tune's teacher. It imports no training framework:
an adapter translates its loop's events (fit start, epoch start, validation, checkpoint saved/loaded)
into these calls.
"""

from slimnet.core.distill import Distillation, distillation_loss, distilled
from slimnet.core.slimming import Slimming
from slimnet.core.sparsity import Sparsity

__all__ = ["Distillation", "Slimming", "Sparsity", "distillation_loss", "distilled"]
