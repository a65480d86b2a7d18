"""``SparsityCallbacks``: Network Slimming's sparsity training on ultralytics' own optimizer.

Ultralytics builds its optimizer itself (``_setup_train``) and steps it through a GradScaler, with
gradient accumulation and clipping; the γ step rides on that optimizer's step hooks
(``slimnet.core.Sparsity.attach``), so it is taken once per real update, after unscaling and clipping, and
skipped with the update on an AMP overflow. It is hooked again whenever the optimizer was pointed at
other parameters (after a cut).
"""

from __future__ import annotations

import math

from slimnet.core.sparsity import Sparsity
from slimnet.loops.ultralytics.events import Callbacks, info, network, warn
from slimnet.sparsity.step import POLARIZATION_T, init_gammas


class SparsityCallbacks(Callbacks):
    """Penalise λ·R(γ) over every trainable BatchNorm γ of the trainer's model, at every optimizer step.

    Args: as ``slimnet.SparsityCallback`` (Lightning): ``lam`` (λ, in units of ∂L/∂γ), ``until_epoch``
    (λ in epochs ``[0, until_epoch)``, then ``lam_after``), ``mode`` (``"auto"``: the paper's subgradient
    for ``optimizer="SGD"``, the proximal step in the optimizer's own metric for AdamW and the other
    Adam-type optimizers; ultralytics' MuSGD, picked by ``optimizer="auto"`` for runs over 10k
    iterations, gets the plain step lr·λ with a warning), ``gamma_init`` (every γ, and the EMA's, set to
    this on a fresh start), ``kind`` / ``t`` / ``bound`` (``"l1"`` or ``"polarization"``), ``target`` /
    ``eps`` (a λ controller driving that share of γ below ``eps``).

    γ frozen by ``freeze=`` (``requires_grad=False``) get no step. ``history`` keeps λ and the γ
    statistics of each epoch (also logged). Both, and a ``target`` controller's state, ride in
    ``model.yaml["slimnet_sparsity"]`` (plain data, like the cut plan), so ``resume=True`` goes on with
    the λ the run had.

    Example::

        model = YOLO("yolov8n.yaml")
        SparsityCallbacks(lam=1e-3, until_epoch=30).add_to(model)
        SlimmingCallbacks(epoch=30, percent=0.4).add_to(model)
        model.train(data="coco8.yaml", epochs=60, optimizer="SGD")
    """

    EVENTS = ("on_pretrain_routine_end", "on_train_epoch_start", "on_train_batch_start", "on_train_batch_end",
              "on_train_epoch_end", "teardown")

    def __init__(self, lam: float, until_epoch: int | None = None, lam_after: float = 0.0, mode: str = "auto",
                 gamma_init: float | None = None, kind: str = "l1", t: float = POLARIZATION_T, bound: float = 1.0,
                 target: float | None = None, eps: float = 1e-2):
        self.core = Sparsity(lam, until_epoch, lam_after, mode, gamma_init, kind, t, bound, target, eps,
                             where="SparsityCallbacks")

    @property
    def history(self) -> list[dict]:
        return self.core.history

    def on_pretrain_routine_end(self, trainer) -> None:
        """The model, its optimizer and its EMA are built (and a resumed run's state loaded)."""
        net, fresh = network(trainer), not trainer.resume
        self.core.prepare(net, fresh=fresh, name=type(net).__name__)
        saved = None if fresh else _saved_state(trainer)
        if saved is not None:  # the state the interrupted run wrote at its last epoch's end
            self.core.load_state_dict(saved)
        if fresh and self.core.gamma_init is not None and trainer.ema is not None:
            init_gammas(trainer.ema.ema, self.core.gamma_init)  # the EMA starts from the same γ
        steps = math.ceil(len(trainer.train_loader) / max(trainer.accumulate, 1))  # optimizer steps per epoch
        self.core.epoch = trainer.start_epoch
        self.core.start(steps, trainer.epochs)
        if saved is not None and self.core.controller is not None:
            info(f"resumed the λ controller at λ={self.core.controller.lam:.3g} (step {self.core.controller.step})")
        self._attach(trainer)

    def on_train_epoch_start(self, trainer) -> None:
        self.core.epoch = trainer.epoch

    def on_train_batch_start(self, trainer) -> None:
        if self.core.needs_attach([trainer.optimizer]):  # pointed at the cut parameters
            self._attach(trainer)

    def on_train_batch_end(self, trainer) -> None:
        self.core.after_step()

    def on_train_epoch_end(self, trainer) -> None:
        entry = self.core.end_epoch(network(trainer))
        _save_state(trainer, self.core.state_dict())  # before ultralytics writes last.pt
        info(f"epoch {entry['epoch']}: λ={entry['lam']:.3g}, "
             + ", ".join(f"γ {k}={v:.4g}" for k, v in entry.items() if k not in ("epoch", "lam")))

    def teardown(self, trainer) -> None:
        self.core.detach()

    def _attach(self, trainer) -> None:
        missing = self.core.attach(network(trainer), [trainer.optimizer])
        if missing:
            warn(f"{missing} BatchNorm γ are in no optimizer param group: they get no sparsity step")


STATE_KEY = "slimnet_sparsity"  # in model.yaml, beside the cut plan: what a resumed run goes on from


def _save_state(trainer, state: dict) -> None:
    """Put the sparsity state into the yaml of the model and of its EMA (ultralytics saves the EMA), as a
    new dict each: the two may share one."""
    for model in (network(trainer), getattr(trainer.ema, "ema", None)):
        if model is not None and isinstance(getattr(model, "yaml", None), dict):
            model.yaml = {**model.yaml, STATE_KEY: state}


def _saved_state(trainer) -> dict | None:
    for model in (getattr(trainer.ema, "ema", None), network(trainer)):
        state = (getattr(model, "yaml", None) or {}).get(STATE_KEY) if model is not None else None
        if isinstance(state, dict):
            return state
    return None
