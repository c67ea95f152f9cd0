"""Start the real ``sijnode serve`` process for a test, on loopback, with its own config and data.

The node runs as a separate process (as in production), so tests can kill -9 it, restart it on
the same data, and talk to it with dcmtk and Orthanc.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import yaml
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from storage.store import Store
from tests.peers import LOOPBACK, dicom_tool_env, free_port, run_echoscu, wait_for

REPO = Path(__file__).resolve().parent.parent
NODE_AET = "SIJNODE"

# A chain defined in the tests (tests/chains.py) stands in for the model chains.
TEST_CHAIN = {
    "name": "test-echo",
    "implementation": "tests.chains:EchoChain",
    "requires": [{"role": "T1"}],
}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


class Node:
    """One sijnode service process with a config written into ``workdir``."""

    def __init__(self, workdir: Path, overrides: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        base = {
            # Two receiver processes share the port: every node test runs the multi-process receive path.
            "receiver": {"ae_title": NODE_AET, "bind": LOOPBACK, "port": self.port, "extra_calling_ae_titles": ["STORESCU", "ECHOSCU"], "processes": 2},
            "storage": {"data_dir": str(workdir / "var"), "free_space_reserve_mb": 0},
            "study": {"quiet_seconds": 2},
            "workers": {"processes": 1, "lease_seconds": 60},
            "dispatch": {"initial_backoff_s": 0.5, "max_backoff_s": 2, "network_timeout_s": 10},
            "peers": [],
            "chains": [],
            "logging": {"level": "DEBUG", "format": "json", "file": str(workdir / "node.log")},
        }
        self.config = deep_merge(base, overrides or {})
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return Path(self.config["logging"]["file"])

    @property
    def database_url(self) -> str:
        return self.config["storage"].get("database_url") or f"sqlite:///{self.workdir / 'var' / 'sijnode.db'}"

    def start(self, timeout: float = 60.0, echo_args: Sequence[str] = (), wait: bool = True) -> Self:
        """Start ``sijnode serve``; with ``wait``, return once it answers C-ECHO (``echo_args``: e.g. TLS options)."""
        env = dict(dicom_tool_env(), PYTHONPATH=str(REPO))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "--config", str(self.config_path), "serve"],
            cwd=REPO,
            env=env,
            stdout=open(self.workdir / "stdout.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if not wait:
            return self
        try:
            wait_for(lambda: self._ready(echo_args), timeout=timeout, interval=0.2, what="sijnode to answer C-ECHO")
        except BaseException:
            self.kill()
            raise
        return self

    def _ready(self, echo_args: Sequence[str]) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"sijnode exited with {self.process.returncode}:\n{self.output_tail()}")
        return run_echoscu(self.port, NODE_AET, extra_args=echo_args, timeout=10).returncode == 0

    def output_tail(self, chars: int = 4000) -> str:
        text = ""
        for name in ("stdout.log", "node.log"):
            path = self.workdir / name
            if path.exists():
                text += f"--- {name}\n" + path.read_text(errors="replace")[-chars:]
        return text

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful stop (SIGTERM), as systemd does."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """kill -9 the service and its workers, with no chance to clean up."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``sijnode --config ... ARGS`` like an admin would."""
        result = subprocess.run(
            [sys.executable, "-m", "node.cli", "--config", str(self.config_path), *args],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"sijnode {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def store(self) -> Store:
        return Store(self.database_url)

    def rows(self, model: type) -> list:
        """Every row of one table, read straight from the node's database."""
        from sqlalchemy import select

        store = self.store()
        try:
            with store.session() as session:
                return list(session.scalars(select(model)))
        finally:
            store.dispose()


def make_mr_series(
    folder: Path,
    count: int,
    study_uid: str | None = None,
    series_description: str = "t1_tse_cor",
    patient_name: str = "DOE^JANE",
    patient_id: str = "PID-4711",
    size: int = 64,
    series_number: int = 1,
    study_description: str | None = None,
) -> list[Path]:
    """Write a small coronal T1 TSE MR series (Siemens-style headers) and return its files.

    ``study_description`` can steer the test chain ("FAIL-CHAIN", "SLOW-CHAIN <seconds>").
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    rng = np.random.default_rng(count + series_number)
    paths = []
    for index in range(count):
        ds = Dataset()
        ds.file_meta = Dataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        if study_description is not None:
            ds.StudyDescription = study_description
        ds.PatientSex = "F"
        ds.StudyDate = "20261122"
        ds.StudyTime = "101500"
        ds.StudyID = "1"
        ds.AccessionNumber = "ACC1"
        ds.ReferringPhysicianName = ""
        ds.Modality = "MR"
        ds.Manufacturer = "SIEMENS"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = index + 1
        ds.SeriesDescription = series_description
        ds.ProtocolName = series_description
        ds.SequenceName = "*tse2d1_3"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = ["SK", "SP", "OSP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 550.0
        ds.EchoTime = 11.0
        ds.EchoTrainLength = 3
        ds.MagneticFieldStrength = 1.5
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.BodyPartExamined = "SIJ"
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-120.0, -20.0 + 4.0 * index, 120.0]
        ds.SliceThickness = 4.0
        ds.SpacingBetweenSlices = 4.0
        ds.PixelSpacing = [3.75, 3.75]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 4095, (size, size), dtype=np.uint16).tobytes()
        path = folder / f"{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storage_env() -> dict[str, str]:
    return dict(dicom_tool_env(), PYTHONPATH=str(REPO))


def read_uids(paths: Sequence[Path]) -> set[str]:
    from pydicom import dcmread

    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
