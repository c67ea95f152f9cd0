"""Rendered series -> DICOM datasets a PACS would send (MR Image, CT Image, Digital X-Ray).

Identifiers are synthetic and say so (PHANTOM^SIJ-0007 / SYNTH-0007, "synthetic" in the
study description and patient comments).  UIDs are derived from the seed, the generator
version and the lesion SPEC, so the same inputs always give the same UIDs and a changed
phantom never reuses them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from .geometry import ProjectionGeometry, SliceGeometry
from .seeding import rng_for
from .series import RenderedSeries

IMPLEMENTATION_VERSION = "SIJNODE_PHANTOM"
TRANSFER_SYNTAXES: dict[str, UID] = {
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
    "explicit": ExplicitVRLittleEndian,
}


@dataclass(frozen=True)
class StudyIdentity:
    """Patient and study level values shared by every series of one phantom study."""

    seed: int
    uid_key: str  # seed + generator version + SPEC hash: the entropy of every UID
    study_uid: str
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    study_date: str
    study_time: str
    accession: str

    def uid(self, *parts: object) -> str:
        """Deterministic UID for a series, frame of reference or instance of this study."""
        return generate_uid(entropy_srcs=[self.uid_key, *[str(part) for part in parts]])


def study_identity(seed: int, uid_key: str) -> StudyIdentity:
    """Synthetic patient and study identifiers for study ``seed``."""
    rng = rng_for(seed, "identity")
    age = int(rng.integers(19, 56))  # axial spondyloarthritis starts before 45
    study_day = dt.date(2024, 1, 1) + dt.timedelta(days=int(seed % 730))
    birth = dt.date(study_day.year - age, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    return StudyIdentity(
        seed=seed,
        uid_key=uid_key,
        study_uid=generate_uid(entropy_srcs=[uid_key, "study"]),
        patient_name=f"PHANTOM^SIJ-{seed:04d}",
        patient_id=f"SYNTH-{seed:04d}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=str(rng.choice(["M", "F"])),
        age=f"{age:03d}Y",
        study_date=study_day.strftime("%Y%m%d"),
        study_time=f"{8 + seed % 10:02d}{seed % 60:02d}00",
        accession=f"SYN{seed:07d}",
    )


def resolve_transfer_syntax(name: str | None) -> UID:
    """"rle", "jpeg-ls", "jpeg2000", "explicit" (or None) or a transfer syntax UID."""
    if name is None:
        return ExplicitVRLittleEndian
    if name.lower() in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[name.lower()]
    uid = UID(name)
    if uid not in (ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless):
        raise ValueError(
            f"transfer syntax {name!r} not supported; use one of {sorted(TRANSFER_SYNTAXES)} "
            "or their UIDs (only lossless syntaxes: the ground truth must match the pixels)"
        )
    return uid


def series_datasets(series: RenderedSeries, identity: StudyIdentity, transfer_syntax: str | None = None) -> list[Dataset]:
    """All instances of one rendered series, in InstanceNumber order."""
    plan = series.plan
    syntax = resolve_transfer_syntax(transfer_syntax)
    series_uid = identity.uid("series", plan.role, plan.series_number)
    if plan.modality == "DX":
        datasets = [_dx_dataset(series, identity, series_uid)]
    else:
        datasets = [_slice_dataset(series, identity, series_uid, index) for index in range(series.pixels.shape[0])]
    for dataset in datasets:
        encode(dataset, syntax)
    return datasets


def encode(dataset: Dataset, syntax: UID) -> None:
    """Set the transfer syntax, compressing the pixel data losslessly where asked."""
    if syntax == ExplicitVRLittleEndian:
        dataset.file_meta.TransferSyntaxUID = syntax
        return
    # keep the SOP Instance UID: lossless compression does not make a new instance
    dataset.compress(syntax, generate_instance_uid=False)
    dataset.file_meta.TransferSyntaxUID = syntax


# ---------------------------------------------------------------------------------- shared modules
def _base(series: RenderedSeries, identity: StudyIdentity, series_uid: str, sop_class: UID, instance_uid: str) -> Dataset:
    plan = series.plan
    vendor = plan.vendor
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    # SOP common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = instance_uid
    ds.InstanceCreationDate = identity.study_date
    ds.InstanceCreationTime = identity.study_time
    # patient
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.IssuerOfPatientID = "SIJNODE-SYNTHETIC"
    ds.PatientBirthDate = identity.birth_date
    ds.PatientSex = identity.sex
    ds.PatientComments = "Synthetic phantom generated by sijnode; not a real patient"
    # general study and patient study
    ds.StudyInstanceUID = identity.study_uid
    ds.StudyDate = identity.study_date
    ds.StudyTime = identity.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"SIJ{identity.seed:04d}"
    ds.AccessionNumber = identity.accession
    ds.StudyDescription = "SYNTHETIC SIJ PHANTOM"
    ds.PatientAge = identity.age
    # general series
    ds.Modality = plan.modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = plan.series_number
    ds.SeriesDescription = plan.description
    ds.SeriesDate = identity.study_date
    ds.SeriesTime = _time_after(identity.study_time, minutes=4 * plan.series_number)
    # general equipment
    ds.InstitutionName = vendor.institution
    ds.StationName = vendor.station
    return ds


def _time_after(hhmmss: str, minutes: int) -> str:
    base = dt.datetime(2000, 1, 1, int(hhmmss[:2]), int(hhmmss[2:4]), int(hhmmss[4:6]))
    return (base + dt.timedelta(minutes=minutes)).strftime("%H%M%S")


def _pixels(ds: Dataset, pixels: np.ndarray, bits_stored: int) -> None:
    """Image Pixel module for unsigned 16-bit monochrome data."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()


def _ds_number(value: float, digits: int = 6) -> float:
    """Round for DS (decimal string) values, which hold at most 16 characters."""
    return float(f"{value:.{digits}g}")


# ---------------------------------------------------------------------------------- MR and CT
def _slice_dataset(series: RenderedSeries, identity: StudyIdentity, series_uid: str, index: int) -> Dataset:
    plan = series.plan
    geometry: SliceGeometry = plan.geometry  # type: ignore[assignment]
    sop_class = MRImageStorage if plan.modality == "MR" else CTImageStorage
    ds = _base(series, identity, series_uid, sop_class, identity.uid("instance", plan.role, plan.series_number, index))
    vendor = plan.vendor
    # frame of reference: all MR series of the study share one, the CT has its own
    ds.FrameOfReferenceUID = identity.uid("frame-of-reference", plan.modality)
    ds.PositionReferenceIndicator = "IC" if plan.modality == "MR" else ""
    ds.Manufacturer = vendor.manufacturer
    ds.SoftwareVersions = plan.acquisition["scanner"].software if plan.modality == "MR" else vendor.ct_software
    ds.ManufacturerModelName = plan.acquisition["scanner"].model if plan.modality == "MR" else vendor.ct_model
    ds.DeviceSerialNumber = f"SYN-{vendor.name.upper()}-{plan.modality}"
    # general image
    ds.InstanceNumber = index + 1
    ds.AcquisitionNumber = 1
    ds.ContentDate = identity.study_date
    ds.ContentTime = ds.SeriesTime
    ds.AcquisitionDate = identity.study_date
    ds.AcquisitionTime = ds.SeriesTime
    # image plane
    position = geometry.image_position(index)
    ds.ImagePositionPatient = [_ds_number(v, 10) for v in position]
    ds.ImageOrientationPatient = [_ds_number(v, 10) for v in geometry.image_orientation]
    ds.PixelSpacing = [_ds_number(v, 10) for v in geometry.pixel_spacing]
    ds.SliceThickness = _ds_number(geometry.slice_thickness)
    ds.SliceLocation = _ds_number(float(position @ geometry.normal), 10)
    _pixels(ds, series.pixels[index], plan.vendor.mr_bits_stored if plan.modality == "MR" else plan.vendor.ct_bits_stored)
    center, width = series.window
    if plan.modality == "MR":
        _mr_image(ds, series, geometry)
        ds.WindowCenter = _ds_number(center)
        ds.WindowWidth = _ds_number(width)
        ds.WindowCenterWidthExplanation = "AUTO"
    else:
        _ct_image(ds, series, geometry)
        ds.WindowCenter = [400, 40]
        ds.WindowWidth = [1800, 400]
        ds.WindowCenterWidthExplanation = ["BONE", "SOFT TISSUE"]
    return ds


def _mr_image(ds: Dataset, series: RenderedSeries, geometry: SliceGeometry) -> None:
    plan = series.plan
    acquisition = plan.acquisition
    sequence = acquisition["sequence"]
    scanner = acquisition["scanner"]
    ds.ImageType = list(sequence.image_type)
    ds.BodyPartExamined = plan.vendor.mr_body_part
    if ds.BodyPartExamined == "SIJ":
        # a paired structure: say that both sides are imaged (else Laterality is required)
        ds.ImageLaterality = "B"
    ds.ProtocolName = sequence.protocol
    ds.PatientPosition = "HFS"
    ds.ScanningSequence = list(sequence.scanning_sequence)
    ds.SequenceVariant = list(sequence.sequence_variant)
    ds.ScanOptions = list(sequence.scan_options) if sequence.scan_options else ""
    ds.SequenceName = sequence.sequence_name
    ds.MRAcquisitionType = "2D"
    ds.AngioFlag = "N"
    ds.RepetitionTime = acquisition["RepetitionTime"]
    ds.EchoTime = acquisition["EchoTime"]
    if "InversionTime" in acquisition:
        ds.InversionTime = acquisition["InversionTime"]
    ds.EchoTrainLength = sequence.echo_train
    ds.EchoNumbers = 1
    ds.NumberOfAverages = 1 if plan.role != "STIR" else 2
    ds.SpacingBetweenSlices = _ds_number(geometry.spacing_between_slices)
    ds.MagneticFieldStrength = scanner.field_tesla
    ds.ImagingFrequency = _ds_number(42.577478 * scanner.field_tesla)
    ds.ImagedNucleus = "1H"
    ds.FlipAngle = sequence.flip_deg
    ds.PixelBandwidth = acquisition["pixel_bandwidth"]
    frequency, phase = acquisition["frequency_samples"], acquisition["phase_steps"]
    ds.InPlanePhaseEncodingDirection = acquisition["phase_direction"]
    if acquisition["phase_direction"] == "COL":
        ds.AcquisitionMatrix = [frequency, 0, 0, phase]
        ds.PercentPhaseFieldOfView = _ds_number(100.0 * geometry.rows / geometry.columns)
    else:
        ds.AcquisitionMatrix = [0, frequency, phase, 0]
        ds.PercentPhaseFieldOfView = _ds_number(100.0 * geometry.columns / geometry.rows)
    ds.PercentSampling = 100
    ds.ReceiveCoilName = "Body/Spine"
    ds.TransmitCoilName = "Body"
    ds.VariableFlipAngleFlag = "N"


def _ct_image(ds: Dataset, series: RenderedSeries, geometry: SliceGeometry) -> None:
    plan = series.plan
    acquisition = plan.acquisition
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = "PELVIS"
    ds.ProtocolName = "SIJ"
    ds.PatientPosition = acquisition["patient_position"]
    ds.RescaleIntercept = int(series.rescale[0])
    ds.RescaleSlope = int(series.rescale[1])
    ds.RescaleType = "HU"
    ds.KVP = acquisition["kvp"]
    ds.ConvolutionKernel = acquisition["kernel"]
    ds.DataCollectionDiameter = 500
    ds.ReconstructionDiameter = acquisition["reconstruction_diameter_mm"]
    ds.DistanceSourceToDetector = 1085.6
    ds.DistanceSourceToPatient = 595
    ds.GantryDetectorTilt = 0
    ds.TableHeight = acquisition["table_height_mm"]
    ds.RotationDirection = "CW"
    ds.ExposureTime = acquisition["exposure_time_ms"]
    ds.XRayTubeCurrent = acquisition["tube_current_ma"]
    ds.Exposure = int(acquisition["tube_current_ma"] * acquisition["exposure_time_ms"] / 1000)
    ds.FilterType = "FLAT"
    ds.FocalSpots = 1.2
    ds.SpiralPitchFactor = 0.8
    ds.SpacingBetweenSlices = _ds_number(geometry.spacing_between_slices)


# ---------------------------------------------------------------------------------- radiograph
def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _dx_dataset(series: RenderedSeries, identity: StudyIdentity, series_uid: str) -> Dataset:
    plan = series.plan
    geometry: ProjectionGeometry = plan.geometry  # type: ignore[assignment]
    vendor = plan.vendor
    acquisition = plan.acquisition
    ds = _base(
        series, identity, series_uid, DigitalXRayImageStorageForPresentation, identity.uid("instance", plan.role, 0)
    )
    ds.Manufacturer = vendor.xr_manufacturer
    ds.ManufacturerModelName = vendor.xr_model
    ds.SoftwareVersions = vendor.xr_software
    ds.DeviceSerialNumber = f"SYN-{vendor.name.upper()}-DX"
    ds.BodyPartExamined = "PELVIS"
    ds.ProtocolName = plan.description
    ds.PresentationIntentType = "FOR PRESENTATION"
    # general image / DX image
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.ContentDate = identity.study_date
    ds.ContentTime = ds.SeriesTime
    ds.AcquisitionDate = identity.study_date
    ds.AcquisitionTime = ds.SeriesTime
    # columns run to the patient's left, rows to the feet: an AP view as it is hung
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = DicomSequence([_code("12921003", "SCT", "Pelvis")])
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.AcquisitionContextSequence = DicomSequence([])
    _pixels(ds, series.pixels, 12)
    center, width = series.window
    ds.WindowCenter = _ds_number(center)
    ds.WindowWidth = _ds_number(width)
    # detector and positioning
    ds.DetectorType = vendor.xr_detector_type
    ds.DetectorConfiguration = "AREA"
    ds.DetectorID = "SYNDET01"
    ds.DetectorActiveShape = "RECTANGLE"
    pitch = geometry.imager_pixel_spacing
    ds.ImagerPixelSpacing = [pitch, pitch]
    ds.DetectorElementSpacing = [pitch, pitch]
    # DICOM's estimated magnification is SID / source-to-table; PixelSpacing is calibrated with it
    magnification = acquisition["source_to_detector_mm"] / acquisition["source_to_patient_mm"]
    calibrated = pitch / magnification
    ds.PixelSpacing = [_ds_number(calibrated), _ds_number(calibrated)]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "Source geometry, at the table plane (synthetic)"
    ds.EstimatedRadiographicMagnificationFactor = _ds_number(magnification)
    ds.ViewPosition = "AP"
    ds.ViewCodeSequence = DicomSequence([_code("399348003", "SCT", "antero-posterior")])
    ds.PatientOrientationCodeSequence = DicomSequence([_code("102538003", "SCT", "recumbent")])
    ds.DistanceSourceToDetector = acquisition["source_to_detector_mm"]
    ds.DistanceSourceToPatient = acquisition["source_to_patient_mm"]
    ds.PositionerType = "COLUMN"
    ds.KVP = acquisition["kvp"]
    ds.ExposureTime = acquisition["exposure_time_ms"]
    ds.ExposureInuAs = int(acquisition["exposure_mas"] * 1000)
    ds.Grid = "FOCUSED"
    ds.FocalSpots = 1.2
    return ds
