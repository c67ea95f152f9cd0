"""Parametric Maps (optional): each key Map's float values, unrendered, for viewers that overlay
maps themselves. One single-frame Parametric Map per map, all in one new series."""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom import Dataset

from pipeline.encode.codes import coded, concept, map_quantity_code
from pipeline.encode.common import (
    LONG_STRING_MAX,
    MANUFACTURER,
    SHORT_STRING_MAX,
    add_algorithm_equipment,
    algorithm_label,
    declare_private_schemes,
    device_uid,
    find_source,
    image_laterality,
    instance_uids,
    series_description,
)
from pipeline.results import ChainResult, Map

log = logging.getLogger(__name__)


def _value_mapping(heat: Map) -> hd.pm.RealWorldValueMapping:
    """Stored floats are the map's values: identity mapping, no units, quantity per meaning."""
    quantity = map_quantity_code(heat.meaning)
    return hd.pm.RealWorldValueMapping(
        lut_label=heat.meaning.value[:SHORT_STRING_MAX],
        lut_explanation=(heat.caption or quantity.meaning)[:LONG_STRING_MAX],
        unit=coded(concept("no units")),
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=coded(quantity),
    )


def parametric_map(
    result: ChainResult,
    heat: Map,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
    description: str | None = None,
) -> hd.pm.ParametricMap:
    provenance = result.provenance
    source = find_source(result, heat.source)
    pm = hd.pm.ParametricMap(
        source_images=[source],
        pixel_array=heat.values.astype(np.float32)[None],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=provenance.pack_name[:LONG_STRING_MAX],
        software_versions=provenance.pack_version[:LONG_STRING_MAX],
        # The pack build is the "device": its UID stands in for a serial number.
        device_serial_number=device_uid(provenance),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[_value_mapping(heat)],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="AIMAP",
        content_description=f"{heat.meaning.value} map, {algorithm_label(provenance)}"[:LONG_STRING_MAX],
        series_description=description or series_description(provenance, "maps"),
    )
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [_frame_anatomy(source)]
    add_algorithm_equipment(pm, provenance)
    declare_private_schemes(pm, [source])
    return pm


def _frame_anatomy(source: Dataset) -> Dataset:
    """Frame Anatomy: the source's anatomic region (else the sacroiliac joints), laterality B.

    Hand-written: highdicom's ParametricMap has no argument for it, and the object needs
    Frame Laterality because series Laterality cannot say "both".
    """
    item = Dataset()
    if "AnatomicRegionSequence" in source:
        item.AnatomicRegionSequence = source.AnatomicRegionSequence
    else:
        item.AnatomicRegionSequence = [coded(concept("sacroiliac joint"))]
    item.FrameLaterality = image_laterality(source)
    return item


def has_patient_frame(result: ChainResult, heat: Map) -> bool:
    """Whether the map's source has a patient frame of reference (cross-sectional images do)."""
    return "FrameOfReferenceUID" in find_source(result, heat.source)


def encode_parametric_maps(
    result: ChainResult, series_instance_uid: str, series_number: int, description: str | None = None
) -> list[hd.pm.ParametricMap]:
    """A float Parametric Map for each key map, all in one new series.

    Maps on projection radiographs are skipped with a warning: highdicom 0.28 cannot build a
    Parametric Map from a source without a frame of reference (its dimension indexing fails);
    their heatmap SCs are unaffected.
    """
    key_maps = []
    for heat in result.maps:
        if heat.key and has_patient_frame(result, heat):
            key_maps.append(heat)
        elif heat.key:
            log.warning(
                "no parametric map for %s: its source has no frame of reference",
                heat.source.sop_instance_uid,
            )
    uids = instance_uids(series_instance_uid, len(key_maps))
    return [
        parametric_map(result, heat, series_instance_uid, series_number, uid, number, description)
        for number, (heat, uid) in enumerate(zip(key_maps, uids), start=1)
    ]
