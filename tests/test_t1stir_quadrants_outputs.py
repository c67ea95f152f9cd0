"""t1stir-quadrants outputs through the shared encoders: joint contours as SR SCOORD polylines, checked by dcmtk and PixelMed.

A result shaped as the chain makes it (per-quadrant and per-side findings, the traced joint lines
of a key slice) is encoded by the node's SR writer; dsrdump must show one POLYLINE per contour on
its source image with the joint's side, and PixelMed's TID 1500 validator must report neither a
warning nor an error.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.encode import encode_result
from pipeline.encode.codes import concept
from pipeline.results import ChainResult, Contour, Finding, ImageRef, Laterality, NotAnalysed, NotAnalysedReason, Region, Site
from tests.encode_fixtures import demo_provenance, mr_series
from tests.test_encode import DSRDUMP, needs_dcmtk, pixelmed_sr_validator
from tests.test_radiologist import warnings_and_errors


def quadrant_result() -> ChainResult:
    sources = mr_series(slices=3, rows=64, columns=64)
    key = ImageRef.of(sources[1])
    findings = []
    for site in (Site.ILIUM, Site.SACRUM):
        for side in Laterality:
            for region in Region:
                present = site is Site.ILIUM and side is Laterality.LEFT and region is Region.UPPER
                findings.append(
                    Finding.per_quadrant(concept("bone marrow edema"), site, side, region, 0.9 if present else 0.1, 0.5, evidence=(key,))
                )
    for side in Laterality:
        findings.append(Finding.per_side(concept("ankylosis"), Site.SACROILIAC_JOINT, side, 0.05, 0.5, evidence=(key,)))
    line = np.stack([np.linspace(10, 50, 9), np.linspace(40, 44, 9)], axis=1)  # (row, col) pixel centres
    contours = [
        Contour(key, line, Site.SACROILIAC_JOINT, "T1 joint line traced by the contouring network", Laterality.LEFT, 40.2),
        Contour(key, line * [1, 0] + [0, 20], Site.SACROILIAC_JOINT, "T1 joint line traced by the contouring network", Laterality.RIGHT, 40.0),
    ]
    return ChainResult(findings=findings, provenance=demo_provenance(), sources=sources, contours=contours)


def test_a_contour_needs_two_points_and_a_not_analysed_result_has_none() -> None:
    result = quadrant_result()
    with pytest.raises(ValueError, match="two finite"):
        Contour(result.contours[0].source, np.zeros((1, 2)), Site.SACROILIAC_JOINT, "x")
    with pytest.raises(ValueError, match="contours"):
        ChainResult(
            findings=(), provenance=result.provenance, sources=result.sources, contours=result.contours,
            not_analysed=NotAnalysed(NotAnalysedReason.INPUT_UNUSABLE, "joints not found"),
        )


@needs_dcmtk
def test_contours_are_scoord_polylines_on_their_source_image_and_pixelmed_finds_nothing(tmp_path: Path) -> None:
    result = quadrant_result()
    sr = encode_result(result)[0]
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    dump = subprocess.run([DSRDUMP, "+Pt", "+Pu", "+Pl", str(path)], capture_output=True, text=True, timeout=60, check=True).stdout
    polylines = [line for line in dump.splitlines() if "SCOORD" in line and "POLYLINE" in line]
    assert len(polylines) == 2, dump
    key_uid = result.contours[0].source.sop_instance_uid
    assert dump.count(key_uid) >= 2  # each polyline's IMAGE reference
    # first point of the left contour: (row 10, col 40) centre -> DICOM (column, row) = (40.5, 10.5)
    assert "40.5/10.5" in dump
    assert "Sacroiliac joint line contour" in dump and "Left" in dump and "Right" in dump
    assert "Contours (SCOORD polylines in this report): left sacroiliac joint: T1 joint line traced" in dump
    assert "PRESENT: probability 0.90 of edema (present at >= 0.50); left ilium, upper" in dump
    report = pixelmed_sr_validator([path], tmp_path)[path]
    assert warnings_and_errors(report) == [], report
