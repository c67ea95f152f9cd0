"""The spool: where received instances and produced results live on disk.

Layout under the data directory::

    spool/incoming/<study>/<series>/<sop>.dcm   received instances
    spool/results/<study>/<job>/<sop>.dcm        objects produced by jobs
    spool/tmp/                                   temporary files, same filesystem (atomic rename)

Every file is written to tmp/, fsynced, then renamed into place, so a crash never leaves
a half-written file under a final name.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from pathlib import Path

# UIDs are digits and dots; anything else (a malicious or broken UID) must not reach the path.
_SAFE_COMPONENT = re.compile(r"^[0-9A-Za-z.\-_]{1,64}$")


_temp_numbers = itertools.count()


class SpoolFullError(OSError):
    """Free space fell below the configured reserve."""


class Spool:
    """Paths and atomic writes under one spool root."""

    def __init__(self, data_dir: Path, free_space_reserve_mb: int = 0) -> None:
        self.root = Path(data_dir) / "spool"
        self.tmp_dir = self.root / "tmp"
        self.free_space_reserve_bytes = free_space_reserve_mb * 1024 * 1024
        for folder in (self.root / "incoming", self.root / "results", self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _component(value: str) -> str:
        value = str(value).strip().rstrip("\x00")
        if not _SAFE_COMPONENT.match(value) or value in {".", ".."}:
            raise ValueError(f"not usable in a path: {value!r}")
        return value

    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        """Relative path of a received instance."""
        parts = (self._component(study_uid), self._component(series_uid), self._component(sop_instance_uid) + ".dcm")
        return str(Path("incoming", *parts))

    def result_path(self, study_uid: str, job_id: int | None, sop_instance_uid: str) -> str:
        """Relative path of an object produced by a job (``None``: by the study, its summary)."""
        owner = "study" if job_id is None else str(int(job_id))
        parts = (self._component(study_uid), owner, self._component(sop_instance_uid) + ".dcm")
        return str(Path("results", *parts))

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_free_space(self) -> None:
        """Raise SpoolFullError when free space is below the reserve."""
        free = self.free_bytes()
        if free < self.free_space_reserve_bytes:
            raise SpoolFullError(f"spool free space {free // 2**20} MiB is below the reserve of {self.free_space_reserve_bytes // 2**20} MiB")

    def check_writable(self) -> None:
        """Raise OSError unless a file can be created in the spool (the health endpoint's check)."""
        probe = self.tmp_dir / f"{os.getpid()}-health-{next(_temp_numbers)}.probe"
        with open(probe, "xb") as handle:
            handle.write(b"ok")
        os.unlink(probe)

    def write_atomic(self, relative: str, data: bytes | memoryview) -> int:
        """Write bytes to ``relative`` atomically and durably; returns the size."""
        target = self.absolute(relative)
        # pid + a counter is unique without mkstemp's random-name retries (a hot path).
        tmp_name = self.tmp_dir / f"{os.getpid()}-{next(_temp_numbers)}.part"
        try:
            with open(tmp_name, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fdatasync(handle.fileno())
            self._make_dirs(target.parent)
            os.replace(tmp_name, target)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
            raise
        self._fsync_dir(target.parent)
        return len(data)

    def _make_dirs(self, folder: Path) -> None:
        """Create ``folder`` and any missing parents, each durably entered in its parent."""
        if folder.is_dir():
            return
        self._make_dirs(folder.parent)
        # Another association may create it at the same moment; either way its entry is synced
        # before this instance is acknowledged.
        folder.mkdir(exist_ok=True)
        self._fsync_dir(folder.parent)

    @staticmethod
    def _fsync_dir(folder: Path) -> None:
        # The rename is only durable once the directory entry is on disk.
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def clear_tmp(self) -> int:
        """Remove what killed processes left in tmp/ (half-written ``*.part`` files, library
        temporary files); returns how many. Only for a service starting with no other one alive."""
        removed = 0
        for path in self.tmp_dir.iterdir():
            try:
                if path.is_file() or path.is_symlink():
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def exists(self, relative: str) -> bool:
        return self.absolute(relative).exists()
