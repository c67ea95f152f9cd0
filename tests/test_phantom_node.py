"""Phantom studies, written by the CLI as a new user would, sent to the node with dcmtk's storescu:
every series gets the role and plane the ground truth says, for all four vendors' naming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.node_harness import NODE_AET, REPO, Node
from tests.peers import run_storescu


def _phantoms(out: Path, *args: str) -> list[Path]:
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "--json", "phantom", "--out", str(out), *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return [Path(p) for p in json.loads(result.stdout)]


def test_phantom_studies_classify_as_their_ground_truth(tmp_path: Path) -> None:
    # Seeds 0-3 rotate through Siemens, GE, Philips and Canon naming; seed 4 adds CT and a radiograph.
    studies = _phantoms(tmp_path / "mri", "--seed", "0", "--count", "4", "--kinds", "mri")
    studies += _phantoms(tmp_path / "ctxr", "--seed", "4", "--count", "1", "--kinds", "ct,xr", "--transfer-syntax", "rle")
    with Node(tmp_path / "node", {"study": {"quiet_seconds": 300, "release_grace_seconds": 300}}) as node:
        for study in studies:
            sent = run_storescu(study, node.port, NODE_AET, extra_args=["-xr", "+sp", "*.dcm"])
            assert sent.returncode == 0, sent.stderr
        seen = 0
        for study in studies:
            truth = json.loads((study / "ground_truth.json").read_text())
            completed = node.cli_json("complete", truth["study_uid"])
            assert completed["version"] == 1
            shown = {s["series_uid"]: s for s in node.cli_json("show", truth["study_uid"])["series"]}
            for series in truth["series"]:
                got = shown[series["series_uid"]]
                assert (got["role"], got["plane"], got["counts_as_input"]) == (series["role"], series["plane"], True), (
                    f"{series['description']} ({truth.get('vendor', '')}): {got['rule']}: {got['reason']}"
                )
                seen += 1
        assert seen == 4 * 3 + 2
