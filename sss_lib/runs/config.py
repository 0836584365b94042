"""The settings of a semi-supervised run (SSS_METHOD.md section 4), stored as JSON in the run folder.

Written once when a run starts (``<run_dir>/config.json``) and carried in every checkpoint, so a
run can always be told what it was asked to do. No torch here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any

from ..errors import InputError

CONFIG_SCHEMA = "sss.run-config/1"


@dataclasses.dataclass
class RunConfig:
    """Settings of one semi-supervised training run.

    Attributes:
        run_dir: the run folder (see :mod:`sss_lib.runs.layout`).
        total_steps: optimiser steps of the whole run.
        seed: seeds every random draw of the run.
        warmup_steps: supervised-only steps at the start (the coarse head is too weak for PCSW).
        rampup_steps: after the warm-up, lambda_u follows a sigmoid ramp over this many steps
            (:func:`sss_lib.semisup.unsupervised_weight`).
        lambda_u: the weight of the unsupervised loss once ramped up (paper: 1).
        confidence_threshold: pseudo-label pixels count when their confidence is at least this (0.95).
        ema_decay: the EMA teacher's decay.
        labeled_batch / unlabeled_batch: slices per step of each kind.
        lr / weight_decay / poly_power: AdamW learning rate and weight decay; poly decay power.
        cutmix_p: probability of CutMix for each strong view.
        dfe_width: DFE's common width (None: the widest feature scale).
        val_every / checkpoint_every: steps between validations / checkpoints.
        extra: further settings of plain JSON types (e.g. the supervised trainer's).
    """

    run_dir: str
    total_steps: int = 10000
    seed: int = 0
    warmup_steps: int = 1000
    rampup_steps: int = 2000
    lambda_u: float = 1.0
    confidence_threshold: float = 0.95
    ema_decay: float = 0.99
    labeled_batch: int = 8
    unlabeled_batch: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    poly_power: float = 0.9
    cutmix_p: float = 0.5
    dfe_width: int | None = None
    val_every: int = 500
    checkpoint_every: int = 500
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = str(self.run_dir)
        checks = [
            (self.total_steps >= 1, "total_steps must be >= 1"),
            (0 <= self.warmup_steps, "warmup_steps must be >= 0"),
            (0 <= self.rampup_steps, "rampup_steps must be >= 0"),
            (self.lambda_u >= 0, "lambda_u must be >= 0"),
            (0.0 <= self.confidence_threshold <= 1.0, "confidence_threshold must lie in [0, 1]"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must lie in [0, 1)"),
            (self.labeled_batch >= 1 and self.unlabeled_batch >= 0, "batch sizes must be >= 1 (unlabeled >= 0)"),
            (self.lr > 0 and self.weight_decay >= 0 and self.poly_power >= 0, "lr must be > 0, weight_decay "
             "and poly_power >= 0"),
            (0.0 <= self.cutmix_p <= 1.0, "cutmix_p must lie in [0, 1]"),
            (self.dfe_width is None or self.dfe_width >= 1, "dfe_width must be >= 1 or null"),
            (self.val_every >= 1 and self.checkpoint_every >= 1, "val_every and checkpoint_every must be >= 1"),
        ]
        for ok, problem in checks:
            if not ok:
                raise InputError(None, f"run configuration: {problem}", "Fix the value and start the run again.")
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InputError(None, f"run configuration: extra settings are not plain JSON ({exc})",
                             "Pass str, numbers, bools, lists and dicts only.") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, with a ``schema`` key."""
        return {"schema": CONFIG_SCHEMA, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | os.PathLike[str] | None = None) -> "RunConfig":
        """Build from :meth:`to_dict`'s form.

        Raises:
            InputError: a newer schema, unknown keys (a typo must not be silently ignored), or bad values.
        """
        body = dict(data)
        schema = body.pop("schema", CONFIG_SCHEMA)
        if schema != CONFIG_SCHEMA:
            raise InputError(source, f"run configuration has schema {schema!r}, this version reads "
                             f"{CONFIG_SCHEMA!r}", "Use the SSS version that wrote the run.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(body) - names)
        if unknown:
            raise InputError(source, f"run configuration has unknown settings {unknown}",
                             f"Remove them or move them into 'extra'. Known settings: {sorted(names)}.")
        hints = typing.get_type_hints(cls)
        for key, value in body.items():
            body[key] = _coerce(key, value, hints[key], source)
        return cls(**body)

    @classmethod
    def from_json(cls, text: str, source: str | os.PathLike[str] | None = None) -> "RunConfig":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(source, f"run configuration is not valid JSON ({exc})",
                             "Fix the file or delete it to start a fresh run.") from exc
        if not isinstance(data, dict):
            raise InputError(source, "run configuration must be a JSON object", "Fix the file.")
        return cls.from_dict(data, source)

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the JSON (default: ``<run_dir>/config.json``) atomically; returns the path."""
        target = Path(path) if path is not None else Path(self.run_dir) / "config.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_text(self.to_json() + "\n", encoding="utf-8")
        os.replace(tmp, target)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RunConfig":
        """Read a config file, or ``<folder>/config.json`` when given a run folder."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise InputError(p, "no run configuration there", "Point at a run folder made by a training run.")
        return cls.from_json(p.read_text(encoding="utf-8"), p)


def _coerce(key: str, value: Any, hint: Any, source: str | os.PathLike[str] | None) -> Any:
    """Check a JSON value against the field's type (ints may stand for floats, as JSON writes 1.0 as 1)."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        base = typing.get_origin(t) or t
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, dict, list, bool) and isinstance(value, base):
            return value
    raise InputError(source, f"run configuration: {key} = {value!r} is not a {hint}", "Fix the value.")


_UnionType = type(int | None)
