"""One radiograph through the anatomy-aware pipeline: segment, find the joints, crop, classify, explain.

Shared by the node's chain, ``sijnode evaluate`` and the benchmark, so all three run the same steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import KeepLargestConnectedComponent
from monai.visualize import GradCAM
from pydicom import Dataset

from pipeline.cam import normalize_cam
from pipeline.chains.base import inference_context

from .data import LEFT_ILIUM, RIGHT_ILIUM, SACRUM
from .joints import JointCrop, ilium_classes, joint_regions
from .model import Networks, load_networks
from .preprocess import (
    ClassificationSettings,
    SegmentationSettings,
    classifier_input,
    labels_to_grid,
    map_to_crop,
    patient_left_on_image_right,
    plain,
    radiograph_gray,
    segmenter_input,
)

POSITIVE_CLASS = 1  # the classifier's outputs: 0 no radiographic sacroiliitis, 1 radiographic sacroiliitis
GRADCAM_LAYER = "layer4"  # the classifier's last stage

Timer = Callable[[str], AbstractContextManager[Any]]


def _untimed(step: str) -> AbstractContextManager[Any]:
    return nullcontext()


@dataclass(frozen=True)
class Analysis:
    """What the pipeline found on one radiograph (all maps on the radiograph's pixel grid)."""

    probability: float  # softmax probability of radiographic sacroiliitis
    labels: np.ndarray  # uint8 class map: 0 background, 1 sacrum, 2 / 3 the network's ilium classes
    classes: Mapping[str, int]  # patient side → its ilium's class in ``labels``
    crop: JointCrop
    left_on_image_right: bool
    gradcam: np.ndarray | None = None  # float32 in [0, 1]; zero outside the crop
    notes: dict[str, Any] = field(default_factory=dict)


class AnatomyAwareModel:
    """Both networks of a pack with their preprocessing, ready to analyze radiographs."""

    def __init__(
        self,
        networks: Networks,
        preprocessing: Mapping[str, Any],
        device: str = "cpu",
        sw_batch_size: int = 1,
    ) -> None:
        self.networks = networks.to(device).eval()
        self.device = device
        self.segmentation = SegmentationSettings.from_manifest(preprocessing)
        self.classification = ClassificationSettings.from_manifest(preprocessing)
        self.dilation_fraction = float(preprocessing.get("joint_region", {}).get("dilation_fraction", 0.05))
        self.inferer = SlidingWindowInferer(
            roi_size=self.segmentation.roi_size, sw_batch_size=sw_batch_size, overlap=self.segmentation.overlap
        )
        self.keep_largest = KeepLargestConnectedComponent(applied_labels=[SACRUM, LEFT_ILIUM, RIGHT_ILIUM], is_onehot=False)
        self._gradcam: GradCAM | None = None  # built on first use: it hooks the classifier for good

    @classmethod
    def from_pack(cls, manifest: Any, state_dict: Mapping[str, torch.Tensor], device: str = "cpu", sw_batch_size: int = 1) -> AnatomyAwareModel:
        networks = load_networks(manifest.architecture.hyperparameters, state_dict, device)
        return cls(networks, manifest.preprocessing, device, sw_batch_size)

    # -- steps ---------------------------------------------------------------------------------
    def segment_small(self, gray: np.ndarray) -> np.ndarray:
        """Class map on the segmenter's grid (in the radiograph's row/column order): sliding-window
        inference, argmax, largest connected component per class."""
        image = segmenter_input(gray, self.segmentation).to(self.device)
        with inference_context():
            logits = self.inferer(image, self.networks.segmenter)
        labels = plain(logits).argmax(dim=1)  # (1, S, S): channel-first for MONAI
        small = np.asarray(plain(self.keep_largest(labels.cpu()))[0].numpy(), dtype=np.uint8)
        return np.ascontiguousarray(small.T) if self.segmentation.transpose else small

    def segment(self, gray: np.ndarray) -> np.ndarray:
        """Class map on the radiograph's grid."""
        return labels_to_grid(self.segment_small(gray), gray.shape)

    def classify(self, crop_image: np.ndarray) -> tuple[float, torch.Tensor]:
        """P(radiographic sacroiliitis) for a crop, and the classifier's input (for Grad-CAM)."""
        x = classifier_input(crop_image, self.classification)
        with inference_context():
            logits = self.networks.classifier(plain(x)[None].to(self.device))
        probability = float(torch.softmax(logits.float(), dim=1)[0, POSITIVE_CLASS])
        return probability, x

    def gradcam_on_input(self, x: torch.Tensor) -> torch.Tensor:
        """Grad-CAM of the positive class at the last stage, upsampled to the input, in [0, 1] (H, W)."""
        if self._gradcam is None:
            self._gradcam = GradCAM(nn_module=self.networks.classifier, target_layers=GRADCAM_LAYER, postprocessing=normalize_cam)
        batch = plain(x)[None].to(self.device)
        with torch.enable_grad():
            cam = self._gradcam(batch, class_idx=POSITIVE_CLASS)
        return plain(cam)[0, 0]

    def gradcam(self, x: torch.Tensor, crop: JointCrop, shape: tuple[int, int]) -> np.ndarray:
        """Grad-CAM drawn back onto the whole radiograph (zero outside the crop box)."""
        on_crop = map_to_crop(self.gradcam_on_input(x), x, self.classification)  # type: ignore[arg-type]
        full = np.zeros(shape, dtype=np.float32)
        full[crop.box.slices] = np.clip(on_crop, 0.0, 1.0)
        return full

    # -- the whole pipeline ----------------------------------------------------------------------
    def analyze(self, dataset: Dataset, *, with_gradcam: bool = True, timed: Timer = _untimed) -> Analysis:
        with timed("read"):
            gray = radiograph_gray(dataset)
            left_on_right = patient_left_on_image_right(dataset)
        with timed("segmentation"):
            labels = self.segment(gray)
        with timed("joint region"):
            classes = ilium_classes(labels, LEFT_ILIUM, RIGHT_ILIUM, left_on_right)
            crop = joint_regions(labels, classes, SACRUM, self.dilation_fraction)
        with timed("classification"):
            probability, x = self.classify(gray[crop.box.slices])
        cam = None
        if with_gradcam:
            with timed("grad-cam"):
                cam = self.gradcam(x, crop, gray.shape)
        notes = {"ilium_classes_swapped": classes != {"left": LEFT_ILIUM, "right": RIGHT_ILIUM}}
        return Analysis(probability, labels, classes, crop, left_on_right, cam, notes)
