"""Plain folders: a case-list file, or images/ and labels/ with matching names, or just images.

Forms, tried in this order:

1. a case-list file (``cases.csv``, ``cases.txt``, ``case_list.csv`` or ``case_list.txt`` in the
   folder, or the file itself passed as the dataset): one case per line, ``case_id,image,label``
   (tabs or whitespace also separate in ``.txt``), an optional header line starting with
   ``case_id``, ``#`` comments; paths relative to the file; an empty label means unlabeled;
2. an image folder (``images``, ``imagesTr``, ``imgs``, ``volumes``, ...) and a label folder
   (``labels``, ``labelsTr``, ``masks``, ``segmentations``, ``gt``, ...) whose files match by name,
   allowing label suffixes such as ``_seg``/``_gt``/``_label``/``_mask`` and the image suffix
   ``_0000``; an image without a label is an unlabeled case;
3. a folder of image files only: every file is an unlabeled case.

Class names come from an optional ``classes.json`` (or ``labels.json``) beside them:
``{"1": "RV", "2": "Myo"}`` or ``{"RV": 1, "Myo": 2}``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import InputError
from .base import Case, CaseList, parse_class_table, split_suffix, volume_files

LIST_FILES = ("cases.csv", "cases.txt", "case_list.csv", "case_list.txt")
IMAGE_DIRS = ("images", "image", "imagesTr", "imgs", "img", "volumes", "scans")
LABEL_DIRS = ("labels", "label", "labelsTr", "masks", "mask", "segmentations", "segs", "gt", "ground_truth")
CLASS_FILES = ("classes.json", "labels.json")
_LABEL_TAIL = re.compile(r"([_-](seg|segmentation|label|labels|mask|gt))$", re.IGNORECASE)
_IMAGE_TAIL = re.compile(r"(_0000|[_-](img|image))$", re.IGNORECASE)


def find_list_file(root: Path) -> Path | None:
    """The case-list file: ``root`` itself when it is a file, else a known name inside it."""
    if root.is_file():
        return root
    for name in LIST_FILES:
        if (root / name).is_file():
            return root / name
    return None


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def is_plain(root: Path) -> bool:
    """True when ``root`` is or holds a case list, holds an image folder, or holds volume files."""
    return find_list_file(root) is not None or _first_dir(root, IMAGE_DIRS) is not None or bool(volume_files(root))


def read_folders(root: Path) -> CaseList:
    """Read a plain dataset (see the module docstring for the forms).

    Raises:
        InputError: a case-list line that is malformed or names a missing file, a label without
            an image, an unreadable ``classes.json``, no cases.
    """
    list_file = find_list_file(root)
    base = list_file.parent if list_file is not None else root
    class_names = _class_table(base)
    if list_file is not None:
        cases = _listed(list_file)
    elif (images := _first_dir(root, IMAGE_DIRS)) is not None:
        cases = _matched(images, _first_dir(root, LABEL_DIRS))
    else:
        cases = [Case(_case_id(p.name), p, None) for p in volume_files(root)]
    return CaseList(root, "plain", cases, class_names)


def _case_id(name: str) -> str:
    parts = split_suffix(name)
    assert parts is not None
    return parts[0]


def _class_table(folder: Path) -> dict[int, str]:
    for name in CLASS_FILES:
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise InputError(path, f"is not valid JSON (line {err.lineno}: {err.msg})") from None
            if isinstance(data, dict) and isinstance(data.get("labels"), dict):
                data = data["labels"]
            return parse_class_table(data, path)
    return {}


def _listed(list_file: Path) -> list[Case]:
    text = list_file.read_text(encoding="utf-8-sig", errors="replace")
    comma = list_file.suffix.lower() == ".csv" or "," in text
    cases: list[Case] = []
    first = True
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in (line.split(",") if comma else line.split())]
        if first and fields[0].lower() in ("case_id", "case", "id"):
            first = False
            continue  # header
        first = False
        if len(fields) not in (2, 3):
            raise InputError(list_file, f"line {n} has {len(fields)} fields: {line!r}",
                             "Each line is case_id,image,label (the label may be empty).")
        case_id, image = fields[0], fields[1]
        label = fields[2] if len(fields) == 3 and fields[2] else None
        image_path = (list_file.parent / image).resolve()
        if not image_path.is_file():
            raise InputError(image_path, f"image of case {case_id!r} not found ({list_file.name} line {n})",
                             "Fix the path; paths are relative to the case-list file.")
        label_path = (list_file.parent / label).resolve() if label else None
        if label_path is not None and not label_path.is_file():
            raise InputError(label_path, f"label file missing for case {case_id!r} ({list_file.name} line {n})",
                             "Fix the path, or leave the label column empty for an unlabeled case.")
        cases.append(Case(case_id, image_path, label_path))
    return cases


def _matched(images: Path, labels: Path | None) -> list[Case]:
    by_id: dict[str, Path] = {}
    for path in volume_files(images):
        by_id[_IMAGE_TAIL.sub("", _case_id(path.name))] = path
    label_of: dict[str, Path] = {}
    for path in volume_files(labels) if labels is not None else []:
        stem = _case_id(path.name)
        key = stem if stem in by_id else _LABEL_TAIL.sub("", stem)
        if key not in by_id:
            raise InputError(path, f"has no image: no file named {key}.* in {images}",
                             "Name labels like their images (a _seg/_label/_mask/_gt suffix is fine).")
        if key in label_of:
            raise InputError(path, f"is a second label for case {key!r} (also {label_of[key].name})",
                             "Keep one label file per case.")
        label_of[key] = path
    return [Case(case_id, path, label_of.get(case_id)) for case_id, path in sorted(by_id.items())]
