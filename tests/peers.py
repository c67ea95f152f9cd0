"""Real DICOM and database peers for sijnode's tests.

Everything here starts genuine third-party programs on the loopback
interface: Orthanc (a PACS stand-in), dcmtk's storescp/storescu/echoscu
and a throw-away PostgreSQL cluster. There are no mocks and no skips: a
missing binary raises :class:`MissingPeerBinary` with the package to
install, because CI is expected to have all of them.

Every server is a context manager that stops its process (and process
group) on exit, also when the test body fails, so no server outlives the
test that started it.

Two facts about the programs shape this module:

* dcmtk and Orthanc stall about 45 ms per DIMSE message on loopback
  (Nagle's algorithm meets delayed ACKs) unless ``TCP_NODELAY=1`` is in
  their environment, so every process started here gets
  :func:`dicom_tool_env`.
* pynetdicom installs console scripts named ``storescu``/``echoscu``/...
  that can shadow dcmtk's on ``PATH``; dcmtk tools are therefore always
  called by absolute path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

__all__ = [
    "LOOPBACK",
    "STORESCU",
    "STORESCP",
    "ECHOSCU",
    "ORTHANC",
    "PG_BIN_DIR",
    "MissingPeerBinary",
    "PeerStartupError",
    "OrthancHTTPError",
    "free_port",
    "wait_for",
    "dicom_tool_env",
    "start_server",
    "stop_process_group",
    "run_storescu",
    "run_echoscu",
    "Orthanc",
    "orthanc",
    "Postgres",
    "postgres",
    "StoreSCP",
    "storescp",
]

LOOPBACK = "127.0.0.1"

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"
PG_BIN_DIR = Path("/usr/lib/postgresql/15/bin")

# Debian package that provides each binary, for the error message.
_PACKAGE_OF = {STORESCU: "dcmtk", STORESCP: "dcmtk", ECHOSCU: "dcmtk", ORTHANC: "orthanc"}

T = TypeVar("T")


class MissingPeerBinary(RuntimeError):
    """A program a peer needs is not installed (CI must install it)."""


class PeerStartupError(RuntimeError):
    """A peer process exited or never became ready; the message has its log tail."""


class OrthancHTTPError(RuntimeError):
    """Orthanc answered an HTTP error; ``status`` and ``body`` keep its answer."""

    def __init__(self, method: str, url: str, status: int, body: bytes) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.body = body
        text = body.decode("utf-8", errors="replace")
        super().__init__(f"{method} {url} -> HTTP {status}: {text[:2000]}")

    def json(self) -> Any:
        """Orthanc's error document (it describes errors as JSON)."""
        return json.loads(self.body)


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks it by binding port 0. Another process could take it
    before the caller binds; in a test run that race is practically nil.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    *,
    what: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns something truthy; return that value.

    Exceptions listed in ``ignore`` count as "not yet" (e.g. connection
    refused while a server starts); any other exception propagates at once.
    Raises ``TimeoutError`` naming ``what`` (chained to the last ignored
    exception) if the deadline passes.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as error:
            last_error = error
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout:g} s") from last_error
        time.sleep(interval)


def dicom_tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for dcmtk and Orthanc: ours plus ``TCP_NODELAY=1``."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


def _require_executable(path: str | Path, package: str) -> str:
    """Return ``path`` as str, or fail loudly if it is not an executable."""
    if not os.access(path, os.X_OK):
        raise MissingPeerBinary(f"{path} not found: install the Debian package '{package}'")
    return str(path)


def _log_tail(path: Path, max_chars: int = 4000) -> str:
    """Last part of a log file, for error messages."""
    try:
        return path.read_text(errors="replace")[-max_chars:]
    except FileNotFoundError:
        return "(no log written)"


def stop_process_group(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM a process and its group, SIGKILL them if they outstay ``timeout``.

    Servers are started in their own session, so the group also holds any
    children (storescp --fork forks one per association) and one signal to
    the group reaches them all.
    """
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def start_server(
    command: Sequence[str],
    log_path: Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server in its own session (process group), output appended to ``log_path``.

    The environment is :func:`dicom_tool_env` plus ``env``. Stop it with
    :func:`stop_process_group`.
    """
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dicom_tool_env(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


# --------------------------------------------------------------------------
# dcmtk clients
# --------------------------------------------------------------------------


def run_storescu(
    files: Iterable[str | Path] | str | Path,
    port: int,
    aet_called: str,
    aet_calling: str = "STORESCU",
    extra_args: Sequence[str] = (),
    *,
    host: str = LOOPBACK,
    timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk's storescu over one association; never raises on failure.

    ``files`` may be one path or many; directories are allowed and make
    storescu scan them recursively (``+sd +r``). The default presentation
    context proposals are kept. Check ``returncode`` (and ``stderr``) of the
    result: dcmtk 3.6.7 exits non-zero when the association is refused or a
    C-STORE fails (it stops at the first failure unless ``-nh`` is given).
    """
    paths = [files] if isinstance(files, (str, Path)) else list(files)
    if not paths:
        raise ValueError("run_storescu needs at least one file or directory")
    args = list(extra_args)
    if any(Path(p).is_dir() for p in paths):
        args += [flag for flag in ("+sd", "+r") if flag not in args]
    command = [
        _require_executable(STORESCU, "dcmtk"),
        "-aet", aet_calling,
        "-aec", aet_called,
        *args,
        host, str(port),
        *(str(p) for p in paths),
    ]
    return subprocess.run(
        command, env=dicom_tool_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def run_echoscu(
    port: int,
    aet_called: str = "ANY-SCP",
    aet_calling: str = "ECHOSCU",
    extra_args: Sequence[str] = (),
    *,
    host: str = LOOPBACK,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Send one C-ECHO with dcmtk's echoscu; ``returncode == 0`` means success."""
    command = [
        _require_executable(ECHOSCU, "dcmtk"),
        "-aet", aet_calling,
        "-aec", aet_called,
        # Fail fast when nothing listens yet, instead of dcmtk's 30 s default.
        "-to", "5", "-ta", "5",
        *extra_args,
        host, str(port),
    ]
    return subprocess.run(
        command, env=dicom_tool_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def _echo_succeeds(port: int, aet_called: str) -> bool:
    return run_echoscu(port, aet_called, timeout=10.0).returncode == 0


# --------------------------------------------------------------------------
# dcmtk storescp
# --------------------------------------------------------------------------


class StoreSCP:
    """dcmtk's storescp on 127.0.0.1 writing every received instance to ``output_dir``.

    Files are named by storescp (``MR.<SOPInstanceUID>`` etc.). With
    ``fork=True`` storescp forks a child per association, so parallel
    associations are served in parallel; by default (dcmtk's default) it
    serves one association at a time and further ones wait in the listen
    queue. storescp itself listens on all interfaces (dcmtk has no bind
    option); tests only ever connect to 127.0.0.1.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        fork: bool = False,
        verbose: bool = False,
        extra_args: Sequence[str] = (),
        name: str = "storescp",
        startup_timeout: float = 15.0,
    ) -> None:
        self.aet = aet
        self.port = port if port is not None else free_port()
        self.fork = fork
        self.verbose = verbose
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.base_dir = Path(workdir) / name
        self.output_dir = self.base_dir / "received"
        self.log_path = self.base_dir / "storescp.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start storescp (same port and output dir as before) and wait until it echoes."""
        if self.is_running:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        command = [
            _require_executable(STORESCP, "dcmtk"),
            "-aet", self.aet,
            "-od", str(self.output_dir),
            *(["--fork"] if self.fork else []),
            *(["-v"] if self.verbose else []),
            *self.extra_args,
            str(self.port),
        ]
        self._process = start_server(command, self.log_path, self.base_dir)
        try:
            wait_for(
                self._ready,
                timeout=self.startup_timeout,
                interval=0.05,
                what=f"storescp answering C-ECHO on port {self.port}",
            )
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise PeerStartupError(
                f"storescp exited with {self._process.returncode}:\n{_log_tail(self.log_path)}"
            )
        return _echo_succeeds(self.port, self.aet)

    def stop(self) -> None:
        """Stop storescp (and any forked children); received files stay."""
        if self._process is not None:
            stop_process_group(self._process)
            self._process = None

    def received_files(self) -> list[Path]:
        """Files written so far, sorted by name (excludes storescp's temp files)."""
        if not self.output_dir.exists():
            return []
        return sorted(p for p in self.output_dir.rglob("*") if p.is_file())

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def storescp(workdir: Path, **kwargs: Any) -> StoreSCP:
    """``with storescp(tmp_path) as scp:`` — see :class:`StoreSCP` for keywords."""
    return StoreSCP(workdir, **kwargs)


# --------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------


class Orthanc:
    """An Orthanc server on loopback ports with its own storage, index and log.

    ``modalities`` maps Orthanc's modality id to ``(AET, host, port)``.
    ``stop()`` then ``start()`` restarts it on the SAME ports and storage,
    for "destination down, then up" tests; the configuration file is
    rewritten at each start, so modalities added with :meth:`set_modality`
    survive a restart. ``extra_config`` overrides or adds Orthanc options.

    Orthanc keeps an outgoing association open for 5 s after a C-STORE
    (``DicomAssociationCloseDelay``) to reuse it. A single-process SCP such
    as plain storescp is busy for those 5 s, so an Orthanc C-ECHO to it
    right after a store times out; use ``StoreSCP(fork=True)`` or
    ``extra_config={"DicomAssociationCloseDelay": 0}`` where that matters.

    Orthanc 1.10 has no bind-address option: it listens on all interfaces.
    ``RemoteAccessAllowed: false`` limits HTTP to localhost; DICOM store is
    open (``DicomAlwaysAllowStore``), as a PACS stand-in must be.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        name: str | None = None,
        startup_timeout: float = 30.0,
        http_timeout: float = 60.0,
    ) -> None:
        self.aet = aet
        self.modalities: dict[str, tuple[str, str, int]] = dict(modalities or {})
        self.extra_config: dict[str, Any] = dict(extra_config or {})
        self.startup_timeout = startup_timeout
        self.http_timeout = http_timeout
        self.base_dir = Path(workdir) / (name or f"orthanc-{aet.lower()}")
        self.storage_dir = self.base_dir / "storage"
        self.index_dir = self.base_dir / "index"
        self.temporary_dir = self.base_dir / "tmp"
        self.config_path = self.base_dir / "orthanc.json"
        self.log_path = self.base_dir / "orthanc.log"
        # Ports are chosen once so that a restart comes back on the same ones.
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.http_url = f"http://{LOOPBACK}:{self.http_port}"
        self._process: subprocess.Popen[bytes] | None = None

    # ---- lifecycle ------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config(self) -> dict[str, Any]:
        """The Orthanc configuration written at start."""
        config: dict[str, Any] = {
            "Name": self.aet,
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.index_dir),
            "TemporaryDirectory": str(self.temporary_dir),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {
                modality_id: [aet, host, port]
                for modality_id, (aet, host, port) in self.modalities.items()
            },
            "DicomModalitiesInDatabase": False,
        }
        config.update(self.extra_config)
        return config

    def start(self) -> None:
        """Start Orthanc and wait until ``GET /system`` answers."""
        if self.is_running:
            return
        for directory in (self.storage_dir, self.index_dir, self.temporary_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        command = [_require_executable(ORTHANC, "orthanc"), str(self.config_path)]
        self._process = start_server(command, self.log_path, self.base_dir)
        try:
            wait_for(
                self._ready,
                timeout=self.startup_timeout,
                interval=0.05,
                what=f"Orthanc answering on {self.http_url}/system",
                ignore=(OSError,),
            )
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise PeerStartupError(
                f"Orthanc exited with {self._process.returncode}:\n{_log_tail(self.log_path)}"
            )
        return bool(self._request("GET", "/system", timeout=2.0))

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, SIGKILL after 15 s); storage and ports are kept."""
        if self._process is not None:
            stop_process_group(self._process, timeout=15.0)
            self._process = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- HTTP -----------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> bytes:
        url = self.http_url + path
        request = urllib.request.Request(url, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.http_timeout) as answer:
                content: bytes = answer.read()
                return content
        except urllib.error.HTTPError as error:
            raise OrthancHTTPError(method, url, error.code, error.read()) from None

    def get(self, path: str) -> Any:
        """``GET path`` and decode the JSON answer."""
        return json.loads(self._request("GET", path))

    def get_bytes(self, path: str) -> bytes:
        """``GET path`` and return the raw answer (files, images)."""
        return self._request("GET", path)

    def post(self, path: str, json_body: Any = None, *, timeout: float | None = None) -> Any:
        """``POST path`` with a JSON body; decode the JSON answer (None if empty)."""
        body = json.dumps(json_body if json_body is not None else {}).encode()
        answer = self._request("POST", path, body, "application/json", timeout)
        return json.loads(answer) if answer.strip() else None

    def put(self, path: str, json_body: Any) -> Any:
        """``PUT path`` with a JSON body; decode the JSON answer (None if empty)."""
        answer = self._request("PUT", path, json.dumps(json_body).encode(), "application/json")
        return json.loads(answer) if answer.strip() else None

    def delete(self, path: str) -> None:
        """``DELETE path`` (e.g. ``/studies/{id}``)."""
        self._request("DELETE", path)

    # ---- DICOM resources ------------------------------------------------

    def upload(self, path_to_dcm: str | Path) -> dict[str, Any]:
        """Store a DICOM file through ``POST /instances``.

        Returns Orthanc's answer: ``ID``, ``ParentStudy``, ``ParentSeries``,
        ``ParentPatient``, ``Path`` and ``Status`` (``Success`` or
        ``AlreadyStored``).
        """
        answer = self._request(
            "POST", "/instances", Path(path_to_dcm).read_bytes(), "application/dicom"
        )
        return dict(json.loads(answer))

    def store_to(
        self,
        modality: str,
        resource_ids: str | Iterable[str],
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """C-STORE resources (patients/studies/series/instances) to a modality, synchronously.

        Blocks until Orthanc's job ends. On success Orthanc answers the job
        summary (``InstancesCount``, ``FailedInstancesCount``, ``LocalAet``,
        ``RemoteAet``, ``ParentResources``, ...). If the peer is down or
        refuses, Orthanc answers HTTP 500 and this raises
        :class:`OrthancHTTPError`. ``timeout`` is the DIMSE timeout (s) that
        Orthanc uses for this job; the HTTP wait is longer than it.
        """
        ids = [resource_ids] if isinstance(resource_ids, str) else list(resource_ids)
        body: dict[str, Any] = {"Resources": ids, "Synchronous": True}
        http_timeout = self.http_timeout
        if timeout is not None:
            body["Timeout"] = timeout
            http_timeout = max(http_timeout, timeout * 2 + 10)
        return dict(
            self.post(
                f"/modalities/{urllib.parse.quote(modality, safe='')}/store", body, timeout=http_timeout
            )
        )

    def set_modality(self, modality: str, aet: str, port: int, host: str = LOOPBACK) -> None:
        """Add or change a modality now (``PUT /modalities/{id}``) and for later restarts."""
        self.modalities[modality] = (aet, host, port)
        if self.is_running:
            self.put(
                f"/modalities/{urllib.parse.quote(modality, safe='')}",
                {"AET": aet, "Host": host, "Port": port},
            )

    def echo(self, modality: str, *, timeout: float = 5.0) -> bool:
        """C-ECHO a modality from Orthanc; True on success, False when it fails."""
        try:
            self.post(
                f"/modalities/{urllib.parse.quote(modality, safe='')}/echo",
                {"Timeout": timeout},
                timeout=timeout * 2 + 10,
            )
        except OrthancHTTPError:
            return False
        return True

    def studies(self) -> list[str]:
        """Orthanc ids of all studies."""
        return list(self.get("/studies"))

    def series(self) -> list[str]:
        """Orthanc ids of all series."""
        return list(self.get("/series"))

    def instances(self) -> list[str]:
        """Orthanc ids of all instances."""
        return list(self.get("/instances"))

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file (Part 10 bytes) of an instance."""
        return self.get_bytes(f"/instances/{instance_id}/file")

    def instance_tags(self, instance_id: str, *, simplify: bool = True) -> dict[str, Any]:
        """An instance's tags: ``{"PatientID": "..."}`` (simplified) or Orthanc's full form."""
        return dict(self.get(f"/instances/{instance_id}/{'simplified-tags' if simplify else 'tags'}"))

    def lookup(self, dicom_uid_or_id: str) -> list[dict[str, Any]]:
        """``POST /tools/lookup``: resources whose UID/ID equals the value (may be empty)."""
        answer = self._request("POST", "/tools/lookup", dicom_uid_or_id.encode(), "text/plain")
        return list(json.loads(answer))

    def instance_id_for(self, sop_instance_uid: str) -> str | None:
        """Orthanc id of the instance with this SOP Instance UID, or None."""
        for match in self.lookup(sop_instance_uid):
            if match.get("Type") == "Instance":
                return str(match["ID"])
        return None


def orthanc(
    workdir: Path,
    *,
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    aet: str = "ORTHANC",
    **kwargs: Any,
) -> Orthanc:
    """``with orthanc(tmp_path, modalities=..., aet="ORTHANC") as pacs:`` — see :class:`Orthanc`."""
    return Orthanc(workdir, aet=aet, modalities=modalities, **kwargs)


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------


class Postgres:
    """A throw-away PostgreSQL 15 cluster on 127.0.0.1 with one database.

    PostgreSQL refuses to run as root, so when the tests run as root the
    cluster is created and run by the ``postgres`` system user (through
    ``runuser``) in a directory it owns. That directory is made under the
    system temp dir, not under ``workdir``, because pytest's ``tmp_path``
    lives in a root-only (0700) tree that ``postgres`` cannot enter; it is
    removed on exit and the server log is copied to ``workdir``.

    Authentication is ``trust`` (local socket and loopback only). Durability
    is traded for speed (``fsync=off`` etc.) unless ``durable=True``.
    ``stop()``/``start()`` take the server down and back on the same port
    with the same data.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        database: str = "sijnode",
        user: str = "postgres",
        durable: bool = False,
        settings: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.database = database
        self.user = user
        self.durable = durable
        self.settings = dict(settings or {})
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.root_dir: Path | None = None
        self._initialized = False

    # ---- addresses --------------------------------------------------------

    @property
    def url(self) -> str:
        """SQLAlchemy URL: ``postgresql+psycopg://postgres@127.0.0.1:PORT/DB``."""
        return f"postgresql+psycopg://{self.user}@{LOOPBACK}:{self.port}/{self.database}"

    @property
    def conninfo(self) -> str:
        """libpq/psycopg connection string for the database."""
        return f"host={LOOPBACK} port={self.port} user={self.user} dbname={self.database}"

    @property
    def data_dir(self) -> Path:
        return self._root() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._root() / "socket"

    @property
    def log_path(self) -> Path:
        return self._root() / "postgres.log"

    def _root(self) -> Path:
        if self.root_dir is None:
            raise RuntimeError("Postgres has not been started")
        return self.root_dir

    # ---- running the PostgreSQL binaries -----------------------------------

    def _pg_command(self, program: str, *args: str) -> list[str]:
        """Command line for a PostgreSQL binary, as ``postgres`` when we are root."""
        binary = _require_executable(PG_BIN_DIR / program, "postgresql-15")
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise MissingPeerBinary("runuser not found: install the Debian package 'util-linux'")
            return [runuser, "-u", "postgres", "--", binary, *args]
        return [binary, *args]

    def _run(self, program: str, *args: str, timeout: float = 120.0) -> None:
        command = self._pg_command(program, *args)
        result = subprocess.run(
            command,
            cwd=self._root(),  # postgres must be able to enter the cwd
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise PeerStartupError(
                f"{' '.join(command)} exited with {result.returncode}:\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}\n"
                f"server log:\n{_log_tail(self.log_path) if self.root_dir else ''}"
            )

    def _make_root_dir(self) -> Path:
        root = Path(tempfile.mkdtemp(prefix="sijnode-pg-"))
        if os.geteuid() == 0:
            try:
                shutil.chown(root, user="postgres", group="postgres")
            except LookupError as error:
                raise MissingPeerBinary(
                    "system user 'postgres' not found: install the Debian package 'postgresql-15'"
                ) from error
        return root

    def _server_settings(self) -> dict[str, str]:
        settings = {
            "listen_addresses": f"'{LOOPBACK}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "50",
            "shared_buffers": "32MB",
        }
        if not self.durable:
            # Test data is thrown away: skip the disk flushes.
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        settings |= self.settings
        return settings

    def _initialize(self) -> None:
        self.root_dir = self._make_root_dir()
        self._run(
            "initdb",
            "-D", str(self.data_dir),
            "-U", self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        self._run_as_owner_mkdir(self.socket_dir)
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# sijnode test harness\n")
            for key, value in self._server_settings().items():
                conf.write(f"{key} = {value}\n")
        self._initialized = True

    def _run_as_owner_mkdir(self, directory: Path) -> None:
        directory.mkdir()
        if os.geteuid() == 0:
            shutil.chown(directory, user="postgres", group="postgres")

    # ---- lifecycle ------------------------------------------------------

    @property
    def is_running(self) -> bool:
        if self.root_dir is None:
            return False
        return (self.data_dir / "postmaster.pid").exists()

    def start(self) -> None:
        """Create the cluster and database (first time) and start the server."""
        if self.is_running:
            return
        first_start = not self._initialized
        try:
            if first_start:
                self._initialize()
            self._run(
                "pg_ctl", "start",
                "-D", str(self.data_dir),
                "-l", str(self.log_path),
                "-w", "-t", str(int(self.startup_timeout)),
                timeout=self.startup_timeout + 30,
            )
            if first_start:
                self._create_database()
        except BaseException:
            self.close()
            raise

    def _create_database(self) -> None:
        import psycopg  # project dependency; imported here so peers.py imports without it

        with psycopg.connect(
            host=LOOPBACK, port=self.port, user=self.user, dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{self.database}"')

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``); the data stays for ``start()``."""
        if self.is_running:
            self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60")

    def close(self) -> None:
        """Stop the server, keep its log in ``workdir``, delete the cluster."""
        try:
            self.stop()
        finally:
            if self.root_dir is not None:
                if self.log_path.exists():
                    self.workdir.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(self.log_path, self.workdir / f"postgres-{self.port}.log")
                shutil.rmtree(self.root_dir, ignore_errors=True)
                self.root_dir = None
                self._initialized = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def postgres(workdir: Path, **kwargs: Any) -> Postgres:
    """``with postgres(tmp_path) as pg:`` — see :class:`Postgres` for keywords."""
    return Postgres(workdir, **kwargs)
