"""Fake → real: turn zeroed filters and ``torch.nn.utils.prune`` masks into a genuinely smaller model.

Structured pruning by masking (``torch.nn.utils.prune.ln_structured``, Lightning's ``ModelPruning``) or
by zeroing leaves the model its full size. ``prune_zeroed`` makes the masks permanent, finds the output
channels whose filters are zero, and removes them the way ``prune`` does: from every layer of their
channel group, and from every layer that reads them (which a rewrite of the zeroed layer alone forgets).

Semantics (what "zeroed" means, and why outputs stay the same):

* A channel is a candidate when its filter's weights are zero in *every* producer of its group (each
  conv or linear that writes it; for a residual sum, both branches). ``ln_structured`` masks weights
  only, so a bias may remain: the channel is then a constant, not zero.
* Nor does a zero filter make a zero channel when a BatchNorm follows: it emits ``β - γ·μ/σ`` (eval
  mode), an activation maps that to another constant, and that constant reaches the consumers. Removing
  the channel removes the constant too, so it is folded into the consumers' bias (``slimnet.engine.fold``).
* Exact by default: a candidate is removed only if its value at every consumer is zero, or a constant
  that folds exactly (into a linear layer or a conv without zero padding). A nonzero constant read by a
  zero-padded conv differs at the border (the conv reads padding there), so such a channel is kept, with
  a warning; ``exact=False`` removes it anyway (exact in the interior). Values are read at each
  consumer's input during an eval-mode forward on the example inputs, so every path (a depthwise conv
  with padding in between, an SE multiply) is accounted for. The forward sees the example inputs and
  a random batch of the same shape, so a channel scaled by something that depends on the input (a
  per-sample gate) is never mistaken for a constant.
* Channels are removed only where the graph understands them (the same groups ``prune`` cuts, here
  with or without a BatchNorm); each layer keeps at least one channel, and a grouped conv's blocks lose
  the same number each.

Knows nothing of Lightning or Hydra.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from slimnet.engine.cut import run_surgery
from slimnet.engine.fold import InputStats, exactly_removable
from slimnet.engine.plan import PlanDecision, drop_untied, plan_for
from slimnet.graph import ChannelGraph, ChannelGroup


def make_masks_permanent(model: nn.Module) -> list[str]:
    """``torch.nn.utils.prune.remove`` every pruning reparametrisation (``weight_orig`` × ``weight_mask``
    and its forward pre-hook), leaving plain parameters with the masked entries zero. Returns the
    tensors that were masked, as ``module.name``."""
    done = []
    for module_name, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(module, hook._tensor_name)
                done.append(f"{module_name}.{hook._tensor_name}" if module_name else hook._tensor_name)
    return done


@torch.no_grad()
def zero_filters(module: nn.Module) -> torch.Tensor:
    """Per output channel of a conv or linear layer: are its weights all exactly zero (its output is
    then its bias, whatever the input)?"""
    return (module.weight.detach().flatten(1) == 0).all(1).cpu()


def _removable(group: ChannelGroup, modules: dict, stats: InputStats, exact: bool, fold: bool):
    """(zero in every producer, and removable without changing outputs) per channel of ``group``."""
    zero = torch.ones(group.size, dtype=torch.bool)
    for ref in group.refs:
        if ref.kind == "out":
            zero &= zero_filters(modules[ref.module])[ref.offset: ref.offset + group.size]
    if not exact or not bool(zero.any()):
        return zero, zero
    ok = zero.clone()
    for ref in group.refs:
        if ref.kind != "in":
            continue
        measured = stats.get(ref.module)
        if measured is None:  # never ran in the forward: cannot vouch for anything it reads
            return zero, torch.zeros_like(zero)
        feature_ok = exactly_removable(modules[ref.module], measured, fold).cpu()
        span = feature_ok[ref.offset: ref.offset + group.size * ref.mult]
        ok &= span.view(group.size, ref.mult).all(1)
    return zero, ok


def _with_random_twin(example_inputs) -> tuple:
    """The example batch followed by as many random samples (same mean and spread; integer inputs
    repeated): constants must hold across different inputs. Uses its own generator, not the global one."""
    gen = torch.Generator().manual_seed(0)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            twin = x
            if x.is_floating_point():
                noise = torch.randn(x.shape, generator=gen).to(x)
                spread = x.float().std() if x.numel() > 1 else x.new_zeros(())
                twin = noise * (spread if spread > 0 else 1) + x.float().mean().to(x)
            x = torch.cat([x, twin])
        out.append(x)
    return tuple(out)


def _even_removal(removable: torch.Tensor, blocks: int) -> torch.Tensor:
    """Kept channel indices: drop removable ones, the same number per block, at least one kept per block."""
    per_block = removable.view(blocks, -1)
    n_drop = min(int(per_block.sum(1).min()), per_block.shape[1] - 1)
    drop = torch.zeros_like(per_block)
    for b in range(blocks):
        drop[b, torch.nonzero(per_block[b]).flatten()[:n_drop]] = True
    return torch.nonzero(~drop.flatten()).flatten()


def prune_zeroed(model: nn.Module, example_inputs, *, exact: bool = True, fold_bias: bool = True,
                 leaf_modules=()) -> dict:
    """Remove zeroed output channels (zero filters, or ``torch.nn.utils.prune`` masks) for real, in place.

    Args:
        model: any traceable ``nn.Module``; BatchNorm is not needed.
        example_inputs: a tensor (or tuple) the model takes; one eval-mode forward on it reads the
            values removed channels carry to their consumers.
        exact: only remove channels whose removal provably keeps the outputs (see the module docstring);
            ``False`` also removes zeroed channels whose constant output reaches a zero-padded conv.
        fold_bias: fold removed channels' constant outputs into the consumers' bias (without it, only
            channels that are zero at every consumer are exact to remove).
        leaf_modules: module classes kept as black boxes when tracing.

    Returns:
        the same report as ``slimnet.prune`` (``threshold`` is None), plus ``masks_removed`` (the
        ``torch.nn.utils.prune`` masks made permanent) and ``zeroed_kept`` (zeroed channels left in
        place because removing them would change outputs).
    """
    masks = make_masks_permanent(model)
    modules = dict(model.named_modules())
    kept_back: dict[str, int] = {}

    def choose(graph: ChannelGraph, stats: InputStats) -> PlanDecision:
        kept = {}
        for group in graph.groups:
            if not group.sliceable:
                continue
            zero, removable = _removable(group, modules, stats, exact, fold_bias)
            n_back = int((zero & ~removable).sum())
            if n_back:
                kept_back[group.describe()] = n_back
            if bool(removable.any()):
                keep = _even_removal(removable, group.blocks)
                if len(keep) < group.size:
                    kept[group.id] = keep
        kept = drop_untied(graph, kept)  # chunk parts, a grouped conv's concatenated inputs: all or none
        plan = plan_for(graph, kept, policy={"zeroed": True, "exact": exact})
        return PlanDecision(plan=plan, threshold=None, kept=kept)

    report = run_surgery(model, example_inputs, choose, fold_bias=fold_bias, measure_inputs=True,
                         stats_inputs=_with_random_twin(example_inputs), leaf_modules=leaf_modules,
                         caller="prune_zeroed")
    if kept_back:
        warnings.warn(
            f"prune_zeroed: kept {sum(kept_back.values())} zeroed channel(s) in place, in "
            + "; ".join(f"{layers} ({n})" for layers, n in kept_back.items())
            + ": their output is not zero (a BatchNorm after a zero filter emits a constant) and reaches a "
            "zero-padded conv, which reads padding instead of it at the border, so removing them would change "
            "the outputs. Hint: exact=False removes them too, folding their mean into the bias (exact away "
            "from the border).", stacklevel=2)
    report["masks_removed"] = masks
    report["zeroed_kept"] = kept_back
    return report
