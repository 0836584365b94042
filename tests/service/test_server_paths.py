"""Client-named paths stay inside ``--data-root``: ``..``, absolute paths and symbolic links that
point outside are refused; paths inside (also through a link that stays inside) are accepted."""

from __future__ import annotations

import os

import pytest

from sss_lib.service.paths import PathRefused, resolve_under_root


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "data"
    (root / "cases" / "a").mkdir(parents=True)
    (root / "cases" / "a" / "img.nii.gz").write_bytes(b"x")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.txt").write_text("no")
    os.symlink(outside, root / "escape")
    os.symlink(root / "cases", root / "inner")
    return root


def test_paths_inside_the_root_resolve(root):
    assert resolve_under_root("cases/a/img.nii.gz", root) == (root / "cases/a/img.nii.gz").resolve()
    assert resolve_under_root("cases/../cases/a", root) == (root / "cases/a").resolve()
    assert resolve_under_root("inner/a", root) == (root / "cases/a").resolve()  # a link that stays inside


@pytest.mark.parametrize("name, code", [
    ("../secret/key.txt", "path_refused"),
    ("cases/../../secret", "path_refused"),
    ("escape/key.txt", "path_refused"),  # a symbolic link out of the root
    ("escape", "path_refused"),
    ("/etc/passwd", "bad_path"),
    ("~/x", "bad_path"),
    ("", "bad_path"),
    ("a\x00b", "bad_path"),
    ("cases/missing", "path_not_found"),
])
def test_escapes_and_bad_paths_are_refused(root, name, code):
    with pytest.raises(PathRefused) as info:
        resolve_under_root(name, root)
    assert info.value.code == code


def test_no_data_root_accepts_no_path(tmp_path):
    with pytest.raises(PathRefused, match="--data-root"):
        resolve_under_root("x", None)
