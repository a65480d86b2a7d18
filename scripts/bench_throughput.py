"""Training throughput: slimnet's Lightning pipeline vs a bare PyTorch loop, and the cost of the L1 term.

    python scripts/bench_throughput.py             # ~3 min on 2 CPU cores; writes docs/bench_throughput.json

Same model (the default vgg_small), same Fashion-MNIST batches (128, flip+crop on the batch), same SGD.
Each measurement times ``--batches`` optimizer steps after ``--warmup`` steps, in interleaved rounds
(A B … B A) so drift of the machine hits both sides alike; the median round is reported, and under
"paired" the median over rounds of each comparison's ratio within the round.

1. Lightning ``SlimModule`` (λ = 2e-3; λ's value does not change a step's cost) vs a hand-written loop
   doing the same work (forward, cross-entropy, backward, λ·sign(γ), SGD step): images per second.
2. λ = 1e-4 vs λ = 0 in the Lightning pipeline: step time; plus the L1 call itself timed alone.
3. ``channels_last=true`` (NHWC, the default) vs NCHW training in the Lightning pipeline, for the unpruned
   model (the sparse phase) and for the widths a default run keeps (the fine-tune phase).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from slimnet.data import FashionMNISTDataModule, random_flip_crop
from slimnet.deploy.latency import cpu_name
from slimnet.sparsity.step import add_l1_subgradient, bn_gammas
from slimnet.tasks.classification.module import SlimModule

ROOT = Path(__file__).resolve().parents[1]
# Conv widths a real default run kept (seed 0, NCHW; its results.json): the model a fine-tune phase trains.
PRUNED = {"arch": "vgg", "cfg": [24, "M", 52, "M", 63, 62, "M", 33, 86]}
OPTIM = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True, "schedule": "constant"}


def make_module(lam: float, channels_last: bool = False, arch: dict | None = None) -> SlimModule:
    torch.manual_seed(0)
    return SlimModule(model_config={**(arch or {"arch": "vgg_small"}), "num_classes": 10, "in_channels": 1},
                      optim=OPTIM, sparsity={"lam": lam, "gamma_init": 0.5}, channels_last=channels_last)


class _StepClock(pl.Callback):
    """Wall time from the first timed step's start to the last step's end."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.images = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.images += len(batch[1])
            self.end = time.perf_counter()


def lightning_rate(dm, lam: float, batches: int, warmup: int, **module_args) -> float:
    clock = _StepClock(warmup)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=warmup + batches, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[clock], accelerator="auto", devices=1)
    trainer.fit(make_module(lam, **module_args), datamodule=dm)
    return clock.images / (clock.end - clock.start)


def bare_rate(dm, lam: float, batches: int, warmup: int) -> float:
    module = make_module(lam)
    model = module.model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=OPTIM["lr"], momentum=OPTIM["momentum"],
                                weight_decay=OPTIM["weight_decay"], nesterov=True)
    criterion = nn.CrossEntropyLoss()
    gammas = bn_gammas(model)
    images, start = 0, None
    for i, (x, y) in enumerate(dm.train_dataloader()):
        if i == warmup:
            start = time.perf_counter()
        if i == warmup + batches:
            break
        x, y = _augment(dm, (x, y))
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        add_l1_subgradient(gammas, lam)
        optimizer.step()
        if i >= warmup:
            images += len(y)
    return images / (time.perf_counter() - start)


def l1_call_seconds(repeats: int = 2000) -> float:
    model = make_module(1e-4).model
    gammas = bn_gammas(model)
    for g in gammas:
        g.grad = torch.zeros_like(g)
    start = time.perf_counter()
    for _ in range(repeats):
        add_l1_subgradient(gammas, 1e-4)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    dm = FashionMNISTDataModule(batch_size=128)
    dm.setup("fit")

    runs = {
        "lightning": lambda: lightning_rate(dm, 2e-3, args.batches, args.warmup),
        "bare": lambda: bare_rate(dm, 2e-3, args.batches, args.warmup),
        "lam=1e-4": lambda: lightning_rate(dm, 1e-4, args.batches, args.warmup),
        "lam=0": lambda: lightning_rate(dm, 0.0, args.batches, args.warmup),
        "channels_last": lambda: lightning_rate(dm, 2e-3, args.batches, args.warmup, channels_last=True),
        "pruned": lambda: lightning_rate(dm, 0.0, args.batches, args.warmup, arch=PRUNED),
        "pruned channels_last": lambda: lightning_rate(dm, 0.0, args.batches, args.warmup, arch=PRUNED,
                                                       channels_last=True),
    }
    rates = {name: [] for name in runs}
    for i in range(args.rounds):
        for name in list(runs) if i % 2 == 0 else reversed(runs):  # A B … B A: drift hits both sides
            rates[name].append(runs[name]())
    med = {k: statistics.median(v) for k, v in rates.items()}

    def paired(a: str, b: str) -> float:
        """Median over rounds of a/b within each round: the comparison interleaving is meant for."""
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    step_seconds = 128 / med["lam=0"]
    l1_seconds = l1_call_seconds()
    result = {
        "images_per_second": med,
        "rounds": rates,
        "lightning_vs_bare": med["lightning"] / med["bare"],
        "l1_step_time_overhead": med["lam=0"] / med["lam=1e-4"] - 1,
        "l1_call_seconds": l1_seconds,
        "l1_call_share_of_step": l1_seconds / step_seconds,
        "channels_last_vs_nchw": med["channels_last"] / med["lightning"],
        "pruned_channels_last_vs_nchw": med["pruned channels_last"] / med["pruned"],
        "paired": {"lightning_vs_bare": paired("lightning", "bare"),
                   "l1_step_time_overhead": paired("lam=0", "lam=1e-4") - 1,
                   "channels_last_vs_nchw": paired("channels_last", "lightning"),
                   "pruned_channels_last_vs_nchw": paired("pruned channels_last", "pruned")},
        "cpu": cpu_name(),
        "batches": args.batches, "torch_threads": torch.get_num_threads(),
    }
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "bench_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"Lightning {med['lightning']:.0f} img/s vs bare loop {med['bare']:.0f} img/s "
          f"-> {result['lightning_vs_bare']:.3f}x")
    print(f"step time λ=1e-4 vs λ=0: {100 * result['l1_step_time_overhead']:+.2f}% "
          f"(the L1 call alone: {1e6 * result['l1_call_seconds']:.0f} µs = "
          f"{100 * result['l1_call_share_of_step']:.2f}% of a {1e3 * step_seconds:.0f} ms step)")
    print("per-round ratios, median: " + ", ".join(f"{k} {v:.3f}" for k, v in result["paired"].items()))
    print(f"channels_last vs NCHW: unpruned {med['channels_last']:.0f} vs {med['lightning']:.0f} img/s "
          f"({result['channels_last_vs_nchw']:.2f}x); pruned widths {med['pruned channels_last']:.0f} vs "
          f"{med['pruned']:.0f} img/s ({result['pruned_channels_last_vs_nchw']:.2f}x)")


def _augment(dm, batch):
    """The datamodule's on-device flip + crop, called by hand as a bare loop would."""
    x, y = batch
    return random_flip_crop(x, dm.pad, dm._fill().to(x.device, x.dtype)), y


if __name__ == "__main__":
    main()
