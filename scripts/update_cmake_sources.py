"""Keep the generated parts of the build files in step with the repository.

* the file lists of ``sss_lib/CMakeLists.txt`` (``SSS_LIB_PYTHON_SCRIPTS``) and of each module's
  ``CMakeLists.txt`` (``MODULE_PYTHON_SCRIPTS``, ``MODULE_PYTHON_RESOURCES``; SSSSegment's also
  ``MODULE_TESTING_DATA``, the files of ``Testing/Data``), from the files on disk;
* the catalog entries ``SSSExtension.json`` and ``SSSExtension.s4ext``, from the repository URL and
  branch set once in the top-level ``CMakeLists.txt`` (``SSS_REPOSITORY_URL``, ``SSS_REPOSITORY_BRANCH``).

Run after adding or removing a file, or after changing the repository URL:
``python scripts/update_cmake_sources.py``; ``--check`` only reports what is out of date (exit 1).
tests/slicer/test_static.py runs the check.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("SSSSegment", "SSSTrain")
EXTENSION = "SSSExtension"
TESTING_DATA_MODULE = "SSSSegment"  # its CMakeLists.txt installs Testing/Data (MODULE_TESTING_DATA)


def _python_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _replace_list(text: str, variable: str, entries: list[str]) -> str:
    body = "\n".join(f"  {e}" for e in entries)
    new, count = re.subn(rf"set\({variable}\n.*?\n  \)", lambda m: f"set({variable}\n{body}\n  )", text, flags=re.S)
    if count != 1:
        raise SystemExit(f"could not find the {variable} list")
    return new


def sss_lib_cmake() -> tuple[Path, str]:
    path = ROOT / "sss_lib" / "CMakeLists.txt"
    return path, _replace_list(path.read_text(), "SSS_LIB_PYTHON_SCRIPTS", _python_files(ROOT / "sss_lib"))


def module_cmake(module: str) -> tuple[Path, str]:
    folder = ROOT / module
    path = folder / "CMakeLists.txt"
    scripts = ["${MODULE_NAME}.py"] + [
        f"${{MODULE_NAME}}Lib/{f}" for f in _python_files(folder / f"{module}Lib")
    ]
    resources = sorted(
        p.relative_to(folder).as_posix().replace(module, "${MODULE_NAME}")
        for p in (folder / "Resources").rglob("*") if p.is_file()
    )
    text = _replace_list(path.read_text(), "MODULE_PYTHON_SCRIPTS", scripts)
    text = _replace_list(text, "MODULE_PYTHON_RESOURCES", resources)
    if module == TESTING_DATA_MODULE:
        text = _replace_list(text, "MODULE_TESTING_DATA", testing_data_files())
    return path, text


def testing_data_files() -> list[str]:
    """The files of ``Testing/Data`` (the self-tests' sample data, installed with the extension)."""
    return sorted(p.name for p in (ROOT / "Testing" / "Data").iterdir() if p.is_file())


def repository() -> tuple[str, str]:
    """``(SSS_REPOSITORY_URL, SSS_REPOSITORY_BRANCH)`` from the top-level CMakeLists.txt (each set once)."""
    text = (ROOT / "CMakeLists.txt").read_text()
    values = []
    for var in ("SSS_REPOSITORY_URL", "SSS_REPOSITORY_BRANCH"):
        found = re.findall(rf'^\s*set\({var}\s+"([^"]+)"\)', text, flags=re.M)
        if len(found) != 1:
            raise SystemExit(f"CMakeLists.txt must set {var} exactly once (found {len(found)})")
        values.append(found[0])
    return values[0], values[1]


def raw_url(url: str, branch: str, path: str) -> str:
    """The raw-file URL of ``path`` in the repository (what CMakeLists.txt derives the same way)."""
    return f"{url.replace('https://github.com/', 'https://raw.githubusercontent.com/')}/{branch}/{path}"


def catalog_json() -> tuple[Path, str]:
    path = ROOT / f"{EXTENSION}.json"
    url, branch = repository()
    text = path.read_text()
    json.loads(text)  # fail here, not in the ExtensionsIndex, on a broken file
    for key, value in (("scm_url", f"{url}.git"), ("scm_revision", branch)):
        text, count = re.subn(rf'("{key}":\s*)"[^"]*"', lambda m: f'{m.group(1)}"{value}"', text)
        if count != 1:
            raise SystemExit(f"{path.name} must have one {key!r}")
    return path, text


def catalog_s4ext() -> tuple[Path, str]:
    path = ROOT / f"{EXTENSION}.s4ext"
    url, branch = repository()
    screenshots = [raw_url(url, branch, f"docs/panels/{m}.png") for m in MODULES]
    values = {
        "scmurl": f"{url}.git",
        "scmrevision": branch,
        "homepage": url,
        "iconurl": raw_url(url, branch, f"{EXTENSION}.png"),
        "screenshoturls": " ".join(screenshots),
    }
    lines = []
    for line in path.read_text().splitlines():
        key = line.split(" ", 1)[0]
        lines.append(f"{key} {values[key]}" if key in values and not line.startswith("#") else line)
    return path, "\n".join(lines) + "\n"


def generated() -> list[tuple[Path, str]]:
    return [sss_lib_cmake()] + [module_cmake(m) for m in MODULES] + [catalog_json(), catalog_s4ext()]


def out_of_date() -> list[str]:
    return [str(path.relative_to(ROOT)) for path, text in generated() if path.read_text() != text]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report out-of-date files (exit 1 if any)")
    args = parser.parse_args()
    stale = out_of_date()
    if args.check:
        if stale:
            raise SystemExit("out of date (run python scripts/update_cmake_sources.py): " + ", ".join(stale))
        print("up to date")
        return
    for path, text in generated():
        if path.read_text() != text:
            path.write_text(text)
    print("updated: " + (", ".join(stale) if stale else "nothing"))


if __name__ == "__main__":
    main()
