"""From an axial CT series to each network's input: order, find the joint slices, window, crop, resize.

Fu et al. (2024) say only that images were "standardized" and contrast-enhanced; made concrete
(every value is in the pack manifest's ``preprocessing``, which the chain reads):

1. slices in patient order along the slice normal (ImagePositionPatient; shared with t2fs-mil);
2. Hounsfield units through the modality LUT;
3. the slices through the joints (:mod:`.joints`), at most ``max_slices`` of them, evenly spaced;
4. a field of ``crop_mm`` millimetres wide (image columns: left-right on an axial slice) by
   ``crop_height_mm`` high (rows: antero-posterior;
   absent: square) around the joints' structure (one centre per study), padded with air where
   it leaves the image; ``crop_mm: null`` keeps the whole slice, as the paper's 512×512 images
   were. The demonstration pack crops, so that its small input keeps millimetre detail: the
   joints and their subchondral bone lie within about ±70 mm left-right and -35/+45 mm
   antero-posterior of that centre (measured on the phantoms), so a wide, flat field spends
   no pixels on the pelvis in front of and behind them;
5. a bone window (``window.center``/``window.width`` HU) to [0, 1];
6. resize to the network's input (224 for ResNeXt-50, 299 for Inception-v4 published), bilinear
   with anti-aliasing; ``input_size`` is the width, and a flat crop keeps its aspect ratio
   (height = width × crop_height_mm / crop_mm; both networks pool globally, so any height works);
7. three identical channels: the paper's "random RGB shift" augmentation implies RGB input;
8. per-channel normalisation with each network's mean and standard deviation (ImageNet's for
   ResNeXt-50, 0.5/0.5 for Inception-v4, the layouts their checkpoints are trained in).

The paper's "randomly cut PCA and whitening" is read as AlexNet-style PCA colour (lighting)
augmentation plus per-channel whitening. On three identical channels the colour covariance has
rank one, so PCA lighting reduces to a random brightness shift, which training already applies;
it is left out. Whitening is step 8. The manifest records both decisions (``pca_whitening``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydicom import Dataset

from pipeline.chains.t2fs_mil.preprocess import order_slices, slice_pixels

from .joints import JointSlices, SliceGeometry, joint_slices
from .model import INCEPTION, RESNEXT

RECIPE = "fu2024-ct-v1"
AIR_HU = -1024.0
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
PCA_WHITENING = (
    "PCA lighting augmentation left out (on three identical channels it is a brightness shift, which "
    "training applies); whitening = per-channel mean/std normalisation of each network"
)

#: the published preprocessing (the importer writes it; the demo pack changes crop_mm and sizes)
PUBLISHED_PREPROCESSING: dict[str, Any] = {
    "recipe": RECIPE,
    "window": {"center": 400.0, "width": 1800.0},
    "crop_mm": None,
    "max_slices": 24,
    "channels": 3,
    "normalization": {
        RESNEXT: {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        INCEPTION: {"mean": list(INCEPTION_MEAN), "std": list(INCEPTION_STD)},
    },
    "pca_whitening": PCA_WHITENING,
}


@dataclass(frozen=True)
class Settings:
    """The manifest's preprocessing, checked."""

    window_center: float
    window_width: float
    crop_mm: float | None
    max_slices: int
    normalization: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]]
    crop_height_mm: float | None = None  # None: a square crop of crop_mm

    def input_shape(self, size: int) -> tuple[int, int]:
        """(rows, columns) of a network input ``size`` wide: the crop's aspect ratio (step 6)."""
        if self.crop_mm is None or self.crop_height_mm is None:
            return size, size
        return max(1, int(round(size * self.crop_height_mm / self.crop_mm))), size

    @classmethod
    def from_manifest(cls, preprocessing: Mapping[str, Any]) -> Settings:
        if preprocessing.get("recipe") != RECIPE:
            raise ValueError(f"preprocessing recipe {preprocessing.get('recipe')!r}; this chain implements {RECIPE!r}")
        if int(preprocessing.get("channels", 3)) != 3:
            raise ValueError("this chain feeds the networks three channels")
        window = preprocessing["window"]
        crop = preprocessing.get("crop_mm")
        height = preprocessing.get("crop_height_mm")
        if height is not None and crop is None:
            raise ValueError("crop_height_mm needs crop_mm (the crop's width)")
        norms = {
            name: (tuple(float(v) for v in values["mean"]), tuple(float(v) for v in values["std"]))
            for name, values in preprocessing["normalization"].items()
        }
        return cls(
            float(window["center"]), float(window["width"]), None if crop is None else float(crop), int(preprocessing["max_slices"]),
            norms, None if height is None else float(height),
        )


@dataclass(frozen=True)
class Box:
    """A square of the source slice, in pixels; may reach past the image (padded with air)."""

    row0: int
    col0: int
    size_rows: int
    size_cols: int

    def as_list(self) -> list[int]:
        return [self.row0, self.col0, self.row0 + self.size_rows, self.col0 + self.size_cols]


@dataclass(frozen=True)
class Volume:
    """An axial CT series in patient order, in HU, with the joint slices found."""

    datasets: list[Dataset]
    hu: list[np.ndarray]
    joints: JointSlices
    selected: tuple[int, ...]  # indices into ``datasets``: the joint slices the networks see
    box: Box | None  # the crop (None: no joints, nothing to crop)


def geometry_of(dataset: Dataset) -> SliceGeometry:
    orientation = np.asarray([float(v) for v in dataset.ImageOrientationPatient])
    return SliceGeometry(
        origin=np.asarray([float(v) for v in dataset.ImagePositionPatient]),
        row_direction=orientation[:3],
        column_direction=orientation[3:],
        spacing=(float(dataset.PixelSpacing[0]), float(dataset.PixelSpacing[1])),
    )


def slice_spacing_mm(datasets: Sequence[Dataset]) -> float:
    """The median distance between neighbouring slices along the normal (SliceThickness when there is one slice)."""
    if len(datasets) < 2:
        return float(datasets[0].get("SliceThickness", 1.0) or 1.0)
    orientation = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.asarray([np.asarray([float(v) for v in ds.ImagePositionPatient]) @ normal for ds in datasets])
    return float(np.median(np.abs(np.diff(positions))))


def evenly_spaced(indices: Sequence[int], limit: int) -> tuple[int, ...]:
    """At most ``limit`` of ``indices``, evenly spaced, keeping the first and last."""
    if len(indices) <= limit:
        return tuple(indices)
    picks = np.unique(np.round(np.linspace(0, len(indices) - 1, limit)).astype(int))
    return tuple(indices[int(i)] for i in picks)


def crop_box(
    center_rc: tuple[float, float], spacing: tuple[float, float], shape: tuple[int, int], crop_mm: float | None, crop_height_mm: float | None = None
) -> Box:
    """The crop around ``center_rc``: ``crop_mm`` wide (columns), ``crop_height_mm`` high (rows; None: square)."""
    if crop_mm is None:
        return Box(0, 0, shape[0], shape[1])
    height = crop_mm if crop_height_mm is None else crop_height_mm
    rows, cols = max(1, int(round(height / spacing[0]))), max(1, int(round(crop_mm / spacing[1])))
    return Box(int(round(center_rc[0] - rows / 2)), int(round(center_rc[1] - cols / 2)), rows, cols)


def cut(image: np.ndarray, box: Box, fill: float) -> np.ndarray:
    """``image`` inside ``box``, padded with ``fill`` where the box leaves the image."""
    out = np.full((box.size_rows, box.size_cols), fill, dtype=np.float32)
    r0, c0 = max(box.row0, 0), max(box.col0, 0)
    r1, c1 = min(box.row0 + box.size_rows, image.shape[0]), min(box.col0 + box.size_cols, image.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0 - box.row0 : r1 - box.row0, c0 - box.col0 : c1 - box.col0] = image[r0:r1, c0:c1]
    return out


def paste(values: np.ndarray, box: Box, shape: tuple[int, int]) -> np.ndarray:
    """The inverse of :func:`cut`: ``values`` (box-sized) placed on a zero image of ``shape``."""
    out = np.zeros(shape, dtype=np.float32)
    r0, c0 = max(box.row0, 0), max(box.col0, 0)
    r1, c1 = min(box.row0 + box.size_rows, shape[0]), min(box.col0 + box.size_cols, shape[1])
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = values[r0 - box.row0 : r1 - box.row0, c0 - box.col0 : c1 - box.col0]
    return out


def read_volume(datasets: Sequence[Dataset], settings: Settings) -> Volume:
    """Order the series, convert to HU and find the joint slices (steps 1-4)."""
    ordered = order_slices(datasets)
    hu = [slice_pixels(ds) for ds in ordered]
    joints = joint_slices(hu, [geometry_of(ds) for ds in ordered], slice_spacing_mm(ordered))
    if not joints.found:
        return Volume(ordered, hu, joints, (), None)
    selected = evenly_spaced(joints.indices, settings.max_slices)
    first = ordered[selected[0]]
    spacing = (float(first.PixelSpacing[0]), float(first.PixelSpacing[1]))
    box = crop_box(joints.center_rc(), spacing, hu[selected[0]].shape, settings.crop_mm, settings.crop_height_mm)
    return Volume(ordered, hu, joints, selected, box)


def windowed(hu: np.ndarray, box: Box, settings: Settings) -> np.ndarray:
    """Steps 4-5: the crop in the bone window, float32 in [0, 1]."""
    from monai.transforms import ScaleIntensityRange

    low = settings.window_center - settings.window_width / 2
    scale = ScaleIntensityRange(a_min=low, a_max=low + settings.window_width, b_min=0.0, b_max=1.0, clip=True)
    return np.asarray(scale(cut(hu, box, AIR_HU)), dtype=np.float32)


def network_input(images: np.ndarray, size: int, network: str, settings: Settings) -> torch.Tensor:
    """Steps 6-8: (n, H, W) windowed crops → (n, 3, rows, size), normalised for ``network`` (rows: :meth:`Settings.input_shape`)."""
    from monai.transforms import Compose, NormalizeIntensity, RepeatChannel, Resize

    mean, std = settings.normalization[network]
    transform = Compose(
        [
            Resize(settings.input_shape(size), mode="bilinear", align_corners=False, anti_aliasing=True),
            RepeatChannel(repeats=3),
            NormalizeIntensity(subtrahend=np.asarray(mean), divisor=np.asarray(std), channel_wise=True),
        ]
    )
    return torch.stack([torch.as_tensor(np.asarray(transform(image[None])), dtype=torch.float32) for image in images])
