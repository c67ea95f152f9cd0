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

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from scipy.ndimage import map_coordinates

from pipeline.phantom import JOINT_LINE_LABELS, SIDES
from pipeline.phantom.readers import GRADED_OUTPUTS
from pipeline.phantom.study import GROUND_TRUTH_FILE, phantom_study_folders

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


# ------------------------------------------------------------------ phantom studies as training / evaluation cases
SEQUENCES: tuple[str, ...] = ("T1", "STIR")


def series_volume(images: np.ndarray) -> np.ndarray:
    """One series' 224-grid slices z-scored over the whole series (the classifier's intensity scale).

    Over the series, not per slice, so a slice full of edema stays brighter than its neighbours.
    """
    images = np.asarray(images, dtype=np.float32)
    return (images - images.mean()) / max(float(images.std()), 1e-6)


def joint_crops(images: np.ndarray, regions: JointRegions, side: str, roi_size: int) -> np.ndarray:
    """The classifier's view of one joint: :func:`crop_joint`, the right joint mirrored left-right.

    Mirrored so that on every crop the ilium lies on the image's right and the sacrum on its
    left (the canonical layout puts the patient's left on the image's right, so the left joint's
    ilium is already there): one classifier with one set of quadrant heads serves both joints
    (our choice; the paper does not say how its 14 heads treat the two sides).
    """
    crops = crop_joint(images, regions, side, roi_size)
    return np.ascontiguousarray(crops[..., ::-1]) if side == "right" else crops


@dataclass(frozen=True)
class Case:
    """One phantom study: its coronal T1 / STIR folders, per-joint truth and reader labels."""

    folder: Path
    study: str
    patient_id: str
    seed: int
    truth: dict[str, np.ndarray]  # side -> (14,) 0/1
    labels: dict[str, dict[str, np.ndarray]]  # side -> label set -> (14,) with -1 unused
    subgroups: tuple[str, ...]
    generator_version: str
    series_folders: dict[str, Path]  # "T1", "STIR"

    def datasets(self, sequence: str) -> list[Dataset]:
        return sorted_slices([dcmread(path) for path in sorted(self.series_folders[sequence].glob("*.dcm"))])

    def coronal(self, sequence: str, size: int = 224) -> tuple[list[Dataset], CoronalSeries]:
        datasets = self.datasets(sequence)
        return datasets, series_of(sequence, datasets, size)

    def joint_lines(self, sequence: str) -> np.ndarray:
        with np.load(self.folder / "masks.npz") as masks:
            return masks[f"{sequence}_joint_line"]


def sorted_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Slices in order along the slice normal (from ImagePositionPatient), InstanceNumber as the tie-break."""

    def position(dataset: Dataset) -> tuple[float, int]:
        orientation = np.asarray([float(v) for v in dataset.ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        return float(np.dot(normal, [float(v) for v in dataset.ImagePositionPatient])), int(dataset.get("InstanceNumber", 0) or 0)

    return sorted(datasets, key=position)


def series_of(role: str, datasets: Sequence[Dataset], size: int = 224) -> CoronalSeries:
    """Sorted datasets of one coronal series -> :class:`CoronalSeries` on the ``size`` grid."""
    first = datasets[0]
    return coronal_series(role, [d.pixel_array for d in datasets], first.ImageOrientationPatient, first.PixelSpacing, size)


def read_case(folder: Path) -> Case:
    from pipeline.evaluation import phantom_subgroups

    truth = json.loads((folder / GROUND_TRUTH_FILE).read_text())
    series = {s["role"]: folder / s["folder"] for s in truth["series"] if s["role"] in SEQUENCES and s["plane"] == "coronal"}
    if set(series) != set(SEQUENCES):
        raise ValueError(f"{folder}: no coronal T1 and STIR series in the ground truth (generate with kinds including mri)")
    readers = truth["readers"]
    return Case(
        folder=folder,
        study=folder.name,
        patient_id=str(truth["patient_id"]),
        seed=int(truth["seed"]),
        truth={side: np.array([readers["truth"][side][o] for o in GRADED_OUTPUTS], dtype=np.int8) for side in SIDES},
        labels={side: reader_labels(readers, side) for side in SIDES},
        subgroups=phantom_subgroups(truth),
        generator_version=str(truth["generator_version"]),
        series_folders=series,
    )


def find_cases(data: Path) -> list[Case]:
    """Every phantom study at or below ``data``, in path order."""
    return [read_case(folder) for folder in phantom_study_folders(data, required=True)]


def describe(cases: Sequence[Case]) -> dict[str, Any]:
    """Counts and provenance of a set of cases, for manifests and reports."""
    from pipeline.training import seed_ranges

    return {
        "studies": len(cases),
        "joints": 2 * len(cases),
        "positive_joints": {o: sum(int(c.truth[s][i]) for c in cases for s in SIDES) for i, o in enumerate(GRADED_OUTPUTS)},  # int: int8 sums overflow
        "seeds": seed_ranges([c.seed for c in cases]),
        "subgroups": {g: sum(g in c.subgroups for c in cases) for g in sorted({g for c in cases for g in c.subgroups})},
        "generator_versions": sorted({c.generator_version for c in cases}),
    }
