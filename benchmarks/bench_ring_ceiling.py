"""How well can a thin myocardium be segmented at all, at each protocol size? (no training)

The semi-supervised protocol's Myo target (>= 0.80 at 7 labeled) was measured on the CPU-sized
grid (80 px heart-centred crops) and the full grid (208-256 px over 300-400 mm). This script
measures, on the truth of the same hard phantoms (``sss_lib/phantoms_cardiac.py``), what no
training can change:

* **wall thickness** in slice pixels (2 x area / boundary length, per slice with Myo);
* **partial volume**: the share of Myo pixels whose label changes across the slice's thickness
  (the image there mixes anatomy; the label is the centre plane);
* **grid ceilings**: the 3D Dice of the *truth itself* after the round trip through a model's output
  grid, as Auto-segment maps it back (one-hot classes into LiteMedSAM's padded 256x256 frame, area
  averaged to the grid, bilinear back to 256, cropped, bilinear to the slice, argmax): the coarse
  head's 64x64 grid and the mask decoder's 256x256 grid. A perfect model on that grid scores this;
  the coarse classes (``sss_lib/class_source.py``) are bounded by the 64x64 one;
* **one-pixel shift**: the Dice (``sss_lib.metrics.dice``) of the truth shifted by one slice
  pixel, how much a one-pixel boundary error costs a wall this thin.

Run::

    python benchmarks/bench_ring_ceiling.py              # 20 cases per grid, writes ring_ceiling.json/.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, write_results  # noqa: E402

from sss_lib.metrics import dice  # noqa: E402
from sss_lib.phantoms_cardiac import CLASS_NAMES, make_hard_cardiac_case  # noqa: E402

GRIDS = {"coarse head (64x64)": 64, "mask decoder (256x256)": 256}
#: The protocol's grids (bench_ssl_protocol.py's REDUCED and FULL presets).
SIZES = {"reduced (80 px, 160 mm crop)": dict(size=(80, 80), fov_mm=160.0, n_slices=8),
         "full (208-256 px, 300-400 mm)": dict()}


def grid_round_trip(labels: np.ndarray, grid: int) -> np.ndarray:
    """``(S, H, W)`` labels -> the same labels after a perfect model's output on a ``grid`` x ``grid``
    map over the padded 256 frame, mapped back by LiteMedSAM's own
    :meth:`~sss_lib.backbones.litemedsam.LiteMedSamBackbone.to_slice_grid` (what Auto-segment does
    with coarse-head and mask logits)."""
    import torch
    import torch.nn.functional as F

    from sss_lib.backbones.litemedsam import IMAGE_SIZE, LiteMedSamBackbone, LiteMedSamEmbedding

    s, h, w = labels.shape
    k = len(CLASS_NAMES) + 1
    onehot = torch.from_numpy(np.stack([labels == c for c in range(k)], axis=1).astype(np.float32))
    scale = IMAGE_SIZE / max(h, w)
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))  # as embed_slice frames a slice
    frame = torch.zeros(s, k, IMAGE_SIZE, IMAGE_SIZE)
    frame[..., :nh, :nw] = F.interpolate(onehot, size=(nh, nw), mode="bilinear", align_corners=False,
                                         antialias=scale < 1)
    maps = F.adaptive_avg_pool2d(frame, grid) if grid != IMAGE_SIZE else frame
    geometry = LiteMedSamEmbedding(None, (h, w), scale, (nh, nw))
    # to_slice_grid reads only the embedding's geometry, never the network.
    back = LiteMedSamBackbone.to_slice_grid(None, maps, geometry, (h, w))  # type: ignore[arg-type]
    return back.argmax(dim=1).numpy().astype(labels.dtype)


def wall_thickness_px(myo: np.ndarray) -> list[float]:
    """Per slice with Myo: 2 x area / boundary length (a ring of width t and length L has area t L
    and boundary 2 L), in pixels."""
    from scipy import ndimage

    out = []
    for m in myo:
        area = int(m.sum())
        if area < 10:
            continue
        boundary = int((m & ~ndimage.binary_erosion(m)).sum())
        out.append(2.0 * area / max(boundary, 1))
    return out


def measure(n_cases: int, seed0: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for size_name, kwargs in SIZES.items():
        rows: dict[str, list[float]] = {"thickness_px": [], "myo_mixed_share": [], "pixel_mm": []}
        for grid_name in GRIDS:
            for c in CLASS_NAMES.values():
                rows[f"{grid_name}/{c}"] = []
        for c in CLASS_NAMES.values():
            rows[f"shift/{c}"] = []
        for i in range(n_cases):
            case = make_hard_cardiac_case(seed0 * 1000 + i, **kwargs)
            truth = np.asarray(case.labels.voxels)  # [k, j, i]: (S, H, W)
            mixed = np.asarray(case.slab_mixed)
            myo = truth == 2
            rows["thickness_px"] += wall_thickness_px(myo)
            rows["myo_mixed_share"].append(float((mixed & myo).sum() / max(1, myo.sum())))
            rows["pixel_mm"].append(float(case.labels.spacing[0]))
            for grid_name, grid in GRIDS.items():
                trip = grid_round_trip(truth, grid)
                for c, name in CLASS_NAMES.items():
                    rows[f"{grid_name}/{name}"].append(dice(trip == c, truth == c))
            shifted = np.roll(truth, 1, axis=2)
            for c, name in CLASS_NAMES.items():
                rows[f"shift/{name}"].append(dice(shifted == c, truth == c))
        results[size_name] = {key: {"mean": float(np.nanmean(v)), "min": float(np.nanmin(v)),
                                    "max": float(np.nanmax(v)), "n": len(v)} for key, v in rows.items()}
    return results


def table(results: dict[str, Any]) -> str:
    headers = ["grid", "pixel (mm)", "Myo wall (px)", "Myo pixels with partial volume"]
    headers += [f"{g} ceiling: {c}" for g in GRIDS for c in CLASS_NAMES.values()]
    headers += ["1-px shift: Myo"]
    rows = []
    for size_name, r in results.items():
        row = [size_name, f"{r['pixel_mm']['mean']:.2f}",
               f"{r['thickness_px']['mean']:.1f} ({r['thickness_px']['min']:.1f}-{r['thickness_px']['max']:.1f})",
               f"{r['myo_mixed_share']['mean']:.2f}"]
        row += [f"{r[f'{g}/{c}']['mean']:.3f} (min {r[f'{g}/{c}']['min']:.3f})"
                for g in GRIDS for c in CLASS_NAMES.values()]
        row.append(f"{r['shift/Myo']['mean']:.3f}")
        rows.append(row)
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=20, help="phantom cases per grid")
    ap.add_argument("--seed", type=int, default=200,
                    help="dataset seed; case c is seed*1000+c (200: the protocol's test split)")
    ap.add_argument("--name", default="ring_ceiling")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results = measure(args.cases, args.seed)
    md = table(results)
    sizes = {k: {kk: str(vv) for kk, vv in v.items()} for k, v in SIZES.items()}
    write_results(args.name, {"settings": vars(args), "sizes": sizes, "results": results,
                              "seconds": time.perf_counter() - t0})
    (Path(__file__).resolve().parent / "results" / f"{args.name}.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
