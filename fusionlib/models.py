"""ResNet18 and MobileNetV2 for the course: torchvision's models, built offline.

* :func:`resnet18`, :func:`mobilenet_v2`, :func:`build` -- torchvision's
  models with ``weights=None`` (nothing downloads), optionally adapted to the
  32x32 digits (``small_input=True``). Module names stay torchvision's, so
  fusion groups are the standard ones.

The other two jobs around these models live next door and are re-exported
here, so ``models.fusion_groups(...)`` and ``models.trained_model(...)`` work:

* :mod:`fusionlib.recipes` -- :func:`fusion_groups` (which modules fuse in a
  ResNet / MobileNetV2) and :func:`fuse_model` (fold them);
* :mod:`fusionlib.zoo` -- :func:`trained_model` (train on the digits once,
  then serve from a disk cache), :func:`cache_dir`, :func:`cache_key`,
  ``CACHE_VERSION``, ``DEFAULT_LR``.

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
from torchvision.models.resnet import ResNet

__all__ = [
    "BUILDERS",
    "build",
    "resnet18",
    "mobilenet_v2",
    # re-exported from fusionlib.recipes
    "fusion_groups",
    "fuse_model",
    # re-exported from fusionlib.zoo
    "CACHE_VERSION",
    "DEFAULT_LR",
    "cache_dir",
    "cache_key",
    "trained_model",
]


def resnet18(num_classes: int = 10, small_input: bool = True) -> ResNet:
    """torchvision's ResNet18, randomly initialized (``weights=None``).

    ``small_input`` is accepted for symmetry with :func:`mobilenet_v2` and
    changes nothing: torchvision's stem already brings a 32x32 input down to
    the 8x8 the digits carry (see the module docstring).
    """
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


def mobilenet_v2(num_classes: int = 10, small_input: bool = True) -> MobileNetV2:
    """torchvision's MobileNetV2, randomly initialized (``weights=None``).

    ``small_input=True``: the depthwise conv of ``features.7``
    (``features.7.conv.1.0``) gets stride 1 instead of 2, so a 32x32 input
    ends in a 2x2 feature map instead of 1x1. Module names are unchanged.
    """
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
    if small_input:
        depthwise = model.features[7].conv[1][0]
        if not (isinstance(depthwise, nn.Conv2d) and depthwise.stride == (2, 2)):
            raise RuntimeError(
                f"mobilenet_v2(small_input=True) expects features.7.conv.1.0 to be a stride-2 Conv2d, "
                f"got {depthwise!r}; has torchvision's MobileNetV2 changed?"
            )
        depthwise.stride = (1, 1)
    return model


BUILDERS: dict[str, Callable[..., nn.Module]] = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}


def build(name: str, **kwargs: Any) -> nn.Module:
    """``build("resnet18", num_classes=10)`` -> a fresh model; names: ``BUILDERS``."""
    if name not in BUILDERS:
        raise ValueError(f"Unknown model name {name!r}; choose one of {sorted(BUILDERS)}.")
    return BUILDERS[name](**kwargs)


# Re-exports (after the builders: fusionlib.zoo imports them from here when it trains).
from fusionlib.recipes import fuse_model, fusion_groups  # noqa: E402
from fusionlib.zoo import CACHE_VERSION, DEFAULT_LR, cache_dir, cache_key, trained_model  # noqa: E402
