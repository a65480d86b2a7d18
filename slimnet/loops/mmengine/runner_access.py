"""The pieces of an mmengine ``Runner`` the hooks reach for: the model under its wrapper, the torch
optimizers under the optimizer wrappers, a batch for the trace, the DDP wrapper and EMA copies a cut
makes stale, and the checkpoint's ``meta`` entry the hooks' state travels in."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.registry import MODELS
from mmengine.runner import IterBasedTrainLoop
from torch import nn

META_KEY = "slimnet"  # checkpoint["meta"]["slimnet"] = {"slimming": …, "sparsity": …}


def model_of(runner) -> nn.Module:
    """The runner's model without its DDP (or other) wrapper."""
    return runner.model.module if is_model_wrapper(runner.model) else runner.model


def optimizers_of(optim_wrapper) -> list[torch.optim.Optimizer]:
    """The torch optimizers under an ``OptimWrapper`` / ``OptimWrapperDict`` (none before it is built:
    in a test or val run the runner holds its config, a dict)."""
    if isinstance(optim_wrapper, OptimWrapperDict):
        return [w.optimizer for w in optim_wrapper.optim_wrappers.values()]
    if isinstance(optim_wrapper, OptimWrapper):
        return [optim_wrapper.optimizer]
    return []


def accumulation(optim_wrapper) -> int:
    """Micro-batches per optimizer update (``accumulative_counts``; the first wrapper's for a dict)."""
    wrappers = (list(optim_wrapper.optim_wrappers.values()) if isinstance(optim_wrapper, OptimWrapperDict)
                else [optim_wrapper])
    return max(int(getattr(wrappers[0], "_accumulative_counts", 1) or 1), 1) if wrappers else 1


def by_iteration(runner) -> bool:
    """Whether the runner trains by iterations (``IterBasedTrainLoop``: mmseg's default) or by epochs."""
    return isinstance(runner.train_loop, IterBasedTrainLoop)


def slimnet_meta(checkpoint: dict) -> dict:
    """What the hooks stored in a checkpoint (empty for any other checkpoint)."""
    meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
    return (meta or {}).get(META_KEY) or {}


def store_meta(checkpoint: dict, key: str, state: dict) -> None:
    checkpoint.setdefault("meta", {}).setdefault(META_KEY, {})[key] = state


@contextlib.contextmanager
def isolated_rng():
    """The global random streams (Python, NumPy, torch, CUDA) as they were on entry, on exit: taking a
    batch for the trace must not change what the run draws afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _first_sample(batch):
    """A collated batch cut to its first sample: lists, tuples and tensors along their first axis."""
    if isinstance(batch, dict):
        return {k: _first_sample(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple, torch.Tensor)) and len(batch) > 0:
        return batch[:1]
    return batch


@torch.no_grad()
def example_input(runner, model: nn.Module, who: str) -> torch.Tensor:
    """One training sample as the model receives it: the first sample of a training batch through the
    model's ``data_preprocessor`` (``training=False``: no batch augmentation), a (1, C, H, W) tensor."""
    loader = runner.train_dataloader
    with isolated_rng():
        try:
            batch = next(iter(loader))
        except StopIteration:
            raise ValueError(f"{who}: the training data loader is empty") from None
    data = model.data_preprocessor(_first_sample(batch), False)
    if isinstance(data, dict):
        inputs = data.get("inputs")
    else:
        inputs = data[0] if isinstance(data, (tuple, list)) else None
    if not torch.is_tensor(inputs):
        raise ValueError(f"{who}: {type(model.data_preprocessor).__name__} gives inputs of type "
                         f"{type(inputs).__name__}; the cut traces a batched tensor (stack the inputs in "
                         "the data preprocessor, e.g. ImgDataPreprocessor, or "
                         "collate_fn=dict(type='default_collate'))")
    return inputs[:1]


def rewrap(runner) -> None:
    """A DDP wrapper holds the parameters it was built over: after a cut (or a replay) wrap the cut model
    anew (broadcasting rank 0's weights), or the ranks would stop averaging gradients, silently."""
    if is_model_wrapper(runner.model) and runner.distributed:
        runner.model = runner.wrap_model(runner.cfg.get("model_wrapper_cfg"), runner.model.module)


def refresh_ema(runner, model: nn.Module) -> int:
    """EMA hooks (mmengine's ``EMAHook``, mmdet's ``ExpMomentumEMA``) keep a full-width copy of the model
    built before the cut: build it again from the cut model (its average restarts at the cut weights).
    Returns how many were rebuilt."""
    rebuilt = 0
    for hook in runner.hooks:
        ema = getattr(hook, "ema_model", None)
        if ema is None or not hasattr(hook, "ema_cfg"):
            continue
        hook.ema_model = MODELS.build(hook.ema_cfg, default_args={"model": model})
        hook.src_model = model
        rebuilt += 1
    return rebuilt
