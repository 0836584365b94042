"""Image encoders on the CPU through an inference runtime: OpenVINO, ONNX Runtime, or torch itself.

Eager fp32 torch is the slowest way to run an image encoder on a CPU; the same network exported to
ONNX and run by OpenVINO (or ONNX Runtime) gives the same features (max abs difference ~1e-6) in
less time. :func:`build_encoder_runtime` picks one:

* ``"auto"``: OpenVINO when installed, else ONNX Runtime, else torch; CUDA and MPS keep torch;
  ``$SSS_ENCODER_RUNTIME`` overrides what ``"auto"`` means (any of :data:`RUNTIME_CHOICES`);
* ``"openvino"``, ``"onnxruntime"``: that one first, then the others in the same order;
* ``"openvino-bf16"``: OpenVINO with its bf16 precision hint, offered only where the CPU computes
  bf16 natively; its features differ from fp32 beyond the check's fp32 tolerance, so a backbone that
  uses it adds :attr:`EncoderRuntime.cache_suffix` to its embedding cache key. "auto" never picks
  it: whether bf16 keeps Dice within 0.005 per bundled case is for ``bench_engine.py --runtimes`` to
  show on such a CPU (on AVX2-only CPUs OpenVINO takes the hint and computes in f32 anyway);
* ``"torch"``: no runtime (the backbone runs its torch module, ``None`` is returned).

The export is made once and cached in the SSS cache folder, beside the weights::

    <sss_home>/weights/encoders/<model>-<weights sha256[:16]>-<input>px-torch<version>-opset<N>/
        model.onnx                         the exported encoder, only ever created by an atomic rename
        model.json                         its SHA-256, size, input shape, torch version, when
        check2-<runtime>-<version>.json    the one-time comparison with torch on a fixed input
        openvino-cache/                    OpenVINO's compiled blobs (its own cache, its own keys)

A cached export whose SHA-256 differs from ``model.json`` (a damaged file) is exported again.
Each runtime (and runtime version) compares its output with the torch module's on a fixed input
once, with bounds that fit its precision (:data:`TOLERANCE`, :data:`REL_L2_TOLERANCE`); the result
is kept in its check file. A runtime that is missing, fails to load, or fails the
check is skipped with one logged warning and the next one is used, down to torch: choosing a
runtime never fails for the user.

Shapes: the encoder takes ``(1, 3, s, s)`` float32 and returns a tuple of float32 tensors (one for
LiteMedSAM, three FPN levels for SAM-2). torch, onnx, openvino and onnxruntime are imported only
inside functions.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RUNTIME_CHOICES = ("auto", "openvino", "onnxruntime", "openvino-bf16", "torch")
RUNTIME_ENV = "SSS_ENCODER_RUNTIME"
#: What "auto" tries on a CPU, in order (torch is always the last resort).
AUTO_ORDER = ("openvino", "onnxruntime")
ONNX_OPSET = 17
#: The check passes when max |runtime - torch| <= TOLERANCE * max(1, max |torch|) and the relative
#: L2 error ||runtime - torch|| / ||torch|| <= REL_L2_TOLERANCE. fp32 runtimes match torch to ~1e-6
#: (measured: 3e-6 on LiteMedSAM, 4e-6 on SAM-2 tiny), so 1e-3 leaves room for other kernels and
#: still fails any real change. bf16 rounds every layer's inputs to 8 mantissa bits: its single
#: values may move far (hence the loose max), but its error spread over the whole output stays at a
#: few percent, while a broken export (a lost bias, a dropped or swapped channel, another weight)
#: moves the whole output by tens of percent; the relative L2 bound is the one that catches it.
TOLERANCE = {"openvino": 1e-3, "onnxruntime": 1e-3, "openvino-bf16": 2.5e-1}
REL_L2_TOLERANCE = {"openvino": 1e-4, "onnxruntime": 1e-4, "openvino-bf16": 5e-2}
#: Runtimes whose features equal torch's within the fp32 tolerance share torch's cache key.
_EXACT = ("openvino", "onnxruntime")
_CHECK_SEED = 0
#: In the check file's name: a check made under other rules (before the relative L2 bound) is redone.
CHECK_VERSION = 2
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")

#: Exports made by this process (tests read it to prove a cached export was reused).
export_count = 0


class RuntimeUnavailable(Exception):
    """A runtime cannot be used here (not installed, or the CPU lacks what it needs)."""


@dataclasses.dataclass(frozen=True)
class EncoderCheck:
    """The one-time comparison of a runtime with torch (the JSON beside the export)."""

    runtime: str
    runtime_version: str
    onnx_sha256: str
    max_abs_diff: float
    tolerance: float
    passed: bool
    checked_at: str
    rel_l2_diff: float = 0.0
    rel_l2_tolerance: float = 0.0


class EncoderRuntime:
    """An exported image encoder run by OpenVINO or ONNX Runtime; thread-safe.

    Call it with a ``(1, 3, s, s)`` float32 CPU tensor; it returns a tuple of float32 CPU tensors in
    the torch module's output order.

    Attributes:
        name: ``"openvino"``, ``"onnxruntime"`` or ``"openvino-bf16"``.
        check: the comparison with torch this runtime passed.
        precision: what the runtime computes in after compiling (``"f32"``, ``"bf16"``): OpenVINO
            quietly computes in f32 where the CPU lacks a requested precision.
    """

    def __init__(self, name: str, run: Callable[[np.ndarray], list[np.ndarray]], check: EncoderCheck,
                 precision: str = "f32",
                 run_many: Callable[[list[np.ndarray]], list[list[np.ndarray]]] | None = None) -> None:
        self.name = name
        self.check = check
        self.precision = precision
        self._run = run
        self._run_many = run_many
        self._lock = threading.Lock()

    @property
    def cache_suffix(self) -> str:
        """What a backbone adds to its embedding cache key: ``""`` when the features equal torch's
        within the fp32 tolerance, else ``"+<name>"`` (so embeddings of another precision are never
        served for these)."""
        return "" if self.name in _EXACT else f"+{self.name}"

    def __call__(self, x: "torch.Tensor") -> tuple["torch.Tensor", ...]:
        import torch

        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        with self._lock:
            outs = self._run(arr)
        return tuple(torch.from_numpy(o) for o in outs)

    def run_many(self, xs: "list[torch.Tensor]") -> list[tuple["torch.Tensor", ...]]:
        """Encode several ``(1, 3, s, s)`` inputs; results in input order, as :meth:`__call__` gives.

        OpenVINO runs them side by side (its THROUGHPUT mode: one stream per few cores, each slice
        on its own stream), which uses a CPU better than one slice at a time across all cores; for
        embedding slices ahead (a whole volume, or the prefetch around the current extent).
        Other runtimes run them one after the other.
        """
        import torch

        arrs = [np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy()) for x in xs]
        with self._lock:
            outs = self._run_many(arrs) if self._run_many is not None and len(arrs) > 1 \
                else [self._run(a) for a in arrs]
        return [tuple(torch.from_numpy(o) for o in out) for out in outs]

    def __repr__(self) -> str:
        return f"EncoderRuntime({self.name}, max_abs_diff={self.check.max_abs_diff:.2g})"


# ------------------------------------------------------------------------------------------ choice


def runtime_candidates(requested: str, device_type: str) -> list[str]:
    """The runtimes to try, in order, for ``requested`` on a ``device_type`` ("cpu", "cuda", "mps").

    Raises:
        InputError: ``requested`` (or ``$SSS_ENCODER_RUNTIME``) is not one of :data:`RUNTIME_CHOICES`.
    """
    choice = (requested or "auto").strip().lower()
    if choice == "auto":
        choice = os.environ.get(RUNTIME_ENV, "auto").strip().lower() or "auto"
    if choice not in RUNTIME_CHOICES:
        raise InputError(None, f"unknown encoder runtime {choice!r}",
                         f"Choose one of: {', '.join(RUNTIME_CHOICES)} (or unset {RUNTIME_ENV}).")
    if device_type != "cpu":
        if choice not in ("auto", "torch"):
            log.warning("the %s encoder runtime runs on the CPU only; on %s the encoder stays in torch",
                        choice, device_type)
        return ["torch"]
    if choice == "torch":
        return ["torch"]
    if choice == "auto":
        return [*AUTO_ORDER, "torch"]
    return [choice, *(r for r in AUTO_ORDER if r != choice), "torch"]


def build_encoder_runtime(
    module: "torch.nn.Module",
    *,
    model_name: str,
    weights_sha256: str,
    image_size: int,
    requested: str = "auto",
    device_type: str = "cpu",
    cache_root: Path | None = None,
) -> EncoderRuntime | None:
    """The fastest usable runtime for ``module`` (``(1, 3, s, s)`` -> tensor or tuple), or None: torch.

    Args:
        module: the image encoder in eval mode on the CPU; exported once per cache folder.
        model_name: names the cache folder (e.g. ``"litemedsam"``).
        weights_sha256: the weights file's SHA-256; anything else (``"random-init"``) keys the
            cache by a hash of the module's tensors instead.
        image_size: ``s``.
        requested: one of :data:`RUNTIME_CHOICES`.
        device_type: the backbone's torch device type; anything but "cpu" keeps torch.
        cache_root: where export folders go (default ``<sss_home>/weights/encoders``).

    Raises:
        InputError: unknown ``requested``. Export, load and check failures are never raised: they
        are logged once and the next runtime is tried.
    """
    candidates = runtime_candidates(requested, device_type)
    if candidates == ["torch"]:
        return None
    folder = _export_folder(module, model_name, weights_sha256, image_size, cache_root)
    job = _Job(module, folder, (1, 3, image_size, image_size))
    # A runtime that was asked for (not just "auto"'s first guess) and is missing gets a warning.
    explicit = (requested or "auto").strip().lower() != "auto" \
        or os.environ.get(RUNTIME_ENV, "auto").strip().lower() not in ("", "auto")
    problems: list[str] = []
    for name in candidates:
        if name == "torch":
            break
        try:
            runtime = job.build(name)
        except RuntimeUnavailable as why:
            if explicit and name == candidates[0]:
                problems.append(f"{name}: {why}")
            else:
                log.debug("encoder runtime %s unavailable: %s", name, why)
            continue
        except Exception as error:  # noqa: BLE001 - any export/load/check failure means: next runtime
            problems.append(f"{name}: {type(error).__name__}: {error}")
            continue
        if problems:
            log.warning("image encoder of %s: %s; using %s", model_name, "; ".join(problems), name)
        log.info("image encoder of %s runs in %s (max abs difference to torch %.2g)",
                 model_name, name, runtime.check.max_abs_diff)
        return runtime
    if problems:
        log.warning("image encoder of %s: %s; using torch", model_name, "; ".join(problems))
    return None


# ------------------------------------------------------------------------------------------ export


def _export_folder(module: "torch.nn.Module", model_name: str, weights_sha256: str, image_size: int,
                   cache_root: Path | None) -> Path:
    import torch

    if cache_root is None:
        from ..weights import cache_dir

        cache_root = cache_dir() / "encoders"
    sha = weights_sha256 if re.fullmatch(r"[0-9a-f]{64}", weights_sha256 or "") else _module_digest(module)
    name = f"{model_name}-{sha[:16]}-{image_size}px-torch{torch.__version__}-opset{ONNX_OPSET}"
    return Path(cache_root) / _SAFE.sub("_", name)


def _module_digest(module: "torch.nn.Module") -> str:
    """SHA-256 of the module's tensors (names, shapes, dtypes, values), for weights without a file."""
    import torch

    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}:{tuple(tensor.shape)}:{t.dtype};".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    _write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class _Job:
    """One build: the export (made or reused once) and the torch reference output (computed once)."""

    def __init__(self, module: "torch.nn.Module", folder: Path, shape: tuple[int, int, int, int]) -> None:
        self.module, self.folder, self.shape = module, folder, shape
        self._onnx: tuple[Path, str] | None = None
        self._reference: list[np.ndarray] | None = None

    # -- export ------------------------------------------------------------------------------------
    def onnx(self) -> tuple[Path, str]:
        """``(model.onnx, its sha256)``, exporting when absent or damaged."""
        if self._onnx is None:
            path, meta_path = self.folder / "model.onnx", self.folder / "model.json"
            meta = _read_json(meta_path)
            if path.is_file() and meta is not None:
                from ..download import file_sha256

                sha = file_sha256(path)
                if sha == meta.get("onnx_sha256"):
                    self._onnx = (path, sha)
                    return self._onnx
                log.warning("the cached encoder export %s is damaged (SHA-256 %s, recorded %s); exporting again",
                            path, sha[:16], str(meta.get("onnx_sha256"))[:16])
            elif path.is_file():
                log.warning("the cached encoder export %s has no record; exporting again", path)
            self._onnx = self._export(path, meta_path)
        return self._onnx

    def _export(self, path: Path, meta_path: Path) -> tuple[Path, str]:
        import torch

        global export_count
        self.folder.mkdir(parents=True, exist_ok=True)
        log.info("exporting the image encoder to %s (once; takes a while)", path)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix="model.", suffix=".onnx.tmp")
        os.close(fd)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                # The tracer warns about Python-level shape asserts; the shapes are fixed here.
                warnings.simplefilter("ignore")
                x = torch.zeros(self.shape, dtype=torch.float32)
                torch.onnx.export(self.module, (x,), tmp, dynamo=False, opset_version=ONNX_OPSET,
                                  input_names=["image"], do_constant_folding=True)
            from ..download import file_sha256

            sha = file_sha256(Path(tmp))
            size = Path(tmp).stat().st_size
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        export_count += 1
        _write_json(meta_path, {"onnx_sha256": sha, "size_bytes": size, "input_shape": list(self.shape),
                                "torch": torch.__version__, "opset": ONNX_OPSET, "exported_at": _now()})
        return path, sha

    # -- the reference -----------------------------------------------------------------------------
    def check_input(self) -> np.ndarray:
        return np.random.default_rng(_CHECK_SEED).random(self.shape, dtype=np.float32)

    def reference(self) -> list[np.ndarray]:
        if self._reference is None:
            import torch

            with torch.inference_mode():
                out = self.module(torch.from_numpy(self.check_input()))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self._reference = [o.detach().float().cpu().numpy() for o in outs]
        return self._reference

    # -- one runtime -------------------------------------------------------------------------------
    def build(self, name: str) -> EncoderRuntime:
        version, load = _LOADERS[name]()
        onnx_path, onnx_sha = self.onnx()
        loaded = load(onnx_path)
        run = loaded.run
        check_path = self.folder / _SAFE.sub("_", f"check{CHECK_VERSION}-{name}-{version}.json")
        recorded = _read_json(check_path)
        fields = [f.name for f in dataclasses.fields(EncoderCheck)]
        if recorded is not None and recorded.get("onnx_sha256") == onnx_sha and all(f in recorded for f in fields):
            check = EncoderCheck(**{f: recorded[f] for f in fields})
        else:
            check = self._compare(name, version, onnx_sha, run)
            _write_json(check_path, dataclasses.asdict(check))
        if not check.passed:
            raise RuntimeError(f"its output differs from torch's by {check.max_abs_diff:.3g} (tolerance "
                               f"{check.tolerance:.3g}), relative L2 {check.rel_l2_diff:.3g} (tolerance "
                               f"{check.rel_l2_tolerance:.3g}); recorded in {check_path}")
        return EncoderRuntime(name, run, check, loaded.precision, loaded.run_many)

    def _compare(self, name: str, version: str, onnx_sha: str, run: Callable) -> EncoderCheck:
        return compare_outputs(name, version, onnx_sha, run(self.check_input()), self.reference())


def compare_outputs(name: str, version: str, onnx_sha: str, outs: list[np.ndarray],
                    ref: list[np.ndarray]) -> EncoderCheck:
    """Compare a runtime's outputs with torch's under ``name``'s tolerances (see :data:`TOLERANCE`).

    Args:
        name: the runtime (its tolerances: :data:`TOLERANCE`, :data:`REL_L2_TOLERANCE`).
        outs, ref: the runtime's and torch's outputs on the same input, in the same order.
    """
    if len(outs) != len(ref) or any(o.shape != r.shape for o, r in zip(outs, ref)):
        diff = rel = float("inf")
    else:
        diff = max(float(np.abs(o.astype(np.float32) - r).max()) for o, r in zip(outs, ref))
        rel = max(float(np.linalg.norm((o.astype(np.float32) - r).ravel()))
                  / max(float(np.linalg.norm(r.ravel())), 1e-12) for o, r in zip(outs, ref))
    scale = max(1.0, max(float(np.abs(r).max()) for r in ref))
    tol, rel_tol = TOLERANCE[name] * scale, REL_L2_TOLERANCE[name]
    passed = bool(np.isfinite(diff) and np.isfinite(rel) and diff <= tol and rel <= rel_tol)
    log.info("encoder check %s %s: max abs difference %.3g (tolerance %.3g), relative L2 %.3g (tolerance %.3g)",
             name, version, diff, tol, rel, rel_tol)
    return EncoderCheck(name, version, onnx_sha, diff, tol, passed, _now(), rel, rel_tol)


# ----------------------------------------------------------------------------------------- loaders


def _threads() -> int:
    import torch

    return max(1, torch.get_num_threads())


@dataclasses.dataclass(frozen=True)
class _Loaded:
    """A runtime's model, loaded: one input at a time, what it computes in, several at a time."""

    run: Callable[[np.ndarray], list[np.ndarray]]
    precision: str = "f32"
    run_many: Callable[[list[np.ndarray]], list[list[np.ndarray]]] | None = None


def _openvino(precision: str) -> Callable[[], tuple[str, Callable[[Path], _Loaded]]]:
    def loader() -> tuple[str, Callable[[Path], _Loaded]]:
        try:
            import openvino as ov
        except ImportError as e:
            raise RuntimeUnavailable(f"not installed ({e}); pip install openvino") from None
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise RuntimeUnavailable("this CPU has no native bf16")

        def load(path: Path) -> _Loaded:
            # The precision is explicit: on CPUs with AMX OpenVINO would otherwise default to bf16.
            # CACHE_DIR keeps the compiled model: compiling SAM-2's encoder takes CPU-minutes, loading
            # the blob a fraction of a second (OpenVINO keys it by model, settings and version).
            compiled = core.compile_model(str(path), "CPU", {
                "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": _threads(), "CACHE_DIR": str(path.parent / "openvino-cache")})
            request = compiled.create_infer_request()
            n_out = len(compiled.outputs)
            actual = _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))

            def run(x: np.ndarray) -> list[np.ndarray]:
                # share_inputs: OpenVINO reads the caller's array in place (it is contiguous float32);
                # the outputs are copied once, because the request reuses its buffers.
                request.infer({0: x}, share_inputs=True)
                return [request.get_output_tensor(i).data.copy() for i in range(n_out)]

            many: list[Any] = []  # the THROUGHPUT model, compiled at first use

            def run_many(xs: list[np.ndarray]) -> list[list[np.ndarray]]:
                if not many:
                    tp = core.compile_model(str(path), "CPU", {
                        "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "THROUGHPUT",
                        "INFERENCE_NUM_THREADS": _threads(), "CACHE_DIR": str(path.parent / "openvino-cache")})
                    many.append(ov.AsyncInferQueue(tp))
                queue = many[0]
                results: list[list[np.ndarray]] = [[] for _ in xs]

                def done(request: Any, index: int) -> None:
                    results[index] = [request.get_output_tensor(i).data.copy() for i in range(n_out)]

                queue.set_callback(done)
                for i, x in enumerate(xs):
                    queue.start_async({0: x}, i)
                queue.wait_all()
                return results

            return _Loaded(run, actual, run_many)

        return f"{ov.__version__.split('-')[0]}-{precision}", load

    return loader


def _onnxruntime() -> tuple[str, Callable[[Path], _Loaded]]:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeUnavailable(f"not installed ({e}); pip install onnxruntime") from None

    def load(path: Path) -> _Loaded:
        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads()
        options.log_severity_level = 3  # shape-merge notices from the exported graph are harmless
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run(x: np.ndarray) -> list[np.ndarray]:
            return [np.asarray(o, dtype=np.float32) for o in session.run(None, {input_name: x})]

        return _Loaded(run)

    return ort.__version__, load


def openvino_cpu_precision(hint: str) -> str | None:
    """What OpenVINO computes in on this CPU when asked for ``hint`` ("f32", "bf16", "f16"), or None
    without OpenVINO. Where the CPU lacks the precision it quietly computes in f32 (measured on an
    AVX2 EPYC: the bf16 and f16 hints give outputs identical to f32, at f32's speed)."""
    try:
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError:
        return None
    x = ops.parameter([1, 8], np.float32)
    model = ov.Model([ops.relu(ops.matmul(x, ops.constant(np.eye(8, dtype=np.float32)), False, False))], [x])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    return _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))


def _precision_name(element_type: Any) -> str:
    """``"f32"``, ``"bf16"``, ``"f16"`` for an ``openvino.Type``."""
    return element_type.get_type_name() if hasattr(element_type, "get_type_name") else str(element_type)


_LOADERS: dict[str, Callable[[], tuple[str, Callable[[Path], _Loaded]]]] = {
    "openvino": _openvino("f32"),
    "openvino-bf16": _openvino("bf16"),
    "onnxruntime": _onnxruntime,
}
