"""Evaluate a folder of predicted label volumes against a folder of ground-truth label volumes.

Files are paired by case name: the file name without ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.nhdr``, and for
ground truth also without a trailing ``_gt`` (the ACDC challenge's naming), so nnU-Net style folders
(``labelsTr/case.nii.gz`` vs ``predictions/case.nii.gz``) and ACDC folders both pair up. Every
class is scored per case with :func:`sss_lib.metrics.compute_metrics` (Dice, Jaccard, HD95, ASD and
ASSD; distances in mm from the ground truth's voxel spacing; empty masks get the values tabulated
in :mod:`sss_lib.metrics`).

A class that is in neither the prediction nor the ground truth of a case is *absent in both*: its
row is kept (flagged), but it is not averaged in as Dice 1; every per-class mean leaves it out and
counts it (``n_absent``), the tables say so in a note, and :meth:`EvaluationReport.mean_dice`
averages only the cases where the class was in the prediction or the truth.

Outputs written to ``out_dir``: ``metrics.csv`` (one row per case and class; NaN written as
``nan``; column ``absent_in_both``) and ``metrics.json`` (labels, per-case values with a flag
``absent``, per-class mean/std/n/n_nan/n_absent, the list of absent-in-both pairs and a
note; NaN as null).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from .errors import InputError
from .metrics import MetricAccumulator, MetricSummary, compute_metrics
from .volume import Volume
from .volume_io import read_label

log = logging.getLogger(__name__)

EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr")
REPORT_METRICS = ("dice", "jaccard", "hd95", "asd", "assd")
_TABLE = (("dice", "Dice"), ("jaccard", "Jaccard"), ("hd95", "HD95 mm"), ("asd", "ASD mm"))
MissingPolicy = Literal["error", "empty"]
Progress = Callable[[int, int, str], None]


def case_name(path: str | Path, *, ground_truth: bool = False) -> str | None:
    """The case name of a label file, or None when the file is not a volume we read."""
    name = Path(path).name
    for ext in EXTENSIONS:
        if name.lower().endswith(ext):
            stem = name[: -len(ext)]
            if ground_truth and stem.endswith("_gt"):
                stem = stem[:-3]
            return stem
    return None


def _index_folder(folder: Path, *, ground_truth: bool) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(folder, "folder not found", "Pass the folder that holds the label files.")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = case_name(path, ground_truth=ground_truth) if path.is_file() else None
        if name is None:
            continue
        if name in found:
            raise InputError(folder, f"two files hold case {name!r}: {found[name].name} and {path.name}",
                             "Keep one file per case.")
        found[name] = path
    if not found:
        raise InputError(folder, f"no label files ({', '.join(EXTENSIONS)}) found")
    return found


def _check_same_grid(pred: Volume, gt: Volume) -> None:
    problems = []
    if pred.voxels.shape != gt.voxels.shape:
        problems.append(f"size {pred.shape_ijk} vs {gt.shape_ijk} (i, j, k)")
    else:
        if not np.allclose(pred.spacing, gt.spacing, rtol=1e-4, atol=1e-5):
            problems.append(f"spacing {np.round(pred.spacing, 5).tolist()} vs {np.round(gt.spacing, 5).tolist()} mm")
        if not np.allclose(pred.origin, gt.origin, atol=1e-3):
            problems.append(f"origin {np.round(pred.origin, 3).tolist()} vs {np.round(gt.origin, 3).tolist()} mm")
        if not np.allclose(pred.direction, gt.direction, atol=1e-4):
            problems.append("direction matrices differ")
    if problems:
        raise InputError(
            pred.source,
            "prediction is not on the ground truth's voxel grid (" + "; ".join(problems) + f"; label: {gt.source})",
            "Resample the prediction onto the label's grid (nearest neighbour) before evaluating.",
        )


@dataclasses.dataclass
class EvaluationReport:
    """Per case and class metrics of a folder evaluation, with per-class summaries.

    Attributes:
        labels: class label -> name, in report order.
        accumulator: the per (case, label) values (:data:`REPORT_METRICS`).
        missing: ground-truth cases without a prediction (scored as an empty prediction).
        unmatched: prediction cases without ground truth (not scored).
        written: paths of the files written (``csv``, ``json``), empty when no ``out_dir``.
    """

    labels: dict[int, str]
    accumulator: MetricAccumulator
    missing: list[str] = dataclasses.field(default_factory=list)
    unmatched: list[str] = dataclasses.field(default_factory=list)
    written: dict[str, Path] = dataclasses.field(default_factory=dict)

    @property
    def cases(self) -> list[str]:
        return self.accumulator.cases

    def rows(self) -> list[dict[str, Any]]:
        """One dict per case and class: case, label, name and the metric values."""
        return [{**r, "name": self.labels.get(int(r["label"]), str(r["label"]))} for r in self.accumulator.rows()]

    def summary(self) -> dict[int, dict[str, MetricSummary]]:
        return self.accumulator.summary()

    def mean_dice(self) -> float:
        """Mean over classes of the per-class mean Dice (NaN when nothing was scored); cases where
        a class is absent from both prediction and truth are not in its mean."""
        means = [s["dice"].mean for s in self.summary().values() if s["dice"].n]
        return float(np.mean(means)) if means else math.nan

    def absent_in_both(self) -> list[tuple[str, int]]:
        """(case, label) pairs where the class is in neither prediction nor ground truth."""
        return self.accumulator.absent()

    def absent_note(self) -> str:
        """One sentence on the absent-in-both cases ("" when there are none)."""
        pairs = self.absent_in_both()
        if not pairs:
            return ""
        per: dict[int, int] = {}
        for _, lbl in pairs:
            per[lbl] = per.get(lbl, 0) + 1
        listing = ", ".join(f"{self.labels.get(lbl, str(lbl))} in {n} case(s)" for lbl, n in sorted(per.items()))
        return (f"absent from both prediction and ground truth: {listing}; these are reported apart and "
                "not averaged (not counted as Dice 1).")

    def to_json(self) -> dict[str, Any]:
        return {
            "labels": {str(k): v for k, v in self.labels.items()},
            "cases": [{k: _json_number(v) for k, v in r.items()} for r in self.rows()],
            "mean": {
                str(lbl): {m: {k: _json_number(v) for k, v in dataclasses.asdict(s).items()} for m, s in per.items()}
                for lbl, per in self.summary().items()
            },
            "mean_dice": _json_number(self.mean_dice()),
            "absent_in_both": [{"case": c, "label": lbl} for c, lbl in self.absent_in_both()],
            "absent_note": self.absent_note() or None,
            "missing_predictions": list(self.missing),
            "unmatched_predictions": list(self.unmatched),
        }

    def _table(self) -> tuple[list[str], list[list[str]]]:
        header = ["case", "class"] + [title for _, title in _TABLE]
        body = []
        for r in self.rows():
            case = r["case"] + (" (missing)" if r["case"] in self.missing else "")
            if r["absent"]:
                body.append([case, r["name"]] + ["absent"] * len(_TABLE))
                continue
            body.append([case, r["name"]] + [_fmt(r[m]) for m, _ in _TABLE])
        for lbl, per in self.summary().items():
            cells = []
            for m, _ in _TABLE:
                s = per[m]
                cell = f"{_fmt(s.mean)} ± {_fmt(s.std)}"
                notes = ([f"{s.n_nan} NaN"] if s.n_nan else []) + ([f"{s.n_absent} absent"] if s.n_absent else [])
                cells.append(cell + (f" ({', '.join(notes)})" if notes else ""))
            body.append(["mean", self.labels.get(lbl, str(lbl))] + cells)
        return header, body

    def to_markdown(self) -> str:
        header, body = self._table()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        note = self.absent_note()
        return "\n".join(lines) + "\n" + (f"\nNote: {note}\n" if note else "")

    def to_text(self) -> str:
        header, body = self._table()
        widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]

        def line(row: list[str]) -> str:
            return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

        rule = "-" * len(line(header))
        n_cases = len(body) - len(self.summary())
        note = self.absent_note()
        return "\n".join([line(header), rule] + [line(r) for r in body[:n_cases]] + [rule]
                         + [line(r) for r in body[n_cases:]] + ([f"note: {note}"] if note else [])) + "\n"

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``metrics.csv`` and ``metrics.json`` into ``out_dir`` (created if needed)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = out / "metrics.csv", out / "metrics.json"
        with csv_path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["case", "label", "name", *REPORT_METRICS, "missing_prediction", "absent_in_both"])
            for r in self.rows():
                writer.writerow([r["case"], r["label"], r["name"], *(repr(float(r[m])) for m in REPORT_METRICS),
                                 int(r["case"] in self.missing), int(bool(r["absent"]))])
        json_path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        self.written = {"csv": csv_path, "json": json_path}
        return self.written


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def _json_number(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    *,
    labels: dict[int, str] | None = None,
    out_dir: str | Path | None = None,
    missing: MissingPolicy = "error",
    progress: Progress | None = None,
) -> EvaluationReport:
    """Score every ground-truth case in ``gt_dir`` against its prediction in ``pred_dir``.

    Args:
        labels: class label -> name to score; None scores every nonzero label found in the ground
            truth or the predictions (named ``"label N"``).
        out_dir: where to write ``metrics.csv`` and ``metrics.json``; None writes nothing.
        missing: a ground-truth case without prediction raises :class:`InputError` (``"error"``) or
            is scored as an empty prediction and flagged in the report (``"empty"``).
        progress: called as ``progress(done, total, case)`` after each case.

    Raises:
        InputError: a folder is missing or empty, a file is unreadable, a prediction is missing
            (with ``missing="error"``), or a prediction's grid differs from its label's.
    """
    if missing not in ("error", "empty"):
        raise ValueError(f"missing must be 'error' or 'empty', got {missing!r}")
    preds = _index_folder(Path(pred_dir), ground_truth=False)
    gts = _index_folder(Path(gt_dir), ground_truth=True)
    absent = sorted(set(gts) - set(preds))
    unmatched = sorted(set(preds) - set(gts))
    if absent and missing == "error":
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        raise InputError(pred_dir, f"no prediction for {len(absent)} ground-truth case(s): {shown}",
                         "Predict every case, or pass missing='empty' to score them as empty predictions.")
    if unmatched:
        log.warning("%d prediction(s) have no ground truth and are not scored: %s", len(unmatched), unmatched)

    pairs: list[tuple[str, Volume, Volume | None]] = []
    for name in sorted(gts):
        gt = read_label(gts[name])
        pred = read_label(preds[name]) if name in preds else None
        if pred is not None:
            _check_same_grid(pred, gt)
        pairs.append((name, gt, pred))

    if labels is None:
        found: set[int] = set()
        for _, gt, pred in pairs:
            for vol in (gt, pred):
                if vol is not None:
                    found.update(int(v) for v in np.unique(vol.voxels) if v != 0)
        labels = {lbl: f"label {lbl}" for lbl in sorted(found)}
    if not labels:
        raise InputError(gt_dir, "no foreground labels to score", "Pass labels={value: name}.")

    acc = MetricAccumulator(REPORT_METRICS)
    for done, (name, gt, pred) in enumerate(pairs, start=1):
        spacing = gt.spacing[::-1]  # metrics take spacing in array ([k, j, i]) order
        for lbl in labels:
            gt_mask = gt.voxels == lbl
            pred_mask = pred.voxels == lbl if pred is not None else np.zeros_like(gt_mask)
            acc.add(name, lbl, compute_metrics(pred_mask, gt_mask, spacing),
                    absent=not (gt_mask.any() or pred_mask.any()))
        log.debug("scored case %s", name)
        if progress is not None:
            progress(done, len(pairs), name)

    report = EvaluationReport(dict(labels), acc, absent, unmatched)
    if out_dir is not None:
        report.write(out_dir)
    return report
