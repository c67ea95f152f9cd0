"""Signed-distance primitives (negative inside), vectorised over float32 arrays.

Only approximate distances are needed: they drive partial-volume fractions a voxel
or two wide, so first-order estimates near the surface are good enough.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FAR = np.float32(1.0e4)  # "very far outside": returned for culled primitives


@dataclass(frozen=True)
class Box:
    """Axis-aligned bounding box (min, max corners) in the body frame, in mm."""

    low: tuple[float, float, float]
    high: tuple[float, float, float]

    def mirrored_x(self) -> Box:
        """The same box reflected through the sagittal plane x = 0."""
        return Box((-self.high[0], self.low[1], self.low[2]), (-self.low[0], self.high[1], self.high[2]))


def inside_fraction(sdf: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume fraction of a voxel of size ``width`` centred at signed distance ``sdf``.

    A linear ramp from 1 (a half voxel inside) to 0 (a half voxel outside): the box
    filter of a voxel straddling a flat surface.
    """
    return np.clip(np.float32(0.5) - sdf * np.float32(1.0 / width), 0.0, 1.0)


def smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum: a union of two shapes with a fillet of size ``k``."""
    if k <= 0:
        return np.minimum(a, b)
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def box_from_distances(*distances: np.ndarray, rounding: float = 0.0) -> np.ndarray:
    """SDF of a (rounded) box given the signed distances to its slabs.

    Each argument is ``|coordinate - centre| - half_extent`` (or any slab distance).
    ``rounding`` rounds the edges; the half extents should already be reduced by it.
    """
    shifted = [d + np.float32(rounding) for d in distances]
    outside = np.zeros_like(shifted[0])
    inside = shifted[0].copy()
    for d in shifted:
        positive = np.maximum(d, 0.0)
        outside += positive * positive
        np.maximum(inside, d, out=inside)
    return np.sqrt(outside) + np.minimum(inside, 0.0) - np.float32(rounding)


def dot3(vector: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``vector . point`` for every column of a (3, N) array.

    Written out rather than ``np.dot``: the BLAS call would wake BLAS worker threads
    that then spin on the other cores, for no gain on a 3-element inner product.
    """
    v = np.asarray(vector, dtype=np.float32)
    return v[0] * points[0] + v[1] * points[1] + v[2] * points[2]


def _norm(vectors: np.ndarray) -> np.ndarray:
    """Euclidean length of each column of a (3, N) array."""
    return np.sqrt(vectors[0] * vectors[0] + vectors[1] * vectors[1] + vectors[2] * vectors[2])


def sphere(points: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    """SDF of a sphere; ``points`` has shape (3, N)."""
    d = points - np.asarray(center, dtype=np.float32)[:, None]
    return _norm(d) - np.float32(radius)


def capsule(points: np.ndarray, start: np.ndarray, end: np.ndarray, radius: float) -> np.ndarray:
    """SDF of a capsule (a cylinder with round ends) between ``start`` and ``end``."""
    a = np.asarray(start, dtype=np.float32)
    b = np.asarray(end, dtype=np.float32)
    axis = b - a
    pa = points - a[:, None]
    t = np.clip(dot3(axis, pa) * np.float32(1.0 / float(axis @ axis)), 0.0, 1.0)
    closest = pa - axis[:, None] * t[None, :]
    return _norm(closest) - np.float32(radius)


def ellipse_distance(x: np.ndarray, y: np.ndarray, a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """Approximate signed distance to the ellipse (x/a)^2 + (y/b)^2 = 1.

    First-order estimate ``(r - 1) / |grad r|``: exact on the curve, good near it.
    """
    xa = x / a
    yb = y / b
    r = np.sqrt(xa * xa + yb * yb) + np.float32(1e-6)
    gx = xa / a
    gy = yb / b
    grad = np.sqrt(gx * gx + gy * gy) / r + np.float32(1e-9)
    return (r - 1.0) / grad


def ellipsoid_distance(
    local: tuple[np.ndarray, np.ndarray, np.ndarray], radii: tuple[float, float, float]
) -> np.ndarray:
    """Approximate signed distance to an ellipsoid in its own axes (centred at 0)."""
    (p, q, s), (ra, rb, rc) = local, radii
    pa, qb, sc = p / ra, q / rb, s / rc
    r = np.sqrt(pa * pa + qb * qb + sc * sc) + np.float32(1e-6)
    grad = np.sqrt((pa / ra) ** 2 + (qb / rb) ** 2 + (sc / rc) ** 2) / r + np.float32(1e-9)
    return (r - 1.0) / grad


def capsule_box(start: np.ndarray, end: np.ndarray, radius: float) -> Box:
    """Bounding box of a capsule."""
    low = np.minimum(start, end) - radius
    high = np.maximum(start, end) + radius
    return Box(tuple(low.tolist()), tuple(high.tolist()))


def sphere_box(center: np.ndarray, radius: float) -> Box:
    """Bounding box of a sphere."""
    c = np.asarray(center, dtype=np.float64)
    return Box(tuple((c - radius).tolist()), tuple((c + radius).tolist()))
