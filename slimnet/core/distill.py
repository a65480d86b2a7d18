"""``Distillation``: fine-tune the cut network towards the uncut one, the best teacher there is for it.

At the cut the sparse model is in memory: same data, same head, and it was the cut network a moment
ago. A frozen copy of it, kept in eval mode, gives soft targets for every fine-tune batch, and the loss
becomes (Hinton et al., 2015)

    loss = (1 - weight) · hard_loss + weight · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

The defaults, T = 4 and weight = 0.9, are the knowledge-distillation baseline of Tian et al. (CRD, ICLR
2020) on CIFAR, which most later distillation papers reuse. T² keeps the soft term's gradients on the
scale of the hard term's whatever T is.

The teacher costs one model of memory (its parameters and buffers, reported by ``teacher_bytes``) and
one forward without gradients per training step; docs/distillation.md has both measured. It is never a
sub-module of the student's training module, so no optimizer, checkpoint or ``state_dict`` sees it: a
resumed fine-tune restores it from the sparse-phase checkpoint, which holds exactly its weights.

A training step asks for it in one line (``slimnet.distilled``)::

    loss = slimnet.distilled(self, x, logits, loss)   # unchanged before the cut, or without distillation
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

TEMPERATURE = 4.0  # Tian et al. 2020's KD baseline (CRD code: --kd_T 4)
WEIGHT = 0.9       # ... and its weight on the soft term (-a 0.9 -r 0.1)
ATTRIBUTE = "slimnet_distillation"  # where a loop adapter leaves the Distillation on the training module


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = TEMPERATURE
                      ) -> torch.Tensor:
    """T² · KL(p_teacher ‖ p_student) at temperature T, averaged over the batch (classes on dim 1)."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits.detach() / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t


def _freeze(net: nn.Module) -> nn.Module:
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


class Distillation:
    """The teacher (a frozen copy of the uncut network) and the loss that mixes its soft targets in.

    Args:
        temperature: T of the softmax both logits are compared at (> 0).
        weight: share of the soft term in the loss, in [0, 1] (1: the teacher alone, 0: no distillation).
    """

    def __init__(self, temperature: float = TEMPERATURE, weight: float = WEIGHT, where: str = "Distillation"):
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"{where}: temperature={temperature!r} must be > 0")
        if not (isinstance(weight, (int, float)) and 0 <= weight <= 1):
            raise ValueError(f"{where}: weight={weight!r} must be in [0, 1] (the soft term's share of the loss)")
        self.temperature, self.weight = float(temperature), float(weight)
        self.teacher: nn.Module | None = None

    def take(self, net: nn.Module) -> None:
        """The teacher: a frozen eval-mode copy of ``net`` as it is now (call right before the cut)."""
        self.teacher = _freeze(copy.deepcopy(net))

    def restore(self, skeleton: nn.Module, state_dict: dict) -> None:
        """The teacher from a checkpoint: ``skeleton`` (an uncut ``net``) takes ``state_dict``'s weights."""
        skeleton.load_state_dict(state_dict)
        self.teacher = _freeze(skeleton)

    def to(self, device) -> Distillation:
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    @property
    def ready(self) -> bool:
        return self.teacher is not None

    def teacher_bytes(self) -> int:
        """Memory the teacher holds: its parameters and buffers."""
        if self.teacher is None:
            return 0
        tensors = list(self.teacher.parameters()) + list(self.teacher.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def teacher_logits(self, *inputs) -> torch.Tensor:
        self.teacher.eval()  # whoever switched modes around it, the teacher stays in eval mode
        return self.teacher(*inputs)

    def soft_loss(self, student_logits: torch.Tensor, *inputs) -> torch.Tensor:
        return distillation_loss(student_logits, self.teacher_logits(*inputs), self.temperature)

    def loss(self, student_logits: torch.Tensor, inputs, hard_loss: torch.Tensor) -> torch.Tensor:
        """``(1 - weight) · hard_loss + weight · soft``; ``hard_loss`` alone while there is no teacher."""
        if self.teacher is None:
            return hard_loss
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        return (1 - self.weight) * hard_loss + self.weight * self.soft_loss(student_logits, *args)


def distilled(module, inputs, student_logits: torch.Tensor, hard_loss: torch.Tensor) -> torch.Tensor:
    """The loss of a training step with the teacher's soft targets mixed in, once a loop adapter has set
    a teacher on ``module`` (``SlimmingCallback(distill=…)`` at the cut); ``hard_loss`` unchanged otherwise."""
    distillation = getattr(module, ATTRIBUTE, None)
    if distillation is None or not distillation.ready:
        return hard_loss
    return distillation.loss(student_logits, inputs, hard_loss)
