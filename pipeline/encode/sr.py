"""The Structured Report: a Comprehensive 3D SR whose content is a TID 1500 Measurement Report.

Layout (built with highdicom's TID builders except where noted), in the order a radiologist
reads it in dsr2html or a PACS SR viewer:

- TID 1500 root with a device observer (the pack build) and Procedure Reported;
- the report-level Qualitative Evaluations (TID 1500 rows 12-14), placed *before* the Image
  Library so that it is the first thing a reader sees: the demonstration notice (TEXT
  Comment), then for each finding one line of text (row 14) with the decision, the probability
  (two decimals), what it is a probability of, the threshold, where, and the note; the top
  per-image scores by instance number; the explanations, labelled as such. Why here and not in
  each TID 1501 group: the PixelMed validator's TID 1501 has no row for qualitative evaluations
  or text (every CODE/TEXT there is "not in template"), TID 1500 row 14 (TEXT, any concept) is
  exactly this. (Row 13's coded evaluations cannot carry the side: PixelMed does not know
  CID 210, so their laterality modifier would be "not in template".)
- the Image Library: only the images the report cites (evidence, top-scored images), not every
  slice of the series;
- one TID 1501 measurement group per Finding: tracking identifier and UID, the finding concept,
  its site (with laterality only when the model decides per side, with the topographical
  modifier only per quadrant: a patient-level finding has no laterality, so no software reads
  "bilateral"), TID 4019 algorithm identification, the Probability (122157, DCM) and the
  Threshold Value (122411, DCM) as TID 300 measurements, each with an Equivalent Meaning of
  Concept Name (121050, DCM) saying what it is the probability of; the coded decision
  (finding = Present/Absent, SCT) as the probability's concept modifier (TID 300 row 2), so it
  sits with the site and side it belongs to; the evidence images;
- one TID 1501 group for the top per-image scores (each cites its image) and one for the side
  explanations (Visual explanation, 130401 DCM), if any.

Numbers are stored with two decimals in NumericValue (what viewers show) and at full precision
in FloatingPointValue.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from pipeline.encode.codes import (
    coded,
    concept,
    is_cid_100_procedure,
    laterality_code,
    presence_code,
    procedure_code_for_modality,
    region_code,
    site_code,
)
from pipeline.encode.common import (
    LONG_STRING_MAX,
    MANUFACTURER,
    add_algorithm_equipment,
    declare_private_schemes,
    demonstration_notice,
    derived_uid,
    device_uid,
    find_source,
    instance_number,
    instance_uids,
    series_description,
)
from pipeline.results import (
    ChainResult,
    Concept,
    Contour,
    Finding,
    ImageRef,
    ImageScore,
    Provenance,
    SideExplanation,
)

#: per-image scores reported (the top of the ranking); the SR says how many there were
TOP_SCORES = 5


def encode_sr(
    result: ChainResult,
    series_instance_uid: str,
    series_number: int,
    description: str | None = None,
    previous_versions: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """The chain's findings, top per-image scores and explanations as a TID 1500 Comprehensive 3D SR.

    ``previous_versions``: the SR(s) this one supersedes, listed in its Predecessor Documents
    Sequence (highdicom's ``previous_versions``)."""
    if not result.sources:
        raise ValueError("a result without source images cannot be reported")
    provenance = result.provenance
    top = top_scores(result)
    groups = [
        *(_finding_group(result, finding) for finding in result.findings),
        *_image_score_groups(result, top),
        *_explanation_groups(result),
        *_contour_groups(result),
    ]
    report = measurement_report(
        _observation_context(provenance), procedure_reported(result.sources), groups, cited_sources(result, top)
    )
    insert_before_image_library(report[0], qualitative_evaluations(reader_summary(result, top)))
    (sop_instance_uid,) = instance_uids(series_instance_uid, 1)
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(result.sources),
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_verified=False,
        series_description=description or series_description(provenance, "findings"),
        performed_procedure_codes=_source_procedure_codes(result.sources) or None,
        previous_versions=list(previous_versions) or None,
    )
    add_algorithm_equipment(sr, provenance)
    declare_private_schemes(sr, result.sources)
    return sr


def measurement_report(
    observation_context: hd.sr.ObservationContext,
    procedure: hd.sr.CodedConcept,
    groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations],
    referenced_images: Sequence[Dataset],
) -> hd.sr.MeasurementReport:
    """highdicom's TID 1500 builder, also without measurement groups (a not-analysed result, the
    study summary): TID 1500's Imaging Measurements (row 6) is conditional, one of rows 6, 10
    and 12 suffices, but highdicom insists on a group; so one is built and its container dropped."""
    placeholder = [hd.sr.MeasurementsAndQualitativeEvaluations(hd.sr.TrackingIdentifier(identifier="none"))]
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=procedure,
        imaging_measurements=list(groups) or placeholder,
        referenced_images=list(referenced_images),
    )
    if not groups:
        root = report[0]
        root.ContentSequence = hd.sr.ContentSequence(
            [item for item in root.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue != "126010"],
            is_root=False,
        )
    return report


# -- what the reader sees first -------------------------------------------------------------------


def in_sentence(meaning: str) -> str:
    """A code meaning inside a sentence: first letter lower-case ('Active sacroiliitis' -> 'active
    sacroiliitis'), the rest as written ('New York' stays)."""
    return meaning[:1].lower() + meaning[1:]


def decision_text(finding: Finding) -> str:
    """One line for a finding: decision, probability of what, threshold, where; e.g.
    'PRESENT: probability 0.80 of active sacroiliitis (threshold 0.50); sacroiliac joints,
    both sides together (no side decided)'."""
    decision = "PRESENT" if finding.present else "ABSENT"
    text = (
        f"{decision}: probability {finding.probability:.2f} of {in_sentence(finding.concept.meaning)} "
        f"(present at >= {finding.threshold:.2f}); {finding.label}"
    )
    return f"{text}. {finding.note}" if finding.note else text


def probability_meaning(finding: Finding) -> str:
    """What the probability is a probability of, in words."""
    return f"Probability of {in_sentence(finding.concept.meaning)}, {finding.label}"


def top_scores(result: ChainResult, count: int = TOP_SCORES) -> dict[str, list[ImageScore]]:
    """Per score concept, the ``count`` highest scores (highest first)."""
    by_concept: dict[str, list[ImageScore]] = defaultdict(list)
    for score in result.image_scores:
        find_source(result, score.source)  # a clear error for scores outside the sources
        by_concept[score.concept.meaning].append(score)
    return {meaning: sorted(scores, key=lambda s: -s.value)[:count] for meaning, scores in by_concept.items()}


def score_list_text(result: ChainResult, meaning: str, top: Sequence[ImageScore]) -> str:
    """'Top 3 of 56 images by attention weight: instance 22: 0.12; instance 23: 0.11; ...'."""
    total = sum(1 for score in result.image_scores if score.concept.meaning == meaning)
    entries = "; ".join(
        f"instance {instance_number(find_source(result, score.source))}: {score.value:.3f}" for score in top
    )
    return f"Top {len(top)} of {total} images by {in_sentence(meaning)}: {entries}"


def explanation_text(explanations: Sequence[SideExplanation]) -> str:
    """'Explanation, not a finding: share of Grad-CAM in joint box, left 0.62, right 0.31 (...)'."""
    first = explanations[0]
    parts = ", ".join(f"{e.laterality.value} {e.value:.2f}" for e in explanations)
    return (
        f"Explanation, not a finding (where the model looked for {in_sentence(first.explains.meaning)}): "
        f"{in_sentence(first.concept.meaning)}, {parts}. The model does not decide a side."
    )


def reader_summary(result: ChainResult, top: dict[str, list[ImageScore]]) -> list[hd.sr.ContentItem]:
    """The report-level Qualitative Evaluations' items, most important first (see module doc)."""
    provenance = result.provenance
    items: list[hd.sr.ContentItem] = []
    if provenance.demonstration:
        items.append(text_item(concept("comment"), demonstration_notice(provenance)))
    if result.not_analysed is not None:
        items.append(text_item(concept("comment"), f"{provenance.algorithm_name}: {result.not_analysed.text}"))
    for finding in result.findings:
        items.append(text_item(finding.concept, decision_text(finding)))
    for meaning, scores in top.items():
        items.append(text_item(scores[0].concept, score_list_text(result, meaning, scores)))
    by_finding: dict[Concept, list[SideExplanation]] = defaultdict(list)
    for explanation in result.explanations:
        by_finding[explanation.explains].append(explanation)
    for explanations in by_finding.values():
        items.append(text_item(concept("visual explanation"), explanation_text(explanations)))
    if result.contours:
        items.append(text_item(concept("joint line contour"), contour_text(result)))
    return items


def contour_text(result: ChainResult) -> str:
    """'Contours (spatial coordinates below): left sacroiliac joint line traced by ... on instance 8, 61.2 mm; ...'."""
    parts = []
    for contour in result.contours:
        where = f"{contour.laterality.value} {contour.site.value}" if contour.laterality else contour.site.value
        length = f", {contour.length_mm:.1f} mm" if contour.length_mm is not None else ""
        parts.append(f"{where}: {contour.description} on instance {instance_number(find_source(result, contour.source))}{length}")
    return "Contours (SCOORD polylines in this report): " + "; ".join(parts)


def cited_sources(result: ChainResult, top: dict[str, list[ImageScore]]) -> list[Dataset]:
    """The sources the report cites (evidence and top-scored images), in the sources' order:
    the Image Library lists these, not every slice."""
    cited = {ref.sop_instance_uid for finding in result.findings for ref in finding.evidence}
    cited |= {score.source.sop_instance_uid for scores in top.values() for score in scores}
    cited |= {contour.source.sop_instance_uid for contour in result.contours}
    listed = [source for source in result.sources if str(source.SOPInstanceUID) in cited]
    return listed or list(result.sources[:1])


def insert_before_image_library(root: Dataset, item: Dataset) -> None:
    """Put ``item`` right after Procedure Reported, before the Image Library (module doc)."""
    sequence = list(root.ContentSequence)
    library = next(
        (i for i, child in enumerate(sequence) if child.ConceptNameCodeSequence[0].CodeValue == "111028"), len(sequence)
    )
    sequence.insert(library, item)
    root.ContentSequence = hd.sr.ContentSequence(sequence, is_root=False)


def report_lines(sr: Dataset) -> list[str]:
    """The lines a reader sees first in one of our SRs (the report-level Qualitative Evaluations'
    texts: demonstration notice, findings, top scores, explanations), for the study summary."""
    for item in sr.get("ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeValue == concept("qualitative evaluations").value:
            return [str(child.TextValue) for child in item.get("ContentSequence", []) if child.ValueType == "TEXT"]
    return []


# -- the TID 1501 groups ----------------------------------------------------------------------------


def _observation_context(provenance: Provenance) -> hd.sr.ObservationContext:
    """The device observer: the pack build that made the observations (TID 1004)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(provenance),
        name=provenance.algorithm_name[:LONG_STRING_MAX],
        manufacturer_name=MANUFACTURER,
        model_name=provenance.pack_name[:LONG_STRING_MAX],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=coded(concept("device")), observer_identifying_attributes=device
        )
    )


def _source_procedure_codes(sources: Sequence[Dataset]) -> list[hd.sr.CodedConcept]:
    """The distinct codes of the sources' ProcedureCodeSequence (the imaging procedure done)."""
    found: dict[tuple[str, str], hd.sr.CodedConcept] = {}
    for source in sources:
        for item in source.get("ProcedureCodeSequence", []):
            code = hd.sr.CodedConcept.from_dataset(item)
            found.setdefault((code.value, code.scheme_designator), code)
    return list(found.values())


def procedure_reported(sources: Sequence[Dataset]) -> hd.sr.CodedConcept:
    """TID 1500 Procedure Reported: the source's own code when it is a CID 100 code, else the
    CID 100 code for the source's modality.

    A site's local procedure code (e.g. 99HOSPITAL "MRI sacroiliac joints") is not used here,
    although CID 100 is extensible: PixelMed's DicomSRValidator reports any code outside CID 100
    as an error. The local code is kept in PerformedProcedureCodeSequence instead.
    """
    for code in _source_procedure_codes(sources):
        if is_cid_100_procedure(code.value, code.scheme_designator):
            return code
    return coded(procedure_code_for_modality(str(sources[0].get("Modality", ""))))


def _algorithm_identification(
    provenance: Provenance, threshold: float | None = None
) -> hd.sr.AlgorithmIdentification:
    """TID 4019: pack name and version; the parameters name the weights, the device the model
    ran on (cpu or cuda: their floating-point results may differ slightly) and, for a finding,
    its operating threshold.

    No Algorithm Manufacturer item: PixelMed's TID 4019 predates it and warns; the manufacturer
    is in the device observer and the contributing equipment anyway. No timings: they differ on
    every run, and a re-encoded result must reproduce its SR.
    """
    parameters = [f"operating threshold={threshold:g}"] if threshold is not None else []
    parameters.append(f"weights sha256={provenance.weights_sha256}")
    parameters.append(f"device={provenance.device}")
    parameters += [f"{key}={value}" for key, value in sorted(provenance.parameters.items())]
    return hd.sr.AlgorithmIdentification(
        name=provenance.pack_name, version=provenance.pack_version, parameters=parameters
    )


def _tracking_uid(result: ChainResult, identifier: str) -> str:
    """Stable for the same study, chain and identifier, so a re-run tracks the same thing."""
    return derived_uid(str(result.sources[0].StudyInstanceUID), result.provenance.chain, identifier)


def tracking_identifier(finding: Finding) -> str:
    """A readable tracking identifier: what, and where, e.g. 'Erosion, left ilium, upper'."""
    return f"{finding.concept.meaning}, {finding.label}"


def _finding_site(finding: Finding) -> hd.sr.FindingSite:
    """The site; laterality only when the model decides per side (a patient-level finding has none)."""
    return hd.sr.FindingSite(
        anatomic_location=coded(site_code(finding.site)),
        laterality=coded(laterality_code(finding.laterality)) if finding.laterality else None,
        topographical_modifier=coded(region_code(finding.region)) if finding.region else None,
    )


def _number(
    name: Concept, value: float, meaning: str, modifier: hd.sr.ContentItem | None = None, **kwargs: object
) -> hd.sr.Measurement:
    """A unitless TID 300 measurement shown with two decimals (full precision in FloatingPointValue),
    with an Equivalent Meaning of Concept Name (row 16) that says what it is and an optional
    concept modifier (row 2)."""
    measurement = hd.sr.Measurement(name=coded(name), value=value, unit=coded(concept("no units")), **kwargs)
    item = measurement[0]
    measured = item.MeasuredValueSequence[0]
    measured.NumericValue = f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2g}"
    measured.FloatingPointValue = float(value)
    children = list(item.get("ContentSequence", []))
    if modifier is not None:
        children.append(modifier)
    children.append(
        hd.sr.TextContentItem(
            name=coded(concept("equivalent meaning")),
            value=meaning,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    item.ContentSequence = hd.sr.ContentSequence(children)
    return measurement


def _finding_group(
    result: ChainResult, finding: Finding
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    for ref in finding.evidence:
        find_source(result, ref)  # a clear error for evidence outside the sources
    identifier = tracking_identifier(finding)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_tracking_uid(result, identifier), identifier=identifier
        ),
        finding_type=coded(finding.concept),
        finding_sites=[_finding_site(finding)],
        algorithm_id=_algorithm_identification(result.provenance, finding.threshold),
        measurements=[
            _number(
                concept("probability"), finding.probability, probability_meaning(finding), _decision(finding)
            ),
            _number(
                concept("threshold"),
                finding.threshold,
                f"Operating threshold: {in_sentence(finding.concept.meaning)} present when the probability is >= {finding.threshold:.2f}",
            ),
        ],
        source_images=[_group_source_image(ref) for ref in finding.evidence] or None,
    )


def _decision(finding: Finding) -> hd.sr.CodeContentItem:
    """The coded decision, as the probability's concept modifier (TID 300 row 2): finding = Present/Absent.

    Inside the group, next to the site and side it belongs to. (PixelMed's TID 1501 has no
    qualitative-evaluation row, and its TID 1500 row 13b cannot carry a side: CID 210 is
    unknown to it.)
    """
    return hd.sr.CodeContentItem(
        name=coded(finding.concept),
        value=coded(presence_code(finding.present)),
        relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
    )


def _image_score_groups(
    result: ChainResult, top: dict[str, list[ImageScore]]
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One group per score concept with its top scores; each cites its image and instance number."""
    groups = []
    for meaning, scores in top.items():
        total = sum(1 for score in result.image_scores if score.concept.meaning == meaning)
        identifier = f"{meaning}, top {len(scores)} of {total} images"
        measurements = [
            _number(
                score.concept,
                score.value,
                f"{meaning} of instance {instance_number(find_source(result, score.source))} (rank {rank} of {total})",
                referenced_images=[
                    hd.sr.SourceImageForMeasurement(
                        score.source.sop_class_uid,
                        score.source.sop_instance_uid,
                        [score.source.frame] if score.source.frame is not None else None,
                    )
                ],
            )
            for rank, score in enumerate(scores, start=1)
        ]
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=_tracking_uid(result, identifier), identifier=identifier),
                algorithm_id=_algorithm_identification(result.provenance),
                measurements=measurements,
            )
        )
    return groups


def _explanation_groups(result: ChainResult) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The side explanations as a Visual explanation group: a measurement per side, never a decision."""
    if not result.explanations:
        return []
    first = result.explanations[0]
    identifier = f"Explanation, not a finding: {in_sentence(first.concept.meaning)}"
    measurements = []
    for explanation in result.explanations:
        finding = next(f for f in result.findings if f.concept == explanation.explains)
        measurements.append(
            _number(
                explanation.concept,
                explanation.value,
                f"Explanation, not a finding: {in_sentence(explanation.concept.meaning)}, {explanation.laterality.value} side, "
                f"for the patient-level {in_sentence(explanation.explains.meaning)} (no side decided)",
                finding_sites=[
                    hd.sr.FindingSite(
                        anatomic_location=coded(site_code(finding.site)),
                        laterality=coded(laterality_code(explanation.laterality)),
                    )
                ],
            )
        )
    return [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_tracking_uid(result, identifier), identifier=identifier),
            finding_type=coded(concept("visual explanation")),
            algorithm_id=_algorithm_identification(result.provenance),
            measurements=measurements,
        )
    ]


def _contour_groups(result: ChainResult) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1410 planar ROI group per contour: the polyline as SCOORD on its source image,
    its site and side, and its length when the chain measured it."""
    groups = []
    for contour in result.contours:
        source = find_source(result, contour.source)
        where = f"{contour.laterality.value} {contour.site.value}" if contour.laterality else contour.site.value
        identifier = f"Contour, {where}, instance {instance_number(source)}"
        points = np.asarray(contour.points, dtype=float)[:, ::-1] + 0.5  # (row, col) centres -> DICOM (column, row)
        measurements = []
        if contour.length_mm is not None:
            measurement = hd.sr.Measurement(
                name=coded(concept("length")), value=float(contour.length_mm), unit=coded(concept("millimetre"))
            )
            measurements.append(measurement)
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=_tracking_uid(result, identifier), identifier=identifier),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=points.astype(np.float32),
                    source_image=hd.sr.SourceImageForRegion(contour.source.sop_class_uid, contour.source.sop_instance_uid),
                ),
                finding_type=coded(concept("joint line contour")),
                finding_sites=[
                    hd.sr.FindingSite(
                        anatomic_location=coded(site_code(contour.site)),
                        laterality=coded(laterality_code(contour.laterality)) if contour.laterality else None,
                    )
                ],
                algorithm_id=_algorithm_identification(result.provenance),
                measurements=measurements or None,
            )
        )
    return groups


def _group_source_image(ref: ImageRef) -> hd.sr.SourceImageForMeasurementGroup:
    return hd.sr.SourceImageForMeasurementGroup(
        ref.sop_class_uid, ref.sop_instance_uid, [ref.frame] if ref.frame is not None else None
    )


def text_item(name: Concept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=coded(name), value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def qualitative_evaluations(items: Sequence[hd.sr.ContentItem]) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12, the report-level Qualitative Evaluations container.

    Hand-written: highdicom's MeasurementReport has no argument for it.
    """
    container = hd.sr.ContainerContentItem(
        name=coded(concept("qualitative evaluations")),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container
