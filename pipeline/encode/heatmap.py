"""Heatmaps: one RGB Secondary Capture per key Map, the map in colour over its source image.

Each SC keeps its source's columns, pixel spacing and patient orientation, references the
source in SourceImageSequence, says BurnedInAnnotation YES, and is written in Explicit VR Little
Endian (lossless). The image is the source's rows with a text band added below (so text never
covers anatomy): the top-left pixel and the spacing stay the source's. All heatmaps of one ChainResult share one new series.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from collections.abc import Sequence

from pipeline.encode.common import (
    DEMONSTRATION,
    MANUFACTURER,
    NOT_FOR_DIAGNOSIS,
    add_algorithm_equipment,
    algorithm_label,
    declare_private_schemes,
    find_source,
    image_laterality,
    instance_number,
    instance_uids,
    series_description,
)
from pipeline.encode.render import display_grayscale, render_heatmap
from pipeline.results import ChainResult, Finding, Map, Provenance

# Patient directions of the +x, +y, +z patient axes and their opposites (PS3.3 C.7.6.1.1.1).
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


def burned_in_lines(provenance: Provenance, findings: Sequence[Finding] = (), caption: str | None = None) -> list[str]:
    """The text every heatmap carries, most important first: the demonstration mark, "not for
    diagnosis" and the algorithm, each finding's decision and probability, the map's caption."""
    lines = [f"{NOT_FOR_DIAGNOSIS} - {algorithm_label(provenance)}"]
    if provenance.demonstration:
        lines.insert(0, DEMONSTRATION)
    lines += [finding_line(finding) for finding in findings]
    if caption:
        lines.append(caption)
    return lines


def finding_line(finding: Finding) -> str:
    """'Active sacroiliitis: PRESENT, p = 0.80 (threshold 0.50), both sides together'."""
    decision = "PRESENT" if finding.present else "absent"
    where = "both sides together, no side decided" if finding.laterality is None else finding.label
    return f"{finding.concept.meaning}: {decision}, p = {finding.probability:.2f} (threshold {finding.threshold:.2f}), {where}"


def map_caption(heat: Map, source: Dataset) -> str:
    """'Instance 22: Grad-CAM x p, attention rank 1 of 56': the instance a reader can find in PACS."""
    return f"Instance {instance_number(source)}: {heat.caption or heat.meaning.value}"


def scale_title(heat: Map) -> str:
    """What the colour bar's 0-1 means for an evidence map (pipeline.cam.evidence_map)."""
    return f"{heat.meaning.value} x p"


def _direction_letter(cosines: np.ndarray) -> str:
    """The patient direction a row or column points to, by its dominant axis.

    Oblique planes get their dominant direction only: highdicom's PatientOrientation accepts
    single letters, and the letters only orient the reader.
    """
    axis = int(np.argmax(np.abs(cosines)))
    positive, negative = _AXIS_LETTERS[axis]
    return positive if cosines[axis] > 0 else negative


def patient_orientation(source: Dataset) -> tuple[str, str]:
    """(row direction, column direction) of the source, from ImageOrientationPatient or
    PatientOrientation (projection images)."""
    if "ImageOrientationPatient" in source:
        cosines = np.asarray([float(v) for v in source.ImageOrientationPatient])
        return _direction_letter(cosines[:3]), _direction_letter(cosines[3:])
    if len(source.get("PatientOrientation", [])) == 2:
        row, column = source.PatientOrientation
        return str(row)[0], str(column)[0]
    raise ValueError(f"source {source.SOPInstanceUID} has no orientation to copy")


def _pixel_spacing(source: Dataset) -> tuple[float, float] | None:
    spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
    return (float(spacing[0]), float(spacing[1])) if spacing else None


def _source_image_item(source: Dataset, frame: int | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    return item


def heatmap_image(
    result: ChainResult,
    heat: Map,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
    description: str | None = None,
) -> hd.sc.SCImage:
    """One heatmap SC: ``heat`` over its source, with colour bar and burned-in text."""
    provenance = result.provenance
    source = find_source(result, heat.source)
    caption = map_caption(heat, source)
    lines = burned_in_lines(provenance, result.findings, caption)
    rgb, _ = render_heatmap(
        display_grayscale(source, heat.source.frame, heat.display_window),
        heat.values,
        lines,
        categories=[(c.value, c.label) for c in heat.categories],
        scale_title=scale_title(heat),
    )
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=patient_orientation(source),
        pixel_spacing=_pixel_spacing(source),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=description or series_description(provenance, "heatmaps"),
    )
    # from_ref_dataset copies only the basic patient and study attributes; this copies the modules.
    image.copy_patient_and_study_information(source)
    image.BurnedInAnnotation = "YES"
    image.ImageLaterality = image_laterality(source)
    image.SourceImageSequence = [_source_image_item(source, heat.source.frame)]
    image.DerivationDescription = (
        f"{caption} map of {algorithm_label(provenance)} over the source image, with a text band below it"[:1024]
    )
    image.ImageComments = "; ".join(lines)[:10240]
    image.LossyImageCompression = "00"
    add_algorithm_equipment(image, provenance)
    declare_private_schemes(image, [source])
    return image


def encode_heatmaps(
    result: ChainResult, series_instance_uid: str, series_number: int, description: str | None = None
) -> list[hd.sc.SCImage]:
    """An RGB Secondary Capture for each key map, all in one new series."""
    key_maps = [heat for heat in result.maps if heat.key]
    uids = instance_uids(series_instance_uid, len(key_maps))
    return [
        heatmap_image(result, heat, series_instance_uid, series_number, uid, number, description)
        for number, (heat, uid) in enumerate(zip(key_maps, uids), start=1)
    ]
