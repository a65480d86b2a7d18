"""The mmengine adapter: the two hooks inside a real ``Runner`` (cut at the epoch, checkpoint, resume,
load_from), on mmdet's own ResNet-50 + FPN (frozen stages, norm_eval, the cut across the backbone's
boundary), the sparsity step under mmengine's optimizer wrappers, and one-line config errors.

mmengine 0.10 reopens its own checkpoints with ``torch.load``'s default, ``weights_only=True`` since
torch 2.6, which refuses the numpy objects of its message hub: the runs that load one set
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (mmengine's own advice) for mmengine's loads only.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("mmengine", reason="the mmengine adapter needs: pip install -e '.[mmengine]'")

from mmengine.evaluator import BaseMetric, Evaluator
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from mmengine.runner.checkpoint import CheckpointLoader

import slimnet
from slimnet.core import Sparsity
from slimnet.loops.mmengine import (
    SlimnetSlimmingHook,
    SlimnetSparsityHook,
    Trunk,
    checkpoint_plan,
    load_checkpoint,
)
from slimnet.modes import preserved_modes

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py
DOC = Path(__file__).resolve().parents[1] / "docs" / "loops" / "mmengine.md"


# -- a small mmengine model, data and metric ------------------------------------------------------------
class TinyNet(BaseModel):
    def __init__(self, width: int = 16, classes: int = 4):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, inputs, data_samples=None, mode="tensor"):
        logits = self.head(self.backbone(inputs))
        if mode == "loss":
            return {"loss": F.cross_entropy(logits, data_samples)}
        if mode == "predict":
            return list(zip(logits.argmax(1), data_samples))
        return logits


class Accuracy(BaseMetric):
    default_prefix = "val"

    def process(self, data_batch, data_samples):
        self.results.extend(int(p == t) for p, t in data_samples)

    def compute_metrics(self, results):
        return {"accuracy": sum(results) / len(results)}


class Shapes(torch.utils.data.Dataset):
    """Random 16x16 images whose class shows in one channel's mean."""

    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.x[torch.arange(n), self.y % 3] += 1.0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"inputs": self.x[i], "data_samples": self.y[i]}


def _loader(dataset, shuffle: bool = True, batch_size: int = 8) -> dict:
    return {"dataset": dataset, "batch_size": batch_size, "num_workers": 0,
            "collate_fn": {"type": "default_collate"},
            "sampler": {"type": "DefaultSampler", "shuffle": shuffle}}


def _runner(work_dir, hooks, model=None, epochs: int = 4, accumulate: int = 1, **kwargs) -> Runner:
    return Runner(
        model=model if model is not None else TinyNet(), work_dir=str(work_dir), log_level="WARNING",
        train_dataloader=_loader(Shapes()),
        train_cfg={"by_epoch": True, "max_epochs": epochs, "val_interval": 1},
        val_dataloader=_loader(Shapes(32, 1), shuffle=False), val_cfg={}, val_evaluator=Evaluator(Accuracy()),
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.05, "momentum": 0.9},
                       "accumulative_counts": accumulate},
        param_scheduler={"type": "MultiStepLR", "milestones": [3], "gamma": 0.1, "by_epoch": True},
        custom_hooks=hooks, default_hooks={"checkpoint": {"type": "CheckpointHook", "interval": 1}},
        randomness={"seed": 0}, experiment_name=str(work_dir), **kwargs)


def _widths(model: nn.Module) -> list[int]:
    return [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


class Watch(Hook):
    """What the runner's optimizer and learning rate are at the start of every epoch (after the cut)."""

    priority = "LOWEST"

    def __init__(self):
        self.optimizers, self.lrs, self.held = [], [], []

    def before_train_epoch(self, runner):
        optimizer = runner.optim_wrapper.optimizer
        self.optimizers.append(optimizer)
        self.lrs.append(optimizer.param_groups[0]["lr"])
        model_params = {id(p) for p in runner.model.parameters()}
        self.held.append(all(id(p) in model_params for g in optimizer.param_groups for p in g["params"]))


SLIM = [{"type": "SlimnetSparsityHook", "lam": 3e-3, "until_epoch": 2, "target": 0.3},
        {"type": "SlimnetSlimmingHook", "epoch": 2, "percent": 0.4}]


# -- the runner: cut at the epoch, checkpoint, resume, load_from ---------------------------------------------
def test_runner_cuts_at_the_epoch_resumes_exactly_and_loads_the_cut_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # mmengine's own loads (module docstring)
    watch = Watch()
    runner = _runner(tmp_path / "a", [*SLIM, watch], accumulate=2)
    full = _widths(runner.model)
    trained = runner.train()
    cut = _widths(trained)
    slim = next(h for h in runner.hooks if isinstance(h, SlimnetSlimmingHook))
    sparse = next(h for h in runner.hooks if isinstance(h, SlimnetSparsityHook))

    assert sum(cut) < sum(full) and slim.report["epoch"] == 2
    assert slim.report["flops_after"] < slim.report["flops_before"]
    # the same torch optimizer throughout, holding the cut parameters; the schedule went on where it was
    assert all(o is watch.optimizers[0] for o in watch.optimizers) and all(watch.held)
    assert watch.lrs == pytest.approx([0.05, 0.05, 0.05, 0.005])
    # the step was hooked under the OptimWrapper with accumulative_counts=2: one per update, 2 sparse
    # epochs of 8 batches -> 8 updates read by the λ controller
    assert sparse.core.controller.step == 8
    # (mmengine's own files, written just now: read as mmengine reads them, see the module docstring)
    checkpoint = CheckpointLoader.load_checkpoint(str(tmp_path / "a" / "epoch_3.pth"), map_location="cpu")
    assert checkpoint_plan(checkpoint) == slim.plan
    before_cut = CheckpointLoader.load_checkpoint(str(tmp_path / "a" / "epoch_2.pth"), map_location="cpu")
    assert checkpoint_plan(before_cut) is None

    x = torch.randn(5, 3, 16, 16)
    expected = trained.eval()(x)
    # resumed after the cut (epoch_3) and right at it (epoch_2: the cut replays, folding as the run did):
    # the same widths and, the data order and seed being the run's, the same weights
    for name in ("epoch_3.pth", "epoch_2.pth"):
        resumed = _runner(tmp_path / name, SLIM, model=TinyNet(), accumulate=2,
                          load_from=str(tmp_path / "a" / name), resume=True).train()
        assert _widths(resumed) == cut
        torch.testing.assert_close(resumed.eval()(x), expected, rtol=0, atol=1e-6)

    # a fresh runner with load_from= evaluates the cut model
    evaluating = _runner(tmp_path / "eval", SLIM, model=TinyNet(),
                         load_from=str(tmp_path / "a" / "epoch_4.pth"))
    metrics = evaluating.val()
    assert _widths(evaluating.model) == cut and 0 <= metrics["val/accuracy"] <= 1
    torch.testing.assert_close(evaluating.model.eval()(x), expected, rtol=0, atol=0)

    # outside a runner: the cut model written after training, read back with weights_only=True
    loaded = slimnet.load_pruned(tmp_path / "a" / "pruned.pt", TinyNet())
    assert _widths(loaded) == cut
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    # ... and mmengine's checkpoint through slimnet's load_checkpoint (mmdet's init_detector route)
    model = TinyNet()
    load_checkpoint(model, str(tmp_path / "a" / "epoch_4.pth"))
    torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=0)


def test_an_ema_copy_follows_the_cut_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    hooks = [*SLIM, {"type": "EMAHook", "momentum": 0.1}]
    runner = _runner(tmp_path / "a", hooks, epochs=3)
    trained = runner.train()
    ema = next(h for h in runner.hooks if type(h).__name__ == "EMAHook").ema_model.module
    assert _widths(ema) == _widths(trained) and sum(_widths(trained)) < sum(_widths(TinyNet()))
    resumed = _runner(tmp_path / "b", hooks, model=TinyNet(), epochs=3,
                      load_from=str(tmp_path / "a" / "epoch_2.pth"), resume=True).train()
    x = torch.randn(5, 3, 16, 16)
    torch.testing.assert_close(resumed.eval()(x), trained.eval()(x), rtol=0, atol=1e-6)


def test_an_iteration_based_runner_cuts_at_the_iteration(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # mmengine's own loads (module docstring)
    runner = Runner(
        model=TinyNet(), work_dir=str(tmp_path), log_level="WARNING", experiment_name=str(tmp_path),
        train_dataloader=_loader(Shapes()),
        train_cfg={"by_epoch": False, "max_iters": 12},
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.05}},
        custom_hooks=[{"type": "SlimnetSparsityHook", "lam": 3e-3, "until_iter": 6, "stats_interval": 3},
                      {"type": "SlimnetSlimmingHook", "iter": 6, "percent": 0.4}],
        default_hooks={"checkpoint": {"type": "CheckpointHook", "interval": 6, "by_epoch": False}})
    trained = runner.train()
    slim = next(h for h in runner.hooks if isinstance(h, SlimnetSlimmingHook))
    assert slim.report["iter"] == 6 and sum(_widths(trained)) < sum(_widths(TinyNet()))
    sparse = next(h for h in runner.hooks if isinstance(h, SlimnetSparsityHook))
    assert [h["lam"] for h in sparse.history] == [3e-3, 3e-3, 0.0, 0.0]  # at iterations 3, 6, 9, 12
    assert checkpoint_plan(CheckpointLoader.load_checkpoint(str(tmp_path / "iter_12.pth"), map_location="cpu")) == slim.plan


# -- the sparsity step under mmengine's optimizer wrappers -------------------------------------------------
def _amp_on_cpu(monkeypatch) -> None:
    """AmpOptimWrapper refuses to be built without an accelerator; on this CPU its GradScaler is torch's
    CPU one, which scales, unscales and skips overflowing steps exactly as the CUDA one does."""
    module = importlib.import_module("mmengine.optim.optimizer.amp_optimizer_wrapper")
    monkeypatch.setattr(module, "is_cuda_available", lambda: True)
    monkeypatch.setattr(module, "GradScaler", lambda **kw: torch.amp.GradScaler("cpu", **kw))


def _sparse_steps(wrapper_cls, lam: float, batches: list, **kwargs) -> tuple[torch.Tensor, object]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 2))
    wrapper = wrapper_cls(optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), **kwargs)
    wrapper.initialize_count_status(net, 0, len(batches))
    sparse = Sparsity(lam, mode="subgradient")
    sparse.attach(net, [wrapper.optimizer])
    for x in batches:
        wrapper.update_params(net(x).square().mean())
    return net[1].weight.detach().clone(), wrapper


def test_the_step_is_taken_once_per_update_under_accumulation_and_amp(monkeypatch):
    _amp_on_cpu(monkeypatch)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(4)]
    plain, _ = _sparse_steps(OptimWrapper, 0.5, batches, accumulative_counts=2)
    amp, wrapper = _sparse_steps(AmpOptimWrapper, 0.5, batches, accumulative_counts=2, loss_scale=1024.0)
    assert wrapper.loss_scaler.get_scale() == 1024.0  # the loss really was scaled, and no step skipped
    torch.testing.assert_close(amp, plain)  # the step saw the unscaled, accumulated update
    without, _ = _sparse_steps(OptimWrapper, 0.0, batches, accumulative_counts=2)
    # two updates of 4 micro-batches, SGD with momentum 0.9: lr·λ·(1 + (1 + 0.9)) = 0.1·0.5·2.9 on each γ > 0
    # (to 1 %: the loss gradients differ a little once γ does; a step per micro-batch would give 0.42)
    torch.testing.assert_close(without - plain, torch.full_like(plain, 0.1 * 0.5 * 2.9), rtol=1e-2, atol=0)

    # an overflow in the second update: the scaler skips the optimizer step, and the sparsity step with it
    overflow = [*batches[:2], batches[2] * float("inf"), batches[3]]
    one, wrapper = _sparse_steps(AmpOptimWrapper, 0.5, overflow, accumulative_counts=2, loss_scale="dynamic")
    assert wrapper.loss_scaler.get_scale() < 2.0**16  # the scaler saw the overflow and backed off
    first, _ = _sparse_steps(OptimWrapper, 0.5, batches[:2], accumulative_counts=2)
    torch.testing.assert_close(one, first)


# -- mmdet's ResNet-50 + FPN -------------------------------------------------------------------------------
def _mmdet_models():
    """mmdet's model registry holding ResNet and FPN. Without mmcv's compiled ops (mmcv-lite) ``import
    mmdet.models`` fails on them, so the three modules are imported alone, their packages stubbed."""
    mmdet = pytest.importorskip("mmdet", reason="pip install mmdet mmcv-lite (or mmcv)")
    if importlib.util.find_spec("mmcv._ext") is not None:
        importlib.import_module("mmdet.models")
    else:
        root = Path(mmdet.__file__).parent / "models"
        for name, folder in (("mmdet.models", root), ("mmdet.models.layers", root / "layers"),
                             ("mmdet.models.backbones", root / "backbones"),
                             ("mmdet.models.necks", root / "necks")):
            if name not in sys.modules:
                package = types.ModuleType(name)
                package.__path__ = [str(folder)]
                sys.modules[name] = package
        res_layer = importlib.import_module("mmdet.models.layers.res_layer")
        sys.modules["mmdet.models.layers"].ResLayer = res_layer.ResLayer
        importlib.import_module("mmdet.models.backbones.resnet")
        importlib.import_module("mmdet.models.necks.fpn")
    from mmdet.registry import MODELS

    return MODELS


class TinyDetector(BaseModel):
    """mmdet's ResNet-50 (frozen_stages=1, norm_eval) and an FPN with BatchNorm, and a 1x1 conv head."""

    def __init__(self, models):
        super().__init__()
        with DefaultScope.overwrite_default_scope("mmdet"):  # as an mmdet config's default_scope does
            self.backbone = models.build({"type": "ResNet", "depth": 50, "frozen_stages": 1,
                                          "norm_eval": True})
            self.neck = models.build({"type": "FPN", "in_channels": [256, 512, 1024, 2048],
                                      "out_channels": 32,
                                          "num_outs": 4, "norm_cfg": {"type": "BN"}})
        self.head = nn.Conv2d(32, 3, 1)

    def forward(self, inputs, data_samples=None, mode="tensor"):
        outs = [self.head(f) for f in self.neck(self.backbone(inputs))]
        return {"loss": sum(o.square().mean() for o in outs)} if mode == "loss" else outs


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(i))
        return {"inputs": image, "data_samples": i}


class TrunkOutputs(Hook):
    """The backbone + neck outputs on ``x`` at the start of every epoch (eval mode), at ``priority``."""

    def __init__(self, x, priority):
        self.x, self.priority, self.outputs = x, priority, {}

    def before_train_epoch(self, runner):
        with torch.no_grad(), preserved_modes(runner.model):
            self.outputs[runner.epoch] = Trunk(runner.model.eval())(self.x)


def test_mmdet_resnet50_fpn_is_cut_exactly_across_its_boundary_frozen_stages_kept(tmp_path):
    models = _mmdet_models()
    torch.manual_seed(0)
    model = TinyDetector(models)
    model.init_weights()  # the runner's own call is then a no-op: the γ set below stay
    g = torch.Generator().manual_seed(1)
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    with torch.no_grad():
        for m in norms.values():  # every γ well above the threshold ...
            m.weight.copy_(0.5 + 0.5 * torch.rand(m.num_features, generator=g))
            m.bias.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
        zeroed = {  # ... but these channels, γ = β = 0
            ("backbone.layer1.0.bn1",): [0, 1, 2],  # a frozen stage: kept whole
            ("backbone.layer2.0.bn1",): list(range(0, 128, 3)),
            ("backbone.layer3.2.bn2",): list(range(0, 256, 3)),
            # layer4's residual stream, read by FPN's lateral conv 3 (the cut crosses the boundary)
            ("backbone.layer4.0.bn3", "backbone.layer4.0.downsample.1", "backbone.layer4.1.bn3",
             "backbone.layer4.2.bn3"): list(range(0, 2048, 4)),
            # the FPN's top-down sum (its lateral convs' norms): in scope with backbone+neck
            tuple(f"neck.lateral_convs.{i}.bn" for i in range(4)): [1, 5, 9],
        }
        for names, channels in zeroed.items():
            for name in names:
                norms[name].weight[channels] = 0
                norms[name].bias[channels] = 0
    x = torch.randn(1, 3, 64, 64, generator=g)
    before, after = TrunkOutputs(x, "HIGHEST"), TrunkOutputs(x, "LOWEST")  # around the cut, at epoch 1
    runner = Runner(
        model=model, work_dir=str(tmp_path), log_level="WARNING", experiment_name=str(tmp_path),
        train_dataloader=_loader(Images(), shuffle=False, batch_size=2),
        train_cfg={"by_epoch": True, "max_epochs": 2},
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.0}},  # the zeroed channels stay zero
        custom_hooks=[{"type": "SlimnetSlimmingHook", "epoch": 1, "thresh": 0.17, "scope": "backbone+neck"},
                      before, after],
        default_hooks={"checkpoint": {"type": "CheckpointHook", "interval": 2}})
    trained = runner.train()

    for a, b in zip(before.outputs[1], after.outputs[1]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * max(1.0, a.abs().max().item()))
    widths = {n: m.num_features for n, m in trained.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert widths["backbone.layer1.0.bn1"] == 64 and widths["backbone.bn1"] == 64  # frozen: whole
    assert widths["backbone.layer2.0.bn1"] == 128 - 43 and widths["backbone.layer3.2.bn2"] == 256 - 86
    assert widths["backbone.layer4.2.bn3"] == 2048 - 512
    assert trained.neck.lateral_convs[3].conv.in_channels == 2048 - 512  # the neck's input conv lost them too
    assert widths["neck.lateral_convs.0.bn"] == 32 - 3 and trained.neck.fpn_convs[0].conv.in_channels == 29
    assert trained.neck.fpn_convs[0].conv.out_channels == 32  # the neck's outputs (the head's input) whole
    trained.train()  # norm_eval and frozen_stages still apply after the cut
    assert not any(m.training for m in trained.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.training for m in trained.neck.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(p.requires_grad for p in trained.backbone.layer1.parameters())
    assert all(p.requires_grad for p in trained.backbone.layer2.parameters())


# -- config errors: one line naming the fix, before training ----------------------------------------------
@pytest.mark.parametrize("hook, fix", [
    ({"type": "SlimnetSlimmingHook", "epoch": 2}, "needs thresh=…, percent=…, target_flops=…"),
    ({"type": "SlimnetSlimmingHook", "epoch": 2, "percent": 0.5, "scope": "head"},
     "choose one of: all, backbone"),
    ({"type": "SlimnetSlimmingHook", "percent": 0.5}, "needs epoch=… "),
    ({"type": "SlimnetSparsityHook", "lam": -1.0}, "must be a finite number >= 0"),
])
def test_a_bad_hook_config_fails_when_the_runner_is_built(tmp_path, hook, fix):
    with pytest.raises(ValueError) as err:
        _runner(tmp_path, [hook])
    assert fix in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("hook, fix", [
    ({"type": "SlimnetSlimmingHook", "epoch": 4, "percent": 0.5}, "lower it or train longer"),
    ({"type": "SlimnetSlimmingHook", "epoch": 1, "percent": 0.5, "scope": "backbone+neck"},
     "use scope='backbone'"),
    ({"type": "SlimnetSlimmingHook", "iter": 5, "percent": 0.5}, "give epoch=… instead of iter=…"),
    ({"type": "SlimnetSparsityHook", "lam": 1e-3, "until_iter": 5}, "give until_epoch=…"),
])
def test_a_hook_that_cannot_work_with_this_runner_fails_before_training(tmp_path, hook, fix):
    runner = _runner(tmp_path, [hook])
    with pytest.raises(ValueError) as err:
        runner.train()
    assert fix in str(err.value) and "\n" not in str(err.value)
    assert runner.iter == 0 and not list(tmp_path.glob("*.pth"))


# -- the documentation's example runs as written ----------------------------------------------------------
def test_the_documented_example_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.chdir(tmp_path)
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL).group(1)
    namespace: dict = {"__name__": "example"}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 -- the documented code, as a user runs it
    trained, evaluated, cut = namespace["trained"], namespace["runner"].model, namespace["cut"]
    assert _widths(evaluated) == _widths(trained) == _widths(cut)
    assert sum(_widths(cut)) < sum(_widths(namespace["Net"]()))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(evaluated.eval()(x), trained.eval()(x), rtol=0, atol=0)
    torch.testing.assert_close(cut(x), trained(x), rtol=0, atol=0)
