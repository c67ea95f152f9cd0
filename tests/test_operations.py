"""What an admin does and sees: the CLI, re-opened studies, duplicates, full disks, failing
chains, TLS, config validation and the systemd unit. Real node process, real dcmtk peers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from tests.node_harness import NODE_AET, REPO, TEST_CHAIN, Node, make_mr_series
from tests.peers import LOOPBACK, run_echoscu, run_storescu, wait_for


def _jobs(node: Node) -> list[dict]:
    return node.cli_json("jobs")


def test_cli_reports_studies_jobs_and_explains_series(tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "t1", 5)
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    overrides = {"chains": [TEST_CHAIN], "study": {"quiet_seconds": 300, "release_grace_seconds": 300}}
    with Node(tmp_path / "node", overrides) as node:
        assert run_storescu(files, node.port, NODE_AET).returncode == 0
        assert node.cli_json("studies")[0]["state"] == "receiving"

        # complete: no waiting for the 300 s quiet period.
        completed = node.cli_json("complete", study_uid)
        assert completed["version"] == 1 and [job["chain"] for job in completed["jobs"]] == ["test-echo"]
        wait_for(lambda: [j for j in _jobs(node) if j["state"] == "done"], timeout=60, what="job done")

        shown = node.cli_json("show", study_uid)
        assert shown["study"]["state"] == "complete"
        assert shown["series"][0]["role"] == "T1" and shown["series"][0]["plane"] == "coronal"
        assert len(shown["outputs"]) == 1

        explained = node.cli_json("explain", series_uid)
        assert explained["current_rules"]["role"] == "T1"
        assert explained["current_rules"]["rule"] == explained["at_completion"]["rule"]
        text = node.cli("explain", series_uid).stdout
        assert "T1" in text and "rule:" in text and "why:" in text
        tried = node.cli_json("explain", series_uid, "--verbose")["rules_tried"]
        assert tried[-1].startswith("= T1 coronal by ") and any(line.startswith("✓ ") for line in tried)
        assert "Rules tried" in node.cli("explain", series_uid, "--verbose").stdout

        # reprocess: the same study again, as version 2.
        assert node.cli_json("reprocess", study_uid)["version"] == 2
        wait_for(lambda: len([j for j in _jobs(node) if j["state"] == "done"]) == 2, timeout=60, what="second job done")
        assert sorted(j["study_version"] for j in _jobs(node)) == [1, 2]

        status = node.cli_json("status")
        assert status["running"] and status["jobs"] == {"done": 2}
        assert status["spool"]["free_bytes"] > 0
        table = node.cli("status").stdout
        assert "running" in table and "Jobs" in table

        assert node.cli("show", "1.2.3.4", check=False).returncode == 1
        assert node.cli("explain", "1.2.3.4", check=False).returncode == 1
    # The CLI reads the database: it works with the service stopped, and says so.
    status = node.cli_json("status")
    assert status["running"] is False and status["jobs"] == {"done": 2}
    assert "not running" in node.cli("status").stdout


def test_late_instances_reopen_the_study_as_a_new_version(tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "t1", 6)
    overrides = {"chains": [TEST_CHAIN], "study": {"quiet_seconds": 1}}
    with Node(tmp_path / "node", overrides) as node:
        assert run_storescu(files[:4], node.port, NODE_AET).returncode == 0
        wait_for(lambda: [j for j in _jobs(node) if j["state"] == "done"], timeout=60, what="first job")
        assert run_storescu(files[4:], node.port, NODE_AET).returncode == 0
        jobs = wait_for(lambda: (j := _jobs(node)) and len([x for x in j if x["state"] == "done"]) == 2 and j, timeout=60, what="second version")
        assert sorted(j["study_version"] for j in jobs) == [1, 2]
        assert node.cli_json("studies")[0]["instance_count"] == 6


def test_late_instances_ignored_when_configured(tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "t1", 4)
    overrides = {"chains": [TEST_CHAIN], "study": {"quiet_seconds": 1, "late_instances": "ignore"}}
    with Node(tmp_path / "node", overrides) as node:
        assert run_storescu(files[:3], node.port, NODE_AET).returncode == 0
        wait_for(lambda: [j for j in _jobs(node) if j["state"] == "done"], timeout=60, what="job")
        assert run_storescu(files[3:], node.port, NODE_AET).returncode == 0
        time.sleep(3)
        assert [j["study_version"] for j in _jobs(node)] == [1]
        status = node.cli_json("status")
        assert status["counters"]["instances_late_ignored"] == 1
        # Kept, not lost: the late instance is stored.
        assert node.cli_json("studies")[0]["instance_count"] == 4


@pytest.mark.parametrize("policy", ["keep-first", "replace"])
def test_duplicates_are_idempotent(tmp_path: Path, policy: str) -> None:
    files = make_mr_series(tmp_path / "t1", 3)
    changed = tmp_path / "changed.dcm"
    ds = dcmread(files[0])
    ds.SeriesDescription = "t1_tse_cor resent"
    ds.save_as(changed, enforce_file_format=True)
    with Node(tmp_path / "node", {"storage": {"duplicates": policy}}) as node:
        assert run_storescu(files, node.port, NODE_AET).returncode == 0
        assert run_storescu([changed, files[1]], node.port, NODE_AET).returncode == 0
        instances = node.store().study_instances(str(ds.StudyInstanceUID))
        assert len(instances) == 3
        stored = next(i for i in instances if i.sop_instance_uid == str(ds.SOPInstanceUID))
        description = dcmread(node.workdir / "var" / "spool" / stored.path).SeriesDescription
        assert description == ("t1_tse_cor" if policy == "keep-first" else "t1_tse_cor resent")
        assert node.cli_json("status")["counters"]["instances_duplicate"] == 2


def test_below_free_space_reserve_answers_out_of_resources(tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "t1", 2)
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    with Node(tmp_path / "node", {"storage": {"free_space_reserve_mb": free_mb + 10_000}}) as node:
        result = run_storescu(files[:1], node.port, NODE_AET, extra_args=["-v"])
        assert "Received Store Response (Refused: OutOfResources)" in result.stdout + result.stderr, result.stderr
        assert run_echoscu(node.port, NODE_AET).returncode == 0
        assert node.cli_json("studies") == []
        assert "below the reserve" in node.cli("status").stdout


def test_spool_write_error_answers_out_of_resources_and_leaves_nothing_behind(tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "t1", 3)
    with Node(tmp_path / "node", {"study": {"quiet_seconds": 300}}) as node:
        spool = node.workdir / "var" / "spool"
        # A file where the study's folder must go: the write fails as a full or broken disk would.
        blocker = spool / "incoming" / str(dcmread(files[0]).StudyInstanceUID)
        blocker.write_bytes(b"")
        result = run_storescu(files, node.port, NODE_AET, extra_args=["-v"])
        assert "Received Store Response (Refused: OutOfResources)" in result.stdout + result.stderr, result.stderr
        assert node.cli_json("studies") == []
        assert list((spool / "tmp").iterdir()) == [], "no temporary file may be left behind"
        assert "spool write failed" in node.log_path.read_text()

        blocker.unlink()
        assert run_storescu(files, node.port, NODE_AET).returncode == 0
        assert node.cli_json("studies")[0]["instance_count"] == 3


def test_failing_chain_stays_failed_after_max_attempts_and_retry_requeues(tmp_path: Path) -> None:
    files = make_mr_series(tmp_path / "t1", 3, study_description="FAIL-CHAIN")
    overrides = {"chains": [TEST_CHAIN], "study": {"quiet_seconds": 1}, "workers": {"max_attempts": 2}}
    with Node(tmp_path / "node", overrides) as node:
        assert run_storescu(files, node.port, NODE_AET).returncode == 0
        failed = wait_for(lambda: [j for j in _jobs(node) if j["state"] == "failed"], timeout=60, what="job failed")
        assert failed[0]["attempts"] == 2
        assert "the test chain was asked to fail" in failed[0]["error"]
        assert "failed" in node.cli("jobs", "--state", "failed").stdout
        assert node.cli_json("retry")["jobs_requeued"] == 1
        wait_for(lambda: [j for j in _jobs(node) if j["state"] == "failed" and j["attempts"] == 2], timeout=60, what="failed again")


def test_invalid_config_names_the_key_and_exits_non_zero(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"receiver": {"port": 70000, "ae_titel": "X"}, "study": {"late_instances": "sometimes"}}))
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(config), "config", "check"],
        cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )
    assert result.returncode == 2
    assert "receiver.port" in result.stderr and "receiver.ae_titel" in result.stderr and "study.late_instances" in result.stderr
    serve = subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(config), "serve"], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert serve.returncode == 2 and "receiver.port" in serve.stderr


def test_shipped_config_is_valid() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(REPO / "config.yaml"), "--json", "config", "check"],
        cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["receiver"].startswith("SIJNODE on 0.0.0.0:11112") and summary["problems"] == []


def test_tls_echo_with_client_certificate(tmp_path: Path) -> None:
    certs = _make_certificates(tmp_path / "tls")
    overrides = {
        "receiver": {
            "tls": {"enabled": True, "certificate": str(certs["server.crt"]), "private_key": str(certs["server.key"]), "client_ca": str(certs["ca.crt"])}
        }
    }
    tls_args = ["+tls", str(certs["client.key"]), str(certs["client.crt"]), "-pem", "+cf", str(certs["ca.crt"])]
    node = Node(tmp_path / "node", overrides).start(echo_args=tls_args)
    try:
        assert run_echoscu(node.port, NODE_AET, extra_args=tls_args).returncode == 0
        # Plain DICOM to a TLS port fails, and so does TLS without a client certificate.
        assert run_echoscu(node.port, NODE_AET).returncode != 0
        assert run_echoscu(node.port, NODE_AET, extra_args=["+tla", "+cf", str(certs["ca.crt"])]).returncode != 0
    finally:
        node.stop()


def _make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server and a client certificate made with openssl."""
    folder.mkdir(parents=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=sijnode test CA")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={LOOPBACK if name == 'server' else 'modality'}")
        (folder / f"{name}.ext").write_text(f"subjectAltName=IP:{LOOPBACK}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return {p.name: p for p in folder.iterdir()}


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is installed by tests/run (Debian package systemd)"
    unit = (REPO / "systemd" / "sijnode.service").read_text()
    for key in ("User=sijnode", "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/sijnode", "PrivateTmp=yes"):
        assert key in unit
    # verify needs the ExecStart binary to exist: point it at the installed console script.
    sijnode = shutil.which("sijnode") or str(Path(sys.executable).with_name("sijnode"))
    (tmp_path / "sijnode.service").write_text(unit.replace("/opt/sijnode/venv/bin/sijnode", sijnode))
    result = subprocess.run([analyze, "verify", str(tmp_path / "sijnode.service")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sijnode.service" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_the_node_never_imports_torch() -> None:
    """Receiving, routing and dispatch run without torch; only worker processes load chains."""
    check = "import sys, node.cli, node.service, node.receiver, node.sender, node.completion, node.worker; print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
