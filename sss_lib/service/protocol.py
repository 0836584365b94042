"""The SSS service's wire format, shared by the server and the torch-free client.

Standard library and numpy only (no torch, fastapi or uvicorn), Python 3.9 compatible: the client
runs inside Slicer. See docs/service_api.md for the contract.

* Arrays travel as compressed npz (:func:`encode_arrays` / :func:`decode_arrays`, never pickled).
* A volume is the npz ``voxels`` (``[k, j, i]``), ``spacing`` and ``origin`` (``(i, j, k)`` order)
  and ``direction`` (3x3, LPS, columns = i, j, k).
* A run's result is the npz ``labels_patch`` (``[k, j, i]``), ``patch_start_kji`` (3 ints) and
  ``meta_json`` (a 0-d string array holding JSON): the bounding box of the voxels that changed
  since the run it was based on (:func:`label_patch`, applied by :func:`apply_patch`).
* Errors are ``{"error": {"code": "snake_case", "message": "..."}}`` (:func:`error_body`).
"""

from __future__ import annotations

import io
import json
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from ..jsonline import parse_json_object

#: The API's major version; a client of another major is refused with 409.
API_VERSION = 1
API_PREFIX = "/v1"
#: Header carrying the client's API version.
VERSION_HEADER = "X-SSS-API-Version"
AUTH_HEADER = "Authorization"
AUTH_SCHEME = "Bearer"

NPZ_TYPE = "application/x-npz"
NDJSON_TYPE = "application/x-ndjson"
JSON_TYPE = "application/json"
OCTET_TYPE = "application/octet-stream"

#: Run states; the last three are end states.
RUN_STATES = ("queued", "running", "done", "failed", "cancelled")
RUN_END_STATES = ("done", "failed", "cancelled")
#: Longest ``wait`` (seconds) a long-poll may ask for.
MAX_WAIT_S = 30.0
#: The first token a server makes for itself, or reads from ``--token-file``, has at least this many characters.
MIN_TOKEN_LENGTH = 16

VOLUME_KEYS = ("voxels", "spacing", "origin", "direction")


class ProtocolError(ValueError):
    """Bytes that are not a valid SSS message (a bad npz, missing keys, wrong shapes)."""


# ------------------------------------------------------------------------------------------------
# Headers, errors, the ready line
# ------------------------------------------------------------------------------------------------
def request_headers(token: str, content_type: Optional[str] = None) -> Dict[str, str]:
    """The headers every request carries: the bearer token and the API version."""
    headers = {AUTH_HEADER: f"{AUTH_SCHEME} {token}", VERSION_HEADER: str(API_VERSION)}
    if content_type:
        headers["Content-Type"] = content_type
    return headers


def version_mismatch_message(client_version: object, server_version: int = API_VERSION) -> str:
    """The 409 message for a client of another API major version."""
    return (f"this server speaks SSS API {server_version}, the client {client_version}: "
            f"install the same SSS version on both")


def check_api_version(value: Optional[str]) -> Optional[str]:
    """None when the header value ``value`` names this API's major version (or is absent), else the message."""
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    major = text.split(".", 1)[0]
    if major == str(API_VERSION):
        return None
    return version_mismatch_message(text)


def error_body(code: str, message: str) -> Dict[str, Dict[str, str]]:
    """The JSON body of an error answer."""
    return {"error": {"code": code, "message": message}}


def parse_error(body: bytes) -> Tuple[str, str]:
    """``(code, message)`` from an error answer's body; a body that is not one gives ``("http_error", text)``."""
    try:
        data = json.loads(body.decode("utf-8"))
        err = data["error"]
        return str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()
        return "http_error", text[:500] or "the server gave no message"


def ready_line(url: str, *, sss_version: str, device: str, pid: int,
               token_file: Optional[str] = None, **extra: Any) -> str:
    """The one JSON line ``serve`` prints on stdout once listening (no trailing newline)."""
    data: Dict[str, Any] = {"event": "ready", "url": url, "api_version": API_VERSION,
                            "sss_version": sss_version, "device": device, "pid": pid}
    if token_file is not None:
        data["token_file"] = token_file
    data.update(extra)
    return json.dumps(data)


def parse_ready_line(line: str) -> Optional[Dict[str, Any]]:
    """The ready object when ``line`` is the ready line, else None (other output is ignored)."""
    data = parse_json_object(line)
    if data is not None and data.get("event") == "ready" and "url" in data:
        return data
    return None


# ------------------------------------------------------------------------------------------------
# Arrays
# ------------------------------------------------------------------------------------------------
def encode_arrays(arrays: Mapping[str, Any]) -> bytes:
    """Compressed npz bytes of ``arrays`` (name -> array-like)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def decode_arrays(data: bytes) -> Dict[str, np.ndarray]:
    """The arrays of npz bytes, loaded without pickle.

    Raises:
        ProtocolError: the bytes are not an npz file, or one of its arrays needs pickle.
    """
    if not data.startswith(b"PK"):  # np.load would try to unpickle anything that is not a zip
        raise ProtocolError("not a valid npz file (send numpy.savez_compressed output)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except ValueError as e:  # object arrays (pickle) and bad zip members end here
        raise ProtocolError(f"the npz holds an array that cannot be read without pickle ({e})") from None
    except (OSError, EOFError, KeyError) as e:
        raise ProtocolError(f"not a valid npz file ({type(e).__name__}: {e})") from None
    except Exception as e:  # zipfile.BadZipFile and friends
        raise ProtocolError(f"not a valid npz file ({type(e).__name__}: {e})") from None


def encode_volume(volume: Any) -> bytes:
    """npz bytes of a volume-like object (``voxels``, ``spacing``, ``origin``, ``direction`` attributes,
    e.g. :class:`sss_lib.volume.Volume`)."""
    return encode_arrays({
        "voxels": np.ascontiguousarray(volume.voxels),
        "spacing": np.asarray(volume.spacing, dtype=np.float64).reshape(3),
        "origin": np.asarray(volume.origin, dtype=np.float64).reshape(3),
        "direction": np.asarray(volume.direction, dtype=np.float64).reshape(3, 3),
    })


def decode_volume(data: bytes) -> Dict[str, np.ndarray]:
    """The checked arrays of a volume upload: ``voxels`` (3D, numeric), ``spacing`` and ``origin``
    (3 floats), ``direction`` (3x3 floats).

    Raises:
        ProtocolError: not an npz, a key missing, or a wrong shape or dtype.
    """
    arrays = decode_arrays(data)
    missing = [k for k in VOLUME_KEYS if k not in arrays]
    if missing:
        raise ProtocolError(f"the volume npz lacks {', '.join(missing)} (it needs {', '.join(VOLUME_KEYS)})")
    voxels = arrays["voxels"]
    if voxels.ndim != 3:
        raise ProtocolError(f"voxels must be a 3D [k, j, i] array, got shape {list(voxels.shape)}")
    if voxels.dtype.kind not in "biuf" or min(voxels.shape) < 1:
        raise ProtocolError(f"voxels must be a non-empty numeric array, got {voxels.dtype} {list(voxels.shape)}")
    out = {"voxels": voxels}
    for key, shape in (("spacing", (3,)), ("origin", (3,)), ("direction", (3, 3))):
        arr = arrays[key]
        if arr.dtype.kind not in "biuf" or arr.size != int(np.prod(shape)):
            raise ProtocolError(f"{key} must hold {int(np.prod(shape))} numbers, got {arr.dtype} {list(arr.shape)}")
        out[key] = arr.astype(np.float64).reshape(shape)
    return out


# ------------------------------------------------------------------------------------------------
# Result patches
# ------------------------------------------------------------------------------------------------
def label_patch(new: np.ndarray, old: Optional[np.ndarray]) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """``(start_kji, patch)``: the bounding box of the voxels where ``new`` differs from ``old``.

    ``old`` None (a first run) sends the whole of ``new``; no difference gives an empty patch
    (shape ``(0, 0, 0)``) at ``(0, 0, 0)``. Both are ``[k, j, i]`` arrays of one shape.
    """
    if old is None:
        return (0, 0, 0), np.ascontiguousarray(new)
    if old.shape != new.shape:
        raise ValueError(f"label maps of shapes {old.shape} and {new.shape} cannot be compared")
    diff = new != old
    if not diff.any():
        return (0, 0, 0), np.zeros((0, 0, 0), dtype=new.dtype)
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(diff.any(axis=other))
        lo.append(int(hit[0]))
        hi.append(int(hit[-1]) + 1)
    patch = new[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return (lo[0], lo[1], lo[2]), np.ascontiguousarray(patch)


def apply_patch(full: np.ndarray, start_kji: Any, patch: np.ndarray) -> np.ndarray:
    """``full`` with ``patch`` written at ``start_kji`` (a new array; the dtype widens when needed).

    Raises:
        ProtocolError: the patch does not fit inside ``full``.
    """
    k0, j0, i0 = (int(v) for v in np.asarray(start_kji).reshape(3))
    dk, dj, di = patch.shape
    if min(k0, j0, i0) < 0 or k0 + dk > full.shape[0] or j0 + dj > full.shape[1] or i0 + di > full.shape[2]:
        raise ProtocolError(f"a patch of shape {list(patch.shape)} at {[k0, j0, i0]} does not fit "
                            f"a label map of shape {list(full.shape)}")
    out = full.astype(np.result_type(full.dtype, patch.dtype), copy=True)
    out[k0:k0 + dk, j0:j0 + dj, i0:i0 + di] = patch
    return out


def encode_result(patch: np.ndarray, start_kji: Any, meta: Mapping[str, Any]) -> bytes:
    """npz bytes of a run's result (see the module docstring)."""
    return encode_arrays({
        "labels_patch": patch,
        "patch_start_kji": np.asarray(start_kji, dtype=np.int64).reshape(3),
        "meta_json": np.array(json.dumps(meta, default=_json_default)),
    })


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays in result metadata, as plain JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def decode_result(data: bytes) -> Tuple[np.ndarray, Tuple[int, int, int], Dict[str, Any]]:
    """``(labels_patch, patch_start_kji, meta)`` of a result npz.

    Raises:
        ProtocolError: a key is missing or ``meta_json`` is not a JSON object.
    """
    arrays = decode_arrays(data)
    missing = [k for k in ("labels_patch", "patch_start_kji", "meta_json") if k not in arrays]
    if missing:
        raise ProtocolError(f"the result npz lacks {', '.join(missing)}")
    try:
        meta = json.loads(str(arrays["meta_json"][()]))
    except ValueError as e:
        raise ProtocolError(f"the result's meta_json is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ProtocolError("the result's meta_json is not a JSON object")
    start = tuple(int(v) for v in arrays["patch_start_kji"].reshape(3))
    return arrays["labels_patch"], start, meta  # type: ignore[return-value]
