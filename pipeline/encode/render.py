"""Pixels of a heatmap: the source in grayscale, the map in colour over it, and below the image a
band with the text, and the colour bar with its scale (or the legend of a categorical map).

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
# Text: its height relative to the image's larger side, so that it stays legible when the whole
# image is fitted into a 1,000-pixel viewport (a 2,350-row radiograph gets 42 px letters, shown
# at ~17 px), and never below MIN_FONT_PX. All text sits in a band *below* the image: it never
# covers anatomy. The band also holds the colour bar with its scale, or a categorical legend.
MIN_FONT_PX = 12
TEXT_FRACTION = 0.018
MARGIN_PX = 2
# A narrow image gets a wider canvas (black right of the image), so its text need not wrap word by word.
MIN_CANVAS_WIDTH = 320


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


def display_grayscale(source: Dataset, frame: int | None = None, window: tuple[float, float] | None = None) -> np.ndarray:
    """The source as a reader first sees it, in [0, 1]: rescaled, windowed, MONOCHROME1 inverted.

    ``window``: (centre, width) in modality units, instead of the source's own (a chain's
    ``Map.display_window``). Without pixel data (a header-only source), the background is black
    and a warning is logged.
    """
    rows, columns = int(source.Rows), int(source.Columns)
    pixels = source_frame(source, frame)
    if pixels is None:
        log.warning("source %s has no pixel data; heatmap drawn on black", source.SOPInstanceUID)
        return np.zeros((rows, columns))
    values = np.asarray(apply_modality_lut(pixels, source), dtype=np.float64)
    if window is None:
        return voi_grayscale(values, source)
    gray = linear_window(values, *window)
    return 1.0 - gray if source.get("PhotometricInterpretation") == "MONOCHROME1" else gray


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


#: colours of a categorical map's categories, in order (distinct, and none of them gray)
CATEGORY_COLOURS = ((0, 200, 80), (255, 150, 0), (220, 0, 0), (0, 120, 255), (200, 0, 200), (0, 200, 200))
CATEGORY_OPACITY = 0.5


def blend_categories(gray: np.ndarray, values: np.ndarray, categories: Sequence[tuple[float, str]]) -> np.ndarray:
    """A categorical map over the grayscale image, one fixed colour per category, as uint8 RGB."""
    if gray.shape != values.shape:
        raise ValueError(f"map shape {values.shape} is not the source's {gray.shape}")
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for (value, _), colour in zip(categories, CATEGORY_COLOURS):
        where = np.isclose(values, value)
        rgb[where] = (1 - CATEGORY_OPACITY) * rgb[where] + CATEGORY_OPACITY * np.asarray(colour) / 255.0
    return np.round(255 * rgb).astype(np.uint8)


def font_px(rows: int, columns: int) -> int:
    """The text height for an image: TEXT_FRACTION of its larger side, at least MIN_FONT_PX."""
    return max(MIN_FONT_PX, round(TEXT_FRACTION * max(rows, columns)))


@dataclass(frozen=True)
class TextLayout:
    """The band below the image: font size, wrapped lines and their boxes (x0, y0, x1, y1) in the
    output image, where the band starts (the source's row count) and where the scale goes."""

    font_size: int
    lines: tuple[str, ...]
    boxes: tuple[tuple[int, int, int, int], ...]
    top: int  # first row of the band (= the source's rows)
    scale_top: int  # first row of the colour bar / legend
    height: int  # rows of the whole output image
    width: int  # columns of the whole output image (the source's, or MIN_CANVAS_WIDTH)

    @property
    def line_height(self) -> int:
        ascent, descent = _font(self.font_size).getmetrics()
        return ascent + descent


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


def layout_text(lines: Sequence[str], width: int, height: int, scale_lines: int = 2) -> TextLayout:
    """``lines`` wrapped to the image's width, in a band below its ``height`` rows, followed by
    ``scale_lines`` line heights for the colour bar and its tick labels (or the legend)."""
    size = font_px(height, width)
    width = max(width, MIN_CANVAS_WIDTH)
    font = _font(size)
    wrapped = [part for line in lines for part in _wrap(line, font, width - 2 * MARGIN_PX)]
    ascent, descent = font.getmetrics()
    line_height = ascent + descent
    top = height + MARGIN_PX
    boxes = tuple(
        (MARGIN_PX, top + i * line_height, MARGIN_PX + int(np.ceil(font.getlength(line))), top + (i + 1) * line_height)
        for i, line in enumerate(wrapped)
    )
    scale_top = top + len(wrapped) * line_height + MARGIN_PX
    total = scale_top + scale_lines * line_height + MARGIN_PX
    return TextLayout(size, tuple(wrapped), boxes, height, scale_top, total, width)


def draw_band(rgb: np.ndarray, layout: TextLayout) -> np.ndarray:
    """The image on top of a black band of ``layout.height`` rows, with the lines in white."""
    out = np.zeros((layout.height, layout.width, 3), dtype=np.uint8)
    out[: rgb.shape[0], : rgb.shape[1]] = rgb
    image = Image.fromarray(out, "RGB")
    draw = ImageDraw.Draw(image)
    font = _font(layout.font_size)
    for line, box in zip(layout.lines, layout.boxes):
        draw.text((box[0], box[1]), line, fill=(255, 255, 255), font=font)
    return np.asarray(image).copy()


def draw_colour_bar(rgb: np.ndarray, layout: TextLayout, title: str) -> np.ndarray:
    """A horizontal jet bar from 0 (left) to 1 (right) with ticks 0, 0.25, ..., 1 and ``title``."""
    width = rgb.shape[1]
    font = _font(layout.font_size)
    line_height = layout.line_height
    title_width = min(int(font.getlength(title)) + 2 * MARGIN_PX, width // 2)
    x0, x1 = title_width + MARGIN_PX, width - MARGIN_PX - int(font.getlength("1.00")) // 2
    y0 = layout.scale_top
    y1 = y0 + max(2, line_height * 2 // 3)
    out = rgb.copy()
    if x1 - x0 >= 8:
        ramp = np.linspace(0.0, 1.0, x1 - x0)[None, :]
        out[y0:y1, x0:x1] = np.round(255 * jet(np.repeat(ramp, y1 - y0, axis=0))).astype(np.uint8)
    image = Image.fromarray(out, "RGB")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN_PX, y0), title, fill=(255, 255, 255), font=font)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = x0 + tick * (x1 - x0 - 1)
        label = f"{tick:g}"
        draw.line((x, y0, x, y1 + line_height // 6), fill=(255, 255, 255))
        draw.text((x - font.getlength(label) / 2, y1 + line_height // 6), label, fill=(255, 255, 255), font=font)
    return np.asarray(image).copy()


def draw_legend(rgb: np.ndarray, layout: TextLayout, categories: Sequence[tuple[float, str]]) -> np.ndarray:
    """One swatch and label per category, left to right (wrapping to a second line if needed)."""
    image = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(image)
    font = _font(layout.font_size)
    line_height = layout.line_height
    x, y = MARGIN_PX, layout.scale_top
    for (_, label), colour in zip(categories, CATEGORY_COLOURS):
        needed = line_height + MARGIN_PX * 3 + font.getlength(label)
        if x > MARGIN_PX and x + needed > rgb.shape[1]:
            x, y = MARGIN_PX, y + line_height
        draw.rectangle((x, y + 2, x + line_height - 4, y + line_height - 2), fill=colour)
        draw.text((x + line_height, y), label, fill=(255, 255, 255), font=font)
        x += int(needed) + font.getlength("  ")
    return np.asarray(image).copy()


def render_heatmap(
    gray: np.ndarray,
    values: np.ndarray,
    lines: Sequence[str],
    *,
    categories: Sequence[tuple[float, str]] = (),
    scale_title: str = "map value",
) -> tuple[np.ndarray, TextLayout]:
    """The heatmap image: the map over the image, and below it the ``lines`` and the colour bar
    with its 0-1 scale (or, for a categorical map, the legend of its ``categories``)."""
    if categories:
        rgb = blend_categories(gray, values, categories)
        font = _font(font_px(*gray.shape))
        legend_width = sum(font.getlength(label) + 2 * font_px(*gray.shape) for _, label in categories)
        canvas = max(gray.shape[1], MIN_CANVAS_WIDTH)
        layout = layout_text(lines, gray.shape[1], gray.shape[0], scale_lines=1 + int(legend_width // canvas))
        return draw_legend(draw_band(rgb, layout), layout, categories), layout
    rgb = blend(gray, values)
    layout = layout_text(lines, gray.shape[1], gray.shape[0])
    return draw_colour_bar(draw_band(rgb, layout), layout, scale_title), layout
