"""Where the time of a pruned model goes: each op kind's share of CPU time, unpruned vs pruned.

    python scripts/profile_ops.py                    # vgg_small, 70% of channels cut (random γ), batch 16
    python scripts/profile_ops.py --percent 0.5 --batch 1

Why latency falls less than FLOPs: convs cost ~channels² and shrink fast, but pooling, BatchNorm and
ReLU cost ~channels and shrink slowly, so their share of the time grows as the cut deepens. One thread
(steady numbers on a shared machine), eval mode, ``torch.inference_mode()``, 50 profiled calls after 10
warm-up calls.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from bench_latency import DEFAULT, pruned, random_gammas  # the same cut as bench_latency's random-γ rows
from torch.profiler import profile

from slimnet.models.build import build_model


def op_shares(model: torch.nn.Module, x: torch.Tensor, calls: int = 50) -> tuple[float, dict[str, float]]:
    """(ms per call, {op name: share of self CPU time}) for one model."""
    with torch.inference_mode():
        for _ in range(10):
            model(x)
        with profile() as prof:
            for _ in range(calls):
                model(x)
    times: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        times[event.key] += event.self_cpu_time_total
    total = sum(times.values())
    return total / calls / 1e3, {k: v / total for k, v in sorted(times.items(), key=lambda kv: -kv[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--percent", type=float, default=0.7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    unpruned = random_gammas(build_model(DEFAULT)).eval()
    cut, report = pruned(unpruned, torch.randn(1, 1, 28, 28), percent=args.percent)
    x = torch.randn(args.batch, 1, 28, 28)
    results = {name: op_shares(m, x) for name, m in (("unpruned", unpruned), ("pruned", cut))}
    ops = list(results["unpruned"][1])[: args.top]
    print(f"vgg_small, batch {args.batch}, percent={args.percent}: FLOPs ÷ "
          f"{report['flops_before'] / report['flops_after']:.2f}, time ÷ "
          f"{results['unpruned'][0] / results['pruned'][0]:.2f}\n")
    print("| op | unpruned share | pruned share |\n|---|---|---|")
    for op in ops:
        print(f"| {op} | {100 * results['unpruned'][1][op]:.1f}% | {100 * results['pruned'][1].get(op, 0):.1f}% |")


if __name__ == "__main__":
    main()
