"""Image geometry in DICOM patient coordinates (LPS, millimetres).

LPS: +x towards the patient's Left, +y towards Posterior, +z towards Superior (head).

A :class:`SliceGeometry` is a stack of parallel 2-D images, described exactly as the
DICOM Image Plane module describes it: for slice ``k``, the centre of the pixel in
row ``r`` and column ``c`` is::

    IPP_k + c * PixelSpacing[1] * row_dir + r * PixelSpacing[0] * col_dir

where ``row_dir`` (the first ImageOrientationPatient triplet) is the direction in
which the *column index* grows along a row, and ``col_dir`` the direction in which
the *row index* grows down a column.

A :class:`ProjectionGeometry` is a point source and a flat detector (the radiograph).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


def unit(vector: np.ndarray | list[float] | tuple[float, ...]) -> np.ndarray:
    """``vector`` scaled to length 1."""
    array = np.asarray(vector, dtype=np.float64)
    return array / np.linalg.norm(array)


def rotation_matrix(yaw_deg: float, roll_deg: float, pitch_deg: float) -> np.ndarray:
    """Rotation about z (yaw), then y (roll), then x (pitch); angles in degrees.

    Yaw turns the patient about the head-feet axis, roll tilts the pelvis in the
    coronal plane (one hip higher), pitch tilts it in the sagittal plane.
    """
    yaw, roll, pitch = np.deg2rad([yaw_deg, roll_deg, pitch_deg])
    cz, sz = np.cos(yaw), np.sin(yaw)
    cy, sy = np.cos(roll), np.sin(roll)
    cx, sx = np.cos(pitch), np.sin(pitch)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rx @ ry @ rz


@dataclass(frozen=True)
class SliceGeometry:
    """A stack of parallel slices (MR or CT series) in LPS millimetres.

    ``center`` is the LPS point at the middle of the stack (centre of the middle
    slice's field of view).  ``slice_offsets`` are the signed distances of each
    slice plane from ``center`` along ``normal``, in file (InstanceNumber) order.
    """

    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    center: tuple[float, float, float]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns) as in DICOM
    slice_thickness: float
    slice_offsets: tuple[float, ...]

    @cached_property
    def normal(self) -> np.ndarray:
        """Slice normal ``row_dir x col_dir`` (right-handed, as DICOM viewers compute it)."""
        return np.cross(np.asarray(self.row_dir), np.asarray(self.col_dir))

    @property
    def n_slices(self) -> int:
        return len(self.slice_offsets)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns) -- the layout of pixel arrays and masks."""
        return (self.n_slices, self.rows, self.columns)

    @property
    def spacing_between_slices(self) -> float:
        """Centre-to-centre distance of neighbouring slices (0 for a single slice)."""
        if self.n_slices < 2:
            return 0.0
        return round(float(abs(self.slice_offsets[1] - self.slice_offsets[0])), 6)

    @property
    def image_orientation(self) -> list[float]:
        """ImageOrientationPatient: row direction then column direction."""
        return [float(v) + 0.0 for v in (*self.row_dir, *self.col_dir)]  # + 0.0 turns -0.0 into 0.0

    def image_position(self, index: int) -> np.ndarray:
        """ImagePositionPatient of slice ``index``: the centre of its first pixel."""
        row_dir = np.asarray(self.row_dir)
        col_dir = np.asarray(self.col_dir)
        slice_center = np.asarray(self.center) + self.slice_offsets[index] * self.normal
        half_width = (self.columns - 1) / 2.0 * self.pixel_spacing[1]
        half_height = (self.rows - 1) / 2.0 * self.pixel_spacing[0]
        return slice_center - half_width * row_dir - half_height * col_dir


@dataclass(frozen=True)
class ProjectionGeometry:
    """Point source in front of the patient, flat detector behind (an AP radiograph).

    The detector plane is perpendicular to the y axis.  Column index grows towards
    +x (patient's left) and row index towards -z (feet), so the image is seen as a
    radiologist hangs an AP film: the patient faces the viewer, patient's left on
    the viewer's right -- PatientOrientation ``L\\F``.
    """

    source: tuple[float, float, float]  # LPS position of the focal spot
    detector_y: float  # LPS y of the detector plane (posterior to the patient)
    detector_center: tuple[float, float]  # (x, z) where the central ray hits the detector
    rows: int
    columns: int
    imager_pixel_spacing: float  # detector pixel pitch in mm (square pixels)

    @property
    def source_to_detector(self) -> float:
        return float(self.detector_y - self.source[1])

    def magnification_at(self, y: float) -> float:
        """Geometric magnification of an object at LPS depth ``y``."""
        return self.source_to_detector / float(y - self.source[1])

    def detector_xz(self, rows: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Detector-plane x and z (LPS mm) of (possibly fractional) pixel indices."""
        x = self.detector_center[0] + (np.asarray(columns) - (self.columns - 1) / 2.0) * self.imager_pixel_spacing
        z = self.detector_center[1] - (np.asarray(rows) - (self.rows - 1) / 2.0) * self.imager_pixel_spacing
        return x, z

    def project(self, points: np.ndarray) -> np.ndarray:
        """Fractional (row, column) where rays through LPS ``points`` (..., 3) hit the detector."""
        points = np.asarray(points, dtype=np.float64)
        source = np.asarray(self.source)
        scale = (self.detector_y - source[1]) / (points[..., 1] - source[1])
        x = source[0] + scale * (points[..., 0] - source[0])
        z = source[2] + scale * (points[..., 2] - source[2])
        column = (x - self.detector_center[0]) / self.imager_pixel_spacing + (self.columns - 1) / 2.0
        row = -(z - self.detector_center[1]) / self.imager_pixel_spacing + (self.rows - 1) / 2.0
        return np.stack([row, column], axis=-1)
