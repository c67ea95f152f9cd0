"""The two networks of the anatomy-aware pipeline, built from manifest hyperparameters.

* Segmenter: MONAI ``UNet`` (2-D, one input channel, four classes: background, sacrum, left
  ilium, right ilium). Published: channels 64/128/256/512, strides 2/2/2, 3 residual units
  (MONAI's defaults otherwise: instance norm, PReLU, no dropout).
* Classifier: MONAI ``ResNet`` with bottleneck blocks, one input channel, a 7×7 stride-2 stem
  and no bias in the downsampling convolutions (torchvision's ResNet layout, which the published
  weights come from), its ``fc`` replaced by :func:`head`. Published: blocks 3/4/6/3 of widths
  64/128/256/512 (ResNet-50), head Linear(2048, 1024) – ReLU – BatchNorm1d(1024) – Dropout –
  Linear(1024, 2), class 1 = radiographic sacroiliitis.

One pack holds both networks in one state dict: the segmenter's keys prefixed ``segmenter.``,
the classifier's ``classifier.``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.nets import ResNet, UNet
from torch import nn

SEGMENTER_PREFIX = "segmenter."
CLASSIFIER_PREFIX = "classifier."

#: the published architecture (Dorfner et al. 2024; FJDorfner/Anatomy-Aware-Classification-axSpA)
PUBLISHED_HYPERPARAMETERS: dict[str, Any] = {
    "segmenter": {"channels": [64, 128, 256, 512], "strides": [2, 2, 2], "num_res_units": 3, "classes": 4},
    "classifier": {
        "block": "bottleneck",
        "layers": [3, 4, 6, 3],
        "block_inplanes": [64, 128, 256, 512],
        "head_hidden": 1024,
        "dropout": 0.0,  # the published app's Dropout(0); training used 0.1 (inert at inference)
        "classes": 2,
    },
}

#: the published preprocessing (see preprocess.py for each step)
PUBLISHED_PREPROCESSING: dict[str, Any] = {
    # transpose: the published app loads the radiograph with MONAI's LoadImage, which returns a
    # PNG as (columns, rows), and hands that to the UNet; the network is fed the same layout here.
    # resample "labels": the app's Invert of its transforms brings the argmax class map back by
    # nearest neighbour; otsu_trim and gradcam (predicted class, eigen-smoothing, layer4[-1]) as the app.
    "segmentation": {"size": [768, 768], "gaussian_sigma": 0.1, "roi_size": [512, 512], "overlap": 0.75, "transpose": True, "resample": "labels"},
    "joint_region": {"dilation_fraction": 0.05, "otsu_trim": True},
    "gradcam": {"target": "predicted", "eigen_smooth": True},
    "classification": {
        "size": [416, 628],
        "median_size": 3,
        "unsharp_weight": 0.6,
        "unsharp_sigma": 1.0,
        "clahe_clip_limit": 0.01,
    },
}


def build_segmenter(hyperparameters: Mapping[str, Any]) -> UNet:
    """The segmentation UNet (2-D, 1 channel in, ``classes`` out)."""
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=int(hyperparameters.get("classes", 4)),
        channels=tuple(int(c) for c in hyperparameters["channels"]),
        strides=tuple(int(s) for s in hyperparameters["strides"]),
        num_res_units=int(hyperparameters["num_res_units"]),
    )


def head(in_features: int, hidden: int, dropout: float, classes: int = 2) -> nn.Sequential:
    """The published classification head; its indices 0/2/4 are the weighted layers (fc.0, fc.2, fc.4)."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.BatchNorm1d(hidden),
        nn.Dropout(dropout),
        nn.Linear(hidden, classes),
    )


def build_classifier(hyperparameters: Mapping[str, Any]) -> ResNet:
    """The classifier: MONAI ResNet (torchvision layout: 7×7/2 stem, max pool, no downsample bias) + head."""
    block = str(hyperparameters.get("block", "bottleneck"))
    inplanes = [int(c) for c in hyperparameters["block_inplanes"]]
    network = ResNet(
        block=block,
        layers=[int(n) for n in hyperparameters["layers"]],
        block_inplanes=inplanes,
        spatial_dims=2,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
        num_classes=int(hyperparameters.get("classes", 2)),
    )
    expansion = 4 if block == "bottleneck" else 1
    network.fc = head(
        inplanes[-1] * expansion,
        int(hyperparameters["head_hidden"]),
        float(hyperparameters.get("dropout", 0.0)),
        int(hyperparameters.get("classes", 2)),
    )
    return network


@dataclass
class Networks:
    """Both networks of a pack, in eval mode on one device."""

    segmenter: UNet
    classifier: ResNet

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The pack's single state dict: ``segmenter.*`` and ``classifier.*``."""
        state = {SEGMENTER_PREFIX + k: v for k, v in self.segmenter.state_dict().items()}
        state.update({CLASSIFIER_PREFIX + k: v for k, v in self.classifier.state_dict().items()})
        return state

    def to(self, device: str) -> Networks:
        self.segmenter.to(device)
        self.classifier.to(device)
        return self

    def eval(self) -> Networks:
        self.segmenter.eval()
        self.classifier.eval()
        return self


def build_networks(hyperparameters: Mapping[str, Any]) -> Networks:
    return Networks(build_segmenter(hyperparameters["segmenter"]), build_classifier(hyperparameters["classifier"]))


def split_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A pack state dict → (segmenter, classifier) state dicts; any other key is an error."""
    segmenter, classifier, other = {}, {}, []
    for key, value in state_dict.items():
        if key.startswith(SEGMENTER_PREFIX):
            segmenter[key[len(SEGMENTER_PREFIX):]] = value
        elif key.startswith(CLASSIFIER_PREFIX):
            classifier[key[len(CLASSIFIER_PREFIX):]] = value
        else:
            other.append(key)
    if other:
        raise KeyError(f"pack weights have keys outside segmenter./classifier.: {', '.join(sorted(other)[:5])}")
    return segmenter, classifier


def load_networks(hyperparameters: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], device: str = "cpu") -> Networks:
    """Build both networks and load the pack's weights strictly (every key, every shape)."""
    networks = build_networks(hyperparameters)
    segmenter, classifier = split_state_dict(state_dict)
    networks.segmenter.load_state_dict(segmenter, strict=True)
    networks.classifier.load_state_dict(classifier, strict=True)
    return networks.to(device).eval()
