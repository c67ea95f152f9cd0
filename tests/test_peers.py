"""Proof that the real-peer harness in tests/peers.py works (Orthanc, dcmtk, PostgreSQL)."""

from __future__ import annotations

import socket
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import psycopg
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.peers import (
    LOOPBACK,
    OrthancHTTPError,
    free_port,
    orthanc,
    postgres,
    run_echoscu,
    run_storescu,
    storescp,
    wait_for,
)


def write_tiny_ct(path: Path, *, patient_id: str = "PEERS-1", study_uid: str | None = None) -> Dataset:
    """Write a valid 4x4 CT image (Part 10, explicit VR LE) and return its dataset."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = "Peers^Tiny"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = "20240101"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = np.arange(16, dtype=np.int16).reshape(4, 4).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind((LOOPBACK, port))


def test_wait_for_returns_value_and_times_out() -> None:
    assert wait_for(lambda: 42, timeout=1) == 42
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="never"):
        wait_for(lambda: False, timeout=0.2, interval=0.05, what="never")
    assert time.monotonic() - started < 2
    with pytest.raises(TimeoutError) as raised:
        wait_for(lambda: 1 / 0, timeout=0.1, ignore=(ZeroDivisionError,))
    assert isinstance(raised.value.__cause__, ZeroDivisionError)


def test_orthanc_receives_over_rest_and_dicom(tmp_path: Path) -> None:
    uploaded = write_tiny_ct(tmp_path / "rest.dcm")
    sent = write_tiny_ct(tmp_path / "dimse.dcm", patient_id="PEERS-2")
    with orthanc(tmp_path, aet="PACS") as pacs:
        answer = pacs.upload(tmp_path / "rest.dcm")
        assert answer["Status"] == "Success"
        assert pacs.studies() == [answer["ParentStudy"]]
        assert pacs.instances() == [answer["ID"]]
        assert pacs.instance_id_for(uploaded.SOPInstanceUID) == answer["ID"]
        tags = pacs.instance_tags(answer["ID"])
        assert tags["PatientID"] == "PEERS-1"
        assert tags["StudyInstanceUID"] == uploaded.StudyInstanceUID
        stored = pydicom.dcmread(BytesIO(pacs.instance_file(answer["ID"])))
        assert stored.pixel_array.tolist() == uploaded.pixel_array.tolist()

        result = run_storescu(tmp_path / "dimse.dcm", pacs.dicom_port, "PACS")
        assert result.returncode == 0, result.stderr
        assert pacs.instance_id_for(sent.SOPInstanceUID) is not None
        assert len(pacs.studies()) == 2

        with pytest.raises(OrthancHTTPError) as missing:
            pacs.get("/instances/does-not-exist")
        assert missing.value.status == 404


def test_orthanc_restart_and_store_to_a_destination_that_goes_down(tmp_path: Path) -> None:
    write_tiny_ct(tmp_path / "ct.dcm")
    with storescp(tmp_path, aet="DEST") as destination, orthanc(
        tmp_path, modalities={"dest": ("DEST", LOOPBACK, destination.port)}
    ) as pacs:
        instance_id = pacs.upload(tmp_path / "ct.dcm")["ID"]

        summary = pacs.store_to("dest", [instance_id])
        assert summary["InstancesCount"] == 1
        assert summary["FailedInstancesCount"] == 0
        assert summary["RemoteAet"] == "DEST"
        assert len(destination.received_files()) == 1

        destination.stop()
        with pytest.raises(OrthancHTTPError) as refused:
            pacs.store_to("dest", instance_id)
        assert refused.value.status == 500
        assert "Connection refused" in refused.value.json()["Details"]

        destination.start()  # same port and output dir
        assert pacs.store_to("dest", instance_id)["InstancesCount"] == 1

        ports = (pacs.dicom_port, pacs.http_port)
        pacs.stop()
        assert not pacs.is_running
        pacs.start()
        assert (pacs.dicom_port, pacs.http_port) == ports
        assert pacs.instances() == [instance_id]
        assert "dest" in pacs.get("/modalities")


def test_storescp_receives_files_and_directories_from_storescu(tmp_path: Path) -> None:
    sent = [write_tiny_ct(tmp_path / "out" / f"{n}.dcm") for n in range(3)]
    with storescp(tmp_path, aet="SCP") as scp:
        single = run_storescu(tmp_path / "out" / "0.dcm", scp.port, "SCP")
        assert single.returncode == 0, single.stderr
        directory = run_storescu([tmp_path / "out"], scp.port, "SCP", extra_args=["-nh"])
        assert directory.returncode == 0, directory.stderr
        received = {pydicom.dcmread(p).SOPInstanceUID for p in scp.received_files()}
    assert received == {ds.SOPInstanceUID for ds in sent}
    assert not scp.is_running


def test_dcmtk_clients_succeed_against_storescp_and_fail_on_a_closed_port(tmp_path: Path) -> None:
    with storescp(tmp_path) as scp:
        assert run_echoscu(scp.port, "STORESCP").returncode == 0
    assert run_echoscu(scp.port, "STORESCP").returncode != 0
    write_tiny_ct(tmp_path / "ct.dcm")
    assert run_storescu(tmp_path / "ct.dcm", scp.port, "STORESCP").returncode != 0


def test_postgres_accepts_connections_and_survives_restart(tmp_path: Path) -> None:
    with postgres(tmp_path) as pg:
        assert pg.url == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/sijnode"
        with psycopg.connect(pg.conninfo) as connection:
            connection.execute("CREATE TABLE instance (sop_uid text PRIMARY KEY)")
            connection.execute("INSERT INTO instance VALUES ('1.2.3')")

        pg.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.conninfo, connect_timeout=2)
        pg.start()

        with psycopg.connect(pg.conninfo) as connection:
            assert connection.execute("SELECT sop_uid FROM instance").fetchall() == [("1.2.3",)]
            assert connection.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        data_root = pg.root_dir
    assert data_root is not None and not data_root.exists()
    assert list(tmp_path.glob("postgres-*.log"))
