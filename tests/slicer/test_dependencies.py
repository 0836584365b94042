"""The first-use dependency check of SSSSegment: what is missing, asking, installing, failing offline."""

import pytest


@pytest.fixture
def deps(slicer_core):
    from SSSSegmentLib import dependencies

    return dependencies


def test_old_python_is_refused_with_the_slicer_version(deps):
    from SSSSegmentLib.errors import NeedsNewerSlicerError

    with pytest.raises(NeedsNewerSlicerError, match="5.10 or newer.*Python 3.9"):
        deps.check_python((3, 9, 10))
    deps.check_python((3, 12, 0))


def test_requirements_are_checked_against_installed_versions(deps):
    assert deps.satisfied("numpy>=1.0")
    assert not deps.satisfied("numpy<1.0")
    assert not deps.satisfied("sss-package-that-does-not-exist>=1")


def test_nothing_missing_means_no_question(deps, monkeypatch):
    monkeypatch.setattr(deps, "PIP_REQUIREMENTS", [("numpy", "numpy>=1.0")])
    monkeypatch.setattr(deps, "torch_missing", lambda: False)
    asked = []
    assert deps.ensure_dependencies(lambda text, details: asked.append(details) or True, None, None)
    assert asked == []


def test_declined_installation_installs_nothing(deps, monkeypatch):
    monkeypatch.setattr(deps, "PIP_REQUIREMENTS", [("sss-absent-pkg", "sss-absent-pkg==1.0")])
    monkeypatch.setattr(deps, "torch_missing", lambda: True)
    asked, installed = [], []
    ok = deps.ensure_dependencies(
        lambda text, details: asked.append(details) or False, installed.append, lambda: installed.append("torch")
    )
    assert not ok and installed == []
    assert "sss-absent-pkg==1.0" in asked[0] and "torch>=2.5.1" in asked[0]


def test_failed_pip_install_says_what_to_do_offline(deps, monkeypatch):
    from SSSSegmentLib.errors import UserFacingError

    monkeypatch.setattr(deps, "PIP_REQUIREMENTS", [("sss-absent-pkg", "sss-absent-pkg==1.0")])
    monkeypatch.setattr(deps, "torch_missing", lambda: False)

    def offline_pip(requirements):
        raise RuntimeError("Could not find a version that satisfies the requirement (no network)")

    with pytest.raises(UserFacingError, match="no internet access"):
        deps.ensure_dependencies(lambda text, details: True, offline_pip, None)


def test_sam2_is_built_without_its_cuda_extension(deps, monkeypatch):
    import os

    monkeypatch.delenv("SAM2_BUILD_CUDA", raising=False)
    seen = []
    deps.pip_install_without_cuda_build(lambda reqs: seen.append((reqs, os.environ.get("SAM2_BUILD_CUDA"))))(["sam2==1.1.0"])
    assert seen == [(["sam2==1.1.0"], "0")] and "SAM2_BUILD_CUDA" not in os.environ


def test_missing_pytorch_extension_is_explained(deps, monkeypatch):
    import sys

    from SSSSegmentLib.errors import UserFacingError

    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import fails as when the extension is absent
    with pytest.raises(UserFacingError, match="Extensions Manager"):
        deps.install_torch_with_pytorchutils()


def test_repository_root_is_put_on_sys_path_from_source(slicer_core, monkeypatch, tmp_path):
    import sys

    from SSSSegmentLib.paths import ensure_sss_lib_importable

    (tmp_path / "sss_lib").mkdir()
    (tmp_path / "sss_lib" / "__init__.py").write_text("")
    (tmp_path / "SSSSegment").mkdir()
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert ensure_sss_lib_importable(str(tmp_path / "SSSSegment")) == str(tmp_path)
    assert str(tmp_path) in sys.path
    assert ensure_sss_lib_importable(str(tmp_path / "elsewhere" / "x")) is None
