"""Series classification on header sets modeled on real vendor protocols.

Each case builds a pydicom Dataset the way a scanner would fill it (including patient
identification, which must never reach the summary), runs it through header_summary and
classify_series, and checks role, plane, the rule that fired and whether it counts as input.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.classify import (
    BUILTIN_RULES,
    DEFAULT_TILT_TOLERANCE_DEG,
    SUMMARY_KEYWORDS,
    UNCLASSIFIED_RULE,
    Classification,
    ClassificationRule,
    INPUT_SOP_CLASSES,
    Plane,
    Role,
    check_rule_names,
    classify_series,
    header_summary,
    plane_from_orientation,
    plane_from_view_position,
    trace_classification,
)
from pipeline.route import ChainRequirement, ChainSpec, RoutedJob, SeriesCandidate, route_study

# --------------------------------------------------------------------------------------------
# Geometry helpers: orientations are built by rotating textbook planes, so the expected tilt
# is the rotation angle, not a number copied from the implementation.
# --------------------------------------------------------------------------------------------

Vector = tuple[float, float, float]
X_AXIS: Vector = (1.0, 0.0, 0.0)  # LPS: patient left
Y_AXIS: Vector = (0.0, 1.0, 0.0)  # posterior
Z_AXIS: Vector = (0.0, 0.0, 1.0)  # superior

# (row direction, column direction) of untilted slices, as scanners write them.
BASE_ORIENTATIONS: dict[str, tuple[Vector, Vector]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}


def rotate(vector: Vector, axis: Vector, degrees: float) -> Vector:
    """Rodrigues rotation of `vector` about unit `axis`."""
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    kx, ky, kz = axis
    vx, vy, vz = vector
    dot = kx * vx + ky * vy + kz * vz
    cross = (ky * vz - kz * vy, kz * vx - kx * vz, kx * vy - ky * vx)
    x, y, z = (v * c + k * s + ax * dot * (1 - c) for v, k, ax in zip(vector, cross, axis))
    return (x, y, z)


def orientation(base: str, degrees: float = 0.0, axis: Vector = X_AXIS) -> list[float]:
    """ImageOrientationPatient of a `base` slice rotated by `degrees` about `axis`."""
    row, column = BASE_ORIENTATIONS[base]
    # Six decimals: what scanners write, and it keeps DS values within 16 characters.
    return [round(v, 6) + 0.0 for v in (*rotate(row, axis, degrees), *rotate(column, axis, degrees))]


AXIAL = orientation("axial")
CORONAL = orientation("coronal")
SAGITTAL = orientation("sagittal")
SEMICORONAL_20 = orientation("coronal", 20.0)  # along the sacrum: the usual SIJ plane
CORONAL_TILTED_40 = orientation("coronal", 40.0)  # too steep: oblique at 30° tolerance, coronal at 45°
AXIAL_GANTRY_TILT_7 = orientation("axial", 7.0)  # CT gantry tilt / small MR angulation
SEMIAXIAL_15 = orientation("axial", -15.0)  # axial-oblique angled along the SI joints

# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_SC_TRUE_COLOR = "1.2.840.10008.5.1.4.1.1.7.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
X_RAY_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
GRAYSCALE_PR = "1.2.840.10008.5.1.4.1.1.11.1"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"

PHI = {"PatientName": "DOE^JANE", "PatientID": "H1234567", "PatientBirthDate": "19790412"}


def dataset(**attributes: Any) -> Dataset:
    """A header like one a modality sends: identification plus the given attributes."""
    ds = Dataset()
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.InstitutionName = "Sint-Jan Hospital"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


SIEMENS = {
    "Modality": "MR",
    "SOPClassUID": MR_IMAGE,
    "Manufacturer": "SIEMENS",
    "ManufacturerModelName": "Aera",
    "MagneticFieldStrength": 1.5,
    "BodyPartExamined": "PELVIS",
    "MRAcquisitionType": "2D",
    "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"],
}
GE = {
    "Modality": "MR",
    "SOPClassUID": MR_IMAGE,
    "Manufacturer": "GE MEDICAL SYSTEMS",
    "ManufacturerModelName": "SIGNA Architect",
    "MagneticFieldStrength": 3.0,
    # GE writes the exam protocol into ProtocolName, the same on every series of the study:
    # its "STIR", "T1" and "T2FS" must not leak into the classification of each series.
    "ProtocolName": "SIJ STIR T1 T2FS",
    "BodyPartExamined": "SPINE",
    "MRAcquisitionType": "2D",
    "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
}
PHILIPS = {
    "Modality": "MR",
    "SOPClassUID": MR_IMAGE,
    "Manufacturer": "Philips Medical Systems",
    "ManufacturerModelName": "Ingenia",
    "MagneticFieldStrength": 1.5,
    "BodyPartExamined": "PELVIS",
    "MRAcquisitionType": "2D",
}
CANON = {
    "Modality": "MR",
    "SOPClassUID": MR_IMAGE,
    "Manufacturer": "CANON_MEC",
    "ManufacturerModelName": "Vantage Orian",
    "MagneticFieldStrength": 1.5,
    "BodyPartExamined": "PELVIS",
    "MRAcquisitionType": "2D",
    "ImageType": ["ORIGINAL", "PRIMARY", "MR"],
}
SIEMENS_CT = {
    "Modality": "CT",
    "SOPClassUID": CT_IMAGE,
    "Manufacturer": "SIEMENS",
    "ManufacturerModelName": "SOMATOM Definition AS+",
    "BodyPartExamined": "PELVIS",
}


@dataclass(frozen=True)
class Case:
    """One series header and the classification it must get."""

    id: str
    attributes: dict[str, Any]
    role: Role
    plane: Plane
    rule: str
    counts_as_input: bool = True
    tilt: float | None = None  # expected tilt in degrees where geometry decides the plane
    evidence: tuple[str, ...] = field(default=())  # phrases the reason must contain


def case(id: str, vendor: dict[str, Any], role: Role, plane: Plane, rule: str, **kw: Any) -> Case:
    """Helper: vendor defaults, then the series' own attributes."""
    expect = {k: kw.pop(k) for k in ("counts_as_input", "tilt", "evidence") if k in kw}
    return Case(id, {**vendor, **kw}, role, plane, rule, **expect)


CASES: list[Case] = [
    # ---------------- Siemens MAGNETOM Aera 1.5 T, SIJ protocol ----------------
    case(
        "siemens-localizer", SIEMENS, Role.OTHER, Plane.SAGITTAL, "exclude-localizer-name",
        counts_as_input=False,
        SeriesDescription="localizer", ProtocolName="localizer", SequenceName="*fl2d1",
        ScanningSequence="GR", SequenceVariant=["SP", "OSP"], RepetitionTime=8.6, EchoTime=4.0,
        FlipAngle=20, ImageOrientationPatient=SAGITTAL,
    ),
    case(
        "siemens-t1-tse-semicoronal", SIEMENS, Role.T1, Plane.CORONAL, "t1-spin-echo", tilt=20.0,
        evidence=("ScanningSequence 'SE' contains SE", "EchoTime 12 ms ≤ 30", "20° from the anterior–posterior axis"),
        SeriesDescription="t1_tse_cor", ProtocolName="t1_tse_cor", SequenceName="*tse2d1_3",
        ScanningSequence="SE", SequenceVariant=["SK", "SP", "OSP"], ScanOptions="PFP",
        RepetitionTime=625, EchoTime=12, EchoTrainLength=3, FlipAngle=150,
        ImageOrientationPatient=SEMICORONAL_20,
    ),
    case(
        "siemens-tirm-semicoronal", SIEMENS, Role.STIR, Plane.CORONAL, "stir-inversion-recovery", tilt=20.0,
        evidence=("ScanningSequence 'SE\\IR' contains IR", "InversionTime 150 ms in [100, 250]"),
        SeriesDescription="t2_tirm_cor", ProtocolName="t2_tirm_cor", SequenceName="*tir2d1_12",
        ScanningSequence=["SE", "IR"], SequenceVariant=["SK", "SP", "MP", "OSP"], ScanOptions="IR",
        RepetitionTime=4500, EchoTime=56, InversionTime=150, EchoTrainLength=12, FlipAngle=150,
        ImageOrientationPatient=SEMICORONAL_20,
    ),
    case(
        "siemens-t2-tse-fs-axial", SIEMENS, Role.T2FS, Plane.AXIAL, "t2fs-fat-suppression-option", tilt=0.0,
        evidence=("ScanOptions 'PFP\\FS' contains FS", "EchoTime 66 ms ≥ 50", "RepetitionTime 4000 ms ≥ 1000"),
        SeriesDescription="t2_tse_tra_fs", ProtocolName="t2_tse_tra_fs", SequenceName="*tse2d1_15",
        ScanningSequence="SE", SequenceVariant=["SK", "SP", "OSP"], ScanOptions=["PFP", "FS"],
        RepetitionTime=4000, EchoTime=66, EchoTrainLength=15, FlipAngle=150, ImageOrientationPatient=AXIAL,
    ),
    case(
        "siemens-t1-tse-sagittal", SIEMENS, Role.T1, Plane.SAGITTAL, "t1-spin-echo", tilt=0.0,
        SeriesDescription="t1_tse_sag", ProtocolName="t1_tse_sag", SequenceName="*tse2d1_3",
        ScanningSequence="SE", SequenceVariant=["SK", "SP", "OSP"], RepetitionTime=550, EchoTime=11,
        ImageOrientationPatient=SAGITTAL,
    ),
    case(
        "siemens-tirm-tilted-40-oblique", SIEMENS, Role.STIR, Plane.OBLIQUE, "stir-inversion-recovery", tilt=40.0,
        evidence=("beyond the 30° tolerance",),
        SeriesDescription="t2_tirm_cor_obl", SequenceName="*tir2d1_12", ScanningSequence=["SE", "IR"],
        SequenceVariant=["SK", "SP", "MP", "OSP"], ScanOptions="IR", RepetitionTime=4500, EchoTime=56,
        InversionTime=150, ImageOrientationPatient=CORONAL_TILTED_40,
    ),
    # Look-alike: T2 TSE without fat suppression.
    case(
        "siemens-t2-tse-without-fs", SIEMENS, Role.OTHER, Plane.AXIAL, UNCLASSIFIED_RULE,
        SeriesDescription="t2_tse_tra", ProtocolName="t2_tse_tra", SequenceName="*tse2d1_17",
        ScanningSequence="SE", SequenceVariant=["SK", "SP", "OSP"], ScanOptions="PFP",
        RepetitionTime=4550, EchoTime=96, ImageOrientationPatient=AXIAL,
    ),
    # Look-alike: FLAIR is TIRM by name and IR by header, but its TI nulls fluid, not fat.
    case(
        "siemens-flair-dark-fluid", SIEMENS, Role.OTHER, Plane.AXIAL, UNCLASSIFIED_RULE,
        SeriesDescription="t2_tirm_tra_dark-fluid", SequenceName="*tir2d1_16",
        ScanningSequence=["SE", "IR"], SequenceVariant=["SK", "SP", "MP", "OSP"], ScanOptions="IR",
        RepetitionTime=9000, EchoTime=81, InversionTime=2500, ImageOrientationPatient=AXIAL,
    ),
    # Look-alike: 3D MPRAGE is GR\IR with TI ≈ 900 ms.
    case(
        "siemens-mprage", SIEMENS, Role.OTHER, Plane.SAGITTAL, UNCLASSIFIED_RULE,
        SeriesDescription="t1_mprage_sag_p2_iso", SequenceName="*tfl3d1_16ns", MRAcquisitionType="3D",
        ScanningSequence=["GR", "IR"], SequenceVariant=["SK", "SP", "MP", "OSP"],
        RepetitionTime=2300, EchoTime=2.98, InversionTime=900, ImageOrientationPatient=SAGITTAL,
    ),
    # Look-alike: post-contrast fat-saturated T1 is neither T1 (FS, contrast) nor T2FS (TE).
    case(
        "siemens-t1-fs-post-contrast", SIEMENS, Role.OTHER, Plane.CORONAL, UNCLASSIFIED_RULE,
        SeriesDescription="t1_tse_cor_fs_post", SequenceName="*tse2d1_3", ScanningSequence="SE",
        SequenceVariant=["SK", "SP", "OSP"], ScanOptions=["PFP", "FS"], RepetitionTime=700,
        EchoTime=12, ContrastBolusAgent="Gadovist", ImageOrientationPatient=CORONAL,
    ),
    # Look-alike: a STIR reformat would be a STIR if the MPR were not excluded.
    case(
        "siemens-stir-mpr", SIEMENS, Role.OTHER, Plane.AXIAL, "exclude-secondary-image-type",
        counts_as_input=False,
        SeriesDescription="t2_stir_space_cor_iso_MPR_tra", ScanningSequence=["SE", "IR"],
        ImageType=["DERIVED", "SECONDARY", "MPR", "NORM", "DIS3D"], RepetitionTime=3000,
        EchoTime=89, InversionTime=160, ImageOrientationPatient=AXIAL,
    ),
    case(
        "siemens-dixon-water-derived", SIEMENS, Role.OTHER, Plane.AXIAL, "exclude-derived-image-type",
        counts_as_input=False,
        SeriesDescription="t2_tse_dixon_tra_W", ScanningSequence="SE", SequenceVariant=["SK", "SP", "OSP"],
        ImageType=["DERIVED", "PRIMARY", "DIXON", "WATER"], RepetitionTime=4000, EchoTime=85,
        ImageOrientationPatient=AXIAL,
    ),
    case(
        "siemens-dixon-opposed-phase", SIEMENS, Role.OTHER, Plane.CORONAL, "mr-dixon",
        SeriesDescription="t1_tse_dixon_cor_opp", ScanningSequence="SE", SequenceVariant=["SK", "SP", "OSP"],
        ImageType=["ORIGINAL", "PRIMARY", "DIXON", "OPP_PHASE"], RepetitionTime=620, EchoTime=12,
        ImageOrientationPatient=CORONAL,
    ),
    # Look-alike: diffusion with fat saturation has a long TE and TR.
    case(
        "siemens-dwi-fs", SIEMENS, Role.OTHER, Plane.AXIAL, UNCLASSIFIED_RULE,
        SeriesDescription="ep2d_diff_tra_b50_800", SequenceName="*ep_b800t", ScanningSequence="EP",
        SequenceVariant=["SK", "SP"], ScanOptions=["PFP", "FS"], RepetitionTime=5200, EchoTime=70,
        ImageType=["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"], ImageOrientationPatient=AXIAL,
    ),
    # Look-alike: gradient-echo 3D T1 named t1 must not compete with the TSE on instance count.
    case(
        "siemens-t1-vibe", SIEMENS, Role.OTHER, Plane.CORONAL, UNCLASSIFIED_RULE,
        SeriesDescription="t1_vibe_cor", SequenceName="*fl3d1", MRAcquisitionType="3D",
        ScanningSequence="GR", SequenceVariant=["SP", "OSP"], RepetitionTime=6.5, EchoTime=2.4,
        ImageOrientationPatient=CORONAL,
    ),
    # ---------------- GE SIGNA Architect 3 T ----------------
    case(
        "ge-3-plane-loc", GE, Role.OTHER, Plane.AXIAL, "exclude-localizer-name", counts_as_input=False,
        SeriesDescription="3-Plane Loc", ScanningSequence="GR", SequenceVariant=["SS", "SK"],
        ScanOptions=["FAST_GEMS"], RepetitionTime=4.9, EchoTime=1.5, ImageOrientationPatient=AXIAL,
    ),
    case(
        "ge-asset-calibration", GE, Role.OTHER, Plane.AXIAL, "exclude-localizer-name", counts_as_input=False,
        SeriesDescription="ASSET Cal", ScanningSequence="GR", SequenceVariant="SS",
        RepetitionTime=150, EchoTime=1.4, ImageOrientationPatient=AXIAL,
    ),
    case(
        "ge-cor-t1-fse", GE, Role.T1, Plane.CORONAL, "t1-spin-echo", tilt=20.0,
        SeriesDescription="COR T1 FSE", ScanningSequence="SE",
        SequenceVariant=["SK", "OSP"], ScanOptions=["FAST_GEMS", "FILTERED_GEMS", "ACC_GEMS"],
        RepetitionTime=650, EchoTime=10.3, EchoTrainLength=3, ImageOrientationPatient=SEMICORONAL_20,
    ),
    # IR only visible as IR_GEMS in ScanOptions.
    case(
        "ge-cor-stir-ir-gems", GE, Role.STIR, Plane.CORONAL, "stir-inversion-recovery", tilt=20.0,
        evidence=("ScanOptions 'IR_GEMS\\FAST_GEMS\\ACC_GEMS' contains IR_GEMS", "InversionTime 210 ms"),
        SeriesDescription="COR STIR", ScanningSequence="SE",
        SequenceVariant=["SK", "OSP"], ScanOptions=["IR_GEMS", "FAST_GEMS", "ACC_GEMS"],
        RepetitionTime=5000, EchoTime=42, InversionTime=210, ImageOrientationPatient=SEMICORONAL_20,
    ),
    case(
        "ge-ax-t2-fs-small-tilt", GE, Role.T2FS, Plane.AXIAL, "t2fs-fat-suppression-option", tilt=7.0,
        SeriesDescription="Ax T2 FS", ScanningSequence="SE",
        SequenceVariant=["SK", "OSP"], ScanOptions=["FAST_GEMS", "FILTERED_GEMS", "ACC_GEMS", "FS"],
        RepetitionTime=4200, EchoTime=85, ImageOrientationPatient=AXIAL_GANTRY_TILT_7,
    ),
    # Look-alike: SAT_GEMS is spatial saturation bands, not fat saturation.
    case(
        "ge-sag-t2-fse-sat-bands", GE, Role.OTHER, Plane.SAGITTAL, UNCLASSIFIED_RULE,
        SeriesDescription="Sag T2 FSE", ScanningSequence="SE", SequenceVariant=["SK", "OSP"],
        ScanOptions=["SAT_GEMS", "FAST_GEMS", "FILTERED_GEMS"], RepetitionTime=3800, EchoTime=102,
        ImageOrientationPatient=SAGITTAL,
    ),
    # Look-alike modeled on a GE DV26 diffusion header: EP\SE with FS, TE 85, TR 7800.
    case(
        "ge-dwi-fs", GE, Role.OTHER, Plane.AXIAL, UNCLASSIFIED_RULE,
        SeriesDescription="Ax DWI b800", ScanningSequence=["EP", "SE"], SequenceVariant="NONE",
        ScanOptions=["SAT_GEMS", "EPI_GEMS", "FILTERED_GEMS", "PFF", "FS"], RepetitionTime=7800,
        EchoTime=85.1, ImageOrientationPatient=AXIAL,
    ),
    # Look-alike: post-contrast T1 FSE without fat saturation.
    case(
        "ge-ax-t1-post-contrast", GE, Role.OTHER, Plane.AXIAL, UNCLASSIFIED_RULE,
        SeriesDescription="Ax T1 FSE +C", ScanningSequence="SE", SequenceVariant=["SK", "OSP"],
        ScanOptions=["FAST_GEMS", "FILTERED_GEMS"], RepetitionTime=600, EchoTime=9.8,
        ContrastBolusAgent="GADAVIST 7.5 ML", ImageOrientationPatient=AXIAL,
    ),
    # ---------------- Philips Ingenia 1.5 T ----------------
    case(
        "philips-survey", PHILIPS, Role.OTHER, Plane.CORONAL, "exclude-localizer-name", counts_as_input=False,
        SeriesDescription="Survey", ProtocolName="Survey", ScanningSequence="GR", SequenceVariant="SP",
        ImageType=["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"], RepetitionTime=11, EchoTime=4.6,
        ImageOrientationPatient=CORONAL,
    ),
    case(
        "philips-t1w-tse-coronal", PHILIPS, Role.T1, Plane.CORONAL, "t1-spin-echo", tilt=0.0,
        SeriesDescription="T1W_TSE_COR", ProtocolName="T1W_TSE_COR", ScanningSequence="SE",
        SequenceVariant="SK", ImageType=["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
        RepetitionTime=550, EchoTime=8, EchoTrainLength=5, ImageOrientationPatient=CORONAL,
    ),
    case(
        "philips-stir-semicoronal", PHILIPS, Role.STIR, Plane.CORONAL, "stir-inversion-recovery", tilt=20.0,
        SeriesDescription="STIR_COR", ProtocolName="STIR_COR", ScanningSequence="IR", SequenceVariant="SK",
        ImageType=["ORIGINAL", "PRIMARY", "M_IR", "M", "IR"], RepetitionTime=3800, EchoTime=60,
        InversionTime=165, ImageOrientationPatient=SEMICORONAL_20,
    ),
    # SPAIR's prepulse delay in InversionTime must not make it a STIR: there is no IR readout.
    case(
        "philips-t2w-spair-axial", PHILIPS, Role.T2FS, Plane.AXIAL, "t2fs-fat-suppression-option",
        SeriesDescription="T2W_SPAIR_TRA", ProtocolName="T2W_SPAIR_TRA", ScanningSequence="SE",
        SequenceVariant="SK", ScanOptions="FS", ImageType=["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
        RepetitionTime=3500, EchoTime=70, InversionTime=110, ImageOrientationPatient=SEMIAXIAL_15,
        tilt=15.0,
    ),
    # Look-alike for the axial chain: a T2FS, but coronal.
    case(
        "philips-t2w-spir-coronal", PHILIPS, Role.T2FS, Plane.CORONAL, "t2fs-name",
        evidence=("SeriesDescription 'T2W_SPIR_COR' matches /SPIR/",),
        SeriesDescription="T2W_SPIR_COR", ProtocolName="T2W_SPIR_COR", ScanningSequence="SE",
        SequenceVariant="SK", ImageType=["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
        RepetitionTime=3200, EchoTime=80, ImageOrientationPatient=CORONAL, tilt=0.0,
    ),
    case(
        "philips-t2w-tse-without-fs", PHILIPS, Role.OTHER, Plane.AXIAL, UNCLASSIFIED_RULE,
        SeriesDescription="T2W_TSE_TRA", ProtocolName="T2W_TSE_TRA", ScanningSequence="SE",
        SequenceVariant="SK", ImageType=["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
        RepetitionTime=3000, EchoTime=100, ImageOrientationPatient=AXIAL,
    ),
    case(
        "philips-mpr", PHILIPS, Role.OTHER, Plane.CORONAL, "exclude-secondary-image-type", counts_as_input=False,
        SeriesDescription="T2W_SPAIR_TRA MPR", ScanningSequence="SE", ScanOptions="FS",
        ImageType=["DERIVED", "SECONDARY", "MPR"], RepetitionTime=3500, EchoTime=70,
        ImageOrientationPatient=CORONAL,
    ),
    # Look-alike: STIR-prepared diffusion (DWIBS) has IR and a STIR TI, but an EPI readout.
    case(
        "philips-dwibs", PHILIPS, Role.OTHER, Plane.AXIAL, UNCLASSIFIED_RULE,
        SeriesDescription="DWIBS_TRA", ProtocolName="DWIBS_TRA", ScanningSequence=["SE", "IR", "EP"],
        SequenceVariant="SK", RepetitionTime=6000, EchoTime=70, InversionTime=180,
        ImageOrientationPatient=AXIAL,
    ),
    # ---------------- Canon Vantage Orian 1.5 T ----------------
    case(
        "canon-locator", CANON, Role.OTHER, Plane.SAGITTAL, "exclude-localizer-name", counts_as_input=False,
        SeriesDescription="Locator", ScanningSequence="GR", RepetitionTime=6.8, EchoTime=3,
        ImageOrientationPatient=SAGITTAL,
    ),
    case(
        "canon-t1wi-fse-coronal", CANON, Role.T1, Plane.CORONAL, "t1-spin-echo",
        SeriesDescription="T1WI FSE COR", ProtocolName="SIJ T1 COR", ScanningSequence="SE",
        SequenceVariant="SK", RepetitionTime=500, EchoTime=10, ImageOrientationPatient=SEMICORONAL_20,
        tilt=20.0,
    ),
    # Long TR (as some 3 T protocols use): only the name says T1.
    case(
        "canon-t1wi-long-tr-axial", CANON, Role.T1, Plane.AXIAL, "t1-name",
        evidence=("SeriesDescription 'T1WI FSE AX' matches /T1/",),
        SeriesDescription="T1WI FSE AX", ScanningSequence="SE", SequenceVariant="SK",
        RepetitionTime=1100, EchoTime=12, ImageOrientationPatient=AXIAL,
    ),
    case(
        "canon-stir-axial", CANON, Role.STIR, Plane.AXIAL, "stir-inversion-recovery",
        SeriesDescription="STIR AX", ScanningSequence="IR", SequenceVariant="SK",
        RepetitionTime=5000, EchoTime=60, InversionTime=160, ImageOrientationPatient=SEMIAXIAL_15, tilt=15.0,
    ),
    # Fat saturation only in the name.
    case(
        "canon-t2wi-fatsat-axial", CANON, Role.T2FS, Plane.AXIAL, "t2fs-name",
        evidence=("SeriesDescription 'T2WI FatSat AX' matches /FatSat/",),
        SeriesDescription="T2WI FatSat AX", ScanningSequence="SE", SequenceVariant="SK",
        RepetitionTime=4000, EchoTime=90, ImageOrientationPatient=AXIAL,
    ),
    case(
        "canon-t2wi-fse-without-fs", CANON, Role.OTHER, Plane.AXIAL, UNCLASSIFIED_RULE,
        SeriesDescription="T2WI FSE AX", ScanningSequence="SE", SequenceVariant="SK",
        RepetitionTime=4000, EchoTime=90, ImageOrientationPatient=AXIAL,
    ),
    # Named STIR, header stripped of IR details (e.g. by an exporting workstation).
    case(
        "canon-stir-name-only", CANON, Role.STIR, Plane.CORONAL, "stir-name",
        SeriesDescription="FSE STIR COR", RepetitionTime=5000, EchoTime=60,
        ImageOrientationPatient=CORONAL,
    ),
    case(
        "mr-without-orientation", CANON, Role.T1, Plane.NONE, "t1-spin-echo",
        SeriesDescription="T1WI FSE COR", ScanningSequence="SE", RepetitionTime=500, EchoTime=10,
    ),
    # ---------------- CT ----------------
    case(
        "ct-topogram", SIEMENS_CT, Role.OTHER, Plane.CORONAL, "exclude-localizer-image-type",
        counts_as_input=False,
        SeriesDescription="Topogram  0.6  T20s", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ImageOrientationPatient=CORONAL,
    ),
    case(
        "ct-axial-gantry-tilt", SIEMENS_CT, Role.CT, Plane.AXIAL, "ct-pelvis", tilt=7.0,
        SeriesDescription="SIG Becken 1.0 Br64", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
        ImageOrientationPatient=AXIAL_GANTRY_TILT_7,
    ),
    case(
        "ct-coronal-reformat", SIEMENS_CT, Role.OTHER, Plane.CORONAL, "exclude-secondary-image-type",
        counts_as_input=False,
        SeriesDescription="COR 2.0 Br64", ImageType=["DERIVED", "SECONDARY", "REFORMATTED"],
        ImageOrientationPatient=CORONAL,
    ),
    case(
        "ct-dose-report-secondary-capture", SIEMENS_CT, Role.OTHER, Plane.NONE, "exclude-secondary-capture",
        counts_as_input=False,
        SOPClassUID=SECONDARY_CAPTURE, SeriesDescription="Dose Report",
        ImageType=["DERIVED", "SECONDARY", "OTHER"],
    ),
    case(
        "ct-enhanced-sop-without-modality", {}, Role.CT, Plane.AXIAL, "ct-pelvis",
        SOPClassUID=ENHANCED_CT_IMAGE, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], SeriesDescription="Becken 1.0",
        ImageOrientationPatient=AXIAL,
    ),
    # ---------------- Radiography ----------------
    # For-presentation CR is DERIVED\PRIMARY and still an input.
    case(
        "cr-pelvis-ap", {}, Role.XR, Plane.CORONAL, "xr-pelvis-frontal",
        evidence=("plane coronal from ViewPosition 'AP'",),
        Modality="CR", SOPClassUID=CR_IMAGE, Manufacturer="FUJIFILM Corporation", ViewPosition="AP",
        ImageType=["DERIVED", "PRIMARY"], BodyPartExamined="PELVIS", SeriesDescription="Becken a.p.",
    ),
    case(
        "dx-pelvis-pa", {}, Role.XR, Plane.CORONAL, "xr-pelvis-frontal",
        Modality="DX", SOPClassUID=DX_PRESENTATION, PresentationIntentType="FOR PRESENTATION",
        ViewPosition="PA", ImageType=["ORIGINAL", "PRIMARY"], BodyPartExamined="PELVIS",
    ),
    case(
        "dx-sacrum-lateral", {}, Role.OTHER, Plane.SAGITTAL, "xr-not-frontal", counts_as_input=False,
        Modality="DX", SOPClassUID=DX_PRESENTATION, PresentationIntentType="FOR PRESENTATION",
        ViewPosition="LL", ImageType=["ORIGINAL", "PRIMARY"], BodyPartExamined="SSPINE",
    ),
    case(
        "dx-sij-oblique", {}, Role.OTHER, Plane.NONE, "xr-not-frontal", counts_as_input=False,
        Modality="DX", SOPClassUID=DX_PRESENTATION, PresentationIntentType="FOR PRESENTATION",
        ViewPosition="LLO", ImageType=["ORIGINAL", "PRIMARY"], BodyPartExamined="PELVIS",
    ),
    case(
        "dx-without-view-position", {}, Role.XR, Plane.NONE, "xr-pelvis-frontal",
        SOPClassUID=DX_PRESENTATION, ImageType=["ORIGINAL", "PRIMARY"], StudyDescription="ISG a.p.",
    ),
    case(
        "dx-without-any-evidence", {}, Role.OTHER, Plane.NONE, "xr-without-frontal-pelvis-evidence",
        counts_as_input=False, SOPClassUID=DX_PRESENTATION, ImageType=["ORIGINAL", "PRIMARY"],
    ),
    case(
        "dx-for-processing", {}, Role.OTHER, Plane.CORONAL, "exclude-for-processing", counts_as_input=False,
        Modality="DX", SOPClassUID=DX_PROCESSING, PresentationIntentType="FOR PROCESSING",
        ViewPosition="AP", ImageType=["ORIGINAL", "PRIMARY"],
    ),
    case(
        "secondary-capture-screen-save", {}, Role.OTHER, Plane.NONE, "exclude-secondary-capture",
        counts_as_input=False,
        Modality="OT", SOPClassUID=MULTIFRAME_SC_TRUE_COLOR, SeriesDescription="Screen Save",
    ),
    case(
        "structured-report", {}, Role.OTHER, Plane.NONE, "exclude-non-image-modality", counts_as_input=False,
        Modality="SR", SOPClassUID=COMPREHENSIVE_SR, SeriesDescription="AI SIJ report",
    ),
    case(
        "dose-sr", {}, Role.OTHER, Plane.NONE, "exclude-non-image-modality", counts_as_input=False,
        Modality="SR", SOPClassUID=X_RAY_DOSE_SR,
    ),
    case(
        "presentation-state", {}, Role.OTHER, Plane.NONE, "exclude-non-image-modality", counts_as_input=False,
        Modality="PR", SOPClassUID=GRAYSCALE_PR,
    ),
    case(
        "key-object-selection", {}, Role.OTHER, Plane.NONE, "exclude-non-image-modality", counts_as_input=False,
        Modality="KO", SOPClassUID=KEY_OBJECT_SELECTION,
    ),
]


# The catalog's expected planes assume a 30° tilt tolerance (the 40° series is oblique), not the
# library default; tests that mean another tolerance pass it.
CATALOG_TILT_TOLERANCE_DEG = 30.0


def classify_case(c: Case, **kwargs: Any) -> Classification:
    kwargs.setdefault("tilt_tolerance_deg", CATALOG_TILT_TOLERANCE_DEG)
    return classify_series(header_summary(dataset(**c.attributes)), **kwargs)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_vendor_header_sets(c: Case) -> None:
    result = classify_case(c)
    assert (result.role, result.plane, result.rule, result.counts_as_input) == (
        c.role, c.plane, c.rule, c.counts_as_input
    ), result.reason
    if c.tilt is not None:
        assert result.tilt_deg == pytest.approx(c.tilt, abs=0.01)
    for phrase in c.evidence:
        assert phrase in result.reason
    assert result.reason  # every decision says why


def test_every_builtin_rule_and_role_and_plane_is_exercised() -> None:
    """Keeps the catalog honest: a new built-in rule needs a header set that fires it."""
    fired = {classify_case(c).rule for c in CASES}
    fired |= {
        classify_series(header_summary(enhanced_mr(iop=CORONAL, **kwargs))).rule
        for kwargs, _, _ in ENHANCED_CASES
    }
    fired |= {classify_series(header_summary(dataset(**attributes))).rule for _, attributes, *_ in REGION_CASES}
    fired.add(classify_series(header_summary(dataset(SOPClassUID="1.2.840.10008.5.1.4.1.1.30"))).rule)
    assert {rule.name for rule in BUILTIN_RULES} - fired == set()
    assert UNCLASSIFIED_RULE in fired
    assert {c.role for c in CASES} == set(Role)
    assert {c.plane for c in CASES} == set(Plane)


def test_exclusions_come_first_and_never_count() -> None:
    not_counting = [rule for rule in BUILTIN_RULES if not rule.counts_as_input]
    assert all(rule.role is Role.OTHER for rule in not_counting)
    # The exclusions lead; later non-counting rules are the anatomy checks of radiographs and CT.
    first_role_rule = next(i for i, rule in enumerate(BUILTIN_RULES) if rule.counts_as_input)
    assert BUILTIN_RULES[first_role_rule].name == "ct-pelvis"
    later = {rule.name for rule in not_counting[first_role_rule:]}
    assert later == {"ct-not-pelvis", "ct-without-pelvis-evidence", "xr-not-pelvis", "xr-not-frontal", "xr-without-frontal-pelvis-evidence"}


def test_tilt_tolerance_is_configurable() -> None:
    semicoronal = next(c for c in CASES if c.id == "siemens-tirm-semicoronal")
    assert classify_case(semicoronal, tilt_tolerance_deg=15.0).plane is Plane.OBLIQUE
    assert classify_case(semicoronal, tilt_tolerance_deg=20.0).plane is Plane.CORONAL
    tilted = next(c for c in CASES if c.id == "siemens-tirm-tilted-40-oblique")
    assert classify_case(tilted, tilt_tolerance_deg=45.0).plane is Plane.CORONAL


def test_default_tilt_tolerance_is_the_nodes_45_degrees() -> None:
    """Without a tolerance, classify_series and trace_classification use 45°, the node's default
    (node/config.py), so the 40° series is coronal."""
    assert DEFAULT_TILT_TOLERANCE_DEG == 45.0
    case_40 = next(c for c in CASES if c.id == "siemens-tirm-tilted-40-oblique")
    tilted = header_summary(dataset(**case_40.attributes))
    assert classify_series(tilted).plane is Plane.CORONAL
    assert trace_classification(tilted)[-1].startswith("= STIR coronal")
    assert classify_series(tilted, tilt_tolerance_deg=CATALOG_TILT_TOLERANCE_DEG).plane is Plane.OBLIQUE


def test_reason_for_unclassified_names_what_was_seen() -> None:
    t2 = next(c for c in CASES if c.id == "siemens-t2-tse-without-fs")
    reason = classify_case(t2).reason
    assert "no rule matched" in reason and "'t2_tse_tra'" in reason and "EchoTime 96 ms" in reason


def test_trace_shows_why_rules_did_not_fire() -> None:
    t2 = next(c for c in CASES if c.id == "siemens-t2-tse-without-fs")
    lines = trace_classification(header_summary(dataset(**t2.attributes)))
    t2fs_line = next(line for line in lines if line.startswith("✗ t2fs-fat-suppression-option"))
    assert "ScanOptions 'PFP' contains none of FS" in t2fs_line
    assert lines[-1].startswith("= OTHER axial by unclassified")
    stir = next(c for c in CASES if c.id == "philips-stir-semicoronal")
    lines = trace_classification(header_summary(dataset(**stir.attributes)))
    assert lines[-2].startswith("✓ stir-inversion-recovery (built-in) → STIR")


def test_diffusion_is_blocked_by_the_unless_clause() -> None:
    dwi = next(c for c in CASES if c.id == "ge-dwi-fs")
    lines = trace_classification(header_summary(dataset(**dwi.attributes)))
    line = next(line for line in lines if line.startswith("✗ t2fs-fat-suppression-option"))
    assert "excluded: ScanningSequence 'EP\\SE' contains EP" in line


# --------------------------------------------------------------------------------------------
# Enhanced (multi-frame) MR: timing and geometry live in functional groups
# --------------------------------------------------------------------------------------------


def enhanced_mr(*, inversion: bool, fat: str, te: float, tr: float, ti: float | None, iop: list[float]) -> Dataset:
    shared = Dataset()
    timing = Dataset()
    timing.RepetitionTime = tr
    timing.FlipAngle = 90
    shared.MRTimingAndRelatedParametersSequence = [timing]
    echo = Dataset()
    echo.EffectiveEchoTime = te
    shared.MREchoSequence = [echo]
    modifier = Dataset()
    modifier.InversionRecovery = "YES" if inversion else "NO"
    if ti is not None:
        modifier.InversionTimes = [ti]
    shared.MRModifierSequence = [modifier]
    frame = Dataset()  # Philips writes orientation per frame
    plane = Dataset()
    plane.ImageOrientationPatient = iop
    frame.PlaneOrientationSequence = [plane]
    return dataset(
        Modality="MR", SOPClassUID=ENHANCED_MR_IMAGE, Manufacturer="Philips Medical Systems",
        ImageType=["ORIGINAL", "PRIMARY", "M", "NONE"], SeriesDescription="SIJ_3",
        EchoPulseSequence="SPIN", SpectrallySelectedSuppression=fat, EchoPlanarPulseSequence="NO",
        SharedFunctionalGroupsSequence=[shared], PerFrameFunctionalGroupsSequence=[frame, frame],
    )


def test_enhanced_mr_summary_reads_functional_groups() -> None:
    summary = header_summary(enhanced_mr(inversion=True, fat="NONE", te=60, tr=4000, ti=170, iop=SEMICORONAL_20))
    assert summary["ImageOrientationPatient"] == pytest.approx(SEMICORONAL_20)
    assert (summary["RepetitionTime"], summary["EffectiveEchoTime"]) == (4000.0, 60.0)
    assert (summary["InversionRecovery"], summary["InversionTimes"]) == ("YES", [170.0])


ENHANCED_CASES: list[tuple[dict[str, Any], Role, str]] = [
        (dict(inversion=True, fat="NONE", te=60, tr=4000, ti=170), Role.STIR, "stir-enhanced-inversion-recovery"),
        (dict(inversion=False, fat="FAT", te=80, tr=3000, ti=None), Role.T2FS, "t2fs-fat-suppression-option"),
        (dict(inversion=False, fat="NONE", te=10, tr=550, ti=None), Role.T1, "t1-spin-echo"),
        (dict(inversion=True, fat="NONE", te=10, tr=2000, ti=850), Role.OTHER, UNCLASSIFIED_RULE),
        (dict(inversion=False, fat="NONE", te=80, tr=3000, ti=None), Role.OTHER, UNCLASSIFIED_RULE),
]


@pytest.mark.parametrize(
    ("kwargs", "role", "rule"),
    ENHANCED_CASES,
    ids=["stir", "t2fs", "t1", "t1-ir-is-not-stir", "t2-without-fs"],
)
def test_enhanced_mr_roles(kwargs: dict[str, Any], role: Role, rule: str) -> None:
    result = classify_series(header_summary(enhanced_mr(iop=SEMICORONAL_20, **kwargs)))
    assert (result.role, result.rule, result.plane) == (role, rule, Plane.CORONAL)


# --------------------------------------------------------------------------------------------
# header_summary
# --------------------------------------------------------------------------------------------


def siemens_t2fs_dataset() -> Dataset:
    return dataset(**next(c for c in CASES if c.id == "siemens-t2-tse-fs-axial").attributes)


def test_summary_has_no_patient_identification() -> None:
    summary = header_summary(siemens_t2fs_dataset())
    text = json.dumps(summary)
    for value in (*PHI.values(), "HOUSE", "Sint-Jan"):
        assert value not in text
    assert not {"PatientName", "PatientID", "PatientBirthDate", "SeriesInstanceUID"} & summary.keys()
    assert set(summary) <= set(SUMMARY_KEYWORDS)


def test_summary_types_are_json_values() -> None:
    ds = siemens_t2fs_dataset()
    ds.ProtocolName = ""  # empty: omitted
    summary = header_summary(ds)
    assert summary["ScanOptions"] == ["PFP", "FS"]
    assert summary["ImageType"] == ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]
    assert summary["EchoTime"] == 66.0 and isinstance(summary["EchoTime"], float)
    assert summary["EchoTrainLength"] == 15.0 and isinstance(summary["EchoTrainLength"], float)  # IS
    assert summary["ImageOrientationPatient"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert summary["Modality"] == "MR" and summary["SequenceName"] == "*tse2d1_15"
    assert "ProtocolName" not in summary and "InversionTime" not in summary
    # Attributes that may hold several values stay lists even with one value.
    ds.ScanOptions = "FS"
    ds.ScanningSequence = "SE"
    assert header_summary(ds)["ScanOptions"] == ["FS"]
    assert header_summary(ds)["ScanningSequence"] == ["SE"]
    assert json.loads(json.dumps(summary)) == summary


def test_summary_from_file_without_pixel_data_matches_full_read() -> None:
    """The receiver may read headers only; the summary must not depend on pixels."""
    ds = siemens_t2fs_dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(32)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    headers_only = pydicom.dcmread(buffer, stop_before_pixels=True)
    buffer.seek(0)
    full = pydicom.dcmread(buffer)
    assert "PixelData" not in headers_only
    assert header_summary(headers_only) == header_summary(full) == header_summary(ds)
    assert classify_series(header_summary(headers_only)).role is Role.T2FS


# --------------------------------------------------------------------------------------------
# Plane from orientation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["axial", "coronal", "sagittal"])
@pytest.mark.parametrize("degrees", [0.0, 5.0, 12.5, 20.0, 29.9, 30.0, 30.1, 40.0, 44.0])
def test_plane_from_rotated_orientation(base: str, degrees: float) -> None:
    # Rotate about an axis lying in the slice, so the normal tilts by exactly `degrees`.
    in_plane_axis = BASE_ORIENTATIONS[base][0]
    plane, tilt = plane_from_orientation(orientation(base, degrees, in_plane_axis), 30.0)
    assert tilt == pytest.approx(degrees, abs=0.01)
    assert plane is (Plane(base) if degrees <= 30.0 else Plane.OBLIQUE)


@pytest.mark.parametrize("base", ["axial", "coronal", "sagittal"])
def test_in_plane_rotation_does_not_tilt(base: str) -> None:
    """Rotating about the slice normal turns the image, not the slice: still the same plane."""
    row, column = BASE_ORIENTATIONS[base]
    normal = (
        row[1] * column[2] - row[2] * column[1],
        row[2] * column[0] - row[0] * column[2],
        row[0] * column[1] - row[1] * column[0],
    )
    plane, tilt = plane_from_orientation(orientation(base, 40.0, normal), 10.0)
    assert (plane, tilt) == (Plane(base), 0.0)


def test_double_angulation_tilt_is_the_combined_angle() -> None:
    # 20° about LR then 15° about SI: the normal leaves the AP axis by acos(cos20·cos15).
    row, column = BASE_ORIENTATIONS["coronal"]
    row, column = rotate(row, X_AXIS, 20.0), rotate(column, X_AXIS, 20.0)
    row, column = rotate(row, Z_AXIS, 15.0), rotate(column, Z_AXIS, 15.0)
    expected = math.degrees(math.acos(math.cos(math.radians(20)) * math.cos(math.radians(15))))
    plane, tilt = plane_from_orientation([*row, *column], 30.0)
    assert plane is Plane.CORONAL and tilt == pytest.approx(expected, abs=0.01)
    assert plane_from_orientation([*row, *column], 20.0)[0] is Plane.OBLIQUE


@pytest.mark.parametrize(
    "iop",
    [[], [1, 0, 0, 0, 1], [1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0], [1, 0, 0, 0, float("nan"), 0], ["a"] * 6],
    ids=["empty", "five-values", "parallel", "zero-row", "nan", "text"],
)
def test_unusable_orientation_gives_no_plane(iop: Sequence[Any]) -> None:
    assert plane_from_orientation(iop, 30.0) == (Plane.NONE, None)


@pytest.mark.parametrize("tolerance", [-1.0, 45.1, 90.0])
def test_tilt_tolerance_out_of_range_is_rejected(tolerance: float) -> None:
    with pytest.raises(ValueError, match="tolerance"):
        plane_from_orientation(AXIAL, tolerance)
    with pytest.raises(ValueError, match="tolerance"):
        classify_series({"Modality": "CT"}, tilt_tolerance_deg=tolerance)


@pytest.mark.parametrize(
    ("view", "plane"),
    [("AP", Plane.CORONAL), ("PA", Plane.CORONAL), (" ap ", Plane.CORONAL), ("LL", Plane.SAGITTAL),
     ("RL", Plane.SAGITTAL), ("LATERAL", Plane.SAGITTAL), ("RLO", Plane.NONE), ("", Plane.NONE), (None, Plane.NONE)],
)
def test_plane_from_view_position(view: str | None, plane: Plane) -> None:
    assert plane_from_view_position(view) is plane


# --------------------------------------------------------------------------------------------
# Config rules and the condition language
# --------------------------------------------------------------------------------------------

SITE_CONFIG = r"""
classification:
  tilt_tolerance_deg: 30
  rules:
    # This site feeds its coronal PD-weighted SPAIR to the T2FS input.
    - name: site-pd-spair-as-t2fs
      match:
        Modality: [MR]
        SeriesDescription: "(?i)pd.*spair"
        EchoTime: {min: 25, max: 50}
      role: T2FS
    # Water images of this site's T2 Dixon, explicitly accepted.
    - name: site-dixon-water
      match:
        SeriesDescription|ProtocolName: "(?i)dixon.*_w$"
        ImageType: {contains: WATER}
      role: T2FS
    # Scanner writes no orientation for this pseudo-series; the protocol says it is coronal.
    - name: site-stir-fixed-plane
      match:
        SeriesDescription: "^SIJ_STIR$"
      unless:
        - {InversionTime: {min: 400}}
      role: STIR
      plane: coronal
"""


@pytest.fixture
def site_rules() -> list[ClassificationRule]:
    config = yaml.safe_load(SITE_CONFIG)
    return [ClassificationRule.model_validate(raw) for raw in config["classification"]["rules"]]


PD_SPAIR = {
    **PHILIPS, "SeriesDescription": "PDW_SPAIR_COR", "ScanningSequence": "SE", "ScanOptions": "FS",
    "ImageType": ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"], "RepetitionTime": 3000, "EchoTime": 30,
    "ImageOrientationPatient": CORONAL,
}


def test_config_rule_wins_over_builtin(site_rules: list[ClassificationRule]) -> None:
    summary = header_summary(dataset(**PD_SPAIR))
    assert classify_series(summary).role is Role.OTHER  # built-ins: TE 30 is no T2
    result = classify_series(summary, site_rules)
    assert (result.role, result.plane, result.rule, result.counts_as_input) == (
        Role.T2FS, Plane.CORONAL, "site-pd-spair-as-t2fs", True
    )
    assert "SeriesDescription 'PDW_SPAIR_COR' matches /PDW_SPAIR/" in result.reason
    assert "EchoTime 30 ms in [25, 50]" in result.reason


def test_config_rules_are_tried_in_order() -> None:
    first = ClassificationRule(name="a", match={"Modality": ["MR"]}, role=Role.T1)
    second = ClassificationRule(name="b", match={"Modality": ["MR"]}, role=Role.STIR)
    summary = header_summary(dataset(**PD_SPAIR))
    assert classify_series(summary, [first, second]).rule == "a"
    assert classify_series(summary, [second, first]).rule == "b"


def test_config_rule_cannot_make_derived_series_an_input(site_rules: list[ClassificationRule]) -> None:
    water = next(c for c in CASES if c.id == "siemens-dixon-water-derived")
    result = classify_series(header_summary(dataset(**water.attributes)), site_rules)
    assert (result.role, result.rule, result.counts_as_input) == (Role.T2FS, "site-dixon-water", False)
    assert "not counted as input because built-in rule 'exclude-derived-image-type'" in result.reason


def test_config_rule_can_fix_the_plane(site_rules: list[ClassificationRule]) -> None:
    summary = header_summary(dataset(**CANON, SeriesDescription="SIJ_STIR", InversionTime=160))
    result = classify_series(summary, site_rules)
    assert (result.role, result.plane, result.tilt_deg) == (Role.STIR, Plane.CORONAL, None)
    assert "plane coronal set by the rule" in result.reason
    blocked = header_summary(dataset(**CANON, SeriesDescription="SIJ_STIR", InversionTime=2200))
    assert classify_series(blocked, site_rules).rule != "site-stir-fixed-plane"


def rule(match: dict[str, Any], **kwargs: Any) -> ClassificationRule:
    return ClassificationRule(name="r", match=match, role=Role.T1, **kwargs)


def matches(r: ClassificationRule, summary: dict[str, Any]) -> bool:
    return classify_series(summary, [r]).rule == r.name


SUMMARY = {
    "Modality": "MR",
    "SeriesDescription": "t2_tse_tra_fs",
    "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
    "ScanOptions": ["PFP", "FS"],
    "EchoTime": 66.0,
}


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ({"SeriesDescription": "(?i)TRA_FS"}, True),
        ({"SeriesDescription": "TRA_FS"}, False),  # regex is case-sensitive unless (?i)
        ({"ImageType": "PRIMARY\\\\M"}, True),  # multi-valued joined with backslashes
        ({"EchoTime": "^66$"}, True),  # numbers as text without ".0"
        ({"Modality": ["CT", "mr"]}, True),  # one_of ignores case
        ({"ImageType": ["ORIGINAL"]}, False),  # one_of compares the whole value
        ({"ImageType": {"contains": "nd"}}, True),
        ({"ImageType": {"contains": ["DERIVED", "SECONDARY"]}}, False),
        ({"EchoTime": {"min": 66}}, True),
        ({"EchoTime": {"max": 65.9}}, False),
        ({"EchoTime": {"min": 50, "max": 100}}, True),
        ({"SeriesDescription": {"regex": "fs$", "one_of": ["t2_tse_tra_fs"]}}, True),
        ({"SeriesDescription": {"regex": "fs$", "one_of": ["other"]}}, False),
        ({"Modality": ["MR"], "EchoTime": {"max": 30}}, False),  # all conditions must hold
        ({"InversionTime": {"min": 0}}, False),  # missing attribute fails a condition
        ({"ProtocolName|SeriesDescription": "tra"}, True),  # "A|B": either attribute
        ({"ProtocolName|InversionTime": "tra"}, False),  # all missing
    ],
)
def test_condition_language(match: dict[str, Any], expected: bool) -> None:
    assert matches(rule(match), SUMMARY) is expected


def test_unless_blocks_only_when_all_its_conditions_hold() -> None:
    base = {"Modality": ["MR"]}
    assert not matches(rule(base, unless=[{"ScanOptions": {"contains": "FS"}}]), SUMMARY)
    assert matches(rule(base, unless=[{"ScanOptions": {"contains": "FS"}, "EchoTime": {"max": 30}}]), SUMMARY)
    assert matches(rule(base, unless=[{"InversionTime": {"min": 0}}]), SUMMARY)  # missing: no block
    assert not matches(rule(base, unless={"EchoTime": {"min": 50}}), SUMMARY)  # single mapping form


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"match": {"SeriesDesciption": "x"}}, "not a DICOM keyword"),
        ({"match": {"Modality|Foo": ["MR"]}}, "not a DICOM keyword"),
        ({"match": {"SeriesDescription": "(unclosed"}}, "invalid regex"),
        ({"match": {"EchoTime": {"minimum": 5}}}, "Extra inputs"),
        ({"match": {"EchoTime": {"min": 50, "max": 10}}}, "greater than max"),
        ({"match": {"EchoTime": {}}}, "at least one"),
        ({"match": {}}, "at least 1"),
        ({"match": {"Modality": ["MR"]}, "role": "T3"}, "role"),
        ({"match": {"Modality": ["MR"]}, "plane": "semicoronal"}, "plane"),
        ({"match": {"Modality": ["MR"]}, "colour": "red"}, "Extra inputs"),
    ],
)
def test_invalid_rules_are_rejected(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ClassificationRule.model_validate({"name": "bad", "role": "T1", **raw})


def test_rule_names_must_be_unique_and_not_builtin() -> None:
    mine = ClassificationRule(name="mine", match={"Modality": ["MR"]}, role=Role.T1)
    with pytest.raises(ValueError, match="used twice"):
        check_rule_names([mine, mine])
    shadow = ClassificationRule(name="t1-name", match={"Modality": ["MR"]}, role=Role.T1)
    with pytest.raises(ValueError, match="reserved"):
        classify_series(SUMMARY, [shadow])
    check_rule_names([mine])


def test_builtin_rules_round_trip_through_config_form() -> None:
    """The built-ins are plain rules: dumping and reloading one gives the same decisions."""
    reloaded = [
        ClassificationRule.model_validate({**r.model_dump(mode="json"), "name": f"copy-{r.name}"})
        for r in BUILTIN_RULES
    ]
    for c in CASES:
        summary = header_summary(dataset(**c.attributes))
        original, copy = classify_series(summary), classify_series(summary, reloaded)
        expected_rule = UNCLASSIFIED_RULE if original.rule == UNCLASSIFIED_RULE else f"copy-{original.rule}"
        assert (copy.role, copy.plane, copy.rule, copy.counts_as_input) == (
            original.role, original.plane, expected_rule, original.counts_as_input
        )


# --------------------------------------------------------------------------------------------
# End to end: vendor headers → classification → routing
# --------------------------------------------------------------------------------------------


def test_study_end_to_end_routes_only_the_right_series() -> None:
    chains = [
        ChainSpec(
            name="sij-mri-coronal",
            implementation="pipeline.chains.sij_mri:CoronalChain",
            requires=[
                ChainRequirement(role=Role.T1, planes=[Plane.CORONAL]),
                ChainRequirement(role=Role.STIR, planes=[Plane.CORONAL]),
            ],
        ),
        ChainSpec(
            name="sij-mri-axial",
            implementation="pipeline.chains.sij_mri:AxialChain",
            requires=[ChainRequirement(role=Role.T2FS, planes=[Plane.AXIAL])],
        ),
    ]
    # The look-alikes get more instances, so only classification keeps them out.
    series_ids = {
        "siemens-localizer": 9,
        "siemens-t1-tse-semicoronal": 20,
        "siemens-tirm-semicoronal": 20,
        "siemens-t2-tse-fs-axial": 24,
        "siemens-t2-tse-without-fs": 40,
        "siemens-stir-mpr": 60,
        "philips-t2w-spir-coronal": 40,
        "siemens-t1-vibe": 120,
        "siemens-dwi-fs": 80,
    }
    study = []
    for number, (case_id, instances) in enumerate(series_ids.items(), start=1):
        c = next(c for c in CASES if c.id == case_id)
        result = classify_case(c)
        study.append(SeriesCandidate(case_id, result.role, result.plane, result.counts_as_input, instances, number))
    assert route_study(study, chains) == [
        RoutedJob("sij-mri-coronal", {"t1": "siemens-t1-tse-semicoronal", "stir": "siemens-tirm-semicoronal"}),
        RoutedJob("sij-mri-axial", {"t2fs": "siemens-t2-tse-fs-axial"}),
    ]


# ---------------- Only pelvic radiographs and pelvis CTs are inputs ----------------
# What a forward-everything PACS rule sends besides the sacroiliac studies: each header set is
# what the modality writes; only the pelvic ones may feed a chain, the others say why not.
RADIOGRAPH = {"SOPClassUID": DX_PRESENTATION, "Modality": "DX", "PresentationIntentType": "FOR PRESENTATION",
              "ImageType": ["ORIGINAL", "PRIMARY"]}
REGION_CASES = [
    ("chest-pa", {**RADIOGRAPH, "BodyPartExamined": "CHEST", "ViewPosition": "PA", "SeriesDescription": "Thorax p.a."},
     Role.OTHER, "xr-not-pelvis", "body part examined is another region"),
    ("chest-ap-in-pelvis-study", {**RADIOGRAPH, "BodyPartExamined": "CHEST", "ViewPosition": "AP",
                                  "StudyDescription": "Becken + Thorax"}, Role.OTHER, "xr-not-pelvis", "CHEST"),
    ("lateral-lumbar-spine", {**RADIOGRAPH, "BodyPartExamined": "LSPINE", "ViewPosition": "LL",
                              "SeriesDescription": "LWS seitlich"}, Role.OTHER, "xr-not-pelvis", "LSPINE"),
    ("lateral-pelvis", {**RADIOGRAPH, "BodyPartExamined": "PELVIS", "ViewPosition": "LL"},
     Role.OTHER, "xr-not-frontal", "ViewPosition 'LL'"),
    ("hand-pa", {**RADIOGRAPH, "Modality": "CR", "SOPClassUID": CR_IMAGE, "BodyPartExamined": "HAND", "ViewPosition": "PA"},
     Role.OTHER, "xr-not-pelvis", "HAND"),
    ("radiograph-without-evidence", {**RADIOGRAPH, "ViewPosition": "AP"},
     Role.OTHER, "xr-without-frontal-pelvis-evidence", "needs the pelvis or sacroiliac joints"),
    ("pelvis-ap", {**RADIOGRAPH, "BodyPartExamined": "PELVIS", "ViewPosition": "AP"}, Role.XR, "xr-pelvis-frontal", "PELVIS"),
    ("sij-ap-by-description", {**RADIOGRAPH, "SeriesDescription": "ISG a.p."}, Role.XR, "xr-pelvis-frontal", "ISG"),
    ("sij-body-part-term", {**RADIOGRAPH, "BodyPartExamined": "SIJOINT", "ViewPosition": "PA"}, Role.XR, "xr-pelvis-frontal", "SIJOINT"),
    ("head-ct", {**SIEMENS_CT, "BodyPartExamined": "HEAD", "SeriesDescription": "Schaedel 5.0 H31s",
                 "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "ImageOrientationPatient": AXIAL},
     Role.OTHER, "ct-not-pelvis", "HEAD"),
    ("chest-ct", {**SIEMENS_CT, "BodyPartExamined": "CHEST", "SeriesDescription": "Thorax 1.0 Br40",
                  "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "ImageOrientationPatient": AXIAL},
     Role.OTHER, "ct-not-pelvis", "CHEST"),
    ("ct-without-region", {"Modality": "CT", "SOPClassUID": CT_IMAGE, "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
                           "ImageOrientationPatient": AXIAL}, Role.OTHER, "ct-without-pelvis-evidence", "names the pelvis"),
    ("pelvis-ct", {**SIEMENS_CT, "SeriesDescription": "SIG Becken 1.0 Br64", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
                   "ImageOrientationPatient": AXIAL}, Role.CT, "ct-pelvis", "PELVIS"),
    ("abdomen-pelvis-ct", {**SIEMENS_CT, "BodyPartExamined": "ABDOMENPELVIS", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
                           "ImageOrientationPatient": AXIAL}, Role.CT, "ct-pelvis", "ABDOMENPELVIS"),
]


@pytest.mark.parametrize("name, attributes, role, rule, phrase", REGION_CASES, ids=[c[0] for c in REGION_CASES])
def test_only_pelvic_radiographs_and_ct_count_as_input(name: str, attributes: dict, role: Role, rule: str, phrase: str) -> None:
    result = classify_series(header_summary(dataset(**attributes)))
    assert (result.role, result.rule, result.counts_as_input) == (role, rule, role is not Role.OTHER), result.reason
    assert phrase in result.reason


def test_a_site_rule_still_makes_a_non_pelvic_radiograph_an_input() -> None:
    """A site that trusts its own naming overrides the anatomy check (e.g. a Ferguson SIJ view)."""
    rule = ClassificationRule(
        name="site-sij-ferguson", match={"SeriesDescription": "(?i)ferguson"}, role=Role.XR
    )
    oblique = header_summary(dataset(**RADIOGRAPH, ViewPosition="LLO", SeriesDescription="SIJ Ferguson"))
    assert classify_series(oblique).role is Role.OTHER
    result = classify_series(oblique, [rule])
    assert (result.role, result.rule, result.counts_as_input) == (Role.XR, "site-sij-ferguson", True)


@pytest.mark.parametrize("sop_class", [COMPREHENSIVE_SR, KEY_OBJECT_SELECTION, GRAYSCALE_PR,
                                       "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
                                       "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
                                       "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
                                       "1.2.840.10008.5.1.4.1.1.481.3"])  # RT Structure Set
def test_non_input_sop_classes_never_count_even_by_a_site_rule(sop_class: str) -> None:
    summary = header_summary(dataset(SOPClassUID=sop_class, SeriesDescription="t1_tse_cor"))
    assert sop_class not in INPUT_SOP_CLASSES
    assert not classify_series(summary).counts_as_input
    anything_is_t1 = ClassificationRule(name="site-all-t1", match={"SeriesDescription": "t1"}, role=Role.T1)
    assert not classify_series(summary, [anything_is_t1]).counts_as_input


def test_phantom_radiograph_and_ct_headers_count_as_input(tmp_path: Path) -> None:
    """The phantoms' own CT and radiograph series (what the demo chains are trained on) stay inputs."""
    from pipeline.phantom import write_studies

    (study,) = write_studies(tmp_path, seed=4, kinds=("ct", "xr"))
    roles = set()
    for series in sorted(folder for folder in study.iterdir() if folder.is_dir()):
        path = sorted(series.glob("*.dcm"))[0]
        result = classify_series(header_summary(dcmread(path, stop_before_pixels=True)))
        assert result.counts_as_input, result.reason
        roles.add(result.role)
    assert roles == {Role.CT, Role.XR}
