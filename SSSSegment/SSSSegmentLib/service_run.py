"""One Segment / Re-run / Auto-segment of the panel, done by the SSS service and advanced in small steps.

The panel's timer calls :meth:`ServiceRun.step` on the main thread; each call makes at most one
short request (or none), so the GUI never waits for inference. The few requests that can take long
(uploading the volume, opening a session while the service loads the model, fetching a large
result) run on a short-lived helper thread that only waits on its socket; waiting in C releases the
GIL, so the thread does not slow the GUI down (SLICER_API.md section 5), and the main thread makes
no request meanwhile (the client serves one request at a time). No inference runs in Slicer's process:


    connect -> [download weights] -> upload volume -> [upload task model] -> open session
            -> start run -> poll (RunHandle.poll) ... -> fetch result -> DONE

The volume is uploaded once per content (a re-run sends nothing); the session is kept per
(volume, model, slice axis), so a Re-run recomputes only the classes whose prompts changed and a
first result arrives whole, later ones as patches (the client keeps the full label map). Nothing is
written to the scene here: the DONE message carries a :class:`~SSSSegmentLib.logic.RunOutcome`
that the panel hands to the logic's ``finish_*`` method. A service that went away, a refused
connection or a failed run ends in one FAILED message whose text says what happened and that
nothing was changed. Python 3.9 compatible; ``sss_lib`` is imported inside the functions.
"""

import dataclasses
import logging
import os
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, List, Optional

from .errors import UserFacingError
from .service_link import ServiceLink, unavailable_text

# Message kinds.
PROGRESS = "progress"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"

SEGMENT = "segment"
AUTO = "auto"


@dataclasses.dataclass
class Message:
    """One report for the panel: PROGRESS (``text``, ``fraction`` 0..1 or None), DONE (``value``: the
    RunOutcome), FAILED (``error``, ``text``) or CANCELLED."""

    kind: str
    text: str = ""
    fraction: Optional[float] = None
    value: Any = None
    error: Optional[BaseException] = None


@dataclasses.dataclass
class RunPlan:
    """What one run asks of the service (read from the scene on the main thread).

    Attributes:
        kind: :data:`SEGMENT` (prompts from the markups) or :data:`AUTO` (a task model).
        volume: the input as an ``sss_lib.volume.Volume`` (world LPS, voxels ``[k, j, i]``).
        volume_key: identifies the volume's content and geometry in this Slicer (node, image time);
            a volume uploaded under the same key is not sent again.
        rerun: reuse the session of the previous run (only changed classes are recomputed).
        backbone / axis_name / prompts: SEGMENT: the backbone, the slice axis name ("i", "j", "k")
            and the ``PromptSet`` along that axis.
        task_model_path / edited_prompts: AUTO: the .ssstask file, and ``axis_name -> PromptSet or
            None`` giving the scene's edited prompts on the task model's slice axis.
        download: a SAM-2.1 checkpoint to download first (this computer only; the user agreed).
    """

    kind: str
    volume: Any
    volume_key: Any
    rerun: bool = False
    backbone: str = "auto"
    axis_name: str = "auto"
    prompts: Any = None
    task_model_path: str = ""
    edited_prompts: Optional[Callable[[str], Any]] = None
    download: Optional[str] = None


_STAGES = {"embed": "Embedding", "propagate": "Propagating", "done": "Done", "load": "Loading the model"}
# Seconds a long request (upload, opening a session while the model loads, a large result) may take.
LONG_REQUEST_S = 900.0


class _Pending:
    """One long request on a helper thread that waits on its socket; :attr:`done` when it answered."""

    def __init__(self, client: Any, fn: Callable[[], Any], what: str) -> None:
        self.what = what
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self._done = threading.Event()
        self._client = client
        self._fn = fn
        threading.Thread(target=self._main, name=f"SSS request: {what}", daemon=True).start()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _main(self) -> None:
        # The main thread makes no request until this one ends, so the longer timeout is ours alone.
        previous = getattr(self._client, "timeout", None)
        try:
            if previous is not None:
                self._client.timeout = max(previous, LONG_REQUEST_S)
            self.value = self._fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
        finally:
            if previous is not None:
                self._client.timeout = previous
            self._done.set()

    def take(self) -> Any:
        """The answer, or the request's exception raised here (main thread)."""
        if self.error is not None:
            raise self.error
        return self.value


class ServiceRun:
    """One run through the service (see the module docstring).

    Args:
        link: where the service is.
        plan: the run.
    """

    def __init__(self, link: ServiceLink, plan: RunPlan) -> None:
        self.link = link
        self.plan = plan
        self.finished = False
        self.cancel_requested = False
        self.handle: Any = None  # the RunHandle once started
        self._phase = "connect"
        self._client: Any = None
        self._session: Any = None
        self._model: Any = None
        self._volume_id = ""
        self._retried = False
        self._download: Any = None
        self._download_log = ""
        self._pending: Optional[_Pending] = None
        self.started = time.perf_counter()

    # -- the panel's side -------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the run to stop: before the service started it, at once; after, at its next slice."""
        self.cancel_requested = True
        if self.handle is not None and not self.finished:
            try:
                self.handle.cancel()
            except Exception as e:  # noqa: BLE001 - the next step reports a dead service
                logging.info("SSS: cancel request failed: %s", e)

    def step(self) -> List[Message]:
        """Advance by at most one short request; returns the messages for the panel (a final DONE,
        FAILED or CANCELLED sets :attr:`finished`)."""
        if self.finished:
            return []
        try:
            return self._advance()
        except Exception as e:  # noqa: BLE001 - every failure must reach the panel as one message
            return [self._failure(e)]

    def run_to_end(self, timeout: float = 600.0, interval: float = 0.05) -> List[Message]:
        """Step until the run ends (scripts and tests; the panel uses its timer instead)."""
        messages: List[Message] = []
        deadline = time.monotonic() + timeout
        while not self.finished:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the run did not end within {timeout:.0f} s")
            messages += self.step()
            if not self.finished:
                time.sleep(interval)
        return messages

    def discard_session(self) -> None:
        """Forget the service's session (the panel could not write its result, so a Re-run must
        start from a fresh session that recomputes every class)."""
        current = self.link.cache.get("panel session")
        if current is not None and current[1] is self._session:
            self._close_session(current[1])

    # -- phases -----------------------------------------------------------------------------------
    def _wait(self, fn: Callable[[], Any], what: str) -> Any:
        """The answer of a long request once it is there; None (and a request on a helper thread)
        until then. One long request at a time: the phase asks again on the next step."""
        if self._pending is None:
            self._pending = _Pending(self._client, fn, what)
        if not self._pending.done:
            return None
        pending, self._pending = self._pending, None
        return pending.take()

    def _advance(self) -> List[Message]:
        if self._pending is not None and not self._pending.done:
            return [Message(PROGRESS, text=self._pending.what)]  # the GUI goes on; no request meanwhile
        if self.cancel_requested and self.handle is None:
            return [self._end(Message(CANCELLED, text="Cancelled; nothing was changed."))]
        phase = self._phase
        if phase == "connect":
            self._client = self.link.poll()
            if self._client is None:
                return [Message(PROGRESS, text="Starting the SSS service on this computer...")]
            self._phase = "download" if (self.plan.download and self.link.is_local) else "upload"
            return [Message(PROGRESS, text=f"Connected to the SSS service ({self.link.describe()}).")]
        if phase == "download":
            return self._step_download()
        if phase == "upload":
            return self._step_upload()
        if phase == "model":
            return self._step_model()
        if phase == "session":
            return self._step_session()
        if phase == "start":
            return self._step_start()
        if phase == "running":
            return self._step_poll()
        if phase == "result":
            return self._step_result()
        raise AssertionError(f"unknown phase {phase}")

    def _step_download(self) -> List[Message]:
        name = self.plan.download
        if self._download is None:
            log = tempfile.NamedTemporaryFile(prefix="sss-weights-", suffix=".log", delete=False)
            self._download_log = log.name
            env = self.link._env()
            self._download = subprocess.Popen(
                [self.link.python, "-m", "sss_lib", "weights", "download", str(name)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
            log.close()
            return [Message(PROGRESS, text=f"Downloading the {name} weights...")]
        code = self._download.poll()
        if code is None:
            if self.cancel_requested:
                self._download.kill()
                self._download.wait()
                return [self._end(Message(CANCELLED, text="Cancelled; nothing was changed."))]
            return [Message(PROGRESS, text=f"Downloading the {name} weights...")]
        tail = _tail(self._download_log)
        os.remove(self._download_log)
        if code != 0:
            raise UserFacingError(f"Downloading the {name} weights failed: {tail or f'exit code {code}'}")
        self._phase = "upload"
        return [Message(PROGRESS, text=f"Downloaded the {name} weights.")]

    def _step_upload(self) -> List[Message]:
        key = ("volume", self.plan.volume_key)
        cached = self.link.cache.get(key)
        if cached is not None:
            self._volume_id = cached
            text = "The volume is on the service already."
        else:
            remote = self._wait(lambda: self._client.upload_volume(self.plan.volume), "Uploading the volume...")
            if remote is None:
                return [Message(PROGRESS, text="Uploading the volume...")]
            self._volume_id = remote.volume_id
            self.link.cache[key] = remote.volume_id
            text = "Volume uploaded."
        self._phase = "model" if self.plan.kind == AUTO else "session"
        return [Message(PROGRESS, text=text)]

    def _step_model(self) -> List[Message]:
        path = self.plan.task_model_path
        try:
            stamp = os.stat(path).st_mtime_ns
        except OSError:
            raise UserFacingError(f"The task-model file '{path}' cannot be read; select another.") from None
        key = ("model", os.path.abspath(path), stamp)
        model = self.link.cache.get(key)
        if model is None:
            model = self._wait(lambda: self._client.upload_task_model(path), "Uploading the task model...")
            if model is None:
                return [Message(PROGRESS, text="Uploading the task model...")]
            self.link.cache[key] = model
        self._model = model
        self._phase = "session"
        return [Message(PROGRESS, text=f"Task model '{model.get('name', os.path.basename(path))}' is on the service.")]

    def _session_key(self) -> tuple:
        if self.plan.kind == AUTO:
            return ("session", AUTO, self._volume_id, self._model["model_id"])
        return ("session", SEGMENT, self._volume_id, self.plan.backbone, self.plan.axis_name)

    def _step_session(self) -> List[Message]:
        key = self._session_key()
        current = self.link.cache.get("panel session")
        if self.plan.rerun and current is not None and current[0] == key:
            self._session = current[1]
            self._phase = "start"
            return [Message(PROGRESS, text="Re-using the previous run's session.")]
        if current is not None and self._pending is None:
            self._close_session(current[1])
        if self.plan.kind == AUTO:
            session = self._wait(lambda: self._client.open_session(self._volume_id, task_model=self._model["model_id"]),
                                 "Opening a session (the service loads the task model)...")
        else:
            backbone = None if self.plan.backbone == "auto" else self.plan.backbone
            session = self._wait(
                lambda: self._client.open_session(self._volume_id, backbone=backbone, slice_axis=self.plan.axis_name),
                f"Opening a session (the service loads {self.plan.backbone})...")
        if session is None:
            return [Message(PROGRESS, text="Opening a session...")]
        self.link.cache["panel session"] = (key, session)
        self._session = session
        self._phase = "start"
        return [Message(PROGRESS, text=f"Session opened ({session.backbone or 'model'}).")]

    def _close_session(self, session: Any) -> None:
        self.link.cache.pop("panel session", None)
        try:
            session.close()
        except Exception as e:  # noqa: BLE001 - an expired session is gone anyway
            logging.info("SSS: closing the previous session: %s", e)

    def _step_start(self) -> List[Message]:
        from sss_lib.service.client import ServiceError

        try:
            if self.plan.kind == AUTO:
                axis = self._session.slice_axis
                axis = "ijk"[axis] if isinstance(axis, int) else str(axis)  # the service names it, or gives its index
                edited = self.plan.edited_prompts(axis) if self.plan.edited_prompts else None
                self.handle = self._session.auto_segment(edited)
            else:
                self.handle = self._session.segment(self.plan.prompts)
        except ServiceError as e:
            if e.status == 404 and not self._retried:
                # The session expired or the service forgot the volume: upload and open again, once.
                self._retried = True
                self.link.cache.pop("panel session", None)
                self.link.cache.pop(("volume", self.plan.volume_key), None)
                self._phase = "upload"
                return [Message(PROGRESS, text="The service forgot the session; sending the volume again...")]
            raise
        self._phase = "running"
        if self.cancel_requested:
            self.cancel()
        return [Message(PROGRESS, text="Run started.", fraction=None)]

    def _step_poll(self) -> List[Message]:
        status = self.handle.poll()
        out = []
        for event in status.events:
            stage = _STAGES.get(event.stage, event.stage)
            fraction = event.fraction if event.total else None
            out.append(Message(PROGRESS, text=f"{stage}: {event.message}".strip(), fraction=fraction))
        if status.state == "done":
            self._phase = "result"
            out += self._step_result()
        elif status.state == "cancelled":
            out.append(self._end(Message(CANCELLED, text="Cancelled; nothing was changed.")))
        elif status.state == "failed":
            error = status.error or {}
            message = str(error.get("message") or "the run failed")
            out.append(self._end(Message(FAILED, text=f"Segmentation failed on the service: {message} Nothing was changed.",
                                         error=UserFacingError(message))))
        return out

    def _step_result(self) -> List[Message]:
        result = self._wait(self.handle.result, "Fetching the result...")
        if result is None:
            return [Message(PROGRESS, text="Fetching the result...")]
        return [self._end(Message(DONE, value=self._outcome(result)))]

    def _outcome(self, result: Any) -> Any:
        from .logic import RunOutcome

        info = self.link.cache.get("info")
        if info is None:
            try:
                info = self._client.info()
            except Exception:  # noqa: BLE001 - the device is only shown in the status line
                info = {}
            self.link.cache["info"] = info
        backbone = str(self._session.backbone or self.plan.backbone)
        outcome = RunOutcome(result=result, labels=result.labels, backbone_name=backbone,
                             device=str(info.get("device", "?")), location=self.link.describe())
        if self.plan.kind == AUTO:
            from sss_lib.prompts import PromptSet

            document = result.prompts_json
            outcome.prompts = PromptSet.from_json(document, self.plan.volume) if document else None
            outcome.classes = task_classes(self._model)
            # The file the user chose names it, as in process (the service names uploads "upload-<hash>").
            outcome.model_name = os.path.basename(self.plan.task_model_path)
        return outcome

    # -- endings ----------------------------------------------------------------------------------
    def _end(self, message: Message) -> Message:
        self.finished = True
        return message

    def _failure(self, error: BaseException) -> Message:
        from sss_lib.service.client import ServiceError, ServiceUnavailable

        if isinstance(error, ServiceUnavailable):
            self.link.forget()  # the next click reconnects (and restarts a dead local service)
            text = unavailable_text(error, self.link.settings)
        elif isinstance(error, ServiceError):
            text = f"The SSS service refused the request: {error.message} Nothing was changed."
        elif isinstance(error, UserFacingError):  # ServiceLinkError too
            text = str(error)
        else:
            logging.exception("SSS: run failed")
            text = f"Segmentation failed: {error}. Nothing was changed."
        if self._download is not None and self._download.poll() is None:
            self._download.kill()
        return self._end(Message(FAILED, text=text, error=error))


def task_classes(model: Any) -> List[tuple]:
    """``(label, name, (r, g, b))`` of every class of an uploaded task model (the service's answer)."""
    out = []
    for c in model.get("classes") or []:
        if isinstance(c, dict):
            label, name, color = c.get("label"), c.get("name"), c.get("color") or (255, 0, 0)
        else:
            label, name, color = c[0], c[1], c[2] if len(c) > 2 else (255, 0, 0)
        out.append((int(label), str(name), tuple(int(v) for v in color)))
    return out


def _tail(path: str, n: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace").strip()
