"""The result model: one shape for every chain, and the rules of what a result may claim.

A chain turns its input series into a ``ChainResult``; the SR, heatmap and summary writers
(pipeline/encode) read only this model, so a new chain gets its DICOM outputs for free.

The rules (checked when a result is built, so no chain, present or future, can break them):

* **Scope.** A finding is decided for the patient (both joints together), per side, or per
  quadrant (side x upper/lower). Its scope follows from what it carries: no laterality =
  patient level; a laterality = per side; a laterality and a region = per quadrant. Build
  findings with :meth:`Finding.patient_level`, :meth:`Finding.per_side` and
  :meth:`Finding.per_quadrant`.
* **A patient-level finding has no side.** It is encoded with no laterality at all, never as
  "bilateral" (there is no bilateral laterality in this model: "bilateral" would claim the
  model saw disease on both sides). The SR says in words that the finding covers both joints
  and that the model does not decide a side (see pipeline/encode/sr.py).
* **Per side only when the model decides per side.** A model that decides per side decides
  for both sides: per-side findings of one concept and site come as a complete pair (left and
  right, once each), and per-quadrant findings as the complete set of four. A lone "left"
  finding, the sign of a side attached to a patient-level output, is refused.
* **Explanation is not a finding.** Where a chain's explanation shows which side the model
  looked at (e.g. the share of the Grad-CAM inside each joint region), it is a
  :class:`SideExplanation`, reported under its own label, never with a Present/Absent.
* **Not analysed is a result.** A chain that cannot analyse its input returns
  :meth:`ChainResult.not_analysed_result` with a :class:`NotAnalysed` reason; the summary
  uses the same :class:`NotAnalysed` for series no chain analysed.
* **Contours are a model's output too.** A :class:`Contour` (a polyline on one source image,
  e.g. a joint line the chain's network traced) carries a side only because the network traced
  that side's joint; it is encoded as an SR spatial coordinate (SCOORD POLYLINE), never as a
  finding.
* **Maps mean the same across studies.** Evidence maps (Grad-CAM, attention) are scaled by the
  probability of the finding they explain (:func:`pipeline.cam.evidence_map`): the peak is the
  probability, so a negative study's map stays dim on the fixed 0-1 colour scale. Categorical
  maps (segmentations) name their categories.
"""

from __future__ import annotations

from collections import Counter
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
    """The patient's side (decided from ImageOrientationPatient/ImagePositionPatient, never from the screen).

    There is deliberately no "bilateral": a finding decided for both joints together has no
    laterality (scope PATIENT); per-side findings come as a left and a right finding.
    """

    LEFT = "left"
    RIGHT = "right"


class Region(str, Enum):
    """Upper or lower half of a joint (with a side: a quadrant)."""

    UPPER = "upper"
    LOWER = "lower"


class Scope(str, Enum):
    """What a finding's model decides for."""

    PATIENT = "patient"  # both joints together; no side
    SIDE = "side"  # each joint
    QUADRANT = "quadrant"  # each joint's upper and lower half


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
    """One decision of a chain: a concept at a site, for the patient, one side or one quadrant.

    Prefer the constructors :meth:`patient_level`, :meth:`per_side`, :meth:`per_quadrant`;
    they say the scope. ``probability`` is the model's probability of ``concept`` being
    present at that scope; present when ``probability >= threshold``.
    """

    concept: Concept  # what, e.g. active sacroiliitis, bone marrow edema
    site: Site
    probability: float
    threshold: float  # the operating threshold: present when probability >= threshold
    laterality: Laterality | None = None  # only when the model decides per side
    region: Region | None = None  # only when the model decides per quadrant (needs a side)
    evidence: tuple[ImageRef, ...] = ()  # the source images the finding rests on
    note: str | None = None  # e.g. what a high-confidence flag means, in words for the reader

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} outside [0, 1]")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold {self.threshold} outside [0, 1]")
        if self.laterality is not None and not isinstance(self.laterality, Laterality):
            raise ValueError(f"laterality must be Laterality.LEFT or RIGHT (or None), got {self.laterality!r}")
        if self.region is not None and self.laterality is None:
            raise ValueError("a quadrant (region) needs a side: a model deciding per quadrant decides per side")

    @classmethod
    def patient_level(
        cls, concept: Concept, site: Site, probability: float, threshold: float, *,
        evidence: tuple[ImageRef, ...] = (), note: str | None = None,
    ) -> Finding:
        """A finding decided for the patient as a whole (both joints): no side, no quadrant."""
        return cls(concept, site, probability, threshold, None, None, evidence, note)

    @classmethod
    def per_side(
        cls, concept: Concept, site: Site, laterality: Laterality, probability: float, threshold: float, *,
        evidence: tuple[ImageRef, ...] = (), note: str | None = None,
    ) -> Finding:
        """A finding the model decides for one side (its result must hold the other side too)."""
        return cls(concept, site, probability, threshold, laterality, None, evidence, note)

    @classmethod
    def per_quadrant(
        cls, concept: Concept, site: Site, laterality: Laterality, region: Region, probability: float,
        threshold: float, *, evidence: tuple[ImageRef, ...] = (), note: str | None = None,
    ) -> Finding:
        """A finding the model decides for one quadrant (its result must hold all four)."""
        return cls(concept, site, probability, threshold, laterality, region, evidence, note)

    @property
    def scope(self) -> Scope:
        if self.laterality is None:
            return Scope.PATIENT
        return Scope.SIDE if self.region is None else Scope.QUADRANT

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold

    @property
    def label(self) -> str:
        """Where, for readers: 'left sacroiliac joint, upper', or 'sacroiliac joints (both, no side decided)'."""
        if self.laterality is None:
            return f"{self.site.value}s, both sides together (no side decided)"
        text = f"{self.laterality.value} {self.site.value}"
        return f"{text}, {self.region.value}" if self.region else text


@dataclass(frozen=True)
class SideExplanation:
    """Where on one side a model looked while deciding a patient-level finding: an explanation, not a finding.

    E.g. the share of the Grad-CAM inside the left joint region. Reported under its own label
    ("explanation, not a finding"), never with a Present/Absent or a threshold.
    """

    explains: Concept  # the concept of the patient-level finding it explains
    laterality: Laterality
    value: float  # in [0, 1]
    concept: Concept  # what ``value`` is, e.g. "share of Grad-CAM in the joint region"

    def __post_init__(self) -> None:
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"explanation value {self.value} outside [0, 1]")


class NotAnalysedReason(str, Enum):
    """Why a series (or a chain's input) got no analysis."""

    NO_CHAIN_CONFIGURED = "no chain configured"
    CHAIN_FAILED = "chain failed"
    WRONG_PLANE = "wrong plane"
    SERIES_INCOMPLETE = "series incomplete"
    INPUT_UNUSABLE = "input unusable"  # the chain (or classification) could not use it
    OTHER_SERIES_USED = "another series was used"  # a chain took a better-fitting series of the same kind
    OTHER_INPUTS_MISSING = "the chain's other inputs are missing"
    PENDING = "not yet analysed"  # its chain has not finished


@dataclass(frozen=True)
class NotAnalysed:
    """A first-class "not analysed" outcome: the reason, and a sentence for the reader."""

    reason: NotAnalysedReason
    detail: str = ""

    @property
    def text(self) -> str:
        return f"not analysed: {self.reason.value}" + (f" ({self.detail})" if self.detail else "")


class MapMeaning(str, Enum):
    ATTENTION = "attention"
    GRAD_CAM = "Grad-CAM"
    SEGMENTATION = "segmentation"


EVIDENCE_MAPS = frozenset({MapMeaning.ATTENTION, MapMeaning.GRAD_CAM})


@dataclass(frozen=True)
class Category:
    """One category of a categorical map: its value in the map and its name for the legend."""

    value: float
    label: str


@dataclass(frozen=True)
class Map:
    """A float map in [0, 1] on the pixel grid (rows x columns) of one source image.

    Evidence maps (Grad-CAM, attention) are on the absolute scale of :func:`pipeline.cam.evidence_map`
    (their peak is at most the explained finding's probability). A categorical map lists its
    ``categories``; every non-zero value of it is one of theirs. The caption says what the map
    is; the heatmap writer adds the instance number. ``display_window`` is the (centre, width)
    window, in the source's modality units (HU for CT), in which the heatmap shows the source
    under the map, where the chain's reading calls for one (a bone window for CT bone lesions);
    None: the source's own window.
    """

    source: ImageRef
    values: np.ndarray
    meaning: MapMeaning
    key: bool = True  # key images get a heatmap object
    caption: str | None = None
    categories: tuple[Category, ...] = ()
    display_window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.values.ndim != 2:
            raise ValueError("a map is 2-D, on one source image's pixel grid")
        if not np.isfinite(self.values).all() or self.values.min() < 0 or self.values.max() > 1:
            raise ValueError("map values must be finite and in [0, 1]")
        if self.display_window is not None and not (len(self.display_window) == 2 and self.display_window[1] > 0):
            raise ValueError(f"display_window is (centre, width) with a positive width, got {self.display_window}")
        if self.meaning is MapMeaning.SEGMENTATION and not self.categories:
            raise ValueError("a segmentation map names its categories (Map.categories)")
        if self.categories:
            known = np.array([0.0, *(c.value for c in self.categories)])
            stray = ~np.isclose(self.values[..., None], known).any(axis=-1)
            if stray.any():
                raise ValueError(f"categorical map has values outside its categories, e.g. {self.values[stray][0]}")

    @property
    def categorical(self) -> bool:
        return bool(self.categories)


@dataclass(frozen=True)
class Contour:
    """A polyline a chain's model traced on one source image, in that image's pixel coordinates.

    ``points`` are (row, column) pixel centres (K >= 2), as numpy indexes them; the SR writer
    converts them to DICOM's (column, row) image coordinates. ``laterality``: the patient's side
    of the structure traced (a network output channel per side), ``site`` what it outlines.
    """

    source: ImageRef
    points: np.ndarray
    site: Site
    description: str  # e.g. "joint line traced by the contouring network"
    laterality: Laterality | None = None
    length_mm: float | None = None

    def __post_init__(self) -> None:
        points = np.asarray(self.points, dtype=float)
        if points.ndim != 2 or points.shape[1] != 2 or len(points) < 2 or not np.isfinite(points).all():
            raise ValueError("a contour is at least two finite (row, column) points")
        if self.laterality is not None and not isinstance(self.laterality, Laterality):
            raise ValueError(f"laterality must be Laterality.LEFT or RIGHT (or None), got {self.laterality!r}")


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
    """Everything a chain found in one study (or why it found nothing: ``not_analysed``)."""

    findings: Sequence[Finding]
    provenance: Provenance
    sources: Sequence[Dataset]  # the analyzed images (headers suffice), for evidence and the image library
    maps: Sequence[Map] = ()
    image_scores: Sequence[ImageScore] = ()
    explanations: Sequence[SideExplanation] = ()
    not_analysed: NotAnalysed | None = None
    contours: Sequence[Contour] = ()

    def __post_init__(self) -> None:
        if self.not_analysed is not None and (self.findings or self.maps or self.image_scores or self.explanations or self.contours):
            raise ValueError("a not-analysed result carries no findings, maps, scores, explanations or contours")
        if self.not_analysed is None and not self.findings:
            raise ValueError("a result without findings must say why (ChainResult.not_analysed_result)")
        check_scopes(self.findings)
        patient_level = {f.concept for f in self.findings if f.scope is Scope.PATIENT}
        for explanation in self.explanations:
            if explanation.explains not in patient_level:
                raise ValueError(
                    f"explanation of {explanation.explains.meaning!r} explains no patient-level finding of this result"
                )
        peak = max((f.probability for f in self.findings), default=0.0)
        for heat in self.maps:
            if heat.meaning in EVIDENCE_MAPS and float(heat.values.max()) > peak + 1e-6:
                raise ValueError(
                    f"{heat.meaning.value} map peaks at {float(heat.values.max()):.3f}, above the findings' "
                    f"probability {peak:.3f}: scale it with pipeline.cam.evidence_map"
                )

    @classmethod
    def not_analysed_result(
        cls, provenance: Provenance, sources: Sequence[Dataset], reason: NotAnalysedReason, detail: str
    ) -> ChainResult:
        """The result of a chain that could not analyse its input, with the reason."""
        return cls(findings=(), provenance=provenance, sources=sources, not_analysed=NotAnalysed(reason, detail))


def check_scopes(findings: Sequence[Finding]) -> None:
    """Refuse findings whose sides or quadrants are not a complete per-side / per-quadrant set.

    Per (concept, site, scope): per-side findings are exactly one left and one right;
    per-quadrant findings are exactly the four side x region pairs; patient-level at most one.
    """
    groups: dict[tuple[Concept, Site, Scope], list[Finding]] = {}
    for finding in findings:
        groups.setdefault((finding.concept, finding.site, finding.scope), []).append(finding)
    for (concept, site, scope), members in groups.items():
        places = Counter((f.laterality, f.region) for f in members)
        expected = {
            Scope.PATIENT: {(None, None)},
            Scope.SIDE: {(side, None) for side in Laterality},
            Scope.QUADRANT: {(side, region) for side in Laterality for region in Region},
        }[scope]
        if set(places) != expected or any(count > 1 for count in places.values()):
            wanted = {Scope.PATIENT: "one", Scope.SIDE: "one left and one right", Scope.QUADRANT: "all four quadrants once"}
            raise ValueError(
                f"{concept.meaning} at {site.value}: {scope.value}-level findings must be {wanted[scope]}; "
                "a model that decides per side decides for both sides"
            )
