"""nnU-Net v2 raw dataset folders.

Layout (https://github.com/MIC-DKFZ/nnUNet, documentation/dataset_format.md)::

    DatasetXXX_Name/
        dataset.json      channel_names, labels (name -> value, "background": 0), numTraining, file_ending
        imagesTr/CASE_0000.nii.gz   (one file per channel: _0000, _0001, ...)
        labelsTr/CASE.nii.gz
        imagesTs/CASE_0000.nii.gz   (optional; read as unlabeled cases)

``dataset.json`` may instead list the files under ``"dataset"``
(``{"CASE": {"images": [...], "label": "..."}}``, paths relative to the folder). SSS segments one
channel; a multi-channel dataset needs the channel chosen.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import InputError
from .base import Case, CaseList

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("channel_names", "labels", "numTraining", "file_ending")
_MR_HINTS = ("MR", "T1", "T2", "FLAIR", "CINE", "DWI", "ADC", "PD", "SSFP")


def is_nnunet(root: Path) -> bool:
    """True when ``root`` holds a ``dataset.json``."""
    return (root / "dataset.json").is_file()


def read_nnunet(root: Path, *, channel: int | str | None = None, include_unlabeled: bool = True) -> CaseList:
    """Read an nnU-Net v2 raw dataset folder.

    Args:
        root: the folder holding ``dataset.json``.
        channel: the channel to use, by index (0, 1, ...) or by its name in ``channel_names``;
            required when the dataset has more than one channel.
        include_unlabeled: also return ``imagesTs`` cases (with ``label_path`` None).

    Raises:
        InputError: missing or malformed ``dataset.json`` fields, region-based labels, several
            channels and none chosen, a training image without its label (or the reverse), no cases.
    """
    meta = _load_json(root / "dataset.json")
    index, channel_name = _pick_channel(root / "dataset.json", meta["channel_names"], channel)
    class_names, ignore = _labels(root / "dataset.json", meta["labels"])
    ending = meta["file_ending"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise InputError(root / "dataset.json", f"file_ending must be a suffix such as \".nii.gz\", got {ending!r}")

    if "dataset" in meta:
        cases = _listed_cases(root, meta["dataset"], index)
    else:
        cases = _training_cases(root, ending, index)
        if include_unlabeled:
            cases += _unlabeled_cases(root / "imagesTs", ending, index)

    n_train = sum(c.labeled for c in cases)
    if isinstance(meta["numTraining"], int) and meta["numTraining"] != n_train:
        log.warning("%s: numTraining is %d but %d labeled training cases were found; using the files",
                    root / "dataset.json", meta["numTraining"], n_train)
    upper = channel_name.upper()
    modality = "CT" if upper == "CT" else "MR" if any(h in upper for h in _MR_HINTS) else "auto"
    return CaseList(root, "nnunet", cases, class_names, ignore_label=ignore, modality=modality)


def _load_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(path, f"is not valid JSON (line {err.lineno}: {err.msg})", "Fix or re-create dataset.json.") from None
    except OSError as err:
        raise InputError(path, f"cannot be read ({err.strerror or err})") from None
    if not isinstance(meta, dict):
        raise InputError(path, "must hold a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in meta]
    if missing:
        if "modality" in meta and "training" in meta:
            raise InputError(path, "is an nnU-Net v1 / Medical Segmentation Decathlon dataset.json",
                             "Convert it with nnUNetv2_convert_MSD_dataset (or nnUNetv2_convert_old_nnUNet_dataset).")
        raise InputError(path, f"lacks the field(s) {', '.join(missing)}",
                         "An nnU-Net v2 dataset.json needs channel_names, labels, numTraining and file_ending.")
    return meta


def _pick_channel(path: Path, channel_names: object, channel: int | str | None) -> tuple[int, str]:
    if not isinstance(channel_names, dict) or not channel_names:
        raise InputError(path, "channel_names must be a non-empty object such as {\"0\": \"CT\"}")
    try:
        channels = {int(k): str(v) for k, v in channel_names.items()}
    except ValueError:
        raise InputError(path, f"channel_names keys must be channel numbers, got {list(channel_names)}") from None
    listing = ", ".join(f"{k}: {v}" for k, v in sorted(channels.items()))
    if channel is None:
        if len(channels) > 1:
            raise InputError(path, f"has {len(channels)} channels ({listing}); SSS segments one channel",
                             "Choose one by index or name (channel=... in Python, --channel on the command line).")
        return next(iter(channels.items()))
    if isinstance(channel, int) and channel in channels:
        return channel, channels[channel]
    for k, v in channels.items():
        if str(channel) in (v, str(k)):
            return k, v
    raise InputError(path, f"has no channel {channel!r} (channels: {listing})", "Pick one of the listed channels.")


def _labels(path: Path, labels: object) -> tuple[dict[int, str], int | None]:
    if not isinstance(labels, dict) or not labels:
        raise InputError(path, "labels must be a non-empty object such as {\"background\": 0, \"tumour\": 1}")
    names: dict[int, str] = {}
    ignore: int | None = None
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise InputError(path, f"uses region-based labels ({name!r}: {value})",
                             "SSS needs one label value per class; list each class with its own value.")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InputError(path, f"label {name!r} must be a non-negative integer, got {value!r}")
        if name == "ignore":
            ignore = value
            continue
        if value == 0:
            if name != "background":
                raise InputError(path, f"label 0 must be \"background\", got {name!r}", "Start class labels at 1.")
            continue
        if value in names:
            raise InputError(path, f"label value {value} is used by both {names[value]!r} and {name!r}",
                             "Give every class its own value.")
        names[value] = str(name)
    if not names:
        raise InputError(path, "declares no class besides background", "Add the classes to labels.")
    return names, ignore


def _training_cases(root: Path, ending: str, channel: int) -> list[Case]:
    images, labels = root / "imagesTr", root / "labelsTr"
    if not images.is_dir():
        raise InputError(images, "not found (an nnU-Net dataset keeps its training images there)",
                         "Check the dataset folder.")
    tail = f"_{channel:04d}{ending}"
    cases: list[Case] = []
    for path in sorted(images.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(tail):
            continue
        case_id = path.name[: -len(tail)]
        label = labels / f"{case_id}{ending}"
        if not label.is_file():
            raise InputError(label, f"label file missing for case {case_id!r} (image {path.name})",
                             "Add the label, or move the image to imagesTs if it is unlabeled.")
        cases.append(Case(case_id, path, label, {"split": "train", "channel": str(channel)}))
    found = {c.case_id for c in cases}
    for label in sorted(labels.iterdir()) if labels.is_dir() else []:
        if label.name.endswith(ending) and not label.name.startswith("."):
            case_id = label.name[: -len(ending)]
            if case_id not in found:
                raise InputError(label, f"has no image: {images / (case_id + tail)} is missing",
                                 "Add the image or remove the stray label.")
    return cases


def _unlabeled_cases(folder: Path, ending: str, channel: int) -> list[Case]:
    tail = f"_{channel:04d}{ending}"
    if not folder.is_dir():
        return []
    return [Case(p.name[: -len(tail)], p, None, {"split": "test", "channel": str(channel)})
            for p in sorted(folder.iterdir()) if p.name.endswith(tail) and not p.name.startswith(".")]


def _listed_cases(root: Path, listing: object, channel: int) -> list[Case]:
    path = root / "dataset.json"
    if not isinstance(listing, dict):
        raise InputError(path, "\"dataset\" must map case ids to {\"images\": [...], \"label\": ...}")
    cases: list[Case] = []
    for case_id, entry in sorted(listing.items()):
        images = entry.get("images") if isinstance(entry, dict) else None
        if not isinstance(images, list) or len(images) <= channel:
            raise InputError(path, f"case {case_id!r} lists no image for channel {channel}",
                             "Each entry needs \"images\": one path per channel.")
        image = (root / images[channel]).resolve()
        if not image.is_file():
            raise InputError(image, f"image of case {case_id!r} not found", "Fix the path in dataset.json.")
        label = entry.get("label")
        label_path = (root / label).resolve() if label else None
        if label_path is not None and not label_path.is_file():
            raise InputError(label_path, f"label file missing for case {case_id!r}", "Fix the path in dataset.json.")
        cases.append(Case(str(case_id), image, label_path, {"split": "train" if label_path else "test",
                                                            "channel": str(channel)}))
    return cases
