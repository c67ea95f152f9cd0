"""One radiograph through the anatomy-aware pipeline: segment, find the joints, crop, classify, explain.

Shared by the node's chain, ``sijnode evaluate`` and the benchmark, so all three run the same steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import AsDiscrete, Compose, KeepLargestConnectedComponent
from monai.visualize import GradCAM
from pydicom import Dataset

from pipeline.cam import normalize_cam
from pipeline.chains.base import PreparedNetwork, inference_context

from .data import LEFT_ILIUM, RIGHT_ILIUM, SACRUM
from .joints import JointCrop, ilium_classes, joint_regions, trimmed
from .model import Networks, load_networks
from .preprocess import (
    ClassificationSettings,
    SegmentationSettings,
    classifier_input,
    labels_to_grid,
    map_to_crop,
    patient_left_on_image_right,
    plain,
    probabilities_to_grid,
    radiograph_gray,
    segmenter_input,
)

POSITIVE_CLASS = 1  # the classifier's outputs: 0 no radiographic sacroiliitis, 1 radiographic sacroiliitis


def last_block(classifier: torch.nn.Module) -> str:
    """The name of ``layer4[-1]``, the app's Grad-CAM target: the last block of the last stage."""
    return f"layer4.{len(classifier.layer4) - 1}"  # type: ignore[arg-type]


class EigenGradCAM(GradCAM):
    """MONAI's GradCAM with the app's ``eigen_smooth=True`` (pytorch-grad-cam, which needs
    torchvision and is not a dependency; hand-written here): the gradient-weighted activations
    projected on their first principal component instead of summed over channels.

    The projection's sign is arbitrary (an SVD's is); it is chosen so that the map agrees with
    the plain Grad-CAM sum, which makes it the same on every machine.
    """

    def compute_map(self, x: torch.Tensor, class_idx: int | None = None, retain_graph: bool = False, layer_idx: int = -1, **kwargs: Any) -> torch.Tensor:
        _, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
        acti, grad = acti[layer_idx], grad[layer_idx]
        b, c, *spatial = grad.shape
        weighted = grad.reshape(b, c, -1).mean(2).reshape(b, c, *[1] * len(spatial)) * acti
        maps = []
        for sample in weighted.detach().double():
            pixels = sample.reshape(c, -1).T  # (pixels, channels)
            _, _, vh = torch.linalg.svd(pixels - pixels.mean(0), full_matrices=False)
            projection = pixels @ vh[0]
            if float((projection * sample.sum(0).reshape(-1)).sum().detach()) < 0:
                projection = -projection
            maps.append(projection.reshape(1, *spatial))
        return torch.nn.functional.relu(torch.stack(maps).to(acti.dtype))

def backward_from(classifier: torch.nn.Module, target: str) -> None:
    """Let gradients flow only through ``target`` and the layers after it (the lighter Grad-CAM).

    Grad-CAM needs the class score's gradient at the target block's output, which only the layers
    after it shape. With the parameters before the block not requiring gradients, autograd records
    nothing there and the backward pass stops at the block: the map is the same (bench/README.md:
    max |Δ| 0) for about a third of the CPU time of a full backward pass. The networks are only
    ever run for inference here (a trainer never gets this model's Grad-CAM).
    """
    for name, parameter in classifier.named_parameters():
        parameter.requires_grad_(name.startswith((f"{target}.", "fc.")))


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
        # forward passes in the worker's runtime; Grad-CAM keeps the eager classifier (gradients)
        self.segmenter = PreparedNetwork(self.networks.segmenter)
        self.classifier = PreparedNetwork(self.networks.classifier)
        self.segmentation = SegmentationSettings.from_manifest(preprocessing)
        self.classification = ClassificationSettings.from_manifest(preprocessing)
        self.dilation_fraction = float(preprocessing.get("joint_region", {}).get("dilation_fraction", 0.05))
        self.otsu_trim = bool(preprocessing.get("joint_region", {}).get("otsu_trim", False))
        self.gradcam_class = str(preprocessing.get("gradcam", {}).get("target", "positive"))
        if self.gradcam_class not in ("positive", "predicted"):
            raise ValueError(f"gradcam.target must be positive or predicted, got {self.gradcam_class!r}")
        self.eigen_smooth = bool(preprocessing.get("gradcam", {}).get("eigen_smooth", False))
        self.inferer = SlidingWindowInferer(
            roi_size=self.segmentation.roi_size, sw_batch_size=sw_batch_size, overlap=self.segmentation.overlap
        )
        # the app's post-processing: one-hot, the largest component of every class (background
        # too), argmax; the same map as the app's on an asymmetric input (test_xr_anatomy_orientation)
        self.keep_largest = Compose(
            [AsDiscrete(to_onehot=RIGHT_ILIUM + 1), KeepLargestConnectedComponent(), AsDiscrete(argmax=True)]
        )
        self._gradcam: GradCAM | None = None  # built on first use: it hooks the classifier for good

    @classmethod
    def from_pack(cls, manifest: Any, state_dict: Mapping[str, torch.Tensor], device: str = "cpu", sw_batch_size: int = 1) -> AnatomyAwareModel:
        networks = load_networks(manifest.architecture.hyperparameters, state_dict, device)
        return cls(networks, manifest.preprocessing, device, sw_batch_size)

    # -- steps ---------------------------------------------------------------------------------
    def segment_logits(self, gray: np.ndarray) -> torch.Tensor:
        """The segmenter's logits (1, classes, S, S) by sliding-window inference, in the network's
        layout ((columns, rows) where ``transpose`` is set)."""
        image = segmenter_input(gray, self.segmentation).to(self.device)
        with inference_context():
            return plain(self.inferer(image, self.segmenter)).float().cpu()

    def _to_radiograph(self, labels: np.ndarray) -> np.ndarray:
        """A class map in the network's layout → the radiograph's (rows, columns)."""
        return np.ascontiguousarray(labels.T) if self.segmentation.transpose else labels

    def segment_small(self, gray: np.ndarray) -> np.ndarray:
        """Class map on the segmenter's grid, in the radiograph's row/column order: argmax, the
        largest connected component per class (in the network's layout, as the app: where two
        components are the same size, which one is kept depends on the scan order)."""
        labels = self.segment_logits(gray).argmax(dim=1)  # (1, S, S): channel-first for MONAI
        return self._to_radiograph(self._largest_components(labels))

    def segment(self, gray: np.ndarray) -> np.ndarray:
        """Class map on the radiograph's grid, resampled as the pack's ``segmentation.resample`` says."""
        if self.segmentation.resample == "labels":
            return labels_to_grid(self.segment_small(gray), gray.shape)
        shape = gray.shape[::-1] if self.segmentation.transpose else gray.shape
        labels = torch.as_tensor(probabilities_to_grid(self.segment_logits(gray), shape))[None]
        return self._to_radiograph(self._largest_components(labels))

    def _largest_components(self, labels: torch.Tensor) -> np.ndarray:
        """(1, H, W) class map → the same with only each class's largest connected component, uint8 (H, W)."""
        return np.asarray(plain(self.keep_largest(labels))[0].numpy(), dtype=np.uint8)

    def classify(self, crop_image: np.ndarray) -> tuple[float, torch.Tensor]:
        """P(radiographic sacroiliitis) for a crop, and the classifier's input (for Grad-CAM)."""
        x = classifier_input(crop_image, self.classification)
        with inference_context():
            logits = self.classifier(plain(x)[None].to(self.device))
        probability = float(torch.softmax(logits.float(), dim=1)[0, POSITIVE_CLASS])
        return probability, x

    def gradcam_on_input(self, x: torch.Tensor) -> torch.Tensor:
        """Grad-CAM at ``layer4[-1]``, upsampled to the input, in [0, 1] (H, W): of the predicted
        class (the app) or of the positive class, as the pack's ``gradcam.target`` says; the
        app's eigen-smoothing where ``gradcam.eigen_smooth`` asks for it."""
        if self._gradcam is None:
            kind = EigenGradCAM if self.eigen_smooth else GradCAM
            target = last_block(self.networks.classifier)
            backward_from(self.networks.classifier, target)
            self._gradcam = kind(nn_module=self.networks.classifier, target_layers=target, postprocessing=normalize_cam)
        batch = plain(x)[None].to(self.device)
        target = POSITIVE_CLASS if self.gradcam_class == "positive" else self.predicted_class(x)
        with torch.enable_grad(), warnings.catch_warnings():
            # expected: the backward pass starts at the block (backward_from), not at the input
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")
            cam = self._gradcam(batch, class_idx=target)
        return plain(cam)[0, 0]

    def predicted_class(self, x: torch.Tensor) -> int:
        """The classifier's argmax class for its input ``x`` (1, H, W)."""
        with torch.no_grad():
            return int(self.networks.classifier(plain(x)[None].to(self.device)).argmax(dim=1)[0])

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
            if self.otsu_trim:
                crop = trimmed(crop, gray)
        with timed("classification"):
            probability, x = self.classify(gray[crop.box.slices])
        cam = None
        if with_gradcam:
            with timed("grad-cam"):
                cam = self.gradcam(x, crop, gray.shape)
        notes: dict[str, Any] = {"ilium_classes_swapped": classes != {"left": LEFT_ILIUM, "right": RIGHT_ILIUM}}
        if with_gradcam:
            notes["gradcam_layer"] = last_block(self.networks.classifier)
            notes["gradcam_class"] = POSITIVE_CLASS if self.gradcam_class == "positive" else int(probability >= 0.5)
        return Analysis(probability, labels, classes, crop, left_on_right, cam, notes)
