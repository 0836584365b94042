"""Prompts: what the user (or PCSW) tells the engine about each class.

In memory, prompts are always in **stack coordinates**: a key slice index ``s`` along the prompt
set's slice axis, boxes as ``(x0, y0, x1, y1)`` (XYXY, pixel units, inclusive corners) and points as
``(x, y)`` on that slice (``x`` = column, ``y`` = row; see :class:`sss_lib.volume.SliceAxis`).

On disk (JSON) they may also be in **physical** coordinates (LPS mm): points are ``[x, y, z]`` and a
box is its two opposite corners ``[[x, y, z], [x, y, z]]``; the key slice is where they lie. Example
(voxel form)::

    {
      "format": "sss-prompts", "version": 2,
      "coordinates": "voxel", "slice_axis": "k",
      "classes": [
        {"label": 1, "name": "tumour", "color": [230, 80, 60],
         "prompts": [
           {"key_slice": 23, "box": [180, 200, 215, 236],
            "positive_points": [[197, 218]], "negative_points": [],
            "source": "user"},
           {"key_slice": 27, "kind": "absent", "source": "user"}
         ]}
      ]
    }

``source`` is the provenance: ``"auto"`` (made by PCSW) or ``"user"`` (placed or edited by a person).
A re-run never replaces a ``"user"`` prompt.

``"kind": "absent"`` is a **"not on this slice"** marker: the class is absent from that slice. It has
no box and no points; the class is empty there and propagation never crosses it (see
:mod:`sss_lib.engine`). In physical coordinates it is ``{"kind": "absent", "point": [x, y, z]}``, any
LPS point on the slice (the writer uses the slice's centre). A prompt without ``kind`` is a box/point
prompt (``"kind": "prompt"``). Version 1 files (no ``kind``) are read unchanged.

On one slice of one class, ``"user"`` prompts and markers override ``"auto"`` ones; a user prompt and
a user "absent" marker on the same slice contradict each other and are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from .errors import InputError, PromptError
from .volume import SliceAxis, Volume, axis_from_name

Source = Literal["auto", "user"]
FORMAT_NAME = "sss-prompts"
FORMAT_VERSION = 2  # 2: "kind": "absent" markers; version 1 files are still read
KIND_PROMPT = "prompt"
KIND_ABSENT = "absent"
_AXIS_NAMES = {0: "i", 1: "j", 2: "k"}


@dataclasses.dataclass
class SlicePrompt:
    """One prompt on one key slice.

    Attributes:
        key_slice: slice index along the prompt set's axis.
        box: ``(x0, y0, x1, y1)`` in pixels or None.
        positive_points / negative_points: lists of ``(x, y)`` pixels.
        source: provenance, ``"auto"`` or ``"user"``.
        confidence: PCSW's confidence (1.0 for user prompts); below 0.5 means a fallback prompt.
        absent: True for a "not on this slice" marker: the class is absent from ``key_slice``
            (no box, no points). Build one with :meth:`not_on_slice`.
    """

    key_slice: int
    box: tuple[float, float, float, float] | None = None
    positive_points: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    negative_points: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    source: Source = "user"
    confidence: float = 1.0
    absent: bool = False

    @classmethod
    def not_on_slice(cls, key_slice: int, source: Source = "user") -> "SlicePrompt":
        """A "not on this slice" marker: the class is absent from ``key_slice``."""
        return cls(key_slice=key_slice, source=source, absent=True)

    def __post_init__(self) -> None:
        self.key_slice = int(self.key_slice)
        if self.box is not None:
            x0, y0, x1, y1 = (float(v) for v in self.box)
            self.box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        self.positive_points = [(float(x), float(y)) for x, y in self.positive_points]
        self.negative_points = [(float(x), float(y)) for x, y in self.negative_points]
        if self.source not in ("auto", "user"):
            raise PromptError(f"prompt source must be 'auto' or 'user', got {self.source!r}")
        self.absent = bool(self.absent)
        if self.absent:
            if self.box is not None or self.positive_points or self.negative_points:
                raise PromptError(
                    f"the 'not on this slice' marker on slice {self.key_slice} cannot have a box or points; "
                    "make it a separate prompt"
                )
        elif self.box is None and not self.positive_points:
            raise PromptError(
                f"a prompt on slice {self.key_slice} needs a box or a positive point (or mark the slice "
                "'not on this slice')"
            )

    def check_inside(self, shape_shw: tuple[int, int, int]) -> None:
        """Raise :class:`PromptError` unless the prompt lies on the ``(S, H, W)`` stack."""
        s, h, w = shape_shw
        if not 0 <= self.key_slice < s:
            raise PromptError(f"key slice {self.key_slice} is outside the volume (0..{s - 1})")
        coords = list(self.positive_points) + list(self.negative_points)
        if self.box is not None:
            coords += [self.box[:2], self.box[2:]]
        for x, y in coords:
            if not (-0.5 <= x <= w - 0.5 and -0.5 <= y <= h - 0.5):
                raise PromptError(
                    f"point ({x:.1f}, {y:.1f}) on slice {self.key_slice} is outside the {w}x{h} slice"
                )


@dataclasses.dataclass
class ClassPrompts:
    """All prompts of one class (one SAM-2 object)."""

    label: int
    name: str
    prompts: list[SlicePrompt]
    color: tuple[int, int, int] = (255, 0, 0)

    def __post_init__(self) -> None:
        self.by_slice()  # refuse contradictions early

    def fingerprint(self) -> str:
        """A hash of everything that changes the class's segmentation (not name or colour),
        "not on this slice" markers included."""
        return prompts_fingerprint(self.label, self.prompts)

    def by_slice(self) -> dict[int, list[SlicePrompt]]:
        """Slice -> the prompts that count there, sorted by slice.

        Where a slice holds ``"user"`` prompts or markers, its ``"auto"`` ones are ignored (a user's
        edit is never overridden). A slice holds either box/point prompts or "absent" markers.

        Raises:
            PromptError: a slice with both a prompt and a "not on this slice" marker of the user.
        """
        by_slice: dict[int, list[SlicePrompt]] = {}
        for p in self.prompts:
            by_slice.setdefault(p.key_slice, []).append(p)
        out: dict[int, list[SlicePrompt]] = {}
        for s in sorted(by_slice):
            ps = by_slice[s]
            ps = [p for p in ps if p.source == "user"] or ps
            absent = [p for p in ps if p.absent]
            if absent and len(absent) < len(ps):
                raise PromptError(
                    f"class {self.name!r} has both a prompt and a 'not on this slice' marker on slice {s}; "
                    "delete one of them"
                )
            out[s] = ps
        return out

    def key_slices(self) -> dict[int, list[SlicePrompt]]:
        """Slice -> its box/point prompts (see :meth:`by_slice`), sorted by slice."""
        return {s: ps for s, ps in self.by_slice().items() if not ps[0].absent}

    def absent_slices(self) -> list[int]:
        """The slices marked "not on this slice" (see :meth:`by_slice`), sorted."""
        return [s for s, ps in self.by_slice().items() if ps[0].absent]


@dataclasses.dataclass
class PromptSet:
    """The prompts of every class, in stack coordinates along ``slice_axis``."""

    slice_axis: SliceAxis
    classes: list[ClassPrompts]

    def __post_init__(self) -> None:
        labels = [c.label for c in self.classes]
        if len(set(labels)) != len(labels):
            raise PromptError(f"class labels must be unique, got {labels}")
        if any(lbl <= 0 for lbl in labels):
            raise PromptError(f"class labels must be positive integers (0 is background), got {labels}")

    def by_label(self) -> dict[int, ClassPrompts]:
        return {c.label: c for c in self.classes}

    def check_inside(self, shape_shw: tuple[int, int, int]) -> None:
        for c in self.classes:
            for p in c.prompts:
                try:
                    p.check_inside(shape_shw)
                except PromptError as e:
                    raise PromptError(f"class {c.name!r}: {e}") from None

    def changed_labels(self, previous: dict[int, str]) -> list[int]:
        """Labels whose fingerprint differs from ``previous`` (label -> fingerprint)."""
        return [c.label for c in self.classes if previous.get(c.label) != c.fingerprint()]

    # -- JSON -----------------------------------------------------------------------------------
    def to_json(self, volume: Volume | None = None, coordinates: str = "voxel") -> dict[str, Any]:
        """The JSON form; ``coordinates="physical"`` needs ``volume`` for the geometry."""
        if coordinates not in ("voxel", "physical"):
            raise ValueError("coordinates must be 'voxel' or 'physical'")
        if coordinates == "physical" and volume is None:
            raise ValueError("physical coordinates need the volume's geometry")
        classes = []
        for c in self.classes:
            items = []
            for p in c.prompts:
                d = _prompt_to_json(p)
                if coordinates == "physical":
                    d = _prompt_to_physical(d, p, volume, self.slice_axis)  # type: ignore[arg-type]
                items.append(d)
            classes.append({"label": c.label, "name": c.name, "color": list(c.color), "prompts": items})
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "coordinates": coordinates,
            "slice_axis": _AXIS_NAMES[self.slice_axis.axis],
            "classes": classes,
        }

    def save(self, path: str | Path, volume: Volume | None = None, coordinates: str = "voxel") -> None:
        Path(path).write_text(json.dumps(self.to_json(volume, coordinates), indent=2))

    @classmethod
    def from_json(cls, data: dict[str, Any], volume: Volume, source: str = "") -> "PromptSet":
        """Parse the JSON form; physical prompts are converted with ``volume``'s geometry."""
        try:
            if data.get("format", FORMAT_NAME) != FORMAT_NAME:
                raise PromptError(f"not an SSS prompts file (format {data.get('format')!r})")
            if int(data.get("version", 1)) > FORMAT_VERSION:
                raise PromptError(f"prompts format version {data['version']} is newer than this SSS")
            coords = data.get("coordinates", "voxel")
            if coords not in ("voxel", "physical"):
                raise PromptError(f"'coordinates' must be 'voxel' or 'physical', got {coords!r}")
            axis = axis_from_name(data.get("slice_axis", "auto"), volume)
            classes = []
            for c in data["classes"]:
                prompts = []
                for p in c["prompts"]:
                    kind = p.get("kind", KIND_PROMPT)
                    if kind not in (KIND_PROMPT, KIND_ABSENT):
                        raise PromptError(f"prompt 'kind' must be {KIND_PROMPT!r} or {KIND_ABSENT!r}, got {kind!r}")
                    if coords == "physical":
                        p = _prompt_from_physical(p, volume, axis)
                    prompts.append(
                        SlicePrompt(
                            key_slice=int(p["key_slice"]),
                            box=tuple(p["box"]) if p.get("box") is not None else None,
                            positive_points=[tuple(q) for q in p.get("positive_points", [])],
                            negative_points=[tuple(q) for q in p.get("negative_points", [])],
                            source=p.get("source", "user"),
                            confidence=float(p.get("confidence", 1.0)),
                            absent=kind == KIND_ABSENT,
                        )
                    )
                color = tuple(int(v) for v in c.get("color", (255, 0, 0)))
                classes.append(ClassPrompts(int(c["label"]), str(c.get("name", f"class {c['label']}")), prompts, color))
            result = cls(axis, classes)
        except PromptError as e:
            raise InputError(source, f"bad prompts: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(source, f"malformed prompts JSON ({type(e).__name__}: {e})",
                             "See the example in sss_lib/prompts.py or the README.") from None
        try:
            result.check_inside(tuple(result.slice_axis.to_stack(volume.voxels).shape))
        except PromptError as e:
            raise InputError(source, str(e)) from None
        return result

    @classmethod
    def load(cls, path: str | Path, volume: Volume) -> "PromptSet":
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "prompts file not found")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(path, f"not valid JSON ({e})") from None
        return cls.from_json(data, volume, source=str(path))


def prompts_fingerprint(label: int, prompts: Sequence[SlicePrompt]) -> str:
    """A 16-hex-digit hash of ``prompts`` (any order) for ``label``: equal iff they segment alike.

    Rounded to 1/1000 px so a physical-coordinate round trip does not count as an edit.
    """
    items = sorted((_prompt_to_json(p) for p in prompts), key=lambda d: json.dumps(d, sort_keys=True))
    items.sort(key=lambda d: d["key_slice"])
    payload = json.dumps([int(label), _rounded(items)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 3) + 0.0  # + 0.0 turns -0.0 into 0.0
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


def _prompt_to_json(p: SlicePrompt) -> dict[str, Any]:
    if p.absent:
        return {"key_slice": p.key_slice, "kind": KIND_ABSENT, "source": p.source}
    return {
        "key_slice": p.key_slice,
        "box": list(p.box) if p.box is not None else None,
        "positive_points": [list(q) for q in p.positive_points],
        "negative_points": [list(q) for q in p.negative_points],
        "source": p.source,
        "confidence": p.confidence,
    }


def _stack_to_lps(volume: Volume, axis: SliceAxis, s: float, xy: Sequence[float]) -> list[float]:
    ijk = axis.stack_to_ijk(np.array([s, xy[0], xy[1]], dtype=float))
    return [float(v) for v in volume.voxel_to_physical(ijk)]


def _lps_to_stack(volume: Volume, axis: SliceAxis, lps: Sequence[float]) -> np.ndarray:
    if len(lps) != 3:
        raise PromptError(f"a physical point needs 3 coordinates (LPS mm), got {list(lps)}")
    return axis.ijk_to_stack(volume.physical_to_voxel(np.asarray(lps, dtype=float)))


def _prompt_to_physical(d: dict[str, Any], p: SlicePrompt, volume: Volume, axis: SliceAxis) -> dict[str, Any]:
    out = dict(d)
    del out["key_slice"]
    if p.absent:
        # Any point on the slice says which slice it is; the slice's centre is a natural one.
        _, h, w = axis.to_stack(volume.voxels).shape
        out["point"] = _stack_to_lps(volume, axis, p.key_slice, ((w - 1) / 2.0, (h - 1) / 2.0))
        return out
    if p.box is not None:
        out["box"] = [_stack_to_lps(volume, axis, p.key_slice, p.box[:2]),
                      _stack_to_lps(volume, axis, p.key_slice, p.box[2:])]
    out["positive_points"] = [_stack_to_lps(volume, axis, p.key_slice, q) for q in p.positive_points]
    out["negative_points"] = [_stack_to_lps(volume, axis, p.key_slice, q) for q in p.negative_points]
    return out


def _prompt_from_physical(d: dict[str, Any], volume: Volume, axis: SliceAxis) -> dict[str, Any]:
    out = dict(d)
    slices: list[float] = []

    def conv(lps: Sequence[float]) -> list[float]:
        s, x, y = _lps_to_stack(volume, axis, lps)
        slices.append(s)
        return [float(x), float(y)]

    if d.get("kind") == KIND_ABSENT:
        if d.get("point") is None:
            raise PromptError("a physical 'not on this slice' marker needs a 'point' [x, y, z] on its slice")
        conv(d["point"])
        out.pop("point")
        out["key_slice"] = int(round(slices[0]))
        return out
    if d.get("box") is not None:
        a, b = d["box"]
        out["box"] = conv(a) + conv(b)
    out["positive_points"] = [conv(q) for q in d.get("positive_points", [])]
    out["negative_points"] = [conv(q) for q in d.get("negative_points", [])]
    if not slices:
        raise PromptError("a physical prompt needs a box or points")
    key = int(round(float(np.mean(slices))))
    if max(abs(s - key) for s in slices) > 0.5 + 1e-3:
        raise PromptError(
            f"the points of one prompt lie on different slices ({min(slices):.2f} to {max(slices):.2f});"
            " a prompt must lie on one slice of the slice axis"
        )
    out["key_slice"] = key
    return out
