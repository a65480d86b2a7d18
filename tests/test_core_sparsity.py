"""The framework-free sparsity session (``slimnet.core.Sparsity``) in a hand-written loop: what an
mmengine or ultralytics adapter will drive."""

from __future__ import annotations

import torch
from torch import nn

from slimnet.core import Sparsity


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 2))


def test_a_plain_loop_drives_lambda_epochs_and_history():
    net = _net()
    sparse = Sparsity(lam=1e-2, until_epoch=1, lam_after=0.0)
    sparse.prepare(net, fresh=True, name="net")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    assert sparse.attach(net, [optimizer]) == 0
    x = torch.randn(4, 3, 8, 8)
    gamma = net[1].weight
    for epoch in range(2):
        sparse.epoch = epoch
        before = gamma.detach().clone()
        optimizer.zero_grad()
        net(x).sum().backward()
        gamma.grad.zero_()  # only the penalty moves γ
        optimizer.step()
        moved = (before - gamma.detach()).abs()
        if epoch == 0:
            torch.testing.assert_close(moved, torch.full_like(moved, 0.1 * 1e-2))  # lr·λ·sign(γ), γ > 0
        else:
            assert torch.equal(moved, torch.zeros_like(moved))  # λ after until_epoch is lam_after = 0
        sparse.end_epoch(net)
    assert [h["lam"] for h in sparse.history] == [1e-2, 0.0]


def test_the_controller_reads_only_updates_the_optimizer_made():
    net = _net()
    sparse = Sparsity(lam=1e-2, target=0.5, eps=1e-2)
    sparse.start(steps_per_epoch=10, max_epochs=1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sparse.attach(net, [optimizer])
    x = torch.randn(4, 3, 8, 8)
    optimizer.zero_grad()
    net(x).sum().backward()
    optimizer.step()
    sparse.after_step()
    state = sparse.controller.state_dict()
    sparse.after_step()  # a skipped step (an AMP overflow calls no step(), or a fused one skips): no reading
    assert sparse.controller.state_dict() == state
    optimizer.step()
    sparse.after_step()
    assert sparse.controller.state_dict() != state
