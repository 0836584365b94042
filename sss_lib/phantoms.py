"""Seeded synthetic cardiac-like phantoms (short-axis cine MR look-alikes) and datasets of them.

A phantom is a short-axis stack of ``S`` slices with three classes, as in ACDC:
``1 = RV`` (a crescent wrapped around the septum), ``2 = Myo`` (the LV wall, a ring) and
``3 = LV`` (the blood pool inside the ring). Slice 0 is the base unless the case is flipped;
towards the apex the heart shrinks, the LV cavity closes into a myocardial cap and the RV ends
first. Every case draws its own position, rotation, radii, wall thickness, intensities, noise
level and bias field from its seed, and the shapes change smoothly from slice to slice, so a
propagation model and PCSW's continuity tests see something like real anatomy.

Arrays are ``[k, j, i]`` (see :mod:`sss_lib.volume`); geometry is LPS. Sizes are in voxels along
``(i, j)`` and spacings in mm along ``(i, j, k)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from .volume import Volume

log = logging.getLogger(__name__)

CLASS_NAMES: dict[int, str] = {1: "RV", 2: "Myo", 3: "LV"}
#: RGB colours per label (RV blue, Myo green, LV red: the usual ACDC figure colours).
CLASS_COLORS: dict[int, tuple[int, int, int]] = {1: (70, 130, 230), 2: (90, 200, 110), 3: (230, 80, 60)}

Phase = Literal["ED", "ES"]
Layout = Literal["nnunet", "plain", "acdc"]

# The default field of view (128 px x 1.5 mm) holds a full-size heart; smaller grids scale the
# anatomy down so tiny test phantoms still contain every class.
_REFERENCE_FOV_MM = 190.0


@dataclasses.dataclass(frozen=True)
class _Heart:
    """Per-case anatomy and appearance, drawn once from the seed (lengths in mm, angles in rad)."""

    n_slices: int
    flip: bool  # True: slice 0 is the apex
    centre: np.ndarray  # (2,) mm in the slice plane, at the base
    drift: np.ndarray  # (2,) mm the centre moves from base to apex
    angle: float  # direction from the LV centre to the RV, at the base
    twist: float  # rotation from base to apex
    r_cavity: float  # LV cavity radius at the base (ED)
    wall: float  # myocardial thickness at the base (ED)
    rv_offset: float  # RV circle centre distance, as a fraction of the epicardial radius
    rv_radius: float  # RV circle radius, as a fraction of the epicardial radius
    t_apex: float  # where the LV would close (> 1: a small cap remains on the last slice)
    t_rv: float  # where the RV ends, as a fraction of the stack
    ellipticity: float
    ellipse_angle: float
    lobes: float  # three-lobed irregularity of the boundaries
    lobe_phase: float
    wobble: float  # slice-to-slice radius modulation amplitude
    wobble_phase: float
    papillary: np.ndarray  # (2, 2): angle and radial fraction of two papillary muscles
    body_axes: np.ndarray  # (2,) semi-axes of the thorax ellipse, mm
    body_centre: np.ndarray  # (2,) mm
    intensities: dict[str, float]
    noise: float  # Rician sigma as a fraction of the blood intensity
    bias: np.ndarray  # (6,) quadratic bias-field coefficients
    texture_seed: int


def _draw_heart(rng: np.random.Generator, n_slices: int | None, fov: np.ndarray) -> _Heart:
    scale = min(1.0, float(fov.min()) / _REFERENCE_FOV_MM)
    s = int(n_slices) if n_slices is not None else int(rng.integers(8, 17))
    gain = float(rng.uniform(0.5, 3.0))  # MR intensities have no absolute unit
    intensities = {
        "air": 4.0,
        "lung": float(rng.uniform(15, 35)),
        "body": float(rng.uniform(90, 140)),
        "fat": float(rng.uniform(150, 200)),
        "myo": float(rng.uniform(55, 85)),
        "blood_lv": float(rng.uniform(220, 300)),
    }
    intensities["blood_rv"] = intensities["blood_lv"] * float(rng.uniform(0.85, 1.05))
    intensities = {k: v * gain for k, v in intensities.items()}
    fov_centre = fov / 2.0
    return _Heart(
        n_slices=s,
        flip=bool(rng.random() < 0.3),
        centre=fov_centre + rng.uniform(-0.08, 0.08, 2) * fov,
        drift=rng.uniform(-8, 8, 2) * scale,
        angle=float(rng.uniform(0, 2 * np.pi)),
        twist=float(rng.uniform(-0.3, 0.3)),
        r_cavity=float(rng.uniform(19, 27)) * scale,
        wall=float(rng.uniform(6, 10)) * scale,
        rv_offset=float(rng.uniform(0.75, 0.95)),
        rv_radius=float(rng.uniform(1.15, 1.4)),
        t_apex=float(rng.uniform(1.03, 1.15)),
        t_rv=float(rng.uniform(0.6, 0.9)),
        ellipticity=float(rng.uniform(0.0, 0.08)),
        ellipse_angle=float(rng.uniform(0, np.pi)),
        lobes=float(rng.uniform(0.0, 0.03)),
        lobe_phase=float(rng.uniform(0, 2 * np.pi)),
        wobble=float(rng.uniform(0.0, 0.05)),
        wobble_phase=float(rng.uniform(0, 2 * np.pi)),
        papillary=np.stack([rng.uniform(0, 2 * np.pi, 2), rng.uniform(0.45, 0.7, 2)], axis=1),
        body_axes=np.array([rng.uniform(0.40, 0.48), rng.uniform(0.30, 0.38)]) * fov,
        body_centre=fov_centre + rng.uniform(-0.03, 0.03, 2) * fov,
        intensities=intensities,
        noise=float(rng.uniform(0.02, 0.06)),
        bias=rng.uniform(-0.25, 0.25, 6),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _shape_factor(h: _Heart, phi: np.ndarray, t: float) -> np.ndarray:
    """Multiplicative radius modulation by polar angle ``phi`` (irregular, slightly elliptic)."""
    return (
        1.0
        + h.ellipticity * np.cos(2 * (phi - h.ellipse_angle))
        + h.lobes * np.cos(3 * (phi - h.lobe_phase))
        + h.wobble * np.sin(2 * np.pi * 1.3 * t + h.wobble_phase)
    )


def _render_slice(
    h: _Heart, t: float, xx: np.ndarray, yy: np.ndarray, phase: Phase
) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``uint8 (H, W)`` and noiseless intensities ``float32 (H, W)`` of the slice at depth
    ``t`` (0 = base, 1 = apex); ``xx``/``yy`` are the pixel centres in mm."""
    inten = h.intensities
    centre = h.centre + h.drift * t
    theta = h.angle + h.twist * t
    dx, dy = xx - centre[0], yy - centre[1]
    rho = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    mod = _shape_factor(h, phi, t)

    # The LV is roughly a half-ellipsoid: radii fall like sqrt(1 - (t/t_apex)^2).
    f = float(np.sqrt(max(0.0, 1.0 - (t / h.t_apex) ** 2)))
    contraction = 0.68 if phase == "ES" else 1.0
    r_cav = h.r_cavity * contraction * f**1.2
    wall = h.wall * (1.35 if phase == "ES" else 1.0) * (0.75 + 0.25 * f)
    r_epi = r_cav + wall
    cavity = rho < r_cav * mod
    epi = rho < r_epi * mod

    labels = np.zeros(xx.shape, np.uint8)
    img = np.full(xx.shape, inten["air"], np.float32)

    # RV: inside a circle beside the LV, outside the epicardium -> a crescent around the septum.
    # It shrinks faster than the LV and ends before the apex.
    g = float(np.sqrt(max(0.0, 1.0 - (t / h.t_rv) ** 2))) if t < h.t_rv else 0.0
    rv_c = centre + h.rv_offset * r_epi * np.array([np.cos(theta), np.sin(theta)])
    # At g = 0 the circle touches the epicardium from inside, so the crescent thins to nothing.
    reach = (1.0 - h.rv_offset) + (h.rv_radius - 1.0 + h.rv_offset) * g * (0.9 if phase == "ES" else 1.0)
    rv_rho = np.hypot(xx - rv_c[0], yy - rv_c[1])
    rv = (rv_rho < r_epi * reach * mod) & ~epi
    if rv.sum() < 4:  # a sliver of a pixel or two is noise, not an RV
        rv[:] = False
    # The thin RV free wall and the pericardial fat are visible but unlabeled, as in ACDC.
    rv_wall = (rv_rho < r_epi * reach * mod + 2.5) & ~epi & ~rv if rv.any() else np.zeros_like(rv)
    fat = ((rho < r_epi * mod + 4.0) | (rv_wall & (rv_rho < r_epi * reach * mod + 5.0))) & ~epi

    # Thorax: body ellipse and two lungs, then the heart drawn over them.
    bx = (xx - h.body_centre[0]) / h.body_axes[0]
    by = (yy - h.body_centre[1]) / h.body_axes[1]
    body = bx**2 + by**2 < 1.0
    img[body] = inten["body"]
    for side in (-1.0, 1.0):
        lx = (xx - (h.body_centre[0] + side * 0.5 * h.body_axes[0])) / (0.38 * h.body_axes[0])
        ly = (yy - (h.body_centre[1] - 0.1 * h.body_axes[1])) / (0.6 * h.body_axes[1])
        img[body & (lx**2 + ly**2 < 1.0)] = inten["lung"]
    img[fat] = inten["fat"]
    img[rv_wall] = inten["myo"]
    labels[rv] = 1
    img[rv] = inten["blood_rv"]

    myo = epi & ~cavity
    labels[myo] = 2
    img[myo] = inten["myo"]
    labels[cavity] = 3
    img[cavity] = inten["blood_lv"]
    # Papillary muscles: dark spots in the cavity that ACDC counts as LV.
    for ang, frac in h.papillary:
        pc = centre + frac * r_cav * np.array([np.cos(ang + theta), np.sin(ang + theta)])
        pm = cavity & (np.hypot(xx - pc[0], yy - pc[1]) < 0.18 * r_cav)
        img[pm] = inten["myo"] * 1.1
    return labels, img


def _random_rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    """A proper rotation about a random axis by at most ``max_angle`` radians."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    a = float(rng.uniform(0.3, 1.0)) * max_angle
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)


def make_cardiac_phantom(
    seed: int,
    *,
    n_slices: int | None = None,
    size: tuple[int, int] = (128, 128),
    spacing: tuple[float, float, float] = (1.5, 1.5, 8.0),
    oblique: bool = False,
    phase: Phase = "ED",
) -> tuple[Volume, Volume]:
    """One synthetic short-axis cardiac volume and its labels.

    Args:
        seed: the case; the same seed always gives the same volumes.
        n_slices: number of slices ``S``; None draws 8-16 from the seed.
        size: in-plane voxels along ``(i, j)``; the arrays are ``(S, size[1], size[0])``.
        spacing: mm along ``(i, j, k)``.
        oblique: rotate the direction matrix by a random angle (up to 45 degrees), as real
            short-axis stacks are; False gives the identity (axial LPS) directions.
        phase: "ES" draws the same heart contracted (smaller cavities, thicker wall).

    Returns:
        ``(image, labels)`` on the same grid: ``image`` float32 MR-like intensities (arbitrary
        units, Rician noise, smooth multiplicative bias field, slight partial-volume blur),
        ``labels`` uint8 with 0 background and :data:`CLASS_NAMES`.
    """
    from scipy import ndimage

    if len(size) != 2 or min(size) < 8:
        raise ValueError(f"size must be two in-plane voxel counts of at least 8, got {size}")
    if n_slices is not None and n_slices < 2:
        raise ValueError(f"n_slices must be at least 2, got {n_slices}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5555]))
    nx, ny = int(size[0]), int(size[1])
    sp = np.asarray(spacing, dtype=float)
    fov = np.array([nx * sp[0], ny * sp[1]])
    h = _draw_heart(rng, n_slices, fov)
    s = h.n_slices

    xx, yy = np.meshgrid((np.arange(nx) + 0.5) * sp[0], (np.arange(ny) + 0.5) * sp[1])
    labels = np.zeros((s, ny, nx), np.uint8)
    clean = np.zeros((s, ny, nx), np.float32)
    for k in range(s):
        t = k / (s - 1)
        depth = 1.0 - t if h.flip else t
        labels[k], clean[k] = _render_slice(h, depth, xx, yy, phase)

    # Tissue texture, partial-volume blur (in plane only: slices are thick), bias field, noise.
    tex_rng = np.random.default_rng(h.texture_seed)
    texture = ndimage.gaussian_filter(tex_rng.normal(size=clean.shape), (0.7, 3.0, 3.0))
    texture /= max(float(texture.std()), 1e-6)
    img = clean * (1.0 + 0.06 * texture.astype(np.float32))
    img = ndimage.gaussian_filter(img, (0.0, 0.6, 0.6))
    u = (xx / fov[0] - 0.5)[None]
    v = (yy / fov[1] - 0.5)[None]
    w = (np.arange(s) / max(s - 1, 1) - 0.5)[:, None, None]
    c = h.bias
    bias = np.exp(c[0] * u + c[1] * v + c[2] * w + c[3] * u * u + c[4] * v * v + c[5] * u * v)
    img = img * bias.astype(np.float32)
    sigma = h.noise * h.intensities["blood_lv"]
    n1 = tex_rng.normal(scale=sigma, size=img.shape)
    n2 = tex_rng.normal(scale=sigma, size=img.shape)
    img = np.sqrt((img + n1) ** 2 + n2**2).astype(np.float32)

    direction = _random_rotation(rng, np.deg2rad(45)) if oblique else np.eye(3)
    extent = sp * (np.array([nx, ny, s]) - 1)
    origin = -direction @ (extent / 2.0) + rng.uniform(-20, 20, 3)
    image = Volume(img, sp, origin, direction, f"phantom:{seed}:{phase}")
    lab = Volume(labels, sp.copy(), origin.copy(), direction.copy(), f"phantom:{seed}:{phase}:labels")
    return image, lab


def make_phantom_dataset(
    folder: str | Path,
    n_cases: int,
    seed: int,
    *,
    layout: Layout = "nnunet",
    labeled: bool | int = True,
    n_slices: int | None = None,
    size: tuple[int, int] = (128, 128),
    spacing: tuple[float, float, float] = (1.5, 1.5, 8.0),
    oblique: bool = False,
    generator: Callable[..., tuple[Volume, Volume]] | None = None,
    generator_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write ``n_cases`` phantoms as a dataset in one of the layouts :mod:`sss_lib.datasets` reads.

    Layouts (case ids ``case_000``, ``case_001``, ...; ACDC uses ``patient001``, ...):
        * ``"nnunet"``: nnU-Net v2 raw: ``dataset.json``, ``imagesTr/CASE_0000.nii.gz``,
          ``labelsTr/CASE.nii.gz``; unlabeled cases go to ``imagesTs/``.
        * ``"plain"``: ``images/CASE.nii.gz`` and ``labels/CASE.nii.gz`` (labeled cases only).
        * ``"acdc"``: ``patientNNN/patientNNN_frameMM.nii.gz`` (ED and ES frames) with
          ``_gt`` labels and an ``Info.cfg``; unlabeled patients have no ``_gt`` files.

    Args:
        folder: created if missing; existing files with the same names are overwritten.
        n_cases: number of cases (ACDC: patients).
        seed: dataset seed; case ``c`` uses seed ``seed * 1000 + c``.
        labeled: True (all), False (none) or the number of leading cases that get labels.
        n_slices, size, spacing, oblique: passed to :func:`make_cardiac_phantom`.
        generator: another case maker, called ``generator(case_seed, phase=..., **generator_kwargs)``
            and returning ``(image, labels)`` (e.g.
            :func:`sss_lib.phantoms_cardiac.make_hard_cardiac_phantom`); then ``n_slices``,
            ``size``, ``spacing`` and ``oblique`` are not used.

    Returns:
        The dataset folder.
    """
    from .volume_io import write_volume

    if n_cases < 1:
        raise ValueError("n_cases must be at least 1")
    n_labeled = n_cases if labeled is True else 0 if labeled is False else int(labeled)
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = dict(n_slices=n_slices, size=size, spacing=spacing, oblique=oblique)
    make: Callable[..., tuple[Volume, Volume]] = make_cardiac_phantom
    if generator is not None:
        make, kw = generator, dict(generator_kwargs or {})

    for c in range(n_cases):
        case_seed = seed * 1000 + c
        has_label = c < n_labeled
        if layout == "acdc":
            pid = f"patient{c + 1:03d}"
            pdir = root / pid
            pdir.mkdir(exist_ok=True)
            frames = {"ED": 1, "ES": 1 + 8 + c % 5}
            for phase, frame in frames.items():
                image, lab = make(case_seed, phase=phase, **kw)
                stem = f"{pid}_frame{frame:02d}"
                write_volume(image, pdir / f"{stem}.nii.gz")
                if has_label:
                    write_volume(lab, pdir / f"{stem}_gt.nii.gz")
            (pdir / "Info.cfg").write_text(
                f"ED: {frames['ED']}\nES: {frames['ES']}\nGroup: NOR\nHeight: 175.0\n"
                f"NbFrame: {frames['ES'] + 10}\nWeight: 70.0\n"
            )
            continue
        image, lab = make(case_seed, **kw)
        cid = f"case_{c:03d}"
        if layout == "nnunet":
            sub = "imagesTr" if has_label else "imagesTs"
            (root / sub).mkdir(exist_ok=True)
            write_volume(image, root / sub / f"{cid}_0000.nii.gz")
            if has_label:
                (root / "labelsTr").mkdir(exist_ok=True)
                write_volume(lab, root / "labelsTr" / f"{cid}.nii.gz")
        elif layout == "plain":
            (root / "images").mkdir(exist_ok=True)
            write_volume(image, root / "images" / f"{cid}.nii.gz")
            if has_label:
                (root / "labels").mkdir(exist_ok=True)
                write_volume(lab, root / "labels" / f"{cid}.nii.gz")
        else:
            raise ValueError(f"unknown layout {layout!r}; use nnunet, plain or acdc")

    if layout == "nnunet":
        meta = {
            "name": "SSSPhantomCardiac",
            "description": "Synthetic short-axis cardiac phantoms made by sss_lib.phantoms",
            "channel_names": {"0": "cineMRI"},
            "labels": {"background": 0, **{name: value for value, name in CLASS_NAMES.items()}},
            "numTraining": n_labeled,
            "file_ending": ".nii.gz",
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("wrote %d phantom cases (%d labeled) to %s as %s", n_cases, n_labeled, root, layout)
    return root
