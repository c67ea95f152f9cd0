"""Phantom studies as t1stir-3d cases: the semicoronal T1 and STIR series and the three labels.

Labels from ``ground_truth.json`` (:mod:`pipeline.phantom.labels`): ``active_inflammation`` (any
bone marrow edema) → active inflammatory lesions; ``asas_mri_positive`` (edema on ≥ 2 STIR slices,
or ≥ 2 lesions on one) → ASAS active sacroiliitis; ``structural_change`` → structural lesions. Each
study is one patient.

The grid volumes (resampled, clipped, bias-corrected: the expensive part) can be cached per study
and preprocessing settings under ``cache`` so that evaluation and retraining do not redo N4.

For the demonstration pack's lesion-patch phase (:mod:`pipeline.chains.t1stir_3d.train`) a case also
gives the centres of its lesions behind each output (:data:`LESION_TYPES`) as voxels of the
classifier input (:meth:`Case.lesion_voxels`): training only; nothing of the ground truth reaches the
chain.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread

from pipeline.chains.t1stir_3d.model import SEQUENCES
from pipeline.chains.t1stir_3d.preprocess import GRID_KEYS, PreparedPair, classifier_voxels, prepare_pair, study_grid, volume_from_datasets
from pipeline.evaluation import phantom_subgroups
from pipeline.phantom.lesions import STRUCTURAL_TYPES
from pipeline.phantom.study import GROUND_TRUTH_FILE, phantom_study_folders
from pipeline.training import seed_ranges

#: ground-truth label per task output
LABEL_KEYS: dict[str, str] = {
    "active_inflammation": "active_inflammation",
    "asas_active_sacroiliitis": "asas_mri_positive",
    "structural_lesions": "structural_change",
}

#: the phantom lesion types behind each task output (the labels above are "any lesion of these")
LESION_TYPES: dict[str, tuple[str, ...]] = {
    "active_inflammation": ("edema",),
    "asas_active_sacroiliitis": ("edema",),
    "structural_lesions": STRUCTURAL_TYPES,
}


@dataclass(frozen=True)
class Case:
    folder: Path
    study: str
    patient_id: str
    seed: int
    labels: dict[str, int]  # by task output
    subgroups: tuple[str, ...]
    generator_version: str
    series_folders: dict[str, Path]  # "T1", "STIR"

    def datasets(self, sequence: str) -> list[Dataset]:
        files = sorted(self.series_folders[sequence].glob("*.dcm"))
        if not files:
            raise FileNotFoundError(f"{self.series_folders[sequence]}: no DICOM files")
        return [dcmread(path) for path in files]

    def prepared(self, settings: Mapping[str, Any]) -> PreparedPair:
        """Both series on the grid, clipped and bias-corrected, as the chain prepares them."""
        return prepare_pair(self.datasets("T1"), self.datasets("STIR"), settings)

    def grid_volumes(self, settings: Mapping[str, Any], cache: Path | None = None) -> dict[str, np.ndarray]:
        """The prepared grid volumes by sequence (T1, STIR), from ``cache`` when it holds this study at these settings.

        Training and evaluation need only these volumes; the cache spares them the DICOM reading,
        resampling and N4 on every run.
        """
        path = None
        if cache is not None:
            key = hashlib.sha256(json.dumps({k: settings[k] for k in GRID_KEYS}, sort_keys=True).encode()).hexdigest()[:12]
            path = Path(cache) / f"{self.study}-{self.seed}-{key}.npz"
            if path.is_file():
                with np.load(path) as stored:
                    return {s: stored[s] for s in SEQUENCES}
        pair = self.prepared(settings)
        volumes = {s: pair.series[s].grid_volume for s in SEQUENCES}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **volumes)
        return volumes

    def lesion_voxels(self, task: str, settings: Mapping[str, Any]) -> np.ndarray:
        """Centres ``(n, 3)`` of this study's lesions behind ``task`` as continuous ``(slice, row, column)``
        voxels of the classifier input (the grid from the T1 geometry as the chain builds it, then
        the classifier's crop and resize). Training only."""
        truth = json.loads((self.folder / GROUND_TRUTH_FILE).read_text())
        centres = [lesion["center_lps_mm"] for lesion in truth["lesions"] if lesion["type"] in LESION_TYPES[task]]
        if not centres:
            return np.zeros((0, 3))
        grid = study_grid(volume_from_datasets(self.datasets("T1"))[1], settings)
        return classifier_voxels(grid.voxel_of(np.asarray(centres, dtype=float)), settings, settings["classifier_size"])


def read_case(folder: Path) -> Case:
    truth = json.loads((folder / GROUND_TRUTH_FILE).read_text())
    series = {s["role"]: folder / s["folder"] for s in truth["series"] if s["role"] in SEQUENCES and s["plane"] == "coronal"}
    if set(series) != set(SEQUENCES):
        raise ValueError(f"{folder}: no semicoronal T1 and STIR series in the ground truth (generate with kinds including mri)")
    return Case(
        folder=folder,
        study=folder.name,
        patient_id=str(truth["patient_id"]),
        seed=int(truth["seed"]),
        labels={task: int(bool(truth["labels"][key])) for task, key in LABEL_KEYS.items()},
        subgroups=phantom_subgroups(truth),
        generator_version=str(truth["generator_version"]),
        series_folders=series,
    )


def find_cases(data: Path) -> list[Case]:
    """Every phantom study under ``data`` (the folder itself or its sub-folders), sorted by folder."""
    return [read_case(folder) for folder in phantom_study_folders(data, required=True)]


def describe(cases: Sequence[Case]) -> dict[str, Any]:
    """Counts and provenance of a set of cases, for manifests and reports."""
    return {
        "studies": len(cases),
        "positives": {task: sum(c.labels[task] for c in cases) for task in LABEL_KEYS},
        "seeds": seed_ranges([c.seed for c in cases]),
        "subgroups": {g: sum(g in c.subgroups for c in cases) for g in sorted({g for c in cases for g in c.subgroups})},
        "generator_versions": sorted({c.generator_version for c in cases}),
    }
