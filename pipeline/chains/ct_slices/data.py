"""Phantom CT studies for the demonstration pack: the case mix, the labels, and reading studies back.

The label: **sacroiliitis on CT** = definite structural change CT shows, i.e. a modified New
York grade of at least 2 on either side (a non-mild erosion or sclerosis, ankylosis, or a
narrowed or widened joint). Hard negatives are in the mix on purpose: only mild ("suspicious")
erosions or sclerosis (grade 1), fat lesions, and bone marrow edema (which CT does not show).
A slice is labelled positive when a lesion that makes its study positive covers at least
:data:`MIN_LESION_MM2` of it (from the phantom's lesion masks, ``masks.npz``); a slice the lesion
only grazes (its soft edge, a few square millimetres that no reader would call) is *ambiguous*
and left out of training, neither positive nor negative. Every other slice is negative.

``train`` and ``evaluate`` read any folder ``sijnode phantom --kinds ct`` writes
(``SYNTH-NNNN/<NNN>_CT/*.dcm`` + ``ground_truth.json``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread

from pipeline.phantom.study import MASK_FILE, phantom_study_folders

DEFINITE_TYPES = ("erosion", "sclerosis", "ankylosis", "narrowing", "widening")
#: the least lesion area (mm²) on a slice for the slice to be labelled positive: an erosion of
#: 3-7 mm covers 10-35 mm² where it is cut through, its soft edge a few mm² on the next slice
MIN_LESION_MM2 = 10.0

# (grade one side, grade other side, extra non-structural lesion): relative frequency; half negative,
# most of those hard (grade 1, fat, edema), half positive, most of those unilateral.
CASE_MIX: dict[tuple[int, int, str | None], int] = {
    (0, 0, None): 2, (0, 0, "edema"): 2, (0, 0, "fat"): 2, (1, 0, None): 2, (1, 1, None): 2,  # negative: 10
    (2, 0, None): 3, (3, 0, None): 2, (2, 1, None): 2, (2, 2, None): 2, (4, 0, None): 1,  # positive: 10
}


def demo_spec(seed: int) -> dict:
    """The lesion SPEC of demonstration study ``seed``, drawn from :data:`CASE_MIX`, sides at random."""
    rng = np.random.default_rng([seed, 20240611])
    cases = list(CASE_MIX)
    weights = np.array([CASE_MIX[c] for c in cases], dtype=float)
    first, second, extra = cases[int(rng.choice(len(cases), p=weights / weights.sum()))]
    sides = ["left", "right"] if rng.random() < 0.5 else ["right", "left"]
    lesions = []
    if extra:
        quadrant = str(rng.choice(["upper_ilium", "lower_ilium", "upper_sacrum", "lower_sacrum"]))
        lesions.append({"type": extra, "side": sides[int(rng.integers(2))], "quadrant": quadrant})
    return {"lesions": lesions, "mny_grade": {sides[0]: first, sides[1]: second}}


def write_demo_phantoms(out: Path, seeds: Iterable[int], progress: Callable[[str], None] | None = None) -> list[Path]:
    """Write one CT-only phantom study per seed (SPEC from :func:`demo_spec`) below ``out``; resumable."""
    from pipeline.phantom import generate_study, write_study

    folders = []
    for seed in seeds:
        folder = Path(out) / f"SYNTH-{seed:04d}"
        if not (folder / "ground_truth.json").is_file():
            folder = write_study(generate_study(seed, kinds=("ct",), lesions=demo_spec(seed)), Path(out))
        folders.append(folder)
        if progress:
            progress(str(folder))
    return folders


def positive_lesion(lesion: dict) -> bool:
    """Whether a ground-truth lesion is a definite structural change (what makes a CT positive)."""
    return lesion["type"] in DEFINITE_TYPES and not (lesion["type"] in ("erosion", "sclerosis") and lesion["severity"] == "mild")


@dataclass(frozen=True)
class PhantomCT:
    """One study's CT series on disk, with its labels."""

    folder: Path
    files: tuple[Path, ...]
    positive: bool  # sacroiliitis on CT (module docstring)
    positive_slices: frozenset[str]  # SOP Instance UIDs of slices a positive lesion covers >= MIN_LESION_MM2 of
    ambiguous_slices: frozenset[str]  # slices a positive lesion only grazes (left out of training)
    positive_sides: tuple[str, ...]  # patient sides with a positive lesion
    patient_id: str
    seed: int
    hard_negative: bool  # negative with some lesion (mild structural, fat or edema)

    def datasets(self) -> list[Dataset]:
        return [dcmread(path) for path in self.files]


def read_study(folder: Path) -> PhantomCT | None:
    """A phantom study folder as a :class:`PhantomCT` (None when it has no CT series)."""
    truth = json.loads((folder / "ground_truth.json").read_text(encoding="utf-8"))
    series = next((s for s in truth["series"] if s["role"] == "CT"), None)
    if series is None:
        return None
    files = tuple(sorted((folder / series["folder"]).glob("*.dcm")))
    uids = series["sop_instance_uids"]
    grades = truth["mny_grade"]
    positive = max(grades.values()) >= 2
    lesions = [lesion for lesion in truth["lesions"] if positive_lesion(lesion)] if positive else []
    areas = _lesion_areas_mm2(folder, series, lesions)
    slices = frozenset(uids[i] for i, area in areas.items() if area >= MIN_LESION_MM2)
    ambiguous = frozenset(uids[i] for i, area in areas.items() if area < MIN_LESION_MM2)
    return PhantomCT(
        folder=folder,
        files=files,
        positive=positive,
        positive_slices=slices,
        ambiguous_slices=ambiguous,
        positive_sides=tuple(sorted({lesion["side"] for lesion in lesions})),
        patient_id=str(truth["patient_id"]),
        seed=int(truth["seed"]),
        hard_negative=not positive and bool(truth["lesions"]),
    )


def _lesion_areas_mm2(folder: Path, series: dict, lesions: list[dict]) -> dict[int, float]:
    """Per CT slice index that ``lesions`` are on (ground truth), the area they cover in mm².

    From the phantom's lesion masks (one bit per lesion); a study written without masks falls
    back to the ground truth's slice lists, every listed slice counting as covered."""
    listed = sorted({i for lesion in lesions for i in lesion.get("slices", {}).get("CT", [])})
    masks_file = folder / MASK_FILE
    if not listed or not masks_file.is_file():
        return {i: float("inf") for i in listed}
    with np.load(masks_file) as masks:
        bits = masks[f"{series['role']}_lesions"][listed]
    bitmask = sum(1 << int(lesion["mask_bit"]) for lesion in lesions)
    pixel_mm2 = float(np.prod(series["pixel_spacing"]))
    return {i: float(((plane & bitmask) > 0).sum()) * pixel_mm2 for i, plane in zip(listed, bits)}


def find_studies(data: Path) -> list[PhantomCT]:
    """Every phantom study with a CT series below ``data``, in folder order."""
    studies = [read_study(folder) for folder in phantom_study_folders(data)]
    found = [s for s in studies if s is not None]
    if not found:
        raise ValueError(f"no phantom CT studies below {data} (write some with: sijnode phantom --kinds ct --out {data})")
    return found
