"""Prometheus metrics and the health endpoint, served over HTTP by the service.

Every metric is defined once, in ``_Metrics``; the rest of the node records events by calling
the small functions below (``instance_answered``, ``job_finished``, ...), never the
prometheus_client objects. The workers (and any other process the service starts) record into
prometheus_client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by
``prepare_multiprocess`` before the first metric is touched), so one scrape of the service sees
every process. State that lives in the database or on disk (queue depths, studies per state,
spool free space, the node's event counters) is read at scrape time, so it is right after a
restart too.

``GET /metrics`` is the Prometheus text format; ``GET /health`` answers 200 while the database
answers and the spool is writable and above its reserve, 503 (not ready) otherwise, with the
reasons as JSON. Bound to loopback by default (``metrics.bind``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

if TYPE_CHECKING:
    from storage.spool import Spool
    from storage.store import Store

log = logging.getLogger("sijnode.metrics")

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Job durations from a 128-px demo pack on CPU (seconds) to a full-size model on a busy host.
JOB_SECONDS_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)


def prepare_multiprocess(folder: Path) -> None:
    """Let every process of this service record into ``folder`` (emptied: no stale values).

    Must run before any metric is recorded in this process and before workers start: they
    inherit the environment variable, and prometheus_client reads it on first import.
    """
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROCESS_ENV] = str(folder)


class _Metrics:
    """The node's own metrics, created on first use (the CLI never imports prometheus_client)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.instances = Counter(
            "sijnode_instances_received_total",
            "C-STORE requests answered, by status (0x0000 success; 0xA700, 0xA900, 0xC210 rejected)",
            ["status"],
        )
        self.associations = Counter(
            "sijnode_associations_total", "Associations requested of the receiver, by result", ["result"]
        )
        self.associations_open = Gauge(
            "sijnode_associations_open", "Associations open now", multiprocess_mode="livesum"
        )
        self.studies_completed = Counter("sijnode_studies_completed_total", "Studies completed and routed")
        self.job_seconds = Histogram(
            "sijnode_job_duration_seconds",
            "Job run time per chain and outcome (done, failed)",
            ["chain", "outcome"],
            buckets=JOB_SECONDS_BUCKETS,
        )
        self.delivery_attempts = Counter(
            "sijnode_delivery_attempts_total", "Result objects offered to a destination", ["destination"]
        )
        self.delivery_failures = Counter(
            "sijnode_delivery_failures_total",
            "Result objects a destination did not acknowledge, by reason",
            ["destination", "reason"],
        )
        self.reloads = Counter("sijnode_config_reloads_total", "Configuration reloads (SIGHUP), by result", ["result"])


@functools.cache
def _metrics() -> _Metrics:
    return _Metrics()


# -- what the node records ------------------------------------------------------------------------


def instance_answered(status: int) -> None:
    """The receiver answered one C-STORE with ``status``."""
    _metrics().instances.labels(status=f"0x{status:04X}").inc()


def association_accepted() -> None:
    metrics = _metrics()
    metrics.associations.labels(result="accepted").inc()
    metrics.associations_open.inc()


def association_closed() -> None:
    """An accepted association was released or aborted."""
    _metrics().associations_open.dec()


def association_rejected(reason: str) -> None:
    """``reason``: calling-ae, address, ... (a few fixed words, never free text)."""
    _metrics().associations.labels(result=f"rejected-{reason}").inc()


def study_completed() -> None:
    _metrics().studies_completed.inc()


def job_finished(chain: str, outcome: str, seconds: float) -> None:
    """A worker finished one attempt of a job: ``outcome`` done or failed."""
    _metrics().job_seconds.labels(chain=chain, outcome=outcome).observe(seconds)


def delivery_attempted(destination: str, failure_reason: str | None = None) -> None:
    """One result object offered to ``destination``; ``failure_reason`` (a fixed word) when not acknowledged."""
    metrics = _metrics()
    metrics.delivery_attempts.labels(destination=destination).inc()
    if failure_reason is not None:
        metrics.delivery_failures.labels(destination=destination, reason=failure_reason).inc()


def config_reloaded(ok: bool) -> None:
    _metrics().reloads.labels(result="applied" if ok else "refused").inc()


# -- what is read at scrape time ------------------------------------------------------------------


class _StateCollector:
    """Queue depths, studies per state, spool space and the node's counters, from the database and disk."""

    def __init__(self, store: Store, spool: Spool, destinations: Callable[[], Iterable[str]]) -> None:
        self.store = store
        self.spool = spool
        self.destinations = destinations

    def describe(self) -> list:
        return []  # collected on every scrape, never at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        free = GaugeMetricFamily("sijnode_spool_free_bytes", "Free space on the spool's filesystem")
        free.add_metric([], self.spool.free_bytes())
        yield free
        reserve = GaugeMetricFamily("sijnode_spool_reserve_bytes", "Below this much free space C-STORE answers 0xA700")
        reserve.add_metric([], self.spool.free_space_reserve_bytes)
        yield reserve
        try:
            overview = self.store.overview()
        except Exception as error:  # the database is down: /health says so; the rest still scrapes
            log.warning("metrics: database unreadable: %s", type(error).__name__)
            return
        studies = GaugeMetricFamily("sijnode_studies", "Studies per state", labels=["state"])
        for state in ("receiving", "complete"):
            studies.add_metric([state], overview["studies"].get(state, 0))
        yield studies
        jobs = GaugeMetricFamily("sijnode_jobs", "Jobs per state (pending is the work queue)", labels=["state"])
        for state in ("pending", "running", "done", "failed"):
            jobs.add_metric([state], overview["jobs"].get(state, 0))
        yield jobs
        deliveries = GaugeMetricFamily(
            "sijnode_deliveries", "Deliveries per destination and state (pending is the outbox)", labels=["destination", "state"]
        )
        by_destination = overview["deliveries_by_destination"]
        for destination in sorted(set(self.destinations()) | set(by_destination)):
            for state in ("pending", "sending", "done", "failed"):
                deliveries.add_metric([destination, state], by_destination.get(destination, {}).get(state, 0))
        yield deliveries
        events = CounterMetricFamily("sijnode_events", "The node's event counters (sijnode status), kept across restarts", labels=["event"])
        for name, value in sorted(overview["counters"].items()):
            events.add_metric([name], value)
        yield events


class _DefaultRegistry:
    """This process's own metrics, when no multiprocess folder is in use (e.g. tests in one process)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client import REGISTRY

        yield from REGISTRY.collect()


def build_registry(store: Store, spool: Spool, destinations: Callable[[], Iterable[str]]) -> Any:
    """A registry with every process's metrics and the state read at scrape time."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROCESS_ENV):
        MultiProcessCollector(registry)
    else:
        registry.register(_DefaultRegistry())
    registry.register(_StateCollector(store, spool, destinations))
    return registry


def health(store: Store, spool: Spool) -> tuple[bool, dict[str, str]]:
    """Whether the node can take in studies now: the database answers and the spool takes a file."""
    checks: dict[str, str] = {}
    try:
        store.ping()
        checks["database"] = "ok"
    except Exception as error:
        checks["database"] = f"unusable: {type(error).__name__}"
    try:
        spool.check_writable()
        spool.check_free_space()
        checks["spool"] = "ok"
    except OSError as error:
        checks["spool"] = f"unusable: {error.strerror or error}"
    return all(value == "ok" for value in checks.values()), checks


# -- the HTTP server ------------------------------------------------------------------------------


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass  # a scrape every 15 s must not fill the log


class MetricsServer:
    """``/metrics`` and ``/health`` on one port, in a background thread."""

    def __init__(self, bind: str, port: int, store: Store, spool: Spool, destinations: Callable[[], Iterable[str]]) -> None:
        from prometheus_client import make_wsgi_app

        self.store = store
        self.spool = spool
        self._metrics_app = make_wsgi_app(build_registry(store, spool, destinations))
        # Raises OSError (address in use) here, before the service reports itself started.
        self._server = make_server(bind, port, self._app, server_class=_ThreadingServer, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_port

    def _app(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path in ("/health", "/healthz", "/ready"):
            ready, checks = health(self.store, self.spool)
            body = json.dumps({"status": "ready" if ready else "not ready", "checks": checks}).encode()
            start_response("200 OK" if ready else "503 Service Unavailable", [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"sijnode: /metrics (Prometheus) and /health\n"]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
