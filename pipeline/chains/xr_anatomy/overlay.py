"""The segmentation as a map for the heatmap writer: bones, joint regions, boxes and side letters.

A :class:`~pipeline.results.Map` is one float channel in [0, 1] with named categories (the chain
lists them) that the encoder draws in one colour each with a legend, so the classes are told
apart by value and the sides by letters burned into the map:

* 0.5 (green): sacrum and both ilia;
* 0.8 (orange): each joint region the crop was built from;
* 1.0 (dark red): the outline of each side's joint box and of the crop box, and a letter "L" /
  "R" inside the patient's left / right ilium, with a transparent halo (0) around the letter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .joints import Box, JointCrop

BONE, JOINT, MARK = 0.5, 0.8, 1.0


@dataclass(frozen=True)
class Overlay:
    values: np.ndarray  # float32 in [0, 1], the radiograph's shape
    letters: Mapping[str, tuple[int, int]]  # side → (row, column) of the letter's centre


def outline(values: np.ndarray, box: Box, thickness: int, value: float = MARK) -> None:
    """Draw ``box``'s outline into ``values``, inside the box."""
    r0, c0, r1, c1 = box.r0, box.c0, box.r1, box.c1
    t = max(1, min(thickness, (r1 - r0) // 2, (c1 - c0) // 2))
    values[r0 : r0 + t, c0:c1] = value
    values[r1 - t : r1, c0:c1] = value
    values[r0:r1, c0 : c0 + t] = value
    values[r0:r1, c1 - t : c1] = value


def interior_point(mask: np.ndarray, step: int = 8) -> tuple[int, int] | None:
    """The point of ``mask`` farthest from its border (on every ``step``-th pixel, for speed)."""
    coarse = mask[::step, ::step]
    if not coarse.any():
        return None
    distance = ndimage.distance_transform_edt(coarse)
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(row) * step, int(col) * step


def draw_letter(values: np.ndarray, letter: str, centre: tuple[int, int], height: int) -> None:
    """Burn ``letter`` (value 1) with a transparent halo (value 0), centred at ``centre``."""
    font = ImageFont.load_default(size=height)
    halo = max(2, height // 10)
    left, top, right, bottom = font.getbbox(letter, stroke_width=halo)
    patch = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(patch).text((-left, -top), letter, font=font, fill=255, stroke_width=halo, stroke_fill=128)
    pixels = np.asarray(patch)
    r0 = centre[0] - pixels.shape[0] // 2
    c0 = centre[1] - pixels.shape[1] // 2
    rows = slice(max(r0, 0), min(r0 + pixels.shape[0], values.shape[0]))
    cols = slice(max(c0, 0), min(c0 + pixels.shape[1], values.shape[1]))
    part = pixels[rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0]
    target = values[rows, cols]
    target[part >= 192] = MARK
    target[(part >= 64) & (part < 192)] = 0.0


def segmentation_overlay(labels: np.ndarray, classes: Mapping[str, int], crop: JointCrop, sacrum_class: int = 1) -> Overlay:
    """The overlay map for a class map on the radiograph grid (see the module docstring).

    ``classes`` maps the patient's sides to their ilium labels (as decided by
    :func:`~.joints.ilium_classes`), so the letters follow the patient, not the class numbers.
    """
    values = np.zeros(labels.shape, dtype=np.float32)
    values[(labels == sacrum_class) | (labels == classes["left"]) | (labels == classes["right"])] = BONE
    for region in crop.regions.values():
        values[region.mask] = JOINT
    thickness = max(2, round(min(labels.shape) / 300))
    for region in crop.regions.values():
        outline(values, region.box, thickness)
    outline(values, crop.box, thickness)
    letters = {}
    height = max(12, min(labels.shape) // 12)
    for side, letter in (("left", "L"), ("right", "R")):
        point = interior_point(labels == classes[side])
        if point is not None:
            draw_letter(values, letter, point, height)
            letters[side] = point
    return Overlay(values, letters)
