"""The result model: one shape for every chain.

A chain turns its input series into a ``ChainResult``; the SR writer and the heatmap writer
(pipeline/encode) read only this model, so a new chain gets its DICOM outputs for free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from pydicom import Dataset


class Site(str, Enum):
    """Where a finding is: the joint, or the bone on one side of it."""

    SACROILIAC_JOINT = "sacroiliac joint"
    ILIUM = "ilium"
    SACRUM = "sacrum"


class Laterality(str, Enum):
    """The patient's side (decided from ImageOrientationPatient/ImagePositionPatient, never from the screen)."""

    LEFT = "left"
    RIGHT = "right"
    BILATERAL = "bilateral"


class Region(str, Enum):
    UPPER = "upper"
    LOWER = "lower"


@dataclass(frozen=True)
class Concept:
    """A coded concept (value, scheme designator, meaning), e.g. ("39723000", "SCT", "Sacroiliac joint")."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class ImageRef:
    """A source image: enough to reference it in DICOM (and find it among the sources)."""

    sop_class_uid: str
    sop_instance_uid: str
    frame: int | None = None

    @classmethod
    def of(cls, dataset: Dataset) -> ImageRef:
        return cls(str(dataset.SOPClassUID), str(dataset.SOPInstanceUID))


@dataclass(frozen=True)
class Finding:
    """One decision of a chain at one site."""

    concept: Concept  # what, e.g. active sacroiliitis, bone marrow edema
    site: Site
    probability: float
    threshold: float  # the operating threshold: present when probability >= threshold
    laterality: Laterality | None = None
    region: Region | None = None  # upper/lower, where the chain reports quadrants
    evidence: tuple[ImageRef, ...] = ()  # the source images the finding rests on
    note: str | None = None  # e.g. what a high-confidence flag means, in words for the reader

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} outside [0, 1]")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold {self.threshold} outside [0, 1]")

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold

    @property
    def label(self) -> str:
        """A readable tracking identifier, e.g. 'left sacroiliac joint, upper'."""
        parts = [self.laterality.value if self.laterality else None, self.site.value]
        text = " ".join(p for p in parts if p)
        return f"{text}, {self.region.value}" if self.region else text


class MapMeaning(str, Enum):
    ATTENTION = "attention"
    GRAD_CAM = "Grad-CAM"
    SEGMENTATION = "segmentation"


@dataclass(frozen=True)
class Map:
    """A float map in [0, 1] on the pixel grid (rows × columns) of one source image."""

    source: ImageRef
    values: np.ndarray
    meaning: MapMeaning
    key: bool = True  # key images get a heatmap object
    caption: str | None = None

    def __post_init__(self) -> None:
        if self.values.ndim != 2:
            raise ValueError("a map is 2-D, on one source image's pixel grid")
        if not np.isfinite(self.values).all() or self.values.min() < 0 or self.values.max() > 1:
            raise ValueError("map values must be finite and in [0, 1]")


@dataclass(frozen=True)
class ImageScore:
    """A per-image number a chain reports, e.g. a slice's attention weight."""

    source: ImageRef
    value: float
    concept: Concept
    unit: Concept | None = None


@dataclass(frozen=True)
class Provenance:
    """Which algorithm made the result, and how."""

    chain: str
    pack_name: str
    pack_version: str
    weights_sha256: str
    demonstration: bool
    device: str
    timings_s: dict[str, float] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)  # e.g. threshold, TTA on/off

    @property
    def algorithm_name(self) -> str:
        return f"sijnode {self.chain}"

    @property
    def device_uid_seed(self) -> str:
        """Identifies the pack build: a new weights file gives a new device UID."""
        return f"{self.pack_name}:{self.pack_version}:{self.weights_sha256}"


@dataclass(frozen=True)
class ChainResult:
    """Everything a chain found in one study."""

    findings: Sequence[Finding]
    provenance: Provenance
    sources: Sequence[Dataset]  # the analyzed images (headers suffice), for evidence and the image library
    maps: Sequence[Map] = ()
    image_scores: Sequence[ImageScore] = ()
