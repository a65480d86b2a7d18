"""The sparsity penalties on BatchNorm γ.

* ``step``       -- L1 and polarization, taken by the optimizer's own step hooks (``SparsityStep``,
  ``attach_l1``, ``attach_sparsity``, ``add_l1_subgradient``, ``l1_proximal_step``)
* ``controller`` -- the λ controller that aims at a share of zeroed γ (``sparsity.target``)
* ``norms``      -- FrozenBatchNorm2d <-> trainable BatchNorm, for detectors loaded frozen
"""

from slimnet.sparsity.step import (
    KINDS,
    MODES,
    L1Step,
    Penalty,
    Polarization,
    SparsityStep,
    add_l1_subgradient,
    attach_l1,
    attach_sparsity,
    bn_gammas,
    gamma_stats,
    init_gammas,
    l1_proximal_step,
    make_penalty,
)

__all__ = ["KINDS", "MODES", "L1Step", "Penalty", "Polarization", "SparsityStep", "add_l1_subgradient", "attach_l1",
           "attach_sparsity", "bn_gammas", "gamma_stats", "init_gammas", "l1_proximal_step", "make_penalty"]
