"""Fixtures shared by the tests: where the real sample data lives, and a loader for it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "Testing" / "Data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``Testing/Data`` (real volumes; see its README.md)."""
    assert TEST_DATA.is_dir(), f"missing test data folder {TEST_DATA}"
    return TEST_DATA


@pytest.fixture(scope="session")
def data_file(data_dir: Path) -> Callable[[str], Path]:
    """``data_file("brain1_image.nrrd")`` -> its path, failing loudly when the file is missing."""
    def find(name: str) -> Path:
        path = data_dir / name
        assert path.is_file(), f"missing test data file {path}"
        return path

    return find
