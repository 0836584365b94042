"""Weak augmentation of labeled slices (--weak-views): views transform image and labels together
(bilinear / nearest), are seeded, give prompts from their own labels, and reach both trainers.

SAM-2.1 tiny at random init with a 64 px input (tests/conftest.py), so embeddings take ~0.1 s.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from sss_lib.embedding_cache import EmbeddingStore
from sss_lib.engine import SegmentationSession
from sss_lib.phantoms import make_phantom_dataset
from sss_lib.preprocess import Preprocessing
from sss_lib.trainer import TrainConfig, train_task_model
from sss_lib.trainer.data import IGNORE, LabeledCase
from sss_lib.trainer.labeled_aug import make_weak_views, training_set
from sss_lib.trainer.samples import ClassIndex, PromptJitter, key_prompt
from sss_lib.volume import Volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Image intensity of each label value in the coded case (labels 0-3).
LEVELS = np.array([0.1, 0.4, 0.7, 1.0], np.float32)


def coded_case(backbone, n_slices: int = 3, size: int = 40) -> LabeledCase:
    """A case whose image is a function of its labels (a disc and two boxes), so that a view's
    image can be checked against its labels pixel by pixel."""
    yy, xx = np.mgrid[:size, :size]
    lab = np.zeros((size, size), np.int16)
    lab[(yy - 20) ** 2 + (xx - 14) ** 2 < 49] = 1
    lab[6:14, 24:36] = 2
    lab[26:36, 26:33] = 3
    stack = np.repeat(lab[None], n_slices, axis=0)
    image = Volume(LEVELS[stack] * 1000.0, (1.0, 1.0, 4.0), (0.0, 0.0, 0.0), np.eye(3), "coded")
    session = SegmentationSession(image, backbone, preprocessing=Preprocessing("CT", (0.0, 1000.0)),
                                  store=EmbeddingStore())
    labels = session.slice_axis.to_stack(stack)  # stack order is [k, j, i] already
    return LabeledCase("coded", image, image.with_voxels(stack.astype(np.float32)), session, labels.astype(np.int16))


def test_views_move_image_and_labels_together(backbone):
    case = coded_case(backbone)
    np.testing.assert_allclose(case.session.slices[0], LEVELS[case.labels[0]], atol=1e-6)  # the coding holds
    views = make_weak_views([case], backbone, 3, seed=5)
    assert [v.case_id for v in views] == ["coded~weak0", "coded~weak1", "coded~weak2"]
    for view in views:
        img, lab = view.session.slices, view.labels
        assert img.shape == case.session.slices.shape and lab.shape == case.labels.shape
        assert not np.array_equal(lab, case.labels)  # something moved
        assert set(np.unique(lab).tolist()) <= {IGNORE, 0, 1, 2, 3}  # nearest: no new label values
        # Inside a region (not at its border, where bilinear mixes neighbours) the image is the
        # intensity of the label found there: same geometry for both.
        for s in range(lab.shape[0]):
            interior = np.any([ndimage.binary_erosion(lab[s] == v, np.ones((5, 5)), border_value=1)
                               for v in (IGNORE, 0, 1, 2, 3)], axis=0)
            inside = interior & (lab[s] >= 0)
            assert inside.sum() > 200
            np.testing.assert_allclose(img[s][inside], LEVELS[lab[s][inside]], atol=0.02)
            outside = interior & (lab[s] == IGNORE)
            assert np.all(img[s][outside] == 0)  # the border from outside the slice is 0, labels IGNORE
        # One geometry per view: every slice of it moved the same way.
        assert all(np.array_equal(lab[0], lab[s]) for s in range(1, lab.shape[0]))
        # A view's pixels are 1/zoom of the case's.
        assert view.spacing_xy == pytest.approx(tuple(v / float(view.params.scale[0]) for v in case.spacing_xy))


def test_views_are_seeded(backbone):
    case = coded_case(backbone)
    a, b = (make_weak_views([case], backbone, 2, seed=1) for _ in range(2))
    c = make_weak_views([case], backbone, 2, seed=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.labels, y.labels)
        np.testing.assert_array_equal(x.session.slices, y.session.slices)
        assert x.session.key == y.session.key
    assert not np.array_equal(a[0].labels, c[0].labels)
    assert a[0].session.key != c[0].session.key  # a shared store can never confuse two views


def test_prompts_come_from_the_views_labels(backbone):
    case = coded_case(backbone)
    view = make_weak_views([case], backbone, 1, seed=3)[0]
    rng = np.random.default_rng(0)
    jitter = PromptJitter(box_margin_px=0, box_jitter_fraction=0.0, drop_negatives=1.0)
    for label in (1, 2, 3):
        box, pos, _ = key_prompt(view.labels[0], label, rng, jitter)
        ys, xs = np.nonzero(view.labels[0] == label)
        assert box == pytest.approx((xs.min(), ys.min(), xs.max(), ys.max()))
        x, y = pos[0]
        assert view.labels[0][int(y), int(x)] == label
    index = ClassIndex.build([view.labels], [1, 2, 3])
    assert all(index.present[lbl] for lbl in (1, 2, 3))


def test_training_set_embeds_each_view_once(backbone):
    case = coded_case(backbone)
    config = TrainConfig(Path("unused"), Path("unused.ssstask"), weak_views=2, seed=7)
    events = []
    cases = training_set([case], config, backbone, progress=lambda done, total, msg: events.append((done, total)))
    assert len(cases) == 3 and cases[0] is case
    assert events[-1] == (6, 6)  # 2 views x 3 slices, embedded now
    view = cases[1]
    computed = view.session.store.computed
    emb = view.session.embedding(0)
    assert view.session.store.computed == computed  # served from the store, not embedded again
    import torch

    direct = backbone.embed_slice(view.session.slices[0])
    for f, g in zip(emb.features, direct.features):
        torch.testing.assert_close(f, g)
    off = training_set([case], TrainConfig(Path("unused"), Path("unused.ssstask")), backbone)
    assert off == [case]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("phantoms"), 2, seed=3, n_slices=4, size=(40, 40),
                                spacing=(3.0, 3.0, 8.0))


def test_both_trainers_train_on_the_views(dataset, backbone, tmp_path):
    """Same seed, views on vs off: different weights (the switch is read), the model says so."""
    from sss_lib.runs.progress import ProgressReporter
    from sss_lib.trainer.semisup_config import SemiSupConfig
    from sss_lib.trainer.semisup_loop import run_training

    def supervised(views: int):
        cfg = TrainConfig(dataset, tmp_path / f"sup{views}.ssstask", iterations=3, seed=2, head_batch=2,
                          decoder_batch=1, head_width=16, val_cases=(), weak_views=views)
        return train_task_model(cfg, backbone=backbone).model

    def via_run(views: int):
        cfg = TrainConfig(dataset, tmp_path / "unused.ssstask", iterations=3, seed=2, head_batch=2, decoder_batch=1,
                          head_width=16, val_cases=(), weak_views=views)
        run = SemiSupConfig(train=cfg, run_dir=tmp_path / f"run{views}", consistency=False, checkpoint_every=3)
        reporter = ProgressReporter(3, json_lines=False, console_view=False)
        outcome = run_training(run, backbone=backbone, reporter=reporter)
        from sss_lib.task_model import load_task_model

        return load_task_model(outcome.model_path)

    for train in (supervised, via_run):
        off, on = train(0), train(2)
        assert "weak views per labeled case: 2" in on.training.notes
        assert "weak views per labeled case: 0" in off.training.notes
        differs = [k for k, v in on.weights["coarse_head"].items()
                   if not np.array_equal(np.asarray(v), np.asarray(off.weights["coarse_head"][k]))]
        assert differs, f"{train.__name__}: weak views on trained the same weights as off"


def test_command_line_switches(tmp_path):
    from sss_lib.trainer.run import add_train_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    base = ["--labeled", str(tmp_path / "lab"), "--run-dir", str(tmp_path / "run")]
    off = config_from_args(parser.parse_args(base)).train
    assert off.weak_views == 0 and off.encoder_blocks == 0 and off.encoder_lora_rank == 0
    on = config_from_args(parser.parse_args(base + ["--weak-views", "2", "--encoder-blocks", "2",
                                                    "--encoder-lora-rank", "4", "--lr-encoder", "3e-4"])).train
    assert (on.weak_views, on.encoder_blocks, on.encoder_lora_rank, on.lr_encoder) == (2, 2, 4, 3e-4)
    with pytest.raises(ValueError, match="weak_views"):
        TrainConfig(tmp_path, tmp_path / "m.ssstask", weak_views=-1)
