"""Shared test settings."""
from __future__ import annotations

import pytest
import torch


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
