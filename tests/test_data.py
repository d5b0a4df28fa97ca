"""fusionlib.data: the digits (shapes, split, normalization, loaders) and the sample photos."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fusionlib import data



@pytest.fixture(scope="module")
def digits32():
    return data.digits_tensors()


def test_digits_shapes_dtypes_and_split_sizes(digits32):
    x_train, y_train, x_test, y_test = digits32
    assert x_train.shape == (1437, 3, 32, 32) and x_test.shape == (360, 3, 32, 32)
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    assert len(y_train) + len(y_test) == 1797
    assert set(y_train.tolist()) == set(range(10)) == set(y_test.tolist())


def test_split_is_stratified_and_disjoint():
    x_train, y_train, x_test, y_test = data.digits_tensors(image_size=8, channels=1, normalize=False)
    # Every class appears in the test split in (nearly) its overall proportion.
    overall = np.bincount(load_digits().target, minlength=10) / 1797
    test_share = np.bincount(y_test.numpy(), minlength=10) / len(y_test)
    assert np.abs(test_share - overall).max() < 0.01
    # Disjoint and complete: the rows of both splits together are the data set.
    raw = torch.from_numpy(load_digits().images.astype(np.float32) / 16).flatten(1)
    rows = torch.cat([x_train, x_test]).flatten(1)
    assert sorted(r.numpy().tobytes() for r in rows) == sorted(r.numpy().tobytes() for r in raw)


def test_image_size_8_is_the_raw_data_scaled_to_unit_range():
    x_train, y_train, x_test, y_test = data.digits_tensors(image_size=8, channels=1, normalize=False, seed=3)
    images = load_digits().images.astype(np.float32) / 16
    target = load_digits().target
    x = torch.cat([x_train, x_test])[:, 0].numpy()
    y = torch.cat([y_train, y_test]).numpy()
    # Each returned image is one of the raw images with the same label.
    lookup = {img.tobytes(): t for img, t in zip(images, target)}
    assert all(lookup[img.tobytes()] == label for img, label in zip(x, y))
    assert x.min() == 0.0 and x.max() == 1.0


def test_resize_matches_torch_bilinear_and_channels_repeat():
    x3 = data.digits_tensors(image_size=24, channels=3, normalize=False)[0]
    x1 = data.digits_tensors(image_size=24, channels=1, normalize=False)[0]
    raw = data.digits_tensors(image_size=8, channels=1, normalize=False)[0]
    expected = torch.nn.functional.interpolate(raw, size=(24, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x1, expected, rtol=0, atol=1e-6)
    assert x1.shape[1] == 1 and torch.equal(x3, x1.expand(-1, 3, -1, -1))


def test_normalization_uses_train_statistics(digits32):
    x_train, _, x_test, _ = digits32
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1) < 1e-4
    mean, std = data.digits_stats()
    raw_train, _, raw_test, _ = data.digits_tensors(normalize=False)
    torch.testing.assert_close(x_test, (raw_test - mean) / std, rtol=1e-5, atol=1e-5)
    # The test split's own statistics were not used: its mean is not exactly 0.
    assert abs(float(x_test.mean())) > 1e-4
    assert 0 <= float(raw_train.min()) and float(raw_train.max()) <= 1


def test_seed_changes_the_split_and_is_reproducible():
    a = data.digits_tensors(image_size=8, seed=0)[1]
    b = data.digits_tensors(image_size=8, seed=0)[1]
    c = data.digits_tensors(image_size=8, seed=1)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"channels": 2}, "channels"), ({"test_fraction": 1.0}, "test_fraction"), ({"image_size": 0}, "image_size")],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.digits_tensors(**kwargs)


def test_loaders_shuffle_train_reproducibly_and_keep_test_order():
    train_a, test_a = data.digits_loaders(batch_size=100, image_size=8)
    train_b, _ = data.digits_loaders(batch_size=100, image_size=8)
    x_train, y_train, x_test, y_test = data.digits_tensors(image_size=8)
    first_a, first_b = next(iter(train_a)), next(iter(train_b))
    assert torch.equal(first_a[1], first_b[1])  # same seed, same batches
    assert not torch.equal(first_a[1], y_train[:100])  # but shuffled
    epoch_labels = torch.cat([y for _, y in train_a])
    assert torch.equal(epoch_labels.sort().values, y_train.sort().values)
    assert torch.equal(torch.cat([x for x, _ in test_a]), x_test)
    assert len(train_a) == 15 and next(iter(test_a))[0].shape == (100, 3, 8, 8)
    with pytest.raises(ValueError, match="batch_size"):
        data.digits_loaders(batch_size=0)


@pytest.fixture(scope="module")
def photos():
    return data.sample_photos()


def test_sample_photos_shape_and_normalization(photos):
    assert photos.shape == (8, 3, 224, 224) and photos.dtype == torch.float32
    raw = data.sample_photos(normalize=False)
    assert 0 <= float(raw.min()) and float(raw.max()) <= 1
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(photos, (raw - mean) / std)
    # Real photographs: every crop has structure, and the crops are all different.
    assert all(float(crop.std()) > 0.1 for crop in raw)
    flat = photos.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(8) * 1e9).min() > 1.0


def test_sample_photos_are_deterministic(photos):
    assert torch.equal(photos, data.sample_photos())


def test_single_crop_is_torchvisions_resize_then_center_crop():
    from sklearn.datasets import load_sample_images
    from torchvision.transforms.v2 import functional as TF

    crops = data.sample_photos(size=224, crops_per_image=1, normalize=False)
    assert crops.shape == (2, 3, 224, 224)
    for image, crop in zip(load_sample_images().images, crops):
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
        expected = TF.center_crop(TF.resize(x, [256], antialias=True), [224, 224]).clamp(0, 1)
        torch.testing.assert_close(crop, expected, rtol=0, atol=1e-5)


def test_sample_photos_other_sizes_and_bad_input():
    assert data.sample_photos(size=64, crops_per_image=3).shape == (6, 3, 64, 64)
    with pytest.raises(ValueError, match="crops_per_image"):
        data.sample_photos(crops_per_image=0)
