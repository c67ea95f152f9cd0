"""The admin's CLI as printed: 80-column tables with short UIDs that paste back, results in
words, uniform exit codes and JSON errors, and a SIGHUP reload that drops nothing. Real node
process, real dcmtk and pynetdicom peers."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from node.uids import SHORT_LENGTH, matching_uids, short_uid, unique_short_uids
from tests.node_harness import NODE_AET, REPO, TEST_CHAIN, Node, make_mr_series
from tests.peers import LOOPBACK, free_port, run_echoscu, run_storescu, wait_for

FULL_UID = re.compile(r"\d+(?:\.\d+){8,}")  # a whole 30+ character UID as the tests make them


def cli(config: Path, *args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    """``sijnode --config CONFIG ARGS`` in a terminal ``columns`` wide."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(config), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS=str(columns)),
    )


def assert_fits(text: str, columns: int = 80) -> None:
    for line in text.splitlines():
        assert len(line) <= columns, f"{len(line)} columns: {line!r}"


def _jobs_done(node: Node, count: int) -> bool:
    return len([j for j in node.cli_json("jobs") if j["state"] == "done"]) >= count


def test_tables_fit_80_columns_and_short_uids_paste_back(tmp_path: Path) -> None:
    # Brackets in data must print as they are (rich markup would swallow "[sz]").
    first = make_mr_series(tmp_path / "a", 3, series_description="t1_tse_cor [sz]", study_description="SIJ [b]x")
    second = make_mr_series(tmp_path / "b", 2)
    study_uid = str(dcmread(first[0]).StudyInstanceUID)
    series_uid = str(dcmread(first[0]).SeriesInstanceUID)
    closed_port = free_port()  # nothing listens: deliveries fail with "connection refused"
    overrides = {
        "chains": [TEST_CHAIN],
        "study": {"quiet_seconds": 300, "release_grace_seconds": 300},  # only `complete` completes
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": closed_port}],
    }
    with Node(tmp_path / "node", overrides) as node:
        assert run_storescu(first, node.port, NODE_AET).returncode == 0
        assert run_storescu(second, node.port, NODE_AET).returncode == 0
        config = node.config_path

        studies = cli(config, "studies")
        assert studies.returncode == 0, studies.stderr
        assert_fits(studies.stdout)
        assert not FULL_UID.search(studies.stdout), "tables show short UIDs"
        short = short_uid(study_uid)
        assert short in studies.stdout and "SIJ [b]x" in studies.stdout

        # The short form, a bare suffix and a prefix all name the study.
        assert json.loads(cli(config, "--json", "complete", short).stdout)["version"] == 1
        wait_for(lambda: _jobs_done(node, 1), timeout=90, what="job done")
        for fragment in (short, study_uid[-8:], study_uid[:-3]):
            shown = cli(config, "show", fragment)
            assert shown.returncode == 0, shown.stderr
        assert_fits(shown.stdout)
        assert "t1_tse_cor [sz]" in shown.stdout  # no markup swallowed
        assert short_uid(series_uid) in shown.stdout

        # results: each output object and where its delivery stands, in words.
        retrying = re.compile(rf"retry (in \d+s|now), \d+ tries: connection refused by {re.escape(LOOPBACK)}:{closed_port}")
        # (the delivery column wraps at 80 columns: words are matched across lines)
        results = wait_for(
            lambda: (r := cli(config, "results", short)) and retrying.search(" ".join(r.stdout.split())) and r,
            timeout=60, what="a delivery waiting to retry",
        )
        assert results.returncode == 0
        assert_fits(results.stdout)
        assert "test-echo: job 1 done" in results.stdout and "heatmap" in results.stdout
        as_json = json.loads(cli(config, "--json", "results", study_uid).stdout)
        delivery = as_json["chains"][0]["outputs"][0]["deliveries"][0]
        assert delivery["state"] in ("pending", "sending") and "connection refused" in delivery["last_error"]

        status = cli(config, "status")
        assert status.returncode == 0 and status.stdout.startswith("● running")
        assert_fits(status.stdout)
        assert re.search(r"pacs\s+PACS@127\.0\.0\.1:\d+\s+1\s+0\s+0\s+never\s+(in \d+s|now|-)", status.stdout), status.stdout
        assert f"connection refused by {LOOPBACK}:{closed_port}" in status.stdout
        for command in ("jobs", "status", "show " + short):
            assert_fits(cli(config, *command.split()).stdout)

        # --wide and --json carry the full UIDs.
        assert study_uid in cli(config, "--wide", "studies").stdout
        assert {s["study_uid"] for s in json.loads(cli(config, "studies", "--json").stdout)} == {study_uid, str(dcmread(second[0]).StudyInstanceUID)}
        assert series_uid in cli(config, "explain", short_uid(series_uid), "--json").stdout

        # Two studies share the UID root: a prefix of it is ambiguous (usage error), an unknown UID is not found.
        ambiguous = cli(config, "show", "1.2.826.0.1")
        assert ambiguous.returncode == 2 and "matches 2 study UIDs" in ambiguous.stderr
        unknown = cli(config, "show", "9.9.9")
        assert unknown.returncode == 1 and unknown.stderr == "sijnode: no study 9.9.9\n"
        as_json = cli(config, "--json", "results", "9.9.9")
        assert as_json.returncode == 1 and json.loads(as_json.stdout) == {"error": "no study 9.9.9", "exit_code": 1, "uid": "9.9.9"}


def test_exit_codes_and_one_line_errors(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    pack = tmp_path / "packs" / "missing"
    base = {
        "receiver": {"bind": LOOPBACK, "port": free_port()},
        "storage": {"data_dir": str(tmp_path / "var")},
        "metrics": {"port": free_port()},
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": 4242}],
    }
    config.write_text(yaml.safe_dump(base))

    alone = cli(config)
    assert alone.returncode == 0 and all(name in alone.stdout for name in ("results", "status", "serve", "2 invalid configuration or usage"))
    stopped = cli(config, "status")
    assert stopped.returncode == 1 and "not running" in stopped.stdout
    assert json.loads(cli(config, "status", "--json").stdout)["running"] is False
    assert cli(config, "show", "1.2.3").returncode == 1
    echo = cli(config, "echo", "nowhere")
    assert echo.returncode == 1 and echo.stderr.startswith("sijnode: no peer named nowhere")
    usage = cli(config, "show")
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "STUDY_UID" in usage.stderr
    usage_json = cli(config, "--json", "bogus")
    assert usage_json.returncode == 2 and json.loads(usage_json.stdout)["exit_code"] == 2

    # Config errors name the key, a peer by its name, and suggest the nearest valid key.
    config.write_text(yaml.safe_dump({**base, "peers": [{"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": 99999, "send_result": True}]}))
    invalid = cli(config, "config", "check")
    assert invalid.returncode == 2
    assert "peers[pacs].port: Input should be less than or equal to 65535" in invalid.stderr
    assert "peers[pacs].send_result: unknown key; did you mean send_results?" in invalid.stderr
    assert json.loads(cli(config, "--json", "studies").stdout)["problems"][-1].startswith("peers[pacs].send_result")

    # A missing pack folder: one clear line, exit 2, from every command that checks packs.
    chain = {"name": "xr-anatomy", "implementation": "pipeline.chains.xr_anatomy.chain:XRAnatomyChain", "pack": str(pack), "requires": [{"role": "XR"}]}
    config.write_text(yaml.safe_dump({**base, "chains": [chain]}))
    expected = f"chains[xr-anatomy].pack: the pack folder {pack} does not exist"
    for command in (["config", "check"], ["packs", "list"], ["packs", "verify"], ["serve"]):
        result = cli(config, *command)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert expected in result.stderr + result.stdout, (command, result.stderr)
        assert "Traceback" not in result.stderr

    # A busy port: one line, exit 2, no traceback.
    config.write_text(yaml.safe_dump(base))
    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        port = busy.getsockname()[1]
        config.write_text(yaml.safe_dump({**base, "receiver": {"bind": LOOPBACK, "port": port}}))
        serve = cli(config, "serve")
    assert serve.returncode == 2
    assert serve.stderr.strip().splitlines()[-1] == f"sijnode: cannot listen for DICOM on {LOOPBACK}:{port}: Address already in use"
    assert "Traceback" not in serve.stderr


def test_db_commands_import_nothing_heavy(tmp_path: Path) -> None:
    """What makes the CLI slow is what it imports: the database commands leave DICOM, models
    and migrations alone (timings: bench/cli_latency.py)."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "var")}}))
    subprocess.run([sys.executable, "-m", "node.cli", "--config", str(config), "studies"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True, capture_output=True)
    heavy = ("pydicom", "pynetdicom", "highdicom", "torch", "monai", "alembic", "prometheus_client", "node.service")
    for command in (["status"], ["studies"], ["jobs"], ["show", "1.2.3"], ["results"]):
        probe = (
            "import sys; from node.cli import main; code = main(sys.argv[1:]); "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules)); sys.exit(0)"
        )
        result = subprocess.run([sys.executable, "-c", probe, "--config", str(config), *command], cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert result.stdout.strip().splitlines()[-1] == "[]", (command, result.stdout, result.stderr)


def test_short_uids_stay_unique_and_resolve() -> None:
    root = "1.2.826.0.1.3680043.8.498."
    a, b, c = root + "11112222333344445555", root + "99992222333344445555", "1.2.3.4"
    short = unique_short_uids([a, b, c], [a, b, c])
    assert len(set(short.values())) == 3 and short[c] == c
    assert all(matching_uids(short[uid], [a, b, c]) == [uid] for uid in (a, b))
    assert matching_uids("…" + a[-SHORT_LENGTH:], [a, b, c]) == [a, b]  # the fixed short form is ambiguous here
    assert matching_uids(root, [a, b, c]) == sorted([a, b])


def test_results_reads_the_findings_the_sr_states(tmp_path: Path) -> None:
    from pipeline.encode import encode_sr
    from pipeline.report_reader import read_report
    from pydicom.uid import generate_uid
    from tests.encode_fixtures import chain_result

    result = chain_result()
    path = tmp_path / "sr.dcm"
    encode_sr(result, generate_uid(), 9000).save_as(path, enforce_file_format=True)
    report = read_report(path)
    assert report.demonstration is True
    assert [(f.probability, f.threshold, f.decision) for f in report.findings] == [
        (finding.probability, finding.threshold, "Present" if finding.present else "Absent") for finding in result.findings
    ]
    assert report.findings[0].finding.startswith(result.findings[0].concept.meaning)


def test_sighup_reload_keeps_the_open_association_and_the_running_job(tmp_path: Path) -> None:
    slow = make_mr_series(tmp_path / "slow", 2, study_description="SLOW-CHAIN 8")
    held = make_mr_series(tmp_path / "held", 6)
    overrides = {"chains": [TEST_CHAIN], "study": {"quiet_seconds": 1}}
    with Node(tmp_path / "node", overrides) as node:
        assert run_storescu(slow, node.port, NODE_AET).returncode == 0
        wait_for(lambda: [j for j in node.cli_json("jobs") if j["state"] == "running"], timeout=60, what="slow job running")

        # An association from STORESCU stays open across a reload that takes STORESCU off the allowlist.
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(MRImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate(LOOPBACK, node.port, ae_title=NODE_AET)
        assert assoc.is_established
        try:
            assert assoc.send_c_store(dcmread(held[0])).Status == 0x0000
            changed = yaml.safe_load(node.config_path.read_text())
            changed["receiver"]["extra_calling_ae_titles"] = ["ECHOSCU", "NEWAE"]
            changed["receiver"]["port"] = node.port + 1  # needs a restart: kept, and said so
            node.config_path.write_text(yaml.safe_dump(changed))
            os.kill(node.process.pid, signal.SIGHUP)
            # the service and then each extra receiver process (the harness runs one) apply it
            wait_for(lambda: "config reloaded in a receiver process" in node.log_path.read_text(), timeout=30, what="reload")
            for path in held[1:]:
                assert assoc.send_c_store(dcmread(path)).Status == 0x0000
        finally:
            assoc.release()
        log = node.log_path.read_text()
        assert "config reloaded: receiver.extra_calling_ae_titles; needs a restart to apply: receiver.port" in log
        assert run_echoscu(node.port, NODE_AET, aet_calling="NEWAE").returncode == 0
        assert run_storescu(held[:1], node.port, NODE_AET).returncode != 0  # STORESCU: now rejected
        assert run_echoscu(node.port, NODE_AET).returncode == 0  # the port did not change

        # An invalid file is refused; the running config stays.
        node.config_path.write_text(yaml.safe_dump({**changed, "peers": [{"name": "pacs", "ae_titel": "X"}]}))
        os.kill(node.process.pid, signal.SIGHUP)
        wait_for(lambda: "config reload refused" in node.log_path.read_text(), timeout=30, what="refused reload")
        assert "peers[pacs].ae_titel: unknown key; did you mean ae_title?" in node.log_path.read_text()
        assert run_echoscu(node.port, NODE_AET, aet_calling="NEWAE").returncode == 0
        node.config_path.write_text(yaml.safe_dump(changed))  # the CLI below reads the file too

        # Nothing dropped: the job running during the reload finished on its first attempt, and
        # the held association's study is complete with all six instances.
        jobs = wait_for(lambda: (j := node.cli_json("jobs")) and all(x["state"] == "done" for x in j) and len(j) == 2 and j, timeout=90, what="both jobs done")
        assert [job["attempts"] for job in jobs] == [1, 1]
        held_study = str(dcmread(held[0]).StudyInstanceUID)
        assert {s["study_uid"]: s["instance_count"] for s in node.cli_json("studies")}[held_study] == 6
        assert node.process.poll() is None


def test_a_study_no_chain_applies_to_gets_its_summary_and_results_show_it(tmp_path: Path) -> None:
    """No job ends for such a study, so completion itself writes the summary (issue 10): it says
    why the T1 series was not analysed, and `results` shows it under no job."""
    from pipeline.encode.sr import report_lines

    files = make_mr_series(tmp_path / "t1", 2)
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    with Node(tmp_path / "node", {"chains": [], "study": {"release_grace_seconds": 0.5}}) as node:
        assert run_storescu(files, node.port, NODE_AET).returncode == 0

        def summarised() -> dict | None:
            results = node.cli_json("results", study_uid)
            return results if any(chain["chain"] == "study summary" for chain in results["chains"]) else None

        results = wait_for(summarised, timeout=60, what=f"the study summary\n{node.output_tail()}")
        assert [chain["job"] for chain in results["chains"]] == [None]
        outputs = results["chains"][0]["outputs"]
        assert sorted(output["kind"] for output in outputs) == ["summary SR", "summary card"]
        summary_sr = next(dcmread(o["path"]) for o in outputs if o["kind"] == "summary SR")
        lines = report_lines(summary_sr)
        printed = cli(node.config_path, "results", study_uid)
    assert printed.returncode == 0, printed.stderr
    assert "study summary: no chain ran" in printed.stdout and "summary card" in printed.stdout
    assert_fits(printed.stdout)
    assert "No chain ran on this study." in lines, lines
    assert any(re.search(r"\(MR T1 coronal\): not analysed: no chain configured", line) for line in lines), lines
