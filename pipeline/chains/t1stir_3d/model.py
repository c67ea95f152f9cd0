"""The networks of Bressem et al. (2022), in plain torch, in the published module trees.

MONAI has neither network: its ResNet starts at 64 channels with a 7×7×7 stem and a max-pool, and
its UNets are not fastai's dynamic U-Net. Both are written here so that checkpoints trained with the
authors' code (kbressem/spa on kbressem/faimed3d) import key for key.

* **Classifier** (spa ``libs/models.py: SequentialModel`` around faimed3d ``create_cnn_model_3d``):

  - ``body = Sequential(encoder, AdaptiveMaxPool3d(1))``, the encoder being faimed3d's ``ResNet3D``
    cut before its pool: ``stem`` (Conv3d 1→128, kernel 2×5×5, stride 1×3×3, padding 1, no bias;
    BatchNorm3d; ReLU; no max-pool) and bottleneck stages ``layer1``–``layer4`` (3/4/23/3 blocks of
    planes 64/128/256/512, expansion 4, starting from 128 channels). The body runs once per sequence
    (T1, then STIR) with the same weights.
  - the two pooled feature vectors are concatenated along depth, ``(B, 2048, 2, 1, 1)``;
  - ``head = Sequential(AdaptiveConcatPool3d(1), Sequential(Flatten, BatchNorm1d(4096), Dropout(.25),
    Linear(4096, 512, bias=False), ReLU, BatchNorm1d(512), Dropout(.5), Linear(512, 2, bias=False)))``:
    fastai's ``create_head(4096, 2)`` without its first module.

  State-dict keys therefore read ``body.0.0.0.weight`` (stem conv), ``body.0.1.*``–``body.0.4.*``
  (stages), ``head.1.1.*`` (BN 4096), ``head.1.3.weight``, ``head.1.5.*`` (BN 512), ``head.1.7.weight``.
  Class 1 of the softmax is the positive label.

* **Denoiser** (spa ``nbs/03_noise-reduction``: faimed3d ``DynamicUnet3D`` on ``resnet18_3d`` whose
  ``stem[0]`` was replaced by ``Conv3d(3, 32, 3, stride 1, padding 0)``, then adapted to one input
  channel by fastai's ``create_body``): a fastai ``SequentialEx``, so every key starts with ``layers.``:

  ====  ==========================  =================================================================
  idx   module                      content
  ====  ==========================  =================================================================
  0     encoder                     stem (Conv3d 1→32 k3 p0 *with* bias, BN, ReLU) + BasicBlock stages
                                    2/2/2/2 of 64/128/256/512 (faimed3d: 32 stem channels for basic
                                    blocks)
  1     middle_conv                 ConvLayer(512→1024), ConvLayer(1024→512) (no norm: ``norm_type=None``)
  2-4   UnetBlock3D                 skip from layer3, layer2, layer1: ``up`` (ConvTranspose3d k3 s1 p1
                                    + ReLU, then nearest resize to the skip), ``bn`` on the skip,
                                    ``conv1``, ``conv2``
  5     ConvTranspose3D             present because the stem (k3, p0) changes the size
  6     ResizeToOrig                nearest resize to the input (no weights)
  7     MergeLayer(dense=True)      concatenate the input (no weights)
  8     ResBlock                    ``convpath`` of two 3×3×3 ConvLayers (129 channels), identity path
  9     ConvLayer                   1×1×1 → 1 channel, no activation
  ====  ==========================  =================================================================

  A fastai ``ConvLayer`` without norm is ``Sequential(conv (bias), ReLU)``, so its conv is ``.0``.

Both are built from manifest hyperparameters; the published sizes are :data:`PUBLISHED_CLASSIFIER`
and :data:`PUBLISHED_DENOISER`, with their parameter counts next to them (asserted in tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: sequences in the order the published model takes them (spa: ``sequence = ['T1', 'TIRM']``)
SEQUENCES: tuple[str, str] = ("T1", "STIR")


def _from_mapping(cls: type, values: Mapping[str, Any], what: str):  # noqa: ANN202
    known = {field.name for field in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} hyperparameters {unknown}; known: {sorted(known)}")
    converted = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
    return cls(**converted)


@dataclass(frozen=True)
class ClassifierHyperparameters:
    """The dual-encoder classifier; the defaults are the published ResNet-101 3D."""

    stem_channels: int = 128
    planes: tuple[int, ...] = (64, 128, 256, 512)
    blocks: tuple[int, ...] = (3, 4, 23, 3)
    head_hidden: int = 512
    head_dropout: tuple[float, float] = (0.25, 0.5)
    classes: int = 2

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ClassifierHyperparameters:
        parameters = _from_mapping(cls, values, "t1stir-3d classifier")
        if len(parameters.planes) != 4 or len(parameters.blocks) != 4 or min(parameters.blocks) < 1:
            raise ValueError("t1stir-3d classifier needs four stages of at least one block")
        return parameters

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def feature_dim(self) -> int:
        return self.planes[-1] * Bottleneck3d.expansion


@dataclass(frozen=True)
class DenoiserHyperparameters:
    """The denoising U-Net; the defaults are the published one on a 3D ResNet-18 encoder."""

    stem_channels: int = 32
    planes: tuple[int, ...] = (64, 128, 256, 512)
    blocks: tuple[int, ...] = (2, 2, 2, 2)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DenoiserHyperparameters:
        parameters = _from_mapping(cls, values, "t1stir-3d denoiser")
        if len(parameters.planes) != 4 or len(parameters.blocks) != 4 or min(parameters.blocks) < 1:
            raise ValueError("t1stir-3d denoiser needs four encoder stages of at least one block")
        return parameters

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


PUBLISHED_CLASSIFIER: dict[str, Any] = ClassifierHyperparameters().as_dict()
PUBLISHED_DENOISER: dict[str, Any] = DenoiserHyperparameters().as_dict()
#: parameters (weights and biases, not BN running statistics) at the published sizes
PUBLISHED_CLASSIFIER_PARAMETERS = 87_313_664
PUBLISHED_DENOISER_PARAMETERS = 95_258_042


# ---------------------------------------------------------------------------------------------
# faimed3d ResNet3D (models/resnet.py), the blocks as published


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock3d(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck3d(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def make_stage(block: type[BasicBlock3d] | type[Bottleneck3d], inplanes: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    """faimed3d ``ResNet3D._make_layer``: (stage, its output channels)."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride), nn.BatchNorm3d(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample)]
    inplanes = planes * block.expansion
    layers += [block(inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), inplanes


def resnet3d_encoder(block: type[BasicBlock3d] | type[Bottleneck3d], stem: nn.Sequential, stem_channels: int, planes: Sequence[int], blocks: Sequence[int]) -> nn.Sequential:
    """``create_body(ResNet3D, cut=-2)``: Sequential(stem, layer1, layer2, layer3, layer4)."""
    stages = []
    inplanes = stem_channels
    for index, (width, count) in enumerate(zip(planes, blocks)):
        stage, inplanes = make_stage(block, inplanes, width, count, 1 if index == 0 else 2)
        stages.append(stage)
    encoder = nn.Sequential(stem, *stages)
    for module in encoder.modules():
        if isinstance(module, nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return encoder


class AdaptiveConcatPool3d(nn.Module):
    """faimed3d.layers.AdaptiveConcatPool3d: max pool and average pool, concatenated (max first)."""

    def __init__(self, size: int = 1) -> None:
        super().__init__()
        self.ap = nn.AdaptiveAvgPool3d(size)
        self.mp = nn.AdaptiveMaxPool3d(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mp(x), self.ap(x)], 1)


class DualEncoderClassifier(nn.Module):
    """spa's ``SequentialModel``: one shared 3D ResNet body for T1 and STIR, one head.

    Input ``(B, 2, D, H, W)``: channel 0 T1, channel 1 STIR (:data:`SEQUENCES`). Output: logits (B, 2).
    """

    def __init__(self, hyperparameters: ClassifierHyperparameters) -> None:
        super().__init__()
        self.hyperparameters = hyperparameters
        h = hyperparameters
        stem = nn.Sequential(
            nn.Conv3d(1, h.stem_channels, kernel_size=(2, 5, 5), stride=(1, 3, 3), padding=1, bias=False),
            nn.BatchNorm3d(h.stem_channels),
            nn.ReLU(inplace=True),
        )
        encoder = resnet3d_encoder(Bottleneck3d, stem, h.stem_channels, h.planes, h.blocks)
        self.body = nn.Sequential(encoder, nn.AdaptiveMaxPool3d(1))
        features = 2 * h.feature_dim  # concat pool of the two sequences' vectors
        self.head = nn.Sequential(
            AdaptiveConcatPool3d(1),
            nn.Sequential(
                nn.Flatten(),
                nn.BatchNorm1d(features),
                nn.Dropout(h.head_dropout[0]),
                nn.Linear(features, h.head_hidden, bias=False),
                nn.ReLU(inplace=True),
                nn.BatchNorm1d(h.head_hidden),
                nn.Dropout(h.head_dropout[1]),
                nn.Linear(h.head_hidden, h.classes, bias=False),
            ),
        )

    def encode(self, volume: torch.Tensor) -> torch.Tensor:
        """One sequence ``(B, 1, D, H, W)`` → its pooled features ``(B, C, 1, 1, 1)``."""
        return self.body(volume)

    def classify(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The per-sequence features (in :data:`SEQUENCES` order) → logits."""
        return self.head(torch.cat(list(features), 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify([self.encode(volume.unsqueeze(1)) for volume in torch.unbind(x, 1)])


# ---------------------------------------------------------------------------------------------
# faimed3d DynamicUnet3D (models/unet.py) with fastai's ConvLayer / ResBlock naming


def conv_layer(ni: int, nf: int, ks: int = 3, act: bool = True, transpose: bool = False) -> nn.Sequential:
    """fastai ``ConvLayer(ni, nf, ks, ndim=3, norm_type=None)``: the conv (with bias), then ReLU unless ``act`` is off."""
    conv = (nn.ConvTranspose3d if transpose else nn.Conv3d)(ni, nf, kernel_size=ks, stride=1, padding=(ks - 1) // 2, bias=True)
    nn.init.kaiming_normal_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.ReLU()) if act else nn.Sequential(conv)


class UnetBlock3D(nn.Module):
    """faimed3d ``UnetBlock3D``: upsample (transpose conv, then nearest resize to the skip), BN on the skip, two convs."""

    def __init__(self, up_in_c: int, x_in_c: int, final_div: bool) -> None:
        super().__init__()
        self.up = nn.Sequential(conv_layer(up_in_c, up_in_c // 2, transpose=True))
        self.bn = nn.BatchNorm3d(x_in_c)
        ni = up_in_c // 2 + x_in_c
        nf = ni if final_div else ni // 2
        self.conv1 = conv_layer(ni, nf)
        self.conv2 = conv_layer(nf, nf)
        self.relu = nn.ReLU()
        self.out_channels = nf

    def forward(self, up_in: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up_out = self.up(up_in)
        if up_out.shape[-3:] != skip.shape[-3:]:
            up_out = F.interpolate(up_out, skip.shape[-3:], mode="nearest")
        return self.conv2(self.conv1(self.relu(torch.cat([up_out, self.bn(skip)], dim=1))))


class ResizeToOrig(nn.Module):
    def forward(self, x: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return x if x.shape[-3:] == original.shape[-3:] else F.interpolate(x, original.shape[-3:], mode="nearest")


class MergeLayer(nn.Module):
    """fastai ``MergeLayer(dense=True)``: the input volume concatenated to the features."""

    def forward(self, x: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, original], dim=1)


class ResBlock(nn.Module):
    """fastai ``ResBlock(1, ni, ni, norm_type=None, ndim=3)``: two convs, identity shortcut, ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.convpath = nn.Sequential(conv_layer(channels, channels), conv_layer(channels, channels, act=False))
        self.idpath = nn.Sequential()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.convpath(x) + self.idpath(x))


class DenoisingUNet3D(nn.Module):
    """faimed3d ``DynamicUnet3D(resnet18_3d with a k3/p0 stem, n_out=1)``: volume ``(B, 1, D, H, W)`` → same shape.

    The skips come from the stages after which the size changes (layer3, layer2, layer1, deepest
    first), as fastai's hooks pick them; the forward passes them explicitly instead of through hooks.
    """

    def __init__(self, hyperparameters: DenoiserHyperparameters) -> None:
        super().__init__()
        self.hyperparameters = h = hyperparameters
        stem = nn.Sequential(nn.Conv3d(1, h.stem_channels, kernel_size=3, stride=1, padding=0, bias=True), nn.BatchNorm3d(h.stem_channels), nn.ReLU(inplace=True))
        encoder = resnet3d_encoder(BasicBlock3d, stem, h.stem_channels, h.planes, h.blocks)
        deepest = h.planes[-1]
        middle = nn.Sequential(conv_layer(deepest, 2 * deepest), conv_layer(2 * deepest, deepest))
        blocks, up_in = [], deepest
        for index, skip in enumerate(reversed(h.planes[:-1])):  # layer3, layer2, layer1
            block = UnetBlock3D(up_in, skip, final_div=index != len(h.planes) - 2)
            blocks.append(block)
            up_in = block.out_channels
        channels = up_in + 1
        self.layers = nn.ModuleList(
            [
                encoder,
                middle,
                *blocks,
                nn.Sequential(conv_layer(up_in, up_in, transpose=True)),
                ResizeToOrig(),
                MergeLayer(),
                ResBlock(channels),
                conv_layer(channels, 1, ks=1, act=False),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoder, middle, *rest = self.layers
        skips = []
        features = x
        for stage in encoder:
            features = stage(features)
            skips.append(features)
        out = middle(features)
        n = len(self.hyperparameters.planes) - 1
        for block, skip in zip(rest[:n], reversed(skips[1:-1])):  # outputs of layer3, layer2, layer1
            out = block(out, skip)
        transpose, resize, merge, res_block, final = rest[n:]
        out = merge(resize(transpose(out), x), x)
        return final(res_block(out))


def build_classifier(hyperparameters: Mapping[str, Any]) -> DualEncoderClassifier:
    return DualEncoderClassifier(ClassifierHyperparameters.from_mapping(hyperparameters))


def build_denoiser(hyperparameters: Mapping[str, Any]) -> DenoisingUNet3D:
    return DenoisingUNet3D(DenoiserHyperparameters.from_mapping(hyperparameters))

