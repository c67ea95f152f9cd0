"""t2fs-mil reproduces its committed outputs, with 1 or 2 torch threads, and tiny input changes
move the probability by no more than rounding.

Input: ``tests/data/golden/t2fs-SYNTH-5000-*.dcm``, the 16 middle slices of a held-out phantom's
axial T2FS series (committed, RLE lossless). Golden outputs: ``tests/data/golden/t2fs-mil.json``
(regenerate after retraining the demonstration pack with
``PYTHONPATH=. python3 tests/test_t2fs_mil_golden.py``).

Tolerances: probability (with and without TTA) ±1e-4; attention weights ±1e-4 each, the most
attended slice the same.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydicom import dcmread

from pipeline.chains.t2fs_mil.inference import Prediction, load_model, predict
from pipeline.chains.t2fs_mil.preprocess import order_slices, preprocess_slices, slice_pixels
from pipeline.packs import load_pack

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "packs" / "t2fs-mil-demo"
INPUTS = sorted((REPO / "tests" / "data" / "golden").glob("t2fs-SYNTH-5000-*.dcm"))
GOLDEN = REPO / "tests" / "data" / "golden" / "t2fs-mil.json"
TOLERANCE = 1e-4
#: a tiny perturbation of the slices' values (after the modality LUT; they run to ~1000)
PIXEL_NOISE = 1e-3


def _slices() -> list[np.ndarray]:
    return [slice_pixels(ds) for ds in order_slices([dcmread(path) for path in INPUTS])]


def _predict(images: list[np.ndarray]) -> Prediction:
    pack = load_pack(PACK)
    model = load_model(pack)
    return predict(model, preprocess_slices(images, model.hyperparameters.input_size, model.recipe), tta=True)


def summary(prediction: Prediction) -> dict[str, Any]:
    return {
        "probability": round(prediction.probability, 6),
        "probability_without_tta": round(prediction.probability_original, 6),
        "attention": [round(float(v), 6) for v in prediction.attention],
    }


@pytest.fixture(scope="module")
def runs() -> dict[int, Prediction]:
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = _predict(_slices())
        return out
    finally:
        torch.set_num_threads(before)


def test_the_committed_input_gives_the_committed_outputs(runs: dict[int, Prediction]) -> None:
    assert len(INPUTS) == 16
    golden = json.loads(GOLDEN.read_text())
    manifest = load_pack(PACK).manifest
    assert (golden["pack_sha256"], golden["pack_version"]) == (manifest.weights.sha256, manifest.version), "regenerate the golden file"
    got = summary(runs[1])
    assert got["probability"] == pytest.approx(golden["probability"], abs=TOLERANCE)
    assert got["probability_without_tta"] == pytest.approx(golden["probability_without_tta"], abs=TOLERANCE)
    np.testing.assert_allclose(got["attention"], golden["attention"], atol=TOLERANCE)
    assert int(np.argmax(got["attention"])) == int(np.argmax(golden["attention"]))


def test_one_and_two_threads_give_the_same_result(runs: dict[int, Prediction]) -> None:
    assert abs(runs[1].probability - runs[2].probability) <= TOLERANCE
    np.testing.assert_allclose(runs[1].attention, runs[2].attention, atol=TOLERANCE)


def test_tiny_perturbations_stay_within_the_tolerance(runs: dict[int, Prediction]) -> None:
    images = _slices()
    for seed in range(3):
        rng = np.random.default_rng(seed)
        noisy = [(image + rng.uniform(-PIXEL_NOISE, PIXEL_NOISE, image.shape)).astype(np.float32) for image in images]
        prediction = _predict(noisy)
        assert abs(prediction.probability - runs[1].probability) <= TOLERANCE * 10, f"seed {seed}: {prediction.probability} vs {runs[1].probability}"


if __name__ == "__main__":  # regenerate the golden file for the current pack
    torch.set_num_threads(1)
    manifest = load_pack(PACK).manifest
    result = summary(_predict(_slices()))
    GOLDEN.write_text(json.dumps({"pack_sha256": manifest.weights.sha256, "pack_version": manifest.version, **result}, indent=2) + "\n")
    print(json.dumps(result), file=sys.stderr)
