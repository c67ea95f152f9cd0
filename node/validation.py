"""Receive-time checks: an instance answered Success is one the node can read and its chains can use.

Each check is cheap (header arithmetic; one frame decoded only for compressed pixel data) and
raises ``InstanceRejected`` with the C-STORE status to answer (PS3.4 B.2.3):

=========  ============================================================================
0xA700     out of resources: the dataset (as received, or inflated from deflate) or one
           of its elements is larger than ``receiver.limits``; also spool/database trouble
0xA900     dataset does not match SOP class: a module its IOD requires is missing or
           contradicts itself (no Study/Series UID, empty pixel data, incomplete pixel
           module, spacing not finite > 0, orientation not two orthonormal vectors,
           position not three finite numbers, MR/CT without its Image Plane module)
0xC210     cannot understand: the structure cannot be decoded (unknown VR, binary value of
           the wrong length, element running past the end, sequence that does not parse,
           no valid SOP UIDs, command set UIDs pynetdicom cannot take), or the pixel data
           is shorter or longer than Rows x Columns x samples x bits x frames
0xC220     cannot understand: pixel data the node cannot decode (Bits Allocated, Bits
           Stored, Pixel Representation, Samples per Pixel or Photometric Interpretation
           outside what the decoders support, or a compressed first frame that does not
           decode)
=========  ============================================================================

Compressed pixel data is checked by decoding the first frame: a fragment that does not decode
would fail every chain. One 512x512 MR-like frame took 1.2 ms (RLE), 28 ms (JPEG-LS) and 34 ms
(JPEG 2000) on the shared 2-core test machine at load average 19, so the receive rate of
JPEG-LS/JPEG 2000 studies pays for it (not re-measured with bench/ingest); native pixel data is
checked by arithmetic only. The other frames of a multi-frame instance are not decoded.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Sequence

from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR
from pydicom.filereader import _read_file_meta_info, read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import VR


class Status:
    """C-STORE statuses the receiver answers with (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC210
    PIXEL_DATA_NOT_DECODABLE = 0xC220


class InstanceRejected(Exception):
    """One instance cannot be accepted; ``status`` is the C-STORE status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# -- size: before anything is decoded --------------------------------------------------------------


def read_instance(encoded: bytes, max_dataset_bytes: int) -> Dataset:
    """Read a received file (preamble, meta, dataset as received), values still unconverted.

    pydicom inflates a deflated dataset whole before reading it; here inflating stops at
    ``max_dataset_bytes`` (a deflate bomb gets 0xA700 before its memory is allocated).
    """
    stream = io.BytesIO(encoded)
    stream.seek(132)  # preamble and "DICM"
    meta = _read_file_meta_info(stream)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return dcmread(io.BytesIO(encoded))
    deflated = memoryview(encoded)[stream.tell() :]
    try:
        # First only measure, 1 MiB at a time: a bomb costs CPU, never memory.
        if _inflated_size(deflated, max_dataset_bytes) > max_dataset_bytes:
            raise InstanceRejected(Status.OUT_OF_RESOURCES, f"deflated dataset inflates beyond {max_dataset_bytes} bytes")
        inflated = zlib.decompress(deflated, -zlib.MAX_WBITS)
    except zlib.error as error:
        raise InstanceRejected(Status.CANNOT_UNDERSTAND, f"deflated dataset does not inflate: {error}") from None
    dataset = read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
    dataset.file_meta = meta
    return dataset


def _inflated_size(deflated: memoryview, limit: int, chunk: int = 1 << 20) -> int:
    """How many bytes ``deflated`` inflates to, counting no further than just past ``limit``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = len(inflater.decompress(deflated, chunk))
    while inflater.unconsumed_tail and size <= limit:
        size += len(inflater.decompress(inflater.unconsumed_tail, chunk))
    return size


_KNOWN_VRS = frozenset(vr.value for vr in VR)
# Bytes per value of the binary VRs: a length that is no multiple of it cannot be decoded.
_BINARY_VALUE_BYTES = {
    "AT": 4, "FD": 8, "FL": 4, "OD": 8, "OF": 4, "OL": 4, "OV": 8, "OW": 2, "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8,
}
_UNDEFINED_LENGTH = 0xFFFFFFFF


def check_structure(dataset: Dataset, max_element_bytes: int) -> None:
    """Raise if the dataset's structure cannot be decoded: an unknown VR, a binary value of the
    wrong length, an element larger than ``max_element_bytes``, or a sequence whose items do
    not parse.

    Reading parses tags and lengths; pydicom converts values (and sequence items) only when they
    are used. Converting every value here cost 0.8 ms per 256x256 MR image (bench/README.md), so
    only what decoding depends on is checked, recursively into every sequence. Text values do not
    need it: pydicom keeps an invalid one as it is, with a warning.
    """
    for tag in dataset.keys():
        element = dataset.get_item(tag)  # raw: its value is not converted
        vr = element.VR
        if vr is None:  # implicit VR: the data dictionary says
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue  # private or unknown: read as UN
        elif vr not in _KNOWN_VRS:
            raise ValueError(f"unknown VR {vr!r} in {tag}")
        length = getattr(element, "length", 0)
        if length != _UNDEFINED_LENGTH and length > max_element_bytes:
            raise InstanceRejected(Status.OUT_OF_RESOURCES, f"{tag} has {length} bytes, more than {max_element_bytes}")
        value = getattr(element, "value", None)
        if length != _UNDEFINED_LENGTH and isinstance(value, bytes) and len(value) < length:
            raise ValueError(f"{tag} declares {length} bytes but the dataset ends after {len(value)}")
        size = _BINARY_VALUE_BYTES.get(vr)
        if size and length != _UNDEFINED_LENGTH and length % size:
            raise ValueError(f"{tag} has VR {vr} but {length} bytes, not a multiple of {size}")
        if vr == "SQ":
            for item in dataset[tag].value:
                check_structure(item, max_element_bytes)


# -- usability: what every chain relies on ----------------------------------------------------------

# Classic (single-frame) classes whose Image Plane module is Type 1: the chains place MR and
# CT slices in patient space from it.
_IMAGE_PLANE_REQUIRED = frozenset({
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
})
_SUPPORTED_BITS_ALLOCATED = frozenset({1, 8, 16, 32})
_ORTHONORMAL_TOLERANCE = 1e-3
_PHOTOMETRIC_BY_SAMPLES = {
    1: frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"}),
    3: frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}),
}


def check_usable(dataset: Dataset) -> None:
    """Raise ``InstanceRejected`` unless the image's pixel and geometry modules are usable."""
    if "PixelData" not in dataset and "FloatPixelData" not in dataset and "DoubleFloatPixelData" not in dataset:
        if str(dataset.get("SOPClassUID", "")) in _IMAGE_PLANE_REQUIRED:
            raise InstanceRejected(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "image without pixel data")
        return  # not an image (SR, presentation state ... when every storage class is accepted)
    _check_geometry(dataset)
    if "PixelData" in dataset:
        _check_pixel_module(dataset)


def _numbers(dataset: Dataset, keyword: str, count: int) -> list[float] | None:
    """``count`` finite numbers from a multi-valued attribute, None when absent; raises if broken."""
    if keyword not in dataset or dataset[keyword].is_empty:
        return None
    try:
        value = dataset[keyword].value
        values = [float(v) for v in (value if isinstance(value, Sequence) and not isinstance(value, str) else [value])]
    except (TypeError, ValueError) as error:
        raise _geometry(f"{keyword} is not numeric: {type(error).__name__}") from None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise _geometry(f"{keyword} needs {count} finite numbers, has {len(values)}")
    return values


def _geometry(reason: str) -> InstanceRejected:
    return InstanceRejected(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"image geometry unusable: {reason}")


def _check_geometry(dataset: Dataset) -> None:
    required = str(dataset.get("SOPClassUID", "")) in _IMAGE_PLANE_REQUIRED
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = _numbers(dataset, keyword, 2)
        if spacing is not None and min(spacing) <= 0:
            raise _geometry(f"{keyword} must be > 0")
        if spacing is None and keyword == "PixelSpacing" and required:
            raise _geometry("PixelSpacing missing")
    orientation = _numbers(dataset, "ImageOrientationPatient", 6)
    if orientation is not None:
        row, column = orientation[:3], orientation[3:]
        norms = [math.sqrt(sum(v * v for v in vector)) for vector in (row, column)]
        dot = sum(a * b for a, b in zip(row, column))
        if any(abs(n - 1) > _ORTHONORMAL_TOLERANCE for n in norms) or abs(dot) > _ORTHONORMAL_TOLERANCE:
            raise _geometry("ImageOrientationPatient is not two orthonormal vectors")
    elif required:
        raise _geometry("ImageOrientationPatient missing")
    if _numbers(dataset, "ImagePositionPatient", 3) is None and required:
        raise _geometry("ImagePositionPatient missing")
    thickness = dataset.get("SliceThickness")
    if thickness not in (None, ""):
        try:
            if not math.isfinite(float(thickness)) or float(thickness) < 0:
                raise _geometry("SliceThickness must be finite and >= 0")
        except (TypeError, ValueError):
            raise _geometry("SliceThickness is not numeric") from None


def _pixel_module(dataset: Dataset) -> tuple[int, int, int, int, int, int, int]:
    try:
        values = tuple(
            int(dataset[keyword].value)
            for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation")
        )
        frames = int(dataset.get("NumberOfFrames") or 1)
    except (KeyError, TypeError, ValueError) as error:
        raise InstanceRejected(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"image pixel module incomplete: {type(error).__name__} {error}") from None
    return (*values, frames)  # type: ignore[return-value]


def _check_pixel_module(dataset: Dataset) -> None:
    rows, columns, samples, bits_allocated, bits_stored, representation, frames = _pixel_module(dataset)
    if min(rows, columns, frames) < 1:
        raise InstanceRejected(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Rows, Columns and NumberOfFrames must be >= 1")
    if (
        bits_allocated not in _SUPPORTED_BITS_ALLOCATED
        or not 1 <= bits_stored <= bits_allocated
        or representation not in (0, 1)
        or samples not in (1, 3)
    ):
        raise InstanceRejected(
            Status.PIXEL_DATA_NOT_DECODABLE,
            f"pixel encoding not supported: BitsAllocated {bits_allocated}, BitsStored {bits_stored}, "
            f"PixelRepresentation {representation}, SamplesPerPixel {samples}",
        )
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    if photometric not in _PHOTOMETRIC_BY_SAMPLES[samples] or (photometric.startswith("YBR") and bits_allocated != 8):
        # pydicom converts YBR to RGB only for 8-bit samples: a chain's pixel_array would raise.
        raise InstanceRejected(
            Status.PIXEL_DATA_NOT_DECODABLE,
            f"PhotometricInterpretation {photometric or '(none)'} with SamplesPerPixel {samples}, BitsAllocated {bits_allocated}",
        )
    element = dataset["PixelData"]
    if element.is_empty:
        raise InstanceRejected(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "pixel data is empty")
    if dataset.file_meta.TransferSyntaxUID.is_compressed:
        _check_first_frame_decodes(dataset)
        return
    pixels = rows * columns * samples * frames
    expected = (pixels + 7) // 8 if bits_allocated == 1 else pixels * (bits_allocated // 8)
    actual = len(element.value)
    # An odd length is padded to even (PS3.5 8.1.1).
    if actual not in (expected, expected + (expected % 2)):
        raise InstanceRejected(
            Status.CANNOT_UNDERSTAND,
            f"pixel data has {actual} bytes; Rows x Columns x samples x bits x frames makes {expected}",
        )


def _check_first_frame_decodes(dataset: Dataset) -> None:
    from pydicom.pixels import pixel_array

    try:
        frame = pixel_array(dataset, index=0)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # each plug-in raises its own types; the Rust RLE decoder panics (a BaseException)
        raise InstanceRejected(Status.PIXEL_DATA_NOT_DECODABLE, f"first frame does not decode: {type(error).__name__}") from None
    if frame.shape[:2] != (dataset.Rows, dataset.Columns):
        raise InstanceRejected(Status.PIXEL_DATA_NOT_DECODABLE, f"first frame decodes to {frame.shape}, not Rows x Columns")
