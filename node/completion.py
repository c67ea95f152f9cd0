"""The route stage: a quiet (or forced) study is classified and gets one job per applicable chain.

Shared by the service's completion loop and the CLI's ``complete`` and ``reprocess``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from node import metrics
from node.config import Config
from node.logs import log_event
from node.uids import short_uid
from pipeline.classify import classify_series
from pipeline.route import SeriesCandidate, plan_routing
from storage.store import NewJob, SeriesDecision, Store

log = logging.getLogger("sijnode.completion")


@dataclass(frozen=True)
class CompletionResult:
    study_uid: str
    version: int | None  # None: new instances arrived meanwhile, the study stays open
    jobs: list[NewJob]
    note: str


def complete_study(store: Store, config: Config, study_uid: str, new_version: bool = False) -> CompletionResult:
    """Classify every series of the study, route it, and mark it complete in one transaction."""
    snapshot = store.study_snapshot(study_uid)
    if snapshot is None:
        raise KeyError(f"no study {study_uid}")
    study, series = snapshot
    decisions: list[SeriesDecision] = []
    candidates: list[SeriesCandidate] = []
    for record in series:
        decision = classify_series(record.header, config.classification.rules, config.classification.tilt_tolerance_deg)
        decisions.append(
            SeriesDecision(
                record.series_uid,
                decision.role.value,
                decision.plane.value,
                decision.tilt_deg,
                decision.counts_as_input,
                decision.rule,
                decision.reason,
            )
        )
        candidates.append(
            SeriesCandidate(
                series_uid=record.series_uid,
                role=decision.role,
                plane=decision.plane,
                counts_as_input=decision.counts_as_input,
                instance_count=record.instance_count,
                series_number=record.series_number,
            )
        )
    chains = config.enabled_chains
    routing = plan_routing(candidates, chains)
    jobs = [NewJob(job.chain, dict(job.inputs)) for job in routing.jobs]
    note = "; ".join(routing.lines) if chains else "no chain is configured"
    if not jobs:
        note = f"no applicable chain ({note})"
    completed = store.complete_study(study_uid, study.last_received_at, decisions, jobs, note, new_version=new_version)
    version = completed.version if completed is not None else None
    # Chains whose inputs did not change since their last result get no job (no new version).
    jobs = [job for job in jobs if completed is not None and job.chain in completed.created]
    note = completed.note if completed is not None else note
    if version is not None:
        metrics.study_completed()
    log_event(
        log,
        logging.INFO,
        f"study complete: {short_uid(study_uid)} version {version}, jobs: {', '.join(job.chain for job in jobs) or 'none'}"
        if version is not None
        else f"study {short_uid(study_uid)} received more instances; completion postponed",
        study_uid=study_uid,
        version=version,
        jobs=[job.chain for job in jobs],
        unchanged=sorted(completed.unchanged) if completed is not None else [],
        series=len(series),
    )
    if version is not None and not routing.jobs:
        summarise_study_without_jobs(store, config, study_uid)
    return CompletionResult(study_uid, version, jobs, note)


def summarise_study_without_jobs(store: Store, config: Config, study_uid: str) -> bool:
    """The study summary of a study that no chain applies to (its series that could be inputs,
    and why none was analysed), made here because no job will end and make it. A failure is
    logged and fails nothing: the study stays complete. Returns whether objects were queued."""
    # imported here: encoding pulls highdicom and PIL, which the CLI's read-only commands never need
    from node.summary import update_study_summary
    from storage.spool import Spool

    try:
        return update_study_summary(store, Spool(config.storage.data_dir), config, study_uid, None)
    except Exception:
        log.exception("study summary failed", extra={"fields": {"study_uid": study_uid}})
        return False


def complete_due_studies(store: Store, config: Config, quiet_period_counts: bool = True) -> list[CompletionResult]:
    """Complete every study whose sender released it a grace period ago, or that has been quiet.

    ``quiet_period_counts`` False (just after a restart) completes only released studies.
    """
    due = store.studies_released(config.study.release_grace_seconds)
    if quiet_period_counts:
        due += [uid for uid in store.studies_due(config.study.quiet_seconds) if uid not in due]
    results = []
    for study_uid in due:
        try:
            results.append(complete_study(store, config, study_uid))
        except Exception:
            log.exception("completing a study failed", extra={"fields": {"study_uid": study_uid}})
    return results
