"""The shared training harness (pipeline.training) and evaluation report (pipeline.evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.evaluation import CaseResult, OutputSpec, compare_reports, evaluation_report, subgroup_metrics, write_evaluation
from pipeline.training import fit, write_training_report

REPO = Path(__file__).resolve().parent.parent


def _scripted_fit(losses: list[float], **options: object) -> tuple[nn.Linear, object]:
    """A one-weight model whose weight is set to the epoch number; validation returns the scripted loss."""
    model = nn.Linear(1, 1, bias=False)
    seen: list[int] = []

    def train_epoch(epoch: int) -> dict[str, float]:
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        seen.append(epoch)
        return {"train_loss": 1.0}

    result = fit(model, len(losses), train_epoch, lambda: {"validation_loss": losses[len(seen) - 1]}, **options)  # type: ignore[arg-type]
    return model, result


def test_fit_restores_the_best_epoch() -> None:
    model, result = _scripted_fit([0.9, 0.3, 0.5, 0.4])
    assert result.selected_epoch == 2 and result.selected_value == pytest.approx(0.3)
    assert model.weight.item() == 2.0, "the weights of the selected epoch are restored"
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4] and not result.stopped_early


def test_fit_stops_early_and_can_keep_the_last_epoch() -> None:
    model, result = _scripted_fit([0.5, 0.6, 0.7, 0.8, 0.9], patience=2)
    assert result.stopped_early and len(result.history) == 3 and model.weight.item() == 1.0
    model, result = _scripted_fit([0.5, 0.6, 0.7], selection="last")
    assert result.selected_epoch == 3 and model.weight.item() == 3.0
    _, result = _scripted_fit([0.5, 0.6], mode="max", monitor="validation_loss")
    assert result.selected_epoch == 2


def test_training_report_has_one_schema(tmp_path: Path) -> None:
    _, result = _scripted_fit([0.5])
    path = write_training_report(
        tmp_path, chain="x", seed=1, seconds=2.0, parameters=1, phases=[result],
        split={"training": ["A"], "validation": ["B"]}, recipe={"lr": 1e-3},
    )
    report = json.loads(path.read_text())
    assert report["schema"] == "sijnode-training/1" and report["phases"]["training"]["selected_epoch"] == 1
    assert report["split"] == {"training": ["A"], "validation": ["B"]}


def _cases() -> list[CaseResult]:
    rows = [("P1", 0.9, 1, ("active only",)), ("P2", 0.4, 1, ("active only",)), ("N1", 0.7, 0, ("structural only", "joint-space widening")),
            ("N2", 0.1, 0, ("healthy",)), ("N3", None, 0, ("healthy",))]
    return [CaseResult(study, {"out": p, "out (variant)": p}, {"out": label}, groups, error=None if p is not None else "no joints")
            for study, p, label, groups in rows]


def test_subgroups_count_sensitivity_and_specificity_at_the_threshold() -> None:
    table = subgroup_metrics(_cases(), OutputSpec("out", 0.5))
    assert table["all"] == {"studies": 5, "positives": 2, "called_positive": 2, "sensitivity": 0.5, "specificity": pytest.approx(2 / 3, abs=1e-4)}
    assert table["structural only"]["specificity"] == 0.0 and table["structural only"]["sensitivity"] is None
    assert table["healthy"]["specificity"] == 1.0, "a study not analysed is a negative call"


def test_report_schema_round_trips_and_compare_finds_changes(tmp_path: Path) -> None:
    outputs = [OutputSpec("out", 0.5), OutputSpec("out (variant)", 0.5, label="out")]
    cases = _cases()
    report = evaluation_report(cases, outputs, pack={"name": "p"}, data={"studies": 5}, seconds=0.0, n_bootstrap=50)
    paths = write_evaluation(tmp_path, report, cases, outputs, title="t")
    again = json.loads(paths["report"].read_text())
    assert again["cases"][0]["outputs"]["out"] == {"probability": 0.9, "label": 1}
    assert again["not_analysed"] == [{"study": "N3", "error": "no joints"}]
    assert "| structural only | 1 | 0 | 1 | – | 0.00 |" in paths["markdown"].read_text()
    assert compare_reports(again, report) == []
    cases[1].probabilities["out"] = 0.6
    changed = evaluation_report(cases, outputs, pack={"name": "p"}, data={"studies": 5}, seconds=0.0, n_bootstrap=50)
    problems = compare_reports(report, changed)
    assert "P2 out: probability 0.4 → 0.6" in problems and any("decision changed" in p for p in problems)


def test_cache_is_refused_in_words_by_a_chain_without_one(tmp_path: Path) -> None:
    from pipeline.training import TrainingUsageError, train_chain

    with pytest.raises(TrainingUsageError, match="xr-anatomy keeps no preprocessing cache"):
        train_chain("xr-anatomy", tmp_path, tmp_path / "pack", cache=tmp_path / "cache")


def test_base_and_retrain_are_refused_in_words_where_they_cannot_apply(tmp_path: Path) -> None:
    """``sijnode train --base/--retrain``: every misuse is a usage error (exit 2) with a sentence, before any training."""
    from node.cli import main
    from pipeline.training import TrainingUsageError, train_chain

    quadrants = REPO / "packs" / "t1stir-quadrants-demo"
    with pytest.raises(TrainingUsageError, match="--retrain needs --base"):
        train_chain("t1stir-quadrants", tmp_path, tmp_path / "pack", retrain=["classifier"])
    with pytest.raises(TrainingUsageError, match="xr-anatomy does not train from a base pack"):
        train_chain("xr-anatomy", tmp_path, tmp_path / "pack", base=quadrants)
    with pytest.raises(TrainingUsageError, match="is for chain 't1stir-quadrants', not 't1stir-3d'"):
        train_chain("t1stir-3d", tmp_path, tmp_path / "pack", base=quadrants)
    with pytest.raises(TrainingUsageError, match="no part denoiser to train again: choose from contouring, classifier"):
        train_chain("t1stir-quadrants", tmp_path, tmp_path / "pack", base=quadrants, retrain=["denoiser"])
    with pytest.raises(TrainingUsageError, match="t1stir-3d has no part bogus to train again: choose from .*structural_lesions"):
        train_chain("t1stir-3d", tmp_path, tmp_path / "pack", base=REPO / "packs" / "t1stir-3d-demo", retrain=["bogus"])
    # a trainer that takes a base pack but names no parts trains it again as a whole
    from pipeline.training import _base_arguments

    def whole_only(data: Path, out: Path, *, base: object = None) -> None: ...

    with pytest.raises(TrainingUsageError, match="t1stir-quadrants trains from a base pack only as a whole: leave out --retrain"):
        _base_arguments(whole_only, "t1stir-quadrants", quadrants, ["classifier"])
    assert set(_base_arguments(whole_only, "t1stir-quadrants", quadrants, None)) == {"base"}
    args = ["train", "t1stir-quadrants", "--data", str(tmp_path), "--out", str(tmp_path / "pack"), "--base", str(quadrants), "--retrain", "nothing"]
    assert main(args) == 2
    assert not (tmp_path / "pack").exists()
