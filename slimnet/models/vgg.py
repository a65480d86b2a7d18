"""VGG for small images, as used by Network Slimming (Liu et al., ICCV 2017).

Provenance: the paper's CIFAR VGG is ``models/vgg.py`` of Eric-mingjie/network-slimming (the authors'
PyTorch reimplementation): the VGG conv cfgs below, 3x3 convs without bias each followed by BatchNorm2d
and ReLU, then ``AvgPool2d(2)``, flatten and one ``Linear(cfg[-1], num_classes)``. Its VGG-19 on
CIFAR-10 has 20.04M parameters and 7.97e8 FLOPs (paper, Table 1); ``count_flops`` measures 796M.

Differences from that file, each on purpose:

* the head uses ``AdaptiveAvgPool2d(1)`` instead of ``AvgPool2d(2)`` (``classifier="linear"``, default).
  At 32x32 the map after four max-pools is 2x2, so both give the same numbers; at 28x28
  (Fashion-MNIST) it is 1x1 and ``AvgPool2d(2)`` would fail. ``classifier="paper"`` keeps the literal
  ``AvgPool2d(2)`` head for exact reproduction at 32x32.
* ``in_channels`` and ``num_classes`` are arguments instead of being derived from a dataset name.
* module names follow torchvision's VGG (``features`` rather than the reference's ``feature``).
* init: the reference draws conv weights from N(0, 2/(k*k*out_channels)), which is exactly
  ``kaiming_normal_(mode="fan_out")``; BN is left at weight 1 / bias 0 here because gamma = 0.5 is
  the training module's job (the reference sets it in the model).

Pruned models are rebuilt the way the reference does it: pass the surviving channel counts as ``cfg``,
e.g. ``create_model("vgg", 10, 3, cfg=[49, 64, "M", 128, ...])``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slimnet.models.registry import register_model

# Conv cfgs of the reference repository's ``defaultcfg`` (ints = output channels of a 3x3 conv,
# "M" = 2x2 max-pool). Names keep Simonyan & Zisserman's depths (convs + 3 FC layers) although the
# CIFAR variant has a single Linear, so "vgg19" has 16 convs + 1 Linear.
CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512,
    ],  # fmt: skip
    # Our default for 28x28 Fashion-MNIST on 2 CPU cores, not from the paper: three max-pools take
    # 28 -> 14 -> 7 -> 3. count_flops at 28x28x1: 45.3M FLOPs, 1.13M params, against 190M / 9.2M for
    # vgg11 and 515M / 20.0M for vgg19. Two convs in each of the last two stages give the pruner
    # several layers to choose between.
    "vgg_small": [32, "M", 64, "M", 128, 128, "M", 256, 256],
}

_SOURCE = "Liu et al. 2017 (Network Slimming), Eric-mingjie/network-slimming models/vgg.py"


def _validate_cfg(cfg: Sequence[int | str]) -> list[int | str]:
    """Return ``cfg`` as a plain list (Hydra hands over ListConfig) after checking its entries."""
    cfg = list(cfg)
    for v in cfg:
        is_width = isinstance(v, int) and not isinstance(v, bool)
        if not (v == "M" or (is_width and v > 0)):
            raise ValueError(f"VGG cfg entries must be positive ints or 'M', got {v!r} in {cfg}")
    # A leading "M" would only throw away input resolution, and it would move the first conv away from
    # ``features.0``, the name the registry metadata promises.
    if not cfg or cfg[0] == "M":
        raise ValueError(f"VGG cfg must start with a conv width, got {cfg}")
    return cfg


def _scale_cfg(cfg: list[int | str], width: int) -> list[int | str]:
    """Rescale every conv width so the first conv has ``width`` channels (ratios kept, rounded, >= 1).

    Same meaning as ``width`` of the CIFAR ResNets: the channel count of the first stage.
    """
    first = next(v for v in cfg if v != "M")
    return [v if v == "M" else max(1, round(v * width / first)) for v in cfg]


class VGG(nn.Module):
    """Conv stack from ``cfg`` (conv3x3-BN-ReLU per int, max-pool per "M"), global pooling, one Linear.

    Module names (``features``, ``pool``, ``classifier``) follow torchvision's VGG; ``features`` is one
    flat ``nn.Sequential`` so conv ``i`` is followed by its BN at ``i + 1``.
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        num_classes: int,
        in_channels: int,
        batch_norm: bool = True,
        classifier: str = "linear",
    ) -> None:
        super().__init__()
        cfg = _validate_cfg(cfg)
        if classifier not in ("linear", "paper"):
            raise ValueError(f"classifier must be 'linear' or 'paper', got {classifier!r}")
        self.cfg = cfg

        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            # With BN the conv bias is redundant (BN's beta is the shift), as in the reference. Without
            # BN (an ablation only: slimming needs the BN scales) the conv gets its bias back.
            layers.append(nn.Conv2d(channels, v, kernel_size=3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            channels = v
        self.features = nn.Sequential(*layers)
        # "paper": the reference's fixed AvgPool2d(2), only right when the last map is 2x2 (32x32 input).
        self.pool = nn.AdaptiveAvgPool2d(1) if classifier == "linear" else nn.AvgPool2d(2)
        self.classifier = nn.Linear(channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # == the reference's normal_(0, sqrt(2 / (k * k * out_channels))).
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                # The reference's (and torchvision VGG's) classifier init.
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _build(
    default_cfg: Sequence[int | str],
    num_classes: int,
    in_channels: int,
    cfg: Sequence[int | str] | None = None,
    width: int | None = None,
    **kwargs,
) -> VGG:
    """Shared builder: ``cfg`` replaces the named default, then ``width`` rescales it if given."""
    cfg = _validate_cfg(default_cfg if cfg is None else cfg)
    if width is not None:
        cfg = _scale_cfg(cfg, width)
    return VGG(cfg, num_classes=num_classes, in_channels=in_channels, **kwargs)


# first_conv / classifier are the same for every cfg: a validated cfg starts with a conv.
_META = dict(family="vgg", first_conv="features.0", classifier="classifier", source=_SOURCE)


def _register(name: str) -> None:
    """Register ``name`` with its ``CFGS`` entry as default cfg (one closure per name)."""

    def builder(num_classes: int, in_channels: int, **kwargs) -> VGG:
        return _build(CFGS[name], num_classes, in_channels, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"VGG with cfg {CFGS[name]} by default; accepts cfg=, width=, batch_norm=, classifier=."
    meta = dict(_META)
    if name == "vgg_small":
        meta["source"] = "slimnet default for 28x28 Fashion-MNIST; layer recipe from " + _SOURCE
    register_model(name, **meta)(builder)
    globals()[name] = builder  # importable by name: a config's _target_ (slimnet.models.vgg.<name>)


for _name in CFGS:
    _register(_name)


@register_model("vgg", **_META)
def vgg(
    num_classes: int, in_channels: int, depth: int = 19, cfg: Sequence[int | str] | None = None, **kwargs
) -> VGG:
    """Generic VGG: ``cfg`` if given (tiny test nets, pruned models), else the paper's cfg for ``depth``.

    Mirrors the reference's ``vgg(depth=19, cfg=None)`` signature.
    """
    if cfg is None:
        if depth not in (11, 13, 16, 19):
            raise ValueError(f"VGG depth must be one of 11, 13, 16, 19, got {depth!r}")
        cfg = CFGS[f"vgg{depth}"]
    return _build(cfg, num_classes, in_channels, **kwargs)
