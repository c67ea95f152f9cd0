"""Helpers for tests/test_phantom.py: reading images the way a viewer would."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset


def lps_of_pixel(ds: Dataset, row: float, column: float) -> np.ndarray:
    """LPS position of a pixel centre, from IPP / IOP / PixelSpacing only (as a viewer computes it)."""
    position = np.asarray(ds.ImagePositionPatient, dtype=float)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    spacing = np.asarray(ds.PixelSpacing, dtype=float)
    return position + column * spacing[1] * orientation[:3] + row * spacing[0] * orientation[3:]


def values(ds: Dataset, keyword: str) -> list[str]:
    """A (possibly single-valued) multi-valued attribute as a list of strings."""
    value = ds.get(keyword, "")
    if isinstance(value, str):
        return [value] if value else []
    return [str(item) for item in value]


def stack(datasets: list[Dataset]) -> np.ndarray:
    """Pixel data of a series as (slices, rows, columns) float, in file order."""
    return np.stack([ds.pixel_array for ds in datasets]).astype(np.float64)


def radiograph_side_of_column(ds: Dataset, column: float) -> str:
    """Patient side of an image column of a projection radiograph, read from PatientOrientation.

    PatientOrientation's first value is the patient direction along a row (increasing
    column): "L" means the right half of the image is the patient's left.
    """
    towards = str(ds.PatientOrientation[0])
    in_right_half = column > (int(ds.Columns) - 1) / 2.0
    if towards == "L":
        return "left" if in_right_half else "right"
    if towards == "R":
        return "right" if in_right_half else "left"
    raise AssertionError(f"not an AP/PA row direction: {towards!r}")

