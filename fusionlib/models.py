"""ResNet18 and MobileNetV2 for the course: torchvision's models, built offline.

* :func:`resnet18`, :func:`mobilenet_v2`, :func:`build` -- torchvision's
  models with ``weights=None`` (nothing downloads), optionally adapted to the
  32x32 digits (``small_input=True``). Module names stay torchvision's, so
  fusion groups are the standard ones.
* :func:`rep_resnet18`, :func:`rep_mobilenet_v2` -- the same models whose 3x3
  convs (ResNet18's block convs; MobileNetV2's depthwise convs) train as
  :class:`fusionlib.reparam.RepBlock` (kxk + 1x1 + identity branches, notebook
  06). The RepBlock sits where the (conv, bn) pair was: the conv's name holds
  the block, the BatchNorm's name holds ``nn.Identity``. After
  :func:`fusionlib.reparam.reparameterize_model` each block is one conv, and
  the model has the plain model's layers and MACs.

The other two jobs around these models live in higher layers (imports run
one way): :mod:`fusionlib.recipes` -- :func:`fusion_groups` (which modules
fuse in a ResNet / MobileNetV2) and :func:`fuse_model`; :mod:`fusionlib.zoo`
-- :func:`trained_model` (train on the digits once, then serve from a disk
cache).

What ``small_input`` changes: only MobileNetV2. Unmodified, MobileNetV2
downsamples 32x, so a 32x32 digit ends in a 1x1 feature map; with
``small_input=True`` the depthwise conv of ``features.7`` gets stride 1 and the
last map is 2x2. ResNet18 is left as torchvision builds it (it also ends at 1x1
on 32x32, and trains to high accuracy that way); the flag is accepted for
symmetry. Notebook 00 shows the difference by comparing the two builds.
"""
from __future__ import annotations

from typing import Any, Callable

import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops.misc import Conv2dNormActivation

from fusionlib.reparam import RepBlock

__all__ = [
    "BUILDERS",
    "REP_BUILDERS",
    "ALL_BUILDERS",
    "build",
    "resnet18",
    "mobilenet_v2",
    "rep_resnet18",
    "rep_mobilenet_v2",
]


def _check_dropout(dropout: float) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


def resnet18(num_classes: int = 10, small_input: bool = True, dropout: float = 0.0) -> ResNet:
    """torchvision's ResNet18, randomly initialized (``weights=None``).

    ``small_input`` is accepted for symmetry with :func:`mobilenet_v2` and
    changes nothing: torchvision's stem already brings a 32x32 input down to
    the 8x8 the digits carry (see the module docstring).

    ``dropout > 0`` adds classifier dropout the way torchvision's MobileNetV2
    has it: ``fc`` becomes ``Sequential(Dropout(dropout), Linear)`` (its weights
    are then ``fc.1.weight`` / ``fc.1.bias``; notebook 12, R-Drop). The default
    ``dropout=0.0`` builds torchvision's model unchanged (``fc`` a ``Linear``).
    """
    _check_dropout(dropout)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if dropout > 0:
        model.fc = nn.Sequential(nn.Dropout(p=float(dropout)), model.fc)
    return model


def mobilenet_v2(num_classes: int = 10, small_input: bool = True, dropout: float | None = None) -> MobileNetV2:
    """torchvision's MobileNetV2, randomly initialized (``weights=None``).

    ``small_input=True``: the depthwise conv of ``features.7``
    (``features.7.conv.1.0``) gets stride 1 instead of 2, so a 32x32 input
    ends in a 2x2 feature map instead of 1x1. Module names are unchanged.
    ``dropout``: the probability of the classifier's ``Dropout``
    (``classifier.0``); ``None`` keeps torchvision's default, 0.2.
    """
    if dropout is not None:
        _check_dropout(dropout)
    kwargs = {} if dropout is None else {"dropout": float(dropout)}
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, **kwargs)
    if small_input:
        depthwise = model.features[7].conv[1][0]
        if not (isinstance(depthwise, nn.Conv2d) and depthwise.stride == (2, 2)):
            raise RuntimeError(
                f"mobilenet_v2(small_input=True) expects features.7.conv.1.0 to be a stride-2 Conv2d, "
                f"got {depthwise!r}; has torchvision's MobileNetV2 changed?"
            )
        depthwise.stride = (1, 1)
    return model


def _rep_block_for(conv: nn.Module) -> RepBlock:
    """A :class:`RepBlock` with the shape of a square, odd, bias-free ``conv`` (padding k//2, dilation 1).

    Initialized like torchvision's models (Kaiming-normal, fan_out, ReLU gain;
    BatchNorm γ = 1, β = 0).
    """
    k = conv.kernel_size[0] if isinstance(conv, nn.Conv2d) else None
    if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (k, k) and conv.stride[0] == conv.stride[1]
            and conv.padding == (k // 2, k // 2) and conv.dilation == (1, 1) and conv.bias is None):
        raise RuntimeError(f"expected a square bias-free Conv2d with padding k//2 to turn into a RepBlock, got {conv!r}")
    block = RepBlock(conv.in_channels, conv.out_channels, k, conv.stride[0], conv.groups)
    for module in block.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return block.to(conv.weight.device, conv.weight.dtype)


def rep_resnet18(num_classes: int = 10, small_input: bool = True) -> ResNet:
    """:func:`resnet18` whose 3x3 block convs (+ their BatchNorm) train as dense RepBlocks.

    In every BasicBlock, ``convK`` becomes ``RepBlock(in, out, 3, stride)``
    (an identity branch where in == out and stride == 1) and ``bnK`` becomes
    ``nn.Identity``. The 7x7 stem and the 1x1 downsample convs stay as they are.
    """
    model = resnet18(num_classes=num_classes, small_input=small_input)
    for block in model.modules():
        if isinstance(block, BasicBlock):
            for k in (1, 2):
                setattr(block, f"conv{k}", _rep_block_for(getattr(block, f"conv{k}")))
                setattr(block, f"bn{k}", nn.Identity())
    return model


def rep_mobilenet_v2(num_classes: int = 10, small_input: bool = True) -> MobileNetV2:
    """:func:`mobilenet_v2` whose depthwise 3x3 convs (+ their BatchNorm) train as depthwise RepBlocks.

    MobileOne-style: in each depthwise ``Conv2dNormActivation`` (conv, bn,
    ReLU6), ``[0]`` becomes ``RepBlock(C, C, 3, stride, groups=C)`` (an
    identity branch where the stride is 1) and ``[1]`` becomes ``nn.Identity``.
    The stem, expansion and projection convs stay as they are.
    """
    model = mobilenet_v2(num_classes=num_classes, small_input=small_input)
    for module in model.modules():
        if isinstance(module, Conv2dNormActivation) and isinstance(module[0], nn.Conv2d):
            conv = module[0]
            if conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels:
                module[0] = _rep_block_for(conv)
                module[1] = nn.Identity()
    return model


#: The course's two architectures, as torchvision builds them (notebooks loop over these).
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
}

#: Their re-parameterizable versions (notebook 06): ``rep_<name>`` for every name in ``BUILDERS``.
REP_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "rep_resnet18": rep_resnet18,
    "rep_mobilenet_v2": rep_mobilenet_v2,
}

#: Every name :func:`build` and :func:`fusionlib.zoo.trained_model` accept.
ALL_BUILDERS: dict[str, Callable[..., nn.Module]] = {**BUILDERS, **REP_BUILDERS}


def build(name: str, **kwargs: Any) -> nn.Module:
    """``build("resnet18", num_classes=10)`` -> a fresh model; names: ``ALL_BUILDERS``."""
    if name not in ALL_BUILDERS:
        raise ValueError(f"Unknown model name {name!r}; choose one of {sorted(ALL_BUILDERS)}.")
    return ALL_BUILDERS[name](**kwargs)
