"""``Slimming``: cut a network at an epoch, inside any training loop, with no framework imported.

An adapter owns the loop's objects (the network to cut, the batch it feeds, the optimizers) and calls:

    slim = Slimming(epoch=8, percent=0.5)
    slim.check(max_epochs)                     # before training: a policy that can never run fails now
    slim.check_cuttable(net, example)          # ... and a network with nothing to cut
    slim.record(net, fed) / slim.stop()        # over the last epoch before the cut (fold statistics)
    if slim.due(epoch):
        report = slim.cut(net, example, optimizers)   # or optimizers=None, then carry_into(old, new)
    state = slim.state_dict()                  # into the loop's checkpoint; load_state_dict back
    slim.replay(net, state)                    # before the checkpoint's weights load

The optimizers are pointed at the cut parameters in place with the state of the surviving channels,
so every scheduler stepping them goes on where it was; an adapter that restarts the schedule passes
``optimizers=None`` and hands the old and new optimizers to ``carry_into``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from slimnet.core.distill import Distillation
from slimnet.engine.cut import prune
from slimnet.engine.fold import InputStats
from slimnet.engine.latency_budget import check_latency_options
from slimnet.engine.optim_state import carry_optimizer_state, retarget_optimizer
from slimnet.engine.plan import PrunePlan, mark_frozen, restrict_to
from slimnet.engine.surgery import replay_plan
from slimnet.graph import trace_channel_groups
from slimnet.modes import preserved_modes

PLAN_KEY = "slimnet_plan"  # in the saved state: the plan, as JSON

FOLD_SAMPLES = 256            # inputs β folding averages the removed channels' outputs over
FOLD_BYTES = 16 * 2**20       # ... at most this much of them (a detector's images are large)


class Slimming:
    """When, what by and how to cut; the fold statistics before the cut; the plan after it.

    Args:
        epoch: epoch at whose start the cut happens (the sparse phase is ``[0, epoch)``).
        thresh / percent / target_flops / target_latency: the policy (see ``slimnet.prune``); thresh,
            target_flops and target_latency win over percent; ``latency_table`` / ``latency_settings`` go
            with target_latency (checked now: no way to measure fails before training).
        min_channels, round_to, fold_bias, leaf_modules, within, cut_frozen: as ``slimnet.prune``.
        carry_optimizer_state: keep the surviving channels' optimizer state over the cut.
        distill: a ``Distillation`` whose teacher is a frozen copy of the network right before the cut.
        where: the name errors start with (the adapter's class).
    """

    def __init__(self, epoch: int, thresh: float | None = None, percent: float | None = None,
                 target_flops: float | None = None, *, min_channels: int = 1, round_to: int = 1,
                 fold_bias: bool = True, carry_optimizer_state: bool = True, cut_frozen: bool = False,
                 leaf_modules=(), within=None, distill: Distillation | None = None,
                 target_latency: float | None = None, latency_table=None, latency_settings=None,
                 where: str = "Slimming"):
        if thresh is None and percent is None and target_flops is None and target_latency is None:
            raise ValueError(f"{where} needs thresh=…, percent=…, target_flops=… or target_latency=…")
        if sum(p is not None for p in (thresh, target_flops, target_latency)) > 1:
            raise ValueError(f"give {where} one of thresh, target_flops and target_latency, not several")
        if target_latency is not None:
            try:
                check_latency_options(target_latency, latency_table, latency_settings)
            except ValueError as err:
                raise type(err)(f"{where}: {err}") from None
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"{where}: epoch={epoch!r} must be an integer >= 0")
        if percent is not None and not 0 <= percent < 1:
            raise ValueError(f"{where}: percent={percent} must be in [0, 1)")
        if target_flops is not None and not 0 < target_flops <= 1:
            raise ValueError(f"{where}: target_flops={target_flops} must be in (0, 1]")
        if min_channels < 1:
            raise ValueError(f"{where}: min_channels={min_channels} must be >= 1")
        self.epoch, self.where = epoch, where
        self.thresh, self.target_flops, self.target_latency = thresh, target_flops, target_latency
        self.latency = {"latency_table": latency_table, "latency_settings": latency_settings}
        self.percent = None if any(p is not None for p in (thresh, target_flops, target_latency)) else percent
        self.min_channels, self.round_to, self.fold_bias = min_channels, round_to, fold_bias
        self.carry_optimizer_state, self.cut_frozen = carry_optimizer_state, cut_frozen
        self.leaf_modules, self.within = leaf_modules, within
        self.distill = distill  # takes its teacher, a copy of the uncut network, right before the cut
        self.done = False
        self.plan: PrunePlan | None = None
        self.fold_stats: InputStats | None = None   # each layer's input statistics, real data, before the cut
        self._recorder: _Recorder | None = None

    @property
    def policy(self) -> str:
        for policy in ("thresh", "target_flops", "target_latency"):
            if getattr(self, policy) is not None:
                return policy
        return "percent"

    # -- before training ----------------------------------------------------------------------------
    def check(self, max_epochs: int | None) -> None:
        if max_epochs is not None and 0 <= max_epochs <= self.epoch:
            raise ValueError(f"{self.where}: epoch={self.epoch} is not before the last epoch (max_epochs="
                             f"{max_epochs}): the model would never be cut; lower it or train longer")

    def check_cuttable(self, net: nn.Module, inputs: tuple, name: str) -> None:
        graph = trace_channel_groups(net, inputs, self.leaf_modules)  # TraceError says why and how on
        graph = mark_frozen(restrict_to(graph, self.within), net, self.cut_frozen)
        if not any(group.prunable for group in graph.groups):
            raise ValueError(f"{self.where}: {name} has no channel group that can be cut ("
                             + ("; ".join(graph.warnings[:3]) or "no BatchNorm") + ")")

    # -- the epoch before the cut: what β folding needs ------------------------------------------------
    def records(self, epoch: int, inputs: tuple) -> bool:
        """Whether fold statistics are gathered in this epoch (the last before the cut)."""
        return not self.done and self.fold_bias and epoch == self.epoch - 1 and len(inputs) == 1

    def record(self, net: nn.Module, fed: nn.Module) -> None:
        """Start gathering ``net``'s input statistics on what ``fed`` receives (replacing a running one)."""
        self.stop()
        self._recorder = _Recorder(net, fed)

    def stop(self, keep: bool = False) -> None:
        """Stop gathering; ``keep``: what was gathered (if anything) becomes the fold statistics."""
        if self._recorder is None:
            return
        self._recorder.remove()
        if keep and self._recorder.samples:
            self.fold_stats = self._recorder.stats
        self._recorder = None

    @property
    def recording(self) -> bool:
        return self._recorder is not None

    # -- the cut --------------------------------------------------------------------------------------
    def due(self, epoch: int) -> bool:
        return not self.done and epoch >= self.epoch

    def cut(self, net: nn.Module, inputs: tuple, optimizers=None):
        """Cut ``net`` by the policy; point ``optimizers`` (if given) at its new parameters, in place.

        Returns ``(report, warnings)``: the ``PruneReport`` and the messages the cut raised.
        Raises ``NothingCutError`` for a percent or FLOPs budget that removes nothing.
        """
        self.stop(keep=True)  # a loop that cuts mid-epoch (by iteration) may still be recording
        if self.distill is not None:
            self.distill.take(net)  # after stop(): the recorder's hook must not be copied along
        device = next(iter(net.parameters()), torch.empty(0)).device
        stats = self.fold_stats
        if stats is not None:  # from a checkpoint they may sit on the CPU
            stats.model = net
            stats.to(device)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = prune(net, inputs, min_channels=self.min_channels, round_to=self.round_to,
                           fold_bias=self.fold_bias, leaf_modules=self.leaf_modules, within=self.within,
                           cut_frozen=self.cut_frozen, input_stats=stats, **{self.policy: getattr(self, self.policy)},
                           **(self.latency if self.policy == "target_latency" else {}))
        self.fold_stats = None  # spent: no later checkpoint carries anything of the data
        self.plan, self.done = net.slimnet_plan, True
        for optimizer in optimizers or ():
            retarget_optimizer(optimizer, report.before, net, report.pass_plan, keep_state=self.carry_optimizer_state)
        return report, [str(w.message) for w in caught]

    def carry_into(self, old: list, new: list, net: nn.Module, report) -> None:
        """After a restart: the rebuilt optimizers take the surviving channels' state (if carried)."""
        if self.carry_optimizer_state:
            for before, after in zip(old, new):
                carry_optimizer_state(before, after, net, report)

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"done": self.done, PLAN_KEY: self.plan.to_json() if self.plan is not None else ""}
        if self.fold_stats is not None and not self.done:  # a resume at the cut folds as the run would have
            state["fold_stats"] = self.fold_stats.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.done = state.get("done", False)
        self.plan = PrunePlan.from_json(state[PLAN_KEY]) if state.get(PLAN_KEY) else None
        self.fold_stats = None
        if state.get("fold_stats") and not self.done:
            self.fold_stats = InputStats(None)
            self.fold_stats.load_state_dict(state["fold_stats"])

    @staticmethod
    def replay(net: nn.Module, state: dict) -> bool:
        """Cut a freshly built ``net`` to the widths ``state`` was saved at, before weights load into it."""
        if state.get(PLAN_KEY) and getattr(net, "slimnet_plan", None) is None:
            replay_plan(net, PrunePlan.from_json(state[PLAN_KEY]))
            return True
        return False


class _Recorder:
    """Input statistics of every layer of ``net`` (what β folding reads), gathered on real batches.

    A pre-hook on ``fed`` (the module whose input is ``net``'s input during training) runs ``net`` once
    more on the first samples of each batch, in eval mode and without gradients, as the fold's own
    forward would, until ``FOLD_SAMPLES`` samples or ``FOLD_BYTES`` of inputs are seen. Only the
    per-feature mean, minimum and maximum stay: no sample is kept, nor written to a checkpoint.
    """

    def __init__(self, net: nn.Module, fed: nn.Module):
        self.net, self.stats = net, InputStats(net)
        self.samples = self.bytes = 0
        self._busy = False  # the extra forward passes through ``fed`` again
        self._handle = fed.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, inputs, kwargs) -> None:
        # positional, or by keyword as mmengine's models are called (``model(inputs=…, mode=…)``)
        x = inputs[0] if inputs else kwargs.get("inputs", kwargs.get("x"))
        x = x if isinstance(x, torch.Tensor) else None
        if self._busy or x is None or x.dim() == 0 or self.samples >= FOLD_SAMPLES:
            return
        per_sample = max(x[:1].numel() * x.element_size(), 1)
        room = min(FOLD_SAMPLES - self.samples, (FOLD_BYTES - self.bytes) // per_sample, len(x))
        if room <= 0:
            return
        self._busy = True
        try:
            with torch.no_grad(), preserved_modes(self.net), self.stats.recording():
                self.net.eval()(x[:room].detach())
        finally:
            self._busy = False
        self.samples += room
        self.bytes += room * per_sample

    def remove(self) -> None:
        self._handle.remove()
