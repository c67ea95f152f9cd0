"""The service process (``sijnode serve``): receiver, completion loop, workers and sender.

Stages hand over through the database and the spool only, so the service can be killed at any
moment and a restart picks up: studies still waiting for their quiet period, pending jobs and
jobs whose worker lease expired, and deliveries not yet acknowledged.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
from datetime import datetime
from multiprocessing.connection import Connection

from node import metrics
from node.checks import config_problems
from node.completion import complete_due_studies
from node.config import Config, ConfigError, load_config
from node.heartbeat import HEARTBEAT_NAME, HEARTBEAT_SECONDS, still_running
from node.logs import log_event, set_levels
from node.receiver import Receiver, claim_port, receiver_main, slot_board
from node.sender import Sender
from node.worker import worker_main
from storage.models import utcnow
from storage.spool import Spool
from storage.store import Store, open_store

log = logging.getLogger("sijnode.service")


# What a reload (SIGHUP) changes in the running service; everything else needs a restart
# (listening socket, TLS, database and spool, worker count and device, metrics endpoint).
RELOADABLE_RECEIVER_KEYS = ("extra_calling_ae_titles", "allow_any_calling_ae", "allowed_source_addresses", "called_ae_titles")
RELOADABLE_WORKER_KEYS = ("max_attempts", "lease_seconds")
RELOADABLE_LOGGING_KEYS = ("level", "libraries")
RELOADABLE_SECTIONS = ("study", "dispatch", "peers", "classification", "chains")


class ServiceStartError(Exception):
    """The service cannot start (a port in use, ...); the message is one line for the admin."""


def reloadable_part(running: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """The config to run after a reload: ``new`` where a reload can apply it, ``running`` elsewhere.

    Returns it with the changed keys it applies and the changed keys that wait for a restart.
    """
    def take(section: str, keys: tuple[str, ...]):  # noqa: ANN202 (a config section model)
        return getattr(running, section).model_copy(update={key: getattr(getattr(new, section), key) for key in keys})

    effective = new.model_copy(
        update={
            "receiver": take("receiver", RELOADABLE_RECEIVER_KEYS),
            "workers": take("workers", RELOADABLE_WORKER_KEYS),
            "logging": take("logging", RELOADABLE_LOGGING_KEYS),
            "storage": running.storage,
            "metrics": running.metrics,
        }
    )
    applied = _changed_keys(running.model_dump(), effective.model_dump())
    waiting = _changed_keys(effective.model_dump(), new.model_dump())
    return effective, applied, waiting


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


# How often due studies are looked for: small against the release grace period.
COMPLETION_POLL_SECONDS = 0.5
# How often idle workers and the sender look for new work: it adds to every study's turnaround.
HANDOVER_POLL_SECONDS = 0.25
# Association rows matter only until their study completes; older ones are deleted.
ASSOCIATION_ROWS_KEPT_SECONDS = 86400.0


class Service:
    def __init__(self, config: Config, config_path: str) -> None:
        self.config = config
        self.config_path = config_path
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.started_at: datetime = utcnow()
        # Before anything records a metric, and before workers start (they inherit it).
        metrics.prepare_multiprocess(config.storage.data_dir / "metrics")
        self.store: Store = open_store(config.database_url)
        self.spool = Spool(config.storage.data_dir, config.storage.free_space_reserve_mb)
        self.metrics_server: metrics.MetricsServer | None = None
        # pynetdicom and pydicom temporary files land on the spool's filesystem.
        tempfile.tempdir = str(self.spool.tmp_dir)
        self.receiver = Receiver(config, self.store, self.spool)
        self.sender = Sender(config, self.store, self.spool, poll_seconds=HANDOVER_POLL_SECONDS)
        self._mp = multiprocessing.get_context("spawn")
        self._workers: dict[int, multiprocessing.process.BaseProcess] = {}
        # Receiver processes besides the service's own receiver (index 0), on the same port.
        self._receivers: dict[int, multiprocessing.process.BaseProcess] = {}

    def _start_worker(self, index: int) -> None:
        process = self._mp.Process(
            target=worker_main,
            args=(self.config_path, index, os.getpid(), HANDOVER_POLL_SECONDS),
            name=f"sijnode-worker-{index}",
            daemon=True,
        )
        process.start()
        self._workers[index] = process

    def _start_receiver(self, index: int) -> Connection:
        """Start an extra receiver process; it says on the returned connection once it listens."""
        listening, tell_listening = self._mp.Pipe(duplex=False)
        process = self._mp.Process(
            target=receiver_main,
            args=(self.config_path, index, os.getpid(), tell_listening),
            name=f"sijnode-receiver-{index}",
            daemon=True,
        )
        process.start()
        tell_listening.close()
        self._receivers[index] = process
        return listening

    def _await_listening(self, connections: list[Connection], timeout: float = 120.0) -> None:
        """Wait until the extra receiver processes listen (or fail: the others serve without them)."""
        deadline = time.monotonic() + timeout
        for index, connection in enumerate(connections, start=1):
            try:
                if connection.poll(max(0.0, deadline - time.monotonic())):
                    connection.recv()
                    continue
            except EOFError:
                pass  # it died before listening; supervision restarts it
            finally:
                connection.close()
            log_event(log, logging.ERROR, "receiver process did not start listening", receiver=index)

    def _supervise_workers(self) -> None:
        for index, process in list(self._workers.items()):
            if not process.is_alive():
                log_event(log, logging.ERROR, "worker exited; restarting", worker=index, exitcode=process.exitcode)
                self._start_worker(index)
        for index, process in list(self._receivers.items()):
            if not process.is_alive():
                # Its associations were cut off: their studies wait for the quiet period.
                self.store.abort_open_associations(owner=f"{socket.gethostname()}:{process.pid}")
                log_event(log, logging.ERROR, "receiver process exited; restarting", receiver=index, exitcode=process.exitcode)
                self._start_receiver(index)

    def _beat(self) -> None:
        detail = {
            "ae_title": self.config.receiver.ae_title,
            "bind": self.config.receiver.bind,
            "port": self.config.receiver.port,
            "workers": sum(p.is_alive() for p in self._workers.values()),
            "spool_free_bytes": self.spool.free_bytes(),
            "config": self.config_path,
            "metrics": f"http://{self.config.metrics.bind}:{self.metrics_server.port}" if self.metrics_server else None,
        }
        self.store.beat(HEARTBEAT_NAME, os.getpid(), socket.gethostname(), self.started_at, detail)

    def _take_back_claims(self) -> None:
        """Make the work a killed predecessor had claimed claimable now, not when its leases run out.

        Its workers and sender died with it, so jobs it left running and deliveries it left
        sending would otherwise wait up to a lease (workers.lease_seconds, 30 min by default).
        Their half-written temporary spool files go too. Nothing is taken back (or removed) while
        another service on this database still beats.
        """
        previous = self.store.heartbeat(HEARTBEAT_NAME)
        if previous is not None and still_running(*previous):
            pid, host, _ = previous
            log_event(log, logging.WARNING, "another service shares this database; its claims are left to expire", pid=pid, host=host)
            return
        jobs, deliveries = self.store.expire_claims()
        if jobs or deliveries:
            log_event(log, logging.INFO, "took back work left claimed by the previous run", jobs=jobs, deliveries=deliveries)
        removed = self.spool.clear_tmp()
        if removed:
            log_event(log, logging.INFO, "removed temporary spool files left by the previous run", files=removed)
        # Associations open when the predecessor died were cut off, not released.
        cut_off = self.store.abort_open_associations()
        if cut_off:
            log_event(log, logging.INFO, "associations cut off by the previous run's end; their studies wait for the quiet period", associations=cut_off)

    def reload(self) -> bool:
        """Re-read config.yaml (SIGHUP): peers, allowlists, classification rules, chains, study and
        dispatch settings apply to what comes next; open associations and running jobs carry on.
        An invalid file is refused and the running config stays."""
        try:
            new = load_config(self.config_path)
            problems = config_problems(new)
            if problems:
                raise ConfigError("\n".join(problems))
        except ConfigError as error:
            metrics.config_reloaded(False)
            log_event(log, logging.ERROR, f"config reload refused, the running config stays: {error}", config=self.config_path)
            return False
        effective, applied, waiting = reloadable_part(self.config, new)
        self.config = effective
        self.receiver.apply_config(effective)
        self.sender.config = effective
        set_levels(effective.logging.level, effective.logging.libraries)
        for process in [*self._receivers.values(), *self._workers.values()]:
            if process.is_alive() and process.pid:
                os.kill(process.pid, signal.SIGHUP)  # workers reload between jobs, receivers at once
        metrics.config_reloaded(True)
        log_event(
            log,
            logging.INFO,
            "config reloaded: " + (", ".join(applied) or "no change")
            + (f"; needs a restart to apply: {', '.join(waiting)}" if waiting else ""),
            applied=applied,
            needs_restart=waiting,
        )
        return True

    def _check_port_bindable(self) -> None:
        """Fail in one line, before any receiver process starts, when another program holds the
        port (the receiver processes bind it with SO_REUSEPORT, which a foreign socket refuses)."""
        settings = self.config.receiver
        probe = socket.socket(socket.AF_INET6 if ":" in settings.bind else socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind((settings.bind, settings.port))
        except OSError as error:
            raise ServiceStartError(f"cannot listen for DICOM on {settings.bind}:{settings.port}: {error.strerror or error}") from None
        finally:
            probe.close()

    def _serve_metrics(self) -> None:
        """Open the metrics and health port (before any receiver answers, so a node that echoes
        also answers /health), or say in one line why not."""
        if not self.config.metrics.enabled:
            return
        bind, port = self.config.metrics.bind, self.config.metrics.port
        try:
            self.metrics_server = metrics.MetricsServer(
                bind, port, self.store, self.spool, lambda: [peer.name for peer in self.config.destinations]
            )
        except OSError as error:
            raise ServiceStartError(f"cannot serve metrics on {bind}:{port}: {error.strerror or error} (metrics.port)") from None
        self.metrics_server.start()
        log_event(log, logging.INFO, f"metrics on http://{bind}:{self.metrics_server.port}/metrics and /health")

    def _listen(self) -> None:
        """Open the DICOM port, or say in one line why not."""
        settings = self.config.receiver
        try:
            self.receiver.start()
        except OSError as error:
            raise ServiceStartError(f"cannot listen for DICOM on {settings.bind}:{settings.port}: {error.strerror or error}") from None

    def run(self) -> None:
        """Run until SIGTERM/SIGINT; SIGHUP reloads the config."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_event.set())
        # The port first: a second service on the same port fails here, before touching claims.
        self._port_guard = claim_port(self.config.receiver.port)
        self._check_port_bindable()
        slot_board(self.config).reset()  # no receiver process of a previous run holds a slot
        self._serve_metrics()
        self._take_back_claims()
        self._await_listening([self._start_receiver(index) for index in range(1, self.config.receiver_count)])
        # The service's own receiver listens last: once it answers, every receiver process does.
        self._listen()
        self.started_at = utcnow()  # the quiet period counts from here
        for index in range(self.config.worker_count):
            self._start_worker(index)
        self.sender.start()
        log_event(
            log, logging.INFO, "service started", pid=os.getpid(), receivers=self.config.receiver_count,
            workers=self.config.worker_count, torch_threads=self.config.torch_threads,
        )
        last_beat = 0.0
        try:
            while not self.stop_event.is_set():
                if self.reload_event.is_set():
                    self.reload_event.clear()
                    self.reload()
                now = utcnow().timestamp()
                if now - last_beat >= HEARTBEAT_SECONDS:
                    self._beat()
                    self.store.forget_ended_associations(ASSOCIATION_ROWS_KEPT_SECONDS)
                    last_beat = now
                # A quiet period counts only while the node listens: after a restart, senders
                # interrupted by the outage get a full period to resume before studies complete.
                # A released study is due anyway: its sender said it was done.
                quiet_counts = now - self.started_at.timestamp() >= self.config.study.quiet_seconds
                complete_due_studies(self.store, self.config, quiet_period_counts=quiet_counts)
                self._supervise_workers()
                self.stop_event.wait(COMPLETION_POLL_SECONDS)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        log_event(log, logging.INFO, "service stopping")
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.receiver.stop()
        self.sender.stop()
        for process in [*self._receivers.values(), *self._workers.values()]:
            if process.is_alive():
                process.terminate()  # SIGTERM: a worker finishes its current job, then exits
        for process in self._receivers.values():
            process.join(timeout=30)
        for process in self._workers.values():
            process.join(timeout=60)
            if process.is_alive():
                process.kill()  # its job's lease expires and another worker takes it over
        try:
            self.store.clear_heartbeat(HEARTBEAT_NAME)
        finally:
            self.store.dispose()
        log_event(log, logging.INFO, "service stopped")
