"""Model packs (manifest + sha256-checked safetensors) and the shared evaluation metrics."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.evaluation import (
    auc,
    evaluate_binary,
    plot_roc,
    roc_curve,
    threshold_metrics,
)
from pipeline.packs import (
    HELD_OUT,
    PackError,
    load_pack,
    sha256_of,
    update_evaluation,
    write_pack,
)
from tests.node_harness import REPO

MANIFEST = {
    "name": "toy-demo",
    "version": "0.1.0",
    "chain": "toy",
    "demo": True,
    "architecture": {"name": "linear", "hyperparameters": {"features": 3}},
    "preprocessing": {},
    "outputs": [{"name": "p", "concept": "active sacroiliitis", "threshold": 0.5}],
    "training_data": "phantoms",
    "intended_use": "tests only",
}


def _pack(folder: Path, state_dict: dict[str, torch.Tensor] | None = None):
    return write_pack(folder, MANIFEST, torch.nn.Linear(3, 1).state_dict() if state_dict is None else state_dict)


def test_written_pack_loads_and_verifies(tmp_path: Path) -> None:
    written = torch.nn.Linear(3, 1).state_dict()
    pack = _pack(tmp_path / "pack", written)
    loaded = load_pack(tmp_path / "pack", chain="toy")
    assert loaded.manifest.weights.sha256 == pack.manifest.weights.sha256
    assert loaded.manifest.weights.sha256 == sha256_of(loaded.weights_path)
    state = loaded.load_state_dict()
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (1, 3)
    assert all(torch.equal(state[name], written[name]) for name in written)
    assert loaded.manifest.output("p").threshold == 0.5


def test_update_evaluation_rewrites_the_manifest_only(tmp_path: Path) -> None:
    pack = _pack(tmp_path / "pack")
    weights = pack.weights_path.read_bytes()
    updated = update_evaluation(pack, HELD_OUT, {"studies": 4, "auc": 0.75})
    assert load_pack(pack.folder).manifest.evaluation == {HELD_OUT: {"studies": 4, "auc": 0.75}}
    assert updated.manifest.weights.sha256 == pack.manifest.weights.sha256
    assert pack.weights_path.read_bytes() == weights
    update_evaluation(updated, "validation", {"n": 2})  # other keys are kept
    assert set(load_pack(pack.folder).manifest.evaluation) == {HELD_OUT, "validation"}


def test_tampered_missing_or_foreign_pack_is_a_clear_error(tmp_path: Path) -> None:
    pack = _pack(tmp_path / "pack")
    with pytest.raises(PackError, match="for chain 'toy', not 'other'"):
        load_pack(pack.folder, chain="other")
    data = bytearray(pack.weights_path.read_bytes())
    data[-1] ^= 0xFF
    pack.weights_path.write_bytes(bytes(data))
    with pytest.raises(PackError, match="does not match the manifest"):
        load_pack(pack.folder).load_state_dict()
    pack.weights_path.unlink()
    with pytest.raises(PackError, match="is missing"):
        load_pack(pack.folder).verify()
    with pytest.raises(PackError, match="manifest.yaml is missing"):
        load_pack(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.yaml").write_text(yaml.safe_dump({**MANIFEST, "demo": "perhaps"}))
    with pytest.raises(PackError, match="invalid manifest"):
        load_pack(tmp_path / "bad")


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(config), *args],
        cwd=REPO, capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )


def test_cli_lists_verifies_and_refuses_to_serve_with_a_bad_pack(tmp_path: Path) -> None:
    pack = _pack(tmp_path / "pack")
    config = tmp_path / "config.yaml"
    chain = {"name": "toy", "implementation": "tests.chains:EchoChain", "pack": str(pack.folder), "requires": [{"role": "T1"}]}
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "var")}, "chains": [chain]}))
    listed = _cli(config, "packs", "list")
    assert listed.returncode == 0 and "toy-demo" in listed.stdout and "DEMONSTRATION" in listed.stdout
    assert _cli(config, "packs", "verify").returncode == 0

    pack.weights_path.write_bytes(pack.weights_path.read_bytes() + b"\0")
    verified = _cli(config, "packs", "verify")
    # exit 2: an unusable pack is invalid configuration (README, "Exit codes")
    assert verified.returncode == 2 and "does not match" in verified.stderr
    served = _cli(config, "serve")
    assert served.returncode == 2 and "chains[toy].pack" in served.stderr and "does not match" in served.stderr
    assert _cli(config, "config", "check").returncode == 2


def test_metrics_match_hand_computed_values(tmp_path: Path) -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.4, 0.7, 0.35, 0.8, 0.9])
    # Pairs (positive, negative) ranked correctly: 7 of 9.
    assert auc(labels, scores) == pytest.approx(7 / 9)
    metrics = threshold_metrics(labels, scores, 0.5)
    assert metrics["sensitivity"] == pytest.approx(2 / 3) and metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    estimates = evaluate_binary(labels, scores, 0.5, n_bootstrap=300)
    assert estimates["auc"].low <= estimates["auc"].value <= estimates["auc"].high
    png = plot_roc({"toy": (labels, scores)}, tmp_path / "roc.png", "toy")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
