"""Which span rule makes corrections help: measured on held-out cases, never on lung1/brain1.

The span rule (:mod:`sss_lib.backbones.spans`) decides what a slice between two key slices shows
once both bounding runs reached it. This benchmark replays :mod:`sss_lib.correction_sim`'s simulated
user (round 0: one box, the tight box + 3 px on the label's largest slice; then a true box on the
lesion slice with the most wrong voxels, or "not on this slice" on the lesion-free slice with the
most false positives) with LiteMedSAM's real weights under each rule, and reports per rule and case
the 3D Dice of every round and the number of rounds where it went down.

Validation cases (none of them is a reported test case; lung1 and brain1 are left out on purpose):

* pyradiomics 3.0.1 ``data/``: ``brain2`` (MR brain tumour), ``lung2`` (CT lung tumour), ``breast1``
  (MR breast lesion); BSD-3, Harvard Medical School. They are not in the repository: the script
  fetches the source distribution with ``pip download`` into ``$SSS_HOME/validation_data`` once
  (or reads ``--pyradiomics-data DIR``), and says what to do when it cannot.
* Colin27 T1 with the AAL atlas (``Testing/Data/ch2_crop.nii.gz`` + ``aal_crop.nii.gz``, already in
  the repository): four mid-size deep-grey regions that lie inside the crop (Caudate_L, Putamen_R,
  Pallidum_L, Thalamus_R).

``--correction-margin`` sets the margin (px) of the simulated user's correction boxes (default: the
library's :data:`sss_lib.correction_sim.BOX_MARGIN_PX`); a comma list (``0,3``) runs every rule with
each margin, and the results are then keyed ``"RULE, margin M"``. This is how the correction boxes'
margin was chosen (``benchmarks/results/correction_validation_margin.md``).

Embeddings are shared between the rules (and margins) of a case (one :class:`EmbeddingStore`), so a rule costs
only its decodes. Default encoder runtime ``auto`` (OpenVINO where installed: Dice within 0.005 of
torch, much faster on a CPU).

    python benchmarks/bench_correction_validation.py [--rounds 5] [--rules blend,nearest,blend_prob]
        [--cases brain2,lung2,...] [--pyradiomics-data DIR] [--encoder-runtime auto|torch|...]
        [--correction-margin M[,M...]] [--name correction_validation]

Writes ``benchmarks/results/NAME.json`` and ``NAME.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, markdown_table, write_results  # noqa: E402

PYRADIOMICS_VERSION = "3.0.1"
PYRADIOMICS_CASES = ("brain2", "lung2", "breast1")
# AAL label values (aal.nii.txt) of regions that lie wholly inside the repository's ch2 crop.
AAL_REGIONS = {"Caudate_L": 71, "Putamen_R": 74, "Pallidum_L": 75, "Thalamus_R": 78}


# -- data ---------------------------------------------------------------------------------------
def pyradiomics_data(explicit: str | None) -> Path:
    """The folder with pyradiomics' ``data/*.nrrd``: ``explicit``, or the cached extraction of its
    source distribution (fetched with pip on first use)."""
    if explicit:
        return Path(explicit)
    from sss_lib.weights import sss_home

    root = sss_home() / "validation_data" / f"pyradiomics-{PYRADIOMICS_VERSION}"
    data = root / "data"
    if all((data / f"{c}_{part}.nrrd").is_file() for c in PYRADIOMICS_CASES for part in ("image", "label")):
        return data
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # --no-build-isolation: pip prepares the sdist's metadata, and its setup.py imports numpy.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
               f"pyradiomics=={PYRADIOMICS_VERSION}", "-d", tmp]
        print(f"fetching the pyradiomics {PYRADIOMICS_VERSION} source distribution for its sample data ...")
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("pyradiomics-*.tar.gz"))
        if done.returncode != 0 or not archives:
            sys.exit("error: cannot download the pyradiomics source distribution (offline?): "
                     f"{done.stderr.strip().splitlines()[-1:] if done.stderr else ''}. Download "
                     f"pyradiomics-{PYRADIOMICS_VERSION}.tar.gz from PyPI elsewhere, extract it, and pass "
                     "--pyradiomics-data pyradiomics-3.0.1/data")
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and m.name.split("/")[-2:-1] == ["data"] and m.name.endswith(".nrrd")]
            for m in members:
                m.name = "data/" + m.name.split("/")[-1]
                tar.extract(m, root, filter="data")
    (root / "SOURCE.txt").write_text(
        f"pyradiomics {PYRADIOMICS_VERSION} source distribution (PyPI), data/; BSD-3-Clause, "
        "Copyright 2017 Harvard Medical School\n")
    return data


def load_cases(names: list[str], pyradiomics_dir: str | None) -> list[tuple[str, object, object]]:
    """``(name, image Volume, binary truth Volume)`` for each requested case."""
    from sss_lib.demo import sample_data_dir
    from sss_lib.volume_io import read_label, read_volume

    out = []
    pyr = [n for n in names if n in PYRADIOMICS_CASES]
    if pyr:
        data = pyradiomics_data(pyradiomics_dir)
        for n in pyr:
            image = read_volume(data / f"{n}_image.nrrd")
            label = read_label(data / f"{n}_label.nrrd", reference=image)
            out.append((n, image, label.with_voxels((label.voxels > 0).astype(np.uint8))))
    aal = [n for n in names if n in AAL_REGIONS]
    if aal:
        image = read_volume(sample_data_dir() / "ch2_crop.nii.gz")
        atlas = read_label(sample_data_dir() / "aal_crop.nii.gz", reference=image)
        for n in aal:
            out.append((n, image, atlas.with_voxels((atlas.voxels == AAL_REGIONS[n]).astype(np.uint8))))
    unknown = set(names) - set(PYRADIOMICS_CASES) - set(AAL_REGIONS)
    if unknown:
        sys.exit(f"error: unknown case(s) {sorted(unknown)}; use {list(PYRADIOMICS_CASES) + list(AAL_REGIONS)}")
    return out


# -- a backbone that resolves spans by a given rule ------------------------------------------------
def with_span_rule(backbone, rule: str):
    """A shallow copy of a LiteMedSAM backbone whose spans are resolved by ``rule`` (same network,
    same embeddings' cache key)."""
    from sss_lib.backbones.base import PropagationStep
    from sss_lib.backbones.litemedsam_propagate import carry_run, interpolated_boxes, interpolated_run
    from sss_lib.backbones.spans import Gate, resolve_span, run_stop

    class RuleBackbone(type(backbone)):  # type: ignore[misc]
        def propagate_span(self, slices, embedding, label, span):
            gates = {+1: Gate(), -1: Gate()}

            def run(key, direction, stop):
                return carry_run(self.decode, slices, embedding, key, direction, stop, self.stop_rule,
                                 carry_points=self.carry_points, gate=gates[direction])

            # run_stop: "blend_agree" lets each run decode the far key slice too (to weigh it)
            forward = run(span.below, +1, run_stop(span, +1, rule)) if span.below is not None else None
            backward = run(span.above, -1, run_stop(span, -1, rule)) if span.above is not None else None
            boxes = interpolated_boxes(span) if rule.startswith("interp") else None
            interpolated = interpolated_run(self.decode, embedding, boxes) if boxes else None
            for s, logits in resolve_span(span, forward, backward, gates, rule=rule, interpolated=interpolated):
                yield PropagationStep(s, {label: logits})

    clone = copy.copy(backbone)
    clone.__class__ = RuleBackbone
    return clone


# -- the simulated session ------------------------------------------------------------------------
def wrong_per_slice(pred: np.ndarray, truth: np.ndarray) -> list[list[int]]:
    """``[false positives, false negatives]`` per slice of ``(S, H, W)`` bool stacks."""
    n = len(truth)
    fp = (pred & ~truth).reshape(n, -1).sum(axis=1)
    fn = (~pred & truth).reshape(n, -1).sum(axis=1)
    return [[int(a), int(b)] for a, b in zip(fp, fn)]


def run_case(image, truth_volume, backbone, store, rule: str, rounds: int, margin: int) -> dict:
    """One simulated session; ``margin``: px around the simulated user's correction boxes."""
    from sss_lib.correction_sim import apply_correction, next_correction
    from sss_lib.demo import box_prompt_from_label
    from sss_lib.engine import SegmentationSession
    from sss_lib.metrics import dice

    prompts = box_prompt_from_label(truth_volume)
    axis = prompts.slice_axis
    truth = axis.to_stack(truth_volume.voxels > 0)
    session = SegmentationSession(image, with_span_rule(backbone, rule), slice_axis=axis, store=store)
    pred = axis.to_stack(session.segment(prompts).labels.voxels == 1)
    rows = [{"round": 0, "action": f"box on slice {prompts.classes[0].prompts[0].key_slice}",
             "dice_3d": float(dice(pred, truth)), "wrong_per_slice": wrong_per_slice(pred, truth)}]
    done = {p.key_slice for p in prompts.classes[0].prompts}
    for r in range(1, rounds + 1):
        c = next_correction(truth, pred, done, margin=margin)
        if c is None:
            break
        s = c.slice_index
        before = float(dice(pred[s], truth[s]))
        prompts = apply_correction(prompts, 1, c)
        done.add(s)
        result = session.segment(prompts)
        pred = axis.to_stack(result.labels.voxels == 1)
        rows.append({"round": r, "action": ("box" if c.kind == "box" else "absent") + f" on slice {s}",
                     "dice_3d": float(dice(pred, truth)), "slice_dice_before": before,
                     "slice_dice_after": float(dice(pred[s], truth[s])),
                     "recomputed_slices": result.recomputed_slices.get(1, []),
                     "wrong_per_slice": wrong_per_slice(pred, truth)})
    dices = [row["dice_3d"] for row in rows]
    own = [row for row in rows[1:] if row["action"].startswith("box")]
    lesion = np.flatnonzero(truth.reshape(len(truth), -1).any(axis=1)).tolist()
    return {"rounds": rows, "dice_per_round": dices,
            "rounds_down": sum(b < a - 1e-9 for a, b in zip(dices, dices[1:])),
            "worst_drop": max([a - b for a, b in zip(dices, dices[1:])] + [0.0]),
            "own_slice_down": sum(row["slice_dice_after"] < row["slice_dice_before"] - 1e-9 for row in own),
            "slices": int(truth.shape[0]), "lesion_slices": lesion}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rules", default="blend,nearest,blend_prob")
    parser.add_argument("--cases", default=",".join(list(PYRADIOMICS_CASES) + list(AAL_REGIONS)))
    parser.add_argument("--pyradiomics-data", default=None, help="folder with pyradiomics' data/*.nrrd")
    parser.add_argument("--encoder-runtime", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--correction-margin", default=None,
                        help="px around the simulated correction boxes, or a comma list to compare "
                             "(default: sss_lib.correction_sim.BOX_MARGIN_PX)")
    parser.add_argument("--name", default="correction_validation")
    args = parser.parse_args()

    import torch

    from sss_lib.backbones.litemedsam import build_litemedsam_backbone
    from sss_lib.backbones.spans import DEFAULT_SPAN_RULE, SPAN_RULES
    from sss_lib.correction_sim import BOX_MARGIN_PX
    from sss_lib.embedding_cache import EmbeddingStore

    rules = args.rules.split(",")
    bad = [r for r in rules if r not in SPAN_RULES]
    if bad:
        sys.exit(f"error: unknown rule(s) {bad}; use {list(SPAN_RULES)}")
    try:
        margins = ([BOX_MARGIN_PX] if args.correction_margin is None
                   else [int(m) for m in args.correction_margin.split(",")])
    except ValueError:
        sys.exit(f"error: --correction-margin {args.correction_margin!r}: give whole pixels, e.g. 3 or 0,3")
    if any(m < 0 for m in margins):
        sys.exit("error: --correction-margin must be >= 0 px")
    # one setting per (rule, margin); keyed by the rule alone when a single margin is run
    settings = {(rule if len(margins) == 1 else f"{rule}, margin {m}"): (rule, m) for rule in rules for m in margins}
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    cases = load_cases(args.cases.split(","), args.pyradiomics_data)
    backbone = build_litemedsam_backbone(device="cpu", encoder_runtime=args.encoder_runtime)
    results: dict[str, dict[str, dict]] = {key: {} for key in settings}
    for name, image, truth in cases:
        store = EmbeddingStore(max_volumes=1)
        for key, (rule, margin) in settings.items():
            results[key][name] = res = run_case(image, truth, backbone, store, rule, args.rounds, margin)
            print(f"{name:12s} {key:18s} " + " -> ".join(f"{d:.3f}" for d in res["dice_per_round"])
                  + f"  down {res['rounds_down']}", flush=True)
        store.close()
    load_after = os.getloadavg()

    table = []
    for rule in settings:
        for name, res in results[rule].items():
            actions = "; ".join(row["action"] for row in res["rounds"][1:])
            table.append([rule, name, " -> ".join(f"{d:.3f}" for d in res["dice_per_round"]), res["rounds_down"],
                          f"{res['worst_drop']:.4f}", res["own_slice_down"], actions])
    summary = []
    for rule in settings:
        rs = list(results[rule].values())
        summary.append([rule, sum(r["rounds_down"] for r in rs), sum(len(r["dice_per_round"]) - 1 for r in rs),
                        f"{max(r['worst_drop'] for r in rs):.4f}", sum(r["own_slice_down"] for r in rs),
                        f"{np.mean([r['dice_per_round'][0] for r in rs]):.3f}",
                        f"{np.mean([r['dice_per_round'][-1] for r in rs]):.3f}"])
    md = ("Per setting (span rule, and correction box margin when several are run): rounds where 3D Dice went down (of all correction rounds), the largest drop, "
          "corrections that lowered Dice on their own slice, mean 3D Dice after round 0 and after the last round.\n\n"
          + markdown_table(["setting", "rounds down", "rounds", "largest drop", "own slice down", "mean Dice round 0",
                            "mean Dice last round"], summary)
          + "\n\n" + markdown_table(["setting", "case", "3D Dice per round", "rounds down", "largest drop",
                                     "own slice down", "corrections"], table)
          + f"\n\nlibrary default rule: {DEFAULT_SPAN_RULE}; correction box margin(s) {margins} px"
          f" (library default {BOX_MARGIN_PX}); encoder runtime {args.encoder_runtime};"
          f" load average (1, 5, 15 min) before {tuple(round(v, 2) for v in load_before)},"
          f" after {tuple(round(v, 2) for v in load_after)}")
    payload = {"backbone": "litemedsam", "encoder_runtime": args.encoder_runtime, "rounds": args.rounds,
               "rules": rules, "default_rule": DEFAULT_SPAN_RULE, "correction_margins": margins,
               "library_correction_margin": BOX_MARGIN_PX,
               "settings": {k: {"rule": r, "correction_margin": m} for k, (r, m) in settings.items()}, "results": results,
               "summary": {row[0]: {"rounds_down": row[1], "rounds": row[2], "largest_drop": float(row[3]),
                                    "own_slice_down": row[4], "mean_dice_round0": float(row[5]),
                                    "mean_dice_last": float(row[6])} for row in summary},
               "load_average_before": load_before, "load_average_after": load_after}
    path = write_results(args.name, payload)
    (RESULTS / f"{args.name}.md").write_text(md + "\n")
    print(md)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
