"""Read the findings back out of a TID 1500 report the node wrote (pipeline/encode/sr.py).

For ``sijnode results``: the admin sees what went to PACS (finding, probability, threshold,
decision) without a DICOM viewer or dsrdump. Only pydicom, no highdicom: the CLI stays quick.
The codes are the standard DCM ones the encoder writes through highdicom.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

MEASUREMENT_GROUP = ("125007", "DCM")
TRACKING_IDENTIFIER = ("112039", "DCM")
FINDING = ("121071", "DCM")
PROBABILITY = ("122157", "DCM")
ALGORITHM_NAME = ("111001", "DCM")
ALGORITHM_VERSION = ("111003", "DCM")
ALGORITHM_PARAMETERS = ("111002", "DCM")
COMMENT = ("121106", "DCM")
THRESHOLD_PARAMETER = "operating threshold="


@dataclass(frozen=True)
class ReportedFinding:
    """One finding as the SR states it."""

    finding: str  # e.g. "Active sacroiliitis, left sacroiliac joint" (the tracking identifier)
    probability: float | None
    threshold: float | None
    decision: str | None  # the qualitative evaluation's meaning: Present / Absent
    algorithm: str | None  # pack name and version
    note: str | None = None


@dataclass(frozen=True)
class Report:
    findings: list[ReportedFinding]
    demonstration: bool
    summary: bool = False  # the study summary SR (node/summary.py): every chain's findings again


def _code(item: Any, attribute: str = "ConceptNameCodeSequence") -> tuple[str, str] | None:
    sequence = item.get(attribute)
    if not sequence:
        return None
    return (str(sequence[0].CodeValue), str(sequence[0].CodingSchemeDesignator))


def _meaning(item: Any, attribute: str) -> str | None:
    sequence = item.get(attribute)
    return str(sequence[0].CodeMeaning) if sequence else None


def _groups(items: Any) -> list[Any]:
    found = []
    for item in items or ():
        if item.get("ValueType") == "CONTAINER" and _code(item) == MEASUREMENT_GROUP:
            found.append(item)
        else:
            found += _groups(item.get("ContentSequence"))
    return found


def _finding(group: Any) -> ReportedFinding | None:
    """A finding group (has a Probability); image-score groups (attention weights) are not findings."""
    texts: dict[tuple[str, str], list[str]] = {}
    finding_code = finding_meaning = None
    probability = None
    codes: list[tuple[tuple[str, str] | None, Any]] = []
    for item in group.get("ContentSequence", ()):
        concept = _code(item)
        kind = item.get("ValueType")
        if kind == "TEXT":
            texts.setdefault(concept, []).append(str(item.TextValue))
        elif kind == "NUM" and concept == PROBABILITY:
            probability = float(item.MeasuredValueSequence[0].NumericValue)
            # The decision is a coded modifier of the probability (or, in older reports, a
            # qualitative evaluation beside it): either way a CODE named like the finding.
            codes += [(_code(child), child) for child in item.get("ContentSequence", ()) if child.get("ValueType") == "CODE"]
        elif kind == "CODE" and concept == FINDING:
            finding_code, finding_meaning = _code(item, "ConceptCodeSequence"), _meaning(item, "ConceptCodeSequence")
        elif kind == "CODE":
            codes.append((concept, item))
    if probability is None:
        return None
    decision = next((_meaning(item, "ConceptCodeSequence") for concept, item in codes if concept == finding_code), None)
    threshold = next(
        (float(text[len(THRESHOLD_PARAMETER):]) for text in texts.get(ALGORITHM_PARAMETERS, []) if text.startswith(THRESHOLD_PARAMETER)),
        None,
    )
    name = " ".join(texts.get(ALGORITHM_NAME, []) + texts.get(ALGORITHM_VERSION, [])) or None
    label = (texts.get(TRACKING_IDENTIFIER) or [finding_meaning or "finding"])[0]
    note = "; ".join(texts.get(COMMENT, [])) or None
    return ReportedFinding(label, probability, threshold, decision, name, note)


def read_report(path: Path | str) -> Report:
    """The findings of a Comprehensive 3D / Enhanced SR written by the node, in document order."""
    from pydicom import dcmread

    dataset = dcmread(path)
    findings = [finding for group in _groups(dataset.get("ContentSequence")) if (finding := _finding(group))]
    description = str(dataset.get("SeriesDescription", "")).upper()
    return Report(findings, "DEMONSTRATION" in description, "AI SUMMARY" in description)
