"""Seeded strong/weak augmentations and CutMix on hand-built tensors."""

from __future__ import annotations

import pytest
import torch

from sss_lib.semisup import StrongAugment, WeakAugment, apply_cutmix, cutmix, cutmix_boxes
from sss_lib.semisup.strong import equalize, gaussian_blur, posterize, solarize_fold

torch.set_num_threads(1)


def _ramp_images(batch: int = 4, h: int = 24, w: int = 32) -> torch.Tensor:
    """(B, 1, H, W) images in [0, 1], each different and asymmetric (so any motion shows)."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    base = (xs + 2 * ys).float() / (w + 2 * h)
    return torch.stack([(base + 0.1 * i) % 1.0 for i in range(batch)]).unsqueeze(1)


# -- strong ----------------------------------------------------------------------------------------

def test_strong_same_seed_same_output_and_range() -> None:
    x = _ramp_images()
    aug = StrongAugment(jitter_p=1.0, grey_p=0.5, blur_p=0.5)
    a, b = aug(x, 7), aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, 8))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert aug(x[:, 0], 7).shape == x[:, 0].shape  # (B, H, W) in, (B, H, W) out
    torch.testing.assert_close(aug(x[:, 0], 7), a[:, 0])


def test_strong_all_off_is_identity() -> None:
    x = _ramp_images()
    assert torch.equal(StrongAugment(jitter_p=0.0, grey_p=0.0, blur_p=0.0)(x, 0), x)


def test_strong_views_differ_per_sample() -> None:
    x = _ramp_images(batch=1).expand(6, 1, 24, 32).contiguous()
    y = StrongAugment(jitter_p=1.0)(x, 3)
    assert len({tuple(v.flatten()[:50].tolist()) for v in y}) == 6


def test_grey_level_transforms_on_hand_built_values() -> None:
    x = torch.tensor([0.0, 0.1, 0.49, 0.5, 0.74, 0.76, 1.0]).view(1, 1, 1, 7)
    # Two bits: four levels 0, 1/3, 2/3, 1 (floor(4x), top bin closed).
    torch.testing.assert_close(posterize(x, torch.tensor([2])).flatten(),
                               torch.tensor([0, 0, 1 / 3, 2 / 3, 2 / 3, 1, 1]))
    # Fold above 0.75: 0.76 -> 0.74, 1 -> 0.5, the rest unchanged.
    torch.testing.assert_close(solarize_fold(x, torch.tensor([0.75])).flatten(),
                               torch.tensor([0.0, 0.1, 0.49, 0.5, 0.74, 0.74, 0.5]))
    # Equalize: a dark, low-contrast image is spread over [0, 1], order preserved.
    dark = torch.tensor([0.10, 0.10, 0.12, 0.12, 0.14, 0.16]).view(1, 1, 2, 3)
    eq = equalize(dark).flatten()
    assert eq.min() == 0 and eq.max() == 1 and torch.all(eq[1:] >= eq[:-1])
    flat = torch.full((1, 1, 4, 4), 0.3)
    assert torch.equal(equalize(flat), flat)


def test_blur_keeps_mean_and_smooths_a_spike() -> None:
    x = torch.zeros(2, 1, 15, 15)
    x[:, :, 7, 7] = 1.0
    y = gaussian_blur(x, torch.tensor([0.5, 2.0]))
    assert y[0, 0, 7, 7] > y[1, 0, 7, 7] > 0  # the wider sigma spreads more
    torch.testing.assert_close(y.sum(dim=(1, 2, 3)), torch.ones(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(y[1, 0], y[1, 0].T)  # isotropic


# -- weak ------------------------------------------------------------------------------------------

def test_weak_flip_moves_labels_with_images() -> None:
    x = _ramp_images()
    labels = (x[:, 0] * 5).long()
    aug = WeakAugment(scale=(1.0, 1.0), max_shift=0.0, max_rotation_deg=0.0, hflip_p=0.5, vflip_p=0.5)
    params = aug.draw(4, 11)
    assert params.hflip.any() and (~params.hflip).any()  # this seed exercises both branches
    xi, yl = aug.apply(x, labels, params)
    for i in range(4):
        ex, el = x[i, 0], labels[i]
        if params.hflip[i]:
            ex, el = ex.flip(-1), el.flip(-1)
        if params.vflip[i]:
            ex, el = ex.flip(-2), el.flip(-2)
        assert torch.equal(xi[i, 0], ex) and torch.equal(yl[i], el)


def test_weak_geometry_identical_for_image_and_label() -> None:
    """With nearest sampling for both, the transformed image *is* the transformed label where the
    label is not the out-of-slice border."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (3, 20, 28), generator=g)
    labels[:, 5:12, 8:20] = 3  # some structure
    images = labels.float() / 3
    aug = WeakAugment(max_rotation_deg=20.0, scale=(0.7, 0.9), max_shift=0.15, image_mode="nearest")
    xi, yl = aug(images, labels, 5)
    assert xi.shape == images.shape and yl.shape == labels.shape and yl.dtype == labels.dtype
    inside = yl >= 0
    assert (~inside).any(), "a zoom-out must show the outside of the slice"
    assert torch.equal(xi[inside] * 3, yl[inside].float())
    assert (xi[~inside] == 0).all()
    assert set(yl.unique().tolist()) <= {-1, 0, 1, 2, 3}
    assert not torch.equal(yl, labels)  # it did move


def test_weak_bilinear_image_follows_label_centroid() -> None:
    img = torch.zeros(1, 1, 40, 40)
    img[0, 0, 8:16, 24:34] = 1.0
    lab = (img[:, 0] > 0.5).long()
    aug = WeakAugment(max_rotation_deg=15.0, scale=(0.9, 1.1), max_shift=0.1)
    xi, yl = aug(img, lab, 21)
    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    w = xi[0, 0]
    m = (yl[0] == 1).float()
    c_img = torch.stack([(w * ys).sum() / w.sum(), (w * xs).sum() / w.sum()])
    c_lab = torch.stack([(m * ys).sum() / m.sum(), (m * xs).sum() / m.sum()])
    assert torch.allclose(c_img, c_lab, atol=0.6), (c_img, c_lab)


def test_weak_same_seed_same_output_and_border_is_ignored() -> None:
    x = _ramp_images()
    labels = torch.ones(4, 24, 32, dtype=torch.long)
    aug = WeakAugment(scale=(0.6, 0.7), max_rotation_deg=10.0, ignore_index=255)
    a = aug(x, labels, 4)
    b = aug(x, labels, 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], aug(x, labels, 5)[0])
    # A zoom-out shows the outside of the slice: label 255 there, image 0.
    assert (a[1] == 255).any() and set(a[1].unique().tolist()) == {1, 255}
    assert aug(x, None, 4)[1] is None


# -- CutMix ----------------------------------------------------------------------------------------

def test_cutmix_label_region_comes_from_the_same_slice_as_the_image() -> None:
    b, h, w = 4, 16, 20
    # Each slice has a constant image value i / 10 and label i, and confidence 10 + i.
    images = torch.arange(b).float().view(b, 1, 1, 1).expand(b, 1, h, w) / 10
    labels = torch.arange(b).view(b, 1, 1).expand(b, h, w).clone()
    conf = 10.0 + labels.float()
    r = cutmix(images, labels, conf, 123, p=1.0)
    assert r.box.shape == (b, h, w) and r.box.dtype == torch.bool
    assert (r.partner != torch.arange(b)).all()
    assert sorted(r.partner.tolist()) == list(range(b))  # a pairing, every slice lends once
    for i in range(b):
        j = int(r.partner[i])
        assert r.box[i].any()
        assert (r.images[i, 0][r.box[i]] == j / 10).all() and (r.images[i, 0][~r.box[i]] == i / 10).all()
        assert (r.pseudo_labels[i][r.box[i]] == j).all() and (r.pseudo_labels[i][~r.box[i]] == i).all()
        assert (r.confidence[i][r.box[i]] == 10 + j).all()
        # The box is one axis-aligned rectangle.
        rows, cols = r.box[i].any(1).nonzero(), r.box[i].any(0).nonzero()
        assert r.box[i].sum() == len(rows) * len(cols)
    # The pixels of the mixed label say where the image came from, pixel by pixel.
    assert torch.equal(r.pseudo_labels.float() / 10, r.images[:, 0])


def test_cutmix_seeded_and_probability() -> None:
    images = torch.rand(6, 12, 12, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(6, 12, 12, dtype=torch.long)
    conf = torch.ones(6, 12, 12, dtype=torch.bool)
    a, b = cutmix(images, labels, conf, 9), cutmix(images, labels, conf, 9)
    assert torch.equal(a.box, b.box) and torch.equal(a.images, b.images) and torch.equal(a.partner, b.partner)
    none = cutmix(images, labels, conf, 9, p=0.0)
    assert not none.box.any() and torch.equal(none.images, images)
    single = cutmix(images[:1], labels[:1], conf[:1], 9, p=1.0)
    assert not single.box.any()
    # The same boxes mix any other per-pixel map (e.g. the second strong view's images).
    box, partner = cutmix_boxes(6, 12, 12, 9, p=0.5)
    assert torch.equal(box, a.box) and torch.equal(apply_cutmix(images, box, partner), a.images)
    with pytest.raises(ValueError, match="pseudo_labels"):
        cutmix(images, labels[:, :5], conf, 0)
