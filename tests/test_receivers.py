"""Several receiver processes on one port (SO_REUSEPORT), sharing the database and the spool.

The node harness runs two receiver processes in every node test (tests/node_harness.py), so the
kill -9, malformed-input, allowlist and TLS tests cover them; these tests check the sharing itself.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom import dcmread

from storage.models import AssociationStudy, Instance
from tests.node_harness import NODE_AET, REPO, Node, make_mr_series
from tests.peers import run_storescu


def test_associations_spread_over_receiver_processes_and_a_second_service_is_refused(tmp_path: Path) -> None:
    studies = [make_mr_series(tmp_path / f"study{i}", 2, series_number=i + 1) for i in range(12)]
    with Node(tmp_path / "node", {"workers": {"processes": 0}}) as node:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda files: run_storescu(files, node.port, NODE_AET), studies))
        assert all(result.returncode == 0 for result in results), [r.stderr for r in results if r.returncode]
        assert len(node.rows(Instance)) == 24
        # Each association's row names the process that took it: the kernel spread them.
        owners = {row.owner for row in node.rows(AssociationStudy)}
        assert len(owners) == 2, owners
        assert {str(dcmread(files[0]).StudyInstanceUID) for files in studies} == {row.study_uid for row in node.rows(AssociationStudy)}

        # A second service with the same port (other data) must not share the traffic.
        second = Node(tmp_path / "second", {"receiver": {"port": node.port}, "workers": {"processes": 0}})
        refused = subprocess.run(
            [sys.executable, "-m", "node.cli", "--config", str(second.config_path), "serve"],
            cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60,
        )
        assert refused.returncode != 0
        assert f"another sijnode service listens on port {node.port}" in refused.stderr + refused.stdout
