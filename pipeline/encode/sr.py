"""The Structured Report: a Comprehensive 3D SR whose content is a TID 1500 Measurement Report.

Layout (all built with highdicom's TID builders except where noted):

- TID 1500 root, with a device observer (the pack build), Procedure Reported and an Image
  Library listing every source image;
- one TID 1501 measurement group per Finding: tracking identifier and UID, the finding concept,
  its site with laterality and topographical modifier, TID 4019 algorithm identification
  (pack, weights, device, threshold), the Probability (122157, DCM) in UCUM "1", a
  Present/Absent evaluation at the threshold, the evidence images and, if the chain wrote one,
  the note as a TEXT item;
- one TID 1501 group per per-image score concept, each score an image-referenced measurement;
- for a demonstration pack, a TEXT item saying so, in TID 1500's Qualitative Evaluations.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import highdicom as hd
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
    instance_uids,
    series_description,
)
from pipeline.results import (
    ChainResult,
    Concept,
    Finding,
    ImageRef,
    ImageScore,
    Provenance,
)


def encode_sr(
    result: ChainResult,
    series_instance_uid: str,
    series_number: int,
    description: str | None = None,
    previous_versions: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """The chain's findings and per-image scores as a TID 1500 Comprehensive 3D SR.

    ``previous_versions``: the SR(s) this one supersedes, listed in its Predecessor Documents
    Sequence (highdicom's ``previous_versions``)."""
    if not result.sources:
        raise ValueError("a result without source images cannot be reported")
    provenance = result.provenance
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(provenance),
        procedure_reported=_procedure_reported(result.sources),
        imaging_measurements=[
            *(_finding_group(result, finding) for finding in result.findings),
            *_image_score_groups(result),
        ],
        referenced_images=list(result.sources),
    )
    if provenance.demonstration:
        report[0].ContentSequence.append(
            _qualitative_evaluations(
                [_text(concept("demonstration notice"), demonstration_notice(provenance))]
            )
        )
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


def _procedure_reported(sources: Sequence[Dataset]) -> hd.sr.CodedConcept:
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
    return hd.sr.FindingSite(
        anatomic_location=coded(site_code(finding.site)),
        laterality=coded(laterality_code(finding.laterality)) if finding.laterality else None,
        topographical_modifier=coded(region_code(finding.region)) if finding.region else None,
    )


def _finding_group(
    result: ChainResult, finding: Finding
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    provenance = result.provenance
    for ref in finding.evidence:
        find_source(result, ref)  # a clear error for evidence outside the sources
    identifier = tracking_identifier(finding)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_tracking_uid(result, identifier), identifier=identifier
        ),
        finding_type=coded(finding.concept),
        finding_sites=[_finding_site(finding)],
        algorithm_id=_algorithm_identification(provenance, finding.threshold),
        measurements=[
            hd.sr.Measurement(
                name=coded(concept("probability")),
                value=finding.probability,
                unit=coded(concept("no units")),
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=coded(finding.concept), value=coded(presence_code(finding.present))
            )
        ],
        source_images=[_group_source_image(ref) for ref in finding.evidence] or None,
    )
    if finding.note:
        group[0].ContentSequence.append(_text(concept("comment"), finding.note))
    return group


def _image_score_groups(result: ChainResult) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One group per score concept; each score is a measurement citing its source image."""
    by_concept: dict[str, list[ImageScore]] = defaultdict(list)
    for score in result.image_scores:
        find_source(result, score.source)
        by_concept[score.concept.meaning].append(score)
    provenance = result.provenance
    groups = []
    for meaning, scores in by_concept.items():
        identifier = f"{meaning} per image"
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=_tracking_uid(result, identifier), identifier=identifier
                ),
                algorithm_id=_algorithm_identification(provenance),
                measurements=[_image_score_measurement(score) for score in scores],
            )
        )
    return groups


def _image_score_measurement(score: ImageScore) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=coded(score.concept),
        value=score.value,
        unit=coded(score.unit or concept("no units")),
        referenced_images=[
            hd.sr.SourceImageForMeasurement(
                score.source.sop_class_uid,
                score.source.sop_instance_uid,
                [score.source.frame] if score.source.frame is not None else None,
            )
        ],
    )


def _group_source_image(ref: ImageRef) -> hd.sr.SourceImageForMeasurementGroup:
    return hd.sr.SourceImageForMeasurementGroup(
        ref.sop_class_uid, ref.sop_instance_uid, [ref.frame] if ref.frame is not None else None
    )


def _text(name: Concept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=coded(name), value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _qualitative_evaluations(items: Sequence[hd.sr.ContentItem]) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12, the report-level Qualitative Evaluations container.

    Hand-written: highdicom's MeasurementReport has no argument for it.
    """
    container = hd.sr.ContainerContentItem(
        name=coded(concept("qualitative evaluations")),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container
