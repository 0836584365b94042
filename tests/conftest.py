"""Fixtures shared by the tests: where the real sample data lives, a loader for it, one torch thread
and a small SAM-2 backbone for the training tests."""

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


def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module (the machine's cores are shared); restored afterwards."""
    yield from _torch_threads(1)


@pytest.fixture(scope="module")
def two_torch_threads():
    """Torch on two threads for a module (the machine is shared); restored afterwards."""
    yield from _torch_threads(2)


@pytest.fixture(scope="module")
def backbone():
    """SAM-2.1 tiny at 64 px with random weights, one per test module: training changes its decoder
    in place, so modules must not share it."""
    from sss_lib.backbones.sam2_backbone import build_sam2_backbone

    return build_sam2_backbone("sam2.1_hiera_tiny", image_size=64, random_init=True)


@pytest.fixture(scope="session", autouse=True)
def torch_image_encoders():
    """Image encoders stay in torch across the suite (services and CLI subprocesses inherit it):
    "auto" would export each encoder once per fresh ``SSS_HOME`` (tens of seconds per test home).
    tests/test_encoder_runtime.py covers the runtimes and "auto"."""
    from sss_lib.backbones.encoder_runtime import RUNTIME_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(RUNTIME_ENV, "torch")
        yield
