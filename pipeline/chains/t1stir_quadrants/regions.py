"""Joint regions and their quadrants from the contours of all slices of one series (Jamaludin et al. 2026, "Classifying the SIJs").

Rules (the paper's where it says, ours where it does not), in the 224 grid:

* **Levelling.** The image is first turned so the patient's head is up (from the DICOM
  geometry); then the *upper* point of each joint (the mean of its contour starts over the
  slices) and the *lower* point (the mean of its ends) give two left-right lines, and the
  in-plane rotation that makes their mean direction horizontal is applied (the paper: "the
  lines between the upper left and right, and lower left and right SIJs are close to
  horizontal").  One rotation about the grid centre for the whole series.
* **Boxes.** Per joint, the minimum box around its contours over all slices in the levelled
  frame, no margin; the same box on every slice.
* **Quadrants** (the paper does not define the split; ours): upper / lower by the joint's
  mid-height (the middle of its box); ilium / sacrum by the joint line of that slice -- for
  each levelled row, the contour's column (the nearest end's column beyond its ends); pixels
  on the patient-lateral side are ilium.  A slice without a contour for that joint borrows
  the nearest slice's contour.

Both joints must be found on at least one slice; otherwise :class:`RegionError` (the chain
reports "not analysed: joints not found").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.phantom.lesions import QUADRANTS, SIDES

assert QUADRANTS == ("upper_ilium", "lower_ilium", "upper_sacrum", "lower_sacrum")  # the index rule below


class RegionError(ValueError):
    """The joints' regions cannot be defined (a joint was not found on any slice)."""


def _rotation_taking(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The 2-D rotation taking unit vector ``a`` to unit vector ``b``."""
    cos, sin = float(a @ b), float(a[0] * b[1] - a[1] * b[0])
    return np.array([[cos, -sin], [sin, cos]])


@dataclass(frozen=True)
class JointRegions:
    """One series' levelled frame, per-joint boxes and per-slice joint lines."""

    rotation: np.ndarray  # (2, 2): grid (row, col) offsets from the centre -> levelled offsets
    centre: np.ndarray  # (2,)
    left_is_higher_col: bool  # in the levelled frame, the patient's left lies towards larger columns
    boxes: Mapping[str, tuple[float, float, float, float]]  # side -> (row0, col0, row1, col1), levelled
    joint_lines: Mapping[str, Sequence[np.ndarray]]  # side -> per slice levelled contour vertices sorted by row

    def level(self, points: np.ndarray) -> np.ndarray:
        """Grid (row, col) points (..., 2) -> levelled points."""
        return (np.asarray(points, dtype=float) - self.centre) @ self.rotation.T + self.centre

    def unlevel(self, points: np.ndarray) -> np.ndarray:
        """Levelled points -> grid points."""
        return (np.asarray(points, dtype=float) - self.centre) @ self.rotation + self.centre

    def quadrant_of(self, slice_index: int, points: np.ndarray) -> np.ndarray:
        """Grid points (N, 2) on one slice -> (N, 2) int array of (side index in SIDES, quadrant index in QUADRANTS); -1 outside both boxes."""
        levelled = self.level(points).reshape(-1, 2)
        result = np.full((len(levelled), 2), -1, dtype=int)
        for s, side in enumerate(SIDES):
            row0, col0, row1, col1 = self.boxes[side]
            inside = (
                (levelled[:, 0] >= row0) & (levelled[:, 0] <= row1) & (levelled[:, 1] >= col0) & (levelled[:, 1] <= col1)
            )
            line = self.joint_lines[side][slice_index]
            line_col = np.interp(levelled[:, 0], line[:, 0], line[:, 1])
            toward_left = levelled[:, 1] > line_col if self.left_is_higher_col else levelled[:, 1] < line_col
            lateral = toward_left if side == "left" else ~toward_left
            upper = levelled[:, 0] < (row0 + row1) / 2  # head is up in the levelled frame
            # indices in QUADRANTS order: upper ilium, lower ilium, upper sacrum, lower sacrum
            quadrant = np.where(upper, np.where(lateral, 0, 2), np.where(lateral, 1, 3))
            result[inside, 0] = s
            result[inside, 1] = quadrant[inside]
        return result


def joint_regions(
    contours: Sequence[Mapping[str, np.ndarray | None]],
    superior: np.ndarray,
    patient_left: np.ndarray,
    size: int = 224,
) -> JointRegions:
    """Regions from per-slice contours ({side: (K, 2) grid vertices from superior to inferior, or None}).

    ``superior`` and ``patient_left`` are the in-plane (d_row, d_col) directions of the patient's
    head and left (from the geometry, see :mod:`.preprocess`).
    """
    centre = np.full(2, (size - 1) / 2)
    head_up = _rotation_taking(np.asarray(superior, float) / np.linalg.norm(superior), np.array([-1.0, 0.0]))
    found = {side: [c[side] for c in contours if c.get(side) is not None] for side in SIDES}
    missing = [side for side in SIDES if not found[side]]
    if missing:
        raise RegionError(f"joint not found on any slice: {', '.join(missing)}")
    upper = {side: np.mean([v[0] for v in found[side]], axis=0) for side in SIDES}
    lower = {side: np.mean([v[-1] for v in found[side]], axis=0) for side in SIDES}
    across = []
    for ends in (upper, lower):
        vector = head_up @ (ends["left"] - ends["right"])
        across.append(vector / np.linalg.norm(vector))
    horizontal = across[0] + across[1]
    if horizontal[1] < 0:
        horizontal = -horizontal
    level = _rotation_taking(horizontal / np.linalg.norm(horizontal), np.array([0.0, 1.0]))
    rotation = level @ head_up
    left_is_higher_col = bool((rotation @ np.asarray(patient_left, float))[1] > 0)

    def levelled(vertices: np.ndarray) -> np.ndarray:
        return (vertices - centre) @ rotation.T + centre

    boxes, joint_lines = {}, {}
    for side in SIDES:
        points = np.concatenate([levelled(v) for v in found[side]])
        boxes[side] = (float(points[:, 0].min()), float(points[:, 1].min()), float(points[:, 0].max()), float(points[:, 1].max()))
        present = [i for i, c in enumerate(contours) if c.get(side) is not None]
        lines = []
        for index in range(len(contours)):
            nearest = min(present, key=lambda i: abs(i - index))
            line = levelled(contours[nearest][side])
            lines.append(line[np.argsort(line[:, 0])])
        joint_lines[side] = lines
    return JointRegions(rotation, centre, left_is_higher_col, boxes, joint_lines)

