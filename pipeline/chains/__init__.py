"""Model chains: what a worker runs for one routed job.

A chain is built from its ``ChainSpec`` (config.yaml) by the factory its ``implementation``
names ("package.module:Attribute"), and turns a study's input series into DICOM objects to
send back. Chains never open sockets or database sessions: files in, datasets out.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom import Dataset, dcmread

from pipeline.route import ChainSpec, OutputPlan


@dataclass(frozen=True)
class SeriesInput:
    """One input series of a job: its files in the spool, in instance-number order."""

    key: str
    series_uid: str
    files: tuple[Path, ...]

    def datasets(self) -> list[Dataset]:
        return [read_leniently(path) for path in self.files]


# Dates as the field writes them besides DICOM's YYYYMMDD: 1977-04-01, 1977/04/01, 1977.04.01.
_SLOPPY_DATE = re.compile(r"^\s*(\d{4})[-/.](\d{2})[-/.](\d{2})\s*$")


def read_leniently(path: Path) -> Dataset:
    """Read an input instance, tolerating what the field gets wrong in values no chain needs.

    A date (VR DA) in a common non-DICOM form is rewritten as YYYYMMDD; one that is no date at
    all is emptied (its attribute stays, as a Type 2 copy would). Otherwise pydicom and
    highdicom refuse the value when the outputs copy the patient and study modules
    ("Unable to convert '1977-04-01' to 'DA'"), and the whole study fails. The file in the
    spool stays as it was received.
    """
    dataset = dcmread(path)
    for element in dataset.iterall():
        if element.VR != "DA" or element.is_empty or not isinstance(element.value, str):
            continue
        value = element.value.strip()
        if re.fullmatch(r"\d{8}", value) or ("-" in value and _is_date_range(value)):
            continue
        sloppy = _SLOPPY_DATE.match(value)
        element.value = "".join(sloppy.groups()) if sloppy else ""
    return dataset


def _is_date_range(value: str) -> bool:
    return all(re.fullmatch(r"\d{8}|", part) for part in value.split("-")) and value.count("-") == 1


@dataclass(frozen=True)
class StudyInputs:
    """Everything a chain gets for one job."""

    study_uid: str
    series: Mapping[str, SeriesInput]
    options: Mapping[str, Any] = field(default_factory=dict)
    # result version, series numbers and descriptions, previous version's SR (set by the worker)
    output: OutputPlan = field(default_factory=OutputPlan)


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how chains run (from the workers section of the config)."""

    device: str = "cpu"
    torch_threads: int = 2
    # "fp32" (exact) or "bf16": forward passes under bf16 autocast, an optional faster mode on
    # CPUs with AMX / AVX512-BF16 whose deviation is measured in bench/README.md.
    precision: str = "fp32"
    # How forward passes run: "eager" or a prepared runtime (pipeline.chains.base.PreparedNetwork).
    runtime: str = "eager"


class Chain(Protocol):
    """The contract every chain fulfils."""

    name: str

    def produce(self, inputs: StudyInputs) -> list[Dataset]:
        """Run on one study's inputs; return the DICOM objects to deliver (SR, heatmaps, ...)."""
        ...


class ChainLoadError(Exception):
    """A chain's implementation or model pack cannot be loaded."""


def load_chain(spec: ChainSpec, runtime: RuntimeSettings) -> Chain:
    """Import ``spec.implementation`` and build the chain with ``factory(spec, runtime)``."""
    module_name, _, attribute = spec.implementation.partition(":")
    if not module_name or not attribute:
        raise ChainLoadError(f"chain {spec.name}: implementation must be 'package.module:Attribute', got {spec.implementation!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ChainLoadError(f"chain {spec.name}: cannot import {spec.implementation}: {error}") from error
    return factory(spec, runtime)
