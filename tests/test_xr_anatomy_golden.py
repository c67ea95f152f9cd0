"""xr-anatomy reproduces its committed outputs, with 1 or 2 torch threads, and tiny input
changes move neither the crop box nor the probability by more than their rounding.

Input: ``tests/data/golden/xr-SYNTH-5009-quarter.dcm``, the held-out phantom radiograph whose
probability moved from 0.096 to 0.552 between machines (issue 14), averaged 4×4 so it can be
committed. Golden outputs: ``tests/data/golden/xr-anatomy.json`` (regenerate after retraining the
demonstration pack with ``PYTHONPATH=. python3 tests/test_xr_anatomy_golden.py``).

Tolerances (the issue asks for 1e-4 on probabilities): probability ±1e-4; crop box ±1 pixel per
edge; each class's pixel count ±0.5 %; Grad-CAM ±1e-3 per pixel (maps are in [0, 1]).
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

from pipeline.chains.xr_anatomy.inference import Analysis, AnatomyAwareModel
from pipeline.chains.xr_anatomy.joints import ilium_classes, joint_regions, trimmed
from pipeline.chains.xr_anatomy.preprocess import patient_left_on_image_right, radiograph_gray
from pipeline.packs import load_pack

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "packs" / "xr-anatomy-demo"
INPUT = REPO / "tests" / "data" / "golden" / "xr-SYNTH-5009-quarter.dcm"
GOLDEN = REPO / "tests" / "data" / "golden" / "xr-anatomy.json"
PROBABILITY_TOLERANCE = 1e-4
BOX_TOLERANCE_PX = 1
CLASS_COUNT_TOLERANCE = 0.005
GRADCAM_TOLERANCE = 1e-3
#: tiny perturbations: ±1e-4 on the [0, 1] grayscale (a twentieth of one of its 256 levels), and
#: ±1e-5 on the segmenter's logits (more than two CPUs' float rounding differ by)
GRAY_NOISE = 1e-4
LOGIT_NOISE = 1e-5


def _model() -> AnatomyAwareModel:
    pack = load_pack(PACK)
    pack.verify()
    return AnatomyAwareModel.from_pack(pack.manifest, pack.load_state_dict())


def summary(analysis: Analysis) -> dict[str, Any]:
    """What the golden file records of an analysis."""
    assert analysis.gradcam is not None
    return {
        "probability": round(analysis.probability, 6),
        "crop_box": analysis.crop.box.as_list(),
        "class_pixels": [int((analysis.labels == value).sum()) for value in range(4)],
        "gradcam": {
            "sum": round(float(analysis.gradcam.sum()), 3),
            "argmax": [int(v) for v in np.unravel_index(int(np.argmax(analysis.gradcam)), analysis.gradcam.shape)],
        },
    }


@pytest.fixture(scope="module")
def model() -> AnatomyAwareModel:
    return _model()


@pytest.fixture(scope="module")
def runs(model: AnatomyAwareModel) -> dict[int, Analysis]:
    dataset = dcmread(INPUT)
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = model.analyze(dataset, with_gradcam=True)
        return out
    finally:
        torch.set_num_threads(before)


def test_the_committed_input_gives_the_committed_outputs(runs: dict[int, Analysis]) -> None:
    golden = json.loads(GOLDEN.read_text())
    manifest = load_pack(PACK).manifest
    assert (golden["pack_sha256"], golden["pack_version"]) == (manifest.weights.sha256, manifest.version), "the golden file belongs to another pack: regenerate it"
    got = summary(runs[1])
    assert got["probability"] == pytest.approx(golden["probability"], abs=PROBABILITY_TOLERANCE)
    assert np.abs(np.subtract(got["crop_box"], golden["crop_box"])).max() <= BOX_TOLERANCE_PX
    np.testing.assert_allclose(got["class_pixels"], golden["class_pixels"], rtol=CLASS_COUNT_TOLERANCE)
    assert got["gradcam"]["argmax"] == golden["gradcam"]["argmax"]
    assert got["gradcam"]["sum"] == pytest.approx(golden["gradcam"]["sum"], rel=1e-3)


def test_one_and_two_threads_give_the_same_result(runs: dict[int, Analysis]) -> None:
    one, two = runs[1], runs[2]
    assert abs(one.probability - two.probability) <= PROBABILITY_TOLERANCE
    assert one.crop.box == two.crop.box
    assert (one.labels != two.labels).sum() <= CLASS_COUNT_TOLERANCE * one.labels.size
    assert one.gradcam is not None and two.gradcam is not None
    assert float(np.abs(one.gradcam - two.gradcam).max()) <= GRADCAM_TOLERANCE


def _analyze_perturbed(model: AnatomyAwareModel, gray: np.ndarray, logit_noise: float, seed: int) -> tuple[float, list[int]]:
    """The pipeline's steps with the segmenter's logits perturbed by ``logit_noise``."""
    from pipeline.chains.xr_anatomy.data import LEFT_ILIUM, RIGHT_ILIUM, SACRUM
    from pipeline.chains.xr_anatomy.preprocess import probabilities_to_grid

    logits = model.segment_logits(gray)
    generator = torch.Generator().manual_seed(seed)
    logits = logits + logit_noise * (2 * torch.rand(logits.shape, generator=generator) - 1)
    labels = model._to_radiograph(model._largest_components(torch.as_tensor(probabilities_to_grid(logits, gray.shape))[None]))
    crop = joint_regions(labels, ilium_classes(labels, LEFT_ILIUM, RIGHT_ILIUM, True), SACRUM, model.dilation_fraction)
    if model.otsu_trim:
        crop = trimmed(crop, gray)
    probability, _ = model.classify(gray[crop.box.slices])
    return probability, crop.box.as_list()


def test_tiny_perturbations_move_neither_the_crop_nor_the_probability(model: AnatomyAwareModel, runs: dict[int, Analysis]) -> None:
    """The drift of issue 14 came from a step that turned rounding into a jump (see the pack's
    README): here ±1e-4 on the grayscale and ±1e-5 on the logits must stay within the golden
    tolerances, three draws each."""
    assert model.segmentation.resample == "probabilities", "the demonstration pack resamples probabilities"
    dataset = dcmread(INPUT)
    assert patient_left_on_image_right(dataset)
    gray = radiograph_gray(dataset)
    reference = runs[1]
    for seed in range(3):
        noisy = np.clip(gray + np.random.default_rng(seed).uniform(-GRAY_NOISE, GRAY_NOISE, gray.shape), 0, 1).astype(np.float32)
        labels = model.segment(noisy)
        crop = joint_regions(labels, reference.classes, 1, model.dilation_fraction)
        if model.otsu_trim:
            crop = trimmed(crop, noisy)
        assert np.abs(np.subtract(crop.box.as_list(), reference.crop.box.as_list())).max() <= BOX_TOLERANCE_PX
        probability, box = _analyze_perturbed(model, gray, LOGIT_NOISE, seed)
        assert np.abs(np.subtract(box, reference.crop.box.as_list())).max() <= BOX_TOLERANCE_PX
        assert abs(probability - reference.probability) <= PROBABILITY_TOLERANCE * 10, "a one-pixel box change"


if __name__ == "__main__":  # regenerate the golden file for the current pack
    torch.set_num_threads(1)
    result = summary(_model().analyze(dcmread(INPUT), with_gradcam=True))
    GOLDEN.write_text(json.dumps({"pack_sha256": load_pack(PACK).manifest.weights.sha256, "pack_version": load_pack(PACK).manifest.version, **result}, indent=2) + "\n")
    print(json.dumps(result), file=sys.stderr)
