"""Simulated readers of the phantom: known confusion, the paper's consensus rules, determinism by seed."""

from __future__ import annotations

import json

import numpy as np

from pipeline.phantom import generate_study
from pipeline.phantom.readers import (
    GRADED_OUTPUTS,
    READER_CONFUSION,
    READERS,
    SESSIONS,
    confusion_arrays,
    consensus,
    read_labels,
    readers_record,
    simulate_readings,
    truth_per_joint,
)
from pipeline.phantom.seeding import rng_for

LEFT_UPPER_ILIUM_EDEMA = {
    "lesions": [
        {"type": "edema", "side": "left", "quadrant": "upper_ilium", "severity": "severe"},
        {"type": "ankylosis", "side": "right", "region": "lower"},
    ]
}


def test_readings_follow_each_readers_known_confusion_per_lesion_type():
    rng = np.random.default_rng(0)
    truth = (rng.random((40000, len(GRADED_OUTPUTS))) < 0.5).astype(np.int8)
    for reader in READERS:
        read = read_labels(truth, reader, rng_for(1, "test", reader))
        miss, false_call = confusion_arrays(reader)
        measured_miss = ((read == 0) & (truth == 1)).sum(0) / (truth == 1).sum(0)
        measured_false = ((read == 1) & (truth == 0)).sum(0) / (truth == 0).sum(0)
        np.testing.assert_allclose(measured_miss, miss, atol=0.015)
        np.testing.assert_allclose(measured_false, false_call, atol=0.015)
    # the two readers differ, and differently by lesion type (not one global noise level)
    r1, r2 = READER_CONFUSION["R1"], READER_CONFUSION["R2"]
    assert r1["edema"].miss_rate < r2["edema"].miss_rate and r1["erosion"].miss_rate > r2["erosion"].miss_rate


def test_consensus_keeps_only_unanimous_labels():
    readings = [np.array([1, 0, 1, 0]), np.array([1, 0, 0, 1]), np.array([1, 0, 1, 1])]
    np.testing.assert_array_equal(consensus(readings), [1, 0, -1, -1])
    truth = np.zeros((500, len(GRADED_OUTPUTS)), dtype=np.int8)
    truth[::3] = 1
    labels = simulate_readings(truth, {(r, s): rng_for(5, r, s) for r in READERS for s in SESSIONS})
    assert set(labels) == {"R1S1", "R1S2", "R1S3", "R2S1", "R2S2", "R2S3", "R1", "R2", "R1R2"}
    for reader in READERS:
        sessions = np.stack([labels[reader + s] for s in SESSIONS])
        used = labels[reader] >= 0
        assert np.all(sessions[:, used] == labels[reader][used])
        assert np.all(np.any(sessions[:, ~used] != sessions[0, ~used], axis=0))
    inter = labels["R1R2"]
    assert np.all((inter < 0) | ((inter == labels["R1"]) & (inter == labels["R2"])))
    assert np.all(inter[(labels["R1"] >= 0) & (labels["R1"] == labels["R2"])] >= 0)
    # consensus labels are rarer than single readings but, where used, more often right
    assert 0.3 < (inter >= 0).mean() < 0.95
    used = inter >= 0
    assert (inter[used] == truth[used]).mean() > (labels["R1S1"] == truth).mean()


def test_truth_per_joint_puts_quadrant_lesions_in_their_quadrant_and_joint_lesions_per_joint():
    lesions = [
        {"type": "edema", "side": "left", "quadrants": ["upper_ilium"]},
        {"type": "sclerosis", "side": "right", "quadrants": ["lower_sacrum"]},
        {"type": "ankylosis", "side": "right", "quadrants": ["lower_ilium", "lower_sacrum"]},
        {"type": "widening", "side": "left", "quadrants": ["upper_ilium", "lower_ilium", "upper_sacrum", "lower_sacrum"]},
    ]
    truth = truth_per_joint(lesions)
    left, right = (dict(zip(GRADED_OUTPUTS, row)) for row in truth)
    assert [name for name, v in left.items() if v] == ["edema_upper_ilium"]
    assert [name for name, v in right.items() if v] == ["sclerosis", "ankylosis"]


def test_generated_study_carries_readers_deterministically_by_seed():
    study = generate_study(11, kinds=("mri",), lesions=LEFT_UPPER_ILIUM_EDEMA)
    record = study.ground_truth["readers"]
    json.dumps(record)  # goes into ground_truth.json as is
    assert record["truth"]["left"]["edema_upper_ilium"] == 1
    assert record["truth"]["right"]["ankylosis"] == 1
    assert sum(record["truth"]["left"].values()) == 1 and sum(record["truth"]["right"].values()) == 1
    assert set(record["labels"]) == {"R1S1", "R1S2", "R1S3", "R2S1", "R2S2", "R2S3", "R1", "R2", "R1R2"}
    assert record["confusion"]["R2"]["edema"]["miss_rate"] == READER_CONFUSION["R2"]["edema"].miss_rate
    # the readers come from their own stream: recomputing from the lesion records gives the same labels
    assert readers_record(11, study.ground_truth["lesions"]) == record
    # another seed reads the same truth differently somewhere among many studies
    assert any(
        readers_record(seed, study.ground_truth["lesions"])["labels"] != record["labels"] for seed in range(12, 20)
    )
