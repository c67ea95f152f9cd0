"""The process stage: worker processes that claim jobs and run chains.

Workers are separate processes so that inference never blocks receiving and a crashing model
takes down only its worker. This module itself imports no torch: the chain implementations
are imported inside the worker process by ``pipeline.chains.load_chain``.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import threading
import time
import traceback
from pathlib import Path

from pydicom import dcmread

from node import metrics
from node.config import Config, ConfigError, load_config
from node.logs import log_event, redact, set_levels, setup_logging
from node.uids import short_uid
from node.summary import update_study_summary, write_results
from pipeline.chains import Chain, RuntimeSettings, SeriesInput, StudyInputs, load_chain
from pipeline.route import ChainSpec, OutputPlan
from storage.spool import Spool
from storage.models import JobState
from storage.store import ClaimedJob, ProducedObject, Store

log = logging.getLogger("sijnode.worker")


class Worker:
    """Claims jobs from the database and runs them, one at a time."""

    def __init__(self, config: Config, store: Store, spool: Spool, name: str) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self.name = name
        self._chains: dict[str, Chain] = {}
        self.runtime = RuntimeSettings(
            device=config.workers.device, torch_threads=config.torch_threads, precision=config.workers.precision,
            runtime=config.workers.runtime,
        )

    def apply_config(self, config: Config) -> None:
        """Take a reloaded config between jobs: chain options and destinations apply to the next
        job; a chain whose spec changed is loaded again."""
        old = {spec.name: spec for spec in self.config.chains}
        for spec in config.chains:
            if old.get(spec.name) != spec:
                self._chains.pop(spec.name, None)
        self.config = config

    def spec(self, name: str) -> ChainSpec:
        for spec in self.config.chains:
            if spec.name == name:
                return spec
        raise KeyError(f"chain {name!r} is no longer in the config")

    def chain(self, name: str) -> Chain:
        if name not in self._chains:
            self._chains[name] = load_chain(self.spec(name), self.runtime)
        return self._chains[name]

    def load_chains(self) -> None:
        """Load every enabled chain now, so the first job is as fast as the next ones.

        A chain that fails to load is logged and left out; its jobs fail with the same error
        when they try to load it (and can be retried once the pack is fixed).
        """
        for spec in self.config.enabled_chains:
            start = time.perf_counter()
            try:
                self.chain(spec.name)
            except Exception as error:
                log_event(log, logging.ERROR, "chain failed to load", chain=spec.name, error=f"{type(error).__name__}: {error}")
                continue
            log_event(
                log,
                logging.INFO,
                "chain loaded",
                chain=spec.name,
                seconds=round(time.perf_counter() - start, 2),
                peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            )

    def run_one(self) -> bool:
        """Claim and run one job; False when none was runnable."""
        settings = self.config.workers
        job = self.store.claim_job(self.name, settings.lease_seconds, settings.max_attempts)
        if job is None:
            return False
        log_event(
            log, logging.DEBUG, "job started", job_id=job.id, chain=job.chain, study_uid=job.study_uid,
            attempt=job.attempts, result_version=job.result_version,
        )
        started = time.monotonic()
        stop_renewing = threading.Event()
        renewer = threading.Thread(target=self._renew_lease, args=(job.id, stop_renewing), daemon=True)
        renewer.start()
        try:
            produced = self._run(job)
        except Exception as error:
            description = _describe(error)  # redacted: stored in the job and shown by `sijnode jobs`
            state = self.store.fail_job(job.id, self.name, description, settings.max_attempts)
            metrics.job_finished(job.chain, "failed", time.monotonic() - started)
            log_event(
                log,
                logging.ERROR,
                f"job failed: {job.chain} on study {short_uid(job.study_uid)}: {description}"
                + ("" if state == "failed" else f" (attempt {job.attempts} of {settings.max_attempts}; will retry)"),
                job_id=job.id,
                chain=job.chain,
                study_uid=job.study_uid,
                state=state,
            )
            if state == JobState.FAILED:
                self._summarise(job)
            return True
        finally:
            stop_renewing.set()
            renewer.join()
        destinations = [peer.name for peer in self.config.destinations]
        if self.store.finish_job(job.id, self.name, produced, destinations):
            seconds = time.monotonic() - started
            metrics.job_finished(job.chain, "done", seconds)
            log_event(
                log,
                logging.INFO,
                f"job done: {job.chain} on study {short_uid(job.study_uid)}, {len(produced)} object(s) in {seconds:.1f} s",
                job_id=job.id,
                chain=job.chain,
                study_uid=job.study_uid,
                outputs=len(produced),
                destinations=destinations,
            )
            self._summarise(job)
        else:
            log_event(log, logging.WARNING, "job result discarded: the job was taken over", job_id=job.id)
        return True

    def output_plan(self, job: ClaimedJob) -> OutputPlan:
        """The job's result version, its series numbers and names, and the SR it supersedes."""
        previous = [dcmread(self.spool.absolute(path), stop_before_pixels=True) for path in job.previous_sr_paths]
        return OutputPlan.for_chain(self.spec(job.chain).series, job.result_version, previous)

    def _summarise(self, job: ClaimedJob) -> None:
        """The study summary, once the study's last job has ended; its failure fails no job."""
        try:
            update_study_summary(self.store, self.spool, self.config, job.study_uid, job.id)
        except Exception as error:
            log_event(log, logging.ERROR, "study summary failed", job_id=job.id, error=_describe(error))

    def _run(self, job: ClaimedJob) -> list[ProducedObject]:
        inputs = StudyInputs(
            study_uid=job.study_uid,
            series={
                key: SeriesInput(key, job.inputs[key], tuple(self.spool.absolute(p) for p in paths))
                for key, paths in job.input_paths.items()
            },
            options=dict(self.spec(job.chain).options),
            output=self.output_plan(job),
        )
        return write_results(self.spool, job.study_uid, job.id, self.chain(job.chain).produce(inputs))

    def _renew_lease(self, job_id: int, stop: threading.Event) -> None:
        lease = self.config.workers.lease_seconds
        while not stop.wait(lease / 3):
            try:
                self.store.extend_lease(job_id, self.name, lease)
            except Exception:
                log.exception("lease renewal failed")


def _describe(error: BaseException) -> str:
    summary = redact(traceback.format_exception_only(type(error), error)[-1].strip())
    frames = traceback.extract_tb(error.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
    return f"{summary} (at {where})" if where else summary


def die_with_parent(parent_pid: int) -> None:
    """Make this process end when the service that started it ends, even by kill -9.

    Linux delivers SIGKILL on the parent's death (PR_SET_PDEATHSIG); a worker left running
    would keep claiming jobs next to the restarted service's own. The pid check covers a
    parent that died before the request took effect.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the worker loop's parent check remains
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def worker_main(config_path: str, index: int, parent_pid: int | None = None, poll_seconds: float = 1.0) -> None:
    """Entry point of a worker process; SIGTERM lets the current job finish, then exits.

    The stop request is a signal, not a shared multiprocessing.Event: a worker killed while
    waiting on such an Event leaves its lock held and the parent's set() would hang.
    """
    if parent_pid is not None:
        die_with_parent(parent_pid)
    stop = threading.Event()
    reload_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # The service validated the file before passing SIGHUP on; the job in hand finishes first.
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    config = load_config(config_path)
    setup_logging(config.logging.level, config.logging.format, config.logging.file, config.logging.libraries)
    store = Store(config.database_url)
    spool = Spool(config.storage.data_dir, config.storage.free_space_reserve_mb)
    worker = Worker(config, store, spool, f"{socket.gethostname()}:{os.getpid()}:w{index}")
    log_event(log, logging.INFO, "worker started", worker=worker.name)
    worker.load_chains()
    while not stop.is_set():
        if reload_requested.is_set():
            reload_requested.clear()
            try:
                reloaded = load_config(config_path)
                set_levels(reloaded.logging.level, reloaded.logging.libraries)
                worker.apply_config(reloaded)
                log_event(log, logging.INFO, "worker reloaded its config", worker=worker.name)
            except ConfigError as error:
                log_event(log, logging.ERROR, "worker kept its config: the reloaded file is invalid", error=str(error))
        try:
            busy = worker.run_one()
        except Exception:
            log.exception("worker loop error")
            busy = False
        if parent_pid is not None and os.getppid() != parent_pid:
            log_event(log, logging.WARNING, "the service is gone; worker exits", worker=worker.name)
            break
        if not busy:
            stop.wait(poll_seconds)
    store.dispose()
