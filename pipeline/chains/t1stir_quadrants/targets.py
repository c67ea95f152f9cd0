"""Contouring targets: joint polylines from the phantom's joint-line masks, heatmaps and unit vector fields.

Rules (the paper gives the idea, not the numbers; these are ours):

* **Polyline from a mask.** The joint-line mask of one side on one slice is a curve about a
  pixel thick.  Its pixels are ordered along their principal axis, averaged in 1-pixel bins
  along it (a sub-pixel centre line) and oriented so that the first vertex is the
  patient's superior end: the contour **starts cranially and ends caudally**.  Fewer than
  :data:`MIN_LINE_PIXELS` pixels: no joint on that slice.
* **Heatmaps.** One Gaussian of peak 1 at the start and one at the end; the paper makes the
  variance proportional to the object's size, so sigma = :data:`SIGMA_PER_LENGTH` x the
  contour length, at least :data:`MIN_SIGMA_PX` grid pixels.  The factor is ours: 0.12 gives
  a sacroiliac joint line of ~50 grid pixels a sigma of ~6 pixels (at 0.05, ~2.5 pixels, a
  narrow contouring network learned no peaks in 23 minutes of CPU training: the Gaussians
  were 0.1 % of the image and the L2 loss was satisfied by predicting zero).
* **Unit vector field** (Jamaludin et al. 2023): the unit tangent towards the next vertex on
  the contour, turning into the unit vector towards the nearest contour point away from it:
  ``normalise(w * tangent + (1 - w) * towards)`` with ``w = exp(-d^2 / (2 * TANGENT_BAND_PX^2))``
  at distance ``d`` from the contour.  So the field carries the direction of travel on the
  joint and leads back onto it from beside it.  (A 1-pixel tangent band, our first rule, was
  too thin for a narrow network to learn in a short CPU run: its walks stopped on "weak
  field" where the opposite "towards" vectors of both sides cancelled.)  The contour is
  resampled at 0.25 pixel for the nearest-point search.
* **No joint** (out of the field of view, as the paper keeps such slices to suppress false
  positives): heatmaps and field are zero.
* **Left/right flip** (augmentation): mirroring the columns swaps the two joints' channel
  groups and negates the field's column component, so "left" stays the patient's left.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.spatial import cKDTree

from .model import CONTOUR_CHANNELS, CONTOUR_MAPS, JOINTS

MIN_LINE_PIXELS = 5
SIGMA_PER_LENGTH = 0.12
MIN_SIGMA_PX = 3.0
TANGENT_BAND_PX = 2.0
_RESAMPLE_PX = 0.25


def polyline_from_mask(line: np.ndarray, superior: np.ndarray) -> np.ndarray | None:
    """A joint-line mask (rows, cols) -> ordered (row, col) vertices from superior to inferior, or None."""
    points = np.argwhere(line).astype(float)
    if len(points) < MIN_LINE_PIXELS:
        return None
    centre = points.mean(axis=0)
    _, _, axes = np.linalg.svd(points - centre, full_matrices=False)
    axis = axes[0] if np.dot(axes[0], superior) >= 0 else -axes[0]  # pointing to the head
    along = (points - centre) @ axis
    bins = np.floor(along - along.min()).astype(int)
    vertices = np.array([points[bins == b].mean(axis=0) for b in np.unique(bins)])
    return vertices[::-1]  # largest projection (most superior) first


def resample_polyline(vertices: np.ndarray, spacing: float) -> np.ndarray:
    """Vertices every ``spacing`` pixels along the polyline (first and last kept)."""
    segments = np.linalg.norm(np.diff(vertices, axis=0), axis=1)
    distance = np.concatenate([[0.0], np.cumsum(segments)])
    if distance[-1] == 0:
        return vertices[:1].copy()
    samples = np.append(np.arange(0.0, distance[-1], spacing), distance[-1])
    return np.stack([np.interp(samples, distance, vertices[:, k]) for k in range(2)], axis=1)


def polyline_length(vertices: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(vertices, axis=0), axis=1).sum())


def gaussian_heatmap(shape: tuple[int, int], centre: np.ndarray, sigma: float) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    squared = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2
    return np.exp(-squared / (2 * sigma**2)).astype(np.float32)


def unit_vector_field(shape: tuple[int, int], vertices: np.ndarray) -> np.ndarray:
    """(2, rows, cols): (row, col) components of the unit vector field of one open contour."""
    dense = resample_polyline(vertices, _RESAMPLE_PX)
    tangents = np.diff(dense, axis=0)
    tangents = np.vstack([tangents, tangents[-1:]]) if len(tangents) else np.zeros((1, 2))
    tangents /= np.maximum(np.linalg.norm(tangents, axis=1, keepdims=True), 1e-9)
    grid = np.stack(np.mgrid[: shape[0], : shape[1]], axis=-1).reshape(-1, 2).astype(float)
    distance, nearest = cKDTree(dense).query(grid)
    towards = dense[nearest] - grid
    towards /= np.maximum(distance[:, None], 1e-9)
    weight = np.exp(-(distance**2) / (2 * TANGENT_BAND_PX**2))[:, None]
    field = weight * tangents[nearest] + (1.0 - weight) * towards
    field /= np.maximum(np.linalg.norm(field, axis=1, keepdims=True), 1e-9)
    return field.T.reshape(2, *shape).astype(np.float32)


def contour_targets(polylines: Mapping[str, np.ndarray | None], shape: tuple[int, int]) -> np.ndarray:
    """Per patient side a polyline (grid pixels, superior first) or None -> targets (8, rows, cols) in CONTOUR_CHANNELS order."""
    targets = np.zeros((len(CONTOUR_CHANNELS), *shape), dtype=np.float32)
    for j, joint in enumerate(JOINTS):
        vertices = polylines.get(joint)
        if vertices is None or len(vertices) < 2:
            continue
        base = j * len(CONTOUR_MAPS)
        sigma = max(MIN_SIGMA_PX, SIGMA_PER_LENGTH * polyline_length(vertices))
        targets[base] = gaussian_heatmap(shape, vertices[0], sigma)
        targets[base + 1] = gaussian_heatmap(shape, vertices[-1], sigma)
        field = unit_vector_field(shape, vertices)
        targets[base + 2] = field[1]  # x: along columns
        targets[base + 3] = field[0]  # y: along rows
    return targets


def flip_left_right(image: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror columns of an image (..., rows, cols) and its targets (8, rows, cols), keeping channels the patient's sides."""
    mirrored = targets[..., ::-1].copy()
    per_joint = len(CONTOUR_MAPS)
    swapped = np.concatenate([mirrored[per_joint:], mirrored[:per_joint]])
    for j in range(len(JOINTS)):
        swapped[j * per_joint + CONTOUR_MAPS.index("uvf_x")] *= -1
    return image[..., ::-1].copy(), swapped
