"""dicom3tools for the tests: what dciodvfy finds wrong with a DICOM file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines ``dciodvfy -new`` prints for one file (each starts 'Error - ').

    Warnings are allowed. A missing dciodvfy fails the test rather than skipping it: tests/run
    installs dicom3tools, so its absence is a broken setup, not an optional check.
    """
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.fail("dciodvfy is not installed: install the Debian package dicom3tools (tests/run does)")
    # dciodvfy's exit status does not tell errors from warnings: read its report instead
    run = subprocess.run([dciodvfy, "-new", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
