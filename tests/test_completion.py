"""Completion that follows the sender: a study completes a grace period after its last
delivering association is released, and by the quiet period otherwise.

Each test runs the real ``sijnode serve`` (tests/node_harness.py) with a quiet period far longer
than the grace period, so a completion in between can only come from the release rule.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from storage.models import AssociationState, AssociationStudy, Study, StudyState
from tests.node_harness import NODE_AET, Node, make_mr_series
from tests.peers import LOOPBACK, run_storescu, wait_for

GRACE = 1.5
QUIET = 40.0
SETTINGS = {"study": {"release_grace_seconds": GRACE, "quiet_seconds": QUIET}, "workers": {"processes": 0}}


def _study(node: Node, study_uid: str) -> Study | None:
    return next((s for s in node.rows(Study) if s.study_uid == study_uid), None)


def _wait_complete(node: Node, study_uid: str, timeout: float) -> Study:
    def complete() -> Study | None:
        study = _study(node, study_uid)
        return study if study is not None and study.state == StudyState.COMPLETE else None

    return wait_for(complete, timeout=timeout, interval=0.2, what=f"study complete\n{node.output_tail()}")


def test_one_association_push_completes_a_grace_period_after_release(tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "study", 8)
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    with Node(tmp_path / "node", SETTINGS) as node:
        sent = run_storescu(files, node.port, NODE_AET)
        released = time.monotonic()
        assert sent.returncode == 0, sent.stderr
        study = _wait_complete(node, study_uid, timeout=GRACE + 15)
        waited = time.monotonic() - released
        # Not before the grace period (the node's clock: completion vs. last arrival), far before the quiet period.
        assert (study.completed_at - study.last_received_at).total_seconds() >= GRACE
        assert waited < QUIET / 2
        assert study.instance_count == 8 and study.version == 1
        rows = [row for row in node.rows(AssociationStudy) if row.study_uid == study_uid]
        assert [row.state for row in rows] == [AssociationState.RELEASED]


def test_study_split_over_associations_with_a_pause_completes_once(tmp_path: Path) -> None:
    first = make_mr_series(tmp_path / "study" / "t1", 6, series_number=1)
    study_uid = str(dcmread(first[0]).StudyInstanceUID)
    second = make_mr_series(tmp_path / "study" / "stir", 5, study_uid=study_uid, series_description="t2_tirm_cor", series_number=2)
    with Node(tmp_path / "node", SETTINGS) as node:
        assert run_storescu(first, node.port, NODE_AET).returncode == 0
        time.sleep(GRACE / 3)  # the sender pauses between associations, shorter than the grace period
        assert _study(node, study_uid).state == StudyState.RECEIVING
        assert run_storescu(second, node.port, NODE_AET).returncode == 0
        study = _wait_complete(node, study_uid, timeout=GRACE + 15)
        assert study.instance_count == 11
        assert study.version == 1  # one completion with both series, not one per association
        rows = [row for row in node.rows(AssociationStudy) if row.study_uid == study_uid]
        assert len(rows) == 2 and {row.state for row in rows} == {AssociationState.RELEASED}
        assert study.completed_at >= max(row.ended_at for row in rows)


def test_open_association_holds_the_study_and_a_restart_falls_back_to_the_quiet_period(tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "study", 4)
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    quiet = 6.0
    settings = {**SETTINGS, "study": {"release_grace_seconds": GRACE, "quiet_seconds": quiet}}
    node = Node(tmp_path / "node", settings).start()
    try:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(MRImageStorage, dcmread(files[0]).file_meta.TransferSyntaxUID)
        assoc = ae.associate(LOOPBACK, node.port, ae_title=NODE_AET)
        assert assoc.is_established
        for path in files[:2]:
            assert assoc.send_c_store(dcmread(path)).Status == 0
        # Another association delivers the rest and is released; the first still holds the study.
        assert run_storescu(files[2:], node.port, NODE_AET).returncode == 0
        time.sleep(GRACE + 2)
        assert _study(node, study_uid).state == StudyState.RECEIVING
        # kill -9 with the association open: after the restart it counts as cut off, not released.
        node.kill()
        assoc.abort()
        node.start()
        states = sorted(row.state for row in node.rows(AssociationStudy) if row.study_uid == study_uid)
        assert states == [AssociationState.ABORTED, AssociationState.RELEASED]
        restarted = time.monotonic()
        # The cut-off sender may resume: no completion on release, only after the quiet period.
        time.sleep(GRACE + 1)
        assert _study(node, study_uid).state == StudyState.RECEIVING
        study = _wait_complete(node, study_uid, timeout=quiet + 20)
        assert study.instance_count == 4 and study.version == 1
        assert time.monotonic() - restarted >= quiet - 1
    finally:
        node.stop()
