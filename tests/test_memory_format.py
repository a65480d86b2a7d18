"""``channels_last``: NHWC training stays NHWC through surgery and resume, and leaves an ordinary model."""

from __future__ import annotations

import torch
from conftest import TINY
from pytorch_lightning import Callback
from test_graph import _cbr
from torch import nn

import slimnet
from slimnet.engine.artifact import load_pruned
from slimnet.loops.lightning.slimming_callback import SlimmingCallback
from slimnet.run.pipeline import train
from slimnet.run.sparse_cache import sparse_key
from slimnet.tasks.classification.module import SlimModule

CONFIG = {"arch": "vgg", "cfg": [8, "M", 16, "M", 16], "num_classes": 4, "in_channels": 3}
OPTIM = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _nhwc(model: nn.Module) -> bool:
    # a weight with one input channel per filter (depthwise) or a 1x1 kernel is both NCHW and NHWC
    ambiguous = lambda w: w.shape[1] == 1 or w.shape[2:].numel() == 1  # noqa: E731
    return all(c.weight.is_contiguous(memory_format=torch.channels_last) and
               (ambiguous(c.weight) or not c.weight.is_contiguous()) for c in _convs(model))


def test_module_is_nhwc_and_computes_what_nchw_computes():
    torch.manual_seed(0)
    nchw = SlimModule(CONFIG, OPTIM).eval()
    nhwc = SlimModule(CONFIG, OPTIM, channels_last=True).eval()
    nhwc.model.load_state_dict(nchw.model.state_dict())  # copies values, keeps each side's layout
    assert _nhwc(nhwc.model) and not _nhwc(nchw.model)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
    torch.testing.assert_close(nhwc._step((x, y), "val", nhwc.val_acc), nchw._step((x, y), "val", nchw.val_acc))


def test_surgery_and_plan_replay_keep_nhwc():
    torch.manual_seed(0)
    module = SlimModule(CONFIG, OPTIM, channels_last=True)
    for bn in module.model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.uniform_(bn.weight)  # unequal γ, so the cut removes channels in every layer
    report = slimnet.prune(module.model, torch.randn(2, 3, 16, 16), percent=0.4)
    assert report["flops_after"] < report["flops_before"]
    assert _nhwc(module.model)  # surgery's sliced weights keep the NHWC layout

    key = SlimmingCallback(epoch=1, percent=0.4, module="model").state_key  # where a fit's checkpoint keeps it
    checkpoint = {"state_dict": module.state_dict(),
                  "callbacks": {key: {"module": "model", "slimnet_plan": module.plan.to_json()}}}
    fresh = SlimModule(CONFIG, OPTIM, channels_last=True)
    fresh.on_load_checkpoint(checkpoint)  # replays the plan on a fresh, full-width model
    fresh.load_state_dict(checkpoint["state_dict"])
    assert _nhwc(fresh.model)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fresh.eval().model(x), module.eval().model(x))


def test_pipeline_trains_nhwc_and_leaves_an_nchw_artifact(compose_cfg, tmp_path):
    cfg = compose_cfg(*TINY, "channels_last=true")
    seen = []

    class LayoutSpy(Callback):  # the layout of the conv weights each training step uses
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, _nhwc(pl_module.model)))

    results = train(cfg, tmp_path, extra_callbacks=[LayoutSpy()])
    epochs = {epoch for epoch, _ in seen}
    assert cfg.prune.epoch in epochs and min(epochs) < cfg.prune.epoch  # both phases were watched
    assert all(nhwc for _, nhwc in seen)
    loaded = load_pruned(results["artifact"]).eval()
    assert all(c.weight.is_contiguous() for c in _convs(loaded))
    saved = torch.load(results["artifact"], weights_only=True)["state_dict"]
    assert all(t.is_contiguous() for t in saved.values())  # what a plain NCHW user loads
    x = torch.randn(2, 3, 16, 16)
    assert loaded(x).shape == (2, results["model_config"]["num_classes"])


def test_channels_last_changes_the_sparse_cache_key(compose_cfg):
    # another summation order trains another sparse phase: runs must not share it
    assert sparse_key(compose_cfg(*TINY, "channels_last=true")) != sparse_key(compose_cfg(*TINY, "channels_last=false"))


class GroupedNet(nn.Module):
    """A groups=2 conv (cut by a gather, not ``index_select``) feeding a depthwise conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.d = _cbr(3, 8), _cbr(8, 8, groups=2), _cbr(8, 8, groups=8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.d(self.b(self.a(x))).mean((2, 3)))


def test_plain_prune_keeps_an_nhwc_model_nhwc():
    """``slimnet.prune`` from plain PyTorch: an NHWC model comes out NHWC, every cut kind included."""
    torch.manual_seed(0)
    model = GroupedNet().eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        for bn, dead in ((model.a[1], [2, 5]), (model.b[1], [1, 6]), (model.d[1], [1, 6])):
            bn.running_mean.normal_()
            bn.weight[dead] = 0  # dead channels (γ = β = 0): the cut must not change the outputs
            bn.bias.normal_()
            bn.bias[dead] = 0
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
    slimnet.prune(model, x, thresh=1e-8)
    assert [c.weight.shape[:2] for c in _convs(model)] == [(6, 3), (6, 3), (6, 1)]  # all three cut kinds ran
    assert _nhwc(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
