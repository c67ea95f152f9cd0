"""Training specific to t1stir-quadrants: contouring augmentation and loss; the loop is :func:`pipeline.training.fit`.

Contouring, as the paper trains it where it says: Adam (beta 0.9 / 0.999, lr 1e-3);
augmentation by translation +-20 %, scale +-20 %, rotation +-15 deg, left/right flips,
additive Gaussian noise and Gaussian blur; L2 loss on the unit vector field and a weighted
L2 loss on the heatmaps.  Our choices where it does not say: the heatmap weight is
``1 + HEATMAP_WEIGHT * target`` (peaks count more than the empty background), noise sigma up
to 10 % of the slice's intensity spread, blur sigma up to 1 pixel, each applied with
probability 0.5.

The geometric augmentation is one similarity transform applied to the image and to the
targets by the same sampling (scipy's ``map_coordinates``; hand-written because the vector
field's components must be turned with it, which MONAI's spatial transforms do not do):
maps are resampled, field vectors are rotated by the transform's linear part and
renormalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

from .contour import Walk, contour_rms_mm, trace_contour
from .model import CONTOUR_CHANNELS, CONTOUR_MAPS, JOINTS
from .targets import flip_left_right

HEATMAP_WEIGHT = 10.0
_HEAT = [CONTOUR_CHANNELS.index(f"{j}_{m}") for j in JOINTS for m in ("start", "end")]
_FIELD = [CONTOUR_CHANNELS.index(f"{j}_{m}") for j in JOINTS for m in ("uvf_x", "uvf_y")]


@dataclass(frozen=True)
class Augmentation:
    """The paper's contouring augmentation ranges."""

    translate: float = 0.20
    scale: float = 0.20
    rotate_deg: float = 15.0
    flip: bool = True
    noise: float = 0.10
    blur_px: float = 1.0


@dataclass(frozen=True)
class Similarity:
    """Output pixel x samples input point ``linear @ (x - c) + c - shift`` (c: the grid centre)."""

    linear: np.ndarray  # (2, 2) on (row, col)
    shift: np.ndarray  # (2,)

    @classmethod
    def random(cls, rng: np.random.Generator, size: int, settings: Augmentation) -> Similarity:
        angle = np.radians(rng.uniform(-settings.rotate_deg, settings.rotate_deg))
        zoom = rng.uniform(1 - settings.scale, 1 + settings.scale)
        turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        return cls(turn / zoom, rng.uniform(-settings.translate, settings.translate, size=2) * size)

    def points(self, points: np.ndarray, size: int) -> np.ndarray:
        """Input (row, col) points (..., 2) -> where the warp puts them."""
        centre = np.full(2, (size - 1) / 2)
        return (np.asarray(points, float) - centre + self.shift) @ np.linalg.inv(self.linear).T + centre

    def warp(self, image: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The image (H, W) and targets (8, H, W) resampled; field vectors turned with the linear part."""
        size = image.shape[-1]
        centre = np.full(2, (size - 1) / 2)
        grid = np.stack(np.mgrid[:size, :size], axis=0).reshape(2, -1)
        source = self.linear @ (grid - centre[:, None]) + (centre - self.shift)[:, None]

        def resample(values: np.ndarray) -> np.ndarray:
            return map_coordinates(values, source, order=1, mode="constant", cval=0.0).reshape(size, size)

        out_targets = np.stack([resample(t) for t in targets])
        inverse = np.linalg.inv(self.linear)  # input directions -> output directions
        for j in range(len(JOINTS)):
            x, y = j * len(CONTOUR_MAPS) + 2, j * len(CONTOUR_MAPS) + 3
            vectors = inverse @ np.stack([out_targets[y].ravel(), out_targets[x].ravel()])  # (row, col)
            norm = np.linalg.norm(vectors, axis=0)
            vectors = np.where(norm > 1e-6, vectors / np.maximum(norm, 1e-6), 0.0)
            out_targets[y], out_targets[x] = vectors[0].reshape(size, size), vectors[1].reshape(size, size)
        return resample(image), out_targets


def augment(
    image: np.ndarray, targets: np.ndarray, rng: np.random.Generator, settings: Augmentation = Augmentation()
) -> tuple[np.ndarray, np.ndarray]:
    """One random augmentation of an image (H, W) and its targets (8, H, W), consistently."""
    if settings.flip and rng.random() < 0.5:
        image, targets = flip_left_right(image, targets)
    out_image, out_targets = Similarity.random(rng, image.shape[-1], settings).warp(image, targets)
    spread = float(out_image.std()) or 1.0
    if settings.blur_px > 0 and rng.random() < 0.5:
        out_image = gaussian_filter(out_image, rng.uniform(0, settings.blur_px))
    if settings.noise > 0 and rng.random() < 0.5:
        out_image = out_image + rng.normal(0, rng.uniform(0, settings.noise) * spread, out_image.shape)
    return out_image.astype(np.float32), out_targets.astype(np.float32)


def contour_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Weighted L2 on the heatmaps plus L2 on the unit vector fields (N, 8, H, W)."""
    heat_p, heat_t = predicted[:, _HEAT], target[:, _HEAT]
    weights = 1.0 + HEATMAP_WEIGHT * heat_t
    heatmaps = (weights * (heat_p - heat_t) ** 2).mean()
    field = ((predicted[:, _FIELD] - target[:, _FIELD]) ** 2).mean()
    return heatmaps + field


def normalise_slices(images: np.ndarray) -> np.ndarray:
    """Per-slice z-score (the network input's intensity scale; MRI has no absolute units)."""
    images = np.asarray(images, dtype=np.float32)
    axes = tuple(range(1, images.ndim))
    mean = images.mean(axis=axes, keepdims=True)
    std = images.std(axis=axes, keepdims=True)
    return (images - mean) / np.maximum(std, 1e-6)


def walk_outputs(outputs: np.ndarray) -> dict[str, Walk]:
    """A slice's network outputs (8, H, W) -> per joint the walked contour."""
    walks = {}
    for j, joint in enumerate(JOINTS):
        base = j * len(CONTOUR_MAPS)
        walks[joint] = trace_contour(*outputs[base : base + 4])
    return walks


def contour_errors(
    outputs: np.ndarray, truths: Sequence[dict[str, np.ndarray | None]], spacing_mm: tuple[float, float]
) -> tuple[list[float], dict[str, int]]:
    """Per slice and joint with a true contour, the RMS error (mm) of the walked contour; failures counted by reason."""
    errors, failures = [], {}
    for slice_outputs, truth in zip(outputs, truths):
        for joint, walk in walk_outputs(slice_outputs).items():
            if truth.get(joint) is None:
                continue
            if walk.ok:
                errors.append(contour_rms_mm(walk.vertices, truth[joint], spacing_mm))
            else:
                failures[walk.failure] = failures.get(walk.failure, 0) + 1
    return errors, failures


def joint_loss(
    classifier: torch.nn.Module,
    annotators: torch.nn.Module,
    t1: torch.Tensor,
    stir: torch.Tensor,
    labels: dict[str, torch.Tensor],
    trace_weight: float = 0.01,
) -> torch.Tensor:
    """One joint's multi-reader loss: classifier logits -> probabilities -> annotator tree -> cross-entropy + trace penalty.

    ``t1`` / ``stir``: the joint's crops (slices, 1, R, R); ``labels``: label set -> (14,) with -1 unused.
    """
    from .annotators import multi_reader_loss

    probability = torch.sigmoid(classifier(t1, stir))
    batch_labels = {name: values.reshape(1, -1) for name, values in labels.items()}
    return multi_reader_loss(annotators(probability), batch_labels, annotators, trace_weight)
