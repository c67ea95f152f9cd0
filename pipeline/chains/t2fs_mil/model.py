"""The seed architecture: ResNet-18 slice encoder, gated attention over the slices, bag classifier.

Keskin et al. (2026) encode each axial T2 fat-suppressed slice with a ResNet-18 (512-d after
global average pooling), pool the slice features with gated attention (Ilse et al., 2018:
``a_i = softmax_i(w^T (tanh(V h_i) ⊙ sigm(U h_i)))``) and classify the attention-weighted bag
vector: one probability of active sacroiliitis per series.

MONAI's ResNet is used for the encoder with torchvision's stem (7×7 convolution with stride 2,
then max pooling) and downsampling (1×1 convolution without bias, then batch norm), so the
seed size is the ResNet-18 the paper used; ``widen_factor`` and ``input_size`` make the
narrower demonstration model. MONAI's ``MILModel(mil_mode="att")`` is not gated, hence
:class:`GatedAttention` here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Hyperparameters:
    """What ``build_model`` needs; read from the pack manifest's architecture hyperparameters.

    The defaults are the seed paper's architecture (:data:`SEED_HYPERPARAMETERS`).
    """

    encoder: str = "resnet18"
    widen_factor: float = 1.0
    in_channels: int = 1
    input_size: int = 224
    conv1_stride: int = 2
    attention_dim: int = 128
    #: 1: one logit, sigmoid (the demonstration packs); 2: the paper's two classes with softmax,
    #: index :data:`INFLAMED` = "Inflamed", 0 = "Healthy" (the paper names them, not their order: our choice)
    classes: int = 1

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Hyperparameters:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown t2fs-mil hyperparameters {unknown}; known: {sorted(known)}")
        parameters = cls(**dict(values))
        if parameters.encoder != "resnet18":
            raise ValueError(f"t2fs-mil encoder must be resnet18 (the seed's), got {parameters.encoder!r}")
        if parameters.input_size < 32:
            raise ValueError(f"input_size must be at least 32 pixels, got {parameters.input_size}")
        if parameters.classes not in (1, 2):
            raise ValueError(f"classes must be 1 (sigmoid) or 2 (softmax, the paper's), got {parameters.classes}")
        if parameters.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3 (the paper's ImageNet layout), got {parameters.in_channels}")
        return parameters

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: the seed architecture at its published size, one sigmoid output (the layout the demo trains)
SEED_HYPERPARAMETERS: dict[str, Any] = Hyperparameters().as_dict()
#: the paper's network as it was built: ImageNet's 3-channel stem, two classes with softmax
PAPER_HYPERPARAMETERS: dict[str, Any] = Hyperparameters(in_channels=3, classes=2).as_dict()
#: the paper's "Inflamed" class among its two outputs
INFLAMED = 1


class GatedAttention(nn.Module):
    """Gated attention pooling (Ilse et al. 2018): one weight per instance, summing to 1 over the bag."""

    def __init__(self, feature_dim: int, attention_dim: int = 128) -> None:
        super().__init__()
        self.V = nn.Linear(feature_dim, attention_dim)
        self.U = nn.Linear(feature_dim, attention_dim)
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(slices, feature_dim) → attention weights (slices,), softmax over the slices."""
        scores = self.w(torch.tanh(self.V(features)) * torch.sigmoid(self.U(features)))
        return torch.softmax(scores.squeeze(-1), dim=0)


@dataclass(frozen=True)
class BagOutput:
    """One bag through the model."""

    logit: torch.Tensor  # scalar (one output) or (2,) (the paper's two classes)
    attention: torch.Tensor  # (slices,)
    features: torch.Tensor  # (slices, feature_dim)

    @property
    def probability(self) -> torch.Tensor:
        """P(active sacroiliitis): the sigmoid of one logit, or the softmax of the paper's "Inflamed"."""
        return class_probability(self.logit)


def class_probability(logit: torch.Tensor) -> torch.Tensor:
    """The positive probability from a bag's logit(s): sigmoid of one, softmax[INFLAMED] of two."""
    if logit.dim() == 0 or logit.shape[-1] == 1:
        return torch.sigmoid(logit.reshape(()))
    return torch.softmax(logit, dim=-1)[..., INFLAMED]


def resnet18_encoder(parameters: Hyperparameters) -> nn.Module:
    """MONAI's 2-D ResNet-18 without its classification layer: (N, C, H, W) → (N, 512·widen)."""
    from monai.networks.nets import resnet18

    return resnet18(
        spatial_dims=2,
        n_input_channels=parameters.in_channels,
        conv1_t_size=7,
        conv1_t_stride=parameters.conv1_stride,
        widen_factor=parameters.widen_factor,
        shortcut_type="B",
        bias_downsample=False,
        feed_forward=False,
    )


class T2FSMIL(nn.Module):
    """ResNet-18 slice features → gated attention → attention-weighted bag vector → logit."""

    def __init__(self, parameters: Hyperparameters) -> None:
        super().__init__()
        self.hyperparameters = parameters
        self.recipe = "keskin2026-t2fs-v1"  # the preprocessing recipe its pack names (set by load_model)
        self.encoder = resnet18_encoder(parameters)
        self.feature_dim = int(512 * parameters.widen_factor)
        self.attention = GatedAttention(self.feature_dim, parameters.attention_dim)
        self.classifier = nn.Linear(self.feature_dim, parameters.classes)

    def encode(self, slices: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """(slices, C, H, W) → (slices, feature_dim); ``chunk`` > 0 encodes that many slices at a time."""
        if chunk <= 0 or slices.shape[0] <= chunk:
            return self.encoder(slices)
        return torch.cat([self.encoder(part) for part in torch.split(slices, chunk)])

    def pool(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice features → (logit(s), attention): a scalar logit for one output, (2,) for the paper's two."""
        attention = self.attention(features)
        bag = attention @ features  # (feature_dim,)
        logits = self.classifier(bag)
        return (logits.squeeze(-1) if logits.shape[-1] == 1 else logits), attention

    def forward_bag(self, slices: torch.Tensor, chunk: int = 0) -> BagOutput:
        features = self.encode(slices, chunk)
        logit, attention = self.pool(features)
        return BagOutput(logit, attention, features)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        """One bag (slices, C, H, W) → logits (1, classes), the shape MONAI's CAM classes expect."""
        return self.forward_bag(slices).logit.reshape(1, -1)


class PartialBag(nn.Module):
    """The bag logit as a function of some of its slices, the others' features held fixed.

    In eval mode a slice's features depend on that slice alone, so the gradient of the bag logit
    with respect to the chosen slices' activations is the same as through the full bag: Grad-CAM
    on the most attended slices needs the encoder on those slices only.
    """

    def __init__(self, model: T2FSMIL, features: torch.Tensor, positions: list[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("fixed", features.detach().clone(), persistent=False)
        self.positions = list(positions)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        features = self.fixed.clone()
        features[self.positions] = self.model.encode(slices)
        return self.model.pool(features)[0].reshape(1, -1)


def build_model(hyperparameters: Mapping[str, Any] | Hyperparameters) -> T2FSMIL:
    """The network the hyperparameters describe (``{}`` gives the seed architecture)."""
    if not isinstance(hyperparameters, Hyperparameters):
        hyperparameters = Hyperparameters.from_mapping(hyperparameters)
    return T2FSMIL(hyperparameters)
