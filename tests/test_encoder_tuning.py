"""The image encoder's last blocks trained with the task (--encoder-blocks, --encoder-lora-rank):
the split reproduces the encoder, the task model carries the blocks, Auto-segment runs them (and a
reloaded model reproduces it), embedding-cache keys follow the weights, and a model without them
gives the backbone its own encoder back.

SAM-2.1 tiny at random init with a 64 px input (tests/conftest.py) for most; one LiteMedSAM run end
to end on a 2-slice case (its encoder is the expensive part: ~12 encoder passes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from sss_lib.auto_segment import AutoSegmentSession, TaskRuntime
from sss_lib.embedding_cache import EmbeddingStore
from sss_lib.errors import InputError
from sss_lib.phantoms import make_phantom_dataset
from sss_lib.task_model import EncoderTuning, TaskModel, load_task_model, save_task_model
from sss_lib.trainer import TrainConfig, train_task_model
from sss_lib.trainer.encoder_tuning import apply_task_encoder, build_tail, install_tuned, uninstall_tuned
from sss_lib.volume_io import read_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("phantoms"), 2, seed=3, n_slices=4, size=(40, 40),
                                spacing=(3.0, 3.0, 8.0))


def untuned(model: TaskModel) -> TaskModel:
    """The same task model without its encoder blocks."""
    return dataclasses.replace(model, encoder_tuning=None,
                               weights={k: v for k, v in model.weights.items() if k != "image_encoder"})


def probabilities(model: TaskModel, backbone, image, store: EmbeddingStore | None = None) -> np.ndarray:
    runtime = TaskRuntime.from_task_model(model, backbone=backbone)
    probs = AutoSegmentSession(image, runtime, store=store or EmbeddingStore()).probabilities()
    return np.stack([probs[k] for k in sorted(probs)])


@pytest.mark.parametrize("tuning", [EncoderTuning(1), EncoderTuning(4), EncoderTuning(2, 4, 8.0)])
def test_an_untrained_tail_reproduces_the_encoder(backbone, tuning):
    img = np.random.default_rng(0).random((40, 48)).astype(np.float32)
    base_key = backbone.cache_key()
    before = backbone.embed_slice(img)
    split, tail = build_tail(backbone, tuning)
    install_tuned(backbone, split, tail)
    try:
        tuned_key = backbone.cache_key()
        assert tuned_key != base_key and f"+tuned{tuning.blocks}-" in tuned_key
        after = backbone.embed_slice(img)
        for f, g in zip(before.features, after.features):
            torch.testing.assert_close(g.float(), f.float(), atol=2e-5, rtol=1e-4)
        trainable = {n for n, p in tail.named_parameters() if p.requires_grad}
        if tuning.lora_rank:
            assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
        else:
            assert trainable == {n for n, _ in tail.named_parameters()}
        with torch.no_grad():  # another weight, another cache key
            next(iter(tail.parameters())).add_(1.0)
        assert backbone.cache_key() != tuned_key and backbone.cache_key().startswith(base_key)
    finally:
        uninstall_tuned(backbone)
    assert backbone.cache_key() == base_key


def test_blocks_out_of_range(backbone):
    n = len(backbone.model.image_encoder.trunk.blocks)
    with pytest.raises(ValueError, match=rf"must lie in 1\.\.{n}"):
        build_tail(backbone, EncoderTuning(n + 1))


def check_model_runs_its_blocks(model: TaskModel, backbone, image, tmp_path: Path) -> None:
    """Auto-segment with the blocks differs from without them; a reloaded file reproduces it; a model
    without blocks gives the backbone its own encoder back."""
    base_key = backbone.cache_key()
    assert model.encoder_tuning is not None and model.weights["image_encoder"]
    store = EmbeddingStore()
    with_blocks = probabilities(model, backbone, image, store)
    tuned_key = backbone.cache_key()
    assert tuned_key != base_key
    without = probabilities(untuned(model), backbone, image, store)
    assert backbone.cache_key() == base_key  # the blocks were taken out again
    assert np.abs(with_blocks - without).max() > 1e-3
    # Both ran through one store: two keys, nothing served across them.
    assert len({k.backbone for k in store._entries}) == 2
    path = save_task_model(model, tmp_path / "tuned.ssstask")
    reloaded = load_task_model(path)
    assert reloaded.encoder_tuning == model.encoder_tuning
    again = probabilities(reloaded, backbone, image)  # a fresh store: computed again
    assert backbone.cache_key() == tuned_key
    np.testing.assert_allclose(again, with_blocks, atol=1e-6)
    apply_task_encoder(backbone, None, None)
    assert backbone.cache_key() == base_key


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_sam2_task_model_carries_and_runs_the_blocks(dataset, backbone, tmp_path, lora_rank):
    cfg = TrainConfig(dataset, tmp_path / "m.ssstask", iterations=3, seed=1, head_batch=2, decoder_batch=1,
                      head_width=16, val_cases=(), encoder_blocks=2, encoder_lora_rank=lora_rank, lr_encoder=1e-2)
    base_key = backbone.cache_key()
    result = train_task_model(cfg, backbone=backbone)
    assert backbone.cache_key() == base_key  # training gave the backbone its encoder back
    model = result.model
    assert model.encoder_tuning == EncoderTuning(2, lora_rank, 8.0 if lora_rank else 0.0)
    stored = model.weights["image_encoder"]
    blocks = backbone.model.image_encoder.trunk.blocks
    if lora_rank:
        assert any(k.endswith("lora_b") and np.abs(np.asarray(v)).max() > 0 for k, v in stored.items())
    else:  # the trained copies moved away from the backbone's own blocks, which stayed as they were
        own = blocks[len(blocks) - 2].state_dict()
        moved = [k for k, v in own.items() if not np.allclose(np.asarray(stored[f"blocks.0.{k}"]), v.numpy())]
        assert moved
    assert "last 2 block(s) trained" in model.training.notes
    image = read_volume(dataset / "imagesTr" / "case_001_0000.nii.gz")
    check_model_runs_its_blocks(model, backbone, image, tmp_path)


def test_semi_supervised_runs_refuse_the_blocks(dataset, backbone, tmp_path):
    from sss_lib.runs.progress import ProgressReporter
    from sss_lib.trainer.semisup_config import SemiSupConfig
    from sss_lib.trainer.semisup_loop import run_training

    cfg = TrainConfig(dataset, tmp_path / "m.ssstask", iterations=2, seed=1, head_batch=2, decoder_batch=1,
                      head_width=16, val_cases=(), max_cases=1, encoder_blocks=1)
    run = SemiSupConfig(train=cfg, run_dir=tmp_path / "run", unlabeled=dataset / "imagesTr", strong_views=1)
    base_key = backbone.cache_key()
    with pytest.raises(InputError, match="supervised runs only"):
        run_training(run, backbone=backbone, reporter=ProgressReporter(2, json_lines=False, console_view=False))
    assert backbone.cache_key() == base_key


def test_supervised_run_folder_model_carries_the_blocks(dataset, backbone, tmp_path):
    """The `train` command's path (run_training): the run's task model holds the blocks."""
    from sss_lib.runs.progress import ProgressReporter
    from sss_lib.trainer.semisup_config import SemiSupConfig
    from sss_lib.trainer.semisup_loop import run_training

    cfg = TrainConfig(dataset, tmp_path / "m.ssstask", iterations=2, seed=1, head_batch=2, decoder_batch=1,
                      head_width=16, val_cases=(), encoder_blocks=1, encoder_lora_rank=2, lr_encoder=1e-2)
    run = SemiSupConfig(train=cfg, run_dir=tmp_path / "run", consistency=False, checkpoint_every=2)
    outcome = run_training(run, backbone=backbone, reporter=ProgressReporter(2, json_lines=False, console_view=False))
    model = load_task_model(outcome.model_path)
    assert model.encoder_tuning == EncoderTuning(1, 2, 8.0)
    assert any(k.endswith("lora_b") and np.abs(v).max() > 0 for k, v in model.weights["image_encoder"].items())


def test_litemedsam_end_to_end(tmp_path):
    from sss_lib.backbones.registry import build_backbone

    data = make_phantom_dataset(tmp_path / "lm", 1, seed=4, n_slices=2, size=(48, 48), spacing=(3.0, 3.0, 8.0))
    net = build_backbone("litemedsam", device="cpu", encoder_runtime="torch")
    cfg = TrainConfig(data, tmp_path / "m.ssstask", iterations=2, seed=0, head_batch=1, decoder_batch=1,
                      head_width=8, val_cases=(), encoder_blocks=1, lr_encoder=1e-3)
    model = train_task_model(cfg, backbone=net).model
    own = net.net.image_encoder.layers[-1].blocks[-1].state_dict()
    stored = model.weights["image_encoder"]
    assert set(stored) == {f"blocks.0.{k}" for k in own}
    assert any(not np.allclose(stored[f"blocks.0.{k}"], v.numpy()) for k, v in own.items())
    image = read_volume(data / "imagesTr" / "case_000_0000.nii.gz")
    check_model_runs_its_blocks(model, net, image, tmp_path)
