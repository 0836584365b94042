"""Overlap and surface-distance metrics between binary masks, and a per-case/per-class accumulator.

Definitions follow ``medpy.metric.binary`` (the package behind the SSL4MIS and UniMatch ACDC
tables, see SSS_METHOD.md section 6):

* Dice ``2|P & G| / (|P| + |G|)``; Jaccard ``|P & G| / |P | G|``.
* Surface of a mask: the mask XOR its binary erosion by the connectivity-1 structuring element
  (6-neighbourhood in 3D); voxels on the array border count as surface (the outside is background).
* Directed surface distances ``d(P -> G)``: for every surface voxel of ``P``, the Euclidean distance
  in mm to the nearest surface voxel of ``G`` (``scipy.ndimage.distance_transform_edt`` with
  ``sampling=spacing``).
* HD95: the 95th percentile of the *pooled* distances ``d(P -> G)`` and ``d(G -> P)``, which is what
  ``medpy.metric.binary.hd95`` computes (not the maximum of the two directed 95th percentiles; pass
  ``method="max_directed"`` to :func:`hd95` for that variant).
* ASD: ``mean(d(P -> G))``, exactly ``medpy.metric.binary.asd(result=P, reference=G)``; note that
  medpy's ASD is *directed*. ASSD: the mean of the pooled distances (``medpy...assd``).

Empty masks get stated values, never a division by zero or a warning:

==============  ==============  =====  =======  =====  ===========
prediction      ground truth    Dice   Jaccard  HD95   ASD / ASSD
==============  ==============  =====  =======  =====  ===========
empty           empty           1      1        0      0
empty           non-empty       0      0        NaN    NaN
non-empty       empty           0      0        NaN    NaN
==============  ==============  =====  =======  =====  ===========

A distance to nothing is undefined, so it is NaN, as in MONAI and Metrics Reloaded; the
:class:`MetricAccumulator` leaves NaN out of means and standard deviations and counts it, so a
missed structure is visible as ``n_nan`` instead of silently scoring 0 mm (SSL4MIS's
``calculate_metric_percase`` returns HD95 = 0 for an empty prediction, which flatters HD95).

A class absent from *both* masks of a case (the first row of the table) says nothing about the
segmentation: the single-case functions state Dice 1 for it, but :class:`MetricAccumulator`
records it as *absent in both*, leaves it out of every mean and standard deviation and counts it
as ``n_absent``, so a class that most cases lack cannot be lifted towards 1 by the cases where
nothing was there to find.

Shapes: masks are arrays of any dimension (3D volumes in practice, ``[k, j, i]`` for
:class:`sss_lib.volume.Volume` voxels); nonzero means foreground. ``spacing`` is the voxel size in
mm **per array axis, in the array's axis order** (for a ``[k, j, i]`` array pass
``volume.spacing[::-1]``, because ``Volume.spacing`` is in ``(i, j, k)`` order).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
from scipy import ndimage

METRIC_NAMES: tuple[str, ...] = ("dice", "jaccard", "hd95", "asd")
HD95Method = Literal["medpy", "max_directed"]


def _as_masks(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    gt = np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    return pred, gt


def _spacing(spacing: Sequence[float] | float | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    sp = np.broadcast_to(np.asarray(spacing, dtype=float), (ndim,)).copy()
    if np.any(sp <= 0) or not np.all(np.isfinite(sp)):
        raise ValueError(f"spacing must be positive and finite, got {sp.tolist()}")
    return sp


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two binary masks of the same shape (1.0 when both are empty)."""
    pred, gt = _as_masks(pred, gt)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & gt)) / total


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard index (IoU) of two binary masks of the same shape (1.0 when both are empty)."""
    pred, gt = _as_masks(pred, gt)
    union = int(np.count_nonzero(pred | gt))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred & gt)) / union


def _surface(mask: np.ndarray) -> np.ndarray:
    footprint = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=footprint, iterations=1)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: ``(d(pred -> gt), d(gt -> pred))``, 1D float arrays.

    Both masks must be non-empty (raises ValueError otherwise; the metric functions handle empty
    masks by the table in the module docstring). The work is done on the bounding box of
    ``pred | gt`` plus one voxel, which gives the same result as the full array: every surface
    voxel and its nearest partner lie inside it, and the extra voxel (or the array border, where
    the box reaches it) keeps the erosion identical.
    """
    pred, gt = _as_masks(pred, gt)
    sp = _spacing(spacing, pred.ndim)
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need two non-empty masks")
    union = pred | gt
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, union.shape[axis])))
    p_border = _surface(pred[tuple(box)])
    g_border = _surface(gt[tuple(box)])
    # The EDT measures the distance to the nearest zero, so the border we measure to is inverted.
    to_gt = ndimage.distance_transform_edt(~g_border, sampling=sp)
    to_pred = ndimage.distance_transform_edt(~p_border, sampling=sp)
    return to_gt[p_border], to_pred[g_border]


def _empty_case(pred: np.ndarray, gt: np.ndarray) -> float | None:
    """The stated distance for empty masks (0 or NaN), or None when both are non-empty."""
    has_p, has_g = bool(pred.any()), bool(gt.any())
    if has_p and has_g:
        return None
    return 0.0 if not (has_p or has_g) else math.nan


def _hd95_from(d_pg: np.ndarray, d_gp: np.ndarray, method: HD95Method) -> float:
    if method == "medpy":
        return float(np.percentile(np.concatenate([d_pg, d_gp]), 95))
    if method == "max_directed":
        return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))
    raise ValueError(f"unknown HD95 method {method!r}; use 'medpy' or 'max_directed'")


def hd95(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | float | None = None,
    method: HD95Method = "medpy",
) -> float:
    """95% Hausdorff distance in mm (medpy's pooled definition by default; see module docstring)."""
    pred, gt = _as_masks(pred, gt)
    stated = _empty_case(pred, gt)
    if stated is not None:
        return stated
    return _hd95_from(*surface_distances(pred, gt, spacing), method)


def asd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | float | None = None) -> float:
    """Average surface distance pred -> gt in mm (directed, as ``medpy.metric.binary.asd``)."""
    pred, gt = _as_masks(pred, gt)
    stated = _empty_case(pred, gt)
    if stated is not None:
        return stated
    return float(surface_distances(pred, gt, spacing)[0].mean())


def assd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | float | None = None) -> float:
    """Average symmetric surface distance in mm (mean of the pooled directed distances)."""
    pred, gt = _as_masks(pred, gt)
    stated = _empty_case(pred, gt)
    if stated is not None:
        return stated
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    return float(np.concatenate([d_pg, d_gp]).mean())


def compute_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | float | None = None,
    hd95_method: HD95Method = "medpy",
) -> dict[str, float]:
    """Dice, Jaccard, HD95, ASD and ASSD of one class in one case, sharing one distance pass.

    Returns a dict with keys ``dice, jaccard, hd95, asd, assd`` (distances in mm).
    """
    pred, gt = _as_masks(pred, gt)
    out = {"dice": dice(pred, gt), "jaccard": jaccard(pred, gt)}
    stated = _empty_case(pred, gt)
    if stated is not None:
        out.update(hd95=stated, asd=stated, assd=stated)
        return out
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    out["hd95"] = _hd95_from(d_pg, d_gp, hd95_method)
    out["asd"] = float(d_pg.mean())
    out["assd"] = float(np.concatenate([d_pg, d_gp]).mean())
    return out


@dataclasses.dataclass(frozen=True)
class MetricSummary:
    """Mean and population standard deviation (ddof=0) over the non-NaN values.

    ``n`` counts the values used, ``n_nan`` the NaN values left out, ``n_absent`` the cases left
    out because the class was absent from both prediction and ground truth; mean and std are NaN
    when ``n == 0``.
    """

    mean: float
    std: float
    n: int
    n_nan: int
    n_absent: int = 0

    @classmethod
    def of(cls, values: Iterable[float], *, n_absent: int = 0) -> "MetricSummary":
        """Summary of ``values`` (the absent-in-both cases already left out; their count is
        ``n_absent``)."""
        arr = np.asarray(list(values), dtype=float)
        ok = arr[~np.isnan(arr)]
        if ok.size == 0:
            return cls(math.nan, math.nan, 0, int(arr.size), int(n_absent))
        return cls(float(ok.mean()), float(ok.std()), int(ok.size), int(arr.size - ok.size), int(n_absent))


class MetricAccumulator:
    """Collects metric values per (case, class label) and summarises them per class.

    Example::

        acc = MetricAccumulator()
        acc.add_masks("case1", 1, pred == 1, gt == 1, spacing=vol.spacing[::-1])
        acc.summary()[1]["dice"].mean
    """

    def __init__(self, metrics: Sequence[str] = METRIC_NAMES) -> None:
        self.metrics = tuple(metrics)
        self._values: dict[tuple[str, int], dict[str, float]] = {}
        self._absent: set[tuple[str, int]] = set()

    def add(self, case: str, label: int, values: Mapping[str, float], *, absent: bool = False) -> None:
        """Record the values of one case and class; every name in ``self.metrics`` is required.

        ``absent``: the class is in neither the prediction nor the ground truth of this case; the
        values are kept in :meth:`rows` but left out of :meth:`summary` (counted as ``n_absent``).
        """
        key = (str(case), int(label))
        if key in self._values:
            raise ValueError(f"case {case!r} class {label} was already added")
        missing = [m for m in self.metrics if m not in values]
        if missing:
            raise ValueError(f"values for case {case!r} class {label} lack {missing}")
        self._values[key] = {m: float(values[m]) for m in self.metrics}
        if absent:
            self._absent.add(key)

    def add_masks(
        self,
        case: str,
        label: int,
        pred: np.ndarray,
        gt: np.ndarray,
        spacing: Sequence[float] | float | None = None,
    ) -> dict[str, float]:
        """Compute (see :func:`compute_metrics`), record and return the values of one case/class."""
        values = compute_metrics(pred, gt, spacing)
        self.add(case, label, values, absent=not (np.any(pred) or np.any(gt)))
        return {m: values[m] for m in self.metrics}

    @property
    def cases(self) -> list[str]:
        return sorted({c for c, _ in self._values})

    @property
    def labels(self) -> list[int]:
        return sorted({lbl for _, lbl in self._values})

    def value(self, case: str, label: int) -> dict[str, float]:
        return dict(self._values[(str(case), int(label))])

    def is_absent(self, case: str, label: int) -> bool:
        """True when the class was recorded as absent from both prediction and ground truth."""
        return (str(case), int(label)) in self._absent

    def absent(self) -> list[tuple[str, int]]:
        """The (case, label) pairs absent from both prediction and ground truth, sorted."""
        return sorted(self._absent)

    def rows(self) -> list[dict[str, object]]:
        """One dict per (case, label), sorted: ``{"case", "label", <metric>: value, ...,
        "absent": bool}`` (``absent``: in neither prediction nor ground truth)."""
        return [
            {"case": c, "label": lbl, **vals, "absent": (c, lbl) in self._absent}
            for (c, lbl), vals in sorted(self._values.items())
        ]

    def summary(self) -> dict[int, dict[str, MetricSummary]]:
        """Per class label, per metric: :class:`MetricSummary` over the cases (NaN left out and
        counted; cases where the class is absent from both masks left out and counted)."""
        out: dict[int, dict[str, MetricSummary]] = {}
        for lbl in self.labels:
            keys = [k for k in self._values if k[1] == lbl]
            per = [self._values[k] for k in keys if k not in self._absent]
            n_absent = len(keys) - len(per)
            out[lbl] = {m: MetricSummary.of((v[m] for v in per), n_absent=n_absent) for m in self.metrics}
        return out

    def __len__(self) -> int:
        return len(self._values)
