"""Test scheduling for `make test` (pytest-xdist, ``--dist loadgroup``).

The cells of one notebook share one kernel, so nbval's items of a notebook
must run on the same worker, in order: each gets the xdist group of its
notebook. Every other test (unit tests, each notebook's papermill smoke run)
is scheduled on its own, so the slow smoke runs spread over both workers.
"""
from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.xdist_group(item.path.name))
