"""`sijnode evaluate packs/xr-anatomy-demo --data DIR --check` regenerates the committed held-out
numbers on a subset: here one held-out study, regenerated from its seed as the pack's README says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.chains.xr_anatomy.data import write_demo_phantoms
from pipeline.training import check_evaluation

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "packs" / "xr-anatomy-demo"


def test_the_committed_evaluation_is_regenerated_on_a_held_out_study(tmp_path: Path) -> None:
    write_demo_phantoms(tmp_path / "held-out", [5009])  # the study whose probability drifted (issue 14)
    assert check_evaluation(PACK, tmp_path / "held-out") == []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "--json", "evaluate", str(PACK), "--data", str(tmp_path / "held-out"), "--check"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"reproduced": True, "differences": []}


def test_a_changed_number_is_reported(tmp_path: Path) -> None:
    """The check fails when a committed probability is not what the pack gives."""
    from pipeline.evaluation import compare_reports

    committed = json.loads((PACK / "evaluation.json").read_text())
    altered = json.loads(json.dumps(committed))
    case = altered["cases"][0]
    case["outputs"]["radiographic_sacroiliitis"]["probability"] += 0.01
    problems = compare_reports(committed, {"cases": [case]}, subset=True)
    assert problems and problems[0].startswith(case["study"])
