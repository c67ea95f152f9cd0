"""The two networks of Fu et al. (2024) in plain torch, with the module trees checkpoints use.

MONAI has neither network (its SEResNext50 adds squeeze-excitation and names its modules
differently) and torchvision/timm are not dependencies, so both are hand-written here:

* :class:`ResNeXt` -- ResNeXt-50 32×4d (Xie et al. 2017), module for module torchvision's
  ``resnext50_32x4d`` (``conv1``, ``bn1``, ``layer1..4`` of ``Bottleneck`` blocks with
  ``conv1/bn1/conv2/bn2/conv3/bn3`` and ``downsample.0/1``, ``fc``). With the 1000-class head it
  has :data:`RESNEXT50_PARAMETERS_1000` = 25,028,904 parameters, torchvision's figure.
* :class:`InceptionV4` -- Inception-v4 (Szegedy et al. 2016), module for module timm's
  ``inception_v4`` (``features.0..21`` of conv–BN–ReLU units named ``conv``/``bn``, Mixed3a/4a/5a,
  4× InceptionA, ReductionA, 7× InceptionB, ReductionB, 3× InceptionC, ``last_linear``); BN eps
  1e-3 as timm. With the 1000-class head: :data:`INCEPTION_V4_PARAMETERS_1000` = 42,679,816.

Both take a ``width`` (channel multiplier) and the demonstration pack uses a narrow one; at
``width=1`` and the published depths they are the published networks, and the tests assert the
parameter counts and layer shapes against the figures above.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

RESNEXT = "resnext50_32x4d"
INCEPTION = "inception_v4"
NETWORKS = (RESNEXT, INCEPTION)
#: what the manifest's ``model`` may select: one network, or the mean of both networks' probabilities
SELECTIONS = (RESNEXT, INCEPTION, "average")

RESNEXT50_PARAMETERS_1000 = 25_028_904  # torchvision resnext50_32x4d(), 1000 classes
INCEPTION_V4_PARAMETERS_1000 = 42_679_816  # timm inception_v4, 1000 classes
#: the 2-class versions: the same bodies, heads of 2048×2+2 and 1536×2+2 weights
RESNEXT50_PARAMETERS_2 = RESNEXT50_PARAMETERS_1000 - 2048 * 998 - 998
INCEPTION_V4_PARAMETERS_2 = INCEPTION_V4_PARAMETERS_1000 - 1536 * 998 - 998

PUBLISHED_INPUT = {RESNEXT: 224, INCEPTION: 299}


# ---------------------------------------------------------------------------------- ResNeXt-50


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (stride on the 3×3 conv, "ResNet v1.5"), grouped 3×3."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, groups: int, width: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNeXt(nn.Module):
    """torchvision's ResNet with grouped bottlenecks; ``planes`` are the four stages' base widths."""

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        planes: Sequence[int] = (64, 128, 256, 512),
        groups: int = 32,
        width_per_group: int = 4,
        classes: int = 2,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        for index, (blocks, width) in enumerate(zip(layers, planes)):
            stages.append(self._stage(width, blocks, 1 if index == 0 else 2, groups, width_per_group))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[3] * Bottleneck.expansion, classes)
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, planes: int, blocks: int, stride: int, groups: int, width_per_group: int) -> nn.Sequential:
        width = int(planes * (width_per_group / 64.0)) * groups  # torchvision's grouped width
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        units = [Bottleneck(self.inplanes, planes, stride, groups, width, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        units += [Bottleneck(self.inplanes, planes, 1, groups, width, None) for _ in range(1, blocks)]
        return nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# -------------------------------------------------------------------------------- Inception-v4


class ConvNormAct(nn.Module):
    """timm's ``ConvNormAct`` as Inception-v4 uses it: conv (no bias) – BN (eps 1e-3) – ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _Concat(nn.Module):
    """Runs the named branches on one input and concatenates them along the channels."""

    branch_names: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, name)(x) for name in self.branch_names], 1)


def _avgpool_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), ConvNormAct(cin, cout, 1))


class Mixed3a(nn.Module):
    def __init__(self, c: _Widths) -> None:
        super().__init__()
        self.maxpool = nn.MaxPool2d(3, stride=2)
        self.conv = ConvNormAct(c(64), c(96), 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.maxpool(x), self.conv(x)), 1)


class Mixed4a(_Concat):
    branch_names = ("branch0", "branch1")

    def __init__(self, c: _Widths) -> None:
        super().__init__()
        cin = c(64) + c(96)
        self.branch0 = nn.Sequential(ConvNormAct(cin, c(64), 1), ConvNormAct(c(64), c(96), 3))
        self.branch1 = nn.Sequential(
            ConvNormAct(cin, c(64), 1),
            ConvNormAct(c(64), c(64), (1, 7), padding=(0, 3)),
            ConvNormAct(c(64), c(64), (7, 1), padding=(3, 0)),
            ConvNormAct(c(64), c(96), 3),
        )


class Mixed5a(nn.Module):
    def __init__(self, c: _Widths) -> None:
        super().__init__()
        self.conv = ConvNormAct(2 * c(96), 2 * c(96), 3, stride=2)
        self.maxpool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.conv(x), self.maxpool(x)), 1)


class InceptionA(_Concat):
    branch_names = ("branch0", "branch1", "branch2", "branch3")

    def __init__(self, c: _Widths) -> None:
        super().__init__()
        cin = c.a_out
        self.branch0 = ConvNormAct(cin, c(96), 1)
        self.branch1 = nn.Sequential(ConvNormAct(cin, c(64), 1), ConvNormAct(c(64), c(96), 3, padding=1))
        self.branch2 = nn.Sequential(
            ConvNormAct(cin, c(64), 1), ConvNormAct(c(64), c(96), 3, padding=1), ConvNormAct(c(96), c(96), 3, padding=1)
        )
        self.branch3 = _avgpool_conv(cin, c(96))


class ReductionA(_Concat):
    branch_names = ("branch0", "branch1", "branch2")

    def __init__(self, c: _Widths) -> None:
        super().__init__()
        cin = c.a_out
        self.branch0 = ConvNormAct(cin, c(384), 3, stride=2)
        self.branch1 = nn.Sequential(
            ConvNormAct(cin, c(192), 1), ConvNormAct(c(192), c(224), 3, padding=1), ConvNormAct(c(224), c(256), 3, stride=2)
        )
        self.branch2 = nn.MaxPool2d(3, stride=2)


class InceptionB(_Concat):
    branch_names = ("branch0", "branch1", "branch2", "branch3")

    def __init__(self, c: _Widths) -> None:
        super().__init__()
        cin = c.b_out
        self.branch0 = ConvNormAct(cin, c(384), 1)
        self.branch1 = nn.Sequential(
            ConvNormAct(cin, c(192), 1),
            ConvNormAct(c(192), c(224), (1, 7), padding=(0, 3)),
            ConvNormAct(c(224), c(256), (7, 1), padding=(3, 0)),
        )
        self.branch2 = nn.Sequential(
            ConvNormAct(cin, c(192), 1),
            ConvNormAct(c(192), c(192), (7, 1), padding=(3, 0)),
            ConvNormAct(c(192), c(224), (1, 7), padding=(0, 3)),
            ConvNormAct(c(224), c(224), (7, 1), padding=(3, 0)),
            ConvNormAct(c(224), c(256), (1, 7), padding=(0, 3)),
        )
        self.branch3 = _avgpool_conv(cin, c(128))


class ReductionB(_Concat):
    branch_names = ("branch0", "branch1", "branch2")

    def __init__(self, c: _Widths) -> None:
        super().__init__()
        cin = c.b_out
        self.branch0 = nn.Sequential(ConvNormAct(cin, c(192), 1), ConvNormAct(c(192), c(192), 3, stride=2))
        self.branch1 = nn.Sequential(
            ConvNormAct(cin, c(256), 1),
            ConvNormAct(c(256), c(256), (1, 7), padding=(0, 3)),
            ConvNormAct(c(256), c(320), (7, 1), padding=(3, 0)),
            ConvNormAct(c(320), c(320), 3, stride=2),
        )
        self.branch2 = nn.MaxPool2d(3, stride=2)


class InceptionC(nn.Module):
    def __init__(self, c: _Widths) -> None:
        super().__init__()
        cin = c.c_out
        self.branch0 = ConvNormAct(cin, c(256), 1)
        self.branch1_0 = ConvNormAct(cin, c(384), 1)
        self.branch1_1a = ConvNormAct(c(384), c(256), (1, 3), padding=(0, 1))
        self.branch1_1b = ConvNormAct(c(384), c(256), (3, 1), padding=(1, 0))
        self.branch2_0 = ConvNormAct(cin, c(384), 1)
        self.branch2_1 = ConvNormAct(c(384), c(448), (3, 1), padding=(1, 0))
        self.branch2_2 = ConvNormAct(c(448), c(512), (1, 3), padding=(0, 1))
        self.branch2_3a = ConvNormAct(c(512), c(256), (1, 3), padding=(0, 1))
        self.branch2_3b = ConvNormAct(c(512), c(256), (3, 1), padding=(1, 0))
        self.branch3 = _avgpool_conv(cin, c(256))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.branch1_0(x)
        x2 = self.branch2_2(self.branch2_1(self.branch2_0(x)))
        return torch.cat(
            (
                self.branch0(x),
                self.branch1_1a(x1),
                self.branch1_1b(x1),
                self.branch2_3a(x2),
                self.branch2_3b(x2),
                self.branch3(x),
            ),
            1,
        )


@dataclass(frozen=True)
class _Widths:
    """Channel counts of Inception-v4 scaled by ``width`` (1.0: the published network)."""

    width: float

    def __call__(self, channels: int) -> int:
        return max(1, round(channels * self.width))

    @property
    def a_out(self) -> int:  # Mixed5a and each InceptionA: 384 channels at width 1
        return 4 * self(96)

    @property
    def b_out(self) -> int:  # ReductionA and each InceptionB: 1024
        return self(384) + self(256) + self.a_out

    @property
    def c_out(self) -> int:  # ReductionB and each InceptionC: 1536
        return self(192) + self(320) + self.b_out


class InceptionV4(nn.Module):
    """timm's ``inception_v4`` module tree; ``blocks`` = InceptionA/B/C repeats (published 4/7/3)."""

    def __init__(self, classes: int = 2, in_channels: int = 3, width: float = 1.0, blocks: Sequence[int] = (4, 7, 3)) -> None:
        super().__init__()
        c = _Widths(width)
        if 6 * c(256) != c.c_out or c(384) + 2 * c(256) + c(128) != c.b_out:
            raise ValueError(f"Inception-v4 width {width} rounds to channel counts whose blocks do not chain; try 0.25, 0.5 or 1")
        features: list[nn.Module] = [
            ConvNormAct(in_channels, c(32), 3, stride=2),
            ConvNormAct(c(32), c(32), 3),
            ConvNormAct(c(32), c(64), 3, padding=1),
            Mixed3a(c),
            Mixed4a(c),
            Mixed5a(c),
        ]
        features += [InceptionA(c) for _ in range(blocks[0])]
        features.append(ReductionA(c))
        features += [InceptionB(c) for _ in range(blocks[1])]
        features.append(ReductionB(c))
        features += [InceptionC(c) for _ in range(blocks[2])]
        self.features = nn.Sequential(*features)
        self.num_features = c.c_out
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.last_linear = nn.Linear(self.num_features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_linear(torch.flatten(self.global_pool(self.features(x)), 1))


# ------------------------------------------------------------------------------- construction


@dataclass(frozen=True)
class NetworkSpec:
    """One network's hyperparameters as the manifest writes them."""

    name: str
    input_size: int
    width: float = 1.0
    depths: tuple[int, ...] = ()  # ResNeXt: blocks per stage (3/4/6/3); Inception-v4: A/B/C repeats (4/7/3)
    groups: int = 32  # ResNeXt only: the cardinality
    width_per_group: int = 4  # ResNeXt only: channels per group at the first stage's published width

    @classmethod
    def from_mapping(cls, name: str, values: Mapping[str, Any]) -> NetworkSpec:
        if name not in NETWORKS:
            raise ValueError(f"unknown network {name!r}; known: {', '.join(NETWORKS)}")
        known = {"input_size", "width", "depths", "groups", "width_per_group"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{name}: unknown hyperparameter(s) {unknown}; known: {sorted(known)}")
        default_depths = (3, 4, 6, 3) if name == RESNEXT else (4, 7, 3)
        depths = tuple(int(d) for d in values.get("depths", default_depths))
        if len(depths) != len(default_depths) or min(depths) < 1:
            raise ValueError(f"{name}: depths must be {len(default_depths)} positive numbers, got {list(depths)}")
        return cls(
            name=name,
            input_size=int(values.get("input_size", PUBLISHED_INPUT[name])),
            width=float(values.get("width", 1.0)),
            depths=depths,
            groups=int(values.get("groups", 32)),
            width_per_group=int(values.get("width_per_group", 4)),
        )

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"input_size": self.input_size, "width": self.width, "depths": list(self.depths)}
        if self.name == RESNEXT:
            data["groups"] = self.groups
            data["width_per_group"] = self.width_per_group
        return data


def published_spec(name: str) -> NetworkSpec:
    return NetworkSpec.from_mapping(name, {})


def build_network(spec: NetworkSpec, classes: int = 2) -> nn.Module:
    """The network ``spec`` describes, with a ``classes``-way head (2: no sacroiliitis / sacroiliitis)."""
    if spec.name == RESNEXT:
        planes = [max(1, round(p * spec.width)) for p in (64, 128, 256, 512)]
        return ResNeXt(layers=spec.depths, planes=planes, groups=spec.groups, width_per_group=spec.width_per_group, classes=classes)
    return InceptionV4(classes=classes, width=spec.width, blocks=spec.depths)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def last_stage(network: nn.Module) -> str:
    """The module Grad-CAM hooks: the last convolutional stage (``layer4``; Inception-v4's last
    block, ``features.21`` at the published depth)."""
    if isinstance(network, ResNeXt):
        return "layer4"
    if isinstance(network, InceptionV4):
        return f"features.{len(network.features) - 1}"
    raise TypeError(f"not a ct-slices network: {type(network).__name__}")
