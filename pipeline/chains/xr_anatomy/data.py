"""Phantom radiographs for the demonstration pack: balanced lesion SPECs, and reading studies back.

``sijnode phantom --lesions random`` gives about one study in three with radiographic
sacroiliitis and few of the hard cases (grade 2 on one side only, grade 1 on both), so the
demonstration pack is trained on studies whose modified New York grades are drawn from
:data:`GRADE_MIX` instead (``write_demo_phantoms``). ``train`` and ``evaluate`` read any folder
``sijnode phantom`` writes (``SYNTH-NNNN/<NNN>_XR/0001.dcm`` + ``ground_truth.json`` + ``masks.npz``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread

from pipeline.evaluation import phantom_subgroups
from pipeline.phantom.study import GROUND_TRUTH_FILE, phantom_study_folders

# (grade of one side, grade of the other side): relative frequency. Half the weight is on studies
# without radiographic sacroiliitis (mNY: bilateral >= 2 or unilateral >= 3), including the
# near misses (2/0, 2/1, 1/1) that separate "some changes" from the criterion.
GRADE_MIX: dict[tuple[int, int], int] = {
    (0, 0): 3, (1, 0): 2, (1, 1): 2, (2, 0): 3, (2, 1): 3,  # negative: 13
    (2, 2): 4, (3, 0): 3, (3, 1): 2, (3, 2): 1, (4, 0): 1, (4, 2): 1, (3, 3): 1,  # positive: 13
}

#: segmentation classes, as the published network numbers them
BACKGROUND, SACRUM, LEFT_ILIUM, RIGHT_ILIUM = 0, 1, 2, 3


def demo_spec(seed: int) -> dict:
    """The lesion SPEC of demonstration study ``seed``: mNY grades drawn from GRADE_MIX, sides at random."""
    rng = np.random.default_rng([seed, 20240514])
    pairs = list(GRADE_MIX)
    weights = np.array([GRADE_MIX[p] for p in pairs], dtype=float)
    first, second = pairs[int(rng.choice(len(pairs), p=weights / weights.sum()))]
    if rng.random() < 0.5:
        first, second = second, first
    return {"lesions": [], "mny_grade": {"left": first, "right": second}}


def write_demo_phantoms(out: Path, seeds: Iterable[int], progress: Callable[[str], None] | None = None) -> list[Path]:
    """Write one radiograph-only phantom study per seed (SPEC from :func:`demo_spec`) below ``out``."""
    from pipeline.phantom import generate_study, write_study

    folders = []
    for seed in seeds:
        folder = Path(out) / f"SYNTH-{seed:04d}"
        if not (folder / "ground_truth.json").is_file():  # resumable: studies already written are kept
            folder = write_study(generate_study(seed, kinds=("xr",), lesions=demo_spec(seed)), Path(out))
        folders.append(folder)
        if progress:
            progress(str(folder))
    return folders


@dataclass(frozen=True)
class PhantomRadiograph:
    """One study's radiograph on disk, with its ground-truth label."""

    folder: Path
    image: Path  # the radiograph's DICOM file
    positive: bool  # radiographic sacroiliitis (mNY criterion)
    grades: tuple[int, int]  # mNY grade (left, right)
    patient_id: str  # the phantom's PatientID: a training split keeps a patient's studies together
    seed: int  # the phantom's generator seed
    subgroups: tuple[str, ...] = ()  # case-mix subgroups (pipeline.evaluation.phantom_subgroups)

    def dataset(self) -> Dataset:
        return dcmread(self.image)

    def anatomy_labels(self) -> np.ndarray:
        """Ground-truth class map on the radiograph grid (uint8: 0 background, 1 sacrum, 2 left, 3 right ilium).

        The masks are projections, so sacrum and ilium overlap where the joint is seen; the
        sacrum wins there. The ilium label then ends at the sacrum's lateral edge, and the
        published joint-region rule (sacrum dilated by 5 % of its width, intersected with the
        ilium) marks a strip just lateral to each joint, so the box around both strips holds
        both joints whole.
        """
        with np.load(self.folder / "masks.npz") as masks:
            labels = np.zeros(masks["XR_sacrum"].shape, dtype=np.uint8)
            labels[masks["XR_right_ilium"]] = RIGHT_ILIUM
            labels[masks["XR_left_ilium"]] = LEFT_ILIUM
            labels[masks["XR_sacrum"]] = SACRUM
        return labels

    def lesion_mask(self) -> np.ndarray:
        """Where the radiograph shows a lesion (bool, radiograph grid): the mask bits of the
        ground-truth lesions visible on XR (erosion, sclerosis, ankylosis, narrowing, widening)."""
        truth = json.loads((self.folder / "ground_truth.json").read_text())
        bits = [lesion["mask_bit"] for lesion in truth["lesions"] if "XR" in lesion.get("visible_on", [])]
        with np.load(self.folder / "masks.npz") as masks:
            field = masks["XR_lesions"]
        wanted = np.uint16(sum(1 << bit for bit in bits))
        return (field & wanted) > 0

    def joint_masks(self) -> dict[str, np.ndarray]:
        """The ground-truth joint masks ('left', 'right': the patient's sides)."""
        with np.load(self.folder / "masks.npz") as masks:
            return {"left": masks["XR_left_joint"], "right": masks["XR_right_joint"]}


def find_radiographs(data: Path) -> list[PhantomRadiograph]:
    """Every study below ``data`` with a radiograph and ground truth, in folder order."""
    found = []
    truth_paths = [folder / GROUND_TRUTH_FILE for folder in phantom_study_folders(data)]
    for truth_path in truth_paths:
        truth = json.loads(truth_path.read_text())
        series = next((s for s in truth.get("series", []) if s.get("role") == "XR"), None)
        if series is None:
            continue
        images = sorted((truth_path.parent / series["folder"]).glob("*.dcm"))
        if not images:
            continue
        grades = truth["labels"]["mny_grade"]
        found.append(
            PhantomRadiograph(
                folder=truth_path.parent,
                image=images[0],
                positive=bool(truth["labels"]["radiographic_sacroiliitis"]),
                grades=(int(grades["left"]), int(grades["right"])),
                patient_id=str(truth["patient_id"]),
                seed=int(truth["seed"]),
                subgroups=phantom_subgroups(truth),
            )
        )
    if not found:
        raise FileNotFoundError(f"no phantom radiographs (ground_truth.json with an XR series) below {data}")
    return found
