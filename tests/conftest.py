"""Shared test settings."""
from __future__ import annotations

import pytest
import torch

from fusionlib import data


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run each test on one torch thread, then restore the count.

    The test inputs are small and gain nothing from a second thread, and on a
    busy 2-core machine two OpenMP threads waiting for each other make every op
    many times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_batch() -> torch.Tensor:
    """Four digits test images, [4, 3, 32, 32]."""
    return data.digits_tensors()[2][:4]


@pytest.fixture(scope="module")
def photo_batch() -> torch.Tensor:
    """The two sample photos, center crops, [2, 3, 224, 224]."""
    return data.sample_photos(crops_per_image=1)
