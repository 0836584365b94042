"""Fixtures shared by the tests: where the real sample data lives, a loader for it, one torch thread,
a small SAM-2 backbone for the training tests, and a tiny task model trained on phantoms."""

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


@pytest.fixture(scope="module")
def sam2_to_span_edge(two_torch_threads):
    """SAM-2.1 tiny at 64 px with random weights and no early stop: random weights give arbitrary
    masks, so every propagation run goes to its span's edge (or to what the test puts there)."""
    from sss_lib.backbones.sam2_backbone import build_sam2_backbone

    return build_sam2_backbone("sam2.1_hiera_tiny", image_size=64, random_init=True, stop_after_empty=None)


@pytest.fixture(scope="session")
def bright_box_volume():
    """``bright_box_volume(n_slices, size, seed)`` -> a ``Volume`` of ``n_slices`` noisy ``size`` x ``size``
    slices ([k, j, i]; 1 x 1 x 3 mm, identity direction) with a bright box at rows 12-29, columns 14-33."""
    def make(n_slices: int, size: int, seed: int):
        import numpy as np

        from sss_lib.volume import Volume

        rng = np.random.default_rng(seed)
        vox = rng.normal(100, 20, (n_slices, size, size)).astype(np.float32)
        vox[:, 12:30, 14:34] += 250
        return Volume(vox, (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), np.eye(3), "phantom")

    return make


@pytest.fixture(scope="module")
def heart_phantoms(tmp_path_factory) -> Path:
    """Two tiny cardiac phantoms (5 slices of 48 x 48 px, 3 x 3 x 8 mm), one folder per module."""
    from sss_lib.phantoms import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("phantoms"), 2, seed=8, n_slices=5, size=(48, 48),
                                spacing=(3.0, 3.0, 8.0))


@pytest.fixture(scope="module")
def heart_task_model(heart_phantoms, backbone, tmp_path_factory) -> Path:
    """``heart.ssstask`` trained in seconds on ``heart_phantoms`` with the module's ``backbone``: the
    coarse head alone (the decoder stays as built), enough for PCSW to find the three classes."""
    from sss_lib.trainer import TrainConfig, train_task_model

    config = TrainConfig(heart_phantoms, tmp_path_factory.mktemp("model") / "heart.ssstask", iterations=100, seed=0,
                         head_batch=5, head_width=16, lr_head=1e-2, train_decoder=False, val_cases=())
    return train_task_model(config, backbone=backbone).model_path


def _kill_trainers(jobs_dir: Path) -> None:
    import json
    import os
    import signal

    for record in (jobs_dir / "jobs").glob("*/job.json"):
        pid = json.loads(record.read_text()).get("pid")
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="session")
def kill_trainers() -> Callable[[Path], None]:
    """``kill_trainers(jobs_dir)`` kills the trainer of every job under a service's ``--jobs-dir``:
    they run in their own sessions and outlive the service, so a test must leave none behind."""
    return _kill_trainers


@pytest.fixture(scope="session", autouse=True)
def torch_image_encoders():
    """Image encoders stay in torch across the suite (services and CLI subprocesses inherit it):
    "auto" would export each encoder once per fresh ``SSS_HOME`` (tens of seconds per test home).
    tests/test_encoder_runtime.py covers the runtimes and "auto"."""
    from sss_lib.backbones.encoder_runtime import RUNTIME_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(RUNTIME_ENV, "torch")
        yield


@pytest.fixture(scope="session", autouse=True)
def float32_on_every_cpu():
    """No bf16 autocast on CPUs with native bf16 (AVX512-BF16, AMX) across the suite, subprocesses
    included: there SAM-2 would track in bf16 while the tests' reference paths compute in float32,
    and exact comparisons would hold on one machine and not on another. Tests of bf16 set
    ``SSS_CPU_BF16=1`` themselves (test_device, test_sam2_backbone, test_autocast_cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSS_CPU_BF16", "0")
        yield
