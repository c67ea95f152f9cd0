"""The shared training harness, and the entry points behind ``sijnode train`` and ``sijnode evaluate``.

Each chain's ``train`` module provides ``train(data, out, *, epochs, seed, progress) -> ModelPack``
and ``evaluate(pack, data, out) -> dict``; :data:`TRAINERS` finds it by chain name without
importing torch until a command needs it.

A chain supplies only what is its own (how phantoms become tensors and labels, the loss, one
epoch's steps); the loop is here, the same for every chain:

- :func:`seed_everything`, :func:`split_by_patient` (seeded, patient-wise, stratified);
- :func:`progress_display` (rich) and :func:`fit`: epochs, validation after each, best-epoch
  selection (or the last epoch), early stopping, the best weights restored;
- :func:`write_training_report`: ``training.json`` in one schema (recipe, split, each phase's
  history and selected epoch, threads, seconds);
- :func:`seed_ranges` and :func:`count_parameters` for manifests;
- :func:`augment_slices`: a chain's MONAI augmentation applied to a stack of slices.

The evaluation report (one schema for every chain) is :mod:`pipeline.evaluation`.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pipeline.packs import ModelPack, PackError, load_pack

if TYPE_CHECKING:
    import torch
    from rich.progress import Progress
    from torch import nn

T = TypeVar("T")

TRAINERS = {
    "t2fs-mil": "pipeline.chains.t2fs_mil.train",
    "xr-anatomy": "pipeline.chains.xr_anatomy.train",
    "ct-slices": "pipeline.chains.ct_slices.train",
    "t1stir-3d": "pipeline.chains.t1stir_3d.train",
    "t1stir-quadrants": "pipeline.chains.t1stir_quadrants.train",
}


def _module(chain: str):  # noqa: ANN202 (a module)
    if chain not in TRAINERS:
        raise KeyError(f"no trainer for chain {chain!r}; known: {', '.join(sorted(TRAINERS))}")
    return importlib.import_module(TRAINERS[chain])


def demo_intended_use(chain: str) -> str:
    """The intended-use statement of a demonstration pack trained on phantoms (its manifest)."""
    return (
        f"Demonstration only: shows the {chain} chain end to end on synthetic phantom studies. "
        "Trained on phantoms, never on patients; not a medical device; not for diagnosis or any clinical decision."
    )


class TrainingUsageError(ValueError):
    """A training or evaluation request the chain cannot serve (the CLI exits 2 with it)."""


def train_chain(
    chain: str,
    data: Path,
    out: Path,
    *,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = True,
    cache: Path | None = None,
    base: Path | None = None,
    retrain: Sequence[str] | None = None,
) -> ModelPack:
    """Train ``chain`` on phantom studies in ``data`` and write a pack to ``out``; ``cache``: a folder
    for the chain's preprocessed studies, for chains whose ``train`` takes one.  ``base``: a pack of the
    chain to start from, and ``retrain`` which of its parts to train again (the rest is kept), for
    chains whose ``train`` takes a base pack (t1stir-3d: outputs; t1stir-quadrants: phases)."""
    train = _module(chain).train
    extra = {**_cache_argument(train, chain, cache), **_base_arguments(train, chain, base, retrain)}
    return train(Path(data), Path(out), epochs=epochs, seed=seed, progress=progress, **extra)


#: per chain trainer, the name of its argument that says which parts of a base pack to train again
RETRAIN_ARGUMENTS = ("tasks", "phases")


def _base_arguments(function: Any, chain: str, base: Path | None, retrain: Sequence[str] | None) -> dict[str, Any]:
    """``base=`` (the loaded pack) and the chain's own "what to train again" argument; clear errors where the chain
    or the combination does not allow them."""
    if base is None:
        if retrain:
            raise TrainingUsageError("--retrain needs --base: the pack whose other parts are kept")
        return {}
    parameters = inspect.signature(function).parameters
    if "base" not in parameters:
        raise TrainingUsageError(f"chain {chain} does not train from a base pack: leave out --base")
    try:
        pack = load_pack(base, chain)
    except PackError as error:
        raise TrainingUsageError(str(error)) from None
    if not retrain:
        return {"base": pack}
    names = [p for p in RETRAIN_ARGUMENTS if p in parameters]
    if not names:
        raise TrainingUsageError(f"chain {chain} trains from a base pack only as a whole: leave out --retrain")
    (name,) = names
    known = getattr(_module(chain), name.upper())  # the trainer's module lists them: TASKS, PHASES
    unknown = sorted(set(retrain) - set(known))
    if unknown:
        raise TrainingUsageError(f"chain {chain} has no part {', '.join(unknown)} to train again: choose from {', '.join(known)}")
    return {"base": pack, name: list(retrain)}


def evaluate_pack(pack_dir: Path, data: Path, out: Path | None = None, cache: Path | None = None) -> dict[str, Any]:
    """Evaluate a pack on held-out studies; writes the report (and ROC PNG) to ``out`` (default: the pack folder).
    ``cache`` as for :func:`train_chain`."""
    pack = load_pack(pack_dir)
    pack.verify()
    evaluate = _module(pack.manifest.chain).evaluate
    return evaluate(pack, Path(data), Path(out) if out else pack.folder, **_cache_argument(evaluate, pack.manifest.chain, cache))


def _cache_argument(function: Any, chain: str, cache: Path | None) -> dict[str, Path]:
    """``{"cache": cache}`` for a chain function that takes a preprocessing cache; a clear error
    for one that does not, rather than a TypeError."""
    if cache is None:
        return {}
    if "cache" not in inspect.signature(function).parameters:
        raise TrainingUsageError(f"chain {chain} keeps no preprocessing cache: leave out --cache")
    return {"cache": Path(cache)}


def check_evaluation(pack_dir: Path, data: Path, tolerance: float | None = None) -> list[str]:
    """Regenerate the pack's committed evaluation on the studies in ``data`` (all of the held-out
    set, or a few of it) and compare: each study's probability per output to ``tolerance``
    (default :data:`pipeline.evaluation.CHECK_TOLERANCE`) and decision, and the metrics when the
    whole set was given. Returns the differences; none means the numbers were reproduced.
    Behind ``sijnode evaluate PACK --data DIR --check``; the pack folder is left untouched."""
    import tempfile

    from pipeline.evaluation import CHECK_TOLERANCE, EVALUATION_JSON, compare_reports

    committed_path = Path(pack_dir) / EVALUATION_JSON
    if not committed_path.is_file():
        return [f"{committed_path}: no committed evaluation to check against"]
    committed = json.loads(committed_path.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="sijnode-check-") as folder:
        evaluate_pack(Path(pack_dir), Path(data), Path(folder))
        regenerated = json.loads((Path(folder) / EVALUATION_JSON).read_text(encoding="utf-8"))
    return compare_reports(committed, regenerated, CHECK_TOLERANCE if tolerance is None else tolerance, subset=True)


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


# ------------------------------------------------------------------------ the shared training loop
#: the file every trainer writes beside its pack: recipe, split, per-phase history, selected epochs
TRAINING_REPORT = "training.json"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (a trainer's own generators are seeded from ``seed`` too)."""
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress_display(enabled: bool = True) -> Progress:
    """The rich progress display every trainer uses (one bar per phase; ``enabled=False`` shows nothing)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    return RichProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


@dataclass
class FitResult:
    """What :func:`fit` did: one history row per epoch (epoch 0: before training, when validated),
    the epoch whose weights the model holds afterwards, and whether early stopping ended it."""

    phase: str
    monitor: str
    mode: str
    selection: str
    history: list[dict[str, Any]] = field(default_factory=list)
    selected_epoch: int = 0
    selected_value: float = float("nan")
    stopped_early: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "selection": self.selection,
            "selected_epoch": self.selected_epoch,
            "selected_value": _json_float(self.selected_value),
            "stopped_early": self.stopped_early,
            "history": self.history,
        }


def _json_float(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 6)


def _snapshot(module: nn.Module) -> dict[str, Any]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def fit(
    model: nn.Module,
    epochs: int,
    train_epoch: Callable[[int], Mapping[str, float]],
    validate: Callable[[], Mapping[str, float]],
    *,
    phase: str = "training",
    monitor: str = "validation_loss",
    mode: str = "min",
    selection: str = "best",
    patience: int | None = None,
    validate_before: bool = False,
    progress: Progress | None = None,
) -> FitResult:
    """Run ``epochs`` epochs of ``train_epoch(epoch)`` (1-based; returns its numbers, e.g. the mean
    loss), each followed by ``validate()`` (returns numbers including ``monitor``).

    ``selection="best"`` keeps the weights of the epoch with the best ``monitor`` (``mode`` "min"
    or "max"; with ``validate_before`` the untrained state, epoch 0, competes too) and restores
    them at the end; ``"last"`` keeps the last epoch. ``patience``: stop after that many epochs
    without improvement. The chain supplies only the two callables: data, tensors, loss.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if selection not in ("best", "last"):
        raise ValueError(f"selection must be 'best' or 'last', got {selection!r}")
    if epochs < 0:
        raise ValueError(f"epochs must not be negative, got {epochs}")
    result = FitResult(phase=phase, monitor=monitor, mode=mode, selection=selection)
    sign = 1.0 if mode == "min" else -1.0
    best_value, best_state, since_best = float("inf"), None, 0

    def consider(epoch: int, numbers: Mapping[str, float]) -> None:
        nonlocal best_value, best_state, since_best
        value = float(numbers[monitor])
        if np.isfinite(value) and sign * value < best_value:
            best_value, since_best = sign * value, 0
            result.selected_epoch, result.selected_value = epoch, value
            if selection == "best":
                best_state = _snapshot(model)
        else:
            since_best += 1

    if validate_before:
        numbers = {"epoch": 0, **_rounded(validate())}
        result.history.append(numbers)
        consider(0, numbers)
    task = progress.add_task(phase, total=epochs, status="") if progress is not None else None
    for epoch in range(1, epochs + 1):
        model.train()
        trained = train_epoch(epoch)
        model.eval()
        numbers = {"epoch": epoch, **_rounded(trained), **_rounded(validate())}
        result.history.append(numbers)
        consider(epoch, numbers)
        if progress is not None and task is not None:
            status = " · ".join(f"{k} {v:.3f}" for k, v in numbers.items() if k != "epoch" and isinstance(v, float))
            progress.update(task, advance=1, status=status)
        if patience is not None and since_best >= patience:
            result.stopped_early = epoch < epochs
            break
    if selection == "last":
        last = result.history[-1] if result.history else {}
        result.selected_epoch = int(last.get("epoch", 0))
        result.selected_value = float(last.get(monitor, float("nan")))
    elif best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


def augment_slices(transform: Any, slices: torch.Tensor, *, per_slice: bool) -> torch.Tensor:
    """``slices`` (slices, channels, H, W) through a seeded MONAI transform on channel-first 2-D arrays: each slice
    with its own draw (``per_slice``), or all with one (the slices and channels ride in MONAI's channel dimension,
    so one spatial transform moves every slice of an acquisition alike)."""
    import torch
    from monai.data import MetaTensor

    def run(stack: torch.Tensor) -> torch.Tensor:
        shape = stack.shape
        out = transform(stack.reshape(-1, *shape[-2:]))
        out = out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)
        return out.reshape(shape).to(torch.float32)

    slices = slices.float()
    return torch.stack([run(s) for s in slices]) if per_slice else run(slices)


def optimizer_step(optimizer: Any, loss: Any, schedule: Any = None) -> float:
    """One gradient step on ``loss`` (and one ``schedule`` step, if given); returns the loss as a float."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if schedule is not None:
        schedule.step()
    return float(loss.item())


def _rounded(numbers: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (round(float(v), 6) if isinstance(v, (float, np.floating)) else v) for k, v in numbers.items()}


def write_training_report(
    out: Path,
    *,
    chain: str,
    seed: int,
    seconds: float,
    parameters: int,
    phases: Sequence[FitResult],
    split: Mapping[str, Sequence[str]],
    recipe: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``training.json`` (one schema for every chain) into the pack folder ``out``.

    ``split``: the studies on each side ("training", "validation"); ``recipe``: every setting
    that made the pack; ``extra``: what only this chain records (e.g. a warm-up's loss trace).
    """
    import torch

    report = {
        "schema": "sijnode-training/1",
        "chain": chain,
        "seed": seed,
        "seconds": round(float(seconds), 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "parameters": parameters,
        "recipe": dict(recipe),
        "split": {side: list(studies) for side, studies in split.items()},
        "phases": {phase.phase: phase.as_dict() for phase in phases},
        **dict(extra or {}),
    }
    path = Path(out) / TRAINING_REPORT
    path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
