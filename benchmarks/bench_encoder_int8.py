"""Probe: LiteMedSAM's image encoder quantised to int8 (NNCF post-training quantisation, OpenVINO).

The encoder target of issue 11 (>= 4x torch fp32, <= 0.3 s per slice, Dice within 0.005 per bundled
case) is not met by the fp32 runtimes (OpenVINO fp32 2.1-2.9x): the encoder is about 75 GFLOP per
slice, and 0.3 s needs 250 GFLOP/s, above two cores' fp32 peak. int8 is the remaining lever; on a
CPU with AVX512-VNNI (int8 dot products) it can also be fast. This measures whether it pays. Not a
library runtime: it is only built if this probe shows it keeps Dice and gains speed.

Rows, side by side in one process, on the same lung1 slices (turns taken, median ms per slice):
torch fp32, OpenVINO fp32 (the cached export, as ``auto`` runs it), OpenVINO int8 (NNCF
``quantize`` with the transformer preset, calibrated on slices that are **not** the cases scored:
hard cardiac phantoms and the Colin27 template crop), and with ``--keep-fp32 STAGE ...`` one more
int8 row per stage whose matrix products and convolutions stay fp32 (a stage is a name prefix of the
exported graph, e.g. ``layers.0``: which part of the encoder the int8 error comes from). With
``--heldout`` every row also segments the held-out cases of ``bench_correction_validation.py`` (one
box each; never lung1/brain1) and reports its largest Dice change against torch there: a runtime
that keeps Dice on the two bundled cases by chance does not keep it there. Each row's features are
compared with torch's (relative L2) and each row segments both bundled cases from the demo's box
(3D Dice, change from torch). Needs ``pip install nncf`` (not a dependency of SSS).

    python benchmarks/bench_encoder_int8.py [--rounds 6] [--calibration 38] [--keep-fp32 layers.0 ...]
        [--heldout] [--name encoder_int8_cpu]

Writes ``results/NAME.json`` (with the CPU's int8/bf16 instruction sets) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, write_results  # noqa: E402
from bench_engine import CASES  # noqa: E402


def _calibration_inputs(backbone, count: int) -> list[np.ndarray]:
    """Encoder inputs ``(1, 3, 256, 256)`` from slices that are not scored (see the module docstring)."""
    import torch

    from sss_lib.demo import sample_data_dir
    from sss_lib.phantoms_cardiac import make_hard_cardiac_case
    from sss_lib.volume_io import read_volume

    captured: list[np.ndarray] = []
    module = backbone.net.image_encoder

    def keep(_module, inputs):  # the exact input embed_slice gives the encoder
        captured.append(inputs[0].detach().cpu().numpy().astype(np.float32))

    handle = module.register_forward_pre_hook(keep)
    try:
        stacks = [make_hard_cardiac_case(seed).image.voxels for seed in range(4)]
        stacks.append(read_volume(sample_data_dir() / "ch2_crop.nii.gz").voxels)
        picks = [(s, k) for s, stack in enumerate(stacks) for k in range(0, stack.shape[0], 2)]
        for s, k in picks[:count]:
            img = stacks[s][k].astype(np.float32)
            img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
            with torch.inference_mode():
                backbone.embed_slice(img)
    finally:
        handle.remove()
    return captured


def _stage_ops(model, stage: str) -> list[str]:
    """The matrix products and convolutions of the exported graph under ``/STAGE/``."""
    ops = [op.get_friendly_name() for op in model.get_ops()
           if op.get_type_name() in ("MatMul", "Convolution", "GroupConvolution") and f"/{stage}/" in op.get_friendly_name()]
    if not ops:
        raise SystemExit(f"--keep-fp32 {stage}: no matrix product or convolution under '/{stage}/' in the export")
    return ops


def _int8_runtime(onnx_path: Path, calibration: list[np.ndarray], threads: int, keep_fp32: str | None = None):
    import nncf
    import openvino as ov

    from sss_lib.backbones.encoder_runtime import EncoderCheck, EncoderRuntime

    core = ov.Core()
    t0 = time.perf_counter()
    model = core.read_model(str(onnx_path))
    extra = {}
    if keep_fp32:
        extra["ignored_scope"] = nncf.IgnoredScope(names=_stage_ops(model, keep_fp32), validate=False)
    quantised = nncf.quantize(model, nncf.Dataset(calibration),
                              preset=nncf.QuantizationPreset.MIXED, model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(calibration), **extra)
    quantise_s = time.perf_counter() - t0
    compiled = core.compile_model(quantised, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                                     "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> list[np.ndarray]:
        request.infer({0: x}, share_inputs=True)
        return [request.get_output_tensor(0).data.copy()]

    check = EncoderCheck("openvino-int8", ov.__version__, "", float("nan"), float("nan"), False, "")
    return EncoderRuntime("openvino-int8", run, check, "i8"), quantise_s


def _cpu_instructions() -> list[str]:
    """The CPU's int8 and bf16 instruction sets, from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx2")
    return [f for f in flags.split(":", 1)[1].split() if f in wanted]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="slices timed per runtime (default 6)")
    ap.add_argument("--calibration", type=int, default=38, help="calibration slices (default 38)")
    ap.add_argument("--keep-fp32", nargs="*", default=[], metavar="STAGE",
                    help="one more int8 row per stage kept in fp32 (e.g. layers.0)")
    ap.add_argument("--name", default="encoder_int8_cpu", help="results file name (default encoder_int8_cpu)")
    ap.add_argument("--heldout", action="store_true",
                    help="also segment the held-out validation cases of bench_correction_validation.py (one box "
                         "each) with every runtime: whether a Dice kept on lung1/brain1 holds elsewhere")
    ap.add_argument("--pyradiomics-data", default=None, help="see bench_correction_validation.py")
    args = ap.parse_args()

    import torch

    from sss_lib.backbones import encoder_runtime as er
    from sss_lib.backbones.litemedsam import IMAGE_SIZE, build_litemedsam_backbone
    from sss_lib.demo import box_prompt_from_label, sample_data_dir
    from sss_lib.engine import SegmentationSession
    from sss_lib.metrics import dice
    from sss_lib.volume_io import read_label, read_volume

    threads = int(os.environ.get("SSS_BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    models = {"torch": build_litemedsam_backbone(device="cpu", encoder_runtime="torch"),
              "openvino": build_litemedsam_backbone(device="cpu", encoder_runtime="openvino")}
    if models["openvino"].encoder_runtime != "openvino":
        raise SystemExit("OpenVINO is not usable here (pip install openvino)")
    torch_model = models["torch"]
    folder = er._export_folder(torch_model.net.image_encoder, "litemedsam", torch_model.weights_sha256,
                               IMAGE_SIZE, None)
    calibration = _calibration_inputs(torch_model, args.calibration)
    quantise_s = {}
    for stage in [None, *args.keep_fp32]:
        name = "openvino-int8" + (f", {stage} fp32" if stage else "")
        int8, quantise_s[name] = _int8_runtime(folder / "model.onnx", calibration, threads, stage)
        models[name] = build_litemedsam_backbone(device="cpu", encoder_runtime="torch")
        models[name].encoder = int8

    data = sample_data_dir()
    lung = read_volume(data / CASES["lung1"][0])
    slices = SegmentationSession(lung, torch_model).slices
    picks = np.linspace(10, len(slices) - 10, args.rounds).round().astype(int)
    wall: dict[str, list[float]] = {n: [] for n in models}
    rel: dict[str, float] = {n: 0.0 for n in models}
    for b in models.values():
        b.embed_slice(slices[picks[0]])  # warm-up
    for k in picks:
        ref = None
        for name, b in models.items():
            t0 = time.perf_counter()
            feats = b.embed_slice(slices[k]).features.float()
            wall[name].append(time.perf_counter() - t0)
            ref = feats if ref is None else ref
            rel[name] = max(rel[name], float((feats - ref).norm() / ref.norm()))
    rows = []
    for name, b in models.items():
        ms = 1000 * statistics.median(wall[name])
        row = {"runtime": name, "ms_per_slice": ms, "speedup_vs_torch": 1000 * statistics.median(wall["torch"]) / ms,
               "rel_l2_vs_torch": rel[name]}
        for case, (image_file, label_file) in CASES.items():
            vol = read_volume(data / image_file)
            truth = read_label(data / label_file, reference=vol)
            prompts = box_prompt_from_label(truth)
            result = SegmentationSession(vol, b, slice_axis=prompts.slice_axis).segment(prompts)
            row[f"dice_{case}"] = dice(result.labels.voxels == 1, truth.voxels == 1)
        rows.append(row)
    for row in rows:
        row["dice_within_0.005"] = all(abs(row[f"dice_{c}"] - rows[0][f"dice_{c}"]) <= 0.005 for c in CASES)
    if args.heldout:
        from bench_correction_validation import AAL_REGIONS, PYRADIOMICS_CASES, load_cases

        from sss_lib.embedding_cache import EmbeddingStore

        # One store per runtime: the four AAL regions share one image, so each runtime embeds it once.
        stores = {row["runtime"]: EmbeddingStore(max_volumes=1) for row in rows}
        for case, image, truth in load_cases(list(PYRADIOMICS_CASES) + list(AAL_REGIONS), args.pyradiomics_data):
            prompts = box_prompt_from_label(truth)
            for row in rows:
                session = SegmentationSession(image, models[row["runtime"]], slice_axis=prompts.slice_axis,
                                              store=stores[row["runtime"]])
                result = session.segment(prompts)
                row.setdefault("heldout_dice", {})[case] = dice(result.labels.voxels == 1, truth.voxels == 1)
        for store in stores.values():
            store.close()
        for row in rows:
            row["heldout_max_abs_dice_change"] = max(abs(d - rows[0]["heldout_dice"][c])
                                                     for c, d in row["heldout_dice"].items())
    write_results(args.name, {"runs": rows, "quantise_s": quantise_s, "calibration_slices": len(calibration),
                              "cpu_int8_bf16_instructions": _cpu_instructions(), "torch_threads": threads,
                              "load_average_before": load_before, "load_average_after": os.getloadavg()})
    print(markdown_table(["runtime", "ms/slice", "speed-up vs torch", "rel. L2 vs torch", "Dice lung1", "Dice brain1",
                          "Dice within 0.005"] + (["held-out: largest Dice change"] if args.heldout else []),
                         [[r["runtime"], f"{r['ms_per_slice']:.0f}", f"{r['speedup_vs_torch']:.2f}x",
                           f"{r['rel_l2_vs_torch']:.2g}", f"{r['dice_lung1']:.4f}", f"{r['dice_brain1']:.4f}",
                           "yes" if r["dice_within_0.005"] else "no"]
                          + ([f"{r['heldout_max_abs_dice_change']:.3f}"] if args.heldout else []) for r in rows]))


if __name__ == "__main__":
    main()
