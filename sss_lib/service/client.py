"""The torch-free client of the SSS service (see docs/service_api.md, section "Client").

Standard library (``http.client``) and numpy only, Python 3.9 compatible: it runs inside Slicer
without torch, fastapi or uvicorn; the CLI's ``--server`` path (:mod:`sss_lib.remote_run`) uses it.

::

    client = ServiceClient(url, token)              # checks /v1/info once (VersionMismatch)
    vol = client.upload_volume(volume)              # RemoteVolume(volume_id, shape_kji, reused)
    sess = client.open_session(vol.volume_id, backbone="litemedsam")
    run = sess.segment(prompt_set)                  # RunHandle, returns at once
    for event in run.events(): ...                  # RunEvent(stage, done, total, message)
    result = run.result()                           # RemoteResult; .labels is the full [k, j, i] map

One client holds one kept-alive HTTP connection and is meant for one thread at a time (a lock
serialises requests made from several). A connection the server closed while idle is reopened
once, transparently; a refused or dropped connection raises :class:`ServiceUnavailable`.

Label maps travel as patches: the session keeps the full map of the run whose result it fetched
last, and a result names the run it was computed against (``base_run_id``). A patch based on any
other run is refused and the full map fetched instead (``?full=1``), so the map the caller sees is
always the server's.
"""

from __future__ import annotations

import dataclasses
import http.client
import json as _json
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import SSSError
from . import protocol
from .protocol import API_PREFIX, API_VERSION, RUN_END_STATES

log = logging.getLogger(__name__)

#: Seconds a long-poll of a run's events asks the server to wait for news (below protocol.MAX_WAIT_S).
EVENTS_WAIT_S = 10.0
# An event index past any run's last: a long-poll with it answers only when the run ends.
_END_ONLY = 1 << 40
# Connection failures that mean "the peer went away" (refused, reset, closed mid-answer).
_GONE = (ConnectionError, http.client.HTTPException, socket.gaierror, ssl.SSLEOFError, ssl.SSLZeroReturnError)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
class ServiceError(SSSError):
    """The service answered with an error status (4xx/5xx); ``code`` is its snake_case error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = int(status)
        self.code = code
        self.message = message
        super().__init__(message)


class AuthError(ServiceError):
    """The token was missing (401) or wrong (403)."""


class VersionMismatch(ServiceError):
    """The server speaks another major version of the API."""


class ServiceUnavailable(SSSError):
    """The service cannot be reached, or went away during a request; nothing half-received is returned."""

    def __init__(self, url: str, detail: str = "") -> None:
        self.url = url
        self.detail = detail
        why = f" ({detail})" if detail else ""
        super().__init__(f"the SSS service at {url} went away or cannot be reached{why}. "
                         f"Start it again (python -m sss_lib serve) or check the address; nothing was written.")


class RunFailed(SSSError):
    """A run ended ``failed``; ``code`` and ``message`` are the server's. The session is as before."""

    def __init__(self, run_id: str, code: str, message: str) -> None:
        self.run_id = run_id
        self.code = code
        self.message = message
        super().__init__(message)


class RunCancelled(SSSError):
    """A run ended ``cancelled``; the session is as before the run."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id} was cancelled; nothing was changed")


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunEvent:
    """Progress of a run: ``done`` of ``total`` steps of ``stage`` (the engine's stages)."""

    stage: str
    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RunEvent":
        return cls(str(d.get("stage", "")), int(d.get("done", 0)), int(d.get("total", 0)), str(d.get("message", "")))


@dataclasses.dataclass
class RunStatus:
    """One answer of :meth:`RunHandle.poll`: the events new since the last poll and the run's state."""

    state: str
    events: List[RunEvent]
    error: Optional[Dict[str, str]] = None

    @property
    def ended(self) -> bool:
        return self.state in RUN_END_STATES


@dataclasses.dataclass
class RemoteVolume:
    """An uploaded volume: ``volume_id`` is its content hash; ``reused`` when the server had it already."""

    volume_id: str
    shape_kji: Tuple[int, int, int]
    reused: bool


@dataclasses.dataclass
class RemoteResult:
    """A completed run's result.

    Attributes:
        labels: the full label map, ``[k, j, i]`` uint8 (uint16 above 255 classes); 0 = background.
        run_id / base_run_id: this run, and the run its patch was computed against (None: first run).
        patch_start_kji / patch_shape: where the received patch lay (shape ``(0, 0, 0)``: no change).
        full_fetch: True when the patch did not fit the map held and the full map was fetched.
        meta: the server's ``meta_json`` as received; the other fields are read from it.
    """

    labels: np.ndarray
    run_id: str
    base_run_id: Optional[str]
    patch_start_kji: Tuple[int, int, int]
    patch_shape: Tuple[int, int, int]
    full_fetch: bool
    meta: Dict[str, Any]

    @property
    def recomputed(self) -> List[int]:
        return [int(v) for v in self.meta.get("recomputed", [])]

    @property
    def reused(self) -> List[int]:
        return [int(v) for v in self.meta.get("reused", [])]

    @property
    def changed_labels(self) -> List[int]:
        return [int(v) for v in self.meta.get("changed_labels", [])]

    @property
    def voxel_counts(self) -> Dict[int, int]:
        return {int(k): int(v) for k, v in self.meta.get("voxel_counts", {}).items()}

    @property
    def slices_per_class(self) -> Dict[int, List[int]]:
        return {int(k): [int(s) for s in v] for k, v in self.meta.get("slices_per_class", {}).items()}

    @property
    def seconds(self) -> float:
        return float(self.meta.get("seconds", 0.0))

    @property
    def embeddings_computed(self) -> int:
        return int(self.meta.get("embeddings_computed", 0))

    @property
    def prompts_json(self) -> Optional[Dict[str, Any]]:
        """The prompts the run used (auto-segment: PCSW's and the user's), voxel coordinates."""
        return self.meta.get("prompts")

    @property
    def pcsw(self) -> Dict[int, Dict[str, Any]]:
        """Auto-segment: label -> PCSW's decision (``status``, ``reason``, ...)."""
        return {int(k): v for k, v in (self.meta.get("pcsw") or {}).items()}

    @property
    def user_classes(self) -> List[int]:
        return [int(v) for v in self.meta.get("user_classes") or []]

    @property
    def absent(self) -> List[int]:
        return [int(v) for v in self.meta.get("absent") or []]

    @property
    def from_coarse(self) -> List[int]:
        """Auto-segment: the classes painted from the coarse head (the task model's choice)."""
        return [int(v) for v in self.meta.get("from_coarse") or []]


# ------------------------------------------------------------------------------------------------
# The client
# ------------------------------------------------------------------------------------------------
# Imported here, after the errors and values, so that client_jobs may import them from this module.
from .client_jobs import JobsClientMixin  # noqa: E402 - the job methods of ServiceClient


class ServiceClient(JobsClientMixin):
    """A connection to one SSS service.

    Args:
        url: ``http://host:port`` or ``https://host:port`` (a trailing ``/v1`` is accepted).
        token: the bearer token (the first line of the server's token file).
        timeout: seconds to wait for an answer (long-polls add their own wait).
        ca_file: for https: a CA bundle (or the server's self-signed certificate) to trust;
            default: the system's trust store.
        check: ask ``/v1/info`` now and raise :class:`VersionMismatch` / :class:`AuthError` /
            :class:`ServiceUnavailable` at once.

    Raises:
        ValueError: ``url`` is not an http(s) URL.
    """

    def __init__(self, url: str, token: str, timeout: float = 30.0, *, ca_file: Optional[str] = None,
                 check: bool = True) -> None:
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not a service URL: {url!r} (give http://HOST:PORT or https://HOST:PORT)")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._token = token.strip()
        self.timeout = float(timeout)
        self._ssl: Optional[ssl.SSLContext] = None
        if parts.scheme == "https":
            self._ssl = ssl.create_default_context(cafile=ca_file)
        self._conn: Optional[http.client.HTTPConnection] = None
        self._conn_used = False  # the kept-alive connection has answered before (it may have gone idle)
        self._lock = threading.RLock()
        self._shapes: Dict[str, Tuple[int, int, int]] = {}  # volume_id -> shape_kji, for result maps
        self._info: Optional[Dict[str, Any]] = None
        if check:
            self.info()

    # -- transport (also used by JobsClientMixin) --------------------------------------------------
    def _connection(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        if self._ssl is not None:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _headers(self, extra: Optional[Mapping[str, str]], content_type: Optional[str]) -> Dict[str, str]:
        headers = protocol.request_headers(self._token, content_type)
        if extra:
            headers.update(extra)
        return headers

    @staticmethod
    def _target(path: str, params: Optional[Mapping[str, Any]]) -> str:
        if not path.startswith(API_PREFIX):
            path = API_PREFIX + (path if path.startswith("/") else "/" + path)
        if params:
            query = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in params.items() if v is not None}
            path += "?" + urllib.parse.urlencode(query)
        return path

    def _request(self, method: str, path: str, *, json: Any = None, body: Optional[bytes] = None,
                 params: Optional[Mapping[str, Any]] = None, headers: Optional[Mapping[str, str]] = None,
                 timeout: Optional[float] = None) -> Tuple[int, Dict[str, str], bytes]:
        """One request on the kept-alive connection; the answer read whole.

        Args:
            method: ``GET``, ``POST``, ``DELETE``.
            path: ``/v1/...`` (the ``/v1`` prefix is added when missing).
            json: a JSON body (sent as ``application/json``), or ``body``: raw bytes (give the
                ``Content-Type`` in ``headers``; default ``application/octet-stream``).
            params: query parameters (None values left out, booleans as ``true``/``false``).
            timeout: seconds for this request (default: the client's).

        Returns:
            ``(status, headers with lower-case names, body bytes)`` of a 2xx/3xx answer.

        Raises:
            AuthError (401/403), VersionMismatch (409 naming the API version), ServiceError (any
            other 4xx/5xx), ServiceUnavailable (refused, reset, timed out, or closed mid-answer).
        """
        content_type = None
        if json is not None:
            body = _json.dumps(json).encode("utf-8")
            content_type = protocol.JSON_TYPE
        elif body is not None:
            content_type = protocol.OCTET_TYPE
        all_headers = self._headers(headers, content_type)
        target = self._target(path, params)
        wait = self.timeout if timeout is None else float(timeout)
        with self._lock:
            for attempt in (0, 1):
                reused = self._conn is not None and self._conn_used
                if self._conn is None:
                    self._conn = self._connection(wait)
                    self._conn_used = False
                conn = self._conn
                conn.timeout = wait
                if conn.sock is not None:
                    conn.sock.settimeout(wait)
                try:
                    conn.request(method, target, body=body, headers=all_headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except socket.timeout:
                    self._drop()
                    raise ServiceUnavailable(self.url, f"no answer to {method} {target} within {wait:.0f} s") from None
                except ssl.SSLCertVerificationError as err:
                    self._drop()
                    raise ServiceUnavailable(self.url, f"its TLS certificate is not trusted: {err.verify_message}; "
                                                       f"for a self-signed certificate give it as the CA file") from None
                except _GONE as err:
                    self._drop()
                    if reused and attempt == 0:
                        # The server closes kept-alive connections that sat idle; reopen once.
                        log.debug("reconnecting to %s after %s", self.url, type(err).__name__)
                        continue
                    raise ServiceUnavailable(self.url, _describe(err)) from None
                except OSError as err:
                    self._drop()
                    raise ServiceUnavailable(self.url, _describe(err)) from None
                self._conn_used = True
                if resp.will_close:
                    self._drop()
                answer_headers = {k.lower(): v for k, v in resp.getheaders()}
                if resp.status >= 400:
                    raise _error_for(resp.status, data)
                return resp.status, answer_headers, data
        raise AssertionError("unreachable")

    def _stream_lines(self, path: str, params: Optional[Mapping[str, Any]] = None,
                      timeout: Optional[float] = None) -> Iterator[Dict[str, Any]]:
        """The JSON objects of an NDJSON answer (``GET path``), one per line, as they arrive.

        Runs on a connection of its own (closed when the generator ends or is closed), so the
        client's other requests go on meanwhile. ``timeout``: the longest silence between two
        lines (default: none, a training job may be quiet for long).

        Raises:
            as :meth:`_request`; ServiceUnavailable also when the stream breaks off before its end.
        """
        target = self._target(path, params)
        conn = self._connection(self.timeout)
        try:
            try:
                conn.request("GET", target, headers=self._headers(None, None))
                resp = conn.getresponse()
                if resp.status >= 400:
                    raise _error_for(resp.status, resp.read())
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                while True:
                    line = resp.readline()
                    if not line:
                        return
                    text = line.strip()
                    if text:
                        yield _json.loads(text.decode("utf-8"))
            except socket.timeout:
                raise ServiceUnavailable(self.url, f"the stream {target} was silent too long") from None
            except (_GONE + (OSError,)) as err:
                raise ServiceUnavailable(self.url, _describe(err)) from None
        finally:
            conn.close()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._conn_used = False

    def _get_json(self, path: str, params: Optional[Mapping[str, Any]] = None,
                  timeout: Optional[float] = None) -> Dict[str, Any]:
        return _json.loads(self._request("GET", path, params=params, timeout=timeout)[2].decode("utf-8"))

    def _post_json(self, path: str, payload: Any = None, *, body: Optional[bytes] = None,
                   content_type: Optional[str] = None) -> Dict[str, Any]:
        headers = {"Content-Type": content_type} if content_type else None
        data = self._request("POST", path, json=payload if body is None else None, body=body, headers=headers)[2]
        return _json.loads(data.decode("utf-8")) if data else {}

    def close(self) -> None:
        """Close the kept-alive connection (a later request opens a new one)."""
        with self._lock:
            self._drop()

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the API -----------------------------------------------------------------------------------
    def info(self) -> Dict[str, Any]:
        """``GET /v1/info`` (api_version, sss_version, device, backbones, models, limits).

        Raises:
            VersionMismatch: the server speaks another major API version.
        """
        info = self._get_json("/info")
        server = info.get("api_version")
        if server is not None and int(server) != API_VERSION:
            raise VersionMismatch(409, "version_mismatch", protocol.version_mismatch_message(API_VERSION, int(server)))
        self._info = info
        return info

    def upload_volume(self, volume: Any) -> RemoteVolume:
        """Upload a volume (:class:`sss_lib.volume.Volume` or anything with ``voxels`` ``[k, j, i]``,
        ``spacing``, ``origin``, ``direction``). The same content again is not recomputed."""
        answer = self._post_json("/volumes", body=protocol.encode_volume(volume), content_type=protocol.NPZ_TYPE)
        shape = tuple(int(v) for v in answer.get("shape_kji", volume.voxels.shape))
        remote = RemoteVolume(str(answer["volume_id"]), shape, bool(answer.get("reused", False)))  # type: ignore[arg-type]
        self._shapes[remote.volume_id] = remote.shape_kji
        return remote

    def upload_task_model(self, model: Any) -> Dict[str, Any]:
        """Upload a ``.ssstask`` file (a path or its bytes); returns ``{model_id, name, classes, backbone}``."""
        data = model if isinstance(model, (bytes, bytearray)) else _read_bytes(model)
        return self._post_json("/models", body=bytes(data), content_type=protocol.OCTET_TYPE)

    def open_session(self, volume_id: str, *, backbone: Optional[str] = None, task_model: Optional[str] = None,
                     slice_axis: Optional[str] = None, modality: Optional[str] = None,
                     window: Optional[Tuple[float, float]] = None) -> "RemoteSession":
        """Open a segmentation session on an uploaded volume: with ``backbone`` (prompts) or
        ``task_model`` (a model_id from :meth:`upload_task_model`, or a name from the server's
        ``--models``) for auto-segment. Unset options take the server's defaults ("auto")."""
        payload: Dict[str, Any] = {"volume_id": volume_id}
        for key, value in (("backbone", backbone), ("task_model", task_model), ("slice_axis", slice_axis),
                           ("modality", modality)):
            if value is not None:
                payload[key] = value
        if window is not None:
            payload["window"] = [float(window[0]), float(window[1])]
        answer = self._post_json("/sessions", payload)
        return RemoteSession(self, answer, self._shapes.get(volume_id))


class RemoteSession:
    """A segmentation session on the server; keeps the full label map of its last fetched result."""

    def __init__(self, client: ServiceClient, answer: Mapping[str, Any],
                 shape_kji: Optional[Tuple[int, int, int]] = None) -> None:
        self.client = client
        self.session_id = str(answer["session_id"])
        self.kind = str(answer.get("kind", "prompts"))
        self.slice_axis = answer.get("slice_axis")
        self.stack_shape = tuple(answer.get("stack_shape") or ())
        self.backbone = answer.get("backbone")
        self.shape_kji = shape_kji
        self.labels: Optional[np.ndarray] = None  # full map of ``labels_run_id``
        self.labels_run_id: Optional[str] = None

    def segment(self, prompts: Any) -> "RunHandle":
        """Start a run with ``prompts`` (a :class:`~sss_lib.prompts.PromptSet` or its JSON document,
        voxel or physical coordinates); returns at once."""
        return self._start("segment", {"prompts": _prompts_document(prompts)})

    def auto_segment(self, prompts: Any = None, *, prompt_points: Optional[bool] = None) -> "RunHandle":
        """Start an auto-segment run (a task-model session); ``prompts``: an edited prompts set or
        document from an earlier run (None: PCSW's prompts for every class)."""
        payload: Dict[str, Any] = {"prompt_points": prompt_points}
        if prompts is not None:
            payload["prompts"] = _prompts_document(prompts)
        return self._start("auto-segment", payload)

    def _start(self, kind: str, payload: Dict[str, Any]) -> "RunHandle":
        answer = self.client._post_json(f"/sessions/{self.session_id}/{kind}", payload)
        return RunHandle(self, str(answer["run_id"]))

    def close(self) -> None:
        """``DELETE`` the session on the server (its embeddings and label map are dropped)."""
        self.client._request("DELETE", f"/sessions/{self.session_id}")

    def _apply(self, run_id: str, data: bytes, full: bool) -> RemoteResult:
        patch, start, meta = protocol.decode_result(data)
        base = meta.get("base_run_id")
        if base is None or full:
            shape = self.shape_kji or (patch.shape if start == (0, 0, 0) else None)
            if shape is None:
                raise protocol.ProtocolError("a first result must carry the whole label map")
            labels = protocol.apply_patch(np.zeros(shape, dtype=patch.dtype), start, patch)
        elif base == self.labels_run_id and self.labels is not None:
            labels = protocol.apply_patch(self.labels, start, patch)
        else:
            raise _WrongBase(str(base))
        self.labels, self.labels_run_id = labels, run_id
        return RemoteResult(labels, run_id, base, start, tuple(patch.shape), full, meta)  # type: ignore[arg-type]


class _WrongBase(Exception):
    """A patch computed against a run other than the one the session holds (internal)."""


class RunHandle:
    """A run on the server: progress, cancel, result. Methods make short requests only, except
    :meth:`events` and :meth:`result`, which wait for the run."""

    def __init__(self, session: RemoteSession, run_id: str) -> None:
        self.session = session
        self.client = session.client
        self.run_id = run_id
        self.state = "queued"
        self.error: Optional[Dict[str, str]] = None
        self._next = 0
        self._result: Optional[RemoteResult] = None

    @property
    def ended(self) -> bool:
        return self.state in RUN_END_STATES

    def _fetch(self, wait: float, *, end_only: bool = False) -> RunStatus:
        # ``end_only``: ask for events past any there can be, so a long-poll answers at the end state
        # alone (one request per run instead of one per event; the events are skipped).
        params = {"after": _END_ONLY if end_only else self._next, "wait": wait if wait > 0 else None}
        answer = self.client._get_json(f"/runs/{self.run_id}", params, timeout=self.client.timeout + wait)
        events = [RunEvent.from_json(e) for e in answer.get("events", [])]
        self._next = int(answer.get("next", self._next + len(events)))
        self.state = str(answer.get("state", self.state))
        self.error = answer.get("error") or None
        return RunStatus(self.state, events, self.error)

    def poll(self) -> RunStatus:
        """One short request: the events new since the last poll and the state (for a Qt timer)."""
        return self._fetch(0.0)

    def events(self, poll: float = 0.2, wait: float = EVENTS_WAIT_S) -> Iterator[RunEvent]:
        """Yield the run's events (those not seen by :meth:`poll` yet) until it reaches an end state;
        the generator then stops (see :meth:`result` for the outcome).

        The events come on one streamed answer (``/stream``); if the stream ends without the run's
        state, the run is long-polled (``wait`` seconds per request, ``poll`` s between answers
        without news), which raises :class:`ServiceUnavailable` if the service is gone.
        """
        if not self.ended:
            seen = 0
            for line in self.client._stream_lines(f"/runs/{self.run_id}/stream"):
                if "stage" not in line and "state" in line:
                    self.state = str(line["state"])
                    self.error = line.get("error") or None
                    break
                seen += 1
                if seen > self._next:
                    self._next = seen
                    yield RunEvent.from_json(line)
        while not self.ended:
            status = self._fetch(wait)
            for event in status.events:
                yield event
            if not status.events and not status.ended:
                time.sleep(poll)

    def wait(self, timeout: Optional[float] = None) -> str:
        """Block until the run ends (or ``timeout`` seconds pass); return its state. Events not
        read yet are skipped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ended:
            left = EVENTS_WAIT_S if deadline is None else min(EVENTS_WAIT_S, deadline - time.monotonic())
            if left <= 0:
                break
            self._fetch(left, end_only=True)
        return self.state

    def cancel(self) -> None:
        """Ask the server to cancel; the run ends ``cancelled`` at its next slice."""
        self.client._request("POST", f"/runs/{self.run_id}/cancel")

    def result(self) -> RemoteResult:
        """Wait for the end of the run and return its result (the session's full label map updated).

        Raises:
            RunFailed / RunCancelled: the run ended so; the session is as before it.
        """
        if self._result is not None:
            return self._result
        self.wait()
        if self.state == "failed":
            err = self.error or {}
            raise RunFailed(self.run_id, str(err.get("code", "run_failed")), str(err.get("message", "the run failed")))
        if self.state == "cancelled":
            raise RunCancelled(self.run_id)
        path = f"/runs/{self.run_id}/result"
        data = self.client._request("GET", path)[2]
        try:
            self._result = self.session._apply(self.run_id, data, full=False)
        except _WrongBase as err:
            log.info("run %s is based on %s, not on the run held (%s): fetching the full map",
                     self.run_id, err, self.session.labels_run_id)
            data = self.client._request("GET", path, params={"full": 1})[2]
            self._result = self.session._apply(self.run_id, data, full=True)
        return self._result


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _error_for(status: int, body: bytes) -> ServiceError:
    code, message = protocol.parse_error(body)
    if status in (401, 403):
        return AuthError(status, code, message)
    if status == 409 and ("version" in code or message.startswith("this server speaks SSS API")):
        return VersionMismatch(status, code, message)
    return ServiceError(status, code, message)


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if isinstance(err, OSError) and not isinstance(err, ConnectionError) else f"{type(err).__name__}: {text}"


def _prompts_document(prompts: Any) -> Dict[str, Any]:
    """A prompts JSON document from a PromptSet (voxel coordinates) or a document (dict or JSON text)."""
    if hasattr(prompts, "to_json"):
        return prompts.to_json()
    if isinstance(prompts, (str, bytes)):
        return _json.loads(prompts)
    if isinstance(prompts, Mapping):
        return dict(prompts)
    raise TypeError(f"prompts must be a PromptSet or a prompts JSON document, got {type(prompts).__name__}")


def _read_bytes(path: Any) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_token_file(path: Any) -> str:
    """The token in ``path``: its first line, stripped (as ``serve --token-file`` reads it).

    Raises:
        SSSError: the file cannot be read or is empty.
    """
    try:
        with open(os.path.expanduser(os.fspath(path)), "r", encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as err:
        raise SSSError(f"{path}: cannot read the token file ({err.strerror or err}). "
                       f"Give the file the server was started with (--token-file).") from None
    if not token:
        raise SSSError(f"{path}: the token file is empty. Write the server's token on its first line.")
    return token
