"""From an axial T2FS series to the model's bag: slices in patient order, then the seed's preprocessing.

Order: along the slice normal (the cross product of ImageOrientationPatient's row and column
directions), by ImagePositionPatient projected on it; never by InstanceNumber, which scanners
number in either direction.

Two recipes, named by the pack manifest's ``preprocessing.recipe``:

* ``keskin2026-t2fs-v1`` (the demonstration packs; a declared deviation): per slice resize to
  ``input_size``², scale to 0–255, histogram equalization, z-score -- one channel.
* ``keskin2026-t2fs-paper`` (the paper's order): per slice to 8-bit grayscale (scale to 0–255,
  round), resize to ``input_size``² (bilinear, rounded back to 8 bits, as a PNG resize), scale to
  0–255, histogram equalization, then ImageNet normalisation on three identical channels, the
  input an ImageNet-pretrained ResNet-18 expects.

MONAI array transforms in a MONAI ``Compose``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut

#: what the pack manifest records as ``preprocessing`` (the chain checks it against this)
PREPROCESSING: dict[str, Any] = {
    "recipe": "keskin2026-t2fs-v1",
    "slice_order": "ImagePositionPatient projected on the slice normal (IOP row x column), ascending",
    "per_slice": ["resize to input_size x input_size (bilinear)", "scale to 0-255", "histogram equalization (256 bins)", "z-score normalization"],
    "modality_lut": True,
    # the demonstration recipe, declared against the paper's (PAPER_PREPROCESSING, model.PAPER_HYPERPARAMETERS)
    "deviations_from_paper": [
        "one channel with a per-slice z-score instead of three identical channels with ImageNet normalisation: "
        "no ImageNet-pretrained weights can be had here, so nothing is gained by ImageNet's input statistics",
        "resize before scaling to 0-255, and no 8-bit rounding",
        "one sigmoid output instead of two softmax classes",
    ],
}


#: the paper's preprocessing (Keskin et al. 2026, Methods), for packs in its layout
PAPER_PREPROCESSING: dict[str, Any] = {
    "recipe": "keskin2026-t2fs-paper",
    "slice_order": PREPROCESSING["slice_order"],
    "per_slice": [
        "8-bit grayscale (scale to 0-255, round)",
        "resize to input_size x input_size (bilinear, rounded to 8 bits)",
        "scale to 0-255",
        "histogram equalization (256 bins)",
        "three identical channels, ImageNet normalisation (mean 0.485/0.456/0.406, std 0.229/0.224/0.225 of 0-1)",
    ],
    "modality_lut": True,
}
RECIPES: dict[str, dict[str, Any]] = {recipe["recipe"]: recipe for recipe in (PREPROCESSING, PAPER_PREPROCESSING)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SliceOrderError(ValueError):
    """The slices cannot be put in patient order (no geometry, or not one stack)."""


def slice_normal(dataset: Dataset) -> np.ndarray:
    orientation = np.asarray([float(v) for v in dataset.ImageOrientationPatient], dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / np.linalg.norm(normal)


def order_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The datasets sorted along the slice normal by ImagePositionPatient (ascending)."""
    if not datasets:
        raise SliceOrderError("the series has no images")
    missing = [str(ds.get("SOPInstanceUID", "?")) for ds in datasets if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds]
    if missing:
        raise SliceOrderError(f"{len(missing)} image(s) lack ImagePositionPatient/ImageOrientationPatient, e.g. {missing[0]}")
    normal = slice_normal(datasets[0])
    for dataset in datasets[1:]:
        if abs(float(slice_normal(dataset) @ normal)) < 0.99:
            raise SliceOrderError(f"image {dataset.SOPInstanceUID} is not parallel to the others: not one stack of slices")
    positions = [float(np.asarray([float(v) for v in ds.ImagePositionPatient]) @ normal) for ds in datasets]
    order = np.argsort(positions, kind="stable")
    return [datasets[int(i)] for i in order]


def slice_pixels(dataset: Dataset) -> np.ndarray:
    """The stored pixels through the modality LUT, as float32 (rows, columns)."""
    pixels = dataset.pixel_array
    if pixels.ndim != 2:
        raise ValueError(f"image {dataset.SOPInstanceUID}: expected one 2-D frame, got shape {pixels.shape}")
    return np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float32)


class PerSlice:
    """Apply a MONAI array transform to each slice (channel) of a (slices, rows, columns) stack on its own."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, stack: Any) -> torch.Tensor:
        return torch.stack([torch.as_tensor(self.transform(plane[None]))[0] for plane in torch.as_tensor(stack)])


def slice_transform(input_size: int) -> Any:
    """The seed's per-slice preprocessing as a MONAI Compose on a (slices, rows, columns) stack.

    The slices ride in the channel dimension, and every step works per slice: Resize treats
    channels alike, ScaleIntensity and NormalizeIntensity run ``channel_wise``, and histogram
    equalization runs slice by slice.
    """
    from monai.transforms import (
        Compose,
        HistogramNormalize,
        NormalizeIntensity,
        Resize,
        ScaleIntensity,
    )

    return Compose(
        [
            Resize((input_size, input_size), mode="bilinear", align_corners=False, anti_aliasing=True),
            ScaleIntensity(minv=0.0, maxv=255.0, channel_wise=True),
            PerSlice(HistogramNormalize(num_bins=256, min=0, max=255)),
            NormalizeIntensity(channel_wise=True),
        ]
    )


def paper_slice_transform(input_size: int) -> Any:
    """The paper's per-slice steps up to histogram equalization (0–255), on a (slices, rows, columns) stack."""
    from monai.transforms import Compose, HistogramNormalize, Lambda, Resize, ScaleIntensity

    def to_8_bit(stack: Any) -> Any:
        return torch.round(torch.as_tensor(stack)).clamp(0, 255)

    return Compose(
        [
            ScaleIntensity(minv=0.0, maxv=255.0, channel_wise=True),
            Lambda(to_8_bit),
            Resize((input_size, input_size), mode="bilinear", align_corners=False),
            Lambda(to_8_bit),
            ScaleIntensity(minv=0.0, maxv=255.0, channel_wise=True),
            PerSlice(HistogramNormalize(num_bins=256, min=0, max=255)),
        ]
    )


def preprocess_slices(images: Sequence[np.ndarray], input_size: int, recipe: str = PREPROCESSING["recipe"]) -> torch.Tensor:
    """2-D slices in patient order → the bag tensor (slices, channels, input_size, input_size),
    float32: one channel for ``keskin2026-t2fs-v1``, three for ``keskin2026-t2fs-paper``."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown t2fs-mil preprocessing recipe {recipe!r}; known: {', '.join(RECIPES)}")
    shapes = {image.shape for image in images}
    if len(shapes) != 1:
        raise ValueError(f"the slices differ in size: {sorted(shapes)}")
    stack = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    if recipe == PREPROCESSING["recipe"]:
        bag = torch.as_tensor(np.asarray(slice_transform(input_size)(stack)), dtype=torch.float32)
        return bag[:, None].contiguous()
    equalized = torch.as_tensor(np.asarray(paper_slice_transform(input_size)(stack)), dtype=torch.float32) / 255.0
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    return ((equalized[:, None].expand(-1, 3, -1, -1) - mean) / std).contiguous()


def preprocess_series(datasets: Sequence[Dataset], input_size: int, recipe: str = PREPROCESSING["recipe"]) -> tuple[list[Dataset], torch.Tensor]:
    """Order a series and preprocess it by ``recipe``: (ordered datasets, bag tensor)."""
    ordered = order_slices(datasets)
    return ordered, preprocess_slices([slice_pixels(ds) for ds in ordered], input_size, recipe)
