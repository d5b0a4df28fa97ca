"""Offline data: scikit-learn's handwritten digits and its two sample photographs.

Nothing here downloads: both data sets ship inside scikit-learn.

* :func:`digits_tensors` / :func:`digits_loaders` -- the 1,797 8x8 digit images
  (values 0..16), upsampled to ``image_size`` and shaped like a CNN expects
  (float32, NCHW), split into a seeded stratified train / test split.
* :func:`sample_photos` -- deterministic 224x224 crops of ``china.jpg`` and
  ``flower.jpg`` (427x640 each), normalized with the ImageNet mean / std: a
  realistic ImageNet-sized input for checking fused models.

Digits pipeline, in order:

1. ``x / 16`` -> values in [0, 1];
2. bilinear resize 8x8 -> ``image_size`` (``antialias=True``, which only
   matters when shrinking below 8x8);
3. repeat the gray channel ``channels`` times (1 or 3);
4. split (stratified by label, ``random_state=seed``);
5. if ``normalize``: ``x = (x - mean) / std`` with the scalar ``mean`` and
   ``std`` of the *train split* after steps 1-3 (the test split never leaks
   into the statistics). :func:`digits_stats` returns them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fusionlib.arguments import check_positive_int

#: ImageNet channel statistics (RGB), the usual torchvision normalization.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Number of classes in the digits data set.
NUM_CLASSES = 10


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of an NCHW float tensor to ``size`` x ``size``."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _digits_unnormalized(image_size: int, channels: int, test_fraction: float, seed: int):
    """Steps 1-4 of the pipeline: scaled, resized, channel-repeated, split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_positive_int("image_size", image_size)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8]
    x = _resize(x, image_size).repeat(1, channels, 1, 1).contiguous()
    y = torch.from_numpy(digits.target.astype(np.int64))

    indices = np.arange(len(y))
    train_idx, test_idx = train_test_split(
        indices, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def digits_stats(image_size: int = 32, channels: int = 3, test_fraction: float = 0.2, seed: int = 0) -> tuple[float, float]:
    """``(mean, std)`` of the train split (after scaling and resizing), used by ``normalize=True``."""
    x_train, _, _, _ = _digits_unnormalized(image_size, channels, test_fraction, seed)
    return float(x_train.mean()), float(x_train.std())


def digits_tensors(
    image_size: int = 32,
    channels: int = 3,
    normalize: bool = True,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits as ``(x_train, y_train, x_test, y_test)``.

    ``x_*`` are float32 ``[N, channels, image_size, image_size]``, ``y_*`` int64
    labels 0..9. The split is stratified by label and seeded; with the defaults,
    1,437 train and 360 test images. ``normalize=True`` standardizes both splits
    with the train split's scalar mean and std (see the module docstring);
    ``normalize=False`` leaves values in [0, 1].
    """
    x_train, y_train, x_test, y_test = _digits_unnormalized(image_size, channels, test_fraction, seed)
    if normalize:
        mean, std = x_train.mean(), x_train.std()
        x_train = (x_train - mean) / std
        x_test = (x_test - mean) / std
    return x_train, y_train, x_test, y_test


def digits_loaders(
    batch_size: int = 64,
    image_size: int = 32,
    channels: int = 3,
    normalize: bool = True,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` over :func:`digits_tensors`.

    The train loader shuffles with a ``torch.Generator`` seeded with ``seed``
    (same batches in the same order on every run); the test loader keeps the
    order. Both run in the main process (``num_workers=0``): the data is tiny.
    """
    check_positive_int("batch_size", batch_size)
    x_train, y_train, x_test, y_test = digits_tensors(image_size, channels, normalize, test_fraction, seed)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True, generator=generator)
    test_loader = DataLoader(TensorDataset(x_test, y_test), batch_size=batch_size, shuffle=False)
    return train_loader, test_loader


def _crop_offsets(length: int, size: int, count: int) -> list[int]:
    """``count`` evenly spaced start offsets of a ``size`` window in ``length`` (one: centered)."""
    span = length - size
    if count == 1:
        return [int(round(span / 2))]  # torchvision's center_crop convention
    return [round(i * span / (count - 1)) for i in range(count)]


def sample_photos(size: int = 224, crops_per_image: int = 4, normalize: bool = True) -> torch.Tensor:
    """Deterministic ``size`` x ``size`` crops of scikit-learn's two sample photos.

    Each photo (``china.jpg``, ``flower.jpg``; 427x640 RGB) is resized
    (bilinear, antialiased) so that its shorter side is ``round(size * 256 / 224)``
    -- the usual ImageNet "resize 256, crop 224" ratio -- and cut into
    ``crops_per_image`` crops, centered along the shorter side and evenly spaced
    along the longer side from one edge to the other (a single crop is the
    center crop). Values are scaled to [0, 1] and, if ``normalize``, standardized
    per channel: ``(x - IMAGENET_MEAN) / IMAGENET_STD``.

    Returns float32 ``[2 * crops_per_image, 3, size, size]``, photo-major
    (all crops of china.jpg first).
    """
    from sklearn.datasets import load_sample_images

    check_positive_int("size", size)
    check_positive_int("crops_per_image", crops_per_image)
    short_side = max(size, round(size * 256 / 224))

    crops = []
    for image in load_sample_images().images:
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0).float() / 255.0
        height, width = x.shape[-2:]
        # torchvision's resize convention: the longer side is truncated, int(short_side * long / short).
        if height <= width:
            new_h, new_w = short_side, int(short_side * width / height)
        else:
            new_h, new_w = int(short_side * height / width), short_side
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
        if new_w >= new_h:  # landscape: slide along the width
            tops = _crop_offsets(new_h, size, 1) * crops_per_image
            lefts = _crop_offsets(new_w, size, crops_per_image)
        else:
            tops = _crop_offsets(new_h, size, crops_per_image)
            lefts = _crop_offsets(new_w, size, 1) * crops_per_image
        for top, left in zip(tops, lefts):
            crops.append(x[0, :, top : top + size, left : left + size])

    batch = torch.stack(crops).contiguous()
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        batch = (batch - mean) / std
    return batch
