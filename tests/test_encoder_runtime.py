"""Image-encoder runtimes: same features as torch, the cached export reused or rebuilt, fallbacks.

The cache and fallback tests use a two-layer convolution (exported in well under a second); the
real networks are checked once each: LiteMedSAM with its shipped weights on a real CT slice, and
SAM-2.1 tiny at random init at 64 px.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import pytest

from sss_lib.backbones import encoder_runtime as er
from sss_lib.errors import InputError

torch = pytest.importorskip("torch")
pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

SIZE = 32
WARN = "sss_lib.backbones.encoder_runtime"


class TwoOutputs(torch.nn.Module):
    """``(1, 3, s, s)`` -> ``(1, 8, s, s)`` and ``(1, 8, s/2, s/2)``: two outputs, like SAM-2's levels."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.b = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return y, self.b(y)


@pytest.fixture(autouse=True)
def _no_runtime_override(monkeypatch):
    monkeypatch.delenv(er.RUNTIME_ENV, raising=False)  # tests/conftest.py keeps the rest of the suite on torch


@pytest.fixture
def module():
    return TwoOutputs().eval()


def build(module, tmp_path, requested="auto", sha="random-init"):
    return er.build_encoder_runtime(module, model_name="tiny", weights_sha256=sha, image_size=SIZE,
                                    requested=requested, cache_root=tmp_path)


def same_as_torch(runtime, module, atol=1e-5) -> None:
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = module(x)
    out = runtime(x)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32 and o.shape == r.shape
        assert torch.allclose(o, r, atol=atol, rtol=0)


def folder_of(tmp_path):
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    return folder


# ---------------------------------------------------------------------------------- choice


def test_candidates(monkeypatch) -> None:
    monkeypatch.delenv(er.RUNTIME_ENV, raising=False)
    assert er.runtime_candidates("auto", "cpu") == ["openvino", "onnxruntime", "torch"]
    assert er.runtime_candidates("onnxruntime", "cpu") == ["onnxruntime", "openvino", "torch"]
    assert er.runtime_candidates("openvino-bf16", "cpu") == ["openvino-bf16", "openvino", "onnxruntime", "torch"]
    assert er.runtime_candidates("torch", "cpu") == ["torch"]
    # GPUs keep torch, whatever was asked
    assert er.runtime_candidates("auto", "cuda") == ["torch"]
    assert er.runtime_candidates("openvino", "mps") == ["torch"]
    monkeypatch.setenv(er.RUNTIME_ENV, "onnxruntime")
    assert er.runtime_candidates("auto", "cpu")[0] == "onnxruntime"
    assert er.runtime_candidates("openvino", "cpu")[0] == "openvino"  # an explicit choice wins
    monkeypatch.setenv(er.RUNTIME_ENV, "tensorrt")
    with pytest.raises(InputError, match="unknown encoder runtime 'tensorrt'"):
        er.runtime_candidates("auto", "cpu")
    with pytest.raises(InputError, match="Choose one of"):
        er.runtime_candidates("jax", "cpu")


def test_torch_and_gpu_need_no_export(module, tmp_path) -> None:
    assert build(module, tmp_path, "torch") is None
    assert er.build_encoder_runtime(module, model_name="tiny", weights_sha256="x", image_size=SIZE,
                                    device_type="cuda", cache_root=tmp_path) is None
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------ cached export


def test_runtimes_match_torch_and_reuse_the_cached_export(module, tmp_path) -> None:
    before = er.export_count
    ov = build(module, tmp_path, "openvino")
    assert ov.name == "openvino" and ov.cache_suffix == ""
    same_as_torch(ov, module)
    assert er.export_count == before + 1
    folder = folder_of(tmp_path)
    onnx = folder / "model.onnx"
    mtime = onnx.stat().st_mtime_ns
    record = json.loads((folder / "model.json").read_text())
    (check_file,) = folder.glob("check2-openvino-*.json")
    check = json.loads(check_file.read_text())
    assert check["passed"] and check["max_abs_diff"] < 1e-4 and check["onnx_sha256"] == record["onnx_sha256"]

    # OpenVINO's compiled model is kept (a new process loads it instead of compiling again).
    blobs = {b.name: b.stat().st_mtime_ns for b in (folder / "openvino-cache").iterdir()}
    assert any(name.endswith(".blob") for name in blobs)

    # Second build, and the other runtime: the same export, no new one.
    again = build(module, tmp_path, "openvino")
    assert {b.name: b.stat().st_mtime_ns for b in (folder / "openvino-cache").iterdir()} == blobs
    ort = build(module, tmp_path, "onnxruntime")
    assert (again.name, ort.name) == ("openvino", "onnxruntime")
    same_as_torch(ort, module)
    assert er.export_count == before + 1 and onnx.stat().st_mtime_ns == mtime
    assert len(list(folder.glob("check2-onnxruntime-*.json"))) == 1


def test_run_many_gives_each_input_its_own_output_in_order(module, tmp_path) -> None:
    xs = [torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(10 + i)) for i in range(5)]
    with torch.inference_mode():
        refs = [module(x) for x in xs]
    for name in ("openvino", "onnxruntime"):
        runtime = build(module, tmp_path, name)
        outs = runtime.run_many(xs)
        assert len(outs) == len(xs)
        for out, ref in zip(outs, refs):
            assert len(out) == 2
            assert all(torch.allclose(o, r, atol=1e-5, rtol=0) for o, r in zip(out, ref))
        assert runtime.run_many(xs[:1])[0][1].shape == refs[0][1].shape  # one input: the plain path


def test_other_weights_get_another_export(module, tmp_path) -> None:
    build(module, tmp_path)
    with torch.no_grad():
        module.a.bias += 1.0
    runtime = build(module, tmp_path)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # keyed by the tensors' hash
    same_as_torch(runtime, module)


def test_damaged_export_is_detected_and_rebuilt(module, tmp_path, caplog) -> None:
    build(module, tmp_path, "openvino")
    onnx = folder_of(tmp_path) / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    before = er.export_count
    with caplog.at_level(logging.WARNING, logger=WARN):
        runtime = build(module, tmp_path, "openvino")
    assert "is damaged" in caplog.text
    assert er.export_count == before + 1
    record = json.loads((folder_of(tmp_path) / "model.json").read_text())
    from sss_lib.download import file_sha256

    assert file_sha256(onnx) == record["onnx_sha256"]
    same_as_torch(runtime, module)


# -------------------------------------------------------------------------------- fallbacks


def test_openvino_missing(module, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now fails
    with caplog.at_level(logging.WARNING, logger=WARN):
        auto = build(module, tmp_path)
    assert auto.name == "onnxruntime"
    assert caplog.text == ""  # "auto" simply takes the next one
    with caplog.at_level(logging.WARNING, logger=WARN):
        asked = build(module, tmp_path, "openvino")
    assert asked.name == "onnxruntime"
    assert len(caplog.records) == 1 and "openvino: not installed" in caplog.text  # asked for: one warning
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert build(module, tmp_path) is None  # torch


def test_failed_check_falls_back_with_one_warning(module, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(er.TOLERANCE, "openvino", -1.0)  # no output can pass
    with caplog.at_level(logging.WARNING, logger=WARN):
        runtime = build(module, tmp_path)
    assert runtime.name == "onnxruntime"
    assert len(caplog.records) == 1 and "differs from torch's" in caplog.text and "using onnxruntime" in caplog.text
    (check_file,) = folder_of(tmp_path).glob("check2-openvino-*.json")
    assert json.loads(check_file.read_text())["passed"] is False
    # The recorded failure is honoured without comparing again, even with the tolerance restored.
    monkeypatch.setitem(er.TOLERANCE, "openvino", 1e-3)
    assert build(module, tmp_path).name == "onnxruntime"


def test_failed_export_falls_back_to_torch(tmp_path, caplog) -> None:
    class NotExportable(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x[0, 0]).real  # no ONNX operator for it

    with caplog.at_level(logging.WARNING, logger=WARN):
        runtime = build(NotExportable(), tmp_path, "openvino")
    assert runtime is None
    assert len(caplog.records) == 1 and "UnsupportedOperatorError" in caplog.text and "using torch" in caplog.text
    assert not list(tmp_path.rglob("model.onnx")) and not list(tmp_path.rglob("*.tmp"))  # nothing half-written


def test_export_that_loses_the_input_fails_its_check(tmp_path, caplog) -> None:
    class LeavesTheGraph(torch.nn.Module):
        def forward(self, x):
            return torch.from_numpy(np.ascontiguousarray(x.numpy()[..., ::-1]))  # traced as a constant

    with caplog.at_level(logging.WARNING, logger=WARN):
        runtime = build(LeavesTheGraph(), tmp_path)
    assert runtime is None and len(caplog.records) == 1 and "using torch" in caplog.text


def test_bf16_only_where_the_cpu_has_it(module, tmp_path, caplog) -> None:
    import openvino as ov

    native = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    # Without native bf16 OpenVINO takes the hint and computes in f32 all the same.
    assert er.openvino_cpu_precision("bf16") == ("bf16" if native else "f32")
    assert er.openvino_cpu_precision("f32") == "f32"
    with caplog.at_level(logging.WARNING, logger=WARN):
        runtime = build(module, tmp_path, "openvino-bf16")
    if native:
        assert runtime.name == "openvino-bf16" and runtime.cache_suffix == "+openvino-bf16"
        assert runtime.precision == "bf16"
    else:
        assert runtime.name == "openvino" and runtime.precision == "f32" and "no native bf16" in caplog.text


def _outputs(module, x) -> list[np.ndarray]:
    with torch.inference_mode():
        return [o.float().numpy() for o in module(x)]


def test_check_tolerance_fits_the_precision_and_catches_broken_exports(module) -> None:
    """bf16 arithmetic passes the bf16 check only; exports that compute something else pass neither."""
    import copy

    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    ref = _outputs(module, x)
    # The same network computed in bf16 (weights and activations), as a bf16 runtime does.
    bf16 = [o.astype(np.float32) for o in _outputs(copy.deepcopy(module).to(torch.bfloat16), x.to(torch.bfloat16))]

    no_bias = copy.deepcopy(module)
    with torch.no_grad():
        no_bias.b.bias.zero_()
    other_weights = copy.deepcopy(module)
    with torch.no_grad():
        other_weights.a.weight.mul_(1.1)
    swapped = [ref[0][:, [1, 0, *range(2, 8)]], ref[1]]  # two channels in the wrong order
    broken = {"lost bias": _outputs(no_bias, x), "weights 10% off": _outputs(other_weights, x),
              "channels swapped": swapped, "levels swapped": [ref[1], ref[0]], "missing level": ref[:1]}

    def passed(name, outs):
        return er.compare_outputs(name, "v", "sha", outs, ref).passed

    assert passed("openvino", ref) and passed("openvino-bf16", ref)
    assert passed("openvino-bf16", bf16) and not passed("openvino", bf16)
    check = er.compare_outputs("openvino-bf16", "v", "sha", bf16, ref)
    assert 0 < check.rel_l2_diff < check.rel_l2_tolerance
    for what, outs in broken.items():
        for name in ("openvino", "onnxruntime", "openvino-bf16"):
            assert not passed(name, outs), (what, name)


# ------------------------------------------------------------------------------ real networks


@pytest.fixture(scope="module")
def sss_home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSS_HOME", str(tmp_path_factory.mktemp("home")))
        mp.delenv(er.RUNTIME_ENV, raising=False)
        yield


def test_litemedsam_real_slice_same_embedding_and_mask(sss_home, data_file, two_torch_threads) -> None:
    from sss_lib.backbones.litemedsam import build_litemedsam_backbone
    from sss_lib.preprocess import Preprocessing, intensity_range, normalise_stack
    from sss_lib.volume_io import read_volume

    volume = read_volume(data_file("lung1_crop_image.nrrd"))
    axis = volume.default_slice_axis()
    low, high = intensity_range(volume.voxels, Preprocessing())
    image = normalise_stack(axis.to_stack(volume.voxels), low, high)[20]

    plain = build_litemedsam_backbone(encoder_runtime="torch")
    fast = build_litemedsam_backbone(encoder_runtime="auto")
    assert plain.encoder_runtime == "torch" and fast.encoder_runtime == "openvino"
    assert fast.cache_key() == plain.cache_key()  # same values within tolerance: embeddings are shared
    ref, got = plain.embed_slice(image), fast.embed_slice(image)
    assert got.features.shape == ref.features.shape == (1, 256, 64, 64)
    assert got.features.dtype == torch.float32
    assert float((got.features - ref.features).abs().max()) < 1e-3
    box = (60.0, 60.0, 140.0, 140.0)
    a, b = plain.decode(ref, box), fast.decode(got, box)
    assert np.array_equal(a.logits > 0, b.logits > 0) or np.mean((a.logits > 0) != (b.logits > 0)) < 1e-4


def test_sam2_tiny_through_the_runtime(sss_home, two_torch_threads, monkeypatch) -> None:
    from sss_lib.backbones.sam2_backbone import build_sam2_backbone

    monkeypatch.setenv("SSS_CPU_BF16", "0")  # the torch reference in float32
    image = np.random.default_rng(5).random((48, 64), dtype=np.float32)
    plain = build_sam2_backbone("sam2.1_hiera_tiny", image_size=64, random_init=True)
    fast = build_sam2_backbone("sam2.1_hiera_tiny", image_size=64, random_init=True, encoder_runtime="auto",
                               half_embeddings=True)
    assert fast.encoder_runtime == "openvino" and fast.cache_key() == plain.cache_key()
    ref, got = plain.embed_slice(image), fast.embed_slice(image)
    assert [f.shape for f in got.features] == [f.shape for f in ref.features]
    assert all(f.dtype == torch.float16 for f in got.features)  # stored in half precision
    assert got.nbytes * 2 == ref.nbytes
    for f, r in zip(got.features, ref.features):
        assert float((f.float() - r).abs().max()) <= 2e-3 * max(1.0, float(r.abs().max()))


def test_cli_option_reaches_auto_for_one_command_only(monkeypatch) -> None:
    from sss_lib.cli import _encoder_runtime_env, build_parser

    monkeypatch.delenv(er.RUNTIME_ENV, raising=False)
    args = build_parser().parse_args(["segment", "x.nrrd", "--prompts", "p.json", "-o", "o.nrrd",
                                      "--encoder-runtime", "onnxruntime"])
    with _encoder_runtime_env(args.encoder_runtime):
        assert er.runtime_candidates("auto", "cpu")[0] == "onnxruntime"
    assert er.RUNTIME_ENV not in os.environ
    assert er.runtime_candidates("auto", "cpu")[0] == "openvino"
