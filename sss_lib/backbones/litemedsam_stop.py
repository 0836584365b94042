"""When carried 2D propagation must stop: the object has ended on the slice just decoded.

A box-prompted 2D model (LiteMedSAM, MedSAM) asked about a box almost always answers with a mask,
even on a slice where the object no longer exists: it segments whatever sits in the box (a vessel,
the wall, a neighbour), and the carried box then drags that error through the rest of the volume.
:class:`StopRule` looks at each carried step's :class:`SliceObservation` against the previous slice
and the key slice, and says why the object has ended, or None to go on.

Pure numpy; masks are ``(H, W)`` bool on the slice grid, boxes XYXY in slice pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SliceObservation:
    """What one decoded slice looked like.

    Attributes:
        area: mask pixels.
        iou_pred: the decoder's IoU-prediction head score (its own confidence), 0..1.
        mean_intensity: mean of the preprocessed slice inside the mask (0 if empty).
        ring_mean: mean of a ring :data:`RING_PX` pixels wide just outside the mask (its surroundings).
        box_fill: mask area over the prompt box's area (0 without a box).
        contained_prev: intersection with the previous slice's mask over the smaller of the two
            areas (None on a key slice).
    """

    area: int
    iou_pred: float
    mean_intensity: float
    ring_mean: float
    box_fill: float = 0.0
    contained_prev: float | None = None


# Width of the "surroundings" ring: thin, so that it samples what touches the object's edge.
RING_PX = 3


def observe(
    mask: np.ndarray,
    iou_pred: float,
    image: np.ndarray,
    prev_mask: np.ndarray | None,
    box: Sequence[float] | None,
) -> SliceObservation:
    """Measure a decoded ``(H, W)`` bool ``mask`` on its preprocessed ``(H, W)`` slice ``image``,
    against the previous slice's mask and the XYXY box it was prompted with (either may be None)."""
    area = int(mask.sum())
    if area == 0:
        return SliceObservation(0, float(iou_pred), 0.0, 0.0, 0.0, 0.0 if prev_mask is not None else None)
    from scipy import ndimage

    ring = ndimage.binary_dilation(mask, iterations=RING_PX) & ~mask
    mean = float(image[mask].mean())
    ring_mean = float(image[ring].mean()) if ring.any() else mean
    contained = None
    if prev_mask is not None:
        smaller = min(area, int(prev_mask.sum()))
        contained = float(np.logical_and(mask, prev_mask).sum()) / smaller if smaller else 0.0
    return SliceObservation(area, float(iou_pred), mean, ring_mean, _box_fill(area, box), contained)


def _box_fill(area: int, box: Sequence[float] | None) -> float:
    if box is None:
        return 0.0
    x0, y0, x1, y1 = box
    return area / max(1.0, (x1 - x0 + 1) * (y1 - y0 + 1))  # inclusive pixel corners


@dataclasses.dataclass(frozen=True)
class StopRule:
    """Thresholds that end a carried propagation.

    Each carried slice is compared with the previous slice (``prev``) and with the key slice
    (``key``, the slice the user prompted, whose mask is trusted). The intensity tests are scaled by
    the key slice's *edge contrast*: mean intensity inside the key mask minus the mean of a thin
    ring just outside it. That makes them independent of the window, the modality and of whether
    the object is brighter or darker than its surroundings. Measured on lung1 and brain1: slices
    where the object has ended keep a plausible area, overlap and IoU score (the model always finds
    something in a box), but what they outline has no edge contrast or the wrong intensity.

    Attributes:
        min_area_px: a mask smaller than this has vanished (default 4 px).
        min_area_fraction_of_key: ... as has one smaller than this fraction of the key mask (0.05).
        max_area_growth: area may grow at most this factor from ``prev`` (2.0): an object that
            grows that fast between adjacent slices is usually a neighbour the box now includes.
        max_area_shrink: area may shrink at most this factor from ``prev`` (4.0).
        min_contained_prev: at least this fraction of the smaller of (mask, ``prev``'s mask) must lie
            in the other (0.5): a continuing object overlaps itself on the next slice. (Plain IoU
            would also punish a legitimately shrinking or growing object.)
        min_iou_pred: the decoder's own IoU score must reach this (0.5); a weak test, the score
            stays high on wrong masks.
        min_key_contrast: below this absolute key edge contrast (in ``[0, 1]`` units, 0.02) the object
            is not defined by intensity and the two intensity tests are skipped.
        min_contrast_fraction: the mask's own edge contrast, with the key's sign, must reach this
            fraction of the key's (0.25): a mask with no edge outlines no object.
        max_mean_shift_fraction: the mean inside the mask may move from the key's mean by at most
            this fraction of the key's edge contrast (0.65): beyond ~half way to the background the
            mask holds more background than object.
        min_intensity_tolerance: the mean shift is always tolerated up to this (0.03), so a faint
            key object does not stop on noise.
        max_box_fill: stop when the mask covers more than this fraction of the carried box (0.9):
            the model is painting the prompt rectangle, not outlining an object (a disc fills 0.79
            of its tight box, less of the enlarged carried box).
        box_margin_fraction / box_margin_px: the carried box is the previous mask's tight box
            enlarged on each side by ``max(margin_px, fraction * side)`` (0.1, 2 px), so a growing
            object is not clipped by its own box.
        enabled: False turns every test off: the plain MedSAM carry recipe (for comparisons).
    """

    min_area_px: int = 4
    min_area_fraction_of_key: float = 0.05
    max_area_growth: float = 2.0
    max_area_shrink: float = 4.0
    min_contained_prev: float = 0.5
    min_iou_pred: float = 0.5
    min_key_contrast: float = 0.02
    min_contrast_fraction: float = 0.25
    max_mean_shift_fraction: float = 0.65
    min_intensity_tolerance: float = 0.03
    max_box_fill: float = 0.9
    box_margin_fraction: float = 0.1
    box_margin_px: float = 2.0
    enabled: bool = True

    def stop_reason(self, key: SliceObservation, prev: SliceObservation, cur: SliceObservation) -> str | None:
        """Why the object has ended on ``cur`` (a short phrase), or None if it goes on."""
        if cur.area < max(self.min_area_px, 1):
            return f"mask vanished ({cur.area} px)"
        if not self.enabled:
            return None
        if cur.area < self.min_area_fraction_of_key * key.area:
            return f"mask vanished ({cur.area} px, key slice {key.area} px)"
        if cur.area > self.max_area_growth * prev.area:
            return f"area jumped {prev.area} -> {cur.area} px"
        if cur.area * self.max_area_shrink < prev.area:
            return f"area collapsed {prev.area} -> {cur.area} px"
        if cur.contained_prev is not None and cur.contained_prev < self.min_contained_prev:
            return f"overlap with previous slice {cur.contained_prev:.2f} < {self.min_contained_prev}"
        if cur.iou_pred < self.min_iou_pred:
            return f"IoU score {cur.iou_pred:.2f} < {self.min_iou_pred}"
        key_contrast = key.mean_intensity - key.ring_mean
        if abs(key_contrast) >= self.min_key_contrast:
            contrast = (cur.mean_intensity - cur.ring_mean) * np.sign(key_contrast)
            if contrast < self.min_contrast_fraction * abs(key_contrast):
                return f"edge contrast {contrast:.3f} < {self.min_contrast_fraction} x key's {abs(key_contrast):.3f}"
            shift = abs(cur.mean_intensity - key.mean_intensity)
            if shift > max(self.max_mean_shift_fraction * abs(key_contrast), self.min_intensity_tolerance):
                return f"mean intensity {cur.mean_intensity:.3f} drifted from key {key.mean_intensity:.3f}"
        if cur.box_fill > self.max_box_fill:
            return f"mask fills {cur.box_fill:.0%} of the carried box"
        return None
