"""How phantom studies become the chain's tensors: contouring samples and per-joint classifier samples with reader labels.

A coronal series (T1 or STIR) is read in :class:`~.preprocess.CanonicalOrientation`, padded
and resampled to the 224 grid (:class:`~.preprocess.SquareFrame`).  Contouring targets come
from the phantom's joint-line masks (:mod:`.targets`); regions from those contours
(:mod:`.regions`); each joint's region is cut out of every slice of both sequences, levelled,
and resampled to ``roi_size`` (the classifier's input).  Labels per joint: the nine label
sets of the phantom's simulated readers (``R1S1`` ... ``R1R2``), -1 where a consensus label
is unused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

from pipeline.phantom import JOINT_LINE_LABELS, SIDES
from pipeline.phantom.readers import GRADED_OUTPUTS

from .preprocess import CanonicalOrientation, SquareFrame
from .regions import JointRegions, joint_regions
from .targets import contour_targets, polyline_from_mask

HEAD_UP = np.array([-1.0, 0.0])
LEFT_ON_RIGHT = np.array([0.0, 1.0])


@dataclass(frozen=True)
class CoronalSeries:
    """One coronal series on the 224 grid, head up and the patient's left on the right."""

    role: str
    images: np.ndarray  # (slices, 224, 224) float32
    orientation: CanonicalOrientation
    frame: SquareFrame
    pixel_spacing: tuple[float, float]  # source PixelSpacing (row, col)


def coronal_series(role: str, pixel_slices: Sequence[np.ndarray], image_orientation: Sequence[float], pixel_spacing: Sequence[float], size: int = 224) -> CoronalSeries:
    """Source slices of one series (in slice order) -> :class:`CoronalSeries`."""
    orientation = CanonicalOrientation.from_geometry(image_orientation, np.asarray(pixel_slices[0]).shape)
    frame = SquareFrame(*orientation.shape, size=size)
    images = np.stack([frame.image(orientation.image(np.asarray(p, dtype=np.float32)))[0].numpy() for p in pixel_slices])
    spacing = tuple(float(v) for v in pixel_spacing)
    if orientation.transpose:
        spacing = spacing[::-1]
    return CoronalSeries(role, images, orientation, frame, spacing)


def phantom_contours(series: CoronalSeries, joint_lines: np.ndarray) -> list[dict[str, np.ndarray | None]]:
    """Per slice the ground-truth joint polylines (grid pixels, superior first) from a phantom's joint-line mask."""
    contours = []
    for line in joint_lines:
        canonical = series.orientation.image(line)
        slice_contours: dict[str, np.ndarray | None] = {}
        for side in SIDES:
            vertices = polyline_from_mask(canonical == JOINT_LINE_LABELS[side], HEAD_UP)
            slice_contours[side] = None if vertices is None else series.frame.to_grid(vertices)
        contours.append(slice_contours)
    return contours


def contour_samples(series: CoronalSeries, contours: Sequence[Mapping[str, np.ndarray | None]]) -> tuple[np.ndarray, np.ndarray]:
    """Network inputs (slices, 1, 224, 224) and targets (slices, 8, 224, 224) of one series."""
    size = series.frame.size
    targets = np.stack([contour_targets(c, (size, size)) for c in contours])
    return series.images[:, None], targets


def series_regions(contours: Sequence[Mapping[str, np.ndarray | None]], size: int = 224) -> JointRegions:
    """Regions of a canonical series (head up, patient left on the right)."""
    return joint_regions(contours, HEAD_UP, LEFT_ON_RIGHT, size)


def crop_joint(images: np.ndarray, regions: JointRegions, side: str, roi_size: int, order: int = 1) -> np.ndarray:
    """Every slice's levelled box of one joint, resampled to (slices, roi_size, roi_size).

    Hand-written sampling (scipy's ``map_coordinates``) because the box lives in the rotated,
    levelled frame: MONAI's crops are axis-aligned.  ``order`` 0 for masks.
    """
    row0, col0, row1, col1 = regions.boxes[side]
    rows = np.linspace(row0, row1, roi_size)
    cols = np.linspace(col0, col1, roi_size)
    levelled = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
    grid = regions.unlevel(levelled).T  # (2, N) rows, cols
    return np.stack(
        [map_coordinates(image, grid, order=order, mode="constant", cval=0.0).reshape(roi_size, roi_size) for image in images]
    ).astype(images.dtype)


def reader_labels(readers: Mapping, side: str) -> dict[str, np.ndarray]:
    """One joint's labels per label set from ``ground_truth["readers"]``: (14,) int8, -1 where unused."""
    labels = {}
    for name, per_side in readers["labels"].items():
        values = per_side[side]
        labels[name] = np.array([-1 if values[o] is None else values[o] for o in GRADED_OUTPUTS], dtype=np.int8)
    return labels
