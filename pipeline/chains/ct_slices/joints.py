"""Which axial CT slices cross the sacroiliac joints: bone (HU) and anatomy, no network.

Why not a segmentation network: the only masks to train one on are the phantom's, so a UNet
would learn the phantom's rendering; Hounsfield units are physical and the same on every
scanner, and the rule below is a few explainable numbers whose failure can be stated in words
("no slice where the sacrum meets both ilia"), which a "not analysed" result must do.

The rule, per axial slice, in millimetres of patient space (LPS from ImageOrientationPatient
and ImagePositionPatient, so it does not care about supine/prone, head/feet first, table
height, field of view or pixel size):

1. bone = HU >= ``BONE_HU`` (cancellous bone is ~200-300 HU, soft tissue < 100);
2. the patient's midline x0 = the median left-right coordinate of the bone (the pelvis is
   near-symmetric; the body outline is not used because a joints-only field of view cuts it);
3. bone within ``MIDLINE_MM`` of x0 behind the bone's median antero-posterior coordinate is the
   sacrum candidate (at the level of the joints that is the sacrum; above, a vertebra);
4. the bone is closed over gaps up to ``JOINT_GAP_MM`` (a joint cleft is 2-5 mm wide) and the
   slice crosses the joints when the closed structure holding the sacrum candidate reaches at
   least ``REACH_MM`` to both the patient's left and right of x0: the sacrum touches both ilia.
   Above the joints the lumbar vertebra is separated from the iliac wings by the psoas and
   paraspinal muscles; below them the coccyx is free of the ischia; both fail the test.

An ankylosed joint is bone across the cleft, which passes step 4 as well. Slices are then kept
only in the longest run of consecutive passing slices (an isolated passing slice elsewhere is
noise), and a study needs at least ``MIN_EXTENT_MM`` of joint along the slice normal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

BONE_HU = 180.0
MIDLINE_MM = 8.0
JOINT_GAP_MM = 6.0
REACH_MM = 70.0
MIN_EXTENT_MM = 8.0


@dataclass(frozen=True)
class SliceGeometry:
    """Patient-space geometry of one axial slice: where its rows and columns point (LPS), and its spacing."""

    origin: np.ndarray  # ImagePositionPatient, mm
    row_direction: np.ndarray  # direction of increasing column index
    column_direction: np.ndarray  # direction of increasing row index
    spacing: tuple[float, float]  # (between rows, between columns), mm

    def patient_xy(self, rows: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Patient x (right→left) and y (anterior→posterior) in mm of pixel indices."""
        points = (
            self.origin[None, :]
            + columns[:, None] * self.spacing[1] * self.row_direction[None, :]
            + rows[:, None] * self.spacing[0] * self.column_direction[None, :]
        )
        return points[:, 0], points[:, 1]


@dataclass(frozen=True)
class SliceVerdict:
    """What the rule saw on one slice."""

    crosses_joints: bool
    left_reach_mm: float  # how far the sacral structure reaches to the patient's left of the midline
    right_reach_mm: float
    reason: str = ""
    center_rc: tuple[float, float] | None = None  # (row, column) of the sacral structure's centroid


@dataclass(frozen=True)
class JointSlices:
    """The slices (indices into the ordered stack) that cross the joints, or why there are none."""

    indices: tuple[int, ...]
    verdicts: tuple[SliceVerdict, ...]
    reason: str = ""  # why no slice was selected; empty when some were

    @property
    def found(self) -> bool:
        return bool(self.indices)

    def center_rc(self) -> tuple[float, float]:
        """The median centroid of the joints' structure over the selected slices: one crop centre for the study."""
        centers = np.asarray([self.verdicts[i].center_rc for i in self.indices], dtype=float)
        return float(np.median(centers[:, 0])), float(np.median(centers[:, 1]))


def slice_verdict(hu: np.ndarray, geometry: SliceGeometry) -> SliceVerdict:
    """Whether one axial slice (HU, rows × columns) crosses both sacroiliac joints (module docstring, steps 1-4)."""
    bone = hu >= BONE_HU
    if bone.sum() < 50:
        return SliceVerdict(False, 0.0, 0.0, "no bone")
    rows, columns = np.nonzero(bone)
    x, y = geometry.patient_xy(rows.astype(float), columns.astype(float))
    x0, y0 = float(np.median(x)), float(np.median(y))
    seed = (np.abs(x - x0) <= MIDLINE_MM) & (y >= y0)
    if not seed.any():
        return SliceVerdict(False, 0.0, 0.0, "no bone at the posterior midline")
    gap_px = max(1, int(round(JOINT_GAP_MM / 2.0 / min(geometry.spacing))))
    closed = ndimage.binary_closing(bone, structure=ndimage.generate_binary_structure(2, 1), iterations=gap_px)
    closed |= bone
    labels, _ = ndimage.label(closed)
    seed_labels = np.unique(labels[rows[seed], columns[seed]])
    structure = np.isin(labels[rows, columns], seed_labels[seed_labels > 0])
    left = float(np.max(x[structure] - x0, initial=0.0))  # LPS: +x is the patient's left
    right = float(np.max(x0 - x[structure], initial=0.0))
    crosses = left >= REACH_MM and right >= REACH_MM
    center = (float(rows[structure].mean()), float(columns[structure].mean()))
    return SliceVerdict(crosses, round(left, 1), round(right, 1), "" if crosses else "sacrum does not reach both ilia", center)


def longest_run(flags: Sequence[bool]) -> tuple[int, int]:
    """(start, stop) of the longest run of True in ``flags``; (0, 0) when there is none."""
    best, start = (0, 0), None
    for index, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            if index - start > best[1] - best[0]:
                best = (start, index)
            start = None
    return best


def joint_slices(volume_hu: Sequence[np.ndarray], geometries: Sequence[SliceGeometry], slice_spacing_mm: float) -> JointSlices:
    """The slices of an ordered axial stack that cross the joints (the longest run of passing slices)."""
    verdicts = tuple(slice_verdict(hu, geometry) for hu, geometry in zip(volume_hu, geometries))
    start, stop = longest_run([v.crosses_joints for v in verdicts])
    extent = (stop - start) * slice_spacing_mm
    if stop == start:
        return JointSlices((), verdicts, "the sacroiliac joints were not found: on no axial slice does the sacrum meet both ilia (are the joints in the field of view?)")
    if extent < MIN_EXTENT_MM:
        return JointSlices(
            (), verdicts, f"the sacroiliac joints were not found: the sacrum meets both ilia over only {extent:.1f} mm (at least {MIN_EXTENT_MM:g} mm expected)"
        )
    return JointSlices(tuple(range(start, stop)), verdicts)
