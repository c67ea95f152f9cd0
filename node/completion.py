"""The route stage: a quiet (or forced) study is classified and gets one job per applicable chain.

Shared by the service's completion loop and the CLI's ``complete`` and ``reprocess``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from node.config import Config
from node.logs import log_event
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
    log_event(
        log,
        logging.INFO,
        "study complete" if version is not None else "study received more instances; completion postponed",
        study_uid=study_uid,
        version=version,
        jobs=[job.chain for job in jobs],
        unchanged=sorted(completed.unchanged) if completed is not None else [],
        series=len(series),
    )
    return CompletionResult(study_uid, version, jobs, note)


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
