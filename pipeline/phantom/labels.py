"""Study-level labels derived from the lesions, with the rules written out.

* **modified New York grade** per side (radiographic, from the lesions a radiograph shows):

  - 4: total ankylosis (ankylosis of the whole joint);
  - 3: partial ankylosis, joint-space narrowing or widening, or three or more
    (non-mild) erosions / sclerosis lesions;
  - 2: one or two (non-mild) erosions / sclerosis lesions, joint width normal;
  - 1: only mild erosions / sclerosis ("suspicious changes");
  - 0: none of these.

* **radiographic sacroiliitis** (mNY criterion): grade >= 2 on both sides or >= 3 on one.
* **active inflammation**: any bone marrow edema.
* **ASAS-positive MRI**: on the semicoronal STIR series, one edema lesion on >= 2
  consecutive slices, or >= 2 edema lesions on one slice (a lesion counts on a slice
  when it covers at least ``LESION_MIN_AREA_MM2`` there).
* **structural change**: any erosion, sclerosis, fat lesion, ankylosis, narrowing or widening.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Protocol

from .lesions import QUADRANTS, SIDES, STRUCTURAL_TYPES

LESION_MIN_AREA_MM2 = 4.0


class _LesionLike(Protocol):
    type: str
    side: str
    region: str
    severity: str


def mny_grade_for_side(lesions: Iterable[_LesionLike], side: str) -> int:
    """Modified New York grade (0-4) of one side, by the rules in the module docstring."""
    here = [lesion for lesion in lesions if lesion.side == side]
    ankylosis = [lesion for lesion in here if lesion.type == "ankylosis"]
    if any(lesion.region == "whole" for lesion in ankylosis):
        return 4
    if ankylosis or any(lesion.type in ("narrowing", "widening") for lesion in here):
        return 3
    focal = [lesion for lesion in here if lesion.type in ("erosion", "sclerosis")]
    if not focal:
        return 0
    definite = [lesion for lesion in focal if lesion.severity != "mild"]
    if not definite:
        return 1
    return 3 if len(definite) >= 3 else 2


def radiographic_sacroiliitis(grades: dict[str, int]) -> bool:
    """mNY radiological criterion: bilateral grade >= 2 or unilateral grade >= 3."""
    return (grades["left"] >= 2 and grades["right"] >= 2) or max(grades.values()) >= 3


def asas_positive(edema_slices: Sequence[Sequence[int]]) -> bool:
    """ASAS MRI definition from the STIR slice indices each edema lesion is visible on."""
    for slices in edema_slices:
        ordered = sorted(set(slices))
        if any(b - a == 1 for a, b in pairwise(ordered)):
            return True
    counts: dict[int, int] = {}
    for slices in edema_slices:
        for index in set(slices):
            counts[index] = counts.get(index, 0) + 1
    return any(count >= 2 for count in counts.values())


def quadrant_findings(lesions: Iterable[dict]) -> dict[str, dict[str, list[str]]]:
    """Per side and quadrant, the sorted lesion types found there (joint lesions count in each quadrant they span)."""
    findings = {side: {quadrant: set() for quadrant in QUADRANTS} for side in SIDES}
    for lesion in lesions:
        for quadrant in lesion["quadrants"]:
            findings[lesion["side"]][quadrant].add(lesion["type"])
    return {side: {q: sorted(types) for q, types in quads.items()} for side, quads in findings.items()}


def derive_labels(lesions: Sequence[dict], edema_stir_slices: Sequence[Sequence[int]]) -> dict:
    """All study labels from the ground-truth lesion records."""

    class _View:
        def __init__(self, record: dict) -> None:
            self.type = record["type"]
            self.side = record["side"]
            self.region = record["region"]
            self.severity = record["severity"]

    views = [_View(record) for record in lesions]
    grades = {side: mny_grade_for_side(views, side) for side in SIDES}
    return {
        "active_inflammation": any(record["type"] == "edema" for record in lesions),
        "asas_mri_positive": asas_positive(edema_stir_slices),
        "structural_change": any(record["type"] in STRUCTURAL_TYPES for record in lesions),
        "mny_grade": grades,
        "radiographic_sacroiliitis": radiographic_sacroiliitis(grades),
        "healthy": not lesions,
    }
