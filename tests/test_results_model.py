"""The result model's laterality and site rules (pipeline/results.py): what a finding may claim."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cam import evidence_map
from pipeline.encode.codes import concept
from pipeline.results import (
    Category,
    ChainResult,
    Finding,
    ImageRef,
    Laterality,
    Map,
    MapMeaning,
    NotAnalysedReason,
    Region,
    Scope,
    SideExplanation,
    Site,
)
from tests.encode_fixtures import demo_provenance, mr_series

SI = Site.SACROILIAC_JOINT


@pytest.fixture(scope="module")
def sources() -> list:
    return mr_series()


def _result(sources: list, findings: list[Finding], **kwargs: object) -> ChainResult:
    return ChainResult(findings=findings, provenance=demo_provenance(), sources=sources, **kwargs)


def test_scope_follows_what_a_finding_carries() -> None:
    sacroiliitis = concept("active sacroiliitis")
    assert Finding.patient_level(sacroiliitis, SI, 0.8, 0.5).scope is Scope.PATIENT
    assert Finding.per_side(sacroiliitis, SI, Laterality.LEFT, 0.8, 0.5).scope is Scope.SIDE
    assert Finding.per_quadrant(sacroiliitis, SI, Laterality.LEFT, Region.UPPER, 0.8, 0.5).scope is Scope.QUADRANT
    # no "bilateral": a patient-level finding has no laterality at all
    assert {side.value for side in Laterality} == {"left", "right"}
    assert "no side decided" in Finding.patient_level(sacroiliitis, SI, 0.8, 0.5).label


def test_a_quadrant_needs_a_side() -> None:
    with pytest.raises(ValueError, match="needs a side"):
        Finding(concept("erosion"), Site.ILIUM, 0.5, 0.5, None, Region.UPPER)


def test_a_lone_side_is_refused(sources: list) -> None:
    """A side attached to a patient-level output shows as a lone left (or right) finding."""
    lone = Finding.per_side(concept("active sacroiliitis"), SI, Laterality.LEFT, 0.9, 0.5)
    with pytest.raises(ValueError, match="one left and one right"):
        _result(sources, [lone])
    pair = [lone, Finding.per_side(concept("active sacroiliitis"), SI, Laterality.RIGHT, 0.1, 0.5)]
    assert len(_result(sources, pair).findings) == 2
    with pytest.raises(ValueError, match="one left and one right"):
        _result(sources, [*pair, lone])


def test_quadrants_come_as_a_complete_set(sources: list) -> None:
    edema = concept("bone marrow edema")
    three = [
        Finding.per_quadrant(edema, Site.ILIUM, side, region, 0.3, 0.5)
        for side in Laterality for region in Region
    ][:3]
    with pytest.raises(ValueError, match="all four quadrants"):
        _result(sources, three)


def test_explanations_explain_a_patient_level_finding(sources: list) -> None:
    sacroiliitis = concept("radiographic sacroiliitis")
    finding = Finding.patient_level(sacroiliitis, SI, 0.4, 0.59)
    share = concept("share of Grad-CAM in joint box")
    explained = _result(sources, [finding], explanations=[SideExplanation(sacroiliitis, Laterality.LEFT, 0.7, share)])
    assert explained.explanations[0].laterality is Laterality.LEFT
    with pytest.raises(ValueError, match="explains no patient-level finding"):
        _result(sources, [finding], explanations=[SideExplanation(concept("erosion"), Laterality.LEFT, 0.7, share)])


def test_not_analysed_is_a_result_with_a_reason(sources: list) -> None:
    result = ChainResult.not_analysed_result(demo_provenance(), sources, NotAnalysedReason.INPUT_UNUSABLE, "3 slices, 12 needed")
    assert result.not_analysed is not None and "3 slices" in result.not_analysed.text
    with pytest.raises(ValueError, match="must say why"):
        _result(sources, [])


def test_evidence_maps_are_scaled_by_the_probability(sources: list) -> None:
    """A negative study's map must not look like a positive one's: its peak is its probability."""
    ref = ImageRef.of(sources[0])
    cam = np.zeros((int(sources[0].Rows), int(sources[0].Columns)), dtype=np.float32)
    cam[5:10, 5:10] = 1.0
    finding = Finding.patient_level(concept("radiographic sacroiliitis"), SI, 0.13, 0.59)
    with pytest.raises(ValueError, match="evidence_map"):
        _result(sources, [finding], maps=[Map(ref, cam, MapMeaning.GRAD_CAM)])
    scaled = _result(sources, [finding], maps=[Map(ref, evidence_map(cam, 0.13), MapMeaning.GRAD_CAM)])
    assert float(scaled.maps[0].values.max()) == pytest.approx(0.13)


def test_categorical_maps_name_their_categories(sources: list) -> None:
    ref = ImageRef.of(sources[0])
    labels = np.zeros((int(sources[0].Rows), int(sources[0].Columns)), dtype=np.float32)
    labels[:4] = 0.5
    with pytest.raises(ValueError, match="names its categories"):
        Map(ref, labels, MapMeaning.SEGMENTATION)
    with pytest.raises(ValueError, match="outside its categories"):
        Map(ref, labels, MapMeaning.SEGMENTATION, categories=(Category(0.8, "joint"),))
    assert Map(ref, labels, MapMeaning.SEGMENTATION, categories=(Category(0.5, "bone"),)).categorical
