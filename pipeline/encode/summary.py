"""The study summary: one results card (RGB Secondary Capture) and the same lines in an SR.

The object a radiologist opens first in any PACS: every chain's findings as its SR states them
(decision, probability, threshold, where), every series that could be an input with its fate
(analysed by which chain, or not analysed and why), and the demonstration status.

Why a separate summary SR, not a container in each chain's SR: the summary changes whenever any
chain's result changes, and re-issuing every chain's SR for that would create new versions of
results that did not change; a chain's SR stays one algorithm's result (as IHE AI Results
expects), the summary the study's. The SR is a Comprehensive SR without a template (no TID
fits a list of series fates); its concepts are DCM codes (Summary, Finding, Series, Comment).

Versions: both objects keep one series each per study (series UIDs derived from the study),
and their SOP Instance UIDs are derived from the content: the same content gives the same
object (two workers finishing at once write it once), changed content a new instance with a
higher InstanceNumber (the caller's version).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pipeline.encode.codes import coded, concept
from pipeline.encode.common import DEMONSTRATION, LONG_STRING_MAX, MANUFACTURER, NOT_FOR_DIAGNOSIS, derived_uid
from pipeline.results import NotAnalysed, NotAnalysedReason

INPUT_ROLES = ("T1", "STIR", "T2FS", "CT", "XR")
CARD_SERIES_NUMBER = 8990
SR_SERIES_NUMBER = 8991
CARD_WIDTH = 1280
CARD_FONT_PX = 24
CARD_MARGIN_PX = 24


class SeriesRow(Protocol):
    """What the summary needs of a series (storage.store.SeriesRecord has it)."""

    series_uid: str
    series_number: int | None
    description: str | None
    modality: str | None
    role: str | None
    plane: str | None
    counts_as_input: bool | None
    reason: str | None


class JobRow(Protocol):
    """What the summary needs of a job (storage.models.Job has it)."""

    chain: str
    state: str
    inputs: dict[str, str]
    error: str | None


class Requirement(Protocol):
    role: object
    planes: Sequence[object]

    def describe(self) -> str: ...


class ChainDeclaration(Protocol):
    """What the summary needs of a configured chain (pipeline.route.ChainSpec has it)."""

    name: str
    enabled: bool
    requires: Sequence[Requirement]


@dataclass(frozen=True)
class SeriesFate:
    """One series that could be an input, and what became of it."""

    series_uid: str
    series_number: int | None
    description: str
    modality: str
    role: str
    plane: str
    analysed_by: tuple[str, ...] = ()
    not_analysed: NotAnalysed | None = None

    @property
    def text(self) -> str:
        number = self.series_number if self.series_number is not None else "?"
        head = f"Series {number} '{self.description}' ({self.modality} {self.role} {self.plane})"
        if self.analysed_by:
            return f"{head}: analysed by {', '.join(self.analysed_by)}"
        return f"{head}: {self.not_analysed.text if self.not_analysed else 'not analysed'}"


@dataclass(frozen=True)
class ChainOutcome:
    """One chain's part of the summary: its SR's lines, or why it has none."""

    chain: str
    lines: tuple[str, ...]
    demonstration: bool = False


@dataclass(frozen=True)
class StudySummary:
    study_uid: str
    chains: tuple[ChainOutcome, ...]
    series: tuple[SeriesFate, ...]

    @property
    def demonstration(self) -> bool:
        return any(chain.demonstration for chain in self.chains)

    def lines(self) -> list[tuple[str, str]]:
        """(kind, text) in reading order; kind is heading, demo, finding or series."""
        out: list[tuple[str, str]] = []
        if self.demonstration:
            out.append(("demo", f"{DEMONSTRATION}: results of demonstration packs trained on phantoms; not for diagnosis."))
        out.append(("heading", "Findings"))
        if not self.chains:
            out.append(("finding", "No chain ran on this study."))
        for chain in self.chains:
            out += [("finding", f"{chain.chain}: {line}") for line in chain.lines]
        out.append(("heading", "Series"))
        out += [("series", fate.text) for fate in self.series]
        return out

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(text for _, text in self.lines()).encode()).hexdigest()[:32]


# -- fates ---------------------------------------------------------------------------------------


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0][:200] if (text or "").strip() else "no error recorded"


def series_fate(series: SeriesRow, jobs: Sequence[JobRow], chains: Sequence[ChainDeclaration]) -> SeriesFate:
    """What became of one input-capable series, from the study's jobs and the configured chains."""
    using = [job for job in jobs if series.series_uid in job.inputs.values()]
    done = tuple(job.chain for job in using if job.state == "done")
    fate = SeriesFate(
        series.series_uid,
        series.series_number,
        series.description or "",
        series.modality or "",
        series.role or "",
        series.plane or "",
    )
    if done:
        return _with(fate, analysed_by=done)
    failed = [job for job in using if job.state == "failed"]
    if failed:
        detail = "; ".join(f"{job.chain}: {_first_line(job.error)}" for job in failed)
        return _with(fate, not_analysed=NotAnalysed(NotAnalysedReason.CHAIN_FAILED, detail))
    if using:
        return _with(fate, not_analysed=NotAnalysed(NotAnalysedReason.PENDING, ", ".join(job.chain for job in using)))
    if not series.counts_as_input:
        return _with(fate, not_analysed=NotAnalysed(NotAnalysedReason.INPUT_UNUSABLE, f"not an input: {series.reason or 'classification'}"))
    return _with(fate, not_analysed=_why_not_routed(series, jobs, chains))


def _with(fate: SeriesFate, **changes: object) -> SeriesFate:
    from dataclasses import replace

    return replace(fate, **changes)


def _why_not_routed(series: SeriesRow, jobs: Sequence[JobRow], chains: Sequence[ChainDeclaration]) -> NotAnalysed:
    """No job used the series: no chain takes its role, only in other planes, another series of
    the same kind was used, or the chain's other inputs are missing."""
    wanting = [
        (chain, requirement)
        for chain in chains
        if chain.enabled
        for requirement in chain.requires
        if _value(requirement.role) == series.role
    ]
    if not wanting:
        return NotAnalysed(NotAnalysedReason.NO_CHAIN_CONFIGURED, f"no chain takes {series.role} series")
    fitting = [(c, r) for c, r in wanting if not r.planes or series.plane in {_value(p) for p in r.planes}]
    if not fitting:
        needs = "; ".join(f"{c.name} needs {r.describe()}" for c, r in wanting)
        return NotAnalysed(NotAnalysedReason.WRONG_PLANE, needs)
    ran = {job.chain for job in jobs}
    used_other = [c.name for c, _ in fitting if c.name in ran]
    if used_other:
        return NotAnalysed(NotAnalysedReason.OTHER_SERIES_USED, f"{', '.join(used_other)} used another series")
    return NotAnalysed(NotAnalysedReason.OTHER_INPUTS_MISSING, ", ".join(c.name for c, _ in fitting))


def _value(item: object) -> str:
    return str(getattr(item, "value", item))


def series_fates(
    series: Iterable[SeriesRow], jobs: Sequence[JobRow], chains: Sequence[ChainDeclaration]
) -> tuple[SeriesFate, ...]:
    """The fate of every series whose role could make it a chain input, in series-number order."""
    candidates = [s for s in series if s.role in INPUT_ROLES]
    candidates.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_uid))
    return tuple(series_fate(s, jobs, chains) for s in candidates)


def chain_outcome(job: JobRow, sr_lines: Sequence[str] | None) -> ChainOutcome:
    """A job's part: its SR's lines (done), or its state and error."""
    if job.state == "done" and sr_lines is not None:
        demonstration = any(line.startswith(DEMONSTRATION) for line in sr_lines)
        lines = tuple(line for line in sr_lines if not line.startswith(DEMONSTRATION)) or ("no findings reported",)
        return ChainOutcome(job.chain, lines, demonstration)
    if job.state == "failed":
        return ChainOutcome(job.chain, (NotAnalysed(NotAnalysedReason.CHAIN_FAILED, _first_line(job.error)).text,))
    return ChainOutcome(job.chain, (NotAnalysed(NotAnalysedReason.PENDING).text,))


# -- encoding ------------------------------------------------------------------------------------


def series_description(summary: StudySummary, kind: str) -> str:
    mark = f"{DEMONSTRATION} " if summary.demonstration else ""
    return f"{mark}AI summary {kind} sijnode"[:LONG_STRING_MAX]


def summary_series_uids(study_uid: str) -> tuple[str, str]:
    """The Series Instance UIDs of a study's results card and summary SR (the same for every version)."""
    return derived_uid(study_uid, "summary card"), derived_uid(study_uid, "summary SR")


def render_card(summary: StudySummary) -> np.ndarray:
    """The results card's pixels: title, demonstration banner, findings, series fates."""
    font = ImageFont.load_default(size=CARD_FONT_PX)
    bold = ImageFont.load_default(size=round(CARD_FONT_PX * 1.3))
    width = CARD_WIDTH - 2 * CARD_MARGIN_PX
    rows: list[tuple[str, str, ImageFont.FreeTypeFont]] = [
        ("title", f"sijnode AI results summary - {NOT_FOR_DIAGNOSIS}", bold)
    ]
    for kind, text in summary.lines():
        chosen = bold if kind == "heading" else font
        for part in _wrap(text, chosen, width):
            rows.append((kind, part, chosen))
    heights = [sum(f.getmetrics()) + 4 for _, _, f in rows]
    height = 2 * CARD_MARGIN_PX + sum(heights) + CARD_FONT_PX * sum(1 for kind, _, _ in rows if kind == "heading")
    image = Image.new("RGB", (CARD_WIDTH, height), (16, 16, 16))
    draw = ImageDraw.Draw(image)
    y = CARD_MARGIN_PX
    for (kind, text, chosen), line_height in zip(rows, heights):
        if kind == "heading":
            y += CARD_FONT_PX
        if kind == "demo":
            draw.rectangle((0, y - 2, CARD_WIDTH, y + line_height - 2), fill=(170, 0, 0))
        colour = (255, 210, 0) if kind == "heading" else (255, 255, 255)
        draw.text((CARD_MARGIN_PX, y), text, fill=colour, font=chosen)
        y += line_height
    return np.asarray(image)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def encode_summary(summary: StudySummary, reference: Dataset, version: int) -> list[Dataset]:
    """The results card (RGB Secondary Capture) and the summary SR, for the study of ``reference``
    (any of its instances: patient and study modules are copied from it)."""
    fingerprint = summary.fingerprint
    card_series, _ = summary_series_uids(summary.study_uid)
    card = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=render_card(summary),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # a document, not an image of the patient: read upright
        series_instance_uid=card_series,
        series_number=CARD_SERIES_NUMBER,
        sop_instance_uid=derived_uid(card_series, fingerprint),
        instance_number=version,
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description(summary, "results card"),
    )
    card.copy_patient_and_study_information(reference)
    card.BurnedInAnnotation = "YES"
    card.ImageLaterality = "B"  # the summary covers both sides (General Series needs a laterality for the pelvis)
    card.ImageComments = "; ".join(text for _, text in summary.lines())[:10240]
    card.LossyImageCompression = "00"
    card.ImageType = ["DERIVED", "SECONDARY", "SUMMARY"]
    return [card, _summary_sr(summary, reference, version)]


def _summary_sr(summary: StudySummary, reference: Dataset, version: int) -> hd.sr.Comprehensive3DSR:
    """The summary lines as a TID 1500 report whose only content is its report-level Qualitative
    Evaluations (rows 12 and 14: TEXT, any concept), like the chains' SRs read first."""
    from pipeline.encode.sr import (
        insert_before_image_library,
        measurement_report,
        procedure_reported,
        qualitative_evaluations,
        text_item,
    )

    names = {"demo": "comment", "finding": "finding", "series": "series"}
    observer = hd.sr.ObserverContext(
        observer_type=coded(concept("device")),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("sijnode study summary"), name="sijnode study summary", manufacturer_name=MANUFACTURER
        ),
    )
    report = measurement_report(
        hd.sr.ObservationContext(observer_device_context=observer), procedure_reported([reference]), [], [reference]
    )
    insert_before_image_library(
        report[0],
        qualitative_evaluations([text_item(concept(names[kind]), value) for kind, value in summary.lines() if kind in names]),
    )
    _, series_uid = summary_series_uids(summary.study_uid)
    return hd.sr.Comprehensive3DSR(
        evidence=[reference],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(series_uid, summary.fingerprint),
        instance_number=version,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_verified=False,
        series_description=series_description(summary, "report"),
    )
