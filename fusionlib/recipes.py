"""Fusion recipes: which modules of a ResNet or MobileNetV2 fuse, and folding them.

* :func:`fusion_groups` -- the conv-bn(-relu) groups of a model, found by
  walking its module tree (any depth or width, and the models' building blocks
  on their own);
* :func:`fuse_model` -- folds every group with
  :func:`fusionlib.fusion.fuse_modules`: each conv gets
  ``W' = W·γ/√(σ²+ε)``, ``b' = (b − μ)·γ/√(σ²+ε) + β`` and the BatchNorm
  becomes ``nn.Identity``.

Both are re-exported by :mod:`fusionlib.models`.
"""
from __future__ import annotations

from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual, MobileNetV2
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import Conv2dNormActivation

from fusionlib.modules import require_eval_mode

__all__ = ["fusion_groups", "fuse_model"]


def fusion_groups(model: nn.Module) -> list[list[str]]:
    """The module-name groups that :func:`fuse_model` fuses, found by walking the tree.

    ResNet (any depth, width or ``num_classes``):

    * the stem ``["conv1", "bn1", "relu"]`` -- ``model.relu`` is called once,
      right after ``bn1``, so it can be folded into a ``ConvReLU2d``;
    * per block ``["layerX.Y.conv1", "layerX.Y.bn1"]``, ``["layerX.Y.conv2",
      "layerX.Y.bn2"]`` (and ``conv3``/``bn3`` in a Bottleneck);
    * ``["layerX.0.downsample.0", "layerX.0.downsample.1"]`` where present.

    ResNet18: 1 + 16 + 3 = 20 groups.

    Why the block ReLU is not fused: ``BasicBlock.forward`` calls *one*
    ``self.relu`` module twice -- after ``bn1`` and after the residual add.
    Fusing ``[conv1, bn1, relu]`` would put the ReLU into ``conv1`` and replace
    ``block.relu`` by ``Identity``, which also deletes the ReLU after the add:
    a different function. (It is stateless, so giving the block a second ReLU
    module would be safe, but only by rewriting ``forward``; that is what a
    graph-level pass such as :func:`fusionlib.fx.fuse_conv_bn` can do, because it
    sees the two calls as two nodes.) So blocks get conv-bn folding only, and
    the ReLU stays a separate, cheap, in-place op.

    MobileNetV2: every ``Conv2dNormActivation``'s conv-bn
    (``["features.0.0", "features.0.1"]``, ``["features.i.conv.j.0",
    "features.i.conv.j.1"]``, ``["features.18.0", "features.18.1"]``) and each
    ``InvertedResidual``'s final projection ``["features.i.conv.k",
    "features.i.conv.k+1"]``. ReLU6 is not in the fusable set, so it stays.
    Standard MobileNetV2: 1 + 2 + 16 * 3 + 1 = 52 groups.

    Their building blocks work on their own too (names then relative to the
    block): a ``BasicBlock`` / ``Bottleneck`` gives its conv-bn pairs and its
    downsample; a ``Conv2dNormActivation`` (MobileNetV2's ConvBNReLU) or an
    ``InvertedResidual`` gives its conv-bn pairs.

    Raises ``TypeError`` for any other architecture.
    """
    if isinstance(model, ResNet):
        return _resnet_groups(model)
    if isinstance(model, (BasicBlock, Bottleneck)):
        return _residual_block_groups(model)
    if isinstance(model, (MobileNetV2, Conv2dNormActivation, InvertedResidual)):
        return _sequential_conv_bn_groups(model)
    raise TypeError(
        f"fusion_groups knows torchvision ResNet and MobileNetV2 and their blocks (BasicBlock, Bottleneck, "
        f"Conv2dNormActivation, InvertedResidual), not {type(model).__name__}; "
        "pass explicit groups to fusionlib.fusion.fuse_modules, or use fusionlib.fx.fuse_conv_bn."
    )


def fuse_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm of :func:`fusion_groups` into its conv (eval mode only).

    Each group's conv gets ``W' = W * gamma / sqrt(var + eps)`` and
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``; the BatchNorm (and a
    fused ReLU) becomes ``nn.Identity``. ``inplace=False`` (default) returns a
    fused deep copy and leaves ``model`` untouched.

    Raises ``TypeError`` for an unknown architecture and ``ValueError`` naming
    the modules in training mode if there are any (BatchNorm then uses batch
    statistics, which cannot be folded).
    """
    from fusionlib.fusion import fuse_modules

    groups = fusion_groups(model)
    require_eval_mode(
        model, "fuse_model",
        because="it folds BatchNorm's running statistics, and in training mode BatchNorm uses batch statistics",
    )
    return fuse_modules(model, groups, inplace=inplace)


# --------------------------------------------------------------------------
# Walking the module tree
# --------------------------------------------------------------------------
def _is_conv_bn(first: nn.Module, second: nn.Module) -> bool:
    return isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d)


def _sequential_conv_bn_groups(root: nn.Module, prefix: str = "") -> list[list[str]]:
    """Every (Conv2d, BatchNorm2d) pair of consecutive children of any ``nn.Sequential``.

    Covers torchvision's ``Conv2dNormActivation`` (conv, bn, activation), the
    bare conv-bn tail of ``InvertedResidual.conv`` and ResNet's ``downsample``.
    """
    groups = []
    for name, module in root.named_modules(prefix=prefix):
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if _is_conv_bn(a, b):
                groups.append([f"{name}.{name_a}" if name else name_a, f"{name}.{name_b}" if name else name_b])
    # In forward (module-tree) order: a block's inner conv-bn pairs before its tail pair.
    order = {name: i for i, (name, _) in enumerate(root.named_modules(prefix=prefix))}
    return sorted(groups, key=lambda group: order[group[0]])


def _resnet_groups(model: ResNet) -> list[list[str]]:
    """Stem ``[conv1, bn1, relu]``; per block ``[convK, bnK]``; ``[downsample.0, downsample.1]``."""
    groups: list[list[str]] = []
    if _is_conv_bn(model.conv1, model.bn1):
        groups.append(["conv1", "bn1", "relu"] if isinstance(model.relu, nn.ReLU) else ["conv1", "bn1"])
    for name, block in model.named_modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            groups += _residual_block_groups(block, prefix=name)
    return groups


def _residual_block_groups(block: BasicBlock | Bottleneck, prefix: str = "") -> list[list[str]]:
    """``[convK, bnK]`` for K = 1, 2 (, 3) and ``[downsample.0, downsample.1]`` of one block."""
    dot = f"{prefix}." if prefix else ""
    groups = []
    for k in (1, 2, 3):
        conv, bn = getattr(block, f"conv{k}", None), getattr(block, f"bn{k}", None)
        if conv is not None and _is_conv_bn(conv, bn):
            groups.append([f"{dot}conv{k}", f"{dot}bn{k}"])
    if isinstance(block.downsample, nn.Sequential):
        groups += _sequential_conv_bn_groups(block.downsample, prefix=f"{dot}downsample")
    return groups
