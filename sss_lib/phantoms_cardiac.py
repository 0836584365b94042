"""Hard synthetic short-axis cardiac MR cases: a benchmark that leaves room for semi-supervision.

:mod:`sss_lib.phantoms` makes clean, small phantoms that a frozen foundation model learns from three
labeled cases almost as well as from forty. This module draws cases made hard the way real
short-axis cine MR (ACDC) is hard:

* **Realistic grid**: 208-256 px in plane at 1.2-1.8 mm (a 300-400 mm field of view), 7-14 slices
  of 5-10 mm with a gap of up to 2 mm (``size``/``fov_mm`` make a smaller, heart-centred grid for
  CPU benchmarks, the anatomy staying in mm).
* **Thick slices and partial volume**: every slice is the mean of ``sub_slices`` renderings across
  its thickness; its label is the slice's centre plane (what annotators draw), so the image at the
  base and apex mixes anatomy its label does not show.
* **Anatomy**: an LV cavity that closes at the apex, a myocardium that thins from 6.5-11 mm at the
  base to 2.5-4.5 mm at the apex (a thin ring on the last slices), papillary muscles and
  trabeculations inside the LV cavity (myocardium-dark, labeled LV as in ACDC), an RV crescent
  whose depth, angular extent, skew and profile vary per case and which ends before the apex,
  pericardial fat, the RV free wall, lungs, liver and a descending aorta (a bright disc that
  looks like a small LV cavity).
* **Appearance**: a blood/myocardium contrast from 2.2x to 5x, a gamma curve, a smooth random
  multiplicative bias field, in-plane blur, texture, Rician noise of 3-11% of the blood signal and
  an arbitrary gain.
* **Orientation**: any in-plane rotation, a mirror (the RV on the other side) in 30% of cases,
  base-apex order reversed in 30%, and an oblique direction matrix (up to 60 degrees).

Classes as in ACDC: ``1 = RV``, ``2 = Myo``, ``3 = LV`` (blood pool, papillary muscles and
trabeculations included). Arrays are ``[k, j, i]``; geometry is LPS; sizes are ``(i, j)`` voxels;
spacings are mm along ``(i, j, k)``. Every case is a pure function of its seed and arguments.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np
from scipy import ndimage

from .phantoms import CLASS_COLORS, CLASS_NAMES, _random_rotation
from .volume import Volume

log = logging.getLogger(__name__)

__all__ = ["CLASS_COLORS", "CLASS_NAMES", "HardCase", "make_hard_cardiac_case", "make_hard_cardiac_phantom"]

Phase = Literal["ED", "ES"]


@dataclasses.dataclass(frozen=True)
class _Anatomy:
    """Per-case anatomy and appearance (lengths in mm, angles in rad), drawn once from the seed."""

    n_slices: int
    slice_spacing: float
    thickness: float
    first_depth: float  # depth (mm below the base plane) of slice 0's centre, before any flip
    lv_length: float  # base plane to the endocardial apex
    apex_wall: float  # wall thickness at the apex
    base_wall: float
    r_cavity: float
    flip: bool  # slice 0 is the apex
    mirror: bool
    rotation: float  # in-plane rotation of the whole anatomy
    centre: np.ndarray  # (2,) heart centre (mm, in the canonical frame around the FOV centre)
    drift: np.ndarray  # (2,) mm the LV centre moves from base to apex
    ellipticity: float
    ellipse_angle: float
    lobes: float
    lobe_phase: float
    rv_angle: float  # direction of the RV from the LV centre (canonical frame: about pi)
    rv_twist: float
    rv_depth: float  # RV free-wall distance from the septum at the base
    rv_span: float  # half the RV's angular extent at the base
    rv_power: float  # profile shape (1 - |a|^p)^q across the extent
    rv_q: float
    rv_skew: float
    rv_end: float  # fraction of the LV length where the RV ends
    papillary: np.ndarray  # (2, 3): angle offset, radial fraction, radius fraction
    trabeculae: np.ndarray  # (M,) spoke angles
    fat_angle: float
    fat_extent: float  # cosine limit of the fat's angular sector (-1: all round)
    trab_depth: float  # fraction of the cavity radius the trabeculae reach in from the wall
    intensities: dict[str, float]
    gamma: float
    noise: float
    bias_strength: float
    blur: float
    texture_seed: int


def _draw(rng: np.random.Generator, n_slices: int | None, slice_spacing: float | None) -> _Anatomy:
    s = int(n_slices) if n_slices is not None else int(rng.integers(7, 15))
    sp = float(slice_spacing) if slice_spacing is not None else float(rng.uniform(5.0, 10.0))
    thickness = sp - float(rng.uniform(0.0, min(2.0, 0.25 * sp)))
    # The stack starts within the base and ends near the apex: the endocardial apex falls between
    # 1.3 slices before and 0.3 slices after the last slice's centre.
    first = float(rng.uniform(0.1, 0.5)) * sp
    lv_length = first + (s - 1) * sp + float(rng.uniform(-0.3, 1.3)) * sp
    blood = 1.0
    myo = blood / float(rng.uniform(2.2, 5.0))  # contrast varies with sequence and patient
    intensities = {
        "air": 0.01, "lung": float(rng.uniform(0.04, 0.12)), "body": float(rng.uniform(0.3, 0.5)),
        "fat": float(rng.uniform(0.6, 0.9)), "liver": float(rng.uniform(0.25, 0.4)), "myo": myo,
        "blood_lv": blood, "blood_rv": blood * float(rng.uniform(0.8, 1.05)),
        "aorta": blood * float(rng.uniform(0.85, 1.1)),
    }
    gain = float(rng.uniform(80, 600))
    intensities = {k: v * gain for k, v in intensities.items()}
    mirror = bool(rng.random() < 0.3)
    return _Anatomy(
        n_slices=s, slice_spacing=sp, thickness=thickness, first_depth=first, lv_length=lv_length,
        apex_wall=float(rng.uniform(2.5, 4.5)), base_wall=float(rng.uniform(6.5, 11.0)),
        r_cavity=float(rng.uniform(20.0, 30.0)), flip=bool(rng.random() < 0.3), mirror=mirror,
        rotation=float(rng.uniform(-np.pi, np.pi)),
        centre=rng.uniform(-12, 12, 2), drift=rng.uniform(-10, 10, 2),
        ellipticity=float(rng.uniform(0.0, 0.12)), ellipse_angle=float(rng.uniform(0, np.pi)),
        lobes=float(rng.uniform(0.0, 0.05)), lobe_phase=float(rng.uniform(0, 2 * np.pi)),
        rv_angle=float(np.pi + rng.uniform(-0.35, 0.35)), rv_twist=float(rng.uniform(-0.4, 0.4)),
        rv_depth=float(rng.uniform(18.0, 38.0)), rv_span=float(rng.uniform(1.1, 1.7)),
        rv_power=float(rng.uniform(1.3, 3.0)), rv_q=float(rng.uniform(0.5, 1.3)),
        rv_skew=float(rng.uniform(-0.45, 0.45)), rv_end=float(rng.uniform(0.6, 0.92)),
        papillary=np.stack([np.array([-0.7, 0.7]) + rng.uniform(-0.35, 0.35, 2),
                            rng.uniform(0.55, 0.75, 2), rng.uniform(0.15, 0.24, 2)], axis=1),
        trabeculae=np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(10, 22)))),
        fat_angle=float(rng.uniform(0, 2 * np.pi)), fat_extent=float(rng.uniform(-0.6, 0.6)),
        trab_depth=float(rng.uniform(0.1, 0.25)),
        intensities=intensities, gamma=float(rng.uniform(0.7, 1.4)), noise=float(rng.uniform(0.03, 0.11)),
        bias_strength=float(rng.uniform(0.15, 0.5)), blur=float(rng.uniform(0.4, 0.9)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


@dataclasses.dataclass
class _Plane:
    """One rendered plane: labels, noiseless intensities, and where papillary muscles and
    trabeculations are (all ``(H, W)``)."""

    labels: np.ndarray
    image: np.ndarray
    papillary: np.ndarray
    trabeculae: np.ndarray


def _render_plane(a: _Anatomy, z: float, xx: np.ndarray, yy: np.ndarray, phase: Phase) -> _Plane:
    """The plane ``z`` mm below the base (``xx, yy``: canonical-frame pixel centres, mm)."""
    inten = a.intensities
    t = z / a.lv_length  # 0 at the base, 1 at the endocardial apex
    centre = a.centre + a.drift * np.clip(t, 0, 1)
    dx, dy = xx - centre[0], yy - centre[1]
    rho, phi = np.hypot(dx, dy), np.arctan2(dy, dx)
    mod = (1.0 + a.ellipticity * np.cos(2 * (phi - a.ellipse_angle)) + a.lobes * np.cos(3 * (phi - a.lobe_phase)))
    es = phase == "ES"

    labels = np.zeros(xx.shape, np.uint8)
    pap = np.zeros(xx.shape, bool)
    trab = np.zeros(xx.shape, bool)
    img = np.full(xx.shape, inten["air"], np.float32)
    # Thorax (canonical frame: anterior up, the patient's left to the right of the image).
    body = (xx / 165.0) ** 2 + ((yy + 10.0) / 125.0) ** 2 < 1.0
    img[body] = inten["body"]
    for side in (-1.0, 1.0):
        lung = ((xx - side * 75.0) / 55.0) ** 2 + ((yy + 5.0) / 80.0) ** 2 < 1.0
        img[body & lung] = inten["lung"]
    liver = ((xx + 40.0) / 90.0) ** 2 + ((yy - 95.0 + 0.4 * z) / 45.0) ** 2 < 1.0
    img[body & liver] = inten["liver"]
    aorta = np.hypot(xx - (centre[0] + 35.0), yy - (centre[1] + 62.0)) < 11.0
    img[aorta] = inten["aorta"]

    if z < 0 or t >= 1.0 + a.apex_wall / a.lv_length:
        return _Plane(labels, img, pap, trab)  # above the base or below the epicardial apex
    contraction = 0.7 if es else 1.0
    f = float(np.sqrt(max(0.0, 1.0 - min(t, 1.0) ** 2)))
    r_cav = a.r_cavity * contraction * f ** 0.9
    wall = (a.base_wall + (a.apex_wall - a.base_wall) * min(t, 1.0)) * (1.3 if es else 1.0)
    if t > 1.0:  # the apical cap: a small disc of myocardium, shrinking to nothing
        wall *= float(np.sqrt(max(0.0, 1.0 - ((t - 1.0) * a.lv_length / a.apex_wall) ** 2)))
    cavity = rho < r_cav * mod
    epi = rho < (r_cav + wall) * mod
    r_epi = (r_cav + wall) * mod

    # RV: a crescent against the septum, its depth a per-case profile over its angular extent.
    if t < a.rv_end:
        g = float(np.sqrt(1.0 - (t / a.rv_end) ** 2))
        theta = a.rv_angle + a.rv_twist * t
        span = a.rv_span * (0.6 + 0.4 * g)
        u = _wrap(phi - theta) / span
        u = u + a.rv_skew * (1.0 - u**2)
        prof = np.clip(1.0 - np.abs(u) ** a.rv_power, 0.0, 1.0) ** a.rv_q
        depth = a.rv_depth * g * (0.8 if es else 1.0) * prof
        rv = (np.abs(u) < 1.0) & (rho >= r_epi) & (rho < r_epi + depth)
        if rv.sum() < 6:
            rv[:] = False
        free_wall = (np.abs(u) < 1.0) & (rho >= r_epi + depth) & (rho < r_epi + depth + 2.5) & (depth > 1.0)
    else:
        rv = np.zeros(xx.shape, bool)
        free_wall = rv
    # Pericardial fat over part of the heart's circumference only (it is patchy in real images).
    fat = ((rho < r_epi + 4.0) & ~epi & (np.cos(phi - a.fat_angle) > a.fat_extent)) | free_wall & ~rv
    img[fat] = inten["fat"]
    img[free_wall] = inten["myo"]
    img[rv] = inten["blood_rv"]
    labels[rv] = 1
    myo = epi & ~cavity
    labels[myo] = 2
    img[myo] = inten["myo"]
    labels[cavity] = 3
    img[cavity] = inten["blood_lv"]

    if r_cav > 0:
        # Papillary muscles: two myocardium-dark discs inside the cavity, off the wall (ACDC: LV).
        if 0.15 < t < 0.8:
            for off, frac, rad in a.papillary:
                ang = a.rv_angle + np.pi + off
                pc = centre + frac * r_cav * np.array([np.cos(ang), np.sin(ang)])
                pap |= cavity & (np.hypot(xx - pc[0], yy - pc[1]) < rad * r_cav)
        # Trabeculations: thin spokes of muscle from the endocardium inwards, deeper towards the apex.
        reach = r_cav * mod * (1.0 - a.trab_depth * (1.0 + t))
        near = cavity & (rho > reach)
        width = 1.4  # mm
        for ang in a.trabeculae:
            trab |= near & (np.abs(_wrap(phi - ang)) * np.maximum(rho, 1e-3) < width / 2)
        trab &= ~pap
        img[pap] = inten["myo"] * 1.05
        img[trab] = 0.5 * (inten["myo"] + inten["blood_lv"])
    return _Plane(labels, img, pap, trab)


@dataclasses.dataclass
class HardCase:
    """One hard case and what the tests need to check its anatomy.

    Attributes:
        image, labels: the volumes (same grid; ``labels`` uint8 with :data:`CLASS_NAMES`).
        papillary, trabeculae: ``[k, j, i]`` bool, where the slice's centre plane has them.
        slab_mixed: ``[k, j, i]`` bool, pixels whose label changes across the slice's thickness
            (where partial volume mixes anatomy).
        flipped: slice 0 is the apex; mirrored: the anatomy is mirrored in plane;
        rotation_deg: the in-plane rotation of the anatomy.
    """

    image: Volume
    labels: Volume
    papillary: np.ndarray
    trabeculae: np.ndarray
    slab_mixed: np.ndarray
    flipped: bool
    mirrored: bool
    rotation_deg: float


def make_hard_cardiac_case(
    seed: int,
    *,
    size: tuple[int, int] | None = None,
    fov_mm: float | None = None,
    n_slices: int | None = None,
    slice_spacing: float | None = None,
    sub_slices: int = 5,
    oblique: bool = True,
    phase: Phase = "ED",
) -> HardCase:
    """One hard short-axis case (see the module docstring).

    Args:
        seed: the case.
        size: in-plane voxels ``(i, j)``; None draws 208-256 (square).
        fov_mm: field of view in mm along the larger side; None draws 300-400 mm for a drawn size
            and 1.5 mm per pixel for a given one. A small ``size`` with ``fov_mm`` about 160 gives
            a heart-centred crop (the CPU benchmark's reduced grid).
        n_slices: None draws 7-14. slice_spacing: mm between slice centres; None draws 5-10.
        sub_slices: renderings averaged across a slice's thickness (1: no partial volume).
        oblique: an oblique direction matrix (up to 60 degrees); False: identity.
        phase: "ES" draws the same heart contracted.
    """
    if size is not None and (len(size) != 2 or min(size) < 16):
        raise ValueError(f"size must be two in-plane voxel counts of at least 16, got {size}")
    if n_slices is not None and n_slices < 2:
        raise ValueError(f"n_slices must be at least 2, got {n_slices}")
    if sub_slices < 1:
        raise ValueError(f"sub_slices must be at least 1, got {sub_slices}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4A2D]))
    if size is None:
        side = int(rng.integers(208, 257))
        nx = ny = side
        fov = float(fov_mm) if fov_mm is not None else float(rng.uniform(300.0, 400.0))
    else:
        nx, ny = int(size[0]), int(size[1])
        fov = float(fov_mm) if fov_mm is not None else 1.5 * max(nx, ny)
    px = fov / max(nx, ny)
    a = _draw(rng, n_slices, slice_spacing)
    s = a.n_slices

    # Pixel centres in mm around the FOV centre, taken into the canonical frame of the anatomy.
    x = (np.arange(nx) + 0.5) * px - nx * px / 2
    y = (np.arange(ny) + 0.5) * px - ny * px / 2
    gx, gy = np.meshgrid(x, y)
    if a.mirror:
        gx = -gx
    c, sn = np.cos(a.rotation), np.sin(a.rotation)
    xx, yy = c * gx + sn * gy, -sn * gx + c * gy

    labels = np.zeros((s, ny, nx), np.uint8)
    clean = np.zeros((s, ny, nx), np.float32)
    pap = np.zeros((s, ny, nx), bool)
    trab = np.zeros((s, ny, nx), bool)
    mixed = np.zeros((s, ny, nx), bool)
    offsets = (np.arange(sub_slices) + 0.5) / sub_slices - 0.5 if sub_slices > 1 else np.zeros(1)
    for k in range(s):
        kk = s - 1 - k if a.flip else k
        z = a.first_depth + kk * a.slice_spacing
        centre_plane = _render_plane(a, z, xx, yy, phase)
        labels[k], pap[k], trab[k] = centre_plane.labels, centre_plane.papillary, centre_plane.trabeculae
        acc = np.zeros((ny, nx), np.float64)
        for off in offsets:
            plane = centre_plane if off == 0 else _render_plane(a, z + off * a.thickness, xx, yy, phase)
            acc += plane.image
            mixed[k] |= plane.labels != centre_plane.labels
        clean[k] = (acc / len(offsets)).astype(np.float32)

    img = _appearance(a, clean, px)
    direction = _random_rotation(rng, np.deg2rad(60)) if oblique else np.eye(3)
    sp = np.array([px, px, a.slice_spacing])
    extent = sp * (np.array([nx, ny, s]) - 1)
    origin = -direction @ (extent / 2.0) + rng.uniform(-30, 30, 3)
    name = f"hard-phantom:{seed}:{phase}"
    image = Volume(img, sp, origin, direction, name)
    lab = Volume(labels, sp.copy(), origin.copy(), direction.copy(), name + ":labels")
    return HardCase(image, lab, pap, trab, mixed, a.flip, a.mirror, float(np.rad2deg(a.rotation)))


def _appearance(a: _Anatomy, clean: np.ndarray, px: float) -> np.ndarray:
    """Texture, in-plane blur, gamma, a smooth random bias field and Rician noise."""
    s, ny, nx = clean.shape
    rng = np.random.default_rng(a.texture_seed)
    texture = ndimage.gaussian_filter(rng.normal(size=clean.shape), (0.5, 2.0, 2.0))
    texture /= max(float(texture.std()), 1e-6)
    img = clean * (1.0 + 0.07 * texture.astype(np.float32))
    img = ndimage.gaussian_filter(img, (0.0, a.blur, a.blur))
    blood = a.intensities["blood_lv"]
    img = blood * np.clip(img / blood, 0, None) ** a.gamma
    # A bias field that varies over ~100 mm in plane and slowly across slices (coil sensitivity).
    coarse = rng.normal(size=(max(2, s // 4 + 1), 5, 5))
    field = ndimage.zoom(coarse, (s / coarse.shape[0], ny / 5, nx / 5), order=3, mode="nearest")[:s, :ny, :nx]
    field = ndimage.gaussian_filter(field, (0.5, 8.0 / px, 8.0 / px))
    field /= max(float(field.std()), 1e-6)
    img = img * np.exp(a.bias_strength * field)
    sigma = a.noise * blood
    n1 = rng.normal(scale=sigma, size=img.shape)
    n2 = rng.normal(scale=sigma, size=img.shape)
    return np.sqrt((img + n1) ** 2 + n2**2).astype(np.float32)


def make_hard_cardiac_phantom(seed: int, **kwargs: object) -> tuple[Volume, Volume]:
    """``(image, labels)`` of :func:`make_hard_cardiac_case` (the signature
    :func:`sss_lib.phantoms.make_phantom_dataset` takes as ``generator``)."""
    case = make_hard_cardiac_case(seed, **kwargs)  # type: ignore[arg-type]
    return case.image, case.labels
