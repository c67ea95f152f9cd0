"""From semicoronal T1 and STIR series to the classifier's input, as published (spa ``libs/preprocessing.py``).

1. **Volumes from DICOM geometry.** Each series' slices are ordered along their normal
   (:func:`pipeline.chains.t2fs_mil.preprocess.order_slices`) and become a SimpleITK image whose
   origin, spacing and direction come from ImagePositionPatient, PixelSpacing and
   ImageOrientationPatient, so both series live in patient (LPS) coordinates.
2. **One grid for both** (:class:`SemicoronalGrid`): 20×224×224 voxels of 3.5×1×1 mm, axes those of
   the T1 series (its own semicoronal frame: rows, columns, slice normal), centred on the T1
   volume's centre. faimed3d's ``Resample3D((20, 224, 224), (3.5, 1, 1))`` resamples each volume in
   its own frame; we put STIR on the T1 grid (choice: the two must share voxels for the shared
   encoder's two passes to look at the same anatomy, and STIR follows T1's frame in the protocol).
   :func:`overlap_fraction` checks that the two series cover the same anatomy before anything runs.
3. **Clip the upper tail at the 0.99 quantile** (spa ``clip_tail``: lower quantile 0).
4. **N4 bias-field correction**, SimpleITK's, 4 fitting levels × 50 iterations (spa
   ``field_bias_correction``), on the whole grid without mask, as published.
5. **Denoising U-Net** per sequence (the chain runs it; z-scored input as in spa's denoiser training).
6. **Classifier input**: resized to 16×192×192 (trilinear, MONAI ``Resize``) and z-scored per
   volume (MONAI ``NormalizeIntensity``). A pack may declare ``classifier_crop`` (rows, columns of
   the grid, centred: MONAI ``SpatialCrop`` before the resize); the published model sees the whole
   grid, and :func:`classifier_field` tells Grad-CAM which part of the grid the classifier saw.

Steps 2–4 and 6 are MONAI ``Transform`` objects composed with MONAI ``Compose``; SimpleITK does the
resampling and N4 (MONAI has no N4). Voxel arrays are ``(slices, rows, columns)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import Compose, NormalizeIntensity, Resize, SpatialCrop, Transform
from pydicom import Dataset

from pipeline.chains.t2fs_mil.preprocess import order_slices, slice_normal, slice_pixels

#: the published preprocessing; a pack's manifest records the values it was trained with
PUBLISHED_PREPROCESSING: dict[str, Any] = {
    "recipe": "bressem2022-t1stir-v1",
    "grid_size": [20, 224, 224],  # slices, rows, columns
    "grid_spacing_mm": [3.5, 1.0, 1.0],
    "grid_frame": "the T1 series' own axes (row, column, slice normal), centred on the T1 volume",
    "interpolation": "linear (SimpleITK), STIR resampled onto the T1 grid",
    "clip_upper_quantile": 0.99,
    "n4": {"levels": 4, "iterations": 50, "shrink": 1, "implementation": "SimpleITK N4BiasFieldCorrectionImageFilter, no mask"},
    "denoiser_input": "z-score per volume, on the grid",
    "classifier_size": [16, 192, 192],
    "classifier_normalisation": "z-score per volume",
    "min_overlap": 0.5,
}

#: the keys a manifest's ``preprocessing`` must carry
REQUIRED_KEYS = ("recipe", "grid_size", "grid_spacing_mm", "clip_upper_quantile", "n4", "classifier_size", "min_overlap")
#: the keys that decide the grid volumes (steps 1-4): a cache of grid volumes is valid across the others
GRID_KEYS = ("recipe", "grid_size", "grid_spacing_mm", "clip_upper_quantile", "n4", "min_overlap")


class SeriesGeometryError(ValueError):
    """A series cannot be made into a volume (no geometry, uneven slices, one slice only)."""


class NoOverlapError(ValueError):
    """T1 and STIR do not cover the same anatomy."""


def volume_from_datasets(datasets: Sequence[Dataset]) -> tuple[list[Dataset], sitk.Image]:
    """(slices in patient order, a float32 SimpleITK image in LPS patient coordinates)."""
    ordered = order_slices(datasets)
    if len(ordered) < 2:
        raise SeriesGeometryError("a volume needs at least two slices")
    normal = slice_normal(ordered[0])
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in ordered])
    steps = np.diff(positions @ normal)
    if steps.min() <= 0 or steps.max() - steps.min() > 0.1 * steps.mean():
        raise SeriesGeometryError(f"slice spacing is uneven ({steps.min():.2f}-{steps.max():.2f} mm): not one regular stack")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in ordered}
    if len(shapes) != 1:
        raise SeriesGeometryError(f"the slices differ in size: {sorted(shapes)}")
    pixels = np.stack([slice_pixels(ds) for ds in ordered]).astype(np.float32)
    image = sitk.GetImageFromArray(pixels)
    orientation = np.asarray([float(v) for v in ordered[0].ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in ordered[0].PixelSpacing)
    image.SetSpacing((column_spacing, row_spacing, float(steps.mean())))
    image.SetOrigin(tuple(float(v) for v in positions[0]))
    # SimpleITK's direction columns: x along a row (IOP[:3]), y down a column (IOP[3:]), z the normal
    image.SetDirection(tuple(np.column_stack([orientation[:3], orientation[3:], normal]).ravel()))
    return ordered, image


@dataclass(frozen=True)
class SemicoronalGrid:
    """The resampling grid: ``size`` (slices, rows, columns) of ``spacing_mm`` in a series' own frame."""

    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # SimpleITK order (row-major 3×3, columns x, y, z)
    size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]

    @classmethod
    def centred_on(cls, image: sitk.Image, size: Sequence[int], spacing_mm: Sequence[float]) -> SemicoronalGrid:
        """A grid with ``image``'s axes, centred on its centre."""
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
        centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()]))
        extent_xyz = np.asarray([(size[2] - 1) * spacing_mm[2], (size[1] - 1) * spacing_mm[1], (size[0] - 1) * spacing_mm[0]])
        origin = centre - direction @ (extent_xyz / 2.0)
        return cls(tuple(float(v) for v in origin), tuple(float(v) for v in direction.ravel()), tuple(int(v) for v in size), tuple(float(v) for v in spacing_mm))

    def reference(self) -> sitk.Image:
        reference = sitk.Image([self.size[2], self.size[1], self.size[0]], sitk.sitkFloat32)
        reference.SetOrigin(self.origin)
        reference.SetDirection(self.direction)
        reference.SetSpacing((self.spacing_mm[2], self.spacing_mm[1], self.spacing_mm[0]))
        return reference

    def voxel_of(self, points_lps: np.ndarray) -> np.ndarray:
        """Continuous (slice, row, column) indices of LPS points ``(..., 3)``."""
        direction = np.asarray(self.direction).reshape(3, 3)
        xyz = (np.asarray(points_lps, dtype=float) - np.asarray(self.origin)) @ direction / np.asarray(self.spacing_mm[::-1])
        return xyz[..., ::-1]


def resample(image: sitk.Image, grid: SemicoronalGrid, interpolator: int = sitk.sitkLinear) -> np.ndarray:
    """``image`` on ``grid`` as float32 ``(slices, rows, columns)``; outside the image is 0."""
    resampled = sitk.Resample(image, grid.reference(), sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


def coverage(image: sitk.Image, grid: SemicoronalGrid) -> np.ndarray:
    """Boolean ``(slices, rows, columns)``: which grid voxels lie inside ``image``'s volume."""
    inside = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(image)
    return resample(inside, grid, sitk.sitkNearestNeighbor) > 0


def overlap_fraction(t1: sitk.Image, stir: sitk.Image, grid: SemicoronalGrid) -> float:
    """Of the grid voxels inside the T1 volume, the fraction also inside the STIR volume."""
    in_t1 = coverage(t1, grid)
    if not in_t1.any():
        return 0.0
    return float((in_t1 & coverage(stir, grid)).sum() / in_t1.sum())


class ClipUpperQuantile(Transform):
    """spa ``clip_tail``: clip to [minimum, ``quantile``-quantile] of the volume."""

    def __init__(self, quantile: float = 0.99) -> None:
        self.quantile = quantile

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        volume = np.asarray(volume, dtype=np.float32)
        return np.clip(volume, volume.min(), np.quantile(volume, self.quantile)).astype(np.float32)


class N4BiasFieldCorrection(Transform):
    """SimpleITK's N4 with ``levels`` fitting levels of ``iterations`` iterations each, on a grid volume.

    ``shrink`` > 1 fits the bias field on the volume shrunk in-plane by that factor and divides
    the full volume by it (SimpleITK's own N4 example does this for speed); 1 is the published
    full-resolution fit.
    """

    def __init__(self, spacing_mm: Sequence[float], levels: int = 4, iterations: int = 50, shrink: int = 1) -> None:
        self.spacing_mm, self.levels, self.iterations, self.shrink = tuple(spacing_mm), levels, iterations, shrink

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        image = sitk.GetImageFromArray(np.asarray(volume, dtype=np.float32))
        image.SetSpacing((self.spacing_mm[2], self.spacing_mm[1], self.spacing_mm[0]))
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations([self.iterations] * self.levels)
        if self.shrink <= 1:
            return sitk.GetArrayFromImage(corrector.Execute(image)).astype(np.float32)
        corrector.Execute(sitk.Shrink(image, [self.shrink, self.shrink, 1]))
        bias = sitk.Exp(corrector.GetLogBiasFieldAsImage(image))
        return sitk.GetArrayFromImage(image / bias).astype(np.float32)


class ZScore(Transform):
    """Per-volume z-score (MONAI ``NormalizeIntensity``) on a ``(slices, rows, columns)`` array, as float32 tensor."""

    def __init__(self) -> None:
        self.normalise = NormalizeIntensity()

    def __call__(self, volume: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(self.normalise(torch.as_tensor(volume, dtype=torch.float32))), dtype=torch.float32)


def grid_transform(settings: Mapping[str, Any]) -> Compose:
    """Steps 3–4 on a resampled grid volume: clip, N4 (the denoiser's input, before its z-score)."""
    n4 = settings["n4"]
    return Compose([ClipUpperQuantile(float(settings["clip_upper_quantile"])), N4BiasFieldCorrection(settings["grid_spacing_mm"], int(n4["levels"]), int(n4["iterations"]), int(n4.get("shrink", 1)))])


def classifier_field(settings: Mapping[str, Any]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(start, size) in grid voxels ``(slice, row, column)`` of the part of the grid the classifier sees.

    The whole grid unless the pack declares ``classifier_crop`` ``[rows, columns]``: then those
    rows and columns around the grid's centre, every slice.
    """
    grid = tuple(int(v) for v in settings["grid_size"])
    crop = settings.get("classifier_crop")
    if crop is None:
        return (0, 0, 0), grid  # type: ignore[return-value]
    rows, columns = (int(v) for v in crop)
    if not (0 < rows <= grid[1] and 0 < columns <= grid[2]):
        raise ValueError(f"classifier_crop {list(crop)} does not fit in the grid {list(grid)}")
    return (0, (grid[1] - rows) // 2, (grid[2] - columns) // 2), (grid[0], rows, columns)


def classifier_voxels(grid_index: np.ndarray, settings: Mapping[str, Any], shape: Sequence[int]) -> np.ndarray:
    """Continuous grid indices ``(..., 3)`` as indices into a classifier input of ``shape`` (the crop, then the resize's voxel centres)."""
    start, extent = classifier_field(settings)
    scale = np.asarray(shape, dtype=float) / np.asarray(extent, dtype=float)
    return (np.asarray(grid_index, dtype=float) - np.asarray(start, dtype=float) + 0.5) * scale - 0.5  # resize: align_corners=False


def classifier_transform(settings: Mapping[str, Any]) -> Compose:
    """Step 6 on a denoised grid volume ``(slices, rows, columns)``: crop (if declared), resize, z-score → ``(1, D, H, W)``."""
    size = tuple(int(v) for v in settings["classifier_size"])
    start, extent = classifier_field(settings)
    return Compose(
        [
            lambda v: torch.as_tensor(v, dtype=torch.float32)[None],
            SpatialCrop(roi_start=start, roi_end=tuple(a + b for a, b in zip(start, extent, strict=True))),
            Resize(size, mode="trilinear", align_corners=False),
            ZScore(),
        ]
    )


@dataclass
class PreparedSeries:
    """One sequence on the shared grid."""

    datasets: list[Dataset]  # the source slices in patient order
    image: sitk.Image  # the source volume (patient coordinates)
    grid_volume: np.ndarray  # clipped and bias-corrected, (slices, rows, columns) on the grid


@dataclass
class PreparedPair:
    grid: SemicoronalGrid
    overlap: float
    series: dict[str, PreparedSeries]  # "T1", "STIR"


def study_grid(t1_image: sitk.Image, settings: Mapping[str, Any]) -> SemicoronalGrid:
    """The grid a study is resampled onto: the T1 volume's axes and centre, the preprocessing's size and spacing."""
    return SemicoronalGrid.centred_on(t1_image, settings["grid_size"], settings["grid_spacing_mm"])


def prepare_pair(t1: Sequence[Dataset], stir: Sequence[Dataset], settings: Mapping[str, Any], *, correct: bool = True) -> PreparedPair:
    """Both series on one grid, clipped and bias-corrected; :class:`NoOverlapError` when they do not overlap.

    ``correct=False`` stops after resampling (for callers that hold the corrected volumes already).
    """
    volumes = {"T1": volume_from_datasets(t1), "STIR": volume_from_datasets(stir)}
    grid = study_grid(volumes["T1"][1], settings)
    overlap = overlap_fraction(volumes["T1"][1], volumes["STIR"][1], grid)
    minimum = float(settings["min_overlap"])
    if overlap < minimum:
        raise NoOverlapError(f"T1 and STIR do not overlap: {overlap:.0%} of the T1 volume lies inside the STIR volume (at least {minimum:.0%} needed)")
    steps = grid_transform(settings) if correct else (lambda volume: volume)
    series = {name: PreparedSeries(ordered, image, steps(resample(image, grid))) for name, (ordered, image) in volumes.items()}
    return PreparedPair(grid, overlap, series)
