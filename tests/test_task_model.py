"""Task-model files: round trip, atomic save, and every refusal with its message."""

import dataclasses
import json
import os
import zipfile

import numpy as np
import pytest

from sss_lib.pcsw.config import PcswConfig
from sss_lib.task_model import (
    FORMAT_VERSION,
    MANIFEST,
    BackboneRef,
    TaskClass,
    TaskModel,
    TaskModelError,
    TaskPreprocessing,
    TrainingInfo,
    ValidationMetrics,
    _metadata_to_json,
    _write_archive,
    component_tensors,
    load_task_model,
    save_task_model,
)

SHA = "ab" * 32


def make_model(**changes) -> TaskModel:
    rng = np.random.default_rng(0)
    model = TaskModel(
        backbone=BackboneRef("sam2.1_hiera_tiny", SHA),
        classes=(TaskClass(1, "RV", (70, 130, 230)), TaskClass(2, "Myo", (90, 200, 110)), TaskClass(3, "LV", (230, 80, 60))),
        preprocessing=TaskPreprocessing(modality="MR", percentiles=(1.0, 99.0), slice_axis="k", image_size=512),
        pcsw=PcswConfig(tau=0.75, max_centroid_shift_mm=12.0),
        volume_ranges_mm3={1: (5000.0, 250000.0), 3: (12000.5, 300000.0)},
        training=TrainingInfo.now("ACDC 3 labeled", n_labeled=3, n_unlabeled=67, iterations=2000, seed=7),
        validation=ValidationMetrics(10, {1: 0.81, 2: 0.79, 3: 0.9}, hd95_mm={1: 4.5}),
        weights={
            "coarse_head": {"conv.weight": rng.normal(size=(4, 8, 3, 3)).astype(np.float32),
                            "conv.bias": np.zeros(4, np.float32), "bn.num_batches_tracked": np.array(12)},
            "prompt_encoder": {"pe.gaussian": rng.normal(size=(2, 64)).astype(np.float16)},
            "mask_decoder": {"mlp.0.weight": rng.normal(size=(16, 16)).astype(np.float32)[:, ::2]},
            "dfe": {"fuse.weight": np.ones((8,), np.float64)},
        },
    )
    return dataclasses.replace(model, **changes)


def test_round_trip_keeps_every_field_and_tensor(tmp_path):
    model = make_model()
    path = save_task_model(model, tmp_path / "sub" / "heart.ssstask")
    loaded = load_task_model(path, expected_backbone_sha256=SHA)
    for name in ("backbone", "classes", "preprocessing", "pcsw", "volume_ranges_mm3", "training", "validation"):
        assert getattr(loaded, name) == getattr(model, name), name
    assert isinstance(loaded.classes[0].color, tuple) and isinstance(loaded.preprocessing.window, tuple)
    assert loaded.volume_ranges_mm3[3] == (12000.5, 300000.0) and loaded.pcsw.tau == 0.75
    assert set(loaded.weights) == set(model.weights)
    for comp, sd in model.weights.items():
        for key, arr in sd.items():
            got = loaded.weights[comp][key]
            assert got.dtype == arr.dtype and got.shape == arr.shape
            np.testing.assert_array_equal(got, arr)
    assert loaded.weights["coarse_head"]["bn.num_batches_tracked"].shape == ()
    assert loaded.class_names == {1: "RV", 2: "Myo", 3: "LV"} and loaded.colors[3] == (230, 80, 60)
    assert loaded.validation.mean_dice == pytest.approx((0.81 + 0.79 + 0.9) / 3)
    assert "sam2.1_hiera_tiny" in loaded.describe()
    assert loaded.preprocessing.to_preprocessing().percentiles == (1.0, 99.0)
    # No validation metrics is allowed; the file carries no pickle.
    save_task_model(make_model(validation=None), path)
    assert load_task_model(path).validation is None
    assert not any(n.endswith(".pkl") for n in zipfile.ZipFile(path).namelist())


def test_torch_tensors_are_saved_and_come_back_as_tensors(tmp_path):
    import torch

    w = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    model = make_model(weights={**make_model().weights, "coarse_head": {"w": w, "b": torch.ones(2)}})
    loaded = load_task_model(save_task_model(model, tmp_path / "m.ssstask"))
    tensors = component_tensors(loaded, "coarse_head")
    assert tensors["w"].dtype == torch.float32 and torch.equal(tensors["w"], w.float())
    assert torch.equal(tensors["b"], torch.ones(2))
    with pytest.raises(KeyError, match="image_encoder"):
        component_tensors(loaded, "image_encoder")


def test_save_is_atomic_and_refuses_inconsistent_models(tmp_path):
    path = save_task_model(make_model(), tmp_path / "m.ssstask")
    before = path.read_bytes()
    bad = make_model(classes=(TaskClass(1, "RV", (1, 2, 3)), TaskClass(1, "LV", (1, 2, 3))))
    with pytest.raises(TaskModelError, match="label 1 is used twice"):
        save_task_model(bad, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.ssstask"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ((TaskClass(0, "bg", (0, 0, 0)),), "label 0 is background"),
        ((TaskClass(1, "RV", (1, 2, 3)), TaskClass(1, "LV", (4, 5, 6))), "label 1 is used twice"),
        ((TaskClass(1, "RV", (1, 2)),), r"class 1 \(RV\) has no valid colour"),
        ((TaskClass(1, "RV", (1, 2, 300)),), "has no valid colour"),
        ((TaskClass(1, " ", (1, 2, 3)),), "class 1 has no name"),
        ((), "class table is empty"),
    ],
)
def test_class_table_refusals(tmp_path, classes, message):
    with pytest.raises(TaskModelError, match=message):
        save_task_model(make_model(classes=classes, volume_ranges_mm3={}), tmp_path / "m.ssstask")


def test_settings_and_weights_refusals(tmp_path):
    p = tmp_path / "m.ssstask"
    with pytest.raises(TaskModelError, match="volume range for label 9"):
        save_task_model(make_model(volume_ranges_mm3={9: (1.0, 2.0)}), p)
    with pytest.raises(TaskModelError, match="not 0 <= min <= max"):
        save_task_model(make_model(volume_ranges_mm3={1: (3.0, 2.0)}), p)
    with pytest.raises(TaskModelError, match="slice_axis"):
        save_task_model(make_model(preprocessing=TaskPreprocessing(slice_axis="z")), p)
    with pytest.raises(TaskModelError, match="backbone reference"):
        save_task_model(make_model(backbone=BackboneRef("sam2.1_hiera_tiny", "abc")), p)
    weights = {k: v for k, v in make_model().weights.items() if k != "mask_decoder"}
    with pytest.raises(TaskModelError, match="lacks trained weights for mask_decoder"):
        save_task_model(make_model(weights=weights), p)
    with pytest.raises(TaskModelError, match="unknown component.*decoder2"):
        save_task_model(make_model(weights={**make_model().weights, "decoder2": {"w": np.ones(1)}}), p)
    nan = {**make_model().weights, "dfe": {"w": np.array([1.0, np.nan])}}
    with pytest.raises(TaskModelError, match="dfe.w holds NaN"):
        save_task_model(make_model(weights=nan), p)
    assert not p.exists()


def test_backbone_mismatch(tmp_path):
    path = save_task_model(make_model(), tmp_path / "m.ssstask")
    with pytest.raises(TaskModelError, match=r"trained on backbone sam2.1_hiera_tiny with weights sha256 abababab.*"
                                             r"loaded backbone's weights have sha256 cdcdcdcd"):
        load_task_model(path, expected_backbone_sha256="cd" * 32)


def test_not_a_task_model(tmp_path):
    import torch

    ckpt = tmp_path / "sam2.pt"
    torch.save({"model": {"w": torch.ones(2)}}, ckpt)
    with pytest.raises(TaskModelError, match="is a PyTorch checkpoint, not an SSS task model"):
        load_task_model(ckpt)
    text = tmp_path / "notes.ssstask"
    text.write_text("hello")
    with pytest.raises(TaskModelError, match="notes.ssstask: is not an SSS task model file"):
        load_task_model(text)
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr(MANIFEST, json.dumps({"format": "something-else"}))
    with pytest.raises(TaskModelError, match="is not an SSS task model"):
        load_task_model(other)
    with pytest.raises(TaskModelError, match="not found"):
        load_task_model(tmp_path / "missing.ssstask")


def test_truncated_and_damaged_files(tmp_path):
    path = save_task_model(make_model(), tmp_path / "m.ssstask")
    data = path.read_bytes()
    cut = tmp_path / "cut.ssstask"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TaskModelError, match="damaged or truncated"):
        load_task_model(cut)

    # Flip one byte inside a stored tensor: the zip CRC or our SHA-256 refuses it.
    member = "tensors/coarse_head/0.npy"
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
        raw = zf.read(member)
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + len(raw) - 3
    flipped = bytearray(data)
    flipped[offset] ^= 0xFF
    bad = tmp_path / "bad.ssstask"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(TaskModelError, match="damaged"):
        load_task_model(bad)


def rewrite(path, manifest_change, weights=None):
    """Write a file whose manifest was edited, with a valid payload hash (not damage: a bad writer)."""
    model = make_model()
    manifest = {"format": "sss-task-model", "format_version": FORMAT_VERSION, **_metadata_to_json(model)}
    manifest_change(manifest)
    _write_archive(manifest, weights if weights is not None else model.weights, path)
    return path


def test_edited_manifest_without_new_hash_is_damage(tmp_path):
    path = save_task_model(make_model(), tmp_path / "m.ssstask")
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read(MANIFEST))
        members = {n: zf.read(n) for n in zf.namelist() if n != MANIFEST}
    manifest["classes"][0]["name"] = "Something"
    edited = tmp_path / "edited.ssstask"
    with zipfile.ZipFile(edited, "w") as zf:
        zf.writestr(MANIFEST, json.dumps(manifest))
        for n, b in members.items():
            zf.writestr(n, b)
    with pytest.raises(TaskModelError, match="do not match the SHA-256"):
        load_task_model(edited)


def test_newer_format_missing_fields_and_wrong_types(tmp_path):
    p = tmp_path / "m.ssstask"
    with pytest.raises(TaskModelError, match=rf"newer SSS \(task model format {FORMAT_VERSION + 1}; this SSS reads "
                                             rf"format {FORMAT_VERSION}"):
        load_task_model(rewrite(p, lambda m: m.update(format_version=FORMAT_VERSION + 1)))
    with pytest.raises(TaskModelError, match=r"lacks the field\(s\) backbone, training\.seed\."):
        load_task_model(rewrite(p, lambda m: (m["training"].pop("seed"), m.pop("backbone"))))
    with pytest.raises(TaskModelError, match=r"class 2 \(Myo\) has no colour"):
        load_task_model(rewrite(p, lambda m: m["classes"][1].pop("color")))
    with pytest.raises(TaskModelError, match=r"invalid field\(s\): training\.iterations must be int"):
        load_task_model(rewrite(p, lambda m: m["training"].update(iterations="many")))
    with pytest.raises(TaskModelError, match="lacks trained weights for prompt_encoder"):
        weights = {k: v for k, v in make_model().weights.items() if k != "prompt_encoder"}
        load_task_model(rewrite(p, lambda m: None, weights))
    # Fields with defaults may be absent (older writers of the same format version).
    loaded = load_task_model(rewrite(p, lambda m: m["pcsw"].pop("box_margin_px")))
    assert loaded.pcsw.box_margin_px == PcswConfig().box_margin_px
    # PCSW's own range checks apply to what a file holds.
    with pytest.raises(TaskModelError, match=r"invalid field\(s\): pcsw: PcswConfig: tau must lie in \[0.5, 1\]"):
        load_task_model(rewrite(p, lambda m: m["pcsw"].update(tau=0.2)))
