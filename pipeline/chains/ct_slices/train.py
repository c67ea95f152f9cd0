"""Training and evaluation of ct-slices packs on phantom CT studies (``sijnode train`` / ``sijnode evaluate``).

Only what is this chain's own lives here; the loop, the split, progress and the reports are the
shared harness (:mod:`pipeline.training`, :mod:`pipeline.evaluation`).

Data: every phantom study in ``--data`` (``sijnode phantom --kinds ct`` or
:func:`.data.write_demo_phantoms`), split patient-wise and stratified into training and
validation. Each study goes through the chain's own preprocessing (:func:`.preprocess.read_volume`:
the joint slices, the crop, the bone window), so the networks learn on what the node will feed
them. Slice labels come from the phantom's lesion masks (:mod:`.data`). Validation studies are
scored on the slices the node analyses (at most ``max_slices``, evenly spaced); training uses
every joint slice a positive lesion covers (more positive examples than the evenly spaced ones)
and per study ``negatives_per_study`` of its other joint slices at random; slices a lesion only
grazes are left out.

Each selected network is trained on its own (the paper trained them separately), from scratch
(no ImageNet weights can be downloaded here), on slice batches with cross-entropy weighted by the
class ratio, AdamW with a cosine learning-rate decay, and the paper's augmentations as far as they
apply to a CT slice: vertical flip, random brightness and contrast, random RGB shift
(per-channel offsets), random crop (a shift of up to 6 % of the side); and a left-right flip
(the finding has no side). Random fog and rotation are left out (fog is a photographic artefact;
the crop already follows the joints). The intensity augmentations are small on purpose
(:class:`Recipe`): CT values are calibrated Hounsfield units, and on the phantom a mild erosion
or sclerosis (a hard negative) differs from a moderate one (positive) by 45-170 HU, 0.03-0.09
of the bone window, which the paper's photographic brightness/contrast jitter (about ±0.15 of
the normalised range, ±60 HU) would wash out. After each epoch the study probability of every
validation study is computed by the chain's slice → study rule; the epoch with the lowest
study-level validation loss is kept; then the rule's ``top_k`` is chosen among
``Recipe.aggregation_choices`` by the same validation loss (written to the manifest).
Training runs on one thread (``torch.set_num_threads(1)``): the demo
pack is built on a shared machine, where one thread was measured an order of magnitude faster
per image than two.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.evaluation import (
    CaseResult,
    OutputSpec,
    auc,
    evaluation_report,
    manifest_summary,
    pack_identity,
    phantom_subgroups,
    write_evaluation,
)
from pipeline.packs import HELD_OUT, ModelPack, update_evaluation, write_pack
from pipeline.training import (
    count_parameters,
    fit,
    optimizer_step,
    progress_display,
    seed_everything,
    seed_ranges,
    split_by_patient,
    write_training_report,
)

from .data import MIN_LESION_MM2, PhantomCT, find_studies
from .inference import OUTPUT, CTSlicesModel, aggregation_rule, manifest_specs, study_probability
from .model import INCEPTION, NETWORKS, RESNEXT, build_network
from .preprocess import PUBLISHED_PREPROCESSING, Settings, network_input, read_volume, windowed

CHAIN = "ct-slices"
PACK_VERSION = "1.0.0"
THRESHOLD = 0.5
DEFAULT_EPOCHS = 16
TOP_K = 1

#: the demonstration networks: narrow and shallow (declared in the manifest); widths in pixels
#: (the height follows the crop: 160 x 112 mm → 128 x 90 px, 1.25 mm a pixel)
DEMO_NETWORKS: dict[str, dict[str, Any]] = {
    RESNEXT: {"input_size": 128, "width": 0.25, "depths": [1, 1, 1, 1], "groups": 8, "width_per_group": 8},
    INCEPTION: {"input_size": 139, "width": 0.25, "depths": [1, 1, 1]},
}
#: the demonstration pack (and ``sijnode train ct-slices``): ResNeXt alone (README: Inception at
#: this size stayed at chance and cost most of the time)
DEMO_HYPERPARAMETERS: dict[str, Any] = {"model": RESNEXT, "networks": {RESNEXT: DEMO_NETWORKS[RESNEXT]}, "aggregation": {"top_k": TOP_K}}
#: both demonstration networks, averaged (the manifest's ``model: average``)
DEMO_AVERAGE_HYPERPARAMETERS: dict[str, Any] = {"model": "average", "networks": DEMO_NETWORKS, "aggregation": {"top_k": TOP_K}}
#: the demonstration pack's preprocessing: the published recipe with a flat 160 x 112 mm crop
#: around the joints and at most 32 slices
DEMO_PREPROCESSING: dict[str, Any] = {**PUBLISHED_PREPROCESSING, "crop_mm": 160.0, "crop_height_mm": 112.0, "max_slices": 32}

#: how the demonstration networks differ from the published ones (for the manifest's architecture name)
_DEMO_NETWORK_NAMES = {
    RESNEXT: "ResNeXt 32x4d layout at quarter width, one block per stage, 8 groups of 8, on {shape} "
    "(published ResNeXt-50 32x4d, blocks 3/4/6/3, on 224 px)",
    INCEPTION: "Inception-v4 at quarter width with one Inception-A/B/C each on {shape} (published 4/7/3 on 299 px)",
}


def architecture_name(hyperparameters: Mapping[str, Any], preprocessing: Mapping[str, Any] = DEMO_PREPROCESSING) -> str:
    """The manifest's architecture name for the demonstration networks that ``model`` selects, with their input sizes."""
    settings = Settings.from_manifest(preprocessing)

    def named(name: str) -> str:
        rows, columns = settings.input_shape(int(hyperparameters["networks"][name]["input_size"]))
        return _DEMO_NETWORK_NAMES[name].format(shape=f"{columns} x {rows} px")

    selection = hyperparameters["model"]
    if selection == "average":
        return f"Fu et al. 2024 networks at demonstration size, averaged: {named(RESNEXT)} and {named(INCEPTION)}"
    return f"Fu et al. 2024 {selection} alone at demonstration size: {named(selection)}"


INTENDED_USE = (
    "Demonstration and testing of the ct-slices chain only. Trained on synthetic phantoms: its outputs on "
    "real CT mean nothing. Not for diagnosis."
)


@dataclass(frozen=True)
class Recipe:
    """Training settings (recorded in training.json)."""

    validation_fraction: float = 0.25
    batch_size: int = 16
    learning_rate: float = 2e-3  # peak; cosine decay to 0 over the epochs
    weight_decay: float = 1e-4
    max_shift: float = 0.06  # random crop: shift of up to this fraction of the side
    contrast: float = 0.03  # random contrast: a factor in 1 ± this (the paper's photographic jitter is ~0.15)
    brightness: float = 0.03  # random brightness: an offset of ± this in normalised units (~12 HU)
    rgb_shift: float = 0.02  # per-channel offsets of ± this
    horizontal_flip: bool = True  # left-right flip: the finding has no side
    negatives_per_study: int = 8  # negative slices per training study (all positive slices are kept)
    aggregation_choices: tuple[int, ...] = (1, 2, 3)  # top_k candidates, chosen by validation loss
    threads: int = 1


@dataclass
class StudyTensors:
    """One study as the networks see it: per network its slice batch, and the slice labels."""

    study: PhantomCT
    inputs: dict[str, torch.Tensor]
    slice_labels: np.ndarray  # 1 where a positive lesion covers the slice, -1 where it only grazes it, else 0


def slice_label(study: PhantomCT, uid: str) -> int:
    return 1 if uid in study.positive_slices else -1 if uid in study.ambiguous_slices else 0


def prepare(study: PhantomCT, settings: Settings, sizes: Mapping[str, int], negatives: int, seed: int) -> dict[str, StudyTensors] | None:
    """The study through the chain's preprocessing, read once (None when its joints are not found).

    ``"validation"``: the slices the node analyses. ``"training"``: every joint slice a positive
    lesion covers and ``negatives`` of the other joint slices drawn at random (by ``seed`` and the
    study's own seed, so that a study's draw does not depend on the others), the ambiguous ones
    left out, in the same crop."""
    volume = read_volume(study.datasets(), settings)
    if not volume.selected or volume.box is None:
        return None
    pool = np.asarray(volume.joints.indices)
    labels = np.asarray([slice_label(study, volume.datasets[i].SOPInstanceUID) for i in pool])
    chosen = pool[_training_slices(labels, negatives, np.random.default_rng([seed, study.seed]))]
    out = {}
    for side, indices in (("validation", np.asarray(volume.selected)), ("training", chosen)):
        crops = np.stack([windowed(volume.hu[i], volume.box, settings) for i in indices])
        side_labels = np.asarray([slice_label(study, volume.datasets[i].SOPInstanceUID) for i in indices], dtype=np.int64)
        out[side] = StudyTensors(study, {name: network_input(crops, size, name, settings) for name, size in sizes.items()}, side_labels)
    return out


def prepare_cached(
    study: PhantomCT, settings: Settings, sizes: Mapping[str, int], negatives: int, seed: int, cache: Path | None
) -> dict[str, StudyTensors] | None:
    """:func:`prepare`, kept in ``cache`` (a folder) under a key of everything it depends on, so
    that reruns on a shared CPU skip reading and preprocessing the series (None: no cache)."""
    if cache is None:
        return prepare(study, settings, sizes, negatives, seed)
    import hashlib
    import json

    key = json.dumps([str(study.folder.resolve()), study.seed, settings.__dict__, dict(sizes), negatives, seed], sort_keys=True, default=str)
    path = Path(cache) / f"{study.folder.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return None if saved is None else {side: StudyTensors(study, v["inputs"], v["labels"].numpy()) for side, v in saved.items()}
    tensors = prepare(study, settings, sizes, negatives, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = None if tensors is None else {side: {"inputs": t.inputs, "labels": torch.as_tensor(t.slice_labels)} for side, t in tensors.items()}
    torch.save(saved, path)
    return tensors


def augment(batch: torch.Tensor, rng: np.random.Generator, recipe: Recipe) -> torch.Tensor:
    """The paper's augmentations on normalised 3-channel slices (module docstring)."""
    out = batch.clone()
    n, _, height, width = out.shape
    for i in range(n):
        if rng.random() < 0.5:
            out[i] = torch.flip(out[i], dims=[1])  # vertical flip
        if recipe.horizontal_flip and rng.random() < 0.5:
            out[i] = torch.flip(out[i], dims=[2])  # left-right flip
        contrast = float(rng.uniform(1 - recipe.contrast, 1 + recipe.contrast))
        out[i] = out[i] * contrast + float(rng.uniform(-recipe.brightness, recipe.brightness))  # contrast, brightness
        out[i] += torch.as_tensor(rng.uniform(-recipe.rgb_shift, recipe.rgb_shift, size=(3, 1, 1)), dtype=out.dtype)  # RGB shift
        limit = int(recipe.max_shift * min(height, width))
        dy, dx = (int(v) for v in rng.integers(-limit, limit + 1, size=2))
        out[i] = torch.roll(out[i], shifts=(dy, dx), dims=(1, 2))  # random crop (shift)
    return out


def _training_slices(labels: np.ndarray, negatives: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a study's slices to train on: all positive slices, at most ``negatives`` negative
    ones (label 0; the ambiguous, -1, are left out)."""
    positive = np.flatnonzero(labels == 1)
    negative = np.flatnonzero(labels == 0)
    chosen = rng.choice(negative, size=min(negatives, negative.size), replace=False) if negative.size else negative
    return np.sort(np.concatenate([positive, chosen])).astype(np.int64)


@torch.no_grad()
def slice_probabilities(network: nn.Module, studies: Sequence[StudyTensors], name: str) -> list[np.ndarray]:
    network.eval()
    return [torch.softmax(network(s.inputs[name]), 1)[:, 1].numpy() for s in studies]


def study_probabilities(network: nn.Module, studies: Sequence[StudyTensors], name: str, top_k: int = TOP_K) -> np.ndarray:
    return np.asarray([study_probability(p, top_k) for p in slice_probabilities(network, studies, name)])


def choose_top_k(per_network: Mapping[str, list[np.ndarray]], labels: np.ndarray, choices: Sequence[int]) -> tuple[int, dict[str, dict[str, float]]]:
    """The slice → study rule's ``k`` with the lowest study-level validation loss (networks averaged per slice), and every candidate's numbers."""
    slices = [np.mean(np.stack(per_study), axis=0) for per_study in zip(*per_network.values())]
    numbers = {}
    for k in choices:
        probabilities = np.asarray([study_probability(p, k) for p in slices])
        numbers[str(k)] = {"validation_loss": round(_study_loss(probabilities, labels), 4), "validation_auc": round(auc(labels, probabilities), 4)}
    best = min(choices, key=lambda k: numbers[str(k)]["validation_loss"])
    return int(best), numbers


def _study_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(probabilities, 1e-6, 1 - 1e-6)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def train_network(
    name: str, network: nn.Module, training: Sequence[StudyTensors], validation: Sequence[StudyTensors],
    epochs: int, recipe: Recipe, rng: np.random.Generator, bar: Any, top_k: int = TOP_K,
) -> Any:
    """Train one network on slice labels; keep the epoch with the lowest study-level validation loss.

    The training studies hold the slices :func:`prepare` chose for training (every positive one
    and ``recipe.negatives_per_study`` others: the CPU budget of a shared machine; the hard
    negatives are whole studies, all of whose slices are negative)."""
    images = torch.cat([s.inputs[name] for s in training])
    labels = torch.as_tensor(np.concatenate([s.slice_labels for s in training]))
    positives = max(int(labels.sum()), 1)
    weights = torch.tensor([1.0, (len(labels) - positives) / positives], dtype=torch.float32)
    loss_function = nn.CrossEntropyLoss(weight=weights)
    optimizer = torch.optim.AdamW(network.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    study_labels = np.asarray([s.study.positive for s in validation], dtype=float)

    def train_epoch(epoch: int) -> dict[str, float]:
        order = torch.as_tensor(rng.permutation(len(labels)))
        losses = [
            optimizer_step(optimizer, loss_function(network(augment(images[index], rng, recipe)), labels[index]))
            for index in order.split(recipe.batch_size)
            if len(index) > 1  # batch norm needs two samples
        ]
        schedule.step()
        return {"train_loss": float(np.mean(losses))}

    def validate() -> dict[str, float]:
        probabilities = study_probabilities(network, validation, name, top_k)
        return {"validation_loss": _study_loss(probabilities, study_labels), "validation_auc": auc(study_labels, probabilities)}

    return fit(network, epochs, train_epoch, validate, phase=name, progress=bar)


def train(
    data: Path, out: Path, *, epochs: int | None = None, seed: int = 0, progress: bool = True,
    hyperparameters: Mapping[str, Any] | None = None, preprocessing: Mapping[str, Any] | None = None, recipe: Recipe | None = None,
    cache: Path | None = None,
) -> ModelPack:
    """Train on the phantom studies in ``data``; write the pack (weights, manifest, training.json) to ``out``.

    ``cache``: a folder keeping each study's preprocessed slices between runs (:func:`prepare_cached`)."""
    started = time.perf_counter()
    recipe = recipe or Recipe()
    epochs = DEFAULT_EPOCHS if epochs is None else int(epochs)
    hyper = copy.deepcopy(dict(hyperparameters or DEMO_HYPERPARAMETERS))
    initial_k = int(hyper.get("aggregation", {}).get("top_k", TOP_K))
    preprocessing = dict(preprocessing or DEMO_PREPROCESSING)
    specs = manifest_specs(hyper, "training")
    settings = Settings.from_manifest(preprocessing)
    torch.set_num_threads(recipe.threads)
    seed_everything(seed)
    studies = find_studies(data)
    training_studies, validation_studies = split_by_patient(
        studies, recipe.validation_fraction, seed, patient=lambda s: s.patient_id, label=lambda s: s.positive
    )
    rng = np.random.default_rng(seed)
    sizes = {name: spec.input_size for name, spec in specs.items()}
    with progress_display(progress) as bar:
        prepared: dict[str, list[StudyTensors]] = {"training": [], "validation": []}
        skipped: list[str] = []
        for side, members in (("training", training_studies), ("validation", validation_studies)):
            task = bar.add_task(f"preparing {side} studies", total=len(members), status="")
            for study in members:
                tensors = prepare_cached(study, settings, sizes, recipe.negatives_per_study, seed, cache)
                if tensors is None:
                    skipped.append(study.folder.name)
                else:
                    prepared[side].append(tensors[side])
                bar.update(task, advance=1)
        networks = {name: build_network(spec) for name, spec in specs.items()}
        phases = [
            train_network(name, networks[name], prepared["training"], prepared["validation"], epochs, recipe, rng, bar, initial_k)
            for name in networks
        ]
    validation_labels = np.asarray([s.study.positive for s in prepared["validation"]], dtype=float)
    validation_slices = {name: slice_probabilities(networks[name], prepared["validation"], name) for name in networks}
    top_k, aggregation_numbers = choose_top_k(validation_slices, validation_labels, recipe.aggregation_choices or (initial_k,))
    hyper["aggregation"] = {"top_k": top_k}
    per_network = {name: np.asarray([study_probability(p, top_k) for p in values]) for name, values in validation_slices.items()}
    combined = np.asarray([study_probability(np.mean(np.stack(p), axis=0), top_k) for p in zip(*validation_slices.values())])
    state = {f"{name}.{key}": value for name, network in networks.items() for key, value in network.state_dict().items()}
    parameters = {name: count_parameters(network) for name, network in networks.items()}
    slices = sum(len(s.slice_labels) for s in prepared["training"])  # the joint slices trained on (prepare)
    positive_slices = sum(int((s.slice_labels == 1).sum()) for s in prepared["training"])
    train_pos = sum(s.positive for s in training_studies)
    hard = sum(s.hard_negative for s in studies)
    manifest = {
        "name": "ct-slices-demo",
        "version": PACK_VERSION,
        "chain": CHAIN,
        "demo": True,
        "architecture": {
            "name": architecture_name(hyper, preprocessing),
            "hyperparameters": hyper,
        },
        "preprocessing": preprocessing,
        "outputs": [
            {
                "name": OUTPUT,
                "concept": "sacroiliitis",
                "threshold": THRESHOLD,
                "description": (
                    "study probability of sacroiliitis on CT (definite structural change: mNY grade >= 2 on a side): the mean "
                    f"of the networks' slice probabilities, aggregated to the study by {aggregation_rule(top_k)}"
                ),
            }
        ],
        "training_data": (
            f"{len(studies)} synthetic phantom CT studies (sijnode.pipeline.phantom, seeds {seed_ranges([s.seed for s in studies])}; "
            f"{sum(s.positive for s in studies)} with sacroiliitis on CT, {hard} hard negatives: mild-only erosions/sclerosis, "
            f"fat lesions or edema only). Patient-wise split: {len(training_studies)} training ({train_pos} positive), "
            f"{len(validation_studies)} validation. {slices} training slices through the joints ({positive_slices} with a "
            f"positive lesion covering >= {MIN_LESION_MM2:g} mm2 of the slice), slice labels from the phantom's lesion masks. No patient data."
            + (f" Joints not found (left out): {', '.join(skipped)}." if skipped else "")
        ),
        "intended_use": INTENDED_USE,
        "evaluation": {
            "validation": {
                "studies": len(prepared["validation"]),
                "positives": int(validation_labels.sum()),
                "auc": round(auc(validation_labels, combined), 4),
                **{f"auc_{name}": round(auc(validation_labels, p), 4) for name, p in per_network.items()},
                "selected_epochs": {phase.phase: phase.selected_epoch for phase in phases},
            },
            "parameters": parameters,
        },
    }
    pack = write_pack(out, manifest, state)
    write_training_report(
        pack.folder,
        chain=CHAIN,
        seed=seed,
        seconds=time.perf_counter() - started,
        parameters=sum(parameters.values()),
        phases=phases,
        split={"training": [s.folder.name for s in training_studies], "validation": [s.folder.name for s in validation_studies]},
        recipe={**recipe.__dict__, "epochs": epochs, "hyperparameters": hyper, "preprocessing": preprocessing},
        extra={"joints_not_found": skipped, "aggregation_top_k_by_validation": aggregation_numbers},
    )
    return pack


def evaluate(pack: ModelPack, data: Path, out: Path) -> dict[str, Any]:
    """Evaluate ``pack`` on every phantom CT study in ``data`` as the node runs it (each network on its own too)."""
    import json

    started = time.perf_counter()
    out = Path(out)
    manifest = pack.manifest
    model = CTSlicesModel.from_manifest(manifest, pack.load_state_dict())
    threshold = manifest.output(OUTPUT).threshold
    outputs = [OutputSpec(OUTPUT, threshold, description=f"{manifest.architecture.hyperparameters['model']}, as the node runs it")]
    if len(model.networks) > 1:
        outputs += [OutputSpec(name, threshold, label=OUTPUT, description=f"{name} alone") for name in NETWORKS]
    studies = find_studies(data)
    cases = []
    for study in studies:
        truth = json.loads((study.folder / "ground_truth.json").read_text(encoding="utf-8"))
        analysis = model.analyze(study.datasets(), gradcam_slices=0)
        subgroups = (*phantom_subgroups(truth), *(("hard negative",) if study.hard_negative else ()))
        probabilities: dict[str, float | None] = {OUTPUT: analysis.probability}
        for name, values in analysis.network_probabilities.items():
            if len(outputs) > 1:
                probabilities[name] = study_probability(values, model.top_k)
        if len(outputs) > 1 and not analysis.analysed:
            probabilities.update({name: None for name in NETWORKS})
        cases.append(
            CaseResult(
                study=study.folder.name,
                probabilities=probabilities,
                labels={OUTPUT: int(study.positive)},
                subgroups=subgroups,
                details={"seed": study.seed, "slices_analysed": len(analysis.volume.selected), "positive_sides": list(study.positive_sides)},
                error=None if analysis.analysed else analysis.volume.joints.reason,
            )
        )
    positives = sum(s.positive for s in studies)
    data_text = f"{len(studies)} phantom CT studies ({positives} positive, {sum(s.hard_negative for s in studies)} hard negatives), seeds {seed_ranges([s.seed for s in studies])}"
    report = evaluation_report(
        cases,
        outputs,
        pack=pack_identity(manifest, {name: count_parameters(net) for name, net in model.networks.items()}),
        data={"folder": str(Path(data)), "description": data_text, "label": "sacroiliitis on CT: mNY grade >= 2 on a side (from ground_truth.json)"},
        seconds=time.perf_counter() - started,
    )
    paths = write_evaluation(
        out, report, cases, outputs,
        title=f"Evaluation of {manifest.name} {manifest.version} on {len(cases)} held-out phantom CT studies",
        notes=[
            "**Demonstration on synthetic phantoms, not a clinical validation.** The numbers say the chain's plumbing and "
            "training work on the phantom; they say nothing about patients.",
            "",
            f"Data: {data_text}. Hard negatives: mild-only erosions or sclerosis (mNY grade 1), fat lesions, edema only.",
        ],
    )
    if out.resolve() == pack.folder.resolve():
        update_evaluation(pack, HELD_OUT, manifest_summary(report, data_text))
    return {"outputs": report["outputs"], "roc_png": str(paths["roc_png"]), "report": str(paths["report"])}
