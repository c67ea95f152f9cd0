"""DICOM encoders for chain results: the Structured Report, heatmaps and Parametric Maps.

Everything is written into the source study (same StudyInstanceUID, Patient and Study modules
copied from the source) and each kind into its own new series, named after the algorithm.
"""

from __future__ import annotations

from dataclasses import replace

import highdicom as hd
import pydicom

from pipeline.encode.common import series_description
from pipeline.encode.heatmap import encode_heatmaps
from pipeline.encode.parametric import encode_parametric_maps
from pipeline.encode.sr import encode_sr
from pipeline.results import ChainResult, MapMeaning
from pipeline.route import OutputKind, OutputPlan

__all__ = ["encode_heatmaps", "encode_parametric_maps", "encode_result", "encode_sr"]


# How each kind is named in the default series description ("AI findings <pack> <version>").
_KIND_WORDS = {
    OutputKind.SR: "findings",
    OutputKind.HEATMAPS: "heatmaps",
    OutputKind.PARAMETRIC_MAPS: "maps",
    OutputKind.OVERLAYS: "overlays",
}


def encode_result(
    result: ChainResult, *, parametric_maps: bool = False, plan: OutputPlan | None = None
) -> list[pydicom.Dataset]:
    """All DICOM objects for one result: the SR first, then the heatmap SCs, the segmentation
    overlay SCs, then (if asked) the Parametric Maps, each kind in its own new series numbered
    and named by ``plan`` (default: version 1 at 9000, 9001, 9003, 9002). A kind with nothing to
    encode gets no series. New series UIDs on every call."""
    plan = plan or OutputPlan()

    def description(kind: OutputKind) -> str:
        return series_description(result.provenance, _KIND_WORDS[kind], plan.version, plan.descriptions.get(kind))

    datasets: list[pydicom.Dataset] = [
        encode_sr(
            result, hd.UID(), plan.numbers[OutputKind.SR], description(OutputKind.SR), plan.previous_versions
        )
    ]
    key_maps = [heat for heat in result.maps if heat.key]
    heatmaps = [heat for heat in key_maps if heat.meaning is not MapMeaning.SEGMENTATION]
    overlays = [heat for heat in key_maps if heat.meaning is MapMeaning.SEGMENTATION]
    for kind, maps in ((OutputKind.HEATMAPS, heatmaps), (OutputKind.OVERLAYS, overlays)):
        if maps:
            datasets += encode_heatmaps(replace(result, maps=maps), hd.UID(), plan.numbers[kind], description(kind))
    if key_maps and parametric_maps:
        datasets += encode_parametric_maps(
            result, hd.UID(), plan.numbers[OutputKind.PARAMETRIC_MAPS], description(OutputKind.PARAMETRIC_MAPS)
        )
    return datasets
