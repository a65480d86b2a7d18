"""FrozenBatchNorm2d <-> BatchNorm2d on torchvision detector backbones (random weights, never downloaded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from slimnet.sparsity.norms import EvalModeBatchNorm2d, freeze_batchnorm, unfreeze_batchnorm
from slimnet.sparsity.step import bn_gammas


def _randomise_frozen(model: nn.Module, seed: int = 0) -> int:
    """Give every FrozenBN random γ, β, statistics and, on every other layer, a large eps with a tiny
    running_var, so a conversion that dropped or changed eps would change the output."""
    g = torch.Generator().manual_seed(seed)
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    for i, m in enumerate(frozen):
        c = m.weight.numel()
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        if i % 2:  # eps is half of var + eps here; γ scaled down so activations keep their size
            m.eps = 1e-2
            m.running_var.copy_(torch.rand(c, generator=g) * 1e-2)
            m.weight.mul_(0.1)
        else:
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return len(frozen)


BACKBONES = {
    "resnet18_fpn": lambda: resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    ),
    "mobilenet_v3_small_fpn": lambda: mobilenet_backbone(
        backbone_name="mobilenet_v3_small", weights=None, fpn=True, norm_layer=FrozenBatchNorm2d
    ),
}


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("eval_mode", [False, True], ids=["bn", "eval_mode_bn"])
def test_unfreeze_keeps_eval_outputs_and_makes_gamma_trainable(single_thread, name, eval_mode):
    torch.manual_seed(0)
    model = BACKBONES[name]().eval()
    n_frozen = _randomise_frozen(model)
    assert n_frozen > 10
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    eps_before = [m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]

    out = unfreeze_batchnorm(model, eval_mode=eval_mode)

    assert out is model
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == n_frozen and [m.eps for m in bns] == eps_before
    assert all(type(m) is (EvalModeBatchNorm2d if eval_mode else nn.BatchNorm2d) for m in bns)
    # γ is now what the sparsity step and the plan look at, and it trains
    gammas = bn_gammas(model)
    assert len(gammas) == n_frozen and all(g.requires_grad for g in gammas)
    with torch.no_grad():
        after = model(x)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-4, atol=1e-4)


def test_eval_mode_bn_keeps_running_stats_while_training_yet_gamma_learns(single_thread):
    torch.manual_seed(0)
    model = BACKBONES["resnet18_fpn"]().eval()
    _randomise_frozen(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)["0"]
    unfreeze_batchnorm(model, eval_mode=True)
    stats = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    model.train()  # what Lightning does at every epoch start
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not any(m.training for m in bns)
    out = model(x)["0"]
    out.square().mean().backward()

    # training forward == eval forward (running statistics, not batch ones), statistics untouched
    torch.testing.assert_close(out.detach(), reference, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(s, m.running_mean) for s, m in zip(stats, bns))
    assert bns[0].weight.grad is not None and bns[0].weight.grad.abs().sum() > 0


def test_plain_bn_after_unfreeze_uses_batch_statistics_in_training(single_thread):
    """Without eval_mode the layer is an ordinary BatchNorm2d: train mode normalises by the batch."""
    frozen = FrozenBatchNorm2d(4)
    frozen.running_mean.fill_(3.0)
    bn = unfreeze_batchnorm(frozen)  # a bare FrozenBN is converted too (returned, not in place)
    assert type(bn) is nn.BatchNorm2d
    bn.train()
    y = bn(torch.randn(8, 4, 5, 5) + 3.0)
    assert y.mean().abs() < 1e-4  # batch-normalised; running_mean=3 would not have centred it
    assert bn.running_mean[0] != 3.0  # and it updates its statistics


def test_freeze_is_the_inverse_of_unfreeze(single_thread):
    torch.manual_seed(0)
    model = BACKBONES["resnet18_fpn"]().eval()
    _randomise_frozen(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)["pool"]
    unfreeze_batchnorm(model, eval_mode=True)
    freeze_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x)["pool"], before, rtol=1e-4, atol=1e-4)
