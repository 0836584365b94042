"""The task-model file: what SSSTrain produces and SSSSegment loads (SSS_METHOD.md sections 4-5).

A task model is everything a SAM-2 backbone needs to segment a task on its own: the trained
components (coarse head, prompt encoder, mask decoder, optionally DFE and the last blocks of the
image encoder), the class table, the intensity preprocessing, PCSW's settings (:class:`sss_lib.pcsw.PcswConfig`) and physical ranges,
and a record of how it was trained and validated. The backbone's own weights are *not* inside;
the file names them by registry name and SHA-256, and loading refuses a different backbone.

File format (one file, suffix :data:`SUFFIX`): a zip archive, stored (not compressed), holding

* ``sss_task_model.json`` (first member): ``format``, ``format_version``, every metadata field,
  a ``tensors`` index (component -> state-dict key -> ``{"file", "dtype", "shape"}``) and
  ``payload_sha256``;
* ``tensors/<component>/<n>.npy``: one array per state-dict entry (numpy ``.npy``, read with
  ``allow_pickle=False``: the file can carry no code).

``payload_sha256`` is the SHA-256 of the canonical manifest JSON without that field, followed by
every tensor's component, key, dtype, shape and bytes in sorted order; a file that does not match
it is damaged. The format needs neither torch nor sam2 to read, so the Slicer module can show a
model's classes without them; weights come back as numpy arrays (:func:`component_tensors` makes
torch tensors). bfloat16 tensors are stored as float32 (numpy has no bfloat16).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import types
import typing
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

import numpy as np

from .errors import WeightsError
from .pcsw.config import PcswConfig
from .preprocess import Preprocessing

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT_NAME = "sss-task-model"
FORMAT_VERSION = 2
#: Files without tuned image-encoder blocks are still written as version 1, so older SSS reads them;
#: a model with them (:class:`EncoderTuning`) is version 2, which an older SSS refuses instead of
#: running the frozen encoder with a decoder trained on tuned features.
PLAIN_FORMAT_VERSION = 1
SUFFIX = ".ssstask"
MANIFEST = "sss_task_model.json"

#: Components a task model may carry; the first three are required.
COMPONENTS = ("coarse_head", "prompt_encoder", "mask_decoder", "dfe", "image_encoder")
REQUIRED_COMPONENTS = ("coarse_head", "prompt_encoder", "mask_decoder")
#: Stand-in hash of untrained test backbones (see :class:`sss_lib.backbones.base.Backbone`).
RANDOM_INIT = "random-init"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_AXES = ("auto", "i", "j", "k")


class TaskModelError(WeightsError):
    """A task-model file is unusable; the message names the file, the problem and what to do."""

    def __init__(self, path: object, problem: str, fix: str = "") -> None:
        self.path = str(path) if path is not None else ""
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}." + (f" {fix}" if fix else ""))


# ------------------------------------------------------------------------------------------------
# What a task model holds
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TaskClass:
    """One output class: label value (>= 1) in the label map, display name, RGB colour 0-255."""

    label: int
    name: str
    color: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class BackboneRef:
    """The backbone the task model was trained on: registry name and SHA-256 of its weights file."""

    name: str
    weights_sha256: str


@dataclasses.dataclass(frozen=True)
class TaskPreprocessing:
    """How a volume becomes network input (SSS_METHOD.md section 1).

    Attributes:
        modality: "CT" (window), "MR"/"other" (percentiles) or "auto".
        window: ``(low, high)`` HU for CT.
        percentiles: ``(low, high)`` for MR/other.
        slice_axis: "auto" (the axis of largest spacing) or the index axis "i", "j" or "k".
        image_size: side of the square network input in pixels.
    """

    modality: Literal["auto", "CT", "MR", "other"] = "auto"
    window: tuple[float, float] = (-1000.0, 1000.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    slice_axis: str = "auto"
    image_size: int = 1024

    def to_preprocessing(self) -> Preprocessing:
        return Preprocessing(self.modality, self.window, self.percentiles)


@dataclasses.dataclass(frozen=True)
class TrainingInfo:
    """How the model was made. ``date`` is ISO 8601 UTC; ``data`` names the dataset."""

    date: str
    data: str
    n_labeled: int
    n_unlabeled: int
    iterations: int
    seed: int
    sss_version: str
    notes: str = ""

    @classmethod
    def now(cls, data: str, *, n_labeled: int, n_unlabeled: int, iterations: int, seed: int,
            notes: str = "") -> "TrainingInfo":
        """Filled in with the current UTC time and this SSS's version."""
        from . import __version__

        date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        return cls(date, data, n_labeled, n_unlabeled, iterations, seed, __version__, notes)


@dataclasses.dataclass(frozen=True)
class ValidationMetrics:
    """Per-class metrics on the held-out labeled cases (label -> value; distances in mm).

    ``dice`` is the Auto-segment pipeline's with every class from the decoder; ``coarse_dice`` the
    coarse head's own argmax on the same cases (what :attr:`TaskModel.coarse_classes` was chosen
    from; empty in files written before it was measured).
    """

    n_cases: int
    dice: dict[int, float]
    hd95_mm: dict[int, float] = dataclasses.field(default_factory=dict)
    asd_mm: dict[int, float] = dataclasses.field(default_factory=dict)
    coarse_dice: dict[int, float] = dataclasses.field(default_factory=dict)

    @property
    def mean_dice(self) -> float:
        return float(np.mean(list(self.dice.values()))) if self.dice else float("nan")


@dataclasses.dataclass(frozen=True)
class EncoderTuning:
    """The image encoder's last blocks, trained with the task (component ``image_encoder``).

    Attributes:
        blocks: how many of the encoder's last transformer blocks were trained (LiteMedSAM: TinyViT
            blocks; SAM-2: Hiera blocks); the component holds their state dict, keys relative to
            the tuned tail (:mod:`sss_lib.trainer.encoder_tuning`).
        lora_rank: 0: the blocks' own weights trained; > 0: low-rank adapters of this rank on
            every linear layer of the blocks (the blocks' weights stay the backbone's).
        lora_alpha: the adapters' scale is ``lora_alpha / lora_rank``.
    """

    blocks: int
    lora_rank: int = 0
    lora_alpha: float = 0.0


# Weights: component -> state-dict key -> array.
Weights = dict[str, dict[str, np.ndarray]]


@dataclasses.dataclass
class TaskModel:
    """Everything in a task-model file.

    Attributes:
        backbone: the backbone it was trained on.
        classes: the output classes, in label order.
        preprocessing: intensity and slicing settings.
        pcsw: prompt-generator settings.
        volume_ranges_mm3: class label -> ``(min, max)`` physical volume in mm^3 seen in the labeled
            cases (PCSW's physical constraint; a class without a range gets no volume check).
        training: how it was trained.
        validation: metrics of the kept checkpoint, or None.
        weights: component name (see :data:`COMPONENTS`) -> state dict of numpy arrays (torch
            tensors are accepted on save and stored as arrays).
        nesting: **(ours)** ``{outer: (inner, ...)}``, the classes that enclose others in the
            labeled cases (the myocardium's ring around the LV cavity), measured by
            :func:`sss_lib.rings.measure_nesting`; Auto-segment uses it to restore rings that boxes
            fill. Files written before it existed load with ``{}`` (no rule).
        encoder_tuning: how the ``image_encoder`` component was trained (None: no such component;
            the backbone's image encoder runs as shipped).
        coarse_classes: **(ours)** the classes Auto-segment takes from the coarse head instead of
            the prompted decoder, chosen on the validation cases (:mod:`sss_lib.class_source`;
            the evidence is :attr:`ValidationMetrics.coarse_dice`). Files written before it
            existed load with ``()`` (every class from the decoder).
    """

    backbone: BackboneRef
    classes: tuple[TaskClass, ...]
    preprocessing: TaskPreprocessing
    pcsw: PcswConfig
    volume_ranges_mm3: dict[int, tuple[float, float]]
    training: TrainingInfo
    validation: ValidationMetrics | None
    weights: Weights
    nesting: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    encoder_tuning: EncoderTuning | None = None
    coarse_classes: tuple[int, ...] = ()

    @property
    def class_names(self) -> dict[int, str]:
        return {c.label: c.name for c in self.classes}

    @property
    def colors(self) -> dict[int, tuple[int, int, int]]:
        return {c.label: c.color for c in self.classes}

    @property
    def labels(self) -> list[int]:
        return [c.label for c in self.classes]

    def describe(self) -> str:
        """One line for logs, the CLI and the Slicer module."""
        classes = ", ".join(f"{c.label} {c.name}" for c in self.classes)
        dice = f", validation Dice {self.validation.mean_dice:.3f}" if self.validation else ""
        return (f"task model on {self.backbone.name} ({classes}); trained {self.training.date} on "
                f"{self.training.data}, {self.training.iterations} iterations{dice}")

    def validate(self, source: object = "") -> None:
        """Check the class table, the PCSW ranges, the backbone reference and the weights.

        Raises:
            TaskModelError: the first inconsistency found, naming ``source``.
        """
        _check_classes(self.classes, source)
        _check_settings(self, source)
        _check_weights(self.weights, source)
        _check_encoder_tuning(self, source)


# ------------------------------------------------------------------------------------------------
# Save and load
# ------------------------------------------------------------------------------------------------
def save_task_model(model: TaskModel, path: str | Path) -> Path:
    """Write ``model`` to ``path`` atomically (a temporary file in the same folder, then a rename).

    Raises:
        TaskModelError: the model is inconsistent (see :meth:`TaskModel.validate`); nothing is written.
    """
    path = Path(path)
    arrays = {comp: {key: _as_array(value, f"{comp}.{key}") for key, value in sd.items()}
              for comp, sd in model.weights.items()}
    checked = dataclasses.replace(model, weights=arrays)
    checked.validate(path)
    version = FORMAT_VERSION if checked.encoder_tuning is not None else PLAIN_FORMAT_VERSION
    manifest = {"format": FORMAT_NAME, "format_version": version, **_metadata_to_json(checked)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        _write_archive(manifest, arrays, Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("saved task model %s (%s)", path, checked.describe())
    return path


def load_task_model(path: str | Path, *, expected_backbone_sha256: str | None = None) -> TaskModel:
    """Read and check a task-model file.

    Args:
        path: the file.
        expected_backbone_sha256: the SHA-256 of the backbone weights that will run the model
            (:attr:`Backbone.weights_sha256`); None skips the check.

    Raises:
        TaskModelError: not a task model; damaged or truncated; written by a newer SSS; fields
            missing or of the wrong type; inconsistent class table or settings; required weights
            missing; trained on another backbone than ``expected_backbone_sha256``.
    """
    path = Path(path)
    manifest, arrays = _read_archive(path)
    model = _metadata_from_json(manifest, arrays, path)
    model.validate(path)
    if expected_backbone_sha256 is not None and expected_backbone_sha256 != model.backbone.weights_sha256:
        raise TaskModelError(
            path,
            f"was trained on backbone {model.backbone.name} with weights sha256 "
            f"{model.backbone.weights_sha256[:16]}..., but the loaded backbone's weights have sha256 "
            f"{expected_backbone_sha256[:16]}...",
            f"Load the {model.backbone.name} checkpoint it was trained on, or retrain the task model on this backbone.",
        )
    return model


def component_tensors(model: TaskModel, component: str, device: str = "cpu") -> dict[str, "torch.Tensor"]:
    """The state dict of ``component`` as torch tensors, for ``module.load_state_dict`` (which
    checks the keys strictly).

    Raises:
        KeyError: the model has no weights for ``component``.
    """
    import torch

    if component not in model.weights:
        raise KeyError(f"task model has no {component!r} weights (it has: {', '.join(sorted(model.weights))})")
    return {k: torch.from_numpy(np.array(v, copy=True)).to(device) for k, v in model.weights[component].items()}


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------
def _check_classes(classes: tuple[TaskClass, ...], source: object) -> None:
    fix = "Fix the class table: labels 1, 2, ... each used once, each with a name and an RGB colour."
    if not classes:
        raise TaskModelError(source, "class table is empty", fix)
    seen: dict[int, str] = {}
    for c in classes:
        if not isinstance(c.label, int) or isinstance(c.label, bool) or c.label < 1 or c.label > 65535:
            what = "label 0 is background and cannot be a class" if c.label == 0 else f"label {c.label!r} is not in 1..65535"
            raise TaskModelError(source, f"class table: {what} (class {c.name!r})", fix)
        if c.label in seen:
            raise TaskModelError(source, f"class table: label {c.label} is used twice ({seen[c.label]!r} and {c.name!r})", fix)
        if not isinstance(c.name, str) or not c.name.strip():
            raise TaskModelError(source, f"class table: class {c.label} has no name", fix)
        if (c.color is None or len(c.color) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c.color)):
            raise TaskModelError(source, f"class table: class {c.label} ({c.name}) has no valid colour "
                                 f"(got {c.color!r}; need three integers 0-255)", fix)
        seen[c.label] = c.name


def _check_settings(model: TaskModel, source: object) -> None:
    sha = model.backbone.weights_sha256
    if not model.backbone.name or not (sha == RANDOM_INIT or _SHA256.fullmatch(sha)):
        raise TaskModelError(source, f"backbone reference is incomplete (name {model.backbone.name!r}, "
                             f"sha256 {sha!r}; need a name and 64 lowercase hex digits)")
    prep = model.preprocessing
    if prep.modality not in ("auto", "CT", "MR", "other"):
        raise TaskModelError(source, f"preprocessing.modality must be auto, CT, MR or other, got {prep.modality!r}")
    if prep.slice_axis not in _AXES:
        raise TaskModelError(source, f"preprocessing.slice_axis must be one of {', '.join(_AXES)}, got {prep.slice_axis!r}")
    if not prep.window[0] < prep.window[1] or not 0 <= prep.percentiles[0] < prep.percentiles[1] <= 100:
        raise TaskModelError(source, f"preprocessing window {prep.window} or percentiles {prep.percentiles} are "
                             "not increasing ranges")
    if prep.image_size < 16:
        raise TaskModelError(source, f"preprocessing.image_size {prep.image_size} is too small")
    labels = {c.label for c in model.classes}
    for label, (lo, hi) in model.volume_ranges_mm3.items():
        if label not in labels:
            raise TaskModelError(source, f"PCSW has a volume range for label {label}, which is not in the class table")
        if not (0 <= lo <= hi and math.isfinite(hi)):
            raise TaskModelError(source, f"PCSW volume range of class {label} is not 0 <= min <= max: ({lo}, {hi})")
    for outer, inners in model.nesting.items():
        if outer not in labels or not set(inners) <= labels or outer in inners:
            raise TaskModelError(source, f"nesting {outer} -> {list(inners)} names a class that is not in the class "
                                 "table, or a class inside itself", "Re-export the task model from SSSTrain.")
    if not set(model.coarse_classes) <= labels:
        raise TaskModelError(source, f"coarse_classes {list(model.coarse_classes)} names a class that is not in the "
                             "class table", "Re-export the task model from SSSTrain.")
    try:
        dataclasses.replace(model.pcsw)  # re-runs PcswConfig's own range checks
    except ValueError as err:
        raise TaskModelError(source, f"PCSW settings are out of range: {err}") from None


def _check_weights(weights: Mapping[str, Mapping[str, np.ndarray]], source: object) -> None:
    unknown = sorted(set(weights) - set(COMPONENTS))
    if unknown:
        raise TaskModelError(source, f"holds weights for unknown component(s) {', '.join(unknown)} "
                             f"(known: {', '.join(COMPONENTS)})", "Use a newer SSS, or re-export the model.")
    missing = [c for c in REQUIRED_COMPONENTS if not weights.get(c)]
    if missing:
        raise TaskModelError(source, f"lacks trained weights for {', '.join(missing)}",
                             "A task model needs coarse_head, prompt_encoder and mask_decoder; re-export it from SSSTrain.")
    for comp, sd in weights.items():
        for key, arr in sd.items():
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise TaskModelError(source, f"weight {comp}.{key} holds NaN or infinite values",
                                     "Training diverged; use an earlier checkpoint.")


def _check_encoder_tuning(model: TaskModel, source: object) -> None:
    tuning, has_weights = model.encoder_tuning, bool(model.weights.get("image_encoder"))
    if tuning is None and has_weights:
        raise TaskModelError(source, "holds image_encoder weights but does not say which blocks they are",
                             "Re-export the task model from SSSTrain.")
    if tuning is None:
        return
    if not has_weights:
        raise TaskModelError(source, f"says {tuning.blocks} image-encoder block(s) were trained but holds no "
                             "image_encoder weights", "Re-export the task model from SSSTrain.")
    if tuning.blocks < 1 or tuning.lora_rank < 0 or (tuning.lora_rank > 0 and not tuning.lora_alpha > 0):
        raise TaskModelError(source, f"encoder tuning settings are out of range ({tuning})",
                             "Re-export the task model from SSSTrain.")


def _as_array(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; numpy cannot hold bfloat16
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        value = t.numpy()
    arr = np.asarray(value)
    if arr.dtype.hasobject or arr.dtype.kind not in "biuf":
        raise TaskModelError(None, f"weight {name} has dtype {arr.dtype}; only numbers can be stored")
    return arr


# ------------------------------------------------------------------------------------------------
# Metadata <-> JSON (typed, through the dataclasses' annotations)
# ------------------------------------------------------------------------------------------------
_META_FIELDS = ("backbone", "classes", "preprocessing", "pcsw", "volume_ranges_mm3", "training", "validation",
                "nesting", "encoder_tuning", "coarse_classes")
#: Fields added after format version 1 was first written: a factory of what their absence means.
_OPTIONAL_FIELDS: dict[str, Any] = {"nesting": dict, "encoder_tuning": lambda: None, "coarse_classes": tuple}


def _metadata_to_json(model: TaskModel) -> dict[str, Any]:
    return {name: _to_json(getattr(model, name)) for name in _META_FIELDS}


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def _metadata_from_json(manifest: dict[str, Any], arrays: Weights, path: Path) -> TaskModel:
    missing: list[str] = []
    problems: list[str] = []
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(TaskModel)
    for name in _META_FIELDS:
        if name == "classes":
            values[name] = _classes_from_json(manifest.get(name), path, missing)
            continue
        if name in _OPTIONAL_FIELDS and name not in manifest:
            values[name] = _OPTIONAL_FIELDS[name]()
            continue
        values[name] = _from_json(manifest.get(name, _MISSING), hints[name], name, missing, problems)
    if missing:
        raise TaskModelError(path, f"lacks the field(s) {', '.join(missing)}",
                             "The file is incomplete; re-export it from SSSTrain.")
    if problems:
        raise TaskModelError(path, f"has invalid field(s): {'; '.join(problems)}",
                             "The file was not written by SSS; re-export it from SSSTrain.")
    return TaskModel(weights=arrays, **values)


_MISSING = object()


def _classes_from_json(raw: Any, path: Path, missing: list[str]) -> tuple[TaskClass, ...]:
    if raw is None:
        missing.append("classes")
        return ()
    if not isinstance(raw, list):
        raise TaskModelError(path, "class table must be a list of {label, name, color}")
    out = []
    for n, entry in enumerate(raw):
        if not isinstance(entry, dict) or "label" not in entry:
            raise TaskModelError(path, f"class table entry {n} has no label", "Re-export the model.")
        label, name = entry["label"], entry.get("name", "")
        color = entry.get("color")
        if not isinstance(color, list):
            raise TaskModelError(path, f"class table: class {label} ({name}) has no colour",
                                 "Every class needs an RGB colour; re-export the model.")
        out.append(TaskClass(label, name, tuple(color)))  # type: ignore[arg-type]
    return tuple(out)


def _from_json(value: Any, hint: Any, where: str, missing: list[str], problems: list[str]) -> Any:
    """Convert parsed JSON ``value`` to type ``hint``, recording missing fields and type errors."""
    if value is _MISSING:
        missing.append(where)
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _from_json(value, hint, where, missing, problems)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            problems.append(f"{where} must be an object")
            return None
        sub_hints = typing.get_type_hints(hint)
        kwargs = {}
        for f in dataclasses.fields(hint):
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if f.name not in value and has_default:
                continue
            kwargs[f.name] = _from_json(value.get(f.name, _MISSING), sub_hints[f.name], f"{where}.{f.name}",
                                        missing, problems)
        if missing or problems:
            return None
        try:
            return hint(**kwargs)
        except (TypeError, ValueError) as err:  # the dataclass's own checks (e.g. PcswConfig)
            problems.append(f"{where}: {err}")
            return None
    if origin is Literal:
        if value not in args:
            problems.append(f"{where} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where} must be an object")
            return {}
        try:
            return {int(k): _from_json(v, args[1], f"{where}[{k}]", missing, problems) for k, v in value.items()}
        except ValueError:
            problems.append(f"{where} keys must be class labels")
            return {}
    if origin is tuple:
        if not isinstance(value, list) or (args[-1] is not Ellipsis and len(value) != len(args)):
            problems.append(f"{where} must be a list of {len(args)}")
            return ()
        item_hints = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        return tuple(_from_json(v, h, f"{where}[{n}]", missing, problems) for n, (v, h) in enumerate(zip(value, item_hints)))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where} must be a number, got {value!r}")
            return 0.0
        return float(value)
    if hint in (int, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            problems.append(f"{where} must be {hint.__name__}, got {value!r}")
        return value
    raise AssertionError(f"unhandled field type {hint!r} at {where}")


# ------------------------------------------------------------------------------------------------
# The archive
# ------------------------------------------------------------------------------------------------
def _payload_sha256(manifest: Mapping[str, Any], arrays: Mapping[str, Mapping[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    body = {k: v for k, v in manifest.items() if k != "payload_sha256"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for comp in sorted(arrays):
        for key in sorted(arrays[comp]):
            arr = _c_order(arrays[comp][key])
            h.update(f"\0{comp}\0{key}\0{arr.dtype.str}\0{arr.shape}\0".encode())
            h.update(arr.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _c_order(arr: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray would turn a 0-d array (a scalar parameter) into shape (1,).
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _write_archive(manifest: dict[str, Any], arrays: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> None:
    """Write ``manifest`` (completed with the tensor index and the payload hash) and ``arrays``."""
    index: dict[str, dict[str, dict[str, Any]]] = {}
    members: list[tuple[str, np.ndarray]] = []
    for comp in sorted(arrays):
        index[comp] = {}
        for n, key in enumerate(sorted(arrays[comp])):
            arr = _c_order(arrays[comp][key])
            member = f"tensors/{comp}/{n}.npy"
            index[comp][key] = {"file": member, "dtype": arr.dtype.str, "shape": list(arr.shape)}
            members.append((member, arr))
    full = {**manifest, "tensors": index}
    full["payload_sha256"] = _payload_sha256(full, arrays)
    with open(path, "wb") as raw:
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(MANIFEST, json.dumps(full, indent=1, sort_keys=True))
            for member, arr in members:
                with zf.open(member, "w", force_zip64=arr.nbytes > 2**30) as f:
                    np.lib.format.write_array(f, arr, allow_pickle=False)
        raw.flush()
        os.fsync(raw.fileno())


def _read_archive(path: Path) -> tuple[dict[str, Any], Weights]:
    fix_damaged = "The file is damaged or incomplete; copy it again or re-export it from SSSTrain."
    if not path.is_file():
        raise TaskModelError(path, "task model not found" if not path.exists() else "is not a file", "Check the path.")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(b"PK"):
        hint = " (it looks like a pickled PyTorch checkpoint)" if head[:1] == b"\x80" else ""
        raise TaskModelError(path, f"is not an SSS task model file{hint}",
                             f"Task models are {SUFFIX} files made by SSSTrain; backbone checkpoints load as weights.")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if MANIFEST not in names:
                torch_ckpt = any(n.endswith("/data.pkl") for n in names)
                what = "a PyTorch checkpoint" if torch_ckpt else f"a zip archive without {MANIFEST}"
                raise TaskModelError(path, f"is {what}, not an SSS task model",
                                     f"Task models are {SUFFIX} files made by SSSTrain; backbone checkpoints load as weights.")
            try:
                manifest = json.loads(zf.read(MANIFEST))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise TaskModelError(path, f"has a damaged {MANIFEST}", fix_damaged) from None
            _check_header(manifest, path)
            arrays = _read_tensors(zf, manifest, names, path)
    except zipfile.BadZipFile as err:
        # zipfile says "File is not a zip file" when the directory at the end is cut off.
        detail = "its end is missing" if "not a zip file" in str(err) else str(err)
        raise TaskModelError(path, f"is damaged or truncated ({detail})", fix_damaged) from None
    except (EOFError, OSError, ValueError) as err:
        raise TaskModelError(path, f"is damaged or truncated ({err})", fix_damaged) from None
    if manifest.get("payload_sha256") != _payload_sha256(manifest, arrays):
        raise TaskModelError(path, "is damaged: its contents do not match the SHA-256 it was saved with", fix_damaged)
    return manifest, arrays


def _check_header(manifest: Any, path: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise TaskModelError(path, f"is not an SSS task model (its {MANIFEST} has format "
                             f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TaskModelError(path, f"has an invalid format_version {version!r}", "Re-export it from SSSTrain.")
    if version > FORMAT_VERSION:
        raise TaskModelError(path, f"was written by a newer SSS (task model format {version}; this SSS reads "
                             f"format {FORMAT_VERSION} and older)", "Update SSS to load it.")
    if not isinstance(manifest.get("tensors"), dict) or not isinstance(manifest.get("payload_sha256"), str):
        raise TaskModelError(path, "lacks the field(s) tensors or payload_sha256",
                             "The file is incomplete; re-export it from SSSTrain.")


def _read_tensors(zf: zipfile.ZipFile, manifest: dict[str, Any], names: set[str], path: Path) -> Weights:
    arrays: Weights = {}
    for comp, entries in manifest["tensors"].items():
        if not isinstance(entries, dict):
            raise TaskModelError(path, f"tensor index of {comp} is damaged")
        arrays[comp] = {}
        for key, entry in entries.items():
            member = entry.get("file") if isinstance(entry, dict) else None
            if member not in names:
                raise TaskModelError(path, f"is damaged: weight {comp}.{key} is missing from the archive",
                                     "Copy the file again or re-export it from SSSTrain.")
            with zf.open(member) as f:
                arr = np.lib.format.read_array(f, allow_pickle=False)  # type: ignore[arg-type]
            if arr.dtype.str != entry.get("dtype") or list(arr.shape) != entry.get("shape"):
                raise TaskModelError(path, f"is damaged: weight {comp}.{key} is {arr.dtype.str} {list(arr.shape)}, "
                                     f"its index says {entry.get('dtype')} {entry.get('shape')}")
            arrays[comp][key] = arr
    return arrays
