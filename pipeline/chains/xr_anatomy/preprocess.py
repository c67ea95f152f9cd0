"""Image preprocessing: DICOM to grayscale, the segmenter's input, the classifier's input, and back.

The published pipeline read 8-bit PNG exports of the radiographs; here a DICOM image becomes the
same thing: the grayscale a reader sees (modality LUT, the image's VOI window or LUT,
MONOCHROME1 inverted), quantized to 256 levels. Each later step follows the published code
(FJDorfner/Anatomy-Aware-Classification-axSpA, gradio_code) with MONAI transforms where it used them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    GaussianSmooth,
    NormalizeIntensity,
    Resize,
    ResizeWithPadOrCrop,
    ScaleIntensity,
)
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut
from scipy import ndimage
from skimage import exposure, filters

from pipeline.encode.render import source_frame, voi_grayscale

GRAY_LEVELS = 256  # the published models saw 8-bit images


def radiograph_gray(dataset: Dataset) -> np.ndarray:
    """The radiograph as displayed (pipeline.encode.render's VOI), float32 in [0, 1] on 256 levels."""
    pixels = source_frame(dataset, None)  # multi-frame: the first frame; colour: its luminance
    if pixels is None:
        raise ValueError("the radiograph has no pixel data")
    values = np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float32)
    gray = voi_grayscale(values, dataset)
    return (np.round(gray * (GRAY_LEVELS - 1)) / (GRAY_LEVELS - 1)).astype(np.float32)


def patient_left_on_image_right(dataset: Dataset) -> bool:
    """Whether columns run toward the patient's left (PatientOrientation row direction 'L...').

    An AP radiograph displayed as usual has PatientOrientation L\\F; a flipped one R\\F. Without
    PatientOrientation (or with ImageOrientationPatient, for cross-sectional sources) the
    conventional display is assumed.
    """
    if "ImageOrientationPatient" in dataset:
        return float(dataset.ImageOrientationPatient[0]) >= 0  # +x is the patient's left
    orientation = dataset.get("PatientOrientation")
    if orientation and len(orientation) == 2 and str(orientation[0]):
        return str(orientation[0])[0].upper() != "R"
    return True


# ------------------------------------------------------------------------------ segmentation
@dataclass(frozen=True)
class SegmentationSettings:
    """Published: 768×768, σ 0.1, 512×512 windows with 0.75 overlap, image transposed.

    ``transpose``: the network sees the radiograph as (columns, rows), the layout MONAI's
    LoadImage gives a PNG and the published app fed its UNet (checked: a 100×200 PNG loads as
    200×100); the class map is transposed back. The demonstration pack is trained without it.
    The app's own way back (``Invert`` of its transforms, then ``Rotate90(k=3)``) is shown to give
    the same class map in the tests (test_xr_anatomy_orientation.py).

    ``resample``: how the class map gets from the segmenter's grid to the radiograph's.
    ``"labels"`` (the app: argmax on the network's grid, largest components, nearest-neighbour
    back) moves a class boundary, and so a crop edge, in steps of one grid cell (8-12 pixels of
    a radiograph at 192², 3 at 768²) when a logit margin changes sign. ``"probabilities"`` (ours,
    the default for packs trained here): the softmax is resampled bilinearly to the radiograph
    and the argmax taken there, so a boundary moves continuously with the logits and a rounding
    difference moves it by at most a pixel. See the drift notes in packs/xr-anatomy-demo/README.md.
    """

    size: tuple[int, int]
    gaussian_sigma: float
    roi_size: tuple[int, int]
    overlap: float
    transpose: bool = False
    resample: str = "labels"

    @classmethod
    def from_manifest(cls, preprocessing: Mapping[str, Any]) -> SegmentationSettings:
        section = preprocessing["segmentation"]
        return cls(
            size=tuple(int(v) for v in section["size"]),  # type: ignore[arg-type]
            gaussian_sigma=float(section["gaussian_sigma"]),
            roi_size=tuple(int(v) for v in section["roi_size"]),  # type: ignore[arg-type]
            overlap=float(section["overlap"]),
            transpose=bool(section.get("transpose", False)),
            resample=_choice(section.get("resample", "labels"), ("labels", "probabilities"), "segmentation.resample"),
        )


def _choice(value: Any, allowed: Sequence[str], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def segmenter_transform(settings: SegmentationSettings) -> Compose:
    """Resize (MONAI's default 'area'), z-score, Gaussian smoothing, then scale to [−1, 1]."""
    return Compose(
        [
            Resize(spatial_size=settings.size),
            NormalizeIntensity(),
            GaussianSmooth(sigma=settings.gaussian_sigma),
            ScaleIntensity(minv=-1.0, maxv=1.0),
        ]
    )


def segmenter_input(gray: np.ndarray, settings: SegmentationSettings) -> torch.Tensor:
    """The segmenter's input for a grayscale radiograph: (1, 1, *size), values in [−1, 1]."""
    image = torch.as_tensor(gray.T if settings.transpose else gray, dtype=torch.float32)[None]
    return plain(segmenter_transform(settings)(image)).float()[None]


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor: networks run faster without metadata tracking."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else torch.as_tensor(tensor)


def probabilities_to_grid(logits: torch.Tensor, shape: Sequence[int]) -> np.ndarray:
    """Class map on the radiograph's grid from logits (1, C, h, w) on the segmenter's: softmax,
    bilinear resampling to ``shape`` (pixel centres aligned, as MONAI's Resize), argmax."""
    probabilities = torch.softmax(logits.float(), dim=1)
    resized = torch.nn.functional.interpolate(probabilities, size=tuple(shape), mode="bilinear", align_corners=False)
    return resized.argmax(dim=1)[0].to(torch.uint8).numpy()


def labels_to_grid(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A class map from the segmenter's grid to the radiograph's (nearest neighbour: classes stay classes)."""
    tensor = torch.as_tensor(labels.astype(np.uint8))[None, None].float()
    resized = torch.nn.functional.interpolate(tensor, size=tuple(shape), mode="nearest")
    return resized[0, 0].to(torch.uint8).numpy()


# ---------------------------------------------------------------------------- classification
@dataclass(frozen=True)
class ClassificationSettings:
    """Published: 416×628 input, 3×3 median, 0.6 × Gaussian(σ 1) subtracted, CLAHE clip 0.01."""

    size: tuple[int, int]
    median_size: int
    unsharp_weight: float
    unsharp_sigma: float
    clahe_clip_limit: float

    @classmethod
    def from_manifest(cls, preprocessing: Mapping[str, Any]) -> ClassificationSettings:
        section = preprocessing["classification"]
        return cls(
            size=tuple(int(v) for v in section["size"]),  # type: ignore[arg-type]
            median_size=int(section["median_size"]),
            unsharp_weight=float(section["unsharp_weight"]),
            unsharp_sigma=float(section["unsharp_sigma"]),
            clahe_clip_limit=float(section["clahe_clip_limit"]),
        )


def otsu_trim(crop: np.ndarray, outside_pixels: int = 0) -> tuple[slice, slice]:
    """The published trim of the joint crop (``threshold_based_crop``): Otsu's threshold splits
    the boxed image into dark background and the rest, and the crop shrinks to the bounding box
    of what lies above the threshold.

    In the app the boxed image is the whole 8-bit radiograph with everything outside the box
    set to zero, so Otsu's histogram holds those zeros too: ``outside_pixels`` adds them to the
    first bin (scikit-image's Otsu on a histogram; SimpleITK's, which the app used, splits the
    same 256 levels). Returns the rows and columns of ``crop`` to keep (all of it when nothing
    lies above the threshold).
    """
    levels = np.round(crop * (GRAY_LEVELS - 1)).astype(np.int64)
    counts = np.bincount(levels.ravel(), minlength=GRAY_LEVELS)
    counts[0] += int(outside_pixels)
    threshold = filters.threshold_otsu(hist=(counts, np.arange(GRAY_LEVELS)))
    foreground = levels > threshold
    rows, cols = np.flatnonzero(foreground.any(axis=1)), np.flatnonzero(foreground.any(axis=0))
    if rows.size == 0 or cols.size == 0:
        return slice(0, crop.shape[0]), slice(0, crop.shape[1])
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _rescale(image: np.ndarray) -> np.ndarray:
    """skimage's rescale_intensity(in_range='image', out_range=(0, 1)), for a float image."""
    low, high = float(image.min()), float(image.max())
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def enhance(crop: np.ndarray, settings: ClassificationSettings) -> np.ndarray:
    """The published contour enhancement + CLAHE (Qiu et al.), on the crop at full resolution.

    Rescale to [0, 1], median filter (3×3, edges repeated as skimage does), subtract
    ``unsharp_weight`` × Gaussian(σ) of the result (scipy's Gaussian with skimage's defaults:
    truncate 4, edges repeated), rescale, then skimage's CLAHE with the default kernel (1/8 of
    each side) and clip limit 0.01. The published code ran these on a (1, H, W) array; with
    one plane every step gives the same numbers as on (H, W), checked in the tests.
    """
    image = _rescale(crop.astype(np.float64))
    denoised = ndimage.median_filter(image, size=settings.median_size, mode="nearest")
    blurred = ndimage.gaussian_filter(denoised, settings.unsharp_sigma, mode="nearest", truncate=4.0)
    contoured = _rescale(denoised - settings.unsharp_weight * blurred)
    return exposure.equalize_adapthist(contoured, clip_limit=settings.clahe_clip_limit).astype(np.float32)


@lru_cache(maxsize=8)
def classifier_transform(settings: ClassificationSettings) -> Compose:
    """Resize the longest side to the input width (bilinear, corners aligned), then pad/crop to the input size.

    One instance per settings: MONAI inverts a transform only with the instance that applied it.
    """
    return Compose(
        [
            Resize(spatial_size=max(settings.size), size_mode="longest", mode="bilinear", align_corners=True),
            ResizeWithPadOrCrop(spatial_size=settings.size),
        ]
    )


def classifier_input(crop: np.ndarray, settings: ClassificationSettings) -> MetaTensor:
    """The classifier's input for a crop: a (1, H, W) MetaTensor in [0, 1] that remembers its
    resize and pad, so that :func:`map_to_crop` can take a map on it back to the crop."""
    enhanced = MetaTensor(torch.as_tensor(enhance(crop, settings))[None])
    return classifier_transform(settings)(enhanced)


def map_to_crop(values: torch.Tensor, transformed: MetaTensor, settings: ClassificationSettings) -> np.ndarray:
    """A map on the classifier's input grid (H, W) back onto the crop's grid, by inverting the
    pad/crop and the resize that made ``transformed``."""
    carried = MetaTensor(values.detach().float().cpu().reshape(1, *transformed.shape[-2:]))
    carried.applied_operations = [dict(op) for op in transformed.applied_operations]
    restored = classifier_transform(settings).inverse(carried)
    return np.asarray(restored[0].detach().cpu().numpy(), dtype=np.float32)
