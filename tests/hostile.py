"""Hostile and broken inputs for the receiver, and a raw sender that delivers them as they are.

The corpus is what a broken modality or an attacker sends: impossible geometry, pixel data that
contradicts its own header, pixel encodings no decoder takes, compressed frames that do not
decode, oversized and inflating datasets, bad command sets. Each variant names the C-STORE
status the node must answer (node/validation.py documents them). tests/test_fuzz.py mutates
the same templates at random.
"""

from __future__ import annotations

import io
import socket
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, config, dcmread
from pydicom.dataelem import DataElement
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from tests.node_harness import NODE_AET
from tests.peers import LOOPBACK

# Patient identifiers the hostile datasets carry; no log line may ever show one.
PHI_NAME = "HOSTILE^PATIENCE^Q"
PHI_ID = "PID-HOSTILE-8123"
PHI_BIRTH_DATE = "19561203"
PHI_VALUES = (PHI_NAME, "HOSTILE", "PATIENCE", PHI_ID, PHI_BIRTH_DATE)

SUCCESS, OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND, NOT_DECODABLE = 0x0000, 0xA700, 0xA900, 0xC210, 0xC220


def mr_template(size: int = 32, seed: int = 0) -> Dataset:
    """A small valid classic MR image carrying the PHI values above."""
    ds = Dataset()
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = PHI_NAME
    ds.PatientID = PHI_ID
    ds.PatientBirthDate = PHI_BIRTH_DATE
    ds.PatientSex = "F"
    ds.StudyDate = "20261122"
    ds.Modality = "MR"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SeriesDescription = "t1_tse_cor"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.ImagePositionPatient = [-120.0, -20.0, 120.0]
    ds.SliceThickness = 4.0
    ds.PixelSpacing = [3.75, 3.75]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.random.default_rng(seed).integers(0, 4095, (size, size), dtype=np.uint16).tobytes()
    return ds


def encode(ds: Dataset, transfer_syntax: str | None = None) -> bytes:
    """The dataset as a DICOM file (no value checks: broken values are the point)."""
    if transfer_syntax is not None:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    with config.disable_value_validation():
        ds.save_as(buffer, enforce_file_format=True, implicit_vr=ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian, little_endian=True)
    return buffer.getvalue()


def _raw(ds: Dataset, keyword_tag: int, vr: str, value: bytes) -> None:
    ds[keyword_tag] = DataElement(keyword_tag, vr, value)


def _set(keyword: str, value: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        with config.disable_value_validation():
            setattr(ds, keyword, value)

    return change


def _delete(*keywords: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword in keywords:
            delattr(ds, keyword)

    return change


def _compressed_with_broken_fragment(syntax: str) -> Callable[[Dataset], None]:
    """The first frame compressed, then cut after 20 bytes (inside the codec's header): no
    decoder can make a frame of it. (JPEG-LS decodes a frame cut in half, to garbage.)"""

    def change(ds: Dataset) -> None:
        from pydicom.encaps import encapsulate, generate_frames

        ds.compress(syntax)
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([frame[:20]])

    return change


def _deflate_bomb(inflated_bytes: int) -> Callable[[Dataset], bytes]:
    """A deflated dataset whose pixel element inflates to ``inflated_bytes`` zeros."""

    def build(ds: Dataset) -> bytes:
        ds.Rows = ds.Columns = int((inflated_bytes // 2) ** 0.5)
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_dataset

        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        del ds.PixelData
        header = DicomBytesIO()
        header.is_little_endian, header.is_implicit_VR = True, False
        write_dataset(header, ds)  # explicit VR little endian, as deflate wraps it
        pixels = 2 * ds.Rows * ds.Columns
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        chunks = [compressor.compress(header.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<L", pixels))]
        block = bytes(1 << 20)
        for _ in range(pixels // len(block)):
            chunks.append(compressor.compress(block))
        chunks.append(compressor.compress(bytes(pixels % len(block))))
        chunks.append(compressor.flush())
        out = io.BytesIO()
        out.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(out, ds.file_meta)
        out.write(b"".join(chunks))
        return out.getvalue()

    return build


def _declared_length(length: int) -> Callable[[Dataset], bytes]:
    """Pixel data whose length field says ``length``; the bytes stop after the real data."""

    def build(ds: Dataset) -> bytes:
        data = bytearray(encode(ds))
        at = data.rindex(b"\xe0\x7f\x10\x00OW")
        data[at + 8 : at + 12] = struct.pack("<L", length)
        return bytes(data)

    return build


@dataclass(frozen=True)
class Variant:
    """One hostile input: how to make it from the template, and the status the node must answer."""

    name: str
    status: int
    change: Callable[[Dataset], object]
    transfer_syntax: str = ExplicitVRLittleEndian

    def build(self, seed: int = 0) -> bytes:
        ds = mr_template(seed=seed)
        result = self.change(ds)
        return result if isinstance(result, bytes) else encode(ds)


def _nan_spacing(ds: Dataset) -> None:
    _raw(ds, 0x00280030, "DS", b"NaN\\3.75")


def _nan_orientation(ds: Dataset) -> None:
    _raw(ds, 0x00200037, "DS", b"NaN\\0\\0\\0\\0\\-1")


def _infinite_position(ds: Dataset) -> None:
    _raw(ds, 0x00200032, "DS", b"-120\\inf\\120")


def _pixels(extra: int) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds.PixelData = ds.PixelData + bytes(extra) if extra > 0 else ds.PixelData[:extra]

    return change


def _empty_pixels(ds: Dataset) -> None:
    ds.PixelData = b""


def _phi_in_uid(ds: Dataset) -> None:
    """A study UID with the patient's name and ID in it: pydicom quotes such values in warnings."""
    _raw(ds, 0x0020000D, "UI", f"1.2.3.{PHI_NAME}.{PHI_ID}".encode())


def _sloppy_birth_date(ds: Dataset) -> None:
    _raw(ds, 0x00100030, "DA", b"1956-12-03")


def _name_with_bad_vr(ds: Dataset) -> bytes:
    """The patient's name re-labelled with an unknown VR code."""
    data = bytearray(encode(ds))
    at = data.index(b"\x10\x00\x10\x00PN")
    data[at + 4 : at + 6] = b"Q!"
    return bytes(data)


CORPUS: tuple[Variant, ...] = (
    Variant("valid", SUCCESS, lambda ds: None),
    Variant("sloppy birth date 1956-12-03", SUCCESS, _sloppy_birth_date),
    Variant("PHI inside an invalid study UID", DOES_NOT_MATCH, _phi_in_uid),
    Variant("zero pixel spacing", DOES_NOT_MATCH, _set("PixelSpacing", [0, 3.75])),
    Variant("negative pixel spacing", DOES_NOT_MATCH, _set("PixelSpacing", [-3.75, 3.75])),
    Variant("NaN pixel spacing", DOES_NOT_MATCH, _nan_spacing),
    Variant("one pixel spacing value", DOES_NOT_MATCH, _set("PixelSpacing", [3.75])),
    Variant("NaN orientation", DOES_NOT_MATCH, _nan_orientation),
    Variant("parallel orientation vectors", DOES_NOT_MATCH, _set("ImageOrientationPatient", [1, 0, 0, 1, 0, 0])),
    Variant("orientation not unit length", DOES_NOT_MATCH, _set("ImageOrientationPatient", [2, 0, 0, 0, 0, -2])),
    Variant("infinite position", DOES_NOT_MATCH, _infinite_position),
    Variant("MR without orientation", DOES_NOT_MATCH, _delete("ImageOrientationPatient")),
    Variant("MR without pixel spacing", DOES_NOT_MATCH, _delete("PixelSpacing")),
    Variant("negative slice thickness", DOES_NOT_MATCH, _set("SliceThickness", -4)),
    Variant("no Rows", DOES_NOT_MATCH, _delete("Rows")),
    Variant("zero Columns", DOES_NOT_MATCH, _set("Columns", 0)),
    Variant("empty pixel data", DOES_NOT_MATCH, _empty_pixels),
    Variant("Rows contradict the pixel data (longer)", CANNOT_UNDERSTAND, _set("Rows", 64)),
    Variant("pixel data longer than Rows x Columns", CANNOT_UNDERSTAND, _pixels(4096)),
    Variant("pixel data truncated", CANNOT_UNDERSTAND, _pixels(-100)),
    Variant("BitsAllocated 12", NOT_DECODABLE, _set("BitsAllocated", 12)),
    Variant("BitsStored above BitsAllocated", NOT_DECODABLE, _set("BitsStored", 17)),
    Variant("PixelRepresentation 2", NOT_DECODABLE, _set("PixelRepresentation", 2)),
    Variant("SamplesPerPixel 2", NOT_DECODABLE, _set("SamplesPerPixel", 2)),
    Variant("RGB with one sample per pixel", NOT_DECODABLE, _set("PhotometricInterpretation", "RGB")),
    Variant("no PhotometricInterpretation", NOT_DECODABLE, _delete("PhotometricInterpretation")),
    Variant("RLE fragment that does not decode", NOT_DECODABLE, _compressed_with_broken_fragment(RLELossless), RLELossless),
    Variant("JPEG-LS fragment that does not decode", NOT_DECODABLE, _compressed_with_broken_fragment(JPEGLSLossless), JPEGLSLossless),
    Variant("pixel data declared 2 GB (more than max_element_bytes)", OUT_OF_RESOURCES, _declared_length(0x7FFFFFF0)),
    Variant("pixel data declared 1 MiB, 2 KiB there", CANNOT_UNDERSTAND, _declared_length(1 << 20)),
    Variant("patient name with an unknown VR", CANNOT_UNDERSTAND, _name_with_bad_vr),
)

ALL_CONTEXT_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEGLSLossless)


def deflate_bomb(inflated_bytes: int) -> Variant:
    return Variant(f"deflate bomb inflating to {inflated_bytes} bytes", OUT_OF_RESOURCES, _deflate_bomb(inflated_bytes), DeflatedExplicitVRLittleEndian)


class RawSender:
    """One association that sends encoded files as they are (pynetdicom's chunked sender).

    storescu refuses most broken files; this sends the bytes after the file meta unchanged.
    """

    def __init__(self, port: int, folder: Path, calling_ae: str = "STORESCU", called_ae: str = NODE_AET) -> None:
        from pynetdicom import AE

        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ae = AE(calling_ae)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 60
        for syntax in ALL_CONTEXT_SYNTAXES:
            self.ae.add_requested_context(MRImageStorage, syntax)
        self.ae.add_requested_context("1.2.840.10008.1.1")
        self.assoc = self.ae.associate(LOOPBACK, port, ae_title=called_ae)
        assert self.assoc.is_established, "the node refused the sender's association"
        self._count = 0

    def send(self, encoded: bytes) -> int | None:
        """C-STORE one file's bytes; the status, or None when the association ended."""
        from pynetdicom import _config

        self._count += 1
        path = self.folder / f"{self._count:05d}.dcm"
        path.write_bytes(encoded)
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            status = self.assoc.send_c_store(path)
        except (ValueError, AttributeError, KeyError, TypeError):
            return -1  # pynetdicom cannot even send it (no matching context, unreadable meta)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
            path.unlink()
        return int(status.Status) if "Status" in status else None

    def echo(self) -> bool:
        status = self.assoc.send_c_echo()
        return "Status" in status and status.Status == 0

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def service_memory_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def open_idle_connections(port: int, count: int) -> list[socket.socket]:
    """TCP connections to the node that never send a byte."""
    return [socket.create_connection((LOOPBACK, port), timeout=5) for _ in range(count)]


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the node closed this connection (a read sees EOF or a reset)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def close_all(sockets: Iterable[socket.socket]) -> None:
    for sock in sockets:
        try:
            sock.close()
        except OSError:
            pass
