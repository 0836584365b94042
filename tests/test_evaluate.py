"""evaluate_folders on small generated nnU-Net style and ACDC style folders."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from medpy.metric import binary as medpy_binary

from sss_lib.errors import InputError
from sss_lib.evaluate import case_name, evaluate_folders

SPACING_IJK = (0.5, 0.8, 3.0)


def _write(path: Path, kji: np.ndarray, spacing=SPACING_IJK, origin=(10.0, -5.0, 2.0)) -> None:
    img = sitk.GetImageFromArray(kji.astype(np.uint8))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _labels(shift_k: int = 0) -> np.ndarray:
    vol = np.zeros((8, 12, 14), np.uint8)  # [k, j, i]
    vol[2 + shift_k:5 + shift_k, 3:8, 2:9] = 1
    vol[2:6, 8:11, 9:13] = 2
    return vol


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    gt_dir, pred_dir = tmp_path / "labelsTr", tmp_path / "pred"
    _write(gt_dir / "case_a.nii.gz", _labels())
    _write(pred_dir / "case_a.nii.gz", _labels(shift_k=1))  # class 1 one slice (3 mm) off
    _write(gt_dir / "case_b.nrrd", _labels())
    pred_b = _labels()
    pred_b[pred_b == 2] = 0  # class 2 missed entirely
    _write(pred_dir / "case_b.nrrd", pred_b)
    return pred_dir, gt_dir


def test_case_names() -> None:
    assert case_name("x/case_001.nii.gz") == "case_001"
    assert case_name("patient001_frame01_gt.nii.gz", ground_truth=True) == "patient001_frame01"
    assert case_name("patient001_frame01_gt.nii.gz") == "patient001_frame01_gt"
    assert case_name("a.nrrd") == "a" and case_name("notes.txt") is None


def test_scores_cases_and_writes_csv_and_json(folders, tmp_path: Path) -> None:
    pred_dir, gt_dir = folders
    out = tmp_path / "eval"
    report = evaluate_folders(pred_dir, gt_dir, labels={1: "box", 2: "slab"}, out_dir=out)
    assert report.cases == ["case_a", "case_b"]

    gt, pred_a = _labels(), _labels(shift_k=1)
    sp_kji = SPACING_IJK[::-1]
    a1 = report.accumulator.value("case_a", 1)
    assert a1["dice"] == pytest.approx(medpy_binary.dc(pred_a == 1, gt == 1))  # 2*2/(3+3) slices
    assert a1["dice"] == pytest.approx(2 / 3)
    assert a1["hd95"] == pytest.approx(medpy_binary.hd95(pred_a == 1, gt == 1, voxelspacing=sp_kji))
    assert a1["hd95"] == pytest.approx(3.0)  # the shift is one 3 mm slice, not 0.5 or 0.8 mm
    assert a1["asd"] == pytest.approx(medpy_binary.asd(pred_a == 1, gt == 1, voxelspacing=sp_kji))
    assert report.accumulator.value("case_a", 2)["dice"] == 1.0
    b2 = report.accumulator.value("case_b", 2)
    assert b2["dice"] == 0.0 and math.isnan(b2["hd95"])

    summary = report.summary()
    assert summary[2]["dice"].mean == pytest.approx(0.5)
    assert (summary[2]["hd95"].n, summary[2]["hd95"].n_nan) == (1, 1)

    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["label"], r["name"]) for r in rows] == [
        ("case_a", "1", "box"), ("case_a", "2", "slab"), ("case_b", "1", "box"), ("case_b", "2", "slab")]
    assert float(rows[0]["dice"]) == pytest.approx(2 / 3) and rows[3]["hd95"] == "nan"
    data = json.loads((out / "metrics.json").read_text())
    assert data["labels"] == {"1": "box", "2": "slab"}
    assert data["mean"]["2"]["hd95"]["n_nan"] == 1
    assert data["cases"][3]["hd95"] is None
    assert data["mean_dice"] == pytest.approx(report.mean_dice())
    assert report.written == {"csv": out / "metrics.csv", "json": out / "metrics.json"}


def test_tables_have_case_rows_and_mean_rows(folders) -> None:
    report = evaluate_folders(*folders, labels={1: "box", 2: "slab"}, out_dir=None)
    md = report.to_markdown().splitlines()
    assert md[0].startswith("| case | class | Dice |")
    assert len(md) == 2 + 4 + 2  # header, rule, 2 cases x 2 classes, 2 mean rows
    assert md[-2].startswith("| mean | box | 0.8333 ± 0.1667")
    assert "(1 NaN)" in md[-1]
    text = report.to_text()
    assert "case_b" in text and "mean" in text and "slab" in text


def test_labels_default_to_those_found(folders) -> None:
    report = evaluate_folders(*folders, labels=None)
    assert report.labels == {1: "label 1", 2: "label 2"}


def test_missing_prediction_is_an_error_or_flagged(folders) -> None:
    pred_dir, gt_dir = folders
    _write(gt_dir / "case_c.nii.gz", _labels())
    with pytest.raises(InputError, match="no prediction for 1 ground-truth case.*case_c"):
        evaluate_folders(pred_dir, gt_dir, labels={1: "box"})
    report = evaluate_folders(pred_dir, gt_dir, labels={1: "box"}, missing="empty")
    assert report.missing == ["case_c"]
    assert report.accumulator.value("case_c", 1)["dice"] == 0.0
    assert "case_c (missing)" in report.to_markdown()


def test_extra_predictions_are_listed_not_scored(folders) -> None:
    pred_dir, gt_dir = folders
    _write(pred_dir / "case_z.nii.gz", _labels())
    report = evaluate_folders(pred_dir, gt_dir, labels={1: "box"})
    assert report.unmatched == ["case_z"] and "case_z" not in report.cases


def test_grid_mismatch_is_a_clear_error(folders) -> None:
    pred_dir, gt_dir = folders
    _write(pred_dir / "case_a.nii.gz", _labels(), spacing=(0.5, 0.8, 2.0))
    with pytest.raises(InputError, match=r"not on the ground truth's voxel grid \(spacing.*Resample"):
        evaluate_folders(pred_dir, gt_dir, labels={1: "box"})
    _write(pred_dir / "case_a.nii.gz", _labels()[:, :, :-1])
    with pytest.raises(InputError, match="size"):
        evaluate_folders(pred_dir, gt_dir, labels={1: "box"})


def test_acdc_style_gt_names_pair_up(tmp_path: Path) -> None:
    _write(tmp_path / "gt" / "patient001_frame01_gt.nii.gz", _labels())
    _write(tmp_path / "pred" / "patient001_frame01.nii.gz", _labels())
    report = evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels={1: "RV", 2: "LV"})
    assert report.cases == ["patient001_frame01"] and report.mean_dice() == 1.0


def test_empty_or_absent_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no label files"):
        evaluate_folders(tmp_path / "empty", tmp_path / "empty")
    with pytest.raises(InputError, match="folder not found"):
        evaluate_folders(tmp_path / "nope", tmp_path / "empty")


def test_unreadable_label_file_names_the_file(folders) -> None:
    pred_dir, gt_dir = folders
    (gt_dir / "case_a.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(InputError, match="case_a.nii.gz"):
        evaluate_folders(pred_dir, gt_dir, labels={1: "box"})


def test_class_absent_from_both_is_reported_apart_not_averaged_as_one(tmp_path: Path) -> None:
    # Class 2 is in case_a (predicted at Dice 0.5) and in neither truth nor prediction of case_b.
    # Averaged in as Dice 1 it would read 0.75; it must read 0.5, with case_b counted apart.
    gt_a, pred_a = _labels(), _labels()
    pred_a[2:6, 8:11, 9:11] = 0  # half of class 2's columns missed
    gt_b = _labels()
    gt_b[gt_b == 2] = 0
    _write(tmp_path / "gt" / "case_a.nii.gz", gt_a)
    _write(tmp_path / "pred" / "case_a.nii.gz", pred_a)
    _write(tmp_path / "gt" / "case_b.nii.gz", gt_b)
    _write(tmp_path / "pred" / "case_b.nii.gz", gt_b)
    out = tmp_path / "eval"
    report = evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels={1: "box", 2: "slab"}, out_dir=out)

    a2 = report.accumulator.value("case_a", 2)["dice"]
    assert a2 == pytest.approx(medpy_binary.dc(pred_a == 2, gt_a == 2)) and a2 < 0.9
    s2 = report.summary()[2]["dice"]
    assert s2.mean == pytest.approx(a2) and (s2.n, s2.n_absent) == (1, 1)
    assert report.summary()[1]["dice"].n_absent == 0
    assert report.absent_in_both() == [("case_b", 2)]
    assert report.mean_dice() == pytest.approx((1.0 + a2) / 2)

    md = report.to_markdown()
    assert "| case_b | slab | absent | absent | absent | absent |" in md
    assert "(1 absent)" in md and "not averaged (not counted as Dice 1)" in md
    assert "slab in 1 case(s)" in report.to_text()
    with (out / "metrics.csv").open() as f:
        rows = {(r["case"], r["label"]): r for r in csv.DictReader(f)}
    assert rows[("case_b", "2")]["absent_in_both"] == "1" and rows[("case_a", "2")]["absent_in_both"] == "0"
    data = json.loads((out / "metrics.json").read_text())
    assert data["absent_in_both"] == [{"case": "case_b", "label": 2}]
    assert data["mean"]["2"]["dice"]["n_absent"] == 1 and data["mean"]["2"]["dice"]["n"] == 1
    assert data["absent_note"].startswith("absent from both")
    assert [c["absent"] for c in data["cases"]] == [False, False, False, True]


def test_no_absent_note_when_every_class_is_present(folders) -> None:
    report = evaluate_folders(*folders, labels={1: "box", 2: "slab"})
    assert report.absent_in_both() == [] and report.absent_note() == ""
    assert "absent" not in report.to_markdown()
