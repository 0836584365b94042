"""Pick the reader for a dataset path: nnU-Net v2 raw, ACDC folders, or plain folders."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from ..errors import InputError
from .acdc import is_acdc, read_acdc
from .base import CaseList
from .folders import IMAGE_DIRS, LIST_FILES, is_plain, read_folders
from .nnunet import is_nnunet, read_nnunet

log = logging.getLogger(__name__)

LayoutName = Literal["auto", "nnunet", "acdc", "plain"]


def detect_layout(path: Path) -> Literal["nnunet", "acdc", "plain"]:
    """The layout of ``path``: a ``dataset.json`` means nnU-Net, ``patientNNN`` folders ACDC,
    a case-list file, an image folder or loose volume files a plain dataset.

    Raises:
        InputError: the path is missing or matches no layout.
    """
    if not path.exists():
        raise InputError(path, "not found", "Check the dataset path.")
    if path.is_file():
        if path.suffix.lower() in (".csv", ".txt"):
            return "plain"
        raise InputError(path, "is a file, not a dataset folder or case list (.csv/.txt)",
                         "Pass the dataset folder.")
    if is_nnunet(path):
        return "nnunet"
    if is_acdc(path):
        return "acdc"
    if is_plain(path):
        return "plain"
    raise InputError(
        path,
        "is not a dataset folder: found no dataset.json (nnU-Net v2), no patientNNN folders (ACDC), "
        f"no case list ({', '.join(LIST_FILES)}), no image folder ({', '.join(IMAGE_DIRS[:3])}, ...) "
        "and no .nii/.nii.gz/.nrrd files",
        "Pass the folder that holds the dataset.",
    )


def open_dataset(
    path: str | Path, *, layout: LayoutName = "auto", channel: int | str | None = None,
    include_unlabeled: bool = True,
) -> CaseList:
    """The cases and class table of a dataset, whatever its layout.

    Args:
        path: dataset folder, or a case-list file (plain layout).
        layout: ``"auto"`` (see :func:`detect_layout`) or the layout to read it as.
        channel: nnU-Net only: the channel to use (index or name) when there are several.
        include_unlabeled: nnU-Net only: also return ``imagesTs`` cases, unlabeled.

    Raises:
        InputError: see the readers (:mod:`.nnunet`, :mod:`.acdc`, :mod:`.folders`).
    """
    root = Path(path)
    chosen = detect_layout(root) if layout == "auto" else layout
    if not root.exists():
        raise InputError(root, "not found", "Check the dataset path.")
    if chosen == "nnunet":
        if not is_nnunet(root):
            raise InputError(root / "dataset.json", "not found (an nnU-Net v2 dataset folder holds one)",
                             "Pass the DatasetXXX_Name folder, or use layout='auto'.")
        cases = read_nnunet(root, channel=channel, include_unlabeled=include_unlabeled)
    elif chosen == "acdc":
        cases = read_acdc(root)
    elif chosen == "plain":
        cases = read_folders(root)
    else:
        raise ValueError(f"unknown layout {layout!r}; use auto, nnunet, acdc or plain")
    log.info("%s", cases.summary())
    return cases
