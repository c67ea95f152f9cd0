"""Training and evaluation entry points, one per chain, behind ``sijnode train`` and ``sijnode evaluate``.

Each chain's module provides ``train(data, out, *, epochs, seed, progress) -> ModelPack`` and
``evaluate(pack, data, out) -> dict``; this registry finds it by chain name without importing
torch until a command needs it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from pipeline.packs import ModelPack, load_pack

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
