"""DICOM encoders for chain results: the Structured Report, heatmaps and Parametric Maps.

Everything is written into the source study (same StudyInstanceUID, Patient and Study modules
copied from the source) and each kind into its own new series, named after the algorithm.
"""

from __future__ import annotations

import highdicom as hd
import pydicom

from pipeline.encode.heatmap import encode_heatmaps
from pipeline.encode.parametric import encode_parametric_maps
from pipeline.encode.sr import encode_sr
from pipeline.results import ChainResult

__all__ = ["encode_heatmaps", "encode_parametric_maps", "encode_result", "encode_sr"]


def encode_result(
    result: ChainResult, *, series_number_base: int = 9000, parametric_maps: bool = False
) -> list[pydicom.Dataset]:
    """All DICOM objects for one result: the SR first, then the heatmap SCs, then (if asked)
    the Parametric Maps. Series numbers are base, base+1, base+2; a kind with nothing to
    encode (no key maps) gets no series. New series UIDs on every call."""
    datasets: list[pydicom.Dataset] = [encode_sr(result, hd.UID(), series_number_base)]
    if any(heat.key for heat in result.maps):
        datasets += encode_heatmaps(result, hd.UID(), series_number_base + 1)
        if parametric_maps:
            datasets += encode_parametric_maps(result, hd.UID(), series_number_base + 2)
    return datasets
