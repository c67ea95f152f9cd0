"""The node against real peers: dcmtk's echoscu/storescu, Orthanc as PACS, PostgreSQL.

Each test starts ``sijnode serve`` as its own process on loopback (tests/node_harness.py).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from storage.models import Delivery, Instance, Job
from tests.node_harness import NODE_AET, TEST_CHAIN, Node, make_mr_series, read_uids
from tests.peers import LOOPBACK, orthanc, run_echoscu, run_storescu, wait_for

PHI = ("DOE^JANE", "DOE", "PID-4711", "19700101")



def _wait_job_state(node: Node, state: str, count: int = 1, timeout: float = 60) -> list[Job]:
    def jobs_in_state() -> list[Job] | None:
        jobs = [job for job in node.rows(Job) if job.state == state]
        return jobs if len(jobs) >= count else None

    return wait_for(jobs_in_state, timeout=timeout, interval=0.5, what=f"{count} job(s) {state}\n{node.output_tail()}")


def _assert_no_phi_in_logs(node: Node) -> None:
    text = node.log_path.read_text() + (node.workdir / "stdout.log").read_text()
    for value in PHI:
        assert value not in text, f"{value!r} appears in the node's log"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_overrides(request: pytest.FixtureRequest) -> dict:
    """Storage tests run against the embedded SQLite and against a PostgreSQL server."""
    if request.param == "sqlite":
        return {}
    return {"storage": {"database_url": request.getfixturevalue("postgres_url")}}


def test_echo_study_arrives_whole_and_unknown_caller_is_rejected(tmp_path: Path, database_overrides: dict) -> None:
    study = tmp_path / "study"
    t1 = make_mr_series(study / "t1", 12, series_number=1)
    study_uid = str(dcmread(t1[0]).StudyInstanceUID)
    stir = make_mr_series(study / "stir", 9, study_uid=study_uid, series_description="t2_tirm_cor", series_number=2)

    with Node(tmp_path / "node", {**database_overrides, "study": {"quiet_seconds": 1}}) as node:
        assert run_echoscu(node.port, NODE_AET).returncode == 0

        sent = run_storescu(study, node.port, NODE_AET)
        assert sent.returncode == 0, sent.stderr

        instances = node.rows(Instance)
        assert {i.sop_instance_uid for i in instances} == read_uids(t1 + stir)
        for instance in instances:
            stored = dcmread(node.workdir / "var" / "spool" / instance.path)
            assert str(stored.SOPInstanceUID) == instance.sop_instance_uid
        assert {i.series_uid for i in instances} == {str(dcmread(t1[0]).SeriesInstanceUID), str(dcmread(stir[0]).SeriesInstanceUID)}

        # No chain is configured: the study completes and is recorded as having none.
        studies = wait_for(
            lambda: [s for s in node.cli_json("studies") if s["state"] == "complete"] or None,
            timeout=30,
            what="study complete",
        )
        assert studies[0]["study_uid"] == study_uid
        assert studies[0]["instance_count"] == 21
        assert "no applicable chain" in studies[0]["routing_note"]

        rejected = run_storescu(t1[:1], node.port, NODE_AET, aet_calling="INTRUDER")
        assert rejected.returncode != 0
        assert "Calling AE Title Not Recognized" in rejected.stderr + rejected.stdout
        assert len(node.rows(Instance)) == 21
        assert node.cli_json("status")["counters"]["associations_rejected"] >= 1
    _assert_no_phi_in_logs(node)


def test_source_address_allowlist_rejects_at_association(tmp_path: Path) -> None:
    with Node(tmp_path / "node", {"receiver": {"allowed_source_addresses": ["127.0.0.1/32"]}}) as node:
        assert run_echoscu(node.port, NODE_AET).returncode == 0
    # The node answers no echo from 127.0.0.1 now, so it starts without waiting for one.
    node = Node(tmp_path / "node2", {"receiver": {"allowed_source_addresses": ["10.0.0.0/8"]}}).start(wait=False)
    try:
        result = wait_for(
            lambda: (r := run_echoscu(node.port, NODE_AET)) and "Rejected" in r.stdout + r.stderr and r,
            timeout=60,
            what="association rejection",
        )
        assert result.returncode != 0
        assert "Rejected Permanent" in result.stdout + result.stderr
        counters = node.cli_json("status")["counters"]
        assert counters["associations_rejected_address"] >= 1
        assert "associations_rejected" not in counters, "counted once, under its cause"
    finally:
        node.stop()


def test_orthanc_pushes_study_and_receives_the_result(tmp_path: Path) -> None:
    study = tmp_path / "study"
    files = make_mr_series(study, 6)
    with orthanc(tmp_path / "orthanc") as pacs:
        overrides = {
            "peers": [{"name": "pacs", "ae_title": pacs.aet, "host": LOOPBACK, "port": pacs.dicom_port}],
            "chains": [TEST_CHAIN],
        }
        with Node(tmp_path / "node-run", overrides) as node:
            pacs.set_modality("sijnode", NODE_AET, node.port)  # PACS learns the node's address
            ids = [pacs.upload(path)["ID"] for path in files]
            pacs.store_to("sijnode", ids)
            assert len(node.rows(Instance)) == 6

            jobs = _wait_job_state(node, "done")
            assert jobs[0].chain == "test-echo"
            delivered = wait_for(
                lambda: [d for d in node.rows(Delivery) if d.state == "done"] or None,
                timeout=60,
                what=f"delivery acknowledged\n{node.output_tail()}",
            )
            instance_id = pacs.instance_id_for(delivered[0].output_uid)
            assert instance_id is not None
            tags = pacs.instance_tags(instance_id)
            assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.7"
            assert tags["StudyInstanceUID"] == str(dcmread(files[0]).StudyInstanceUID)
            assert len(pacs.instances()) == 7

            status = node.cli_json("status")
            assert status["running"] is True
            assert status["destinations"]["pacs"]["deliveries"] == {"done": 1}
            assert node.cli("echo", "pacs").returncode == 0


def test_kill_9_mid_transfer_loses_nothing_acknowledged(tmp_path: Path, database_overrides: dict) -> None:
    study = tmp_path / "study"
    files = make_mr_series(study, 400, size=128)
    # The cut-off association holds the study until the quiet period: long enough that a loaded
    # machine's restart and checks below end before it, or the study would complete (and get a
    # second job) before the re-send.
    overrides = {**database_overrides, "chains": [TEST_CHAIN], "study": {"quiet_seconds": 8}}
    node = Node(tmp_path / "node", overrides).start()
    try:
        sender = subprocess.Popen(
            ["/usr/bin/storescu", "-v", "-aet", "STORESCU", "-aec", NODE_AET, LOOPBACK, str(node.port), *map(str, files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        )
        wait_for(lambda: len(node.rows(Instance)) >= 40, timeout=60, interval=0.05, what="first instances stored")
        node.kill()
        output, _ = sender.communicate(timeout=60)
        acknowledged = _acknowledged_files(output)
        # 40 rows were committed when the kill came; the last one or two may have been answered
        # too late for storescu to read the response, so they count as not acknowledged.
        assert 30 <= len(acknowledged) < len(files), "the kill must land mid-transfer"

        node.start()
        stored = {i.sop_instance_uid: i for i in node.rows(Instance)}
        for path in acknowledged:
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert uid in stored, f"acknowledged {path.name} lost"
            assert dcmread(node.workdir / "var" / "spool" / stored[uid].path).SOPInstanceUID == uid

        # The modality re-sends what failed; the study completes and is processed exactly once.
        resent = run_storescu(files, node.port, NODE_AET)
        assert resent.returncode == 0, resent.stderr
        assert len(node.rows(Instance)) == 400
        _wait_job_state(node, "done")
        time.sleep(9)  # longer than the quiet period: no second completion may appear
        jobs = node.rows(Job)
        assert [(j.chain, j.study_version, j.state) for j in jobs] == [("test-echo", 1, "done")]
    finally:
        node.kill()


def _acknowledged_files(storescu_verbose_output: str) -> list[Path]:
    """Files storescu -v reports as answered with Success."""
    acknowledged, current = [], None
    for line in storescu_verbose_output.splitlines():
        sending = re.search(r"Sending file: (.+)$", line)
        if sending:
            current = Path(sending.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.append(current)
            current = None
    return acknowledged


def test_restart_takes_over_a_job_the_killed_node_was_running(tmp_path: Path) -> None:
    """kill -9 mid-job: after the restart the job runs again at once, not after its 30 min lease."""
    files = make_mr_series(tmp_path / "study", 3, study_description="SLOW-CHAIN 8")
    overrides = {"chains": [TEST_CHAIN], "study": {"quiet_seconds": 1}, "workers": {"lease_seconds": 1800}}
    node = Node(tmp_path / "node", overrides).start()
    try:
        assert run_storescu(files, node.port, NODE_AET).returncode == 0
        _wait_job_state(node, "running")
        node.kill()
        (job,) = node.rows(Job)
        assert job.state == "running" and job.attempts == 1

        node.start()
        (job,) = _wait_job_state(node, "done", timeout=60)
        assert job.attempts == 2
        assert "took back work left claimed by the previous run" in node.log_path.read_text()
    finally:
        node.kill()


def test_restart_takes_over_a_delivery_the_killed_node_was_sending(tmp_path: Path) -> None:
    """kill -9 mid-delivery: after the restart it is sent at once, not after its claim's lease."""
    import socket

    from tests.peers import StoreSCP, free_port

    port = free_port()
    # A destination that takes the connection and never answers: the delivery stays "sending".
    black_hole = socket.create_server((LOOPBACK, port))
    overrides = {
        "peers": [{"name": "pacs", "ae_title": "STORESCP", "host": LOOPBACK, "port": port}],
        "chains": [TEST_CHAIN],
        "study": {"quiet_seconds": 1},
        "dispatch": {"network_timeout_s": 30},  # a claim lasts 30 s x (batch + 2) = 26 min
    }
    node = Node(tmp_path / "node", overrides).start()
    try:
        assert run_storescu(make_mr_series(tmp_path / "study", 3), node.port, NODE_AET).returncode == 0
        wait_for(lambda: [d for d in node.rows(Delivery) if d.state == "sending"] or None, timeout=60, what="delivery sending")
        node.kill()
        black_hole.close()
        with StoreSCP(tmp_path, port=port) as pacs:
            node.start()
            (delivery,) = wait_for(
                lambda: [d for d in node.rows(Delivery) if d.state == "done"] or None,
                timeout=60,
                what=f"delivery after the restart\n{node.output_tail()}",
            )
            assert len(pacs.received_files()) == 1
            assert delivery.attempts == 1  # the interrupted try never finished, so it is not counted
    finally:
        node.kill()
        black_hole.close()


def test_destination_down_then_up_delivers_exactly_once(tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "study", 4)
    with orthanc(tmp_path / "orthanc") as pacs:
        overrides = {
            "peers": [{"name": "pacs", "ae_title": pacs.aet, "host": LOOPBACK, "port": pacs.dicom_port}],
            "chains": [TEST_CHAIN],
            "study": {"quiet_seconds": 1},
            "dispatch": {"initial_backoff_s": 0.5, "max_backoff_s": 1.5},
        }
        with Node(tmp_path / "node", overrides) as node:
            pacs.stop()
            assert run_storescu(files, node.port, NODE_AET).returncode == 0
            _wait_job_state(node, "done")
            failing = wait_for(
                lambda: [d for d in node.rows(Delivery) if d.attempts >= 2] or None,
                timeout=60,
                what="failed delivery attempts",
            )
            assert failing[0].state in ("pending", "sending")
            status = node.cli_json("status")
            assert status["destinations"]["pacs"]["last_error"]

            pacs.start()
            done = wait_for(
                lambda: [d for d in node.rows(Delivery) if d.state == "done"] or None,
                timeout=60,
                what=f"delivery after the PACS came back\n{node.output_tail()}",
            )
            attempts = done[0].attempts
            time.sleep(4)  # several sender cycles: an acknowledged object is never sent again
            deliveries = node.rows(Delivery)
            assert len(deliveries) == 1 and deliveries[0].state == "done" and deliveries[0].attempts == attempts
            assert pacs.instance_id_for(done[0].output_uid) is not None
            assert len(pacs.instances()) == 1


def test_malformed_input_gets_failure_status_and_node_keeps_serving(tmp_path: Path) -> None:
    good = make_mr_series(tmp_path / "good", 3)
    with Node(tmp_path / "node") as node:
        # Broken files dcmtk can still read and send: each gets its failure status.
        for name, path, status in (
            ("missing Study/Series UIDs", _variant(good[0], tmp_path / "missing.dcm", _drop_study_series_uids), "DataSetDoesNotMatchSOPClass"),
            ("truncated pixel data", _variant(good[0], tmp_path / "short.dcm", _truncate_pixels), "CannotUnderstand"),
        ):
            result = run_storescu([path], node.port, NODE_AET, extra_args=["-v"])
            assert f"Received Store Response (Error: {status})" in result.stdout + result.stderr, f"{name}:\n{result.stderr}"
            assert run_echoscu(node.port, NODE_AET).returncode == 0, f"node stopped answering after {name}"

        # storescu refuses to read a file cut mid-element, random bytes or an unknown VR code,
        # so those go out raw (undecoded) through pynetdicom's chunked sender, on one association.
        raw = {
            "cut mid-element": _cut(_variant(good[0], tmp_path / "cut.dcm"), 3000),
            "random bytes": _random_dataset(_variant(good[0], tmp_path / "random.dcm")),
            "bad VR code": _bad_vr(_variant(good[0], tmp_path / "badvr.dcm")),
        }
        statuses = _send_raw(node.port, list(raw.values()))
        assert statuses == [0xC210, 0xC210, 0xC210], dict(zip(raw, map(hex, statuses), strict=True))

        assert run_storescu(good, node.port, NODE_AET).returncode == 0
        assert len(node.rows(Instance)) == 3
        assert node.cli_json("status")["counters"]["instances_rejected"] == 5


def test_binary_value_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    """Repetition Time re-labelled FD (8-byte floats) with 5 bytes: its value cannot be decoded."""
    good = make_mr_series(tmp_path / "good", 1)
    data = good[0].read_bytes()
    at = data.index(b"\x18\x00\x80\x00DS")
    length = int.from_bytes(data[at + 6 : at + 8], "little")
    bad = tmp_path / "bad-length.dcm"
    bad.write_bytes(data[: at + 4] + b"FD\x05\x0012345" + data[at + 8 + length :])
    with Node(tmp_path / "node") as node:
        assert _send_raw(node.port, [bad, good[0]]) == [0xC210, 0x0000]
        assert [i.sop_instance_uid for i in node.rows(Instance)] == [str(dcmread(good[0]).SOPInstanceUID)]


def _variant(template: Path, target: Path, change=lambda ds: None) -> Path:
    from pydicom.uid import generate_uid

    ds = dcmread(template)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    change(ds)
    ds.save_as(target, enforce_file_format=True)
    return target


def _drop_study_series_uids(ds) -> None:
    del ds.StudyInstanceUID
    del ds.SeriesInstanceUID


def _truncate_pixels(ds) -> None:
    ds.PixelData = ds.PixelData[:2000]


def _cut(path: Path, bytes_removed: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:-bytes_removed])
    return path


def _random_dataset(path: Path) -> Path:
    """A valid file meta header followed by random bytes where the dataset should be."""
    import io
    import os

    from pydicom.filewriter import write_file_meta_info

    buffer = io.BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, dcmread(path).file_meta)
    path.write_bytes(buffer.getvalue() + os.urandom(5000))
    return path


def _bad_vr(path: Path) -> Path:
    """Series Number (0020,0011) re-labelled with the VR code 'Q!' in explicit VR."""
    data = path.read_bytes()
    at = data.index(b"\x20\x00\x11\x00IS")
    path.write_bytes(data[: at + 4] + b"Q!" + data[at + 6 :])
    return path


def _send_raw(port: int, paths: list[Path]) -> list[int]:
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        ae = AE("STORESCU")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(LOOPBACK, port, ae_title=NODE_AET)
        assert assoc.is_established
        statuses = [assoc.send_c_store(path).Status for path in paths]
        assert assoc.is_established, "the association must carry on after failures"
        assoc.release()
        return statuses
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def test_compressed_transfer_syntaxes_are_stored_as_received_and_decodable(tmp_path: Path) -> None:
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    files = make_mr_series(tmp_path / "plain", 3)
    # storescu proposes the compressed syntax first only when told to, one option per syntax.
    propose = {RLELossless: "-xr", JPEGLSLossless: "-xt", JPEG2000Lossless: "-xv"}
    compressed = []
    for path, syntax in zip(files, propose, strict=True):
        ds = dcmread(path)
        ds.compress(syntax)
        target = tmp_path / f"{syntax.name.replace(' ', '_')}.dcm"
        ds.save_as(target, enforce_file_format=True)
        compressed.append((target, syntax))
    with Node(tmp_path / "node", {"chains": [TEST_CHAIN], "study": {"quiet_seconds": 1}}) as node:
        for path, syntax in compressed:
            sent = run_storescu([path], node.port, NODE_AET, extra_args=[propose[syntax]])
            assert sent.returncode == 0, f"{syntax.name}: {sent.stderr}"
        stored = {i.sop_instance_uid: i for i in node.rows(Instance)}
        for (path, syntax), original in zip(compressed, files, strict=True):
            instance = stored[str(dcmread(path).SOPInstanceUID)]
            assert instance.transfer_syntax_uid == syntax
            spooled = dcmread(node.workdir / "var" / "spool" / instance.path)
            assert (spooled.pixel_array == dcmread(original).pixel_array).all()
        # The test chain decodes the compressed middle slice (pylibjpeg plug-ins) and produces its output.
        assert _wait_job_state(node, "done")[0].chain == "test-echo"
