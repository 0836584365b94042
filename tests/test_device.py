"""Compute-device selection and autocast policy."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import warnings

import pytest
import torch

from sss_lib import device
from sss_lib.errors import DeviceError


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def _no_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "_mps_available", lambda _torch: False)


def test_cpu_resolves_whatever_the_spelling() -> None:
    assert device.resolve_device("cpu") == torch.device("cpu")
    assert device.resolve_device(" CPU ") == torch.device("cpu")
    assert device.resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_on_this_machine_matches_torch() -> None:
    if torch.cuda.is_available():
        assert device.resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(DeviceError, match="Available here: .*cpu") as caught:
            device.resolve_device("cuda")
        assert "--device auto or cpu" in str(caught.value)


def test_absent_cuda_explains_why_and_what_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 0)
    _no_mps(monkeypatch)
    with pytest.raises(DeviceError) as caught:
        device.resolve_device("cuda:1")
    message = str(caught.value)
    assert "'cuda:1' was requested" in message and "Available here: cpu." in message
    expected = "no CUDA support" if torch.version.cuda is None else "finds no usable NVIDIA GPU"
    assert expected in message
    assert device.available_devices() == ["cpu"]


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 0)
    _no_mps(monkeypatch)
    assert device.resolve_device() == torch.device("cpu")
    monkeypatch.setattr(device, "_mps_available", lambda _torch: True)
    assert device.resolve_device("auto") == torch.device("mps")
    _fake_cuda(monkeypatch, 1)
    assert device.resolve_device("AUTO").type == "cuda"


def test_cuda_index_is_checked_against_the_device_count(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 2)
    _no_mps(monkeypatch)
    assert device.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert device.resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(DeviceError, match=r"has 2 CUDA device\(s\). Available here: cuda:0, cuda:1, cpu"):
        device.resolve_device("cuda:2")


def test_mps_absent_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 0)
    _no_mps(monkeypatch)
    with pytest.raises(DeviceError, match="'mps' .* not available.*Available here: cpu"):
        device.resolve_device("mps")


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "cpu:0", "mps:1", "", "tpu", "cuda:-1", "cuda:0:1"])
def test_bad_strings_are_rejected(bad: str) -> None:
    with pytest.raises(DeviceError, match="use auto, cpu, cuda, cuda:N or mps"):
        device.resolve_device(bad)


def test_autocast_is_bf16_on_cuda_and_on_cpus_with_native_bf16(monkeypatch) -> None:
    monkeypatch.setenv("SSS_CPU_BF16", "0")
    assert isinstance(device.autocast_context(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(device.autocast_context("mps"), contextlib.nullcontext)
    monkeypatch.setenv("SSS_CPU_BF16", "1")
    ctx = device.autocast_context("cpu")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16 and ctx.device == "cpu"
    assert isinstance(device.autocast_context("mps"), contextlib.nullcontext)
    monkeypatch.setenv("SSS_CPU_BF16", "auto")
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    assert device.cpu_has_native_bf16() is ("amx_bf16" in flags or "avx512_bf16" in flags)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns when CUDA is absent; the policy is what we test
        ctx = device.autocast_context("cuda:0")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def test_importing_device_and_weights_does_not_import_torch() -> None:
    code = "import sys, sss_lib.device, sss_lib.weights, sss_lib.download; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
