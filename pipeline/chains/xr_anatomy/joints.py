"""The sacroiliac joint region: where to crop the radiograph for the classifier.

Published rule (Dorfner et al. 2024, ``creat_SIJ_mask``): dilate the sacrum mask with a square
of half-width round(5 % of the sacrum's bounding-box width) (width = last − first column), intersect
it with each ilium, keep each side's largest connected component; the crop is the bounding box
of both sides together, so the classifier sees both joints and the sacrum between them. (The
published app then trims that box once more with an Otsu threshold of the boxed image, which
only removes dark rows or columns at its edges; inside a pelvis there are none worth the step,
so the box is cropped as it is.)

Fallbacks, in order, when a side has no intersection:

1. ``median-height band`` (the published fallback): the ilium columns whose vertical extent
   equals the median extent, each widened by ±5 columns, from that column's top down by the
   median height; its largest component.
2. ``mirrored`` (ours): that side's ilium is missing from the segmentation altogether, so the
   other side's region is mirrored about the sacrum's middle column.

No sacrum, or neither side found: :class:`JointRegionError` (the image is probably not an AP
pelvic radiograph, and a classification of an arbitrary crop would mean nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from .preprocess import otsu_trim

SIDES = ("left", "right")  # the patient's
BAND_HALF_WIDTH = 5  # columns either side of a median-height column (published)


class JointRegionError(ValueError):
    """No usable joint region in the segmentation."""


@dataclass(frozen=True)
class Box:
    """A pixel box, half-open: rows r0 ≤ r < r1, columns c0 ≤ c < c1."""

    r0: int
    c0: int
    r1: int
    c1: int

    @classmethod
    def of(cls, mask: np.ndarray) -> Box:
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            raise JointRegionError("empty mask has no bounding box")
        return cls(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)

    def union(self, other: Box) -> Box:
        return Box(min(self.r0, other.r0), min(self.c0, other.c0), max(self.r1, other.r1), max(self.c1, other.c1))

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.r0, self.r1), slice(self.c0, self.c1)

    def as_list(self) -> list[int]:
        return [self.r0, self.c0, self.r1, self.c1]


@dataclass(frozen=True)
class JointRegion:
    """One side's joint region on the radiograph grid."""

    side: str  # the patient's: left / right
    mask: np.ndarray  # bool, the radiograph's shape
    box: Box
    method: str  # intersection | median-height band | mirrored


@dataclass(frozen=True)
class JointCrop:
    """Both joint regions and the box the classifier's crop is cut from."""

    regions: Mapping[str, JointRegion]
    box: Box
    dilation_px: int
    untrimmed: Box | None = None  # the joint box before the Otsu trim, where it was trimmed

    @property
    def fallbacks(self) -> dict[str, str]:
        """The sides whose region did not come from the published intersection, and how they were found."""
        return {side: r.method for side, r in self.regions.items() if r.method != "intersection"}


def dilate_square(mask: np.ndarray, extent: int) -> np.ndarray:
    """Binary dilation with a (2·extent+1)² square (as the published cv2.dilate), done as two
    separable 1-D maximum filters: the same result, much faster on a full-size radiograph."""
    if extent <= 0:
        return mask.astype(bool)
    size = 2 * extent + 1
    dilated = ndimage.maximum_filter1d(mask.astype(np.uint8), size, axis=0, mode="constant")
    return ndimage.maximum_filter1d(dilated, size, axis=1, mode="constant").astype(bool)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component (scipy's default, as published); an empty mask stays empty."""
    labelled, count = ndimage.label(mask)
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labelled.ravel())[1:]
    return labelled == (int(np.argmax(sizes)) + 1)


def median_height_band(ilium: np.ndarray) -> np.ndarray:
    """The published fallback region for one ilium (see the module docstring); empty if no ilium."""
    band = np.zeros(ilium.shape, dtype=bool)
    columns = np.flatnonzero(ilium.any(axis=0))
    if columns.size == 0:
        return band
    tops = np.argmax(ilium[:, columns], axis=0)
    bottoms = ilium.shape[0] - 1 - np.argmax(ilium[::-1, columns], axis=0)
    heights = bottoms - tops + 1
    median = int(np.round(np.median(heights)))
    for column, top in zip(columns[heights == median], tops[heights == median]):
        band[top : top + median, max(0, column - BAND_HALF_WIDTH) : column + BAND_HALF_WIDTH] = True
    return band


def sacrum_dilation(sacrum: np.ndarray, fraction: float) -> int:
    """Dilation half-width: round(fraction × sacrum bounding-box width), width = last − first column."""
    columns = np.flatnonzero(sacrum.any(axis=0))
    return int(np.round(fraction * (columns[-1] - columns[0])))


def _mirror(region: np.ndarray, axis_column: float) -> np.ndarray:
    """``region`` reflected about a column (pixels that land off the image are dropped)."""
    mirrored = np.zeros_like(region)
    rows, cols = np.nonzero(region)
    new_cols = np.round(2 * axis_column - cols).astype(int)
    keep = (new_cols >= 0) & (new_cols < region.shape[1])
    mirrored[rows[keep], new_cols[keep]] = True
    return mirrored


def joint_regions(labels: np.ndarray, classes: Mapping[str, int], sacrum_class: int = 1, dilation_fraction: float = 0.05) -> JointCrop:
    """Both joint regions from a class map on the radiograph grid.

    ``classes`` maps each patient side to the label of that side's ilium in ``labels``.
    """
    sacrum = labels == sacrum_class
    if not sacrum.any():
        raise JointRegionError("the segmentation found no sacrum: not an AP pelvic radiograph?")
    extent = sacrum_dilation(sacrum, dilation_fraction)
    dilated = dilate_square(sacrum, extent)
    masks: dict[str, np.ndarray] = {}
    methods: dict[str, str] = {}
    for side in SIDES:
        ilium = labels == classes[side]
        region = largest_component(dilated & ilium)
        method = "intersection"
        if not region.any():
            region = largest_component(median_height_band(ilium))
            method = "median-height band"
        if region.any():
            masks[side], methods[side] = region, method
    if not masks:
        raise JointRegionError("neither ilium was found next to the sacrum")
    columns = np.flatnonzero(sacrum.any(axis=0))
    middle = (columns[0] + columns[-1]) / 2
    for side in SIDES:
        if side not in masks:
            other = "right" if side == "left" else "left"
            masks[side], methods[side] = _mirror(masks[other], middle), "mirrored"
    regions = {side: JointRegion(side, masks[side], Box.of(masks[side]), methods[side]) for side in SIDES}
    return JointCrop(regions, regions["left"].box.union(regions["right"].box), extent)


def trimmed(crop: JointCrop, gray: np.ndarray) -> JointCrop:
    """``crop`` with its box shrunk by the published Otsu trim of the boxed radiograph ``gray``."""
    box = crop.box
    rows, cols = otsu_trim(gray[box.slices], outside_pixels=gray.size - (box.r1 - box.r0) * (box.c1 - box.c0))
    inner = Box(box.r0 + rows.start, box.c0 + cols.start, box.r0 + rows.stop, box.c0 + cols.stop)
    return replace(crop, box=inner, untrimmed=box)


def ilium_classes(labels: np.ndarray, first: int, second: int, left_on_image_right: bool) -> dict[str, int]:
    """Which ilium label is the patient's left, decided by where each lies in the image.

    The side a network's class is called is a convention of its training labels; where the bone
    actually is, together with the image's orientation, is not. So the ilium lying toward the
    patient's left (image right for PatientOrientation L\\F) is the left one, whatever its class.
    With one ilium or none, the class numbering is kept.
    """
    centres = {}
    for value in (first, second):
        cols = np.nonzero(labels[::4, ::4] == value)[1]
        if cols.size:
            centres[value] = float(cols.mean())
    if len(centres) < 2:
        return {"left": first, "right": second}
    toward_left = max(centres, key=centres.get) if left_on_image_right else min(centres, key=centres.get)
    return {"left": toward_left, "right": second if toward_left == first else first}
