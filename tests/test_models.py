"""Model zoo tests, timm-style: one generic body parametrized over ``list_models()``, plus paper facts.

Everything runs on CPU with tiny inputs; the whole file takes a few seconds on 2 cores.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from slimnet.engine.measure import count_flops
from slimnet.models import create_model, list_models, model_metadata, register_model

NUM_CLASSES = 7  # deliberately not 10, so a hard-coded class count would show up

# Keyword arguments for registry entries that need them (or are faster with them); reason per entry.
# Every other registered name is built with its defaults.
MODEL_KWARGS: dict[str, dict] = {
    "vgg": {"cfg": [8, "M", 16]},  # generic entry; a tiny custom cfg is its main use (pruned rebuilds)
    "cifar_resnet": {"depth": 8, "width": 4},  # generic entry; n=1 block per stage is enough here
    "torchvision": {"name": "resnet18"},  # required: which torchvision architecture to build
}

# name -> reason for models that cannot run the generic tests. Empty on purpose: every registered
# model must handle both input shapes below. Add an entry (with its reason) rather than a silent skip.
EXCLUDE_GENERIC: dict[str, str] = {}

# (in_channels, size): Fashion-MNIST 28x28x1 and CIFAR 32x32x3.
INPUT_SHAPES = [(1, 28), (3, 32)]


def _registered():
    return [
        pytest.param(n, marks=pytest.mark.skip(reason=EXCLUDE_GENERIC[n])) if n in EXCLUDE_GENERIC else n
        for n in list_models()
    ]


def _build(name: str, in_channels: int) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, in_channels=in_channels, **MODEL_KWARGS.get(name, {}))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- every registered model


def test_kwargs_tables_name_registered_models():
    """Stale table entries would silently stop applying; keep them in sync with the registry."""
    assert set(MODEL_KWARGS) <= set(list_models())
    assert set(EXCLUDE_GENERIC) <= set(list_models())


@pytest.mark.parametrize("in_channels,size", INPUT_SHAPES)
@pytest.mark.parametrize("name", _registered())
def test_forward_logits(name, in_channels, size):
    model = _build(name, in_channels).train()  # train mode: the BN path used during sparsity training
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, size, size))
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    # Network Slimming prunes by BN scales: a model without BN has nothing to slim.
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", _registered())
def test_metadata_names_real_modules(name):
    model = _build(name, in_channels=1)
    meta = model.slimnet_meta
    static = model_metadata(name)
    assert meta["model"] == name
    assert static["family"] is not None and meta["family"] == static["family"]
    first_conv = model.get_submodule(meta["first_conv"])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 1
    classifier = model.get_submodule(meta["classifier"])
    assert isinstance(classifier, nn.Linear) and classifier.out_features == NUM_CLASSES
    # The first conv in module order is the one reading the image.
    assert next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)) == meta["first_conv"]


# --------------------------------------------------------------------------- registry


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError) as err:
        create_model("resnet9000", num_classes=10, in_channels=3)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("unknown model 'resnet9000'; choose one of: ")
    assert all(name in msg for name in list_models())
    with pytest.raises(ValueError, match="unknown model"):
        model_metadata("resnet9000")


def test_list_models_pattern_and_expected_names():
    expected = {"vgg", "vgg11", "vgg13", "vgg16", "vgg19", "vgg_small", "cifar_resnet", "resnet20",
                "resnet32", "resnet56", "resnet110", "resnet164", "torchvision"}  # fmt: skip
    assert expected <= set(list_models())
    assert list_models("resnet*") == ["resnet110", "resnet164", "resnet20", "resnet32", "resnet56"]


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        register_model("vgg19")(lambda num_classes, in_channels: nn.Identity())
    assert create_model("vgg", 10, 3, cfg=[4]).classifier.out_features == 10  # registry untouched


@pytest.mark.parametrize("bad", [{"num_classes": 0}, {"in_channels": 0}, {"num_classes": True}])
def test_bad_sizes_rejected(bad):
    kwargs = {"num_classes": 10, "in_channels": 3, **bad}
    with pytest.raises(ValueError, match="positive int"):
        create_model("vgg", cfg=[4], **kwargs)


# --------------------------------------------------------------------------- paper facts


def test_vgg19_matches_paper():
    """Liu et al. 2017 Table 1, CIFAR-10 VGGNet: 20.04M params, 7.97e8 FLOPs."""
    model = create_model("vgg19", num_classes=10, in_channels=3)
    flops, params = count_flops(model, torch.randn(1, 3, 32, 32))
    assert params == pytest.approx(20.04e6, rel=0.005)  # measured 20,035,018
    assert 790e6 <= flops <= 800e6  # measured 796.3M (FlopCounterMode counts 2 x MACs)


def test_resnet_param_counts():
    # Measured 1,704,154: Liu et al. 2017 Table 1 gives 1.70M for ResNet-164.
    assert _n_params(create_model("resnet164", 10, 3)) == pytest.approx(1.70e6, rel=0.03)
    # Measured 855,770: He et al. 2016 give 0.85M (option A; our projections add 2,752).
    assert _n_params(create_model("resnet56", 10, 3)) == pytest.approx(0.85e6, rel=0.03)


def test_vgg_small_cost_at_fashion_mnist_size():
    """Documents the default model's cost: measured 45.28M FLOPs, 1.13M params at 28x28x1."""
    flops, params = count_flops(create_model("vgg_small", 10, 1), torch.randn(1, 1, 28, 28))
    assert 40e6 <= flops <= 50e6
    assert params == pytest.approx(1.129e6, rel=0.01)


# --------------------------------------------------------------------------- VGG details


def test_vgg_adaptive_head_equals_paper_head_at_32px():
    """At 32x32 the last map is 2x2, so AdaptiveAvgPool2d(1) is exactly the reference's AvgPool2d(2)."""
    cfg = [8, "M", 8, "M", 8, "M", 8, "M", 8]
    torch.manual_seed(0)
    generic = create_model("vgg", 10, 3, cfg=cfg).eval()
    paper = create_model("vgg", 10, 3, cfg=cfg, classifier="paper").eval()
    paper.load_state_dict(generic.state_dict())  # same parameter names: heads differ only in pooling
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(generic(x), paper(x))


def test_vgg_layer_recipe_and_overrides():
    model = create_model("vgg_small", 10, 1, cfg=[4, "M", 8])
    assert model.cfg == [4, "M", 8]
    conv, bn, relu, pool = model.features[:4]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    assert conv.bias is None  # BN's beta is the shift, as in the reference
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU) and isinstance(pool, nn.MaxPool2d)
    # width = first-conv channels, other widths scaled by the same ratio.
    assert create_model("vgg19", 10, 3, width=8).cfg == [
        8, 8, "M", 16, 16, "M", 32, 32, 32, 32, "M", 64, 64, 64, 64, "M", 64, 64, 64, 64,
    ]  # fmt: skip
    assert create_model("vgg", 10, 3, depth=11).cfg == create_model("vgg11", 10, 3).cfg


@pytest.mark.parametrize("cfg", [[], ["M", 8], [8, "X"], [8, 0], [8, True]])
def test_vgg_bad_cfg_rejected(cfg):
    with pytest.raises(ValueError, match="cfg"):
        create_model("vgg", 10, 3, cfg=cfg)


# --------------------------------------------------------------------------- CIFAR ResNet details


def _assert_projection(downsample: nn.Module, stride: int):
    assert isinstance(downsample, nn.Sequential) and len(downsample) == 2
    conv, bn = downsample
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (stride, stride)
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels


def test_basic_resnet_projects_where_stage_changes():
    model = create_model("resnet20", 10, 3)
    assert model.layer1[0].downsample is None  # 16 -> 16 at stride 1: identity shortcut
    for layer, width in ((model.layer2, 32), (model.layer3, 64)):
        _assert_projection(layer[0].downsample, stride=2)
        assert layer[0].downsample[0].out_channels == width
        assert all(block.downsample is None for block in layer[1:])
    assert len(model.layer1) == 3  # depth 20 = 6 * 3 + 2


def test_bottleneck_resnet_projects_where_stage_changes():
    model = create_model("cifar_resnet", 10, 3, depth=20, block="bottleneck")  # 9 * 2 + 2
    _assert_projection(model.layer1[0].downsample, stride=1)  # 16 -> 64 channels at stride 1
    _assert_projection(model.layer2[0].downsample, stride=2)
    _assert_projection(model.layer3[0].downsample, stride=2)
    stages = (model.layer1, model.layer2, model.layer3)
    assert [layer[-1].bn3.num_features for layer in stages] == [64, 128, 256]
    assert all(layer[1].downsample is None for layer in stages)
    assert model.fc.in_features == 256


@pytest.mark.parametrize("kwargs", [{"depth": 21}, {"depth": 2}, {"depth": 20, "block": "bottleneck2"}])
def test_resnet_bad_depth_rejected(kwargs):
    with pytest.raises(ValueError):
        create_model("cifar_resnet", 10, 3, **kwargs)


# --------------------------------------------------------------------------- torchvision adapter


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_single_channel(arch):
    model = create_model("torchvision", num_classes=10, in_channels=1, name=arch)
    assert model.get_submodule(model.slimnet_meta["first_conv"]).in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_torchvision_adapted_conv_keeps_config():
    reference = create_model("torchvision", 10, 3, name="resnet18").conv1
    adapted = create_model("torchvision", 10, 4, name="resnet18").conv1
    for attr in ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(adapted, attr) == getattr(reference, attr)
    assert adapted.in_channels == 4 and adapted.bias is None


def test_torchvision_small_input_stem():
    model = create_model("torchvision", 10, 1, name="resnet18", small_input=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.Identity)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="only implemented for torchvision ResNets"):
        create_model("torchvision", 10, 1, name="mobilenet_v2", small_input=True)


@pytest.mark.parametrize("arch,size", [("googlenet", 64), ("inception_v3", 80)])  # inception needs >= 75px
def test_torchvision_aux_logit_models_return_logits(arch, size):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # init_weights is pinned, so no FutureWarning
        model = create_model("torchvision", 10, 3, name=arch).train()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)  # not a (logits, aux) namedtuple


def test_torchvision_unknown_name_and_weights_rejected():
    with pytest.raises(ValueError, match=r"unknown torchvision model 'resnet5'.*resnet50.*list_models\(\)"):
        create_model("torchvision", 10, 1, name="resnet5")
    with pytest.raises(ValueError, match="pretrained"):
        create_model("torchvision", 10, 1, name="resnet18", weights="DEFAULT")
