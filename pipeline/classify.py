"""Series classification: which role (T1, STIR, T2FS, CT, XR, OTHER) and which plane a series has.

The receiver calls :func:`header_summary` once per series (on its first instance) and stores
the small JSON-able dict it returns; :func:`classify_series` then decides from that dict alone,
so a classification can be recomputed or explained later without the DICOM files.

Decisions are made by ordered :class:`ClassificationRule` objects: the site's rules from
config.yaml first, then :data:`BUILTIN_RULES`; the first rule whose conditions all hold wins.
Every :class:`Classification` names the rule that fired and the evidence it saw, which is what
``sijnode explain SERIES_UID`` prints.

Condition language (the values of ``match`` and of each ``unless`` entry)
-------------------------------------------------------------------------
Keys are DICOM keywords from the header summary.  ``"A|B"`` means "A or B": the condition holds
when it holds for any of the listed attributes that is present.  A missing attribute never
satisfies a condition.  Values:

* ``"regex"`` (a plain string): :func:`re.search` on the text of the value; multi-valued
  attributes are joined with ``\\`` and numbers are written like ``150``.  Case-sensitive unless
  the pattern says ``(?i)``.
* ``["A", "B"]`` (a list): the whole value equals one of the items, ignoring case.
* ``{"contains": "X"}`` or ``{"contains": ["X", "Y"]}``: one of the attribute's values equals
  X (or Y), ignoring case; meant for multi-valued attributes such as ImageType and ScanOptions.
* ``{"min": 100, "max": 250}``: a numeric value lies in the closed range (either bound may be
  left out).
* ``{"regex": ..., "one_of": [...], ...}``: the long forms; several operators in one mapping
  must all hold.

``match`` conditions must all hold.  ``unless`` is a list of condition mappings; the rule does
not fire when every condition of any one of them holds.  That is how "T2 without fat
suppression" and "IR without a STIR inversion time" are kept out while a missing attribute still
never counts as evidence.

This module must stay importable by the node process: no torch, no pixel access.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import Any

import pydicom
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydicom.datadict import dictionary_VM, tag_for_keyword
from pydicom.multival import MultiValue

__all__ = [
    "BUILTIN_RULES",
    "DEFAULT_TILT_TOLERANCE_DEG",
    "INPUT_SOP_CLASSES",
    "SIJNODE_MANUFACTURER",
    "Classification",
    "ClassificationRule",
    "Condition",
    "Plane",
    "Role",
    "SUMMARY_KEYWORDS",
    "UNCLASSIFIED_RULE",
    "check_rule_names",
    "classify_series",
    "header_summary",
    "plane_from_orientation",
    "plane_from_view_position",
    "sijnode_result_evidence",
    "trace_classification",
]


class Role(str, Enum):
    """What a series is as an input to an analysis chain."""

    T1 = "T1"
    STIR = "STIR"
    T2FS = "T2FS"
    CT = "CT"
    XR = "XR"
    OTHER = "OTHER"


class Plane(str, Enum):
    """Slice plane of a cross-sectional series, or projection of a radiograph."""

    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"
    OBLIQUE = "oblique"
    NONE = "none"


# --------------------------------------------------------------------------------------------
# Header summary
# --------------------------------------------------------------------------------------------

#: Top-level attributes copied into the summary.  Deliberately no patient, study or operator
#: identification: the summary is stored in the database and shown by `sijnode explain`.
SUMMARY_KEYWORDS: tuple[str, ...] = (
    "Modality",
    "SOPClassUID",
    "Manufacturer",
    "ManufacturerModelName",
    "MagneticFieldStrength",
    "ImageType",
    "SeriesDescription",
    "StudyDescription",
    "ProtocolName",
    "SequenceName",
    "PulseSequenceName",
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    "EchoPulseSequence",
    "EchoPlanarPulseSequence",
    "InversionRecovery",
    "SpectrallySelectedSuppression",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "EchoTrainLength",
    "FlipAngle",
    "ImageOrientationPatient",
    "BodyPartExamined",
    "ViewPosition",
    "PresentationIntentType",
    "ContrastBolusAgent",
)

#: Enhanced (multi-frame) MR/CT objects keep geometry and timing inside functional groups.
#: (functional group macro, attribute) pairs looked up in the shared groups, then in the first
#: frame's groups; only filled in when the top level lacks the attribute.
_FUNCTIONAL_GROUP_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("PlaneOrientationSequence", "ImageOrientationPatient"),
    ("MRTimingAndRelatedParametersSequence", "RepetitionTime"),
    ("MRTimingAndRelatedParametersSequence", "FlipAngle"),
    ("MREchoSequence", "EffectiveEchoTime"),
    ("MRModifierSequence", "InversionRecovery"),
    ("MRModifierSequence", "InversionTimes"),
)


def _json_scalar(value: Any) -> str | float | None:
    """One DICOM value as a JSON-able scalar: numbers as float, text stripped, rest dropped."""
    if isinstance(value, str):  # also UID and the string-based VRs
        return value.strip() or None
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):  # DS, IS
        number = float(value)
        return number if math.isfinite(number) else None
    return None  # bytes, person names, sequences: never classification evidence


def _json_value(value: Any, always_list: bool = False) -> str | float | list[str | float] | None:
    """A DICOM element value as JSON: multi-valued as a list, empty as None.

    `always_list` keeps attributes that may hold several values (ScanOptions, ImageType...)
    a list even when this instance has one value, so stored summaries have stable types.
    """
    if isinstance(value, (MultiValue, list, tuple)):
        items = [item for item in (_json_scalar(v) for v in value) if item is not None]
        return items or None
    scalar = _json_scalar(value)
    return [scalar] if always_list and scalar is not None else scalar


def _may_hold_several_values(keyword: str) -> bool:
    tag = tag_for_keyword(keyword)
    return tag is not None and dictionary_VM(tag) != "1"


def _functional_group_value(ds: pydicom.Dataset, macro: str, keyword: str) -> Any:
    """`keyword` from the shared functional groups, else from the first frame's groups."""
    for groups_keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(groups_keyword)
        if not groups:
            continue
        macro_items = groups[0].get(macro)
        if macro_items:
            value = macro_items[0].get(keyword)
            if value not in (None, ""):
                return value
    return None


def header_summary(ds: pydicom.Dataset) -> dict[str, Any]:
    """The classification-relevant attributes of one instance, as a JSON-able dict.

    Keys are DICOM keywords; attributes that may hold several values (VM other than 1) are
    always lists, numbers are floats; missing or empty attributes are left out.  Never contains
    patient identification.  Only header elements are read, so it is cheap, and works the same
    on a dataset read with ``stop_before_pixels``.
    """
    summary: dict[str, Any] = {}
    for keyword in SUMMARY_KEYWORDS:
        value = _json_value(ds.get(keyword), _may_hold_several_values(keyword))
        if value is not None:
            summary[keyword] = value
    if "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds:
        for macro, keyword in _FUNCTIONAL_GROUP_ATTRIBUTES:
            if keyword in summary:
                continue
            raw = _functional_group_value(ds, macro, keyword)
            value = _json_value(raw, _may_hold_several_values(keyword))
            if value is not None:
                summary[keyword] = value
    return summary


# --------------------------------------------------------------------------------------------
# Conditions and rules
# --------------------------------------------------------------------------------------------

#: Units shown next to numbers in reasons, so "EchoTime 66 ms ≥ 50" reads naturally.
_UNITS = {
    "EchoTime": " ms",
    "EffectiveEchoTime": " ms",
    "RepetitionTime": " ms",
    "InversionTime": " ms",
    "InversionTimes": " ms",
    "FlipAngle": "°",
    "MagneticFieldStrength": " T",
}


def _values(value: Any) -> list[Any]:
    """The values of an attribute as a list (a scalar is one value)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return [value]


def _text(value: Any) -> str:
    """Text form used by regex and one_of: numbers as `150`, lists joined with backslashes."""
    return "\\".join(f"{v:g}" if isinstance(v, float) else str(v) for v in _values(value))


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _show(attribute: str, value: Any) -> str:
    """How a summary value appears in a reason: text quoted, numbers with their unit."""
    values = _values(value)
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "\\".join(f"{v:g}" for v in values) + _UNITS.get(attribute, "")
    return f"'{_text(value)}'"


def _bound(number: float) -> str:
    return f"{number:g}"


class Condition(BaseModel):
    """One test on one attribute; every operator given must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    regex: str | None = None
    one_of: list[str | float] | None = None
    contains: list[str] | None = None
    min: float | None = None
    max: float | None = None

    _pattern: re.Pattern[str] | None = PrivateAttr(default=None)

    @field_validator("contains", mode="before")
    @classmethod
    def _single_token_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> Condition:
        if all(op is None for op in (self.regex, self.one_of, self.contains, self.min, self.max)):
            raise ValueError("a condition needs at least one of regex, one_of, contains, min, max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is greater than max {self.max:g}")
        if self.one_of is not None and not self.one_of:
            raise ValueError("one_of needs at least one item")
        if self.contains is not None and not self.contains:
            raise ValueError("contains needs at least one item")
        if self.regex is not None:
            try:
                # Compiled once per rule, not once per series.
                self._pattern = re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"invalid regex {self.regex!r}: {exc}") from exc
        return self

    def test(self, attribute: str, value: Any) -> tuple[bool, str]:
        """(holds, sentence): the evidence when it holds, what failed when it does not."""
        shown = _show(attribute, value)
        evidence: list[str] = []
        if self._pattern is not None:
            found = self._pattern.search(_text(value))
            if found is None:
                return False, f"{attribute} {shown} does not match /{self.regex}/"
            evidence.append(f"{attribute} {shown} matches /{found.group(0)}/")
        if self.one_of is not None:
            wanted = {_text(item).upper() for item in self.one_of}
            if _text(value).upper() not in wanted:
                return False, f"{attribute} {shown} is not one of {_list(self.one_of)}"
            evidence.append(f"{attribute} is {shown}")
        if self.contains is not None:
            present = {_text(v).upper() for v in _values(value)}
            hits = [token for token in self.contains if token.upper() in present]
            if not hits:
                return False, f"{attribute} {shown} contains none of {_list(self.contains)}"
            evidence.append(f"{attribute} {shown} contains {hits[0]}")
        if self.min is not None or self.max is not None:
            numbers = [n for n in (_number(v) for v in _values(value)) if n is not None]
            in_range = [
                n
                for n in numbers
                if (self.min is None or n >= self.min) and (self.max is None or n <= self.max)
            ]
            if not in_range:
                return False, f"{attribute} {shown} is not {self._range_text()}"
            evidence.append(f"{attribute} {shown} {self._range_text()}")
        return True, "; ".join(evidence)

    def _range_text(self) -> str:
        if self.min is not None and self.max is not None:
            return f"in [{_bound(self.min)}, {_bound(self.max)}]"
        if self.min is not None:
            return f"≥ {_bound(self.min)}"
        return f"≤ {_bound(self.max)}"  # type: ignore[arg-type]


def _list(items: Iterable[Any]) -> str:
    return "/".join(_text(item) for item in items)


def _normalise_condition(value: Any) -> Any:
    """Shorthands: a string is a regex, a list is one_of."""
    if isinstance(value, str):
        return {"regex": value}
    if isinstance(value, list):
        return {"one_of": value}
    return value


def _check_keys(conditions: Mapping[str, Any]) -> None:
    """Reject unknown keywords now: a typo in config.yaml would otherwise never match."""
    for key in conditions:
        for keyword in key.split("|"):
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"{keyword!r} (in {key!r}) is not a DICOM keyword")


def _prepare_conditions(value: Any) -> Any:
    if not isinstance(value, Mapping):
        return value
    _check_keys(value)
    return {key: _normalise_condition(cond) for key, cond in value.items()}


class ClassificationRule(BaseModel):
    """One classification rule, as written under the classification rules in config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    match: dict[str, Condition] = Field(min_length=1)
    unless: list[dict[str, Condition]] = Field(default_factory=list)
    role: Role
    plane: Plane | None = None  # None: computed from ImageOrientationPatient / ViewPosition
    counts_as_input: bool = True
    note: str | None = None  # a sentence put before the evidence in the reason `explain` shows

    @field_validator("match", mode="before")
    @classmethod
    def _prepare_match(cls, value: Any) -> Any:
        return _prepare_conditions(value)

    @field_validator("unless", mode="before")
    @classmethod
    def _prepare_unless(cls, value: Any) -> Any:
        if isinstance(value, Mapping):  # one mapping written without the list around it
            value = [value]
        if isinstance(value, list):
            return [_prepare_conditions(entry) for entry in value]
        return value


@dataclass(frozen=True)
class _RuleOutcome:
    matched: bool
    evidence: tuple[str, ...] = ()  # what held, when matched
    failure: str = ""  # first failed condition, or the unless entry that held


def _test_key(key: str, condition: Condition, summary: Mapping[str, Any]) -> tuple[bool, str]:
    """A condition on "A|B|…" holds when it holds for any present attribute of the list."""
    failures = []
    for attribute in key.split("|"):
        if attribute not in summary:
            failures.append(f"{attribute} missing")
            continue
        holds, sentence = condition.test(attribute, summary[attribute])
        if holds:
            return True, sentence
        failures.append(sentence)
    return False, " and ".join(failures)


def _evaluate(rule: ClassificationRule, summary: Mapping[str, Any]) -> _RuleOutcome:
    evidence = []
    for key, condition in rule.match.items():
        holds, sentence = _test_key(key, condition, summary)
        if not holds:
            return _RuleOutcome(False, failure=sentence)
        evidence.append(sentence)
    for exception in rule.unless:
        results = [_test_key(key, condition, summary) for key, condition in exception.items()]
        if all(holds for holds, _ in results):
            return _RuleOutcome(False, failure="excluded: " + "; ".join(s for _, s in results))
    return _RuleOutcome(True, evidence=tuple(evidence))


# --------------------------------------------------------------------------------------------
# Built-in rules
# --------------------------------------------------------------------------------------------

# Name evidence comes from SeriesDescription only: GE writes the exam-level protocol into
# ProtocolName, identical on every series ("SIJ STIR T1 T2FS"), so reading it would give every
# series of the study the same name evidence.  Sites can still match ProtocolName in config.
_NAMES = "SeriesDescription"

# Letter guards instead of \b: "_" is a word character, and names like "t2_tse_tra_fs" or
# "T2FS" must match while "FSE", "spiral" or "block" must not.
_LOCALIZER_NAME = (
    r"(?i)locali[sz]er|locator|scout|survey|topogram|scanogram|3[ -]?pl(?:ane)?|tri[ -]?pilot"
    r"|asset[ _-]?cal|calibration|ref[ _-]?scan|(?<![a-z])(?:loc|pilot|cal)(?![a-z])"
)
_FAT_SUPPRESSION_NAME = r"(?i)(?<![a-z])(?:spa?ir|fs)(?![a-z])|fat[ _-]?(?:sat|sup)"
_FAT_SUPPRESSION_OPTIONS = ["FS", "SFS", "FSP", "FAT", "FAT_AND_WATER"]
_STIR_NAME = r"(?i)stir|tirm"
_FLAIR_NAME = r"(?i)flair|dark[ _-]?fluid"
_T1_NAME = r"(?i)(?<![0-9])t1(?![0-9])"
_DIXON_NAME = r"(?i)dixon|(?<![a-z])(?:ideal|flex)(?![a-z])"
_DIFFUSION_NAME = r"(?i)dwi|diff|ep2d|(?<![a-z])(?:adc|trace)(?![a-z])"
_CONTRAST_NAME = (
    r"(?i)(?<![a-z])(?:post|gd|gado\w*|km|contrast|ce)(?![a-z])|\+\s*c(?![a-z])|(?<![a-z])c\+"
)
_CONTRAST_AGENT_GIVEN = r"(?i)^(?!\s*(?:no|none|n/?a)?\s*$).+"

_MR = {"Modality": ["MR"]}
_STIR_INVERSION_TIME = {"InversionTime|InversionTimes": {"min": 100, "max": 250}}
_INVERSION_RECOVERY = {"ScanningSequence|ScanOptions": {"contains": ["IR", "IR_GEMS"]}}
_LONG_TE_TR = {"EchoTime|EffectiveEchoTime": {"min": 50}, "RepetitionTime": {"min": 1000}}
_SHORT_TE_TR = {"EchoTime|EffectiveEchoTime": {"max": 30}, "RepetitionTime": {"max": 1000}}

# Reasons to reject an MR role rule, shared between rules (each entry blocks on its own).
_NOT_EPI_OR_DIFFUSION: list[dict[str, Any]] = [
    {"ScanningSequence": {"contains": "EP"}},
    {"EchoPlanarPulseSequence": ["YES"]},
    {"SequenceName": r"^\*?ep"},  # Siemens EPI sequence names: "*ep_b800t", "*epfid2d1_64"
    {"ImageType": {"contains": ["DIFFUSION", "ADC", "TRACEW"]}},
    {_NAMES: _DIFFUSION_NAME},
]
_NOT_INVERSION_RECOVERY: list[dict[str, Any]] = [
    _INVERSION_RECOVERY,
    {"InversionRecovery": ["YES"]},
    {_NAMES: _STIR_NAME},
    {_NAMES: _FLAIR_NAME},
]
_NOT_FAT_SUPPRESSED: list[dict[str, Any]] = [
    {"ScanOptions|SpectrallySelectedSuppression": {"contains": _FAT_SUPPRESSION_OPTIONS}},
    {_NAMES: _FAT_SUPPRESSION_NAME},
]
_NOT_CONTRAST_ENHANCED: list[dict[str, Any]] = [
    {"ContrastBolusAgent": _CONTRAST_AGENT_GIVEN},
    {_NAMES: _CONTRAST_NAME},
]

_SECONDARY_CAPTURE_SOP_CLASS = r"^1\.2\.840\.10008\.5\.1\.4\.1\.1\.7(?:\.[1-4])?$"
_CT_SOP_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
]
_XR_SOP_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
]
_MR_SOP_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
]

#: The storage SOP classes a series can be a chain input in. Everything else a PACS sends (SR,
#: KOS, presentation states, SEG, PDF, RT, Secondary Capture, raw "for processing" DX, other
#: modalities) is acknowledged and kept as a non-input object: it never (re-)opens a study.
INPUT_SOP_CLASSES: frozenset[str] = frozenset(_MR_SOP_CLASSES + _CT_SOP_CLASSES + _XR_SOP_CLASSES)

#: The Manufacturer every object the node writes carries (pipeline.encode uses this constant).
SIJNODE_MANUFACTURER = "sijnode"


def sijnode_result_evidence(ds: pydicom.Dataset) -> str | None:
    """Why an object looks like a sijnode result (this node's or another's), or None.

    Results carry Manufacturer "sijnode" at the top level and in the "processing algorithm" item
    of their ContributingEquipmentSequence (which a PACS or workstation that edits the object
    keeps while it may rewrite the top level).
    """
    if str(ds.get("Manufacturer", "") or "").strip() == SIJNODE_MANUFACTURER:
        return f"Manufacturer '{SIJNODE_MANUFACTURER}'"
    for item in ds.get("ContributingEquipmentSequence", None) or []:
        if str(item.get("Manufacturer", "") or "").strip() == SIJNODE_MANUFACTURER:
            device = str(item.get("DeviceUID", "") or "")
            return f"contributing equipment '{SIJNODE_MANUFACTURER}'" + (f" (device {device})" if device else "")
    return None


# Anatomy and projection evidence for projection radiographs and CT (only pelvic ones are inputs).
# Pelvic words in the defined terms of BodyPartExamined (PS3.16 Annex L: PELVIS, SIJOINT, SACRUM,
# ABDOMENPELVIS) and in descriptions, in the languages of the phantoms' vendors and sites
# (Becken, bekken, bassin, bacino; ISG = Iliosakralgelenk).
_PELVIC = (
    r"(?i)pelv|becken|bekken|bassin|bacino|sacr[ou]m|sakrum|kreuzbein|sacro[ -]?iliac|iliosa[ck]ral"
    r"|(?<![a-z])(?:sij(?:oint)?s?|isgs?|si[ -]?(?:joints?|gelenke?))(?![a-z])"
)
# A BodyPartExamined that names another region: then descriptions cannot make it pelvic.
_NOT_PELVIC_BODY_PART = (
    r"(?i)chest|thorax|lung|breast|head|skull|brain|neck|face|sinus|orbit|dental|jaw|hand|finger"
    r"|wrist|arm|elbow|shoulder|clavicle|knee|leg|ankle|foot|toe|heel|femur|tibia|extremit"
    r"|[cto]spine|lspine|cervical|thoracic|lumbar|^spine$|wholespine|abdomen$|^abd$|heart|cardiac"
)
# Frontal projection: ViewPosition AP/PA, or "a.p."/"AP"/"PA" written in a description.
_FRONTAL = r"(?i)(?<![a-z])(?:a\.?\s?p|p\.?\s?a)(?![a-z])|frontal|anterior[ -]?posterior"
_NOT_FRONTAL_VIEW = r"(?i)^(?!\s*(?:AP|PA)\s*$).+"  # a ViewPosition is given and it is not AP/PA
_XR_OBJECT = {"Modality|SOPClassUID": r"^(?:CR|DX)$|^1\.2\.840\.10008\.5\.1\.4\.1\.1\.1(?:\.1)?$"}
_CT_OBJECT = {"Modality|SOPClassUID": r"^CT$|^1\.2\.840\.10008\.5\.1\.4\.1\.1\.2(?:\.[12])?$"}
_DESCRIPTIONS = "SeriesDescription|StudyDescription|ProtocolName"
_PELVIC_EVIDENCE = {f"BodyPartExamined|{_DESCRIPTIONS}": _PELVIC}
_NOT_PELVIC: list[dict[str, Any]] = [{"BodyPartExamined": _NOT_PELVIC_BODY_PART}]


def _rule(name: str, match: dict[str, Any], role: Role, **fields: Any) -> ClassificationRule:
    return ClassificationRule(name=name, match=match, role=role, **fields)


#: Series that never count as inputs, whatever any other rule says (see classify_series).
_EXCLUSION_RULES: list[ClassificationRule] = [
    _rule(
        "exclude-non-image-modality",
        {"Modality": ["SR", "PR", "KO", "DOC", "SEG", "REG", "RTSTRUCT", "RTPLAN", "RTDOSE"]},
        Role.OTHER,
        counts_as_input=False,
    ),
    _rule(
        "exclude-secondary-capture",
        {"SOPClassUID": _SECONDARY_CAPTURE_SOP_CLASS},
        Role.OTHER,
        counts_as_input=False,
    ),
    _rule(
        "exclude-localizer-image-type",
        {"ImageType": {"contains": "LOCALIZER"}},
        Role.OTHER,
        counts_as_input=False,
    ),
    _rule(
        "exclude-localizer-name",
        {_NAMES: _LOCALIZER_NAME},
        Role.OTHER,
        counts_as_input=False,
    ),
    _rule(
        "exclude-secondary-image-type",
        {"ImageType": {"contains": ["SECONDARY", "MPR", "REFORMATTED", "PROJECTION IMAGE", "MIP"]}},
        Role.OTHER,
        counts_as_input=False,
    ),
    # Radiographs are exempt: "For Presentation" CR/DX images are routinely DERIVED\PRIMARY
    # (processed from the detector read-out), and they are exactly what XR chains want.
    _rule(
        "exclude-derived-image-type",
        {"ImageType": {"contains": "DERIVED"}},
        Role.OTHER,
        unless=[{"Modality": ["CR", "DX"]}],
        counts_as_input=False,
    ),
    # Raw detector data is not meant to be looked at, by people or models.
    _rule(
        "exclude-for-processing",
        {"PresentationIntentType": ["FOR PROCESSING"]},
        Role.OTHER,
        counts_as_input=False,
    ),
    # Any other storage class (parametric maps, SEG, waveforms, US, NM, ...): never a chain input.
    _rule(
        "exclude-non-input-sop-class",
        {"SOPClassUID": {"regex": "."}},
        Role.OTHER,
        unless=[{"SOPClassUID": sorted(INPUT_SOP_CLASSES)}],
        counts_as_input=False,
    ),
]

_ROLE_RULES: list[ClassificationRule] = [
    # CT counts only with evidence of the pelvis: a chest or head CT is not a sacroiliac CT.
    _rule("ct-pelvis", {**_CT_OBJECT, **_PELVIC_EVIDENCE}, Role.CT, unless=_NOT_PELVIC),
    _rule(
        "ct-not-pelvis", {**_CT_OBJECT, "BodyPartExamined": _NOT_PELVIC_BODY_PART}, Role.OTHER,
        counts_as_input=False, note="not a pelvis CT: the body part examined is another region",
    ),
    _rule(
        "ct-without-pelvis-evidence", _CT_OBJECT, Role.OTHER, counts_as_input=False,
        note="not a pelvis CT: neither BodyPartExamined nor a description names the pelvis or sacroiliac joints",
    ),
    # A radiograph counts only as a frontal (AP/PA) view of the pelvis or sacroiliac joints, what
    # the radiograph chains are trained on; chest, spine, hand, lateral and oblique views do not.
    _rule(
        "xr-pelvis-frontal",
        {**_XR_OBJECT, **_PELVIC_EVIDENCE, f"ViewPosition|{_DESCRIPTIONS}": _FRONTAL},
        Role.XR,
        unless=[*_NOT_PELVIC, {"ViewPosition": _NOT_FRONTAL_VIEW}],
    ),
    _rule(
        "xr-not-pelvis", {**_XR_OBJECT, "BodyPartExamined": _NOT_PELVIC_BODY_PART}, Role.OTHER,
        counts_as_input=False, note="not a pelvic radiograph: the body part examined is another region",
    ),
    _rule(
        "xr-not-frontal", {**_XR_OBJECT, "ViewPosition": _NOT_FRONTAL_VIEW}, Role.OTHER,
        counts_as_input=False, note="not a frontal (AP/PA) view, which the radiograph chains need",
    ),
    _rule(
        "xr-without-frontal-pelvis-evidence", _XR_OBJECT, Role.OTHER, counts_as_input=False,
        note=(
            "not counted as a pelvic radiograph: needs the pelvis or sacroiliac joints in BodyPartExamined "
            "or a description, and an AP/PA ViewPosition or 'a.p.'/'p.a.' in a description"
        ),
    ),
    # Dixon series come as in/opp/water/fat with identical timing; which one a chain wants is
    # a site decision (config rule), so by default none of them takes a role.
    _rule("mr-dixon", {**_MR, _NAMES: _DIXON_NAME}, Role.OTHER),
    # STIR: inversion recovery with a fat-nulling TI (≈150 ms at 1.5 T, ≈220 ms at 3 T).
    _rule(
        "stir-inversion-recovery",
        {**_MR, **_INVERSION_RECOVERY, **_STIR_INVERSION_TIME},
        Role.STIR,
        unless=_NOT_EPI_OR_DIFFUSION,
    ),
    _rule(
        "stir-enhanced-inversion-recovery",
        {**_MR, "InversionRecovery": ["YES"], **_STIR_INVERSION_TIME},
        Role.STIR,
        unless=_NOT_EPI_OR_DIFFUSION,
    ),
    # Named STIR/TIRM but without usable IR header evidence; a TI far above the STIR range
    # (FLAIR "t2_tirm_tra_dark-fluid", TI ≈ 2500) or gradient echo means it is not STIR.
    _rule(
        "stir-name",
        {**_MR, _NAMES: _STIR_NAME},
        Role.STIR,
        unless=[
            {"InversionTime|InversionTimes": {"min": 400}},
            {_NAMES: _FLAIR_NAME},
            {"ScanningSequence": {"contains": "GR"}},
            *_NOT_EPI_OR_DIFFUSION,
        ],
    ),
    # T2FS: long TE and TR, fat suppressed, and not inversion recovery (that is STIR/FLAIR).
    _rule(
        "t2fs-fat-suppression-option",
        {
            **_MR,
            "ScanOptions|SpectrallySelectedSuppression": {"contains": _FAT_SUPPRESSION_OPTIONS},
            **_LONG_TE_TR,
        },
        Role.T2FS,
        unless=[*_NOT_INVERSION_RECOVERY, {"ScanningSequence": {"contains": "GR"}}, *_NOT_EPI_OR_DIFFUSION],
    ),
    _rule(
        "t2fs-name",
        {**_MR, _NAMES: _FAT_SUPPRESSION_NAME, **_LONG_TE_TR},
        Role.T2FS,
        unless=[*_NOT_INVERSION_RECOVERY, {"ScanningSequence": {"contains": "GR"}}, *_NOT_EPI_OR_DIFFUSION],
    ),
    # T1: short TE/TR spin echo (SE/TSE/FSE), not fat suppressed, not IR, not post-contrast.
    _rule(
        "t1-spin-echo",
        {**_MR, "ScanningSequence|EchoPulseSequence": {"contains": ["SE", "SPIN"]}, **_SHORT_TE_TR},
        Role.T1,
        unless=[*_NOT_FAT_SUPPRESSED, *_NOT_INVERSION_RECOVERY, *_NOT_CONTRAST_ENHANCED, *_NOT_EPI_OR_DIFFUSION],
    ),
    # Named T1 where the timing is unusual (long TR at 3 T) or the header lacks it; gradient
    # echo T1 (VIBE/FLASH/SPGR) is kept out because 3D stacks would win on instance count.
    _rule(
        "t1-name",
        {**_MR, _NAMES: _T1_NAME},
        Role.T1,
        unless=[
            *_NOT_FAT_SUPPRESSED,
            *_NOT_INVERSION_RECOVERY,
            *_NOT_CONTRAST_ENHANCED,
            *_NOT_EPI_OR_DIFFUSION,
            {"ScanningSequence": {"contains": "GR"}},
            {"EchoTime|EffectiveEchoTime": {"min": 50}},
        ],
    ),
]

#: The built-in defaults in the order they are tried, after the site's config rules.
BUILTIN_RULES: list[ClassificationRule] = [*_EXCLUSION_RULES, *_ROLE_RULES]

#: Rule name recorded when no rule matched.
UNCLASSIFIED_RULE = "unclassified"


def check_rule_names(rules: Sequence[ClassificationRule]) -> None:
    """Raise ValueError if config rule names repeat or shadow built-in names.

    `sijnode explain` identifies a decision by rule name alone, so names must be unambiguous.
    Call it when loading config.yaml; classify_series calls it too.
    """
    reserved = {rule.name for rule in BUILTIN_RULES} | {UNCLASSIFIED_RULE}
    seen: set[str] = set()
    for rule in rules:
        if rule.name in reserved:
            raise ValueError(f"classification rule name {rule.name!r} is reserved by a built-in rule")
        if rule.name in seen:
            raise ValueError(f"classification rule name {rule.name!r} is used twice")
        seen.add(rule.name)


# --------------------------------------------------------------------------------------------
# Planes
# --------------------------------------------------------------------------------------------

# Slice normal along LPS x (left) → sagittal, y (posterior) → coronal, z (superior) → axial.
_AXIS_PLANES = (Plane.SAGITTAL, Plane.CORONAL, Plane.AXIAL)
_AXIS_NAMES = ("left–right", "anterior–posterior", "superior–inferior")

#: Default tilt tolerance (degrees): a slice normal within it of an LPS axis takes that axis's
#: plane. Semicoronal SIJ MRI follows the sacrum, tilted 25-45° from true coronal, and must count
#: as coronal. The node's classification.tilt_tolerance_deg should default to this constant.
DEFAULT_TILT_TOLERANCE_DEG = 45.0


def _check_tolerance(tilt_tolerance_deg: float) -> None:
    # Above 45° the nearest axis is always within tolerance, so "oblique" could never happen.
    if not 0.0 <= tilt_tolerance_deg <= 45.0:
        raise ValueError(f"tilt tolerance must be within [0, 45] degrees, got {tilt_tolerance_deg}")


def _slice_normal(iop: Sequence[float]) -> tuple[tuple[float, float, float], int, float] | None:
    """(unit normal, index of the nearest LPS axis, angle to it in degrees), None if unusable."""
    try:
        values = [float(v) for v in iop]
    except (TypeError, ValueError):
        return None
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        return None
    rx, ry, rz, cx, cy, cz = values
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    row_length = math.hypot(rx, ry, rz)
    column_length = math.hypot(cx, cy, cz)
    normal_length = math.hypot(*normal)
    # Parallel or zero direction cosines give no plane.
    if row_length == 0 or column_length == 0 or normal_length < 1e-6 * row_length * column_length:
        return None
    unit = (normal[0] / normal_length, normal[1] / normal_length, normal[2] / normal_length)
    axis = max(range(3), key=lambda i: abs(unit[i]))
    tilt = math.degrees(math.acos(min(1.0, abs(unit[axis]))))
    return unit, axis, round(tilt, 2)


def _plane_within(axis: int, tilt: float, tilt_tolerance_deg: float) -> Plane:
    return _AXIS_PLANES[axis] if tilt <= tilt_tolerance_deg else Plane.OBLIQUE


def plane_from_orientation(iop: Sequence[float], tilt_tolerance_deg: float) -> tuple[Plane, float | None]:
    """Plane of a slice from ImageOrientationPatient, and its tilt from that plane in degrees.

    The slice normal (row × column) is compared with the LPS axes; within the tolerance of the
    nearest axis the slice takes that plane (a semicoronal SIJ slice tilted 20° is coronal),
    beyond it the slice is oblique (the tilt is still reported).  Unusable input gives
    (Plane.NONE, None).
    """
    _check_tolerance(tilt_tolerance_deg)
    normal = _slice_normal(iop)
    if normal is None:
        return Plane.NONE, None
    _, axis, tilt = normal
    return _plane_within(axis, tilt, tilt_tolerance_deg), tilt


def plane_from_view_position(view_position: str | None) -> Plane:
    """Radiograph projection: AP/PA → coronal, lateral → sagittal, anything else → none."""
    view = (view_position or "").strip().upper()
    if view in {"AP", "PA"}:
        return Plane.CORONAL
    if view in {"LL", "RL", "LAT", "LATERAL"}:
        return Plane.SAGITTAL
    return Plane.NONE


def _geometry_plane(summary: Mapping[str, Any], tolerance: float) -> tuple[Plane, float | None, str]:
    """(plane, tilt, sentence) from the series' own geometry."""
    iop = summary.get("ImageOrientationPatient")
    if iop is not None:
        normal = _slice_normal(_values(iop))
        if normal is None:
            return Plane.NONE, None, f"plane none: ImageOrientationPatient {_show('', iop)} is unusable"
        _, axis, tilt = normal
        plane = _plane_within(axis, tilt, tolerance)
        if plane is Plane.OBLIQUE:
            sentence = (
                f"plane oblique: slice normal {tilt:g}° from the {_AXIS_NAMES[axis]} axis, "
                f"beyond the {tolerance:g}° tolerance"
            )
        else:
            sentence = (
                f"plane {plane.value}: slice normal {tilt:g}° from the {_AXIS_NAMES[axis]} axis "
                f"(tolerance {tolerance:g}°)"
            )
        return plane, tilt, sentence
    view = summary.get("ViewPosition")
    if view is not None:
        plane = plane_from_view_position(str(view))
        return plane, None, f"plane {plane.value} from ViewPosition '{view}'"
    return Plane.NONE, None, "plane none: no ImageOrientationPatient or ViewPosition"


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Classification:
    """The decision for one series, with the rule that made it and why."""

    role: Role
    plane: Plane
    tilt_deg: float | None
    rule: str
    reason: str
    counts_as_input: bool


def _ordered_rules(rules: Sequence[ClassificationRule]) -> list[tuple[str, ClassificationRule]]:
    return [("config", rule) for rule in rules] + [("built-in", rule) for rule in BUILTIN_RULES]


def _first_exclusion(summary: Mapping[str, Any]) -> tuple[ClassificationRule, _RuleOutcome] | None:
    for rule in _EXCLUSION_RULES:
        outcome = _evaluate(rule, summary)
        if outcome.matched:
            return rule, outcome
    return None


_KEY_ATTRIBUTES = (
    "Modality", "ImageType", "SeriesDescription", "ScanningSequence", "ScanOptions",
    "EchoTime", "RepetitionTime", "InversionTime",
)


def classify_series(
    summary: Mapping[str, Any],
    rules: Sequence[ClassificationRule] = (),
    tilt_tolerance_deg: float = DEFAULT_TILT_TOLERANCE_DEG,
) -> Classification:
    """Classify one series from its :func:`header_summary`.

    Config `rules` are tried first, in order, then :data:`BUILTIN_RULES`; the first rule whose
    conditions hold decides the role (and the plane, if the rule fixes one; otherwise the plane
    comes from ImageOrientationPatient or, for radiographs, ViewPosition).  A config rule may
    give a localizer, derived or secondary series a role, but such a series still never counts
    as an input: the built-in exclusions are re-checked and, if one holds, `counts_as_input` is
    forced to False and the reason says so.
    """
    _check_tolerance(tilt_tolerance_deg)
    check_rule_names(rules)
    for source, rule in _ordered_rules(rules):
        outcome = _evaluate(rule, summary)
        if not outcome.matched:
            continue
        reason = "; ".join([rule.note, *outcome.evidence] if rule.note else outcome.evidence)
        if rule.plane is not None:
            plane, tilt = rule.plane, None
            reason += f"; plane {rule.plane.value} set by the rule"
        else:
            plane, tilt, plane_sentence = _geometry_plane(summary, tilt_tolerance_deg)
            reason += f"; {plane_sentence}"
        counts_as_input = rule.counts_as_input
        if source == "config" and counts_as_input:
            exclusion = _first_exclusion(summary)
            if exclusion is not None:
                counts_as_input = False
                reason += (
                    f"; not counted as input because built-in rule '{exclusion[0].name}' "
                    f"also holds ({'; '.join(exclusion[1].evidence)})"
                )
        return Classification(rule.role, plane, tilt, rule.name, reason, counts_as_input)

    plane, tilt, plane_sentence = _geometry_plane(summary, tilt_tolerance_deg)
    seen = [f"{k} {_show(k, summary[k])}" for k in _KEY_ATTRIBUTES if k in summary]
    reason = "no rule matched (" + (", ".join(seen) or "no classification attributes") + ")"
    return Classification(Role.OTHER, plane, tilt, UNCLASSIFIED_RULE, f"{reason}; {plane_sentence}", True)


def trace_classification(
    summary: Mapping[str, Any],
    rules: Sequence[ClassificationRule] = (),
    tilt_tolerance_deg: float = DEFAULT_TILT_TOLERANCE_DEG,
) -> list[str]:
    """Every rule tried for one series, in order, up to the one that fired: for a verbose
    `sijnode explain`, to see why an expected rule did not match."""
    check_rule_names(rules)
    lines = []
    for source, rule in _ordered_rules(rules):
        outcome = _evaluate(rule, summary)
        if outcome.matched:
            lines.append(f"✓ {rule.name} ({source}) → {rule.role.value}: {'; '.join(outcome.evidence)}")
            break
        lines.append(f"✗ {rule.name} ({source}): {outcome.failure}")
    result = classify_series(summary, rules, tilt_tolerance_deg)
    lines.append(
        f"= {result.role.value} {result.plane.value} by {result.rule}"
        f"{'' if result.counts_as_input else ' (not an input)'}: {result.reason}"
    )
    return lines
