"""``SlimmingCallbacks``: cut the trainer's model for real at an epoch, inside ultralytics' own trainer.

At the start of epoch ``epoch`` the model ultralytics trains (``trainer.model``) is cut by
``slimnet.core.Slimming``; then every piece of the trainer that held the old tensors is pointed at the
cut model: the optimizer in place (its param groups, the surviving channels' momentum, its scheduler
untouched), the EMA (a copy of the cut model), the early-stopping and best-checkpoint ranking (a
``best.pt`` from before the cut describes another architecture). The plan travels in the model's yaml,
so a fine-tune or a resume of a cut checkpoint keeps the cut widths (``widths.CutWidths``).
"""

from __future__ import annotations

import math
import shutil
import time

import torch
from ultralytics.utils.torch_utils import ModelEMA

from slimnet.core import Slimming
from slimnet.engine.plan import PrunePlan
from slimnet.loops.ultralytics.events import Callbacks, check_trainer, info, network, warn
from slimnet.loops.ultralytics.widths import CutWidths, plan_of, settle, unsettle
from slimnet.modes import preserved_modes


class SlimmingCallbacks(Callbacks):
    """Cut the model at the start of epoch ``epoch``, then let ultralytics train the cut model on.

    It ranks every BatchNorm channel by |γ| across the whole model (or the sub-modules ``within``), keeps
    those above ``thresh`` (or prunes the weakest ``percent``, or cuts down to ``target_flops`` of the
    FLOPs) and removes the rest from the convs, the norms and every layer reading them: C2f's split halves
    and concatenations, SPPF, the neck, the hidden layers of the Detect head. The head's box and class
    outputs (the last conv of each ``cv2`` / ``cv3`` branch) and ``dfl`` have no BatchNorm to rank them
    and feed reshapes: they are never cut (checked after every cut).

    After the cut:

    * the trainer's optimizer holds the cut parameters with the surviving channels' state
      (``carry_optimizer_state``), in place, so its LambdaLR schedule and warmup go on where they were;
    * the EMA becomes a copy of the cut model with its decay ramp restarted (the running average of the
      old weights cannot be cut to the new ones: the removed channels' constants are folded into the
      live model's biases only);
    * ranking restarts: ``best.pt`` from before the cut is renamed ``sparse_best.pt``, the last sparse
      ``last.pt`` is copied to ``sparse.pt`` (``save_sparse``), and early stopping counts from the cut
      (before it, ``patience`` is suspended: the sparse phase's mAP falls by design).

    Args:
        epoch: epoch (0-based, as ``trainer.epoch``) at whose start the cut happens.
        thresh / percent / target_flops, min_channels, round_to, fold_bias, leaf_modules, within,
            cut_frozen, carry_optimizer_state: as ``slimnet.SlimmingCallback``. β folding averages the
            removed channels' outputs over the training images of the epoch before the cut.
        val_after_cut: run the trainer's validator on the cut model right away (its metrics go into
            ``report["after_cut"]``).
        save_sparse: keep the sparse model of the last epoch before the cut as ``weights/sparse.pt``.

    ``report`` (after the cut): FLOPs and parameters before and after, the threshold, the layers cut,
    ``val_before_cut`` (the last validation of the sparse model) and ``after_cut``.

    Raises:
        ValueError: before training, an epoch not before the last, a model with nothing to cut,
            ``compile=True``, ``quantize=8``, distillation or ``time=``.
        slimnet.errors.NothingCutError: at the cut, a ``percent`` or ``target_flops`` removing nothing.

    Example::

        model = YOLO("yolov8n.yaml")
        SparsityCallbacks(lam=1e-3, until_epoch=30).add_to(model)
        SlimmingCallbacks(epoch=30, percent=0.4).add_to(model)
        model.train(data="coco8.yaml", epochs=60, optimizer="SGD")
        YOLO("runs/detect/train/weights/best.pt").export(format="onnx")   # the cut model
    """

    EVENTS = ("on_pretrain_routine_start", "on_pretrain_routine_end", "on_train_epoch_start", "on_train_epoch_end",
              "on_model_save")

    def __init__(self, epoch: int, thresh: float | None = None, percent: float | None = None,
                 target_flops: float | None = None, *, min_channels: int = 1, round_to: int = 1,
                 fold_bias: bool = True, carry_optimizer_state: bool = True, cut_frozen: bool = False,
                 leaf_modules=(), within=None, val_after_cut: bool = False, save_sparse: bool = True):
        self.core = Slimming(epoch, thresh, percent, target_flops, min_channels=min_channels, round_to=round_to,
                             fold_bias=fold_bias, carry_optimizer_state=carry_optimizer_state,
                             cut_frozen=cut_frozen, leaf_modules=leaf_modules, within=within,
                             where="SlimmingCallbacks")
        self.val_after_cut, self.save_sparse = val_after_cut, save_sparse
        self.widths = CutWidths()
        self.report: dict | None = None
        self._inputs: tuple | None = None  # a batch of one zero image at the training size
        self._patience: float | None = None  # early stopping's, suspended until the cut

    epoch = property(lambda self: self.core.epoch)
    done = property(lambda self: self.core.done)

    @property
    def plan(self) -> PrunePlan | None:
        return self.core.plan

    def add_to(self, model):
        super().add_to(model)
        self.widths.add_to(model)  # a resume of this run rebuilds the model: at the cut widths
        return self

    def remove_from(self, model, keep_widths: bool = False):
        """Unregister; ``keep_widths``: leave ``keep_cut_widths`` on, so later ``model.train()`` calls keep them."""
        super().remove_from(model)
        if not keep_widths:
            self.widths.remove_from(model)
        return self

    # -- before training ------------------------------------------------------------------------------
    def on_pretrain_routine_start(self, trainer) -> None:
        """In the trainer's ``__init__``: its arguments are known (a resumed run's from the checkpoint)."""
        self.core.check(trainer.epochs)
        check_trainer(trainer, "SlimmingCallbacks")

    def on_pretrain_routine_end(self, trainer) -> None:
        """The model (rebuilt at the cut widths when resumed past the cut), optimizer and EMA are ready."""
        net = network(trainer)
        channels = (trainer.data or {}).get("channels", 3)
        self._inputs = (torch.zeros(1, channels, trainer.args.imgsz, trainer.args.imgsz, device=trainer.device),)
        if trainer.resume and trainer.start_epoch > self.epoch:
            self.core.done, self.core.plan = True, plan_of(net)
            if self.core.plan is None:
                warn(f"resumed at epoch {trainer.start_epoch} past the cut (epoch {self.epoch}), but the checkpoint "
                     "carries no cut: nothing is cut in this run")
            return
        if trainer.resume and trainer.start_epoch == self.epoch and self.core.fold_bias:
            saved = trainer.wdir / FOLD_STATS
            if saved.is_file():  # written with last.pt at the end of the epoch before the cut
                self.core.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
            if self.core.fold_stats is not None:
                info(f"resumed at the cut: β folding uses the input statistics recorded before it ({saved.name})")
            else:
                info("resumed at the cut: β folding uses the constants a zero image gives (exact for γ = 0)")
        with preserved_modes(net):
            self.core.check_cuttable(net.eval(), self._inputs, type(net).__name__)
        if self.core.policy == "percent" and not self.core.percent:
            warn("percent=0 cuts nothing: give percent > 0 (a share of all BatchNorm channels)")
        if trainer.stopper is not None:
            self._patience, trainer.stopper.patience = trainer.stopper.patience, float("inf")

    # -- the epoch before the cut: β folding's statistics -----------------------------------------------
    def on_train_epoch_end(self, trainer) -> None:
        self.core.stop(keep=True)

    def on_model_save(self, trainer) -> None:
        """Beside last.pt: the statistics a resume exactly at the cut folds with (per-layer means and
        ranges, no image); removed once the cut has spent them."""
        path = trainer.wdir / FOLD_STATS
        if self.core.fold_stats is not None and not self.core.done:
            torch.save(self.core.state_dict(), path)
        elif self.core.done:
            path.unlink(missing_ok=True)

    # -- the cut --------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer) -> None:
        net = network(trainer)
        first = net.model[0] if isinstance(getattr(net, "model", None), torch.nn.Sequential) else None
        if self.core.records(trainer.epoch, self._inputs) and first is not None:
            self.core.record(net, first)  # the first layer's input is the image batch
        if self.core.due(trainer.epoch):
            self.report = self._cut(trainer, net)

    def _cut(self, trainer, net: torch.nn.Module) -> dict:
        before = {}  # the last validation of the sparse model, if one ran (val=False skips them)
        if trainer.fitness is not None:
            before = {k: float(v) for k, v in (trainer.metrics or {}).items() if k.startswith("metrics/")}
        outputs = _head_outputs(net)
        unsettle(net)  # a model cut before: this cut composes onto its plan
        start = time.perf_counter()
        with preserved_modes(net):
            report, messages = self.core.cut(net.eval(), self._example(net), [trainer.optimizer])
        settle(net)
        if _head_outputs(net) != outputs:
            raise RuntimeError(f"SlimmingCallbacks: the cut changed the head's outputs {outputs} -> "
                               f"{_head_outputs(net)}; this is a bug, please report it")
        for message in messages:
            warn(message)
        if report.channels:  # else the model, its EMA and its checkpoints describe the same network still
            self._restart_ema(trainer, net)
            self._restart_ranking(trainer)
            _no_recovery_into_the_uncut(trainer, trainer.epoch)
        out = report.to_dict()
        out.update(epoch=trainer.epoch, policy=self.core.policy, warnings=messages, val_before_cut=before,
                   surgery_seconds=time.perf_counter() - start)
        if self.val_after_cut:
            out["after_cut"] = self._validate(trainer)
        threshold = f", |γ| threshold {report.threshold:.4g}" if report.threshold is not None else ""
        info(f"cut at epoch {trainer.epoch} ({self.core.policy}{threshold}): FLOPs {report.flops_before / 1e9:.3f}G -> "
             f"{report.flops_after / 1e9:.3f}G (-{100 * report.flops_reduction:.1f}%), params "
             f"{report.params_before:,} -> {report.params_after:,}")
        return out

    def _example(self, net: torch.nn.Module) -> tuple:
        device = next(net.parameters()).device
        return tuple(x.to(device) for x in self._inputs)

    @staticmethod
    def _restart_ema(trainer, net: torch.nn.Module) -> None:
        old = trainer.ema
        if old is None:
            return
        trainer.ema = ModelEMA(net)  # a deep copy of the cut model, decay ramp from 0
        trainer.ema.decay, trainer.ema.enabled = old.decay, old.enabled

    def _restart_ranking(self, trainer) -> None:
        trainer.best_fitness = None
        if trainer.stopper is not None:
            trainer.stopper.best_fitness, trainer.stopper.best_epoch = 0.0, trainer.epoch
            trainer.stopper.possible_stop = False
            if self._patience is not None:
                trainer.stopper.patience = self._patience
        if trainer.best.exists():
            trainer.best.replace(trainer.wdir / "sparse_best.pt")
        if self.save_sparse and trainer.last.exists():
            shutil.copyfile(trainer.last, trainer.wdir / "sparse.pt")

    @staticmethod
    def _validate(trainer) -> dict:
        if trainer.validator is None or getattr(trainer, "loss_items", None) is None:
            info("no validation right after the cut (no training batch seen yet in this run)")
            return {}
        metrics = trainer.validator(trainer) or {}
        return {k: float(v) for k, v in metrics.items() if k.startswith("metrics/") or k == "fitness"}


def _head_outputs(net: torch.nn.Module) -> list[tuple[str, int]]:
    """The widths of the detection head's outputs: the last conv of each box / class branch, and dfl."""
    head = net.model[-1] if isinstance(getattr(net, "model", None), torch.nn.Sequential) else None
    found = []
    for attr in ("cv2", "cv3", "cv4", "one2one_cv2", "one2one_cv3"):
        for i, seq in enumerate(getattr(head, attr, None) or ()):
            last = seq[-1] if isinstance(seq, torch.nn.Sequential) else seq
            found.append((f"{attr}.{i}", getattr(last, "out_channels", None)))
    dfl = getattr(getattr(head, "dfl", None), "conv", None)
    if dfl is not None:
        found.append(("dfl", dfl.in_channels))
    return found


FOLD_STATS = "slimnet_fold_stats.pt"  # in the run's weights/ folder, while a cut is pending


def _no_recovery_into_the_uncut(trainer, epoch: int) -> None:
    """Ultralytics answers a NaN/Inf loss or fitness by loading last.pt into the model and redoing the
    epoch. In the epoch of the cut, last.pt still holds the model from before the cut, which the cut model
    cannot load (a shape error deep in ``load_state_dict``): stop with the cause and the way on instead."""
    recover = getattr(trainer, "_handle_nan_recovery", None)
    if recover is None:
        return

    def guarded(e):
        if e == epoch and _diverged(trainer):
            raise RuntimeError(
                f"SlimmingCallbacks: NaN/Inf in epoch {epoch}, the epoch of the cut: ultralytics would reload "
                f"{trainer.last.name}, which holds the model from before the cut and does not fit the cut one. "
                "model.train(resume=True) repeats the cut from it; if the loss diverges again, lower lr0 (or "
                "set amp=False) and train again")
        return recover(e)

    trainer._handle_nan_recovery = guarded


def _diverged(trainer) -> bool:
    loss, fitness = trainer.loss, trainer.fitness
    return ((loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()))
            or (fitness is not None and not math.isfinite(float(fitness))))
