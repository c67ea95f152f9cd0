"""Training and evaluation entry points, one per chain, behind ``sijnode train`` and ``sijnode evaluate``.

Each chain's module provides ``train(data, out, *, epochs, seed, progress) -> ModelPack`` and
``evaluate(pack, data, out) -> dict``; this registry finds it by chain name without importing
torch until a command needs it. The helpers every trainer shares (the patient-wise split, seed ranges, the
parameter count) live here too.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pipeline.packs import ModelPack, load_pack

if TYPE_CHECKING:
    from torch import nn

T = TypeVar("T")

TRAINERS = {
    "t2fs-mil": "pipeline.chains.t2fs_mil.train",
    "xr-anatomy": "pipeline.chains.xr_anatomy.train",
}


def _module(chain: str):  # noqa: ANN202 (a module)
    if chain not in TRAINERS:
        raise KeyError(f"no trainer for chain {chain!r}; known: {', '.join(sorted(TRAINERS))}")
    return importlib.import_module(TRAINERS[chain])


def train_chain(chain: str, data: Path, out: Path, *, epochs: int | None = None, seed: int = 0, progress: bool = True) -> ModelPack:
    """Train ``chain`` on phantom studies in ``data`` and write a pack to ``out``."""
    return _module(chain).train(Path(data), Path(out), epochs=epochs, seed=seed, progress=progress)


def evaluate_pack(pack_dir: Path, data: Path, out: Path | None = None) -> dict[str, Any]:
    """Evaluate a pack on held-out studies; writes the report (and ROC PNG) to ``out`` (default: the pack folder)."""
    pack = load_pack(pack_dir)
    pack.verify()
    return _module(pack.manifest.chain).evaluate(pack, Path(data), Path(out) if out else pack.folder)


def split_by_patient(
    items: Sequence[T],
    validation_fraction: float,
    seed: int,
    *,
    patient: Callable[[T], str],
    label: Callable[[T], bool],
) -> tuple[list[T], list[T]]:
    """Seeded patient-wise split into (training, validation), stratified by label; each keeps the items' order.

    All items of a patient go to the same side, so no patient is in both; a patient counts as
    positive when any of its items is. With two or more patients of a label, each side gets one.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    positive: dict[str, bool] = {}
    for item in items:
        key = patient(item)
        positive[key] = positive.get(key, False) or bool(label(item))
    rng = np.random.default_rng(seed)
    validation_ids: set[str] = set()
    for wanted in (False, True):
        ids = sorted(pid for pid, is_positive in positive.items() if is_positive == wanted)
        rng.shuffle(ids)
        take = round(validation_fraction * len(ids))
        if len(ids) >= 2:
            take = min(max(take, 1), len(ids) - 1)
        validation_ids.update(ids[:take])
    train = [item for item in items if patient(item) not in validation_ids]
    validation = [item for item in items if patient(item) in validation_ids]
    if not train or not validation:
        raise ValueError(f"{len(items)} studies cannot be split into training and validation; give more studies")
    return train, validation


def seed_ranges(seeds: Sequence[int]) -> str:
    """Phantom seeds as compact ranges, e.g. '0-119, 200-219'."""
    ordered = sorted(set(seeds))
    parts: list[str] = []
    start = previous = None
    for seed in ordered + [None]:
        if seed is not None and previous is not None and seed == previous + 1:
            previous = seed
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = seed
    return ", ".join(parts)


def count_parameters(module: nn.Module) -> int:
    """The number of weights in ``module`` (trainable or not)."""
    return sum(parameter.numel() for parameter in module.parameters())
