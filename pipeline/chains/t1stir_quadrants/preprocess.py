"""The paper's contouring preprocessing: zero-pad each coronal slice to a square, resample bicubically to 224 x 224.

Before that, :class:`CanonicalOrientation` turns every slice head up with the patient's left
on the image's right (from ImageOrientationPatient, never the image's own side), so the
network's left / right channels mean the patient's sides.

:class:`SquareFrame` is the same mapping for coordinates, so contours drawn in the source
pixels (phantom joint lines, readers' landmarks) land where the resampled image shows them,
and contours found on the 224 grid go back to source pixels and millimetres.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SquareFrame:
    """Source (rows, cols) -> symmetric zero padding to ``side`` x ``side`` -> resampling to ``size`` x ``size``.

    Coordinates are (row, column) pixel centres.  The resampling follows torch's
    ``align_corners=False`` convention, as MONAI's ``Resize`` uses it.
    """

    rows: int
    cols: int
    size: int = 224

    @property
    def side(self) -> int:
        return max(self.rows, self.cols)

    @property
    def pad_before(self) -> tuple[int, int]:
        return (self.side - self.rows) // 2, (self.side - self.cols) // 2

    @property
    def scale(self) -> float:
        """Grid pixels per source pixel."""
        return self.size / self.side

    def to_grid(self, points: np.ndarray) -> np.ndarray:
        """Source (row, col) points (..., 2) -> grid points."""
        return (np.asarray(points, dtype=float) + np.array(self.pad_before) + 0.5) * self.scale - 0.5

    def to_source(self, points: np.ndarray) -> np.ndarray:
        """Grid (row, col) points (..., 2) -> source points."""
        return (np.asarray(points, dtype=float) + 0.5) / self.scale - 0.5 - np.array(self.pad_before)

    def grid_spacing_mm(self, pixel_spacing: Sequence[float]) -> tuple[float, float]:
        """Millimetres per grid pixel along (rows, cols) from the source PixelSpacing (row, col)."""
        return float(pixel_spacing[0]) / self.scale, float(pixel_spacing[1]) / self.scale

    def image(self, pixels: np.ndarray) -> torch.Tensor:
        """A source slice (rows, cols) -> the network input (1, size, size), float32, bicubic."""
        from monai.transforms import Compose, Resize, SpatialPad

        transform = Compose(
            [SpatialPad((self.side, self.side), method="symmetric"), Resize((self.size, self.size), mode="bicubic")]
        )
        return torch.as_tensor(transform(np.asarray(pixels, dtype=np.float32)[None]), dtype=torch.float32)


def in_plane_direction(image_orientation: Sequence[float], pixel_spacing: Sequence[float], lps_axis: int) -> np.ndarray:
    """The in-plane direction (d_row, d_col), unit length in pixels, along which patient coordinate ``lps_axis`` grows fastest.

    From ImageOrientationPatient: the first triple is the direction of increasing column, the
    second that of increasing row.  Axis 0 is the patient's left, 2 the head.
    """
    orientation = np.asarray(image_orientation, dtype=float)
    direction = np.array([orientation[3 + lps_axis] * float(pixel_spacing[0]), orientation[lps_axis] * float(pixel_spacing[1])])
    norm = np.linalg.norm(direction)
    if norm < 1e-6:
        raise ValueError(f"the image plane does not contain patient axis {'LPS'[lps_axis]}")
    return direction / norm


def superior_direction(image_orientation: Sequence[float], pixel_spacing: Sequence[float]) -> np.ndarray:
    """Towards the patient's head (LPS +z) in (d_row, d_col) pixels."""
    return in_plane_direction(image_orientation, pixel_spacing, 2)


def patient_left_direction(image_orientation: Sequence[float], pixel_spacing: Sequence[float]) -> np.ndarray:
    """Towards the patient's left (LPS +x) in (d_row, d_col) pixels."""
    return in_plane_direction(image_orientation, pixel_spacing, 0)


@dataclass(frozen=True)
class CanonicalOrientation:
    """Transpose / flips that put a coronal slice head up and the patient's left on the image's right.

    The network sees every slice this way, whatever the acquisition's orientation, so its
    "left" channels are the patient's left by construction (the radiological convention).
    ``to_source`` maps points back for outputs drawn on the source image.
    """

    transpose: bool
    flip_rows: bool
    flip_cols: bool
    source_shape: tuple[int, int]

    @classmethod
    def from_geometry(cls, image_orientation: Sequence[float], shape: tuple[int, int]) -> CanonicalOrientation:
        orientation = np.asarray(image_orientation, dtype=float)
        along_cols, along_rows = orientation[:3], orientation[3:]
        transpose = abs(along_rows[0]) > abs(along_cols[0])  # rows, not columns, run left-right
        if transpose:
            along_cols, along_rows = along_rows, along_cols
        if abs(along_rows[2]) < 1e-3:
            raise ValueError("the slice does not contain the head-foot axis: not a coronal slice")
        return cls(transpose, flip_rows=bool(along_rows[2] > 0), flip_cols=bool(along_cols[0] < 0), source_shape=tuple(shape))

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.source_shape
        return (cols, rows) if self.transpose else (rows, cols)

    def image(self, pixels: np.ndarray) -> np.ndarray:
        """Source pixels (..., rows, cols) -> canonical pixels."""
        out = np.swapaxes(pixels, -1, -2) if self.transpose else pixels
        if self.flip_rows:
            out = out[..., ::-1, :]
        if self.flip_cols:
            out = out[..., ::-1]
        return np.ascontiguousarray(out)

    def to_canonical(self, points: np.ndarray) -> np.ndarray:
        """Source (row, col) points (..., 2) -> canonical points."""
        p = np.asarray(points, dtype=float)
        p = p[..., ::-1] if self.transpose else p.copy()
        rows, cols = self.shape
        if self.flip_rows:
            p[..., 0] = rows - 1 - p[..., 0]
        if self.flip_cols:
            p[..., 1] = cols - 1 - p[..., 1]
        return p

    def to_source(self, points: np.ndarray) -> np.ndarray:
        """Canonical (row, col) points (..., 2) -> source points."""
        p = np.asarray(points, dtype=float).copy()
        rows, cols = self.shape
        if self.flip_rows:
            p[..., 0] = rows - 1 - p[..., 0]
        if self.flip_cols:
            p[..., 1] = cols - 1 - p[..., 1]
        return p[..., ::-1].copy() if self.transpose else p
