"""Model chains: what a worker runs for one routed job.

A chain is built from its ``ChainSpec`` (config.yaml) by the factory its ``implementation``
names ("package.module:Attribute"), and turns a study's input series into DICOM objects to
send back. Chains never open sockets or database sessions: files in, datasets out.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom import Dataset, dcmread

from pipeline.route import ChainSpec


@dataclass(frozen=True)
class SeriesInput:
    """One input series of a job: its files in the spool, in instance-number order."""

    key: str
    series_uid: str
    files: tuple[Path, ...]

    def datasets(self) -> list[Dataset]:
        return [dcmread(path) for path in self.files]


@dataclass(frozen=True)
class StudyInputs:
    """Everything a chain gets for one job."""

    study_uid: str
    series: Mapping[str, SeriesInput]
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how chains run (from the workers section of the config)."""

    device: str = "cpu"
    torch_threads: int = 2
    # "fp32" (exact) or "bf16": forward passes under bf16 autocast, an optional faster mode on
    # CPUs with AMX / AVX512-BF16 whose deviation is measured in bench/README.md.
    precision: str = "fp32"


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
