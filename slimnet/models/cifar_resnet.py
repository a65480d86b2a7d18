"""CIFAR ResNets (He et al., CVPR 2016, section 4.2) with torchvision-style blocks.

Layout (He et al. 2016 section 4.2): a 3x3 stem conv with ``width`` (16) channels + BN + ReLU, three
stages at ``width``, ``2 * width``, ``4 * width`` channels on 32x32, 16x16, 8x8 maps (stride 2 at the
first block of stages 2 and 3), global average pooling, one Linear.

* BasicBlock (two 3x3 convs): depth = 6n + 2 -> ResNet-20/32/56/110 with 0.27M/0.47M/0.86M/1.73M
  params here at 10 classes (He et al.'s option-A nets: 0.27M/0.46M/0.85M/1.7M).
* Bottleneck (1x1, 3x3, 1x1 with expansion 4, so stage outputs are 64/128/256): depth = 9n + 2 ->
  ResNet-164, the network Network Slimming (Liu et al. 2017) prunes: 1.704M params here, 1.70M in
  their Table 1.

Two deliberate departures from the papers, both so that these nets exercise the pruning engine the way
torchvision's ResNets do:

* Projection shortcuts (He et al.'s option B: 1x1 conv with stride s + BN, module name ``downsample``)
  wherever a block changes shape. Option A (zero-padded identity, used for the CIFAR results) hides the
  channel change in a parameter-free op; with B the residual add joins two BN outputs, which is the
  channel-coupling case the pruner has to handle. Costs 2,752 params on ResNet-56.
* Post-activation blocks (conv-BN-ReLU-conv-BN, add, ReLU), exactly torchvision's ``BasicBlock`` /
  ``Bottleneck`` (stride on the 3x3 conv, "ResNet v1.5"), not the pre-activation ResNet-164 of
  Eric-mingjie/network-slimming ``models/preresnet.py``. So every block ends in a BN whose channels
  are tied to the shortcut, giving the same channel groups as torchvision's resnet18/50.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1..3``, ``avgpool``, ``fc``) so code written
against torchvision ResNets finds the same names here. Init follows torchvision: kaiming-normal
(fan_out) convs, BN weight 1 / bias 0 (the training module sets gamma itself), default Linear init.
"""

from __future__ import annotations

import torch
from torch import nn

from slimnet.models.registry import register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 conv with padding 1 and no bias (a BN follows every conv)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs, post-activation: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand x4; post-activation like torchvision's."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}

# Layers per block: depth = layers_per_block * 3 stages * n + 2 (stem conv + fc).
_LAYERS_PER_BLOCK = {"basic": 2, "bottleneck": 3}


class CifarResNet(nn.Module):
    """3-stage ResNet for 32x32-ish inputs; any input size works thanks to adaptive pooling."""

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_channels: int,
        block: str = "basic",
        width: int = 16,
    ) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {block!r}")
        per_stage = 3 * _LAYERS_PER_BLOCK[block]
        if depth < per_stage + 2 or (depth - 2) % per_stage:
            raise ValueError(
                f"{block} CIFAR ResNet depth must be {per_stage}n+2 with n >= 1 "
                f"(e.g. {per_stage + 2}, {2 * per_stage + 2}), got {depth!r}"
            )
        if width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        n = (depth - 2) // per_stage
        block_cls = BLOCKS[block]
        self.depth, self.block, self.width = depth, block, width

        self.inplanes = width
        self.conv1 = conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block_cls, width, n, stride=1)
        self.layer2 = self._make_layer(block_cls, 2 * width, n, stride=2)
        self.layer3 = self._make_layer(block_cls, 4 * width, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width * block_cls.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block_cls, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_planes = planes * block_cls.expansion
        downsample = None
        # Option B projection whenever the first block changes resolution or width; for Bottleneck this
        # includes layer1 (16 -> 64 channels at stride 1).
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, out_planes, stride), nn.BatchNorm2d(out_planes))
        layers = [block_cls(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_planes
        layers += [block_cls(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


_META = dict(
    family="cifar_resnet",
    first_conv="conv1",
    classifier="fc",
    source="He et al. 2016 sec. 4.2 layout; torchvision resnet.py blocks; projection shortcuts (option B)",
)

# Named depths: the He et al. 2016 CIFAR table (basic) and the Network Slimming ResNet-164 (bottleneck).
NAMED_DEPTHS: dict[str, tuple[int, str]] = {
    "resnet20": (20, "basic"),
    "resnet32": (32, "basic"),
    "resnet56": (56, "basic"),
    "resnet110": (110, "basic"),
    "resnet164": (164, "bottleneck"),
}


def _register(name: str, depth: int, block: str) -> None:
    def builder(num_classes: int, in_channels: int, width: int = 16) -> CifarResNet:
        return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, block=block, width=width)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"CIFAR ResNet-{depth} with {block} blocks; ``width`` = stem/stage-1 channels."
    register_model(name, **_META)(builder)
    globals()[name] = builder  # importable by name: a config's _target_ (slimnet.models.cifar_resnet.<name>)


for _name, (_depth, _block) in NAMED_DEPTHS.items():
    _register(_name, _depth, _block)


@register_model("cifar_resnet", **_META)
def cifar_resnet(
    num_classes: int, in_channels: int, depth: int = 20, block: str = "basic", width: int = 16
) -> CifarResNet:
    """Any-depth CIFAR ResNet, e.g. ``depth=8, width=4`` for tiny test nets (default: ResNet-20)."""
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, block=block, width=width)
