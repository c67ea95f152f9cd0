"""The database schema (SQLAlchemy 2 declarative). Alembic migrations in storage/migrations mirror it.

No patient name, ID or birth date is stored: the rows hold UIDs, header facts needed for
classification, and the node's own bookkeeping. The DICOM files in the spool stay the record.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as naive UTC and read back timezone-aware.

    SQLite keeps no zone, so comparing what it returns with aware times would fail; storing
    naive UTC in both SQLite and PostgreSQL keeps one behaviour.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use storage.models.utcnow()")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class StudyState:
    RECEIVING = "receiving"  # instances may still come
    COMPLETE = "complete"  # quiet period passed (or forced); jobs were routed


class JobState:
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class DeliveryState:
    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


class InstanceKind:
    """What a received object is to the node (decided when it is recorded)."""

    INPUT = "input"  # a storage class a chain can take (MR, CT, CR, DX); classified at completion
    NON_INPUT = "non-input"  # SR, KOS, PR, SEG, PDF, RT, SC, ...: kept, never (re-)opens a study
    OWN_RESULT = "own-result"  # an object this node produced, come back (known SOP Instance UID)
    SIJNODE_RESULT = "sijnode-result"  # another sijnode's result (Manufacturer "sijnode")

    NOT_OPENING = frozenset({NON_INPUT, OWN_RESULT, SIJNODE_RESULT})


class Study(Base):
    __tablename__ = "studies"

    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING, index=True)
    # Bumped when instances re-open a completed study, so its jobs run again as a new version.
    version: Mapped[int] = mapped_column(Integer, default=1)
    study_date: Mapped[str | None] = mapped_column(String(8))
    description: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime] = mapped_column(index=True)
    completed_at: Mapped[datetime | None]
    # Why the last completion routed what it did, e.g. "no applicable chain".
    routing_note: Mapped[str | None] = mapped_column(Text)


class Series(Base):
    __tablename__ = "series"

    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None]
    description: Mapped[str | None] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # Classification-relevant header attributes of the first instance (pipeline.classify.header_summary).
    header: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    role: Mapped[str | None] = mapped_column(String(16))
    plane: Mapped[str | None] = mapped_column(String(16))
    tilt_deg: Mapped[float | None] = mapped_column(Float)
    counts_as_input: Mapped[bool | None]
    rule: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text)


class Instance(Base):
    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_uid: Mapped[str] = mapped_column(ForeignKey("series.series_uid"), index=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None]
    path: Mapped[str] = mapped_column(Text)  # relative to the spool root
    size_bytes: Mapped[int]
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(16), default=InstanceKind.INPUT, server_default=InstanceKind.INPUT)
    # sha256 of the received bytes, kept only under duplicates: replace (where a re-send may
    # change an instance); the input fingerprint of a job tells a real replacement from a re-send.
    digest: Mapped[str | None] = mapped_column(String(64))


class AssociationState:
    OPEN = "open"  # the association may still deliver instances
    RELEASED = "released"  # the sender released it: it says it is done
    ABORTED = "aborted"  # aborted, connection lost, or its receiver process died: it may come back


class AssociationStudy(Base):
    """One association that delivered instances of one study: what completion follows.

    Kept in the database, not in the receiver's memory, so that completion is right after a
    restart and with several receiver processes (node.completion, Store.studies_released).
    """

    __tablename__ = "association_studies"

    association: Mapped[str] = mapped_column(String(128), primary_key=True)  # host:pid:serial
    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)  # host:pid of the receiving process
    state: Mapped[str] = mapped_column(String(16), default=AssociationState.OPEN)
    opened_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("study_uid", "chain", "study_version", name="uq_job_study_chain_version"),
        Index("ix_jobs_claim", "state", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(ForeignKey("studies.study_uid"), index=True)
    chain: Mapped[str] = mapped_column(String(64))
    study_version: Mapped[int]
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON)  # input key -> series UID
    # The chain's own result version for this study (1, 2, ...): in its series descriptions and
    # numbers; a new one only when the input fingerprint changed or on `sijnode reprocess`.
    result_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # sha256 over the chosen series and their instances (UID, and digest under replace).
    input_fingerprint: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]


class Output(Base):
    """A DICOM object a job (or the study summary) produced (SR, heatmap, ...), stored in the spool."""

    __tablename__ = "outputs"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    # None: a study-level object (the summary of a study no chain ran on)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]


class Delivery(Base):
    """One output to one destination: the persistent outbox."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("output_uid", "destination", name="uq_delivery_output_destination"),
        Index("ix_deliveries_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    output_uid: Mapped[str] = mapped_column(ForeignKey("outputs.sop_instance_uid"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)


class DestinationHealth(Base):
    __tablename__ = "destination_health"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_success_at: Mapped[datetime | None]
    last_failure_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)


class Counter(Base):
    """Event counts the admin sees in ``sijnode status`` (rejected instances, duplicates, ...)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)


class Heartbeat(Base):
    """Liveness of the running service, written every few seconds."""

    __tablename__ = "heartbeats"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    pid: Mapped[int]
    host: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime]
    beat_at: Mapped[datetime]
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
