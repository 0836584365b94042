"""Choosing the compute device, and the autocast policy that goes with it.

Accepted device strings: ``"auto"`` (CUDA, else Apple MPS, else CPU), ``"cpu"``, ``"cuda"``,
``"cuda:N"`` and ``"mps"`` (case and surrounding spaces ignored). torch is imported only inside the
functions, so importing this module is free.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from typing import TYPE_CHECKING, Any, Iterator

from .errors import DeviceError

if TYPE_CHECKING:
    import torch

ACCEPTED = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"(auto|cpu|mps|cuda)(?::(\d+))?")


def _mps_available(torch: Any) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """Devices usable here, e.g. ``["cuda:0", "cuda:1", "cpu"]`` (CPU always last)."""
    import torch

    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if _mps_available(torch):
        found.append("mps")
    return found + ["cpu"]


def _why_no_cuda(torch: Any) -> str:
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = f"; CUDA_VISIBLE_DEVICES={visible!r} may hide the GPUs" if visible is not None else ""
    return (
        f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) finds no usable NVIDIA GPU; "
        f"check that `nvidia-smi` works and the driver supports CUDA {torch.version.cuda}{hidden}"
    )


def resolve_device(requested: str = "auto") -> "torch.device":
    """Turn a device string into a ``torch.device`` that exists on this machine.

    ``"auto"`` returns ``cuda`` (the current CUDA device) when a GPU is usable, else ``mps``, else
    ``cpu``. A ``torch.device`` is accepted too (it is read through ``str``).

    Raises:
        DeviceError: the string is not one of :data:`ACCEPTED`, or the device is absent; the message
            says why and lists the devices that are available.
    """
    import torch

    text = str(requested).strip().lower()
    match = _DEVICE.fullmatch(text)
    if not match or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DeviceError(f"unknown device {requested!r}; use {ACCEPTED}")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available(torch) else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    here = ", ".join(available_devices())
    if kind == "mps":
        if not _mps_available(torch):
            raise DeviceError(
                "device 'mps' (Apple GPU) was requested but is not available: it needs Apple silicon, "
                f"macOS 12.3 or newer and a torch build with MPS. Available here: {here}. Use --device auto or cpu."
            )
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {text!r} was requested but {_why_no_cuda(torch)}. Available here: {here}. "
            "Use --device auto or cpu."
        )
    if index is None:
        return torch.device("cuda")
    count = torch.cuda.device_count()
    if int(index) >= count:
        raise DeviceError(
            f"device {text!r} was requested but this machine has {count} CUDA device(s). Available here: {here}."
        )
    return torch.device("cuda", int(index))


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AMX or AVX512-BF16), where bf16 autocast pays.

    ``SSS_CPU_BF16=1`` / ``0`` overrides the detection.
    """
    forced = os.environ.get("SSS_CPU_BF16", "auto").strip().lower()
    if forced in ("1", "true", "on"):
        return True
    if forced in ("0", "false", "off"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: stay in float32
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cuda_graphs_wanted(device: "torch.device") -> bool:
    """Whether SAM-2 tracking on ``device`` should replay CUDA graphs: on CUDA devices, unless
    ``SSS_CUDA_GRAPHS=0`` (for comparisons, or a driver where capture misbehaves)."""
    if device.type != "cuda":
        return False
    return os.environ.get("SSS_CUDA_GRAPHS", "1").strip().lower() not in ("0", "false", "off")


@contextlib.contextmanager
def autocast_cache_held() -> Iterator[None]:
    """Keep autocast's cast weights between autocast regions while this is open (this thread).

    Autocast casts each float32 weight to bf16 when an op uses it, keeps the cast while a region is
    open and drops every cast when the outermost region closes. A propagation that opens a region
    per slice therefore casts every weight again on every slice (on an H200, 315 of SAM-2 tracking's
    690 kernel launches per slice were bf16 copies). This raises autocast's nesting level without
    enabling anything, so the casts survive from one slice's region to the next and are dropped when
    this closes. Casts are cached only for weights that require grad and outside inference mode;
    the weights must not change while this is open.
    """
    import torch

    thread = threading.get_ident()
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        # Autocast's nesting level is per thread: a generator closed from another thread (garbage
        # collection) must not lower that thread's level.
        if threading.get_ident() == thread and torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()


def autocast_context(device: "torch.device | str") -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on CUDA (SAM-2's own inference setting), and on CPUs with native bf16.

    On such a CPU (AMX / AVX512-BF16) SAM-2's memory attention runs about 2.7x faster in bf16
    (measured on this project's build machine); elsewhere CPU and MPS stay in float32, where bf16
    is emulated or incomplete. See :func:`cpu_has_native_bf16` for the override.
    """
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if kind == "cpu" and cpu_has_native_bf16():
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
