"""What every dataset reader returns: a :class:`CaseList` of :class:`Case` (image + optional label).

Readers only look at file names and small metadata files; no volume is read until
:func:`sss_lib.datasets.labels.check_labels` or the training code asks for it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterator, Mapping

from ..errors import InputError

log = logging.getLogger(__name__)

#: Volume files the readers pick up (what :mod:`sss_lib.volume_io` reads), longest first.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")


@dataclasses.dataclass(frozen=True)
class Case:
    """One volume of a dataset.

    Attributes:
        case_id: unique within its :class:`CaseList` (e.g. ``"case_001"``, ``"patient001_frame01"``).
        image_path: the image file.
        label_path: its label map, or None for an unlabeled case.
        meta: what the layout says about the case (``split``, ACDC ``phase``/``group``, ...).
    """

    case_id: str
    image_path: Path
    label_path: Path | None = None
    meta: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    @property
    def labeled(self) -> bool:
        return self.label_path is not None


@dataclasses.dataclass
class CaseList:
    """The cases of a dataset and its class table.

    Attributes:
        root: the dataset folder (or case-list file) it was read from.
        layout: ``"nnunet"``, ``"acdc"`` or ``"plain"``.
        cases: in a stable order (sorted by case id within each group).
        class_names: label value -> name, background (0) excluded; empty when the layout declares
            no classes (plain folders without ``classes.json``): :func:`check_labels` infers them.
        ignore_label: nnU-Net's ``"ignore"`` value (voxels nobody labeled), or None.
        modality: ``"CT"``, ``"MR"`` or ``"auto"`` as far as the layout tells.
    """

    root: Path
    layout: str
    cases: list[Case]
    class_names: dict[int, str]
    ignore_label: int | None = None
    modality: str = "auto"

    def __post_init__(self) -> None:
        if not self.cases:
            raise InputError(self.root, f"holds no cases ({self.layout} layout)",
                             "Check that the images are where this layout expects them.")
        seen: dict[str, Case] = {}
        for case in self.cases:
            if case.case_id in seen:
                raise InputError(case.image_path,
                                 f"case id {case.case_id!r} is used twice (also by {seen[case.case_id].image_path})",
                                 "Give every case a unique name.")
            seen[case.case_id] = case
        if 0 in self.class_names:
            raise InputError(self.root, f"label 0 is background but is declared as class {self.class_names[0]!r}",
                             "Start class labels at 1.")

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[Case]:
        return iter(self.cases)

    def __getitem__(self, index: int) -> Case:
        return self.cases[index]

    def get(self, case_id: str) -> Case:
        """The case called ``case_id``; KeyError naming the known ids when absent."""
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise KeyError(f"no case {case_id!r} in {self.root} (cases: {', '.join(c.case_id for c in self.cases[:10])}"
                       f"{', ...' if len(self.cases) > 10 else ''})")

    @property
    def labeled(self) -> list[Case]:
        return [c for c in self.cases if c.label_path is not None]

    @property
    def unlabeled(self) -> list[Case]:
        return [c for c in self.cases if c.label_path is None]

    def summary(self) -> str:
        """One line for logs and the CLI."""
        classes = ", ".join(f"{v} {n}" for v, n in sorted(self.class_names.items())) or "not declared"
        return (f"{self.root} ({self.layout}): {len(self.cases)} cases, {len(self.labeled)} labeled, "
                f"{len(self.unlabeled)} unlabeled; classes: {classes}")


def split_suffix(name: str) -> tuple[str, str] | None:
    """``("stem", ".nii.gz")`` for a volume file name, None for anything else (hidden files too)."""
    if name.startswith("."):
        return None
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    return None


def volume_files(folder: Path) -> list[Path]:
    """The volume files directly inside ``folder``, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and split_suffix(p.name) is not None)


def parse_class_table(data: object, source: Path) -> dict[int, str]:
    """Class names from ``{"1": "RV", ...}`` or ``{"RV": 1, ...}`` (background entries dropped)."""
    if not isinstance(data, dict) or not data:
        raise InputError(source, "class table must be a non-empty JSON object",
                         'Write e.g. {"1": "RV", "2": "Myo"} or {"background": 0, "RV": 1}.')
    out: dict[int, str] = {}
    for key, value in data.items():
        # Both directions occur in the wild (nnU-Net v2: name -> value; MSD and Slicer: value -> name).
        if isinstance(value, int) and not isinstance(value, bool):
            label, name = value, str(key)
        elif str(key).strip().lstrip("-").isdigit():
            label, name = int(str(key).strip()), str(value)
        else:
            raise InputError(source, f"class entry {key!r}: {value!r} is neither name -> integer nor integer -> name",
                             'Write e.g. {"1": "RV"} or {"RV": 1}.')
        if label == 0:
            continue
        if label < 0:
            raise InputError(source, f"class {name!r} has negative label {label}", "Use labels 1, 2, ...")
        if label in out:
            raise InputError(source, f"label {label} is declared twice ({out[label]!r} and {name!r})",
                             "Give every class its own label value.")
        out[label] = name
    return out
