"""Dataset readers (nnU-Net v2 raw, ACDC, plain folders), layout detection and label checks."""

import json
import shutil
from pathlib import Path

import pytest

from sss_lib.datasets import Case, CaseList, check_labels, detect_layout, open_dataset
from sss_lib.errors import InputError
from sss_lib.phantoms import make_cardiac_phantom, make_phantom_dataset
from sss_lib.volume_io import read_label, write_volume

TINY = dict(n_slices=3, size=(16, 16))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("datasets")
    return {
        "nnunet": make_phantom_dataset(base / "Dataset001_Heart", 3, seed=1, labeled=2, **TINY),
        "acdc": make_phantom_dataset(base / "acdc", 2, seed=2, layout="acdc", labeled=1, **TINY),
        "plain": make_phantom_dataset(base / "plain", 3, seed=3, layout="plain", labeled=2, **TINY),
    }


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_nnunet_layout_cases_classes_and_label_volumes(datasets):
    cases = open_dataset(datasets["nnunet"])
    assert cases.layout == "nnunet" and detect_layout(datasets["nnunet"]) == "nnunet"
    assert [c.case_id for c in cases] == ["case_000", "case_001", "case_002"]
    assert [c.case_id for c in cases.labeled] == ["case_000", "case_001"]
    assert cases.get("case_002").label_path is None and cases.get("case_002").meta["split"] == "test"
    assert cases[0].image_path.name == "case_000_0000.nii.gz" and cases[0].label_path.name == "case_000.nii.gz"
    assert cases.class_names == {1: "RV", 2: "Myo", 3: "LV"}
    assert cases.modality == "MR"  # channel name "cineMRI"
    assert len(open_dataset(datasets["nnunet"], include_unlabeled=False)) == 2

    report = check_labels(cases)
    _, lab = make_cardiac_phantom(1001, **TINY)
    voxel_mm3 = 1.5 * 1.5 * 8.0
    for label in (1, 2, 3):
        assert report.voxels["case_001"][label] == int((lab.voxels == label).sum())
        assert report.volumes_mm3["case_001"][label] == pytest.approx(report.voxels["case_001"][label] * voxel_mm3)
    lo, hi = report.volume_ranges_mm3()[3]
    assert lo == min(v[3] for v in report.volumes_mm3.values()) and hi >= lo
    assert not report.inferred and report.missing == {}


def test_nnunet_errors_name_the_file(datasets, tmp_path):
    root = copy(datasets["nnunet"], tmp_path / "d")
    meta = json.loads((root / "dataset.json").read_text())

    broken = {k: v for k, v in meta.items() if k != "file_ending"}
    (root / "dataset.json").write_text(json.dumps(broken))
    with pytest.raises(InputError, match=r"dataset\.json: lacks the field\(s\) file_ending"):
        open_dataset(root)

    (root / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"0": "T1", "1": "T2"}}))
    with pytest.raises(InputError, match="has 2 channels .*SSS segments one channel"):
        open_dataset(root)
    # Choosing the channel by name works (its files are _0001: none here, so only the test split is empty
    # and the labels have no images).
    with pytest.raises(InputError, match="has no image"):
        open_dataset(root, channel="T2")
    assert len(open_dataset(root, channel="T1")) == 3

    (root / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0, "tumour": [1, 2]}}))
    with pytest.raises(InputError, match="region-based"):
        open_dataset(root)
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "training": [], "labels": {"0": "b"}}))
    with pytest.raises(InputError, match="Decathlon"):
        open_dataset(root)

    (root / "dataset.json").write_text(json.dumps(meta))
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    with pytest.raises(InputError, match=r"labelsTr/case_001\.nii\.gz: label file missing for case 'case_001'"):
        open_dataset(root)


def test_nnunet_explicit_file_list(datasets, tmp_path):
    root = copy(datasets["nnunet"], tmp_path / "d")
    meta = json.loads((root / "dataset.json").read_text())
    meta["dataset"] = {
        "a": {"images": ["imagesTr/case_000_0000.nii.gz"], "label": "labelsTr/case_000.nii.gz"},
        "b": {"images": ["imagesTs/case_002_0000.nii.gz"]},
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    cases = open_dataset(root)
    assert [(c.case_id, c.labeled) for c in cases] == [("a", True), ("b", False)]


def test_check_labels_refuses_undeclared_values_and_other_grids(datasets, tmp_path):
    root = copy(datasets["nnunet"], tmp_path / "d")
    path = root / "labelsTr" / "case_000.nii.gz"
    lab = read_label(path)
    lab.voxels[0, 0, 0] = 7
    write_volume(lab, path)
    with pytest.raises(InputError, match=r"case_000\.nii\.gz: holds label value\(s\) 7 that the dataset does not declare"):
        check_labels(open_dataset(root))

    # A second bad file: one error that lists both.
    other = root / "labelsTr" / "case_001.nii.gz"
    lab1 = read_label(other)
    lab1.origin = lab1.origin + 5.0
    write_volume(lab1, other)
    with pytest.raises(InputError, match=r"2 label files have problems: .*case_000.*value\(s\) 7.*case_001.*grid differs"):
        check_labels(open_dataset(root))
    # Without the grid check only the value problem remains.
    with pytest.raises(InputError, match="value") as err:
        check_labels(open_dataset(root), check_grid=False)
    assert "case_001" not in str(err.value)


def test_acdc_layout(datasets, tmp_path):
    root = datasets["acdc"]
    assert detect_layout(root) == "acdc"
    cases = open_dataset(root)
    ids = [c.case_id for c in cases]
    assert ids == ["patient001_frame01", "patient001_frame09", "patient002_frame01", "patient002_frame10"]
    assert [c.labeled for c in cases] == [True, True, False, False]
    assert cases[0].meta["phase"] == "ED" and cases[1].meta["phase"] == "ES" and cases[0].meta["group"] == "NOR"
    assert cases.class_names == {1: "RV", 2: "Myo", 3: "LV"}
    assert set(check_labels(cases).voxels["patient001_frame09"]) == {1, 2, 3}

    # The official layout: training/ and testing/ folders, and a 4D series that is ignored
    # (a junk file here: reading it would fail).
    official = tmp_path / "ACDC" / "database"
    shutil.copytree(root / "patient001", official / "training" / "patient001")
    shutil.copytree(root / "patient002", official / "testing" / "patient002")
    (official / "training" / "patient001" / "patient001_4d.nii.gz").write_bytes(b"not a volume")
    cases = open_dataset(official.parent.parent / "ACDC" / "database")
    assert [c.meta["split"] for c in cases] == ["testing", "testing", "training", "training"]
    check_labels(cases)

    gt = official / "training" / "patient001" / "patient001_frame09_gt.nii.gz"
    (official / "training" / "patient001" / "patient001_frame09.nii.gz").unlink()
    with pytest.raises(InputError, match=r"patient001_frame09_gt\.nii\.gz: has no image"):
        open_dataset(official)
    assert gt.exists()


def test_plain_folders_matching_names_and_suffixes(datasets, tmp_path):
    cases = open_dataset(datasets["plain"])
    assert cases.layout == "plain" and cases.class_names == {}
    assert [(c.case_id, c.labeled) for c in cases] == [("case_000", True), ("case_001", True), ("case_002", False)]
    report = check_labels(cases)
    assert report.inferred and report.class_names == {1: "class 1", 2: "class 2", 3: "class 3"}

    root = copy(datasets["plain"], tmp_path / "p")
    (root / "labels" / "case_000.nii.gz").rename(root / "labels" / "case_000_seg.nii.gz")
    (root / "classes.json").write_text(json.dumps({"RV": 1, "Myo": 2, "LV": 3}))
    cases = open_dataset(root)
    assert cases.get("case_000").label_path.name == "case_000_seg.nii.gz"
    assert cases.class_names == {1: "RV", 2: "Myo", 3: "LV"}
    (root / "labels" / "stray_gt.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match=r"stray_gt\.nii\.gz: has no image"):
        open_dataset(root)


def test_plain_case_list_and_unlabeled_folder(datasets, tmp_path):
    root = copy(datasets["plain"], tmp_path / "p")
    (root / "cases.csv").write_text(
        "# my cases\ncase_id,image,label\nx,images/case_000.nii.gz,labels/case_000.nii.gz\ny,images/case_002.nii.gz,\n"
    )
    cases = open_dataset(root)
    assert [(c.case_id, c.labeled) for c in cases] == [("x", True), ("y", False)]
    assert open_dataset(root / "cases.csv")[0].image_path == (root / "images" / "case_000.nii.gz").resolve()

    (root / "cases.csv").write_text("x images/case_000.nii.gz labels/missing.nii.gz\n")
    (root / "cases.csv").rename(root / "cases.txt")
    with pytest.raises(InputError, match=r"missing\.nii\.gz: label file missing for case 'x' \(cases\.txt line 1\)"):
        open_dataset(root)

    loose = tmp_path / "loose"
    loose.mkdir()
    for p in (datasets["plain"] / "images").iterdir():
        shutil.copy(p, loose / p.name)
    (loose / "notes.md").write_text("not a volume")
    cases = open_dataset(loose)
    assert len(cases) == 3 and not cases.labeled
    with pytest.raises(InputError, match="has no labeled cases"):
        check_labels(cases)


def test_detection_and_empty_datasets(tmp_path):
    with pytest.raises(InputError, match="not found"):
        open_dataset(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="is not a dataset folder"):
        open_dataset(empty)
    (empty / "images").mkdir()
    with pytest.raises(InputError, match="holds no cases"):
        open_dataset(empty)
    with pytest.raises(InputError, match=r"dataset\.json: not found"):
        open_dataset(empty, layout="nnunet")
    with pytest.raises(InputError, match="used twice"):
        CaseList(tmp_path, "plain", [Case("a", tmp_path / "1.nii"), Case("a", tmp_path / "2.nii")], {})
