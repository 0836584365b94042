"""PCSW: box and point prompts from coarse class probabilities (SSS_METHOD.md section 2).

Shapes and coordinates: every probability volume is an ``(S, H, W)`` stack along the slice axis
(:meth:`sss_lib.volume.SliceAxis.to_stack`), ``H`` rows (``y``) by ``W`` columns (``x``).
``in_plane_spacing`` is the pixel size ``(sx, sy)`` in mm along ``(x, y)`` (as
:meth:`sss_lib.volume.Volume.in_plane_spacing` returns it) and ``slice_spacing`` the distance in mm
between slices. Prompts come out in stack coordinates (key slice, XYXY box, XY points).

Steps per class ``c`` (numbers as in the spec):

1. ``B_c = P_c > threshold``; no foreground -> status ``"absent"``, no prompt.
2. Window lengths from :func:`window_lengths` (middle length first); every start position.
3. Per window, the largest 26-connected 3D component and continuity ``C``.
4. Constraints: ``C >= tau``; at least ``min_slices`` consecutive slices; adjacent-slice area
   ratio ``<= r``; in-plane centroid move ``<= d`` mm between adjacent slices; the physical volume
   of the structure inside the class range widened by the margin. The volume checked is that of the
   whole-stack 3D component the window's component belongs to (**ours**: a window of S/3 to S/2
   slices can cut a structure, and the ranges are measured on whole structures by
   :func:`measure_class_ranges`). Without a range for the class, the volume check is skipped.
5. Lengths are tried in order; at the first length where some window passes, the passing window
   with the highest ``C``, then the highest mean probability wins (exact ties: see :func:`_rank`).
6-7. Key slice = the component's slice of largest area (ties: nearest the middle of the
   component); box = its tight box on the key slice plus ``box_margin_px``, clipped; positive point
   = the component pixel farthest from the border; negative points = the same for every other
   class's foreground inside the box (outside this component), one per class, in label order.
8. No passing window -> ``"fallback"``: the slice of ``B_c`` with the largest area, prompted on
   its largest 2D component (8-connected), confidence ``fallback_confidence_scale`` (< 0.5) times
   that component's share of the slice's foreground. ``"ok"`` prompts have confidence ``C``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Literal, Mapping

import numpy as np

from ..prompts import SlicePrompt
from .config import PcswConfig, window_lengths
from .geometry import deepest_point, tight_box
from .graph import SliceGraph, WindowComponent

log = logging.getLogger(__name__)

Status = Literal["ok", "fallback", "absent"]


@dataclasses.dataclass
class PcswResult:
    """What PCSW decided for one class.

    Attributes:
        label: the class label.
        status: ``"ok"`` (a window passed), ``"fallback"`` (none did: low-confidence prompt) or
            ``"absent"`` (no foreground: no prompt).
        reason: one sentence a person can read.
        window: chosen slices ``(start, stop)`` (stop exclusive), None unless ``"ok"``.
        continuity: C of the chosen window, None unless ``"ok"``.
        prompt: the prompt (``source="auto"``), None when ``"absent"``.
        mean_probability: mean probability of the prompted component (None when absent).
        volume_mm3: physical volume of the whole 3D structure prompted (None when absent).
        windows_tried: number of distinct windows examined.
    """

    label: int
    status: Status
    reason: str
    window: tuple[int, int] | None = None
    continuity: float | None = None
    prompt: SlicePrompt | None = None
    mean_probability: float | None = None
    volume_mm3: float | None = None
    windows_tried: int = 0


def _check_stack(name: object, prob: np.ndarray, shape: tuple[int, ...] | None) -> np.ndarray:
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"class {name}: probabilities must be an (S, H, W) stack, got shape {prob.shape}")
    if shape is not None and prob.shape != shape:
        raise ValueError(f"class {name}: probability shape {prob.shape} differs from the others' {shape}")
    # NaN makes both comparisons false, so it is caught here too.
    if prob.size and not (prob.min() >= 0.0 and prob.max() <= 1.0):
        raise ValueError(
            f"class {name}: probabilities must be finite values in [0, 1]; apply a sigmoid or softmax to logits first"
        )
    return prob


def _violation(comp: WindowComponent, cfg: PcswConfig, in_plane: tuple[float, float],
               voxel_mm3: float, volume_range: tuple[float, float] | None) -> str | None:
    """The first constraint the component breaks (a key of the failure tally), or None."""
    if comp.continuity < cfg.tau:
        return "continuity"
    if comp.slices.size < cfg.min_slices:
        return "slices"
    if comp.areas.size > 1:
        a, b = comp.areas[:-1], comp.areas[1:]
        if np.any(np.maximum(a, b) > cfg.max_area_ratio * np.minimum(a, b)):
            return "area ratio"
        sx, sy = in_plane
        step = np.diff(comp.centroids, axis=0)
        if np.any(np.hypot(step[:, 1] * sx, step[:, 0] * sy) > cfg.max_centroid_shift_mm):
            return "centroid shift"
    if volume_range is not None:
        lo, hi = volume_range
        vol = comp.full_voxels * voxel_mm3
        if not lo * (1 - cfg.volume_margin) <= vol <= hi * (1 + cfg.volume_margin):
            return "volume"
    return None


def _rank(comp: WindowComponent) -> tuple[float, float, int, float]:
    """Sort key of passing windows: highest C, then highest mean probability (the spec), then
    (**ours**, for exact ties such as a uniform cylinder) the most voxels, then the window whose
    centre is nearest the middle of the whole structure, so the key slice sits mid-structure."""
    # Rounding keeps float noise in the sums from deciding between equal windows.
    middle = (comp.full_span[0] + comp.full_span[1]) / 2
    centre = (comp.start + comp.stop - 1) / 2
    return (round(comp.continuity, 9), round(comp.mean_probability, 9), comp.voxels, -abs(centre - middle))


def _search(graph: SliceGraph, cfg: PcswConfig, in_plane: tuple[float, float], voxel_mm3: float,
            volume_range: tuple[float, float] | None) -> tuple[WindowComponent | None, dict[str, int], int]:
    n_slices = graph.shape[0]
    fails: dict[str, int] = {}
    tried = 0
    for length in window_lengths(n_slices, cfg):
        # Windows holding the same nodes share one graph search and one verdict; only their
        # position (the last tie-break) differs.
        seen: dict[tuple[int, int], WindowComponent | None] = {}
        best: WindowComponent | None = None
        for start in range(n_slices - length + 1):
            key = graph.node_window_key(start, start + length)
            if key[0] == key[1]:
                continue
            if key in seen:
                comp = seen[key]
                if comp is None:
                    continue
                comp = dataclasses.replace(comp, start=start, stop=start + length)
            else:
                tried += 1
                comp = graph.window(start, start + length)
                assert comp is not None
                why = _violation(comp, cfg, in_plane, voxel_mm3, volume_range)
                seen[key] = comp if why is None else None
                if why is not None:
                    fails[why] = fails.get(why, 0) + 1
                    continue
            if best is None or _rank(comp) > _rank(best):
                best = comp
        if best is not None:
            return best, fails, tried
    return None, fails, tried


def _pick_key_slice(slices: np.ndarray, areas: np.ndarray) -> int:
    middle = (slices[0] + slices[-1]) / 2
    ties = np.flatnonzero(areas == areas.max())
    return int(slices[ties[np.argmin(np.abs(slices[ties] - middle))]])


def _negative_points(key: int, box: tuple[int, int, int, int], own: np.ndarray,
                     others: Mapping[int, np.ndarray], cfg: PcswConfig,
                     in_plane: tuple[float, float]) -> list[tuple[int, int]]:
    x0, y0, x1, y1 = box
    points = []
    for label in sorted(others):
        inside = (others[label][key, y0:y1 + 1, x0:x1 + 1] > cfg.threshold) & ~own[y0:y1 + 1, x0:x1 + 1]
        if np.count_nonzero(inside) >= cfg.negative_min_pixels:
            x, y = deepest_point(inside, in_plane)
            points.append((x + x0, y + y0))
    return points


def slice_prompt(key: int, own: np.ndarray, others: Mapping[int, np.ndarray], cfg: PcswConfig,
                 in_plane: tuple[float, float], confidence: float) -> SlicePrompt:
    """PCSW's prompt on slice ``key``: the box of ``own`` (H, W) bool, its deepest point, and negative
    points for the ``others`` (label -> (H, W) bool) inside that box; ``in_plane`` is (sx, sy) mm."""
    box = tight_box(own, cfg.box_margin_px)
    return SlicePrompt(
        key_slice=key,
        box=box,
        positive_points=[deepest_point(own, in_plane)],
        negative_points=_negative_points(key, box, own, others, cfg, in_plane),
        source="auto",
        confidence=float(confidence),
    )


def _describe(fails: dict[str, int], cfg: PcswConfig, n_slices: int) -> str:
    if not fails:
        return f"no window fits the {n_slices} slice(s)" if n_slices < cfg.min_window else "no window held foreground"
    limits = {"continuity": f"continuity < {cfg.tau:g}", "slices": f"fewer than {cfg.min_slices} slices",
              "area ratio": f"area ratio > {cfg.max_area_ratio:g}",
              "centroid shift": f"centroid shift > {cfg.max_centroid_shift_mm:g} mm",
              "volume": "volume outside the class range"}
    return ", ".join(f"{limits[k]} in {v} window(s)" for k, v in sorted(fails.items(), key=lambda kv: -kv[1]))


def pcsw_class(
    prob: np.ndarray,
    label: int,
    *,
    in_plane_spacing: tuple[float, float],
    slice_spacing: float,
    volume_range: tuple[float, float] | None = None,
    others: Mapping[int, np.ndarray] | None = None,
    config: PcswConfig | None = None,
) -> PcswResult:
    """Run PCSW for one class.

    Args:
        prob: ``(S, H, W)`` probabilities of this class in [0, 1].
        label: the class label (reported back).
        in_plane_spacing: ``(sx, sy)`` mm; ``slice_spacing``: mm between slices.
        volume_range: ``(min_mm3, max_mm3)`` of the class in labeled cases, or None.
        others: other classes' ``(S, H, W)`` probabilities (label -> stack) for negative points.
        config: settings (default :class:`PcswConfig`).
    """
    prob = _check_stack(label, prob, None)
    others = {k: _check_stack(k, v, prob.shape) for k, v in (others or {}).items() if k != label}
    return _pcsw_checked(prob, label, in_plane_spacing, slice_spacing, volume_range, others, config or PcswConfig())


def _pcsw_checked(prob: np.ndarray, label: int, in_plane_spacing: tuple[float, float], slice_spacing: float,
                  volume_range: tuple[float, float] | None, others: Mapping[int, np.ndarray],
                  cfg: PcswConfig) -> PcswResult:
    mask = prob > cfg.threshold
    if not mask.any():
        log.info("PCSW class %s: absent (no voxel has probability above %g)", label, cfg.threshold)
        return PcswResult(label, "absent", f"no voxel has probability above {cfg.threshold:g}")
    sx, sy = (float(v) for v in in_plane_spacing)
    voxel_mm3 = sx * sy * float(slice_spacing)

    # Work on the foreground's in-plane bounding box: windows and components never leave it.
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    graph = SliceGraph(mask[:, y0:y1, x0:x1], prob[:, y0:y1, x0:x1], cfg.connectivity)
    best, fails, tried = _search(graph, cfg, (sx, sy), voxel_mm3, volume_range)

    def full_slice(nodes_mask: np.ndarray) -> np.ndarray:
        out = np.zeros(mask.shape[1:], bool)
        out[y0:y1, x0:x1] = nodes_mask
        return out

    if best is not None:
        key = _pick_key_slice(best.slices, best.areas)
        own = full_slice(graph.mask_of(best.nodes, key))
        prompt = slice_prompt(key, own, others, cfg, (sx, sy), best.continuity)
        reason = (f"window {best.start}-{best.stop - 1} (length {best.stop - best.start}) passed with "
                  f"continuity {best.continuity:.3f}; key slice {key}")
        return PcswResult(label, "ok", reason, (best.start, best.stop), best.continuity, prompt,
                          best.mean_probability, best.full_voxels * voxel_mm3, tried)

    slice_area = mask.reshape(mask.shape[0], -1).sum(axis=1)
    fg_slices = np.flatnonzero(slice_area)
    key = _pick_key_slice(fg_slices, slice_area[fg_slices])
    nodes = np.arange(graph.first_node[key], graph.first_node[key + 1])
    node = nodes[int(np.argmax(graph.area[nodes]))]
    share = graph.area[node] / float(slice_area[key])
    own = full_slice(graph.mask_of(np.array([node]), key))
    prompt = slice_prompt(key, own, others, cfg, (sx, sy), cfg.fallback_confidence_scale * share)
    reason = f"no window passed ({_describe(fails, cfg, mask.shape[0])}); fell back to slice {key}, the largest area"
    log.info("PCSW class %s: %s", label, reason)
    return PcswResult(label, "fallback", reason, None, None, prompt,
                      float(graph.sum_p[node] / graph.area[node]),
                      float(graph.full_voxels[graph.full_comp[node]] * voxel_mm3), tried)


def run_pcsw(
    probabilities: Mapping[int, np.ndarray],
    *,
    in_plane_spacing: tuple[float, float],
    slice_spacing: float,
    class_ranges: Mapping[int, tuple[float, float]] | None = None,
    config: PcswConfig | None = None,
    only: Iterable[int] | None = None,
) -> dict[int, PcswResult]:
    """Run PCSW for every class (label -> ``(S, H, W)`` probabilities); see :func:`pcsw_class`.

    Every class's foreground serves as negative evidence for the others. ``class_ranges`` maps
    labels to ``(min_mm3, max_mm3)``; classes without an entry skip the volume check. ``only``
    limits which classes get prompts (all maps still give negative points); results are keyed
    and sorted by label.
    """
    checked: dict[int, np.ndarray] = {}
    shape = None
    for label, prob in probabilities.items():
        checked[int(label)] = _check_stack(label, prob, shape)
        shape = checked[int(label)].shape
    ranges = class_ranges or {}
    cfg = config or PcswConfig()
    results = {}
    wanted = sorted(checked) if only is None else sorted(int(v) for v in only)
    unknown = [v for v in wanted if v not in checked]
    if unknown:
        raise ValueError(f"classes {unknown} have no probability map")
    for label in wanted:
        others = {k: v for k, v in checked.items() if k != label}
        results[label] = _pcsw_checked(checked[label], label, in_plane_spacing, slice_spacing,
                                       ranges.get(label), others, cfg)
    return results
