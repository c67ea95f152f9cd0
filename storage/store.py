"""Every read and write of the node's state: the one place that speaks SQL.

The service, the workers, the sender and the CLI all go through ``Store``; each method is one
short transaction, so any process can die between two of them and the next start resumes.
"""

from __future__ import annotations

import collections
import hashlib
import random
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, insert, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.db import make_engine, make_session_factory, migrate
from storage.models import (
    AssociationState,
    AssociationStudy,
    Counter,
    Delivery,
    DeliveryState,
    DestinationHealth,
    Heartbeat,
    Instance,
    InstanceKind,
    Job,
    JobState,
    Output,
    Series,
    Study,
    StudyState,
    UTCDateTime,
    utcnow,
)


@dataclass(frozen=True)
class IncomingInstance:
    """What the receiver knows about one instance it is about to acknowledge."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    instance_number: int | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    calling_ae_title: str | None = None
    # Set on the first instance of a study an association delivers: records that the association
    # delivers the study (Store.studies_released), once, off the per-instance path.
    association: str | None = None
    association_owner: str | None = None
    # Computed only for the first instance of a series (pipeline.classify.header_summary).
    header: Callable[[], dict[str, Any]] | None = None
    # InstanceKind as far as the header tells (input, non-input, sijnode-result); recording
    # makes it own-result when the SOP Instance UID is one of this node's outputs.
    kind: str = InstanceKind.INPUT
    digest: str | None = None  # sha256 of the received bytes, under duplicates: replace


class RecordOutcome:
    STORED = "stored"
    DUPLICATE_KEPT = "duplicate-kept"  # keep-first: the earlier copy stays
    DUPLICATE_REPLACED = "duplicate-replaced"


# Prebuilt statements of the receive path: building Core constructs per instance cost more
# than executing them. "b_" names: SQLAlchemy reserves column names for SET parameters.
_KNOWN_INSTANCES = select(Instance.sop_instance_uid, Instance.study_uid).where(
    Instance.sop_instance_uid.in_(bindparam("uids", expanding=True))
)
_OWN_OUTPUTS = select(Output.sop_instance_uid).where(Output.sop_instance_uid.in_(bindparam("uids", expanding=True)))
_TOUCH_RECEIVING_STUDY = (
    update(Study)
    .where(Study.study_uid == bindparam("b_study_uid"), Study.state == StudyState.RECEIVING)
    .values(last_received_at=bindparam("b_now", type_=UTCDateTime()), instance_count=Study.instance_count + bindparam("b_added"))
)
_COUNT_SERIES = (
    update(Series)
    .where(Series.series_uid == bindparam("b_series_uid"))
    .values(instance_count=Series.instance_count + bindparam("b_added"))
)
_REPLACE_INSTANCE = (
    update(Instance)
    .where(Instance.sop_instance_uid == bindparam("b_sop_instance_uid"))
    .values(
        path=bindparam("b_path"),
        size_bytes=bindparam("b_size_bytes"),
        transfer_syntax_uid=bindparam("b_transfer_syntax_uid"),
        received_at=bindparam("b_now", type_=UTCDateTime()),
        digest=bindparam("b_digest"),
    )
)
# Instances of a series in a stable order, for the input fingerprint of a job.
_SERIES_CONTENT = (
    select(Instance.sop_instance_uid, Instance.digest)
    .where(Instance.series_uid == bindparam("b_series_uid"))
    .order_by(Instance.sop_instance_uid)
)
# The SR storage classes (PS3.4 Annex B: 1.2.840.10008.5.1.4.1.1.88.x): what a predecessor is.
_SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def _instance_row(incoming: IncomingInstance, now: datetime) -> dict[str, Any]:
    return dict(
        sop_instance_uid=incoming.sop_instance_uid,
        series_uid=incoming.series_uid,
        study_uid=incoming.study_uid,
        sop_class_uid=incoming.sop_class_uid,
        transfer_syntax_uid=incoming.transfer_syntax_uid,
        instance_number=incoming.instance_number,
        path=incoming.path,
        size_bytes=incoming.size_bytes,
        calling_ae_title=incoming.calling_ae_title,
        received_at=now,
        kind=incoming.kind,
        digest=incoming.digest,
    )


@dataclass
class _PendingRow:
    """An instance waiting for the group commit that records it."""

    incoming: IncomingInstance
    duplicates: str
    late_instances: str
    outcome: str | None = None
    error: Exception | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None or self.error is not None


@dataclass(frozen=True)
class SeriesRecord:
    series_uid: str
    study_uid: str
    modality: str | None
    series_number: int | None
    description: str | None
    sop_class_uid: str | None
    instance_count: int
    header: dict[str, Any]
    role: str | None
    plane: str | None
    tilt_deg: float | None
    counts_as_input: bool | None
    rule: str | None
    reason: str | None


@dataclass(frozen=True)
class SeriesDecision:
    """A classification to store on a series at completion."""

    series_uid: str
    role: str
    plane: str
    tilt_deg: float | None
    counts_as_input: bool
    rule: str
    reason: str


@dataclass(frozen=True)
class NewJob:
    chain: str
    inputs: dict[str, str]


@dataclass(frozen=True)
class CompletedStudy:
    """What a completion wrote: the study version, the jobs created and the chains left alone."""

    version: int
    created: list[str]  # chains that got a job (a new result version)
    unchanged: dict[str, int]  # chain -> its current result version, whose inputs did not change
    note: str = ""  # the routing note as stored on the study


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    study_uid: str
    chain: str
    study_version: int
    attempts: int
    inputs: dict[str, str]
    # input key -> spool-relative paths of that series' instances, in instance-number order
    input_paths: dict[str, list[str]] = field(default_factory=dict)
    result_version: int = 1
    # spool-relative paths of the SR(s) of the chain's previous result version, if it has one
    previous_sr_paths: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ProducedObject:
    sop_instance_uid: str
    sop_class_uid: str
    path: str


@dataclass(frozen=True)
class ClaimedDelivery:
    id: int
    output_uid: str
    path: str
    attempts: int
    created_at: datetime
    study_uid: str = ""  # for the log lines, one per study and destination


class Store:
    """The node's database."""

    def __init__(self, url: str, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or make_engine(url)
        self._sessions = make_session_factory(self.engine)
        # Group commit of received instances (record_instance). One writer at a time also keeps
        # this process's receive threads out of SQLite's busy handler.
        self._writer_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queued_rows: list[_PendingRow] = []

    def _insert_ignore(self, executor: Session | Connection, model: type, values: Mapping[str, Any]) -> None:
        """INSERT ... ON CONFLICT DO NOTHING: concurrent associations may create the same study or series."""
        # Imported here: the PostgreSQL dialect module costs every CLI command ~0.1 s otherwise.
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        executor.execute(dialect_insert(model).values(**values).on_conflict_do_nothing())

    def migrate(self) -> None:
        migrate(self.engine)

    def session(self) -> Session:
        return self._sessions()

    def dispose(self) -> None:
        self.engine.dispose()

    # -- receiving ---------------------------------------------------------------------------

    def record_instance(self, incoming: IncomingInstance, duplicates: str, late_instances: str) -> str:
        """Record an instance already written to the spool; returns a RecordOutcome value.

        Returns only once the row is committed. Concurrent callers (one per association) share
        transactions: whoever holds the writer lock commits every row queued until then (group
        commit), so parallel associations pay one commit per batch instead of one per instance.
        """
        pending = _PendingRow(incoming, duplicates, late_instances)
        with self._queue_lock:
            self._queued_rows.append(pending)
        with self._writer_lock:
            if not pending.finished:  # else an earlier lock holder committed it in its batch
                with self._queue_lock:
                    batch, self._queued_rows = self._queued_rows, []
                self._commit_rows(batch)
        if pending.error is not None:
            raise pending.error
        return pending.outcome

    def _commit_rows(self, batch: list[_PendingRow]) -> None:
        """Commit a batch in one transaction; if that fails, row by row so one bad row fails alone."""
        try:
            self._record_batch(batch)
        except Exception as error:
            if len(batch) == 1:
                batch[0].error = error
                return
            for pending in batch:
                if not pending.finished:  # rows of another policy may have committed already
                    self._commit_rows([pending])

    def _record_batch(self, batch: Sequence[_PendingRow]) -> None:
        policies = {(pending.duplicates, pending.late_instances) for pending in batch}
        for duplicates, late_instances in policies:
            rows = [p for p in batch if (p.duplicates, p.late_instances) == (duplicates, late_instances)]
            incoming = [p.incoming for p in rows]
            try:
                outcomes = self.record_instances(incoming, duplicates, late_instances)
            except IntegrityError:
                # Another process created the same instance or series at the same moment
                # (PostgreSQL): the second attempt sees its rows.
                outcomes = self.record_instances(incoming, duplicates, late_instances)
            for pending, outcome in zip(rows, outcomes, strict=True):
                pending.outcome = outcome

    def record_instances(self, batch: Sequence[IncomingInstance], duplicates: str, late_instances: str) -> list[str]:
        """Record instances already in the spool in one transaction; a RecordOutcome per instance.

        A study that already completed is re-opened as a new version when late instances are
        reprocessed; otherwise the instances are kept but the study stays complete. The receive
        path's hot spot: prebuilt Core statements, one UPDATE per study and series in the batch.
        """
        now = utcnow()
        with self.engine.begin() as connection:
            uids = [i.sop_instance_uid for i in batch]
            known = dict(connection.execute(_KNOWN_INSTANCES, {"uids": uids}).all())
            batch = self._with_own_results(connection, batch)
            self._count_non_inputs(connection, batch)
            outcomes: list[str] = []
            new: list[IncomingInstance] = []
            replacing: list[IncomingInstance] = []
            resent_studies: set[str] = set()
            for incoming in batch:
                earlier_study = known.get(incoming.sop_instance_uid)
                if earlier_study is None:
                    known[incoming.sop_instance_uid] = incoming.study_uid
                    new.append(incoming)
                    outcomes.append(RecordOutcome.STORED)
                elif duplicates == "keep-first":
                    resent_studies.add(earlier_study)
                    outcomes.append(RecordOutcome.DUPLICATE_KEPT)
                else:
                    replacing.append(incoming)
                    outcomes.append(RecordOutcome.DUPLICATE_REPLACED)
            self._note_associations(connection, batch, now)
            if len(new) < len(batch):
                self._count(connection, "instances_duplicate", len(batch) - len(new))
            for study_uid in resent_studies:
                # A re-send is activity: the study must not complete in the middle of it.
                connection.execute(_TOUCH_RECEIVING_STUDY, {"b_study_uid": study_uid, "b_now": now, "b_added": 0})
            added_per_study = collections.Counter(i.study_uid for i in new)
            first_of_study = {i.study_uid: i for i in reversed([*new, *replacing])}
            # Only input-capable instances (re-)open a study; SR, KOS, PR, own results... never do.
            opening = {i.study_uid for i in [*new, *replacing] if i.kind not in InstanceKind.NOT_OPENING}
            for study_uid, first in first_of_study.items():
                self._touch_study(
                    connection, first, now, late_instances, added=added_per_study[study_uid], opens=study_uid in opening
                )
            added_per_series = collections.Counter(i.series_uid for i in new)
            first_of_series = {i.series_uid: i for i in reversed(new)}
            for series_uid, first in first_of_series.items():
                added = added_per_series[series_uid]
                if not connection.execute(_COUNT_SERIES, {"b_series_uid": series_uid, "b_added": added}).rowcount:
                    self._insert_ignore(
                        connection,
                        Series,
                        dict(
                            series_uid=series_uid,
                            study_uid=first.study_uid,
                            modality=first.modality,
                            series_number=first.series_number,
                            description=first.series_description,
                            sop_class_uid=first.sop_class_uid,
                            instance_count=added,
                            header=first.header() if first.header else {},
                        ),
                    )
            if new:
                connection.execute(insert(Instance), [_instance_row(i, now) for i in new])
            for incoming in replacing:
                connection.execute(
                    _REPLACE_INSTANCE,
                    {
                        "b_sop_instance_uid": incoming.sop_instance_uid,
                        "b_path": incoming.path,
                        "b_size_bytes": incoming.size_bytes,
                        "b_transfer_syntax_uid": incoming.transfer_syntax_uid,
                        "b_now": now,
                        "b_digest": incoming.digest,
                    },
                )
            return outcomes

    @staticmethod
    def _with_own_results(connection: Connection, batch: Sequence[IncomingInstance]) -> list[IncomingInstance]:
        """The batch with the kind of each of this node's own outputs set to own-result.

        Only objects that do not look like images a chain takes can be outputs, so only those
        are looked up: the receive path of a plain MR study pays no extra query.
        """
        candidates = [i.sop_instance_uid for i in batch if i.kind != InstanceKind.INPUT]
        if not candidates:
            return list(batch)
        own = set(connection.scalars(_OWN_OUTPUTS, {"uids": candidates}))
        return [replace(i, kind=InstanceKind.OWN_RESULT) if i.sop_instance_uid in own else i for i in batch]

    def _count_non_inputs(self, connection: Connection, batch: Sequence[IncomingInstance]) -> None:
        """Every receipt of a result (ours or another sijnode's) and of another non-input object."""
        kinds = collections.Counter(i.kind for i in batch)
        results = kinds[InstanceKind.OWN_RESULT] + kinds[InstanceKind.SIJNODE_RESULT]
        if results:
            self._count(connection, "own_results_returned", results)
        if kinds[InstanceKind.NON_INPUT]:
            self._count(connection, "non_input_objects", kinds[InstanceKind.NON_INPUT])

    def _touch_study(
        self, connection: Connection, incoming: IncomingInstance, now: datetime, late_instances: str, added: int, opens: bool = True
    ) -> None:
        """Note arrivals on the study, creating it or re-opening it when it had completed.

        Without ``opens`` (only non-input objects arrived) a completed study stays complete.
        """
        parameters = {"b_study_uid": incoming.study_uid, "b_now": now, "b_added": added}
        if connection.execute(_TOUCH_RECEIVING_STUDY, parameters).rowcount:
            return  # the common case: more instances for a study still arriving
        self._insert_ignore(
            connection,
            Study,
            dict(
                study_uid=incoming.study_uid,
                state=StudyState.RECEIVING,
                version=1,
                study_date=incoming.study_date,
                description=incoming.study_description,
                instance_count=0,
                first_received_at=now,
                last_received_at=now,
            ),
        )
        values = dict(last_received_at=now, instance_count=Study.instance_count + added)
        state = connection.execute(select(Study.state).where(Study.study_uid == incoming.study_uid)).scalar()
        if state == StudyState.COMPLETE and not opens:
            values = dict(instance_count=Study.instance_count + added)
        elif state == StudyState.COMPLETE:
            if late_instances == "reprocess":
                values.update(state=StudyState.RECEIVING, version=Study.version + 1, completed_at=None)
            else:
                self._count(connection, "instances_late_ignored", max(added, 1))
        connection.execute(update(Study).where(Study.study_uid == incoming.study_uid).values(**values))

    # -- completion that follows the sender ---------------------------------------------------

    def _note_associations(self, connection: Connection, batch: Sequence[IncomingInstance], now: datetime) -> None:
        """Record which association delivers which study (first instance of each pair only)."""
        for incoming in batch:
            if incoming.association is not None:
                self._insert_ignore(
                    connection,
                    AssociationStudy,
                    dict(
                        association=incoming.association,
                        study_uid=incoming.study_uid,
                        owner=incoming.association_owner or incoming.association,
                        state=AssociationState.OPEN,
                        opened_at=now,
                    ),
                )

    def association_ended(self, association: str, released: bool) -> int:
        """An association that delivered studies was released (the sender is done) or aborted."""
        state = AssociationState.RELEASED if released else AssociationState.ABORTED
        with self.engine.begin() as connection:
            return connection.execute(
                update(AssociationStudy)
                .where(AssociationStudy.association == association, AssociationStudy.state == AssociationState.OPEN)
                .values(state=state, ended_at=utcnow())
            ).rowcount

    def abort_open_associations(self, owner: str | None = None) -> int:
        """Mark the open associations of a dead receiver process (``owner``), or of all, aborted.

        Their senders were cut off, not done: such studies complete by the quiet period.
        """
        query = update(AssociationStudy).where(AssociationStudy.state == AssociationState.OPEN)
        if owner is not None:
            query = query.where(AssociationStudy.owner == owner)
        with self.engine.begin() as connection:
            return connection.execute(query.values(state=AssociationState.ABORTED, ended_at=utcnow())).rowcount

    def studies_released(self, grace_seconds: float) -> list[str]:
        """Receiving studies whose senders are done: due ``grace_seconds`` after the last release.

        Due when some association that delivered the study was released at least ``grace_seconds``
        ago, nothing arrived after the last release, no association delivering it is open and none
        was cut off (aborted, or open when its receiver died) after that release: such a sender
        may resume, so the quiet period decides instead.
        """
        released = (
            select(AssociationStudy.study_uid, func.max(AssociationStudy.ended_at).label("released_at"))
            .where(AssociationStudy.state == AssociationState.RELEASED)
            .group_by(AssociationStudy.study_uid)
            .subquery()
        )
        # An association still open, or cut off after the last release, may deliver more.
        may_resume = (
            select(AssociationStudy.study_uid)
            .where(
                AssociationStudy.study_uid == Study.study_uid,
                or_(
                    AssociationStudy.state == AssociationState.OPEN,
                    (AssociationStudy.state == AssociationState.ABORTED) & (AssociationStudy.ended_at > released.c.released_at),
                ),
            )
            .exists()
        )
        query = (
            select(Study.study_uid)
            .join(released, released.c.study_uid == Study.study_uid)
            .where(
                Study.state == StudyState.RECEIVING,
                released.c.released_at <= utcnow() - timedelta(seconds=grace_seconds),
                Study.last_received_at <= released.c.released_at,
                ~may_resume,
            )
            .order_by(Study.last_received_at)
        )
        with self.session() as session:
            return list(session.scalars(query))

    def forget_ended_associations(self, older_than_seconds: float) -> int:
        """Delete association rows that ended long ago (they matter only until their study completes)."""
        cutoff = utcnow() - timedelta(seconds=older_than_seconds)
        with self.engine.begin() as connection:
            return connection.execute(
                AssociationStudy.__table__.delete().where(
                    AssociationStudy.state != AssociationState.OPEN, AssociationStudy.ended_at < cutoff
                )
            ).rowcount

    # -- completion and routing ----------------------------------------------------------------

    def studies_due(self, quiet_seconds: float) -> list[str]:
        """Receiving studies with no new instance for ``quiet_seconds``."""
        cutoff = utcnow() - timedelta(seconds=quiet_seconds)
        with self.session() as session:
            query = select(Study.study_uid).where(Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff)
            return list(session.scalars(query.order_by(Study.last_received_at)))

    def study_snapshot(self, study_uid: str) -> tuple[Study, list[SeriesRecord]] | None:
        """The study row and its series, for classification and routing."""
        with self.session() as session:
            study = session.get(Study, study_uid)
            if study is None:
                return None
            rows = session.scalars(select(Series).where(Series.study_uid == study_uid).order_by(Series.series_number))
            return study, [_series_record(row) for row in rows]

    def complete_study(
        self,
        study_uid: str,
        seen_last_received_at: datetime,
        decisions: Sequence[SeriesDecision],
        jobs: Sequence[NewJob],
        routing_note: str,
        new_version: bool = False,
    ) -> CompletedStudy | None:
        """Mark a study complete, store its classifications and create its jobs, atomically.

        ``seen_last_received_at`` is the study's last arrival when the caller classified it: if an
        instance came since, nothing is written and None is returned (the study stays receiving).
        A routed chain gets a job (its next result version) only when its input fingerprint
        differs from that of its latest job for the study; with ``new_version`` (reprocess) the
        study's version is bumped and every routed chain gets a job.
        """
        now = utcnow()
        with self.session() as session, session.begin():
            study = session.get(Study, study_uid, with_for_update=True)
            if study is None or study.last_received_at != seen_last_received_at:
                return None
            if study.state == StudyState.COMPLETE and not new_version:
                return CompletedStudy(study.version, [], {}, study.routing_note or "")
            if new_version:
                study.version += 1
            for decision in decisions:
                session.execute(
                    update(Series)
                    .where(Series.series_uid == decision.series_uid)
                    .values(
                        role=decision.role,
                        plane=decision.plane,
                        tilt_deg=decision.tilt_deg,
                        counts_as_input=decision.counts_as_input,
                        rule=decision.rule,
                        reason=decision.reason,
                    )
                )
            created: list[str] = []
            unchanged: dict[str, int] = {}
            for job in jobs:
                fingerprint = self._input_fingerprint(session, job.inputs)
                latest = session.execute(
                    select(Job.result_version, Job.input_fingerprint)
                    .where(Job.study_uid == study_uid, Job.chain == job.chain)
                    .order_by(Job.result_version.desc())
                    .limit(1)
                ).first()
                if latest is not None and latest.input_fingerprint == fingerprint and not new_version:
                    unchanged[job.chain] = latest.result_version
                    continue
                self._insert_ignore(
                    session,
                    Job,
                    dict(
                        study_uid=study_uid,
                        chain=job.chain,
                        study_version=study.version,
                        result_version=latest.result_version + 1 if latest is not None else 1,
                        input_fingerprint=fingerprint,
                        inputs=job.inputs,
                        state=JobState.PENDING,
                        attempts=0,
                        created_at=now,
                    ),
                )
                created.append(job.chain)
            notes = [f"chain '{chain}': inputs unchanged since result {version}, not run again" for chain, version in unchanged.items()]
            study.state = StudyState.COMPLETE
            study.completed_at = now
            study.routing_note = "; ".join([routing_note, *notes])
            return CompletedStudy(study.version, created, unchanged, study.routing_note)

    @staticmethod
    def _input_fingerprint(session: Session, inputs: Mapping[str, str]) -> str:
        """sha256 over a job's input series and their instances (UID and, under replace, digest):
        it changes when an instance is added to or replaced in an input series, or when routing
        picks another series; re-sends, other series and non-input objects leave it alone."""
        digest = hashlib.sha256()
        for key, series_uid in sorted(inputs.items()):
            digest.update(f"{key}={series_uid}\n".encode())
            for sop_instance_uid, content in session.execute(_SERIES_CONTENT, {"b_series_uid": series_uid}):
                digest.update(f"{sop_instance_uid}:{content or ''}\n".encode())
        return digest.hexdigest()

    # -- jobs ------------------------------------------------------------------------------------

    def claim_job(self, worker: str, lease_seconds: float, max_attempts: int) -> ClaimedJob | None:
        """Take the oldest runnable job: pending, or running with an expired lease (its worker died)."""
        now = utcnow()
        runnable = or_(Job.state == JobState.PENDING, (Job.state == JobState.RUNNING) & (Job.lease_expires_at < now))
        with self.session() as session, session.begin():
            # Jobs whose worker died on their last allowed attempt stay failed and visible.
            session.execute(
                update(Job)
                .where(Job.state == JobState.RUNNING, Job.lease_expires_at < now, Job.attempts >= max_attempts)
                .values(state=JobState.FAILED, finished_at=now, error="worker lease expired on the last attempt")
            )
            while True:
                job_id = session.scalar(select(Job.id).where(runnable).order_by(Job.id).limit(1))
                if job_id is None:
                    return None
                # The WHERE repeats the runnable test: of two workers racing for one job, one wins.
                claimed = session.execute(
                    update(Job)
                    .where(Job.id == job_id, runnable)
                    .values(
                        state=JobState.RUNNING,
                        attempts=Job.attempts + 1,
                        worker=worker,
                        started_at=now,
                        lease_expires_at=now + timedelta(seconds=lease_seconds),
                    )
                )
                if claimed.rowcount == 1:
                    break
            job = session.get(Job, job_id)
            assert job is not None
            session.refresh(job)
            paths: dict[str, list[str]] = {}
            for key, series_uid in job.inputs.items():
                rows = session.execute(
                    select(Instance.path)
                    .where(Instance.series_uid == series_uid)
                    .order_by(Instance.instance_number, Instance.sop_instance_uid)
                )
                paths[key] = [row.path for row in rows]
            return ClaimedJob(
                job.id,
                job.study_uid,
                job.chain,
                job.study_version,
                job.attempts,
                dict(job.inputs),
                paths,
                job.result_version,
                self._previous_sr_paths(session, job),
            )

    @staticmethod
    def _previous_sr_paths(session: Session, job: Job) -> list[str]:
        """The SR output(s) of the chain's latest finished result version before ``job``'s."""
        previous = session.scalar(
            select(Job.id)
            .where(
                Job.study_uid == job.study_uid,
                Job.chain == job.chain,
                Job.state == JobState.DONE,
                Job.result_version < job.result_version,
            )
            .order_by(Job.result_version.desc())
            .limit(1)
        )
        if previous is None:
            return []
        return list(
            session.scalars(
                select(Output.path)
                .where(Output.job_id == previous, Output.sop_class_uid.startswith(_SR_CLASS_PREFIX))
                .order_by(Output.sop_instance_uid)
            )
        )

    def finish_job(self, job_id: int, worker: str, produced: Sequence[ProducedObject], destinations: Iterable[str]) -> bool:
        """Record a job's outputs and queue one delivery per destination, atomically.

        Returns False (and writes nothing) when the job is no longer this worker's: its lease
        expired and another worker took it over.
        """
        now = utcnow()
        with self.session() as session, session.begin():
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.state != JobState.RUNNING or job.worker != worker:
                return False
            study_uid = job.study_uid
            for item in produced:
                session.add(
                    Output(
                        sop_instance_uid=item.sop_instance_uid,
                        job_id=job_id,
                        study_uid=study_uid,
                        sop_class_uid=item.sop_class_uid,
                        path=item.path,
                        created_at=now,
                    )
                )
            session.flush()
            for item in produced:
                for destination in destinations:
                    session.add(
                        Delivery(
                            output_uid=item.sop_instance_uid,
                            destination=destination,
                            state=DeliveryState.PENDING,
                            created_at=now,
                            next_attempt_at=now,
                        )
                    )
            job.state = JobState.DONE
            job.finished_at = now
            job.error = None
            job.lease_expires_at = None
            return True

    def fail_job(self, job_id: int, worker: str, error: str, max_attempts: int) -> str | None:
        """Record a failed attempt: back to pending, or failed for good after ``max_attempts``."""
        with self.session() as session, session.begin():
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.state != JobState.RUNNING or job.worker != worker:
                return None
            job.error = error[:4000]
            job.lease_expires_at = None
            if job.attempts >= max_attempts:
                job.state = JobState.FAILED
                job.finished_at = utcnow()
            else:
                job.state = JobState.PENDING
            return job.state

    def extend_lease(self, job_id: int, worker: str, lease_seconds: float) -> bool:
        """Keep a long-running job claimed; False when it is no longer this worker's."""
        with self.session() as session, session.begin():
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.worker == worker, Job.state == JobState.RUNNING)
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
            )
            return result.rowcount == 1

    def retry_failed_jobs(self) -> int:
        with self.session() as session, session.begin():
            result = session.execute(
                update(Job).where(Job.state == JobState.FAILED).values(state=JobState.PENDING, attempts=0, finished_at=None)
            )
            return result.rowcount

    # -- deliveries ------------------------------------------------------------------------------

    def claim_deliveries(self, destination: str, limit: int, lease_seconds: float) -> list[ClaimedDelivery]:
        """Take due deliveries for one destination; a claim left by a dead sender expires after the lease."""
        now = utcnow()
        due = (Delivery.destination == destination) & (
            ((Delivery.state == DeliveryState.PENDING) & (Delivery.next_attempt_at <= now))
            | ((Delivery.state == DeliveryState.SENDING) & (Delivery.next_attempt_at <= now))
        )
        with self.session() as session, session.begin():
            ids = list(session.scalars(select(Delivery.id).where(due).order_by(Delivery.id).limit(limit)))
            if not ids:
                return []
            # While sending, next_attempt_at holds the claim's expiry.
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_(ids), due)
                .values(state=DeliveryState.SENDING, next_attempt_at=now + timedelta(seconds=lease_seconds))
            )
            rows = session.execute(
                select(Delivery.id, Delivery.output_uid, Output.path, Delivery.attempts, Delivery.created_at, Output.study_uid)
                .join(Output, Output.sop_instance_uid == Delivery.output_uid)
                .where(Delivery.id.in_(ids), Delivery.state == DeliveryState.SENDING)
                .order_by(Delivery.id)
            )
            return [ClaimedDelivery(r.id, r.output_uid, r.path, r.attempts, r.created_at, r.study_uid) for r in rows]

    def delivery_succeeded(self, delivery_id: int) -> None:
        now = utcnow()
        with self.session() as session, session.begin():
            delivery = session.get(Delivery, delivery_id)
            if delivery is None:
                return
            delivery.state = DeliveryState.DONE
            delivery.delivered_at = now
            delivery.attempts += 1
            delivery.last_error = None
            self._destination_health(session, delivery.destination, ok=True, error=None)

    def delivery_failed(
        self, delivery_id: int, error: str, initial_backoff_s: float, max_backoff_s: float, max_age: timedelta
    ) -> str:
        """Schedule the next attempt with exponential backoff and jitter, or give up past max_age."""
        now = utcnow()
        with self.session() as session, session.begin():
            delivery = session.get(Delivery, delivery_id)
            if delivery is None:
                return DeliveryState.FAILED
            delivery.attempts += 1
            delivery.last_error = error[:2000]
            if now - delivery.created_at >= max_age:
                delivery.state = DeliveryState.FAILED
            else:
                delay = min(max_backoff_s, initial_backoff_s * 2 ** (delivery.attempts - 1))
                # Full jitter in [delay/2, delay]: many outputs for one down PACS don't retry in lockstep.
                delivery.next_attempt_at = now + timedelta(seconds=delay * random.uniform(0.5, 1.0))
                delivery.state = DeliveryState.PENDING
            self._destination_health(session, delivery.destination, ok=False, error=error)
            return delivery.state

    def retry_failed_deliveries(self, destination: str | None = None) -> int:
        """Re-queue failed deliveries (their age restarts); acknowledged ones are never touched."""
        now = utcnow()
        query = update(Delivery).where(Delivery.state == DeliveryState.FAILED)
        if destination:
            query = query.where(Delivery.destination == destination)
        with self.session() as session, session.begin():
            return session.execute(
                query.values(state=DeliveryState.PENDING, next_attempt_at=now, created_at=now, attempts=0)
            ).rowcount

    def _destination_health(self, session: Session, name: str, ok: bool, error: str | None) -> None:
        self._insert_ignore(session, DestinationHealth, dict(name=name))
        health = session.get(DestinationHealth, name)
        assert health is not None
        if ok:
            health.last_success_at = utcnow()
        else:
            health.last_failure_at = utcnow()
            health.last_error = (error or "")[:2000]

    # -- counters and heartbeat ------------------------------------------------------------------

    def count(self, name: str, amount: int = 1) -> None:
        with self.session() as session, session.begin():
            self._count(session, name, amount)

    def _count(self, executor: Session | Connection, name: str, amount: int = 1) -> None:
        self._insert_ignore(executor, Counter, dict(name=name, value=0))
        executor.execute(update(Counter).where(Counter.name == name).values(value=Counter.value + amount))

    def expire_claims(self) -> tuple[int, int]:
        """End every job and delivery claim now, as if its lease had run out; returns (jobs, deliveries).

        For a restarted service: the workers and the sender holding those claims died with the
        previous process, so the usual claim rules may take the work over at once.
        """
        now = utcnow()
        with self.session() as session, session.begin():
            jobs = session.execute(update(Job).where(Job.state == JobState.RUNNING).values(lease_expires_at=now)).rowcount
            deliveries = session.execute(
                update(Delivery).where(Delivery.state == DeliveryState.SENDING).values(next_attempt_at=now)
            ).rowcount
        return jobs, deliveries

    def heartbeat(self, name: str) -> tuple[int, str, datetime] | None:
        """The last beat of ``name``: (pid, host, beat_at), or None."""
        with self.session() as session:
            row = session.get(Heartbeat, name)
            return None if row is None else (row.pid, row.host, row.beat_at)

    def beat(self, name: str, pid: int, host: str, started_at: datetime, detail: dict[str, Any]) -> None:
        with self.session() as session, session.begin():
            self._insert_ignore(
                session, Heartbeat, dict(name=name, pid=pid, host=host, started_at=started_at, beat_at=utcnow(), detail=detail)
            )
            session.execute(
                update(Heartbeat)
                .where(Heartbeat.name == name)
                .values(pid=pid, host=host, started_at=started_at, beat_at=utcnow(), detail=detail)
            )

    def clear_heartbeat(self, name: str) -> None:
        with self.session() as session, session.begin():
            heartbeat = session.get(Heartbeat, name)
            if heartbeat is not None:
                session.delete(heartbeat)

    # -- reading for the CLI ---------------------------------------------------------------------

    def ping(self) -> None:
        """Raise unless the database answers a query (the health endpoint's check)."""
        with self.engine.connect() as connection:
            connection.execute(select(1))

    def known_uids(self, kind: str) -> list[str]:
        """Every study, series or output UID (``kind``), for short forms and prefix/suffix look-ups."""
        column = {"study": Study.study_uid, "series": Series.series_uid, "output": Output.sop_instance_uid}[kind]
        with self.session() as session:
            return list(session.scalars(select(column)))

    def job_states(self, study_uids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Per study, how many jobs of its current version are in each state."""
        if not study_uids:
            return {}
        with self.session() as session:
            rows = session.execute(
                select(Job.study_uid, Job.state, func.count())
                .join(Study, (Study.study_uid == Job.study_uid) & (Study.version == Job.study_version))
                .where(Job.study_uid.in_(study_uids))
                .group_by(Job.study_uid, Job.state)
            )
            states: dict[str, dict[str, int]] = {}
            for study_uid, state, count in rows:
                states.setdefault(study_uid, {})[state] = count
            return states

    def next_attempts(self) -> dict[str, datetime]:
        """Per destination, when its next pending delivery is due."""
        with self.session() as session:
            rows = session.execute(
                select(Delivery.destination, func.min(Delivery.next_attempt_at))
                .where(Delivery.state == DeliveryState.PENDING)
                .group_by(Delivery.destination)
            )
            return {destination: _aware(moment) for destination, moment in rows if moment is not None}

    def overview(self) -> dict[str, Any]:
        """Counts per state, destination health, counters and heartbeats."""
        with self.session() as session:
            def per_state(model: type, column: Any) -> dict[str, int]:
                return {state: n for state, n in session.execute(select(column, func.count()).group_by(column))}

            deliveries_by_destination: dict[str, dict[str, int]] = {}
            for destination, state, n in session.execute(
                select(Delivery.destination, Delivery.state, func.count()).group_by(Delivery.destination, Delivery.state)
            ):
                deliveries_by_destination.setdefault(destination, {})[state] = n
            return {
                "studies": per_state(Study, Study.state),
                "jobs": per_state(Job, Job.state),
                "deliveries": per_state(Delivery, Delivery.state),
                "deliveries_by_destination": deliveries_by_destination,
                "destination_health": {
                    h.name: {"last_success_at": h.last_success_at, "last_failure_at": h.last_failure_at, "last_error": h.last_error}
                    for h in session.scalars(select(DestinationHealth))
                },
                "counters": {c.name: c.value for c in session.scalars(select(Counter))},
                "heartbeats": {
                    h.name: {"pid": h.pid, "host": h.host, "started_at": h.started_at, "beat_at": h.beat_at, "detail": h.detail}
                    for h in session.scalars(select(Heartbeat))
                },
            }

    def list_studies(self, limit: int = 50) -> list[Study]:
        with self.session() as session:
            return list(session.scalars(select(Study).order_by(Study.last_received_at.desc()).limit(limit)))

    def list_jobs(self, state: str | None = None, limit: int = 50) -> list[Job]:
        with self.session() as session:
            query = select(Job).order_by(Job.id.desc()).limit(limit)
            if state:
                query = query.where(Job.state == state)
            return list(session.scalars(query))

    def study_detail(self, study_uid: str) -> dict[str, Any] | None:
        with self.session() as session:
            study = session.get(Study, study_uid)
            if study is None:
                return None
            series = session.scalars(select(Series).where(Series.study_uid == study_uid).order_by(Series.series_number))
            jobs = list(session.scalars(select(Job).where(Job.study_uid == study_uid).order_by(Job.id)))
            outputs = list(session.scalars(select(Output).where(Output.study_uid == study_uid).order_by(Output.created_at)))
            deliveries = list(
                session.scalars(
                    select(Delivery)
                    .join(Output, Output.sop_instance_uid == Delivery.output_uid)
                    .where(Output.study_uid == study_uid)
                    .order_by(Delivery.id)
                )
            )
            objects = [
                {"kind": kind, "sop_class_uid": sop_class_uid, "count": count}
                for kind, sop_class_uid, count in session.execute(
                    select(Instance.kind, Instance.sop_class_uid, func.count())
                    .where(Instance.study_uid == study_uid)
                    .group_by(Instance.kind, Instance.sop_class_uid)
                    .order_by(Instance.kind, Instance.sop_class_uid)
                )
            ]
            return {
                "study": study,
                "series": [_series_record(s) for s in series],
                "jobs": jobs,
                "outputs": outputs,
                "deliveries": deliveries,
                # Received objects per kind (input, non-input, own-result, sijnode-result) and SOP class.
                "objects": objects,
            }

    def series(self, series_uid: str) -> SeriesRecord | None:
        with self.session() as session:
            row = session.get(Series, series_uid)
            return None if row is None else _series_record(row)

    def study_instances(self, study_uid: str) -> list[Instance]:
        with self.session() as session:
            return list(session.scalars(select(Instance).where(Instance.study_uid == study_uid).order_by(Instance.series_uid, Instance.instance_number)))


    # -- study summary (issue 10) -----------------------------------------------------------------

    def add_study_outputs(
        self, study_uid: str, job_id: int | None, produced: Sequence[ProducedObject], destinations: Iterable[str]
    ) -> int:
        """Record objects made for a study after its jobs finished (the study summary), under the
        job that ended last or, for a study no chain ran on, under no job, and queue their
        deliveries. An object already recorded (same SOP Instance UID: the same summary content)
        is left alone. Returns how many objects were new."""
        now = utcnow()
        destinations = list(destinations)
        added = 0
        with self.session() as session, session.begin():
            if session.get(Study, study_uid) is None or (job_id is not None and session.get(Job, job_id) is None):
                return 0
            for item in produced:
                if session.get(Output, item.sop_instance_uid) is not None:
                    continue
                self._insert_ignore(
                    session,
                    Output,
                    dict(sop_instance_uid=item.sop_instance_uid, job_id=job_id, study_uid=study_uid,
                         sop_class_uid=item.sop_class_uid, path=item.path, created_at=now),
                )
                for destination in destinations:
                    self._insert_ignore(
                        session,
                        Delivery,
                        dict(output_uid=item.sop_instance_uid, destination=destination, state=DeliveryState.PENDING,
                             attempts=0, created_at=now, next_attempt_at=now),
                    )
                added += 1
        return added


def _aware(moment: datetime) -> datetime:
    """An aggregate (min/max) skips UTCDateTime's conversion: SQLite hands back a naive UTC string or datetime."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _series_record(row: Series) -> SeriesRecord:
    return SeriesRecord(
        row.series_uid,
        row.study_uid,
        row.modality,
        row.series_number,
        row.description,
        row.sop_class_uid,
        row.instance_count,
        dict(row.header or {}),
        row.role,
        row.plane,
        row.tilt_deg,
        row.counts_as_input,
        row.rule,
        row.reason,
    )


def open_store(url: str) -> Store:
    """Open the database at ``url`` and bring its schema up to date."""
    store = Store(url)
    store.migrate()
    return store


def open_store_quickly(url: str) -> Store:
    """Open the database for a short CLI command: migrate a new SQLite file at once, an existing
    database only when a query fails on its schema (``Store.migrate``); checking the revision on
    every call would cost each command ~0.1 s of alembic."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
        return open_store(url)
    return Store(url)
