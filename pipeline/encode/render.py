"""Pixels of a heatmap: the source in grayscale, the map in colour over it, a colour bar and text.

Pure numpy/Pillow functions on arrays, kept apart from DICOM wrapping so they can be tested on
their own. The colormap is jet, written out here, so that rendering needs no matplotlib.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

log = logging.getLogger(__name__)

# Map values below this are fully transparent; opacity then rises linearly to MAX_OPACITY at 1.
TRANSPARENT_BELOW = 0.2
MAX_OPACITY = 0.6
# When the source has no window: the percentiles that span the display range (robust to outliers).
PERCENTILE_WINDOW = (1.0, 99.0)
# Text: tallest font for big images, smallest we accept, and how much of the height text may use.
MIN_FONT_PX = 5
MAX_FONT_PX = 18
TEXT_HEIGHT_FRACTION = 0.45
MARGIN_PX = 1
# Opacity of the dark band behind the text: the image under it keeps 1 - 160/255 of its light.
TEXT_SHADE_ALPHA = 160


def source_frame(source: Dataset, frame: int | None) -> np.ndarray | None:
    """The stored pixels of one frame (1-based, as in DICOM) of the source; None without pixels."""
    if "PixelData" not in source:
        return None
    pixels = source.pixel_array
    if int(source.get("NumberOfFrames", 1)) > 1:
        pixels = pixels[(frame or 1) - 1]
    if int(source.get("SamplesPerPixel", 1)) == 3:
        pixels = pixels.mean(axis=-1)  # a colour source: its luminance is what a reader sees
    return pixels


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear VOI function (PS3.3 C.11.2.1.2.1), to [0, 1]."""
    if width <= 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first(value: object) -> float:
    """The first value of a possibly multi-valued DS (of several windows, viewers use the first)."""
    return (
        float(value[0])
        if isinstance(value, Sequence) and not isinstance(value, str)
        else float(value)
    )


def display_grayscale(source: Dataset, frame: int | None = None) -> np.ndarray:
    """The source as a reader first sees it, in [0, 1]: rescaled, windowed, MONOCHROME1 inverted.

    Without pixel data (a header-only source), the background is black and a warning is logged.
    """
    rows, columns = int(source.Rows), int(source.Columns)
    pixels = source_frame(source, frame)
    if pixels is None:
        log.warning("source %s has no pixel data; heatmap drawn on black", source.SOPInstanceUID)
        return np.zeros((rows, columns))
    return voi_grayscale(np.asarray(apply_modality_lut(pixels, source), dtype=np.float64), source)


def voi_grayscale(values: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Modality values through the dataset's VOI to [0, 1], MONOCHROME1 inverted.

    The first window, by DICOM's linear function (written out: pydicom's general apply_voi_lut
    takes ~0.3 s on a radiograph); for a VOI LUT sequence or a non-linear window function,
    pydicom's apply_voi_lut; without either, the percentile window, so that a raw detector image
    still fills the grey scale. Keeps the dtype of ``values``.
    """
    linear = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").upper() == "LINEAR"
    if dataset.get("WindowCenter") and dataset.get("WindowWidth") and linear and "VOILUTSequence" not in dataset:
        gray = linear_window(values, _first(dataset.WindowCenter), _first(dataset.WindowWidth))
    else:
        if dataset.get("WindowCenter") or "VOILUTSequence" in dataset:
            values = np.asarray(apply_voi_lut(values, dataset, index=0), dtype=values.dtype)
            low, high = float(values.min()), float(values.max())
        else:
            low, high = np.percentile(values, PERCENTILE_WINDOW)
        gray = np.clip((values - low) / max(high - low, 1e-9), 0.0, 1.0)
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        gray = 1.0 - gray
    return gray.astype(values.dtype, copy=False)


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colormap: [0, 1] → RGB in [0, 1] (blue, cyan, yellow, red)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peak at 3/4, 1/2, 1/4
    return np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)


def overlay_opacity(values: np.ndarray) -> np.ndarray:
    """Opacity of the colour at each pixel: none where the map is low, MAX_OPACITY at 1."""
    ramp = (np.clip(values, 0.0, 1.0) - TRANSPARENT_BELOW) / (1.0 - TRANSPARENT_BELOW)
    return MAX_OPACITY * np.clip(ramp, 0.0, 1.0)


def blend(gray: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The map in colour over the grayscale image, as uint8 RGB."""
    if gray.shape != values.shape:
        raise ValueError(f"map shape {values.shape} is not the source's {gray.shape}")
    alpha = overlay_opacity(values)[..., None]
    rgb = (1.0 - alpha) * gray[..., None] + alpha * jet(values)
    return np.round(255 * rgb).astype(np.uint8)


@dataclass(frozen=True)
class TextLayout:
    """Where burned-in text goes: font size, wrapped lines, each line's box (x0, y0, x1, y1)."""

    font_size: int
    lines: tuple[str, ...]
    boxes: tuple[tuple[int, int, int, int], ...]

    @property
    def top(self) -> int:
        return min(box[1] for box in self.boxes) if self.boxes else 0


def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's built-in scalable font: no font file to ship or find.
    return ImageFont.load_default(size=size)


def _split_long_word(word: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """A word wider than ``width`` cut between characters into pieces that fit."""
    pieces = []
    while word:
        cut = len(word)
        while cut > 1 and font.getlength(word[:cut]) > width:
            cut -= 1
        pieces.append(word[:cut])
        word = word[cut:]
    return pieces


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Words to lines no wider than ``width``."""
    lines: list[str] = []
    for word in text.split():
        for piece in _split_long_word(word, font, width):
            if lines and font.getlength(f"{lines[-1]} {piece}") <= width:
                lines[-1] = f"{lines[-1]} {piece}"
            else:
                lines.append(piece)
    return lines


def layout_text(lines: Sequence[str], width: int, height: int) -> TextLayout:
    """The largest font at which ``lines`` (wrapped) fit the image's width and the bottom
    TEXT_HEIGHT_FRACTION of its height; the lines sit at the bottom-left."""
    usable_width = width - 2 * MARGIN_PX
    max_size = min(MAX_FONT_PX, max(MIN_FONT_PX, min(width, height) // 12))
    for size in range(max_size, MIN_FONT_PX - 1, -1):
        font = _font(size)
        wrapped = [part for line in lines for part in _wrap(line, font, usable_width)]
        ascent, descent = font.getmetrics()
        line_height = ascent + descent
        if len(wrapped) * line_height <= TEXT_HEIGHT_FRACTION * height or size == MIN_FONT_PX:
            break
    top = height - MARGIN_PX - len(wrapped) * line_height
    boxes = tuple(
        (
            MARGIN_PX,
            top + i * line_height,
            MARGIN_PX + int(np.ceil(font.getlength(line))),
            top + (i + 1) * line_height,
        )
        for i, line in enumerate(wrapped)
    )
    if top < 0 or any(box[2] > width for box in boxes):
        log.warning("burned-in text does not fit a %dx%d image even at %d px", width, height, size)
    return TextLayout(size, tuple(wrapped), boxes)


def draw_text(rgb: np.ndarray, layout: TextLayout) -> np.ndarray:
    """Burn the laid-out lines into the image: white text on a dimmed band, for contrast."""
    height, width = rgb.shape[:2]
    image = Image.fromarray(rgb, "RGB")
    shade = Image.new("RGBA", image.size, (0, 0, 0, 0))
    ImageDraw.Draw(shade).rectangle(
        (0, layout.top, width, height), fill=(0, 0, 0, TEXT_SHADE_ALPHA)
    )
    image = Image.alpha_composite(image.convert("RGBA"), shade).convert("RGB")
    draw = ImageDraw.Draw(image)
    font = _font(layout.font_size)
    for line, box in zip(layout.lines, layout.boxes):
        draw.text((box[0], box[1]), line, fill=(255, 255, 255), font=font)
    return np.asarray(image)


def draw_colour_bar(rgb: np.ndarray, bottom: int) -> np.ndarray:
    """A vertical jet bar (1 at the top, 0 at the bottom) along the right edge, above ``bottom``."""
    height, width = rgb.shape[:2]
    bar_width = max(2, width // 32)
    top = MARGIN_PX + max(1, height // 16)
    bottom = max(top + 2, bottom - MARGIN_PX)
    out = rgb.copy()
    ramp = np.linspace(1.0, 0.0, bottom - top)[:, None]
    colours = np.round(255 * jet(np.repeat(ramp, bar_width, axis=1))).astype(np.uint8)
    x1 = width - MARGIN_PX
    out[top:bottom, x1 - bar_width : x1] = colours
    return out


def render_heatmap(
    gray: np.ndarray, values: np.ndarray, lines: Sequence[str]
) -> tuple[np.ndarray, TextLayout]:
    """The heatmap image: overlay, colour bar (above the text) and burned-in ``lines``."""
    rgb = blend(gray, values)
    layout = layout_text(lines, rgb.shape[1], rgb.shape[0])
    rgb = draw_colour_bar(rgb, bottom=layout.top)
    return draw_text(rgb, layout), layout
