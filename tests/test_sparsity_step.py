"""The L1 step measured, not just called: with a zero loss gradient, one optimizer step moves every γ by
exactly what the math says, under the optimizers, precisions and loop features users train with."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slimnet

LAM, LR, MU = 0.01, 0.1, 0.9
START = torch.tensor([0.5, -0.5, 0.3, 0.0005])  # the last is within lr·λ of zero


class ZeroLoss(pl.LightningModule):
    """conv → BN with a loss whose gradient is exactly zero: only the sparsity step moves γ."""

    def __init__(self, optimizer: str, **opt_args):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        with torch.no_grad():
            self.bn.weight.copy_(START)
        self.optimizer, self.opt_args = optimizer, opt_args

    def training_step(self, batch, batch_idx):
        return (self.bn(self.conv(batch[0])) * 0).sum()

    def configure_optimizers(self):
        return getattr(torch.optim, self.optimizer)(self.parameters(), lr=LR, weight_decay=0.0, **self.opt_args)


def _gamma_after(module: ZeroLoss, steps: int = 1, mode: str = "auto", **trainer_args) -> torch.Tensor:
    data = DataLoader(TensorDataset(torch.randn(8, 3, 6, 6)), batch_size=2)
    batches = steps * trainer_args.get("accumulate_grad_batches", 1)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=batches, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         callbacks=[slimnet.SparsityCallback(lam=LAM, mode=mode, log_stats=False)], **trainer_args)
    trainer.fit(module, train_dataloaders=data)
    return module.bn.weight.detach()


def _subgradient(total_step: float) -> torch.Tensor:
    return START - total_step * torch.sign(START)


@pytest.mark.parametrize("name, module, steps, trainer_args, moved", [
    ("sgd", ZeroLoss("SGD"), 1, {}, LR * LAM),
    ("sgd, 3 steps", ZeroLoss("SGD"), 3, {}, 3 * LR * LAM),
    ("sgd+momentum, 2 steps", ZeroLoss("SGD", momentum=MU), 2, {}, LR * LAM * (1 + (1 + MU))),
    ("sgd+nesterov", ZeroLoss("SGD", momentum=MU, nesterov=True), 1, {}, LR * LAM * (1 + MU)),
    ("sgd fused", ZeroLoss("SGD", momentum=MU, fused=True), 1, {}, LR * LAM),
    ("accumulate 2", ZeroLoss("SGD"), 2, {"accumulate_grad_batches": 2}, 2 * LR * LAM),  # once per step
    ("clipping", ZeroLoss("SGD"), 1, {"gradient_clip_val": 1e-6}, LR * LAM),  # never rescaled by it
    ("bf16-mixed", ZeroLoss("SGD"), 1, {"precision": "bf16-mixed"}, LR * LAM),
])
def test_sgd_moves_gamma_by_the_paper_subgradient(name, module, steps, trainer_args, moved):
    # γ[3] crosses zero on the first step (the subgradient overshoots; the proximal step would not),
    # so after several steps its sign history matters: compare the three that keep their sign
    after = _gamma_after(module, steps, **trainer_args)
    torch.testing.assert_close(after[:3], _subgradient(moved)[:3], rtol=0, atol=1e-7)


def test_an_amp_overflow_skips_the_l1_step_with_the_update():
    """GradScaler skips optimizer.step() when the scaled gradients overflow: the L1 step goes with it.
    (Lightning runs 16-mixed on CPU without a scaler, so the scaler is driven by hand here.)"""
    module = ZeroLoss("SGD")
    opt = module.configure_optimizers()
    slimnet.attach_l1(opt, module, lam=LAM)
    scaler = torch.amp.GradScaler("cpu")
    for overflow, expected in ((True, START), (False, _subgradient(LR * LAM))):
        opt.zero_grad()
        loss = module.training_step((torch.randn(2, 3, 6, 6),), 0) + (module.bn.weight.sum() * 1e38 * overflow)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        torch.testing.assert_close(module.bn.weight.detach(), expected, rtol=0, atol=1e-7)


def _state_tensors(opt: torch.optim.Optimizer) -> dict:
    return {(id(p), k): v.clone() for p, st in opt.state.items() for k, v in st.items() if torch.is_tensor(v)}


@pytest.mark.parametrize("optimizer, opt_args", [("SGD", {"momentum": MU}), ("AdamW", {})])
def test_a_fused_optimizer_skipping_an_amp_overflow_skips_the_sparsity_step_too(optimizer, opt_args):
    """GradScaler *calls* a fused optimizer's step() on an overflow, with ``found_inf`` set for the kernel
    to skip the update: γ and every state tensor (momentum buffer, Adam's moments) stay bit-identical."""
    module = ZeroLoss(optimizer, fused=True, **opt_args)
    opt = module.configure_optimizers()
    assert opt._step_supports_amp_scaling  # the path that reaches our hook on an overflow
    slimnet.attach_l1(opt, module, lam=LAM)
    scaler = torch.amp.GradScaler("cpu")
    gamma = module.bn.weight

    def scaled_step(overflow: bool) -> None:
        opt.zero_grad()
        # a real gradient on γ, so that Adam's proximal step has a finite metric to work in
        loss = module.training_step((torch.randn(2, 3, 6, 6),), 0) + (gamma * torch.tensor([1.0, -1.0, 2.0, 0.5])).sum()
        scaler.scale(loss + gamma.sum() * 1e38 * overflow).backward()  # 1e38 × the scale: inf in fp32
        scaler.step(opt)
        scaler.update()

    scaled_step(False)  # a first step creates the buffers
    before, state = gamma.detach().clone(), _state_tensors(opt)
    scaled_step(True)
    assert torch.equal(gamma.detach(), before)
    after = _state_tensors(opt)
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    scaled_step(False)  # the next step that does not overflow moves them
    assert not torch.equal(gamma.detach(), before)
    moved = _state_tensors(opt)
    assert any(not torch.equal(moved[k], v) for k, v in state.items() if k[1] != "step")


def test_adaptive_optimizers_take_a_gamma_without_loss_gradient_to_zero():
    """Adam's metric 1/(√v̂ + ε) is huge where the loss gives γ no gradient at all: nothing holds such
    a γ up, so the proximal step puts it at exactly 0 at once (the plain lr·λ step needed 500 steps here)."""
    after = _gamma_after(ZeroLoss("AdamW"))
    assert (after == 0).all()


def test_subgradient_mode_refuses_an_adaptive_optimizer():
    with pytest.raises(ValueError, match="exact only for SGD"):
        _gamma_after(ZeroLoss("AdamW"), mode="subgradient")


def test_attach_l1_in_a_hand_written_loop_equals_the_papers_update_bn():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 2))
    b = __import__("copy").deepcopy(a)
    opt_a = torch.optim.SGD(a.parameters(), lr=LR, momentum=MU, nesterov=True)
    opt_b = torch.optim.SGD(b.parameters(), lr=LR, momentum=MU, nesterov=True)
    slimnet.attach_l1(opt_a, a, lam=LAM)
    for _ in range(5):
        x = torch.randn(4, 3, 6, 6)
        for model, opt, paper in ((a, opt_a, False), (b, opt_b, True)):
            opt.zero_grad()
            model(x).square().mean().backward()
            if paper:  # Liu et al.'s updateBN, right before the step
                slimnet.add_l1_subgradient(model, LAM)
            opt.step()
    torch.testing.assert_close(a[1].weight, b[1].weight)
    torch.testing.assert_close(a[0].weight, b[0].weight)


@pytest.mark.parametrize("args, message", [({"lam": -1.0}, "lam"), ({"lam": float("nan")}, "lam"),
                                           ({"lam": 1e-4, "mode": "l2"}, "mode")])
def test_bad_callback_arguments_fail_at_once(args, message):
    with pytest.raises(ValueError, match=message):
        slimnet.SparsityCallback(**args)
