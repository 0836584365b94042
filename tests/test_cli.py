"""The command line: help texts, one-line errors with exit status 2, and a real segment run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sss_lib.cli import main
from sss_lib.demo import box_prompt_from_label
from sss_lib.volume_io import read_label, read_volume


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sss_lib", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", [[], ["segment"], ["weights"], ["weights", "download"], ["demo"]])
def test_help_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_missing_image_is_one_line_error(tmp_path, capsys):
    (tmp_path / "p.json").write_text("{}")
    code = main(["segment", str(tmp_path / "nope.nrrd"), "--prompts", str(tmp_path / "p.json"),
                 "-o", str(tmp_path / "seg.nrrd")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "nope.nrrd" in err
    assert not (tmp_path / "seg.nrrd").exists()


def test_bad_prompts_and_unknown_backbone(tmp_path, data_file, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"classes": [{"label": 1, "prompts": [{"key_slice": 500, "box": [1, 1, 4, 4]}]}]}')
    image = str(data_file("lung1_crop_image.nrrd"))
    assert main(["segment", image, "--prompts", str(bad), "-o", str(tmp_path / "s.nrrd")]) == 2
    assert "outside the volume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse refuses unknown choices with status 2
        main(["segment", image, "--prompts", str(bad), "-o", "x.nrrd", "--backbone", "sam3"])
    assert e.value.code == 2


def test_missing_sam2_checkpoint_says_how_to_get_it(tmp_path, data_file, monkeypatch, capsys):
    monkeypatch.setenv("SSS_HOME", str(tmp_path / "home"))
    image = read_volume(data_file("lung1_crop_image.nrrd"))
    prompts = box_prompt_from_label(read_label(data_file("lung1_crop_label.nrrd"), reference=image))
    prompts.save(tmp_path / "p.json")
    code = main(["segment", str(data_file("lung1_crop_image.nrrd")), "--prompts", str(tmp_path / "p.json"),
                 "-o", str(tmp_path / "s.nrrd"), "--backbone", "sam2.1_hiera_tiny", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "python -m sss_lib weights download sam2.1_hiera_tiny" in err
    assert str(tmp_path / "home" / "weights" / "sam2.1_hiera_tiny.pt") in err


def test_segment_writes_a_label_map_on_the_input_grid(tmp_path, data_file):
    image_path = data_file("lung1_crop_image.nrrd")
    image = read_volume(image_path)
    reference = read_label(data_file("lung1_crop_label.nrrd"), reference=image)
    prompts = box_prompt_from_label(reference)
    prompts.save(tmp_path / "p.json", image, coordinates="physical")
    out = tmp_path / "seg.nii.gz"
    proc = run_cli("segment", str(image_path), "--prompts", str(tmp_path / "p.json"), "-o", str(out),
                   "--backbone", "litemedsam", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    seg = read_label(out)
    assert seg.same_grid(image, tol=1e-4)
    inter = np.logical_and(seg.voxels == 1, reference.voxels > 0).sum()
    dice = 2 * inter / ((seg.voxels == 1).sum() + (reference.voxels > 0).sum())
    assert dice > 0.7
    assert "class 1: slices" in proc.stdout
