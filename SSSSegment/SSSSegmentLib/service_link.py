"""Where the heavy work runs: the SSS service, on this computer or on a server ("Compute on").

Both panels (SSS Segment and SSS Train) run inference and training in the SSS service, never on a
Python thread inside Slicer (Slicer's main thread holds the GIL while idle, so such a thread crawls:
SLICER_API.md section 5). One :class:`ServiceLink`, shared by the two panels (:func:`shared_link`),
knows where the service is:

* *this computer* (the default): ``PythonSlicer -m sss_lib serve`` on 127.0.0.1 with a fresh random
  token (``sss_lib.service.local.LocalService``), started on the first run, reused by every run of
  both panels, started again on the next click if it died, stopped when Slicer quits;
* *server*: a URL and a token the user typed; the API version is checked once per address.

The address and token live in Slicer's application settings (``qt.QSettings``), never in the scene:
a saved scene must not carry a token. :func:`read_settings` / :func:`write_settings` take the
settings object so this file stays free of Qt.

Nothing here blocks the GUI for long: :meth:`ServiceLink.poll` returns None while the local service
is still starting (the panels call it from their timers) and the client once it answers.
Python 3.9 compatible; ``sss_lib`` is imported inside the functions.
"""

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from .errors import UserFacingError

THIS_COMPUTER = "this computer"
SERVER = "server"
COMPUTE_CHOICES = [THIS_COMPUTER, SERVER]

# Application settings (qt.QSettings keys); shared by both panels.
SETTINGS_COMPUTE_ON = "SSS/computeOn"
SETTINGS_SERVER_URL = "SSS/serverUrl"
SETTINGS_SERVER_TOKEN = "SSS/serverToken"

# Seconds the local service may take to print its ready line (importing torch on a cold disk is slow).
LOCAL_START_TIMEOUT_S = 180.0


class ServiceLinkError(UserFacingError):
    """The service cannot be used; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class ComputeSettings:
    """Where to compute: ``mode`` is :data:`THIS_COMPUTER` or :data:`SERVER` (then ``url``, ``token``)."""

    mode: str = THIS_COMPUTER
    url: str = ""
    token: str = ""

    def check(self) -> None:
        """Raise :class:`ServiceLinkError` when a server is chosen without its address or token."""
        if self.mode not in COMPUTE_CHOICES:
            raise ServiceLinkError(f"Unknown 'Compute on' choice {self.mode!r}; use one of {COMPUTE_CHOICES}.")
        if self.mode == SERVER:
            if not self.url.strip():
                raise ServiceLinkError("Compute on server: type the server's address (e.g. https://gpu-host:8765).")
            if not self.token.strip():
                raise ServiceLinkError("Compute on server: type the server's token (the first line of the file "
                                       "given to 'python -m sss_lib serve --token-file').")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def read_settings(qsettings: Any) -> ComputeSettings:
    """The "Compute on" choice stored in ``qsettings`` (a ``qt.QSettings``; anything with ``value(key)``)."""
    mode = _text(qsettings.value(SETTINGS_COMPUTE_ON)) or THIS_COMPUTER
    if mode not in COMPUTE_CHOICES:
        mode = THIS_COMPUTER
    return ComputeSettings(mode, _text(qsettings.value(SETTINGS_SERVER_URL)).strip(),
                           _text(qsettings.value(SETTINGS_SERVER_TOKEN)).strip())


def write_settings(qsettings: Any, settings: ComputeSettings) -> None:
    """Store ``settings`` in ``qsettings`` (application settings, not the scene)."""
    qsettings.setValue(SETTINGS_COMPUTE_ON, settings.mode)
    qsettings.setValue(SETTINGS_SERVER_URL, settings.url.strip())
    qsettings.setValue(SETTINGS_SERVER_TOKEN, settings.token.strip())


def unavailable_text(error: BaseException, settings: ComputeSettings) -> str:
    """What the panel says when the service went away or refused the connection."""
    if settings.mode == SERVER:
        return (f"The SSS server at {settings.url} cannot be reached or went away ({error}). Nothing was changed. "
                "Check that it runs and the address, then try again.")
    return (f"The SSS service on this computer stopped ({error}). Nothing was changed. "
            "Press the button again to restart it; if this repeats, see Slicer's Python console.")


class ComputeOnControls:
    """The "Compute on" rows of a panel (``computeOnComboBox``, ``serverUrlLineEdit``,
    ``serverTokenLineEdit`` and their labels): shows the stored choice and stores every edit.

    Args:
        ui: the panel's widgets.
        qsettings: returns the application settings (``qt.QSettings``).
    """

    ROWS = ("serverUrlLabel", "serverUrlLineEdit", "serverTokenLabel", "serverTokenLineEdit")

    def __init__(self, ui: Any, qsettings: Callable[[], Any]) -> None:
        self.ui = ui
        self.qsettings = qsettings
        self._updating = False

    def connect(self) -> None:
        self.ui.computeOnComboBox.connect("currentIndexChanged(int)", self.on_changed)
        # textChanged, not editingFinished: a click on Segment right after typing must see the text.
        self.ui.serverUrlLineEdit.connect("textChanged(QString)", self.on_changed)
        self.ui.serverTokenLineEdit.connect("textChanged(QString)", self.on_changed)

    def settings(self) -> ComputeSettings:
        return read_settings(self.qsettings())

    def show(self) -> None:
        """Show the stored choice (the other panel may have changed it)."""
        settings = self.settings()
        self._updating = True
        try:
            combo = self.ui.computeOnComboBox
            combo.setCurrentIndex(max(0, combo.findText(settings.mode)))
            self.ui.serverUrlLineEdit.text = settings.url
            self.ui.serverTokenLineEdit.text = settings.token
        finally:
            self._updating = False
        self._show_rows(settings.mode)

    def on_changed(self, *unused: Any) -> None:
        """Store the edit in the application settings (never in the scene: the token must not travel with it)."""
        if self._updating:
            return
        settings = ComputeSettings(str(self.ui.computeOnComboBox.currentText), str(self.ui.serverUrlLineEdit.text),
                                   str(self.ui.serverTokenLineEdit.text))
        write_settings(self.qsettings(), settings)
        self._show_rows(settings.mode)

    def _show_rows(self, mode: str) -> None:
        for name in self.ROWS:
            getattr(self.ui, name).visible = mode == SERVER


class ServiceLink:
    """The service both panels use (see the module docstring).

    Args:
        python: the interpreter that runs ``-m sss_lib serve`` on this computer (PythonSlicer in Slicer).
        sss_lib_root: the folder holding ``sss_lib``, put on the local service's PYTHONPATH.
        base_env: the environment the local service starts from (in Slicer: the startup environment).
        extra_args: more ``serve`` options for the local service (e.g. ``["--memory-budget", "2"]``).
        client_factory: ``(url, token) -> client`` (default ``sss_lib.service.client.ServiceClient``).
        local_factory: ``(python, args, env) -> started LocalService`` (``sss_lib.service.local``:
            ``poll_ready()``, ``alive()``, ``stop()``, ``url``, ``token``, ``pid``).
    """

    def __init__(self, python: str, sss_lib_root: Optional[str] = None, base_env: Optional[Mapping[str, str]] = None,
                 extra_args: Sequence[str] = (), client_factory: Optional[Callable[[str, str], Any]] = None,
                 local_factory: Optional[Callable[..., Any]] = None) -> None:
        self.python = python
        self.sss_lib_root = sss_lib_root
        self.base_env = dict(base_env) if base_env is not None else None
        self.extra_args = list(extra_args)
        self.client_factory = client_factory or _default_client
        self.local_factory = local_factory or _default_local
        self.settings = ComputeSettings()
        self.device = "auto"
        self._client: Any = None
        self._client_for: Optional[tuple] = None
        self._local: Any = None
        self._local_device = ""
        self._local_started = 0.0
        self._jobs_dir = ""
        self.starts = 0  # local services started (a test counts restarts)
        self.cache: Dict[Any, Any] = {}  # per-service values (uploaded volumes, models); cleared with the client

    # -- configuration ----------------------------------------------------------------------------
    def configure(self, settings: ComputeSettings, device: Optional[str] = None) -> None:
        """Use ``settings`` from the next :meth:`poll` on (a change drops the current client).
        ``device``: what the local service computes on (None keeps the current choice)."""
        settings.check()
        self.settings = settings
        if device is not None:
            self.device = device or "auto"

    @property
    def is_local(self) -> bool:
        return self.settings.mode == THIS_COMPUTER

    def _wanted(self) -> tuple:
        if self.is_local:
            return (THIS_COMPUTER, self.device)
        return (SERVER, self.settings.url.strip(), self.settings.token.strip())

    # -- the client -------------------------------------------------------------------------------
    def poll(self) -> Any:
        """The service's client when it answers; None while the local service is still starting.

        Starts the local service on first use (and again when it died, or runs on another device
        than asked for); connects to the server and checks its API version once per address.

        Raises:
            ServiceLinkError: the local service could not start, or the server settings are incomplete.
            sss_lib errors of the client (AuthError, VersionMismatch, ServiceUnavailable) for a server.
        """
        wanted = self._wanted()
        if self._client is not None and self._client_for == wanted:
            if not self.is_local or self._local_alive():
                return self._client
        self.forget()
        if not self.is_local:
            self.settings.check()
            self._client = self.client_factory(self.settings.url.strip(), self.settings.token.strip())
            self._client_for = wanted
            return self._client
        if self._local is not None and (self._local_device != self.device or not self._local_alive()):
            self.stop()
        if self._local is None:
            self._start_local()
        try:
            ready = self._local.poll_ready()
        except Exception as e:  # noqa: BLE001 - ServiceStartError quotes the service's log
            self._fail_local(str(e))
        if not ready:
            if time.monotonic() - self._local_started > LOCAL_START_TIMEOUT_S:
                self._fail_local(f"The SSS service on this computer did not answer within {LOCAL_START_TIMEOUT_S:.0f} s.")
            return None
        self._client = self.client_factory(self._local.url, self._local.token)
        self._client_for = wanted
        return self._client

    def wait(self, timeout: float = LOCAL_START_TIMEOUT_S, interval: float = 0.1) -> Any:
        """:meth:`poll` until the client is ready (scripts, tests; never from the GUI)."""
        deadline = time.monotonic() + timeout
        while True:
            client = self.poll()
            if client is not None:
                return client
            if time.monotonic() > deadline:
                tail = "\n".join(self._local.log_tail()) if hasattr(self._local, "log_tail") else ""
                raise ServiceLinkError(f"The SSS service did not start within {timeout:.0f} s." + (
                    f" Its log ends with:\n{tail}" if tail else ""))
            time.sleep(interval)

    def forget(self) -> None:
        """Drop the client and what it cached (after the service went away: the next poll reconnects,
        and restarts a dead local service)."""
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection may fail; it is dropped either way
                pass
        self._client = None
        self._client_for = None
        self.cache.clear()

    # -- the local service ------------------------------------------------------------------------
    def _env(self) -> Dict[str, str]:
        env = dict(self.base_env if self.base_env is not None else os.environ)
        if self.sss_lib_root:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (self.sss_lib_root, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _start_local(self) -> None:
        args = ["--device", self.device] + self.extra_args
        if "--jobs-dir" not in self.extra_args:
            # Training from Slicer runs as its own process, not as a job of this service; a jobs
            # folder of its own keeps it clear of the lock a second Slicer's (or a CLI's) service
            # holds on $SSS_HOME/service/jobs.
            self._jobs_dir = tempfile.mkdtemp(prefix="sss-slicer-service-")
            args += ["--jobs-dir", self._jobs_dir]
        if "--preload" not in self.extra_args:
            # The default backbone loads and warms up while the user picks a volume and draws.
            args += ["--preload", "auto"]
        self._local = self.local_factory(self.python, args, self._env())
        self._local_device = self.device
        self._local_started = time.monotonic()
        self.starts += 1

    def _local_alive(self) -> bool:
        return self._local is not None and bool(self._local.alive())

    def _fail_local(self, why: str) -> None:
        self.stop()
        raise ServiceLinkError(
            f"Could not start the SSS service on this computer: {why}\n"
            "Check that the extension's Python packages are installed, then press the button again."
        )

    @property
    def local_pid(self) -> Optional[int]:
        """The local service's process id (None when none runs)."""
        if self._local is None:
            return None
        return getattr(self._local, "pid", None)

    def stop(self) -> None:
        """Stop the local service (Slicer quits, or it must restart); a server is left alone."""
        self.forget()
        local, self._local = self._local, None
        if local is not None:
            try:
                local.stop()
            except Exception:  # noqa: BLE001 - stopping a service that already died
                pass
        if self._jobs_dir:
            shutil.rmtree(self._jobs_dir, ignore_errors=True)
            self._jobs_dir = ""

    def describe(self) -> str:
        """One line for the panel: where the work runs."""
        if self.is_local:
            return "this computer"
        return f"server {self.settings.url}"


def _default_client(url: str, token: str) -> Any:
    from sss_lib.service.client import ServiceClient

    return ServiceClient(url, token)


def _default_local(python: str, args: Sequence[str], env: Mapping[str, str]) -> Any:
    from sss_lib.service.local import LocalService

    return LocalService(list(args), python=python, env=dict(env)).start()


_SHARED: Dict[str, ServiceLink] = {}


def shared_link(python: str, sss_lib_root: Optional[str] = None, base_env: Optional[Mapping[str, str]] = None,
                about_to_quit: Optional[Callable[[Callable[[], None]], None]] = None) -> ServiceLink:
    """The one :class:`ServiceLink` of this Slicer (both panels share it and its local service).

    ``about_to_quit(fn)`` registers ``fn`` to run when the application quits (in Slicer:
    ``slicer.app.connect("aboutToQuit()", fn)``); called once, when the link is made.
    """
    link = _SHARED.get("link")
    if link is None:
        link = ServiceLink(python, sss_lib_root, base_env)
        _SHARED["link"] = link
        if about_to_quit is not None:
            about_to_quit(link.stop)
    return link


def in_slicer_application() -> bool:
    """True inside the Slicer application; False with only MRML (slicer-core: tests, PythonSlicer)."""
    import slicer

    return callable(getattr(getattr(slicer, "app", None), "startupEnvironment", None))


def slicer_link(module_dir: str) -> ServiceLink:
    """The shared link as Slicer's panels use it: the service runs in PythonSlicer with this
    extension's ``sss_lib`` on its path, from Slicer's startup environment, and stops when Slicer quits.
    Outside the application (tests) it runs in this interpreter."""
    import shutil
    import sys

    import slicer

    from .paths import ensure_sss_lib_importable

    root = ensure_sss_lib_importable(module_dir)
    if in_slicer_application():
        python = shutil.which("PythonSlicer") or sys.executable
        env = slicer.util.startupEnvironment()
        return shared_link(python, root, env, about_to_quit=lambda fn: slicer.app.connect("aboutToQuit()", fn))
    return shared_link(sys.executable, root, None)


def forget_shared_link() -> None:
    """Stop and drop the shared link (tests; a module reload)."""
    link = _SHARED.pop("link", None)
    if link is not None:
        link.stop()
