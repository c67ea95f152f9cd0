"""Prometheus metrics and the health endpoint of a running node, scraped as Prometheus would:
during a transfer, after rejections, and while the spool or the database is unusable."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from node.metrics import health
from storage.spool import Spool
from storage.store import Store
from tests.node_harness import NODE_AET, Node, make_mr_series
from tests.peers import STORESCU, dicom_tool_env, run_storescu, wait_for


def scrape(node: Node) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(node.metrics_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def get_health(node: Node) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(node.metrics_url + "/health", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_metrics_scraped_during_a_transfer(tmp_path: Path) -> None:
    count = 300
    files = make_mr_series(tmp_path / "t1", count)
    with Node(tmp_path / "node", {"study": {"quiet_seconds": 1}}) as node:
        assert get_health(node) == (200, {"status": "ready", "checks": {"database": "ok", "spool": "ok"}})
        accepted_before = scrape(node)[("sijnode_associations_total", (("result", "accepted"),))]  # the harness's C-ECHOs
        sender = subprocess.Popen(
            [STORESCU, "-aet", "STORESCU", "-aec", NODE_AET, "127.0.0.1", str(node.port), *map(str, files)],
            env=dicom_tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        during = []
        while sender.poll() is None:
            samples = scrape(node)
            received = samples.get(("sijnode_instances_received_total", (("status", "0x0000"),)), 0)
            during.append((samples.get(("sijnode_associations_open", ()), 0), received))
        assert sender.returncode == 0
        # Caught mid-transfer: the association open and the count climbing.
        assert any(open_ == 1 and 0 < received < count for open_, received in during), during[:5]
        assert [r for _, r in during] == sorted(r for _, r in during)

        def settled() -> dict | None:
            samples = scrape(node)
            # (the row commits a moment before the service counts the completion)
            done = samples.get(("sijnode_studies", (("state", "complete"),))) == 1 and samples.get(("sijnode_studies_completed_total", ())) == 1
            return samples if done else None

        samples = wait_for(settled, timeout=30, what="study complete in the metrics")
        assert samples[("sijnode_instances_received_total", (("status", "0x0000"),))] == count
        assert samples[("sijnode_associations_total", (("result", "accepted"),))] == accepted_before + 1
        assert samples[("sijnode_associations_open", ())] == 0
        assert samples[("sijnode_studies_completed_total", ())] == 1
        assert samples[("sijnode_spool_free_bytes", ())] > 0
        assert samples[("sijnode_jobs", (("state", "pending"),))] == 0  # no chain configured

        # A calling AE title not on the allowlist, and an instance the node cannot store.
        assert run_storescu(files[:1], node.port, NODE_AET, aet_calling="STRANGER").returncode != 0
        broken = tmp_path / "broken.dcm"
        dataset = dcmread(files[0])
        dataset.PixelData = dataset.PixelData[:2000]  # fewer pixel bytes than the image needs
        dataset.save_as(broken, enforce_file_format=True)
        assert run_storescu([broken], node.port, NODE_AET).returncode != 0
        samples = scrape(node)
        assert samples[("sijnode_associations_total", (("result", "rejected-calling-ae"),))] == 1
        assert samples[("sijnode_instances_received_total", (("status", "0xC210"),))] == 1
        assert samples[("sijnode_events_total", (("event", "instances_rejected"),))] == 1

        # The spool cannot take a file: not ready, with the reason; ready again once repaired.
        tmp = node.workdir / "var" / "spool" / "tmp"
        shutil.rmtree(tmp)
        tmp.write_bytes(b"")
        status, body = get_health(node)
        assert status == 503 and body["status"] == "not ready" and body["checks"]["spool"].startswith("unusable")
        tmp.unlink()
        tmp.mkdir()
        assert get_health(node)[0] == 200


def test_health_not_ready_while_the_database_is_unusable(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "var")
    damaged = tmp_path / "sijnode.db"
    damaged.write_bytes(b"this is not an SQLite database" * 100)
    store = Store(f"sqlite:///{damaged}")
    ready, checks = health(store, spool)
    assert not ready and checks["database"].startswith("unusable") and checks["spool"] == "ok"
    working = Store(f"sqlite:///{tmp_path / 'ok.db'}")
    assert health(working, spool) == (True, {"database": "ok", "spool": "ok"})
