"""Simulated readers: 2 readers x 3 read sessions grading every joint quadrant, with known confusion.

Jamaludin et al. 2026 train from two expert readers who each read every study in three
blinded sessions, plus three consensus labellings derived from those six readings.  The
phantom has exact ground truth, so each simulated reading is the truth passed through a
known, reader-specific confusion: per lesion type a **miss rate** P(read 0 | truth 1) and
a **false-call rate** P(read 1 | truth 0).  Sessions of one reader share that reader's
confusion and differ only by their draws (as a blinded re-read would).

Graded outputs per joint (the paper's 14): edema, erosion and fat lesion ("fatty lesion",
fat metaplasia) in each of the four quadrants, sclerosis and ankylosis per joint.  Truth:
a quadrant output is 1 when a lesion of that type lies in the quadrant; sclerosis /
ankylosis is 1 when the joint has any lesion of that type.

Consensus labels (the paper's definitions): ``R1R2`` keeps a label only where both
readers agree in all three sessions; ``R1`` / ``R2`` keep it where that reader agrees with
themself in all three sessions; elsewhere the consensus label is ``None`` (not used).

The draws come from their own random stream (``rng_for(seed, "readers", ...)``), so adding
the readers changes no pixel, UID or other ground-truth key of a study.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .lesions import QUADRANTS, SIDES
from .seeding import rng_for

QUADRANT_LESIONS: tuple[str, ...] = ("edema", "erosion", "fat")
JOINT_LESIONS_GRADED: tuple[str, ...] = ("sclerosis", "ankylosis")
GRADED_OUTPUTS: tuple[str, ...] = tuple(
    f"{kind}_{quadrant}" for kind in QUADRANT_LESIONS for quadrant in QUADRANTS
) + JOINT_LESIONS_GRADED
"""The 14 outputs graded per joint, in the order every array in this module uses."""

READERS: tuple[str, ...] = ("R1", "R2")
SESSIONS: tuple[str, ...] = ("S1", "S2", "S3")
CONSENSUS_LABELS: tuple[str, ...] = ("R1R2", "R1", "R2")


@dataclass(frozen=True)
class ReaderConfusion:
    """One lesion type's confusion for one reader."""

    miss_rate: float  # P(read absent | truly present)
    false_call_rate: float  # P(read present | truly absent)

    def matrix(self) -> np.ndarray:
        """Column-stochastic 2x2 matrix ``M[read, truth]`` (classes: 0 absent, 1 present)."""
        return np.array(
            [[1.0 - self.false_call_rate, self.miss_rate], [self.false_call_rate, 1.0 - self.miss_rate]]
        )


# Chosen so that the readers differ by lesion type in both directions (R1 misses erosions
# and sclerosis more, R2 misses edema more and over-calls erosions and fat); ankylosis is
# the most reproducible grade, as in the paper's reader tables.
READER_CONFUSION: dict[str, dict[str, ReaderConfusion]] = {
    "R1": {
        "edema": ReaderConfusion(0.10, 0.05),
        "erosion": ReaderConfusion(0.30, 0.08),
        "fat": ReaderConfusion(0.15, 0.04),
        "sclerosis": ReaderConfusion(0.25, 0.06),
        "ankylosis": ReaderConfusion(0.05, 0.01),
    },
    "R2": {
        "edema": ReaderConfusion(0.30, 0.03),
        "erosion": ReaderConfusion(0.15, 0.15),
        "fat": ReaderConfusion(0.10, 0.12),
        "sclerosis": ReaderConfusion(0.10, 0.10),
        "ankylosis": ReaderConfusion(0.10, 0.02),
    },
}


def output_lesion_type(output: str) -> str:
    """The lesion type an output grades (``edema_upper_ilium`` -> ``edema``)."""
    return output.split("_", 1)[0]


def confusion_arrays(reader: str) -> tuple[np.ndarray, np.ndarray]:
    """Per graded output, the reader's miss and false-call rates (two arrays of 14)."""
    table = READER_CONFUSION[reader]
    miss = np.array([table[output_lesion_type(o)].miss_rate for o in GRADED_OUTPUTS])
    false_call = np.array([table[output_lesion_type(o)].false_call_rate for o in GRADED_OUTPUTS])
    return miss, false_call


def read_labels(truth: np.ndarray, reader: str, rng: np.random.Generator) -> np.ndarray:
    """One read session: ``truth`` (..., 14) of 0/1 passed through the reader's confusion."""
    truth = np.asarray(truth).astype(bool)
    if truth.shape[-1] != len(GRADED_OUTPUTS):
        raise ValueError(f"truth must end in {len(GRADED_OUTPUTS)} graded outputs, got shape {truth.shape}")
    miss, false_call = confusion_arrays(reader)
    draw = rng.random(truth.shape)
    flipped = np.where(truth, draw < miss, draw < false_call)
    return (truth ^ flipped).astype(np.int8)


def consensus(readings: Sequence[np.ndarray]) -> np.ndarray:
    """Labels where all ``readings`` agree; -1 where they do not (the label is not used)."""
    stack = np.stack([np.asarray(r, dtype=np.int8) for r in readings])
    agree = np.all(stack == stack[0], axis=0)
    return np.where(agree, stack[0], -1).astype(np.int8)


def simulate_readings(truth: np.ndarray, rngs: Mapping[tuple[str, str], np.random.Generator]) -> dict[str, np.ndarray]:
    """All nine label sets for ``truth`` (..., 14): ``R1S1`` ... ``R2S3`` and the consensus ``R1``, ``R2``, ``R1R2``.

    ``rngs`` maps (reader, session) to its random stream. Consensus arrays hold -1 where unused.
    """
    labels: dict[str, np.ndarray] = {}
    for reader in READERS:
        for session in SESSIONS:
            labels[reader + session] = read_labels(truth, reader, rngs[(reader, session)])
        labels[reader] = consensus([labels[reader + s] for s in SESSIONS])
    labels["R1R2"] = consensus([labels[r + s] for r in READERS for s in SESSIONS])
    return labels


def truth_per_joint(lesions: Iterable[Mapping]) -> np.ndarray:
    """Ground truth (2 sides x 14 outputs, sides in ``SIDES`` order) from the study's lesion records."""
    truth = np.zeros((len(SIDES), len(GRADED_OUTPUTS)), dtype=np.int8)
    index = {name: i for i, name in enumerate(GRADED_OUTPUTS)}
    for lesion in lesions:
        row = SIDES.index(lesion["side"])
        if lesion["type"] in JOINT_LESIONS_GRADED:
            truth[row, index[lesion["type"]]] = 1
        elif lesion["type"] in QUADRANT_LESIONS:
            for quadrant in lesion["quadrants"]:
                truth[row, index[f"{lesion['type']}_{quadrant}"]] = 1
    return truth


def readers_record(seed: int, lesions: Sequence[Mapping]) -> dict:
    """The ``readers`` entry of ``ground_truth.json``: confusion, truth, every reading and the consensus labels.

    Labels are ``{label_set: {side: {output: 0 | 1 | None}}}``; ``None`` marks a consensus label
    that is not used because the readings it summarises disagree.
    """
    truth = truth_per_joint(lesions)
    rngs = {(r, s): rng_for(seed, "readers", r, s) for r in READERS for s in SESSIONS}
    readings = simulate_readings(truth, rngs)

    def as_dict(array: np.ndarray) -> dict:
        return {
            side: {name: (None if v < 0 else int(v)) for name, v in zip(GRADED_OUTPUTS, array[row])}
            for row, side in enumerate(SIDES)
        }

    return {
        "outputs": list(GRADED_OUTPUTS),
        "confusion": {
            reader: {kind: {"miss_rate": c.miss_rate, "false_call_rate": c.false_call_rate} for kind, c in table.items()}
            for reader, table in READER_CONFUSION.items()
        },
        "truth": as_dict(truth),
        "labels": {name: as_dict(array) for name, array in readings.items()},
        "consensus_rule": "R1R2: both readers agree in all 3 sessions; R1/R2: the reader agrees with themself in all 3 sessions; else null",
    }
