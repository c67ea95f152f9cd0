"""The two networks of Jamaludin et al. 2026 at their published sizes.

**Contouring U-Net.** The paper uses "a simple U-Net" (Ronneberger et al. 2015) on 2-D
coronal slices resampled to 224 x 224 and predicts, per joint, a start and an end Gaussian
heatmap and the x / y components of the unit vector field: 8 output channels, laid out in
:data:`CONTOUR_CHANNELS`.  The paper gives no widths, so we take the cited U-Net's
(64-128-256-512-1024, two 3x3 convolutions per level, max-pool down, transposed-convolution
up), which is MONAI's ``BasicUNet`` with those features (31.1 M parameters against
Ronneberger's 31.0 M: MONAI adds affine instance norm; it uses LeakyReLU).  Joints are the
*patient's* left and right, decided from the DICOM geometry by the preprocessing, never by
the image side.

**Lesion classifier.** A ResNet-34 encoder (MONAI's, with torchvision's stem and
downsampling, so it is the ResNet-34 of the paper's lineage) shared between the T1 and the
STIR region of one joint; the two embeddings are concatenated and fed to 14 separate
linear heads (:data:`~pipeline.phantom.readers.GRADED_OUTPUTS`: edema, erosion and fat
lesion per quadrant, sclerosis and ankylosis per joint).

Input layout (the paper does not say; our choice, declared in the manifest): **2-D slices**.
Each sequence's joint region is encoded slice by slice (the paper: "all available slices
within a volume are processed on a slice-wise basis") and the slice embeddings are
max-pooled over the slices, so a lesion seen on any slice can drive its head and the slice
count may vary; one channel per slice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from pipeline.phantom.readers import GRADED_OUTPUTS

JOINTS: tuple[str, ...] = ("left", "right")
"""Patient sides, in the order their channel groups appear."""

CONTOUR_MAPS: tuple[str, ...] = ("start", "end", "uvf_x", "uvf_y")
CONTOUR_CHANNELS: tuple[str, ...] = tuple(f"{joint}_{name}" for joint in JOINTS for name in CONTOUR_MAPS)
"""The U-Net's 8 output channels: per joint start / end heatmaps and the field's x (column) and y (row) components."""

#: measured once and asserted in the tests: the published sizes
REFERENCE_PARAMETERS = {"contour_unet": 31_112_520, "lesion_encoder": 21_278_400, "lesion_classifier": 21_292_750}


@dataclass(frozen=True)
class Hyperparameters:
    """Both networks' architecture; the defaults are the published sizes."""

    unet_features: tuple[int, ...] = (64, 128, 256, 512, 1024, 64)
    contour_size: int = 224
    encoder: str = "resnet34"
    widen_factor: float = 1.0
    roi_size: int = 112
    slice_pooling: str = "max"
    unet_norm: str = "instance"  # MONAI BasicUNet's default; "batch" lets a demo train on crops (see train.py)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Hyperparameters:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown t1stir-quadrants hyperparameters {unknown}; known: {sorted(known)}")
        values = dict(values)
        if "unet_features" in values:
            values["unet_features"] = tuple(values["unet_features"])
        parameters = cls(**values)
        if parameters.encoder != "resnet34":
            raise ValueError(f"t1stir-quadrants encoder must be resnet34 (the paper's), got {parameters.encoder!r}")
        if len(parameters.unet_features) != 6:
            raise ValueError("unet_features needs 6 widths (5 levels and the last decoder's)")
        if parameters.contour_size % 16:
            raise ValueError(f"contour_size must be a multiple of 16 (4 poolings), got {parameters.contour_size}")
        if parameters.unet_norm not in ("instance", "batch"):
            raise ValueError(f"unet_norm must be instance or batch, got {parameters.unet_norm!r}")
        if parameters.slice_pooling not in ("max", "mean"):
            raise ValueError(f"slice_pooling must be max or mean, got {parameters.slice_pooling!r}")
        return parameters

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["unet_features"] = list(self.unet_features)
        return values


SEED_HYPERPARAMETERS: dict[str, Any] = Hyperparameters().as_dict()


def build_contour_unet(parameters: Hyperparameters) -> nn.Module:
    """MONAI's BasicUNet, 1 channel in, :data:`CONTOUR_CHANNELS` out."""
    from monai.networks.nets import BasicUNet

    norm = ("instance", {"affine": True}) if parameters.unet_norm == "instance" else ("batch", {"affine": True})
    return BasicUNet(
        spatial_dims=2, in_channels=1, out_channels=len(CONTOUR_CHANNELS), features=parameters.unet_features, norm=norm
    )


def resnet34_encoder(parameters: Hyperparameters) -> nn.Module:
    """MONAI's 2-D ResNet-34 without its classification layer: (N, 1, H, W) -> (N, 512 * widen)."""
    from monai.networks.nets import resnet34

    return resnet34(
        spatial_dims=2,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=2,
        widen_factor=parameters.widen_factor,
        shortcut_type="B",
        bias_downsample=False,
        feed_forward=False,
    )


class QuadrantLesionClassifier(nn.Module):
    """Shared ResNet-34 over a joint's T1 and STIR region slices -> 14 logits (one per graded output)."""

    def __init__(self, parameters: Hyperparameters) -> None:
        super().__init__()
        self.hyperparameters = parameters
        self.encoder = resnet34_encoder(parameters)
        self.embedding_dim = int(512 * parameters.widen_factor)
        self.heads = nn.ModuleList(nn.Linear(2 * self.embedding_dim, 1) for _ in GRADED_OUTPUTS)

    def embed(self, slices: torch.Tensor) -> torch.Tensor:
        """One sequence's region (slices, 1, H, W) -> its pooled embedding (embedding_dim,)."""
        features = self.encoder(slices)
        if self.hyperparameters.slice_pooling == "max":
            return features.max(dim=0).values
        return features.mean(dim=0)

    def forward(self, t1: torch.Tensor, stir: torch.Tensor) -> torch.Tensor:
        """A joint's T1 and STIR regions (slices may differ in count) -> logits (1, 14) in ``GRADED_OUTPUTS`` order."""
        joint = torch.cat([self.embed(t1), self.embed(stir)])
        return torch.cat([head(joint) for head in self.heads]).reshape(1, len(GRADED_OUTPUTS))


def build_models(hyperparameters: Mapping[str, Any] | Hyperparameters) -> tuple[nn.Module, QuadrantLesionClassifier]:
    """The contouring U-Net and the lesion classifier from manifest hyperparameters."""
    parameters = (
        hyperparameters if isinstance(hyperparameters, Hyperparameters) else Hyperparameters.from_mapping(hyperparameters)
    )
    return build_contour_unet(parameters), QuadrantLesionClassifier(parameters)
