"""Phantom studies as training and evaluation cases: the axial T2FS series and its study label.

A folder written by ``sijnode phantom`` holds one sub-folder per study with the DICOM series
and ``ground_truth.json``. The label for this chain is the study's ``active_inflammation``
(any bone marrow edema; see :mod:`pipeline.phantom.labels`). Each study is one patient, so a
split by study is a split by patient; splits (:func:`pipeline.training.split_by_patient`) group
by PatientID all the same.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydicom import Dataset, dcmread

from pipeline.chains.t2fs_mil.preprocess import PREPROCESSING, preprocess_series
from pipeline.evaluation import phantom_subgroups
from pipeline.phantom.study import GROUND_TRUTH_FILE, phantom_study_folders
from pipeline.training import seed_ranges

MASKS = "masks.npz"
LABEL = "active_inflammation"


@dataclass(frozen=True)
class Case:
    """One phantom study: where its T2FS series is, and its label."""

    folder: Path
    study: str  # the study folder's name, e.g. SYNTH-0007
    patient_id: str
    seed: int
    label: bool  # active inflammation (any edema)
    edema_on_t2fs: bool  # some edema lesion covers >= 1 slice of the axial T2FS series
    generator_version: str
    t2fs_folder: Path
    edema_uids: frozenset[str] = frozenset()  # T2FS images an edema lesion covers (>= 4 mm^2)
    joint_uids: frozenset[str] = frozenset()  # T2FS images that cut a sacroiliac joint (its joint line)
    lesions: str = "random"  # how the phantom's lesions were asked for: random, none or spec
    subgroups: tuple[str, ...] = ()  # case-mix subgroups (pipeline.evaluation.phantom_subgroups)

    def datasets(self) -> list[Dataset]:
        files = sorted(self.t2fs_folder.glob("*.dcm"))
        if not files:
            raise FileNotFoundError(f"{self.t2fs_folder}: no DICOM files")
        return [dcmread(path) for path in files]

    def bag(self, input_size: int, recipe: str = PREPROCESSING["recipe"]) -> tuple[list[Dataset], torch.Tensor]:
        """(datasets in patient order, bag preprocessed by ``recipe``)."""
        return preprocess_series(self.datasets(), input_size, recipe)

    def slice_labels(self, ordered: Sequence[Dataset]) -> torch.Tensor:
        """Per slice (in the given order): 1 where the ground truth has edema on it."""
        return torch.tensor([str(ds.SOPInstanceUID) in self.edema_uids for ds in ordered], dtype=torch.float32)

    def joint_slices(self, ordered: Sequence[Dataset]) -> torch.Tensor:
        """Per slice (in the given order): True where it cuts a sacroiliac joint."""
        return torch.tensor([str(ds.SOPInstanceUID) in self.joint_uids for ds in ordered], dtype=torch.bool)


def read_case(folder: Path) -> Case:
    truth = json.loads((folder / GROUND_TRUTH_FILE).read_text())
    series = [s for s in truth["series"] if s["role"] == "T2FS" and s["plane"] == "axial"]
    if not series:
        raise ValueError(f"{folder}: no axial T2FS series in the ground truth (generate with kinds including mri)")
    t2fs_folder = folder / series[0]["folder"]
    edema = [lesion for lesion in truth["lesions"] if lesion["type"] == "edema"]
    uids = series[0]["sop_instance_uids"]  # file order = the ground truth's slice index
    edema_uids = frozenset(uids[index] for lesion in edema for index in lesion["slices"].get("T2FS", []))
    joint_uids: frozenset[str] = frozenset()
    if (folder / MASKS).is_file():
        with np.load(folder / MASKS) as masks:
            if "T2FS_joint_line" in masks:
                joint = masks["T2FS_joint_line"]
                joint_uids = frozenset(uids[int(i)] for i in np.flatnonzero(joint.reshape(joint.shape[0], -1).any(axis=1)))
    return Case(
        folder=folder,
        study=folder.name,
        patient_id=str(truth["patient_id"]),
        seed=int(truth["seed"]),
        label=bool(truth["labels"][LABEL]),
        edema_on_t2fs=any(lesion["slices"].get("T2FS") for lesion in edema),
        generator_version=str(truth["generator_version"]),
        t2fs_folder=t2fs_folder,
        edema_uids=edema_uids,
        joint_uids=joint_uids,
        lesions=_lesion_source(truth.get("lesion_spec", {})),
        subgroups=phantom_subgroups(truth),
    )


def _lesion_source(spec: dict) -> str:
    if spec.get("source") == "random":
        return "random"
    return "spec" if spec.get("lesions") else "none"


LESION_WORDS = {"random": "random lesions", "none": "no lesions", "spec": "lesions from a SPEC"}


def describe_seeds(summary: dict) -> str:
    """'seeds 0-119: random lesions; seeds 200-219: no lesions' from :func:`describe`'s ``lesions``."""
    return "; ".join(f"seeds {seeds}: {LESION_WORDS[source]}" for source, seeds in sorted(summary["lesions"].items(), key=lambda item: item[0] != "random"))


def find_cases(data: Path) -> list[Case]:
    """Every phantom study under ``data`` (the folder itself or its sub-folders), sorted by folder."""
    return [read_case(folder) for folder in phantom_study_folders(data, required=True)]


def describe(cases: Sequence[Case]) -> dict:
    """Counts and provenance of a set of cases, for manifests and reports."""
    sources = sorted({case.lesions for case in cases})
    return {
        "studies": len(cases),
        "positives": sum(case.label for case in cases),
        "negatives": sum(not case.label for case in cases),
        "positives_without_edema_on_t2fs": sum(case.label and not case.edema_on_t2fs for case in cases),
        "seeds": seed_ranges([case.seed for case in cases]),
        "lesions": {source: seed_ranges([c.seed for c in cases if c.lesions == source]) for source in sources},
        "generator_versions": sorted({case.generator_version for case in cases}),
    }
