"""The study summary hook: when the last job of a study's version finishes, write the results
card and summary SR (pipeline.encode.summary) and queue them for delivery.

Called by the worker after each job ends (done or failed for good), and by the route stage for a
study that completed without any job. Self-contained: it reads the study from the store and the
chains' SRs from the spool, and adds its two objects to the job that finished last (or to the
study itself when no chain ran). A summary is made again whenever a chain's result changes (a retried job,
a new study version); identical content gives the identical objects, which are not sent twice.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

from pydicom import Dataset, dcmread, dcmwrite

from node.config import Config
from node.logs import log_event
from pipeline.encode.sr import report_lines
from pipeline.encode.summary import StudySummary, chain_outcome, encode_summary, series_fates, summary_series_uids
from storage.models import InstanceKind, JobState
from storage.spool import Spool
from storage.store import ProducedObject, Store

log = logging.getLogger("sijnode.summary")

SR_STORAGE_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22")


def write_results(spool: Spool, study_uid: str, job_id: int | None, datasets: Sequence[Dataset]) -> list[ProducedObject]:
    """Write datasets into the spool's results (atomically), as the outputs of ``job_id``
    (``None``: of the study itself)."""
    produced = []
    for dataset in datasets:
        buffer = io.BytesIO()
        dcmwrite(buffer, dataset, enforce_file_format=True)
        relative = spool.result_path(study_uid, job_id, str(dataset.SOPInstanceUID))
        spool.write_atomic(relative, buffer.getbuffer())
        produced.append(ProducedObject(str(dataset.SOPInstanceUID), str(dataset.SOPClassUID), relative))
    return produced


def update_study_summary(store: Store, spool: Spool, config: Config, study_uid: str, job_id: int | None) -> bool:
    """Write the study's summary if none of its current version's jobs is still to run, as
    outputs of ``job_id`` (the job that just ended). With ``job_id`` None (a study that completed
    without a job) the summary belongs to the study, and is made only if the study has series
    that could be chain inputs: the radiologist learns why they were not analysed, while studies
    the node has no business with (an ultrasound a forward-everything rule sent) stay silent.
    Returns whether new objects were queued."""
    detail = store.study_detail(study_uid)
    if detail is None:
        return False
    study = detail["study"]
    jobs = [job for job in detail["jobs"] if job.study_version == study.version]
    if any(job.state in (JobState.PENDING, JobState.RUNNING) for job in jobs):
        return False
    if not jobs and job_id is not None:
        return False
    fates = series_fates(detail["series"], jobs, config.chains)
    if not jobs and not fates:
        return False
    summary_series = set(summary_series_uids(study_uid))
    series_of = {
        o.sop_instance_uid: str(dcmread(spool.absolute(o.path), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
        for o in detail["outputs"]
    }
    previous = [o for o in detail["outputs"] if series_of[o.sop_instance_uid] in summary_series]
    outcomes, reported = [], []
    for job in jobs:
        srs = [
            o for o in detail["outputs"]
            if o.job_id == job.id and o.sop_class_uid in SR_STORAGE_CLASSES and o not in previous
        ]
        lines = report_lines(dcmread(spool.absolute(srs[0].path))) if job.state == JobState.DONE and srs else None
        outcomes.append(chain_outcome(job, lines))
        reported.append(lines)
    if jobs and all(lines is None for lines in reported) and not any(job.state == JobState.FAILED for job in jobs):
        return False  # no chain reports in an SR (e.g. an export-only chain): nothing to summarise
    summary = StudySummary(study_uid, tuple(outcomes), fates)
    # The summary's evidence and patient/study module come from one of the study's input images:
    # an SR, KOS or presentation state the PACS also sent is no image to cite.
    images = [i for i in store.study_instances(study_uid) if i.kind == InstanceKind.INPUT]
    if not images:
        return False
    reference = dcmread(spool.absolute(images[0].path), stop_before_pixels=True)
    # the summary's version (its InstanceNumber): one more than the summaries already made
    version = sum(1 for o in previous if o.sop_class_uid not in SR_STORAGE_CLASSES) + 1
    datasets = encode_summary(summary, reference, version)
    if any(o.sop_instance_uid == str(datasets[0].SOPInstanceUID) for o in previous):
        return False  # the same content was summarised already
    produced = write_results(spool, study_uid, job_id, datasets)
    destinations = [peer.name for peer in config.destinations]
    added = store.add_study_outputs(study_uid, job_id, produced, destinations)
    if added:
        log_event(log, logging.INFO, "study summary queued", study_uid=study_uid, version=version, objects=added)
    return bool(added)
