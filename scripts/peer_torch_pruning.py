"""Torch-Pruning's slimming as a peer in slimnet's own pipeline: its channel choice, its surgery (no β
folding), at slimnet's FLOPs budget, then slimnet's fine-tuning — so only the cut differs.

Benchmark-only (``pip install torch-pruning``); slimnet never imports it.

    python scripts/peer_torch_pruning.py <a finished slimnet run dir> <output dir> [--normalizer mean|none]

resumes that run's own config from its ``checkpoints/sparse.ckpt`` (the end of its sparse phase), cuts the
sparse model with ``tp.pruner.BNScalePruner(BNScaleImportance(normalizer=…), global_pruning=True)`` at
the pruning ratio whose FLOPs are the largest within ``prune.target_flops``, and fine-tunes it exactly as
the run did. ``normalizer=mean`` is Torch-Pruning's default (each group's |γ| divided by its mean);
``none`` ranks raw |γ| globally, as Liu et al. do. The cut is recorded as a slimnet plan (the channels
Torch-Pruning removed), so checkpoints reload; the script checks that the model slimnet's surgery cut by
that plan computes what Torch-Pruning's pruned copy computes.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from slimnet.engine.measure import count_flops
from slimnet.engine.plan import plan_for
from slimnet.engine.surgery import replay_plan
from slimnet.graph import trace_channel_groups
from slimnet.loops.lightning.slimming_callback import SlimmingCallback, _to
from slimnet.run import pipeline
from slimnet.tasks.classification import plugin as classification


class TorchPruningCut(SlimmingCallback):
    """``SlimmingCallback`` whose cut is Torch-Pruning's; the rest (timing, evaluation, new optimizer,
    checkpoints) is the callback's own."""

    normalizer: str | None = "mean"

    @property
    def state_key(self) -> str:  # the sparse checkpoint's state was saved under SlimmingCallback's key
        return self._generate_state_key(module=self.module).replace(type(self).__qualname__, "SlimmingCallback", 1)

    def _cut(self, trainer, pl_module) -> dict:
        import torch_pruning as tp

        target = self._target(pl_module)
        x = _to(self._inputs, pl_module.device)[0].contiguous()
        target.to(memory_format=torch.contiguous_format)
        was_training = target.training
        target.eval()
        flops0, params0 = count_flops(target, (x,))
        budget = self.core.target_flops * flops0
        head = [n for n, m in target.named_modules() if isinstance(m, torch.nn.Linear)][-1:]  # the classifier stays

        def tp_cut(ratio: float):
            probe = copy.deepcopy(target)
            pruner = tp.pruner.BNScalePruner(probe, x, tp.importance.BNScaleImportance(normalizer=self.normalizer),
                                             global_pruning=True, pruning_ratio=ratio,
                                             ignored_layers=[probe.get_submodule(n) for n in head])
            pruner.step()
            return probe, pruner.pruning_history(), count_flops(probe, (x,))[0]

        lo, hi = 0.0, 0.99  # bisection on the ratio: the largest FLOPs within budget
        best = None
        for _ in range(14):
            mid = (lo + hi) / 2
            probe, history, flops = tp_cut(mid)
            if flops <= budget:
                hi, best = mid, (mid, probe, history, flops)
            else:
                lo = mid
        if best is None:
            raise RuntimeError(f"Torch-Pruning: no ratio up to {hi} reaches target_flops={self.core.target_flops}")
        ratio, probe, history, _ = best

        if self.distill is not None:  # the same teacher as slimnet's cut takes: the model right before it
            self.distill.take(target)
        graph = trace_channel_groups(target, (x,))
        removed = {name: idxs for name, is_out, idxs in history if is_out}
        kept = {}
        for group in graph.groups:
            names = [p for p in group.producers if p in removed]
            if names:
                gone = set(removed[names[0]])
                kept[group.id] = torch.tensor(sorted(set(range(group.size)) - gone), dtype=torch.long)
        unmatched = set(removed) - {p for g in graph.groups for p in g.producers}
        if unmatched:
            raise RuntimeError(f"Torch-Pruning cut layers slimnet's graph has no group for: {sorted(unmatched)}")
        plan = plan_for(graph, kept, policy={"torch_pruning": {"normalizer": self.normalizer, "ratio": ratio}})
        with torch.no_grad():
            replay_plan(target, plan)  # the model is uncut until now: the plan is its whole cut
            same = torch.allclose(target(x), probe(x), atol=1e-5, rtol=1e-4)
        if not same:
            raise RuntimeError("slimnet's surgery by Torch-Pruning's channels differs from Torch-Pruning's model")
        target.train(was_training)
        self.core.plan, self.core.done = target.slimnet_plan, True
        self._rewrap(trainer)
        trainer.strategy.setup_optimizers(trainer)  # the CLI's fine-tune optimizer and schedule (restart_schedule)
        self._new_checkpoint_phase(trainer)
        flops1, params1 = count_flops(target, (x,))
        return {"threshold": float("nan"), "policy": f"torch_pruning(normalizer={self.normalizer})",
                "module": self.module, "floored": [], "warnings": [], "tp_ratio": ratio,
                "flops_before": flops0, "flops_after": flops1, "params_before": params0, "params_after": params1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished slimnet run with checkpoints/sparse.ckpt")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--normalizer", choices=["mean", "none"], default="mean")
    parser.add_argument("--distill", action="store_true", help="fine-tune with the uncut model as teacher")
    args = parser.parse_args()
    sparse = args.run_dir / "checkpoints" / "sparse.ckpt"
    if not sparse.is_file():
        sys.exit(f"error: {sparse} does not exist; give the directory of a finished pruned slimnet run")
    cfg = OmegaConf.load(args.run_dir / ".hydra" / "config.yaml")
    if cfg.prune.get("target_flops") is None:
        sys.exit("error: the run has no prune.target_flops; the peer is cut to the run's FLOPs budget")
    cfg.ckpt_path, cfg.resume = str(sparse), None
    cfg.prune.reuse_sparse, cfg.prune.fold_bias = False, False
    cfg.save_artifact, cfg.latency.enabled = False, False
    cfg.finetune.distill = bool(args.distill)
    TorchPruningCut.normalizer = None if args.normalizer == "none" else args.normalizer
    classification.SlimmingCallback = TorchPruningCut  # the task builds this class in place of its own
    results = pipeline.train(cfg, args.out_dir)
    print(json.dumps({k: results[k] for k in ("test_acc", "flops_reduction", "val_acc_after_cut")}))


if __name__ == "__main__":
    main()
