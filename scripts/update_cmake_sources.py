"""Rewrite the SSS_LIB_PYTHON_SCRIPTS list in sss_lib/CMakeLists.txt from the .py files on disk.

Run after adding or removing a file in sss_lib/; tests/slicer/test_static.py checks the list.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    cmake = ROOT / "sss_lib" / "CMakeLists.txt"
    files = sorted(p.relative_to(ROOT / "sss_lib").as_posix() for p in (ROOT / "sss_lib").rglob("*.py")
                   if "__pycache__" not in p.parts)
    body = "\n".join(f"  {f}" for f in files)
    text = cmake.read_text()
    new = re.sub(r"set\(SSS_LIB_PYTHON_SCRIPTS\n.*?\n  \)", f"set(SSS_LIB_PYTHON_SCRIPTS\n{body}\n  )", text, flags=re.S)
    if new == text and body not in text:
        raise SystemExit("could not find the SSS_LIB_PYTHON_SCRIPTS list")
    cmake.write_text(new)
    print(f"{len(files)} files listed in {cmake.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
