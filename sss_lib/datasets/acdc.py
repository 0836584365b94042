"""The ACDC challenge's own folders (Automated Cardiac Diagnosis Challenge, MICCAI 2017).

Layout, as distributed (``training/`` and ``testing/`` may or may not be there)::

    ROOT/[training|testing/]patientNNN/
        Info.cfg                        ED: 1, ES: 12, Group: DCM, Height, NbFrame, Weight
        patientNNN_4d.nii.gz            the whole cine series: ignored
        patientNNN_frameMM.nii.gz       one 3D frame (the ED and ES phases)
        patientNNN_frameMM_gt.nii.gz    its labels: 1 RV, 2 Myo, 3 LV

Each frame is a case ``patientNNN_frameMM``; a frame without ``_gt`` is unlabeled.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..errors import InputError
from .base import Case, CaseList

log = logging.getLogger(__name__)

CLASS_NAMES = {1: "RV", 2: "Myo", 3: "LV"}
_PATIENT = re.compile(r"patient\d+")
_FRAME = re.compile(r"(patient\d+)_frame(\d+)(_gt)?\.nii(\.gz)?")


def patient_folders(root: Path) -> list[Path]:
    """``patientNNN`` folders in ``root`` or one level below (``training/``, ``testing/``)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _PATIENT.fullmatch(p.name)]
    if not found:
        for sub in root.iterdir():
            if sub.is_dir() and not sub.name.startswith("."):
                found += [p for p in sub.iterdir() if p.is_dir() and _PATIENT.fullmatch(p.name)]
    return sorted(found, key=lambda p: (p.parent.name, p.name))


def is_acdc(root: Path) -> bool:
    """True when ``root`` (or a folder in it) holds ``patientNNN`` folders."""
    return bool(patient_folders(root))


def read_info_cfg(path: Path) -> dict[str, str]:
    """``Info.cfg`` as ``{"ED": "1", "ES": "12", "Group": "DCM", ...}`` (empty when absent)."""
    if not path.is_file():
        return {}
    info: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise InputError(path, f"line {n} is not 'Key: value': {line.strip()!r}")
        info[key.strip()] = value.strip()
    return info


def read_acdc(root: Path) -> CaseList:
    """Read ACDC patient folders under ``root``.

    Raises:
        InputError: a ``_gt`` file without its frame, a patient folder with no frames, no patients.
    """
    folders = patient_folders(root)
    if not folders:
        raise InputError(root, "holds no patientNNN folders", "Pass the ACDC folder (or its training/ folder).")
    cases: list[Case] = []
    for folder in folders:
        cases += _patient_cases(folder, split=folder.parent.name if folder.parent != root else "")
    return CaseList(root, "acdc", cases, dict(CLASS_NAMES), modality="MR")


def _patient_cases(folder: Path, split: str) -> list[Case]:
    pid = folder.name
    info = read_info_cfg(folder / "Info.cfg")
    phases = {}
    for phase in ("ED", "ES"):
        if info.get(phase, "").isdigit():
            phases[int(info[phase])] = phase
    images: dict[int, Path] = {}
    labels: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        m = _FRAME.fullmatch(path.name)
        if not m:
            continue  # the 4D series, Info.cfg and anything else
        if m.group(1) != pid:
            raise InputError(path, f"belongs to {m.group(1)} but lies in {pid}'s folder", "Move it to its patient's folder.")
        (labels if m.group(3) else images)[int(m.group(2))] = path
    if not images:
        raise InputError(folder, "holds no patientNNN_frameMM.nii.gz frames", "Check the ACDC folder.")
    for frame, label in labels.items():
        if frame not in images:
            raise InputError(label, f"has no image: {pid}_frame{frame:02d}.nii.gz is missing", "Add the frame.")
    for frame, phase in phases.items():
        if frame not in images:
            log.warning("%s: Info.cfg names frame %d as %s but that frame is not there", folder, frame, phase)
    cases = []
    for frame, image in sorted(images.items()):
        meta = {"patient": pid, "frame": str(frame)}
        if frame in phases:
            meta["phase"] = phases[frame]
        if info.get("Group"):
            meta["group"] = info["Group"]
        if split:
            meta["split"] = split
        cases.append(Case(f"{pid}_frame{frame:02d}", image, labels.get(frame), meta))
    return cases
