"""``PruneReport``: what one cut did, as a typed record (``slimnet.prune`` and ``prune_zeroed`` return it)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from slimnet.engine.optim_state import ParamSnapshot
from slimnet.engine.plan import PrunePlan


@dataclass
class PruneReport:
    """The outcome of a cut.

    Attributes:
        flops_before, flops_after: FLOPs of one forward pass on a batch of one (2 × MACs).
        params_before, params_after: parameter counts.
        threshold: the |γ| threshold used: the largest |γ| cut when the policy was ``percent`` or
            ``target_flops`` (None when the plan did not come from |γ|).
        threshold_reproduces: whether ``prune(model, x, thresh=threshold)`` on the same model gives the
            very same plan: False when the cut split a tie of equal |γ| by β (the warnings say which
            tie and which policy reproduces it); None without a threshold.
        channels: module name -> ``[before, after]`` for every layer whose width changed.
        groups: one summary per channel group (its layers, size, kept count, whether it could be cut).
        floored: layers kept at ``min_channels`` although more of their |γ| were under the threshold.
        warnings: what was left whole, and why.
        folded: layers whose bias absorbed the removed channels' constant outputs.
        seconds: wall time per step.
        plan: the model's plan over all cuts so far (what ``save_pruned`` stores).
        pass_plan: this cut's plan alone (what ``carry_optimizer_state`` needs).
        details: entry-specific extras (``prune_zeroed``: ``zeroed_kept``, ``masks_removed``).

    Also readable as a mapping (``report["flops_after"]``) for code written against the old dict.
    """

    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    threshold: float | None = None
    threshold_reproduces: bool | None = None
    channels: dict[str, list[int]] = field(default_factory=dict)
    groups: list[dict] = field(default_factory=list)
    floored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    plan: PrunePlan = field(default_factory=PrunePlan)
    pass_plan: PrunePlan = field(default_factory=PrunePlan)
    details: dict = field(default_factory=dict)
    before: ParamSnapshot | None = field(default=None, repr=False, compare=False)

    @property
    def flops_reduction(self) -> float:
        return 1 - self.flops_after / self.flops_before if self.flops_before else 0.0

    @property
    def params_reduction(self) -> float:
        return 1 - self.params_after / self.params_before if self.params_before else 0.0

    def _names(self) -> list[str]:
        return [f.name for f in fields(self) if f.name not in ("before", "details")]

    def __getitem__(self, key: str):
        if key in self._names():
            return getattr(self, key)
        return self.details[key]

    def __setitem__(self, key: str, value) -> None:
        if key in self._names():
            setattr(self, key, value)
        else:
            self.details[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self._names() or key in self.details

    def get(self, key: str, default=None):
        return self[key] if key in self else default

    def to_dict(self) -> dict:
        """JSON-ready: every field but the plans and the snapshot, and the details inline."""
        out = {name: getattr(self, name) for name in self._names() if name not in ("plan", "pass_plan")}
        return {**out, **self.details}
