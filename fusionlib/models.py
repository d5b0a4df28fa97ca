"""ResNet18 and MobileNetV2 for the course: builders, fusion recipes, trained weights.

* :func:`resnet18`, :func:`mobilenet_v2`, :func:`build` -- torchvision's
  models (``weights=None``: nothing downloads), optionally adapted to the
  32x32 digits. Module names stay torchvision's, so fusion groups are the
  standard ones.
* :func:`fusion_groups` -- the conv-bn(-relu) groups of a model, found by
  walking its module tree; :func:`fuse_model` folds them with
  :func:`fusionlib.fusion.fuse_modules`.
* :func:`trained_model` -- trains a model on the digits with
  :mod:`fusionlib.train` once, then serves it from an on-disk cache.

``small_input=True`` (what 32x32 inputs need; measured on the digits, 3 epochs,
batch 64, SGD one-cycle, 2-core CPU; CPU-seconds per epoch on one thread):

* ResNet18 keeps torchvision's stem (7x7/2 conv, 3x3/2 max-pool), so
  ``small_input`` changes nothing for it: 97-98% test accuracy, ~5 CPU-s per
  epoch (~2.7 s wall on two idle cores). Variants that keep more resolution
  were no more accurate (3x3/1 stem + max-pool: 96.9%; 7x7/2 stem without
  max-pool: 97.2%) and much slower: the CIFAR stem (3x3/1, no max-pool) costs
  ~41 CPU-s per epoch, 8x more, because layer1 then runs at 32x32 instead of
  8x8 -- and the digits only carry 8x8 pixels of information.
* MobileNetV2 sets the stride of ``features.7`` (the depthwise conv that
  starts the 64-channel stage) to 1, so the last feature map is 2x2 instead of
  1x1: 95.8-96.9% (seeds 0-2) vs 92.5-92.8% unmodified, for ~25% more time
  (7.4 vs 6.0 CPU-s per epoch). A stride-1 first conv (``features.0``) gave
  94.4-95.3% at 11.5 CPU-s per epoch.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual, MobileNetV2
from torchvision.ops.misc import Conv2dNormActivation
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

#: Bump when a builder, the data pipeline or the training recipe changes, so
#: old cache entries are not served for the new recipe.
CACHE_VERSION = 1

#: Learning rates that reach >= 95% test accuracy in 3 epochs on the digits.
DEFAULT_LR = {"resnet18": 0.03, "mobilenet_v2": 0.05}


# --------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------
def resnet18(num_classes: int = 10, small_input: bool = True) -> ResNet:
    """torchvision's ResNet18, randomly initialized (``weights=None``).

    ``small_input`` is accepted for symmetry with :func:`mobilenet_v2` and
    changes nothing: torchvision's stem already works well at 32x32 (see the
    module docstring for the measurement).
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
        assert isinstance(depthwise, nn.Conv2d) and depthwise.stride == (2, 2), depthwise
        depthwise.stride = (1, 1)
    return model


BUILDERS: dict[str, Callable[..., nn.Module]] = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}


def build(name: str, **kwargs: Any) -> nn.Module:
    """``build("resnet18", num_classes=10)`` -> a fresh model; names: ``BUILDERS``."""
    if name not in BUILDERS:
        raise ValueError(f"Unknown model name {name!r}; choose one of {sorted(BUILDERS)}.")
    return BUILDERS[name](**kwargs)


# --------------------------------------------------------------------------
# Fusion recipes
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

    Raises ``TypeError`` for an unknown architecture and ``ValueError`` if the
    model or any module in a group is in training mode (BatchNorm then uses
    batch statistics, which cannot be folded).
    """
    from fusionlib.fusion import fuse_modules

    groups = fusion_groups(model)
    in_training = [name for name, module in model.named_modules() if module.training]
    if in_training:
        where = "the model" if in_training[0] == "" else f"module {in_training[0]!r}"
        raise ValueError(
            f"fuse_model folds BatchNorm running statistics and needs eval mode, but {where} "
            f"is in training mode ({len(in_training)} modules are): call model.eval() first."
        )
    return fuse_modules(model, groups, inplace=inplace)


# --------------------------------------------------------------------------
# Trained models, cached on disk
# --------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$FUSIONLIB_CACHE``, else ``$XDG_CACHE_HOME/fusionlib``, else ``~/.cache/fusionlib``."""
    if os.environ.get("FUSIONLIB_CACHE"):
        return Path(os.environ["FUSIONLIB_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fusionlib"
    return Path.home() / ".cache" / "fusionlib"


def cache_key(params: dict[str, Any]) -> str:
    """SHA-256 (hex, first 16 digits) of the parameters, torch/torchvision versions and CACHE_VERSION."""
    payload = {
        "params": params,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cache_version": CACHE_VERSION,
    }
    text = json.dumps(payload, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _save_atomically(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def trained_model(
    name: str = "resnet18",
    epochs: int = 3,
    image_size: int = 32,
    seed: int = 0,
    batch_size: int = 64,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    channels: int = 3,
    small_input: bool = True,
    test_fraction: float = 0.2,
    progress: bool = True,
    use_cache: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """A model trained on the digits, from the disk cache when available.

    Trains ``build(name, num_classes=10, small_input=small_input)`` with
    :func:`fusionlib.train.fit` (SGD + Nesterov momentum, one-cycle schedule)
    on :func:`fusionlib.data.digits_loaders`. ``lr=None`` picks
    ``DEFAULT_LR[name]``. The state dict and metrics are cached in
    :func:`cache_dir` under ``{name}-{cache_key}.pt``, keyed by every parameter
    here except ``progress`` / ``use_cache``, plus the torch version; the file is
    written atomically (temporary file + rename). ``use_cache=False`` neither
    reads nor writes the cache.

    Returns ``(model.eval(), metrics)``; ``metrics`` has ``test_accuracy``
    (last epoch, in [0, 1]), ``train_seconds`` (of the run that trained it),
    ``epochs``, ``history`` (:func:`fit`'s rows), ``params``, ``key``,
    ``path`` and ``cached`` (True when loaded from disk).
    """
    from fusionlib.data import digits_loaders
    from fusionlib.train import fit, seed_everything

    if name not in BUILDERS:
        raise ValueError(f"Unknown model name {name!r}; choose one of {sorted(BUILDERS)}.")
    params = {
        "name": name,
        "epochs": epochs,
        "image_size": image_size,
        "seed": seed,
        "batch_size": batch_size,
        "lr": DEFAULT_LR[name] if lr is None else float(lr),
        "momentum": momentum,
        "weight_decay": weight_decay,
        "channels": channels,
        "small_input": small_input,
        "test_fraction": test_fraction,
    }
    key = cache_key(params)
    path = cache_dir() / f"{name}-{key}.pt"

    def fresh_model() -> nn.Module:
        seed_everything(seed)  # same initial weights on every run
        model = build(name, num_classes=10, small_input=small_input)
        if channels != 3:
            _set_input_channels(model, channels)
        return model

    if use_cache and path.exists():
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            model = fresh_model()
            model.load_state_dict(entry["state_dict"])
            metrics = dict(entry["metrics"], cached=True, path=str(path))
            return model.eval(), metrics
        except Exception as exc:  # a corrupt or stale file: retrain and overwrite it
            import warnings

            warnings.warn(f"Ignoring unreadable cache entry {path} ({exc.__class__.__name__}: {exc}); retraining.")

    model = fresh_model()

    train_loader, test_loader = digits_loaders(
        batch_size=batch_size, image_size=image_size, channels=channels, test_fraction=test_fraction, seed=seed
    )
    start = time.perf_counter()
    history = fit(
        model,
        train_loader,
        epochs,
        lr=params["lr"],
        seed=seed,
        test_loader=test_loader,
        progress=progress,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    metrics: dict[str, Any] = {
        "test_accuracy": history[-1]["test_acc"],
        "train_seconds": time.perf_counter() - start,
        "epochs": epochs,
        "history": history,
        "params": params,
        "key": key,
    }
    model.eval()
    if use_cache:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _save_atomically({"state_dict": state, "metrics": metrics}, path)
    return model, dict(metrics, cached=False, path=str(path))


def _set_input_channels(model: nn.Module, channels: int) -> None:
    """Replace the first conv so the model takes ``channels`` input channels (same name, same shape otherwise)."""
    parent, attr = (model, "conv1") if isinstance(model, ResNet) else (model.features[0], "0")
    old = getattr(parent, attr)
    new = nn.Conv2d(
        channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation, old.groups, old.bias is not None
    )
    setattr(parent, attr, new)
