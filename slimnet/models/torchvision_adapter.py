"""Any torchvision classification model, adapted to our channel count and (optionally) to tiny images.

``create_model("torchvision", num_classes=10, in_channels=1, name="resnet50")`` builds
``torchvision.models.get_model(name, weights=None, num_classes=num_classes)``. Weights are never loaded:
the tool runs offline and Network Slimming trains from scratch with the L1 penalty on BN scales.

Adaptations:

* ``in_channels != 3``: the first ``nn.Conv2d`` in module order (``named_modules``) is replaced by a conv
  with the same configuration but ``in_channels`` inputs.
* ``small_input=True`` (ResNet family only): the 7x7 stride-2 stem conv becomes 3x3 stride 1 and the
  stem max-pool an ``Identity``, the usual CIFAR adaptation. Otherwise the stem divides resolution by 4
  before ``layer1`` and the stages by 8 more, so a 28x28 image is 1x1 from ``layer4`` on (2x2 from
  ``layer3``), which leaves almost no spatial signal and makes train-mode BN statistics degenerate.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
import torchvision
from torch import nn

from slimnet.models.registry import META_ATTR, register_model

# Defaults some architectures need to build without weights and return a plain logits tensor.
# aux_logits=False: with auxiliary heads, train-mode forward returns a namedtuple (GoogLeNetOutputs /
# InceptionOutputs) instead of logits, which the training loop cannot use.
# init_weights=False: leaving it unset triggers torchvision's FutureWarning announcing that the default
# will become False (PyTorch's default layer init); we pin that future default now. Both can be
# overridden through kwargs.
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}


def _classification_models() -> list[str]:
    # module=torchvision.models keeps classification builders only (no detection/segmentation/video
    # or quantized variants, whose heads and inputs differ).
    return torchvision.models.list_models(module=torchvision.models)


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d to adapt to the input channels")


def _classifier_name(model: nn.Module) -> str | None:
    """Last ``nn.Linear`` in module order (``fc``, ``classifier.1``, ``heads.head``...); for the few
    all-conv heads (SqueezeNet's ``classifier.1``) the last ``nn.Conv2d``."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _adapt_in_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """Same conv (kernel, stride, padding, dilation, groups, bias, dtype, device) with ``in_channels``.

    The new weight reuses the old one's input slices cyclically (channel i <- old channel i mod 3).
    Because the weights are the architecture's own random init, this keeps that init's distribution
    exactly, whatever scheme the architecture uses (kaiming fan_out, truncated normal, ...), whereas a
    fresh ``nn.Conv2d`` would fall back to PyTorch's generic default. With pretrained weights one would
    instead average (or sum, as timm's ``adapt_input_conv`` does for 1 channel) across input channels to
    keep the response to a grey image; we never load weights.
    """
    if in_channels % conv.groups:
        raise ValueError(f"in_channels={in_channels} not divisible by the first conv's groups={conv.groups}")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        old_in = conv.weight.shape[1]
        new_in = new.weight.shape[1]  # in_channels // groups
        idx = torch.arange(new_in, device=conv.weight.device) % old_in
        new.weight.copy_(conv.weight[:, idx])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _small_input_stem(model: torchvision.models.ResNet, in_channels: int) -> None:
    """CIFAR-style ResNet stem: 3x3 stride-1 conv, no max-pool (see the module docstring for why)."""
    old = model.conv1
    model.conv1 = nn.Conv2d(in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    # torchvision's ResNet init for convs, so the new stem matches the rest of the network.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


@register_model(
    "torchvision",
    family="torchvision",
    # Depend on the architecture; resolved per instance into ``model.slimnet_meta``.
    first_conv=None,
    classifier=None,
    source="torchvision.models.get_model(name, weights=None)",
)
def torchvision_model(
    num_classes: int, in_channels: int, name: str, small_input: bool = False, **kwargs: Any
) -> nn.Module:
    """torchvision classification model ``name``; extra ``kwargs`` go to its builder (e.g. ``dropout``)."""
    available = _classification_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5)
        hint = f"did you mean: {', '.join(close)}? " if close else ""
        raise ValueError(
            f"unknown torchvision model {name!r}; {hint}"
            f"{len(available)} classification models, see torchvision.models.list_models()"
        )
    if "weights" in kwargs or "pretrained" in kwargs:
        raise ValueError("slimnet never loads pretrained weights (offline, trains from scratch)")

    kwargs = {**_ARCH_DEFAULTS.get(name, {}), **kwargs}
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    if small_input:
        # The 7x7/2 conv + max-pool stem is ResNet-specific (resnet*, resnext*, wide_resnet*); other
        # families have different stems, so refuse rather than silently ignore the request.
        if not isinstance(model, torchvision.models.ResNet):
            raise ValueError(f"small_input=True is only implemented for torchvision ResNets, not {name!r}")
        _small_input_stem(model, in_channels)

    conv_name, conv = _first_conv(model)
    if conv.in_channels != in_channels:
        _replace(model, conv_name, _adapt_in_channels(conv, in_channels))

    # Instance-specific metadata; create_model merges it over the static entry.
    meta = {"first_conv": conv_name, "classifier": _classifier_name(model), "torchvision_name": name}
    setattr(model, META_ATTR, meta)
    return model
