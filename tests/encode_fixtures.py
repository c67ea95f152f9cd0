"""Small, realistic inputs for the encoder tests: an axial T2 FS MR series and results on it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from pipeline.encode.codes import concept
from pipeline.results import (
    ChainResult,
    Finding,
    ImageRef,
    ImageScore,
    Laterality,
    Map,
    MapMeaning,
    Provenance,
    Region,
    Site,
)

PATIENT_NAME = "PHANTOM^SIJ"


def mr_series(
    slices: int = 3,
    rows: int = 64,
    columns: int = 64,
    *,
    procedure_code: bool = True,
    window: bool = True,
) -> list[Dataset]:
    """An axial T2 FS series of a phantom pelvis: bright joints on a darker background."""
    study_uid, series_uid, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[0:rows, 0:columns]
    datasets = []
    for index in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = PATIENT_NAME
        ds.PatientID = "SIJ-0001"
        ds.PatientBirthDate = "19850101"
        ds.PatientSex = "F"
        ds.StudyInstanceUID = study_uid
        ds.StudyID = "1"
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.AccessionNumber = "ACC-SIJ-1"
        ds.ReferringPhysicianName = "REFERRER^ONE"
        ds.StudyDescription = "MRI SACROILIAC JOINTS"
        if procedure_code:
            code = Dataset()
            code.CodeValue = "MRSIJ"
            code.CodingSchemeDesignator = "99HOSPITAL"
            code.CodeMeaning = "MRI sacroiliac joints"
            ds.ProcedureCodeSequence = [code]
            scheme = Dataset()
            scheme.CodingSchemeDesignator = "99HOSPITAL"
            scheme.CodingSchemeName = "Phantom hospital procedure codes"
            ds.CodingSchemeIdentificationSequence = [scheme]
        ds.Modality = "MR"
        ds.Manufacturer = "PHANTOM"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 4
        ds.SeriesDescription = "T2 TSE FS AX"
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = ["SK", "SP", "OSP"]
        ds.ScanOptions = "FS"
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = 80
        ds.RepetitionTime = 4000
        ds.EchoTrainLength = 16
        ds.MagneticFieldStrength = 1.5
        ds.SliceThickness = 4
        ds.PixelSpacing = [1.2, 1.2]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-38.4, -38.4, 4.0 * index]
        ds.SliceLocation = 4.0 * index
        ds.PatientPosition = "HFS"
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        if window:
            ds.WindowCenter = 600
            ds.WindowWidth = 1200
        pixels = (
            200 * _pelvis(yy, xx, rows, columns) + 800 * _joints(yy, xx, rows, columns) + 40 * index
        )
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        datasets.append(ds)
    return datasets


def pelvis_radiograph(rows: int = 110, columns: int = 256) -> Dataset:
    """An AP pelvis radiograph (DX, for presentation): no frame of reference, PatientOrientation
    and ImagerPixelSpacing instead of IOP and PixelSpacing, no procedure code."""
    (ds,) = mr_series(slices=1, rows=rows, columns=columns, procedure_code=False)
    for keyword in (
        "ImageOrientationPatient",
        "ImagePositionPatient",
        "PixelSpacing",
        "SliceThickness",
        "SliceLocation",
        "FrameOfReferenceUID",
        "PositionReferenceIndicator",
        "ScanningSequence",
        "SequenceVariant",
        "ScanOptions",
        "MRAcquisitionType",
        "EchoTime",
        "RepetitionTime",
        "EchoTrainLength",
        "MagneticFieldStrength",
        "PatientPosition",
    ):
        delattr(ds, keyword)
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "DX"
    ds.SeriesDescription = "PELVIS AP"
    ds.StudyDescription = "XR PELVIS"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["R", "F"]
    ds.ImagerPixelSpacing = [0.15, 0.15]
    return ds


def _pelvis(yy: np.ndarray, xx: np.ndarray, rows: int, columns: int) -> np.ndarray:
    return ((xx - columns / 2) / (columns * 0.45)) ** 2 + ((yy - rows / 2) / (rows * 0.4)) ** 2 < 1


def _joints(yy: np.ndarray, xx: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Two bright vertical bands either side of the midline, where sacroiliac joints would be."""
    return (np.abs(np.abs(xx - columns / 2) - columns * 0.2) < 2) & (
        np.abs(yy - rows / 2) < rows * 0.25
    )


def demo_provenance(demonstration: bool = True, weights_sha256: str = "ab" * 32) -> Provenance:
    return Provenance(
        chain="sij-mri",
        pack_name="sij-mri-demo",
        pack_version="0.3.1",
        weights_sha256=weights_sha256,
        demonstration=demonstration,
        device="cpu",
        timings_s={"inference": 1.25},
        parameters={"threshold": 0.5, "tta": False},
    )


def joint_findings(sources: Sequence[Dataset], threshold: float = 0.5) -> list[Finding]:
    """Active sacroiliitis per joint, and bone marrow edema per ilium quadrant."""
    evidence = (ImageRef.of(sources[len(sources) // 2]),)
    findings = [
        Finding(
            concept("active sacroiliitis"),
            Site.SACROILIAC_JOINT,
            0.91,
            threshold,
            Laterality.LEFT,
            evidence=evidence,
            note="High confidence: probability above the high-specificity operating point.",
        ),
        Finding(
            concept("active sacroiliitis"),
            Site.SACROILIAC_JOINT,
            0.12,
            threshold,
            Laterality.RIGHT,
            evidence=evidence,
        ),
    ]
    for laterality, region, probability in [
        (Laterality.LEFT, Region.UPPER, 0.81),
        (Laterality.LEFT, Region.LOWER, 0.35),
        (Laterality.RIGHT, Region.UPPER, 0.05),
        (Laterality.RIGHT, Region.LOWER, 0.5),
    ]:
        findings.append(
            Finding(
                concept("bone marrow edema"),
                Site.ILIUM,
                probability,
                threshold,
                laterality,
                region,
                evidence,
            )
        )
    return findings


def left_hot_map(source: Dataset, peak: float = 0.9) -> Map:
    """A map that is hot in the left half of the image (columns < half) and cold elsewhere."""
    values = np.zeros((int(source.Rows), int(source.Columns)), dtype=np.float32)
    values[:, : int(source.Columns) // 2] = peak  # evidence maps peak at most at the probability
    return Map(ImageRef.of(source), values, MapMeaning.ATTENTION, caption="attention")


def ramp_map(source: Dataset, *, key: bool = True, peak: float = 0.9) -> Map:
    """A Grad-CAM-like map rising from top (0) to bottom (1)."""
    rows, columns = int(source.Rows), int(source.Columns)
    values = np.repeat(np.linspace(0.0, peak, rows, dtype=np.float32)[:, None], columns, axis=1)
    return Map(ImageRef.of(source), values, MapMeaning.GRAD_CAM, key=key)


def chain_result(
    sources: Sequence[Dataset] | None = None,
    *,
    demonstration: bool = True,
    findings: Sequence[Finding] | None = None,
) -> ChainResult:
    """Findings per joint and ilium quadrant, two key maps and one non-key map, and an
    attention weight per slice."""
    sources = list(sources if sources is not None else mr_series())
    key = sources[len(sources) // 2]
    weights = np.linspace(0.1, 0.6, len(sources))
    findings = list(findings if findings is not None else joint_findings(sources))
    peak = max(finding.probability for finding in findings)  # evidence maps peak at the probability
    return ChainResult(
        findings=findings,
        provenance=demo_provenance(demonstration),
        sources=sources,
        maps=[left_hot_map(key, peak), ramp_map(sources[0], peak=peak), ramp_map(sources[-1], key=False, peak=peak)],
        image_scores=[
            ImageScore(ImageRef.of(source), float(weight), concept("attention weight"))
            for source, weight in zip(sources, weights)
        ],
    )
