"""Shared pytest fixtures and helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def reference_file() -> Path:
    """The authors' network output at one cluster per block (see data/official_sacbnet_k1.README.md)."""
    return DATA / "official_sacbnet_k1.pt"


def pytest_configure(config):
    # tests are written for a small CPU; keep the thread count predictable
    os.environ.setdefault("OMP_NUM_THREADS", "2")
