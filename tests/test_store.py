"""The receive path's database writes: group commit of instances from concurrent associations.

Run against SQLite (the default) and PostgreSQL (Debian's server, started by the tests).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from storage.models import Counter, Instance, Series, Study, StudyState
from storage.store import IncomingInstance, RecordOutcome, Store, open_store

KEEP_FIRST = "keep-first"
REPROCESS = "reprocess"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = f"sqlite:///{tmp_path / 'node.sqlite'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    opened = open_store(url)
    yield opened
    opened.dispose()


def incoming(study: int, series: int, number: int, **changes: object) -> IncomingInstance:
    values: dict[str, object] = dict(
        study_uid=f"1.2.826.0.1.3680043.10.1.{study}",
        series_uid=f"1.2.826.0.1.3680043.10.1.{study}.{series}",
        sop_instance_uid=f"1.2.826.0.1.3680043.10.1.{study}.{series}.{number}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"incoming/{study}/{series}/{number}.dcm",
        size_bytes=1000,
        instance_number=number,
        modality="MR",
        series_number=series,
        header=lambda: {"Modality": "MR", "SeriesNumber": series},
    )
    values.update(changes)
    return IncomingInstance(**values)  # type: ignore[arg-type]


def record_concurrently(store: Store, instances: list[IncomingInstance]) -> dict[str, str | Exception]:
    """record_instance from one thread per instance, all queued while the writer lock is held.

    Holding the lock while the threads queue makes the next lock holder commit them as one batch,
    which is what parallel associations do when a commit is slower than their arrivals.
    """
    results: dict[str, str | Exception] = {}
    queued = threading.Semaphore(0)

    def record(item: IncomingInstance) -> None:
        queued.release()
        try:
            results[item.sop_instance_uid] = store.record_instance(item, KEEP_FIRST, REPROCESS)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            results[item.sop_instance_uid] = error

    threads = [threading.Thread(target=record, args=(item,)) for item in instances]
    with store._writer_lock:
        for thread in threads:
            thread.start()
        for _ in threads:
            queued.acquire()
        # Every thread is at (or about to reach) the lock; give the last ones time to queue.
        threading.Event().wait(0.2)
    for thread in threads:
        thread.join(timeout=30)
    return results


def rows(store: Store, model: type) -> list:
    with store.session() as session:
        return list(session.scalars(select(model)))


def test_concurrent_instances_are_all_recorded_with_exact_counts(store: Store) -> None:
    instances = [incoming(study, series, number) for study in (1, 2) for series in (1, 2) for number in range(12)]
    results = record_concurrently(store, instances)
    assert set(results.values()) == {RecordOutcome.STORED}
    assert len(rows(store, Instance)) == 48
    assert {s.study_uid: s.instance_count for s in rows(store, Study)} == {
        "1.2.826.0.1.3680043.10.1.1": 24,
        "1.2.826.0.1.3680043.10.1.2": 24,
    }
    assert all(s.instance_count == 12 and s.header["Modality"] == "MR" for s in rows(store, Series))

    # Re-sent: every one is a duplicate, kept once, and counted; no count changes.
    again = record_concurrently(store, instances[:10])
    assert set(again.values()) == {RecordOutcome.DUPLICATE_KEPT}
    assert len(rows(store, Instance)) == 48
    assert sum(s.instance_count for s in rows(store, Study)) == 48
    assert {c.name: c.value for c in rows(store, Counter)}["instances_duplicate"] == 10


def test_a_bad_row_fails_alone_and_the_rest_of_its_batch_is_committed(store: Store) -> None:
    good = [incoming(1, 1, number) for number in range(5)]
    bad = incoming(1, 1, 99, path=None)  # NOT NULL: the database refuses this row
    results = record_concurrently(store, [*good[:2], bad, *good[2:]])
    assert isinstance(results[bad.sop_instance_uid], Exception)
    assert [results[item.sop_instance_uid] for item in good] == [RecordOutcome.STORED] * 5
    assert sorted(i.instance_number for i in rows(store, Instance)) == [0, 1, 2, 3, 4]
    assert rows(store, Study)[0].instance_count == 5


def test_one_batch_is_one_transaction(store: Store) -> None:
    with pytest.raises(Exception):
        store.record_instances([incoming(1, 1, 1), incoming(1, 1, 2, path=None)], KEEP_FIRST, REPROCESS)
    assert rows(store, Instance) == []
    assert rows(store, Study) == []


def test_late_instances_in_one_batch_reopen_the_study_once(store: Store) -> None:
    store.record_instances([incoming(1, 1, 1)], KEEP_FIRST, REPROCESS)
    with store.session() as session, session.begin():
        session.get(Study, "1.2.826.0.1.3680043.10.1.1").state = StudyState.COMPLETE

    outcomes = store.record_instances([incoming(1, 1, 2), incoming(1, 2, 1), incoming(1, 1, 1)], KEEP_FIRST, REPROCESS)
    assert outcomes == [RecordOutcome.STORED, RecordOutcome.STORED, RecordOutcome.DUPLICATE_KEPT]
    (study,) = rows(store, Study)
    assert (study.state, study.version, study.instance_count) == (StudyState.RECEIVING, 2, 3)

    with store.session() as session, session.begin():
        session.get(Study, study.study_uid).state = StudyState.COMPLETE
    store.record_instances([incoming(1, 1, 3), incoming(1, 1, 4)], KEEP_FIRST, "ignore")
    (study,) = rows(store, Study)
    assert (study.state, study.version, study.instance_count) == (StudyState.COMPLETE, 2, 5)
    assert {c.name: c.value for c in rows(store, Counter)}["instances_late_ignored"] == 2


def test_replace_policy_updates_the_row_and_touches_the_study(store: Store) -> None:
    store.record_instances([incoming(1, 1, 1)], "replace", REPROCESS)
    outcomes = store.record_instances([incoming(1, 1, 1, path="incoming/new.dcm", size_bytes=7)], "replace", REPROCESS)
    assert outcomes == [RecordOutcome.DUPLICATE_REPLACED]
    (instance,) = rows(store, Instance)
    assert (instance.path, instance.size_bytes) == ("incoming/new.dcm", 7)
    assert rows(store, Study)[0].instance_count == 1
