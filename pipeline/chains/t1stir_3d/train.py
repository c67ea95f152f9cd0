"""Training and evaluation of t1stir-3d packs on phantom studies (``sijnode train`` / ``sijnode evaluate``).

The loop, progress display, best-epoch selection and reports are the shared harness
(:mod:`pipeline.training`, :mod:`pipeline.evaluation`); this module holds only what is the chain's:

1. **Preprocessing** of every study as the chain does it (grid, clip, N4), cached per study
   (``sijnode train t1stir-3d --cache DIR``).
2. **Denoisers**, one per sequence, when the architecture has them: the published ones learned raw →
   preprocessed volumes of the authors' scanners with noise augmentation; phantoms have no second,
   cleaner acquisition, so a denoiser trained here is a denoising auto-encoder: z-scored
   preprocessed volume plus Gaussian noise (σ 0.1–0.3) in, the volume out, MSE (the published
   loss). The demonstration pack has none (``denoiser: null``, declared): on a shared CPU a
   few dozen steps left the U-Net worse than the identity (validation MSE 0.11–0.16 on z-scored
   volumes), blurring the lesions the classifiers need, and it cost more than the classifiers.
3. **Classifiers**, one per task in the pack as in the paper, **trained jointly**: one network of the
   published tree with ``2 × tasks`` logits (the sum of the tasks' class-weighted cross-entropies;
   spa: label-smoothing cross-entropy with class weights, one model per label), then split into
   one model per task that keeps the shared body and head and its own two rows of the last
   layer, so each task model gives exactly the joint network's logits for its task. Three
   separate trainings cost three times as much and saw the same 96 phantoms; the shared body
   learns from all three labels (declared in the manifest).
   It learns in two phases. **Lesion patches** first: in-plane patches (all slices) of the
   classifier inputs, half of them placed near one of the phantom's lesions (their centres from
   ``ground_truth.json``), labelled per task by the lesion types they hold (edema for the two
   activity outputs, structural types for the third). On 96 phantoms and a shared CPU, the
   whole-field network alone did not learn at all (training loss flat over 5 epochs, validation
   AUCs 0.2–0.6): a 7–20 mm focus is a small part of a 160 mm field. The body ends in a global
   max-pool, so a detector learned on patches applies to the whole field. Then the **whole field**
   with patient labels, as in the paper. Augmentation: random in-plane shift of the grid
   (± ``shift_voxels``) before the classifier's crop, left-right mirroring (patches: mirroring);
   Adam with cosine-annealed rates; in each phase the epoch with the best validation (whole-field
   mean AUC after the patch epochs, loss after the whole-field ones) kept. The paper's training
   used patient labels only: the patch phase is a declared deviation of the demonstration.
4. **Thresholds** as in the paper: chosen on the validation set (Youden's J), written to the manifest.

By default it trains the narrow demonstration architecture on a coarser grid
(:data:`DEMO_CLASSIFIER`, :data:`DEMO_DENOISER`, :data:`DEMO_PREPROCESSING`); all of it is declared
in the manifest.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.chains.t1stir_3d.data import LABEL_KEYS, Case, describe, find_cases
from pipeline.chains.t1stir_3d.inference import (
    CONCEPTS,
    MODELS,
    TASKS,
    Networks,
    build_networks,
    classifier_input,
    classifier_voxels,
    denoise,
    load_networks,
    probability,
)
from pipeline.chains.t1stir_3d.model import DualEncoderClassifier, build_classifier
from pipeline.chains.t1stir_3d.model import SEQUENCES
from pipeline.chains.t1stir_3d.preprocess import PUBLISHED_PREPROCESSING, SemicoronalGrid, ZScore, classifier_transform, volume_from_datasets
from pipeline.phantom.lesions import STRUCTURAL_TYPES
from pipeline.evaluation import (
    CaseResult,
    OutputSpec,
    auc,
    evaluation_report,
    manifest_summary,
    pack_identity,
    roc_curve,
    write_evaluation,
)
from pipeline.packs import HELD_OUT, ModelPack, update_evaluation, write_pack
from pipeline.training import (
    count_parameters,
    fit,
    optimizer_step,
    progress_display,
    seed_everything,
    split_by_patient,
    write_training_report,
)

CHAIN = "t1stir-3d"
PACK_VERSION = "0.2.0"
#: narrow networks that train on a CPU in minutes (published: model.PUBLISHED_CLASSIFIER / _DENOISER)
DEMO_CLASSIFIER: dict[str, Any] = {"stem_channels": 16, "planes": [8, 16, 32, 64], "blocks": [1, 1, 1, 1], "head_hidden": 64, "head_dropout": [0.25, 0.5], "classes": 2}
#: the demonstration pack has no denoisers (see the module docstring); a narrow one to train when asked for
DEMO_DENOISER: dict[str, Any] | None = None
NARROW_DENOISER: dict[str, Any] = {"stem_channels": 8, "planes": [8, 16, 32, 32], "blocks": [1, 1, 1, 1]}
#: the published recipe on a 2 mm in-plane grid of the same 224 mm field, a cheaper N4 fit, and
#: the classifier looking at the central 160 × 160 mm (both joints with margin) at 2.5 mm
DEMO_PREPROCESSING: dict[str, Any] = {
    **PUBLISHED_PREPROCESSING,
    "grid_size": [20, 112, 112],
    "grid_spacing_mm": [3.5, 2.0, 2.0],
    "n4": {**PUBLISHED_PREPROCESSING["n4"], "iterations": 10, "shrink": 4},
    "classifier_crop": [80, 80],
    "classifier_size": [16, 64, 64],
}
DEFAULT_EPOCHS = 4  # whole-field epochs after the lesion-patch epochs
#: the lesion types that make a patch positive for each task (pipeline.phantom.lesions)
TASK_LESIONS: dict[str, tuple[str, ...]] = {"active_inflammation": ("edema",), "asas_active_sacroiliitis": ("edema",), "structural_lesions": STRUCTURAL_TYPES}
INTENDED_USE = (
    "Demonstration only: shows the t1stir-3d chain end to end on synthetic phantom studies. "
    "Trained on phantoms, never on patients; not a medical device; not for diagnosis or any clinical decision."
)


@dataclass(frozen=True)
class Recipe:
    validation_fraction: float = 0.2
    denoiser_epochs: int = 3
    denoiser_steps: int = 8
    denoiser_rate: float = 1e-3
    noise_sigma: tuple[float, float] = (0.1, 0.3)
    batch: int = 8
    rate: float = 2e-3  # the peak of the cosine schedule
    weight_decay: float = 1e-4
    patience: int = 3
    shift_voxels: int = 3  # random in-plane shift of the grid before the classifier's crop
    patch_size: int = 24  # in-plane edge of the lesion patches (classifier voxels), all slices
    patch_batch: int = 32
    patch_steps: int = 25  # per patch epoch
    patch_epochs: int = 4
    patch_rate: float = 2e-3
    finetune_rate: float = 5e-4  # whole-field training after the patches


def _prepare(cases: Sequence[Case], settings: Mapping[str, Any], cache: Path | None, bar: Any, what: str) -> list[dict[str, np.ndarray]]:
    task = bar.add_task(f"preprocess {what}", total=len(cases), status="")
    volumes = []
    for case in cases:
        volumes.append(case.grid_volumes(settings, cache))
        bar.advance(task)
    return volumes


def _train_denoiser(network: nn.Module, volumes: Sequence[torch.Tensor], validation: Sequence[torch.Tensor], recipe: Recipe, rng: np.random.Generator, bar: Any, sequence: str) -> Any:
    """A denoising auto-encoder on z-scored grid volumes (1, 1, D, H, W)."""
    optimizer = torch.optim.Adam(network.parameters(), lr=recipe.denoiser_rate)
    loss_fn = nn.MSELoss()

    def noisy(volume: torch.Tensor) -> torch.Tensor:
        return volume + float(rng.uniform(*recipe.noise_sigma)) * torch.randn_like(volume)

    def train_epoch(_: int) -> dict[str, float]:
        total = 0.0
        for _ in range(recipe.denoiser_steps):
            volume = volumes[int(rng.integers(len(volumes)))]
            total += optimizer_step(optimizer, loss_fn(network(noisy(volume)), volume))
        return {"loss": total / recipe.denoiser_steps}

    def validate() -> dict[str, float]:
        with torch.no_grad():
            return {"validation_loss": float(np.mean([loss_fn(network(noisy(v)), v).item() for v in validation]))}

    return fit(network, recipe.denoiser_epochs, train_epoch, validate, phase=f"denoiser {sequence}", validate_before=True, progress=bar)


def _class_weights(labels: np.ndarray) -> torch.Tensor:
    """spa's class weights (neg, pos) = (prevalence, 1 - prevalence): the rarer class weighs more."""
    positives = float(labels.mean())
    return torch.tensor([positives, 1 - positives], dtype=torch.float32)


def _augmented(volumes: Mapping[str, np.ndarray], settings: Mapping[str, Any], rng: np.random.Generator, shift: int) -> torch.Tensor:
    """One training input ``(2, D, H, W)``: the grid shifted in-plane, then the chain's own crop, resize and z-score; mirrored left-right at random."""
    rows, columns = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
    mirror = bool(rng.random() < 0.5)
    to_classifier = classifier_transform(settings)
    out = []
    for sequence in SEQUENCES:
        volume = np.roll(volumes[sequence], (rows, columns), axis=(1, 2))
        out.append(to_classifier(volume[:, :, ::-1].copy() if mirror else volume))
    return torch.cat(out)


def task_model(joint: DualEncoderClassifier, index: int, hyperparameters: Mapping[str, Any]) -> DualEncoderClassifier:
    """Task ``index`` of a jointly trained network as a model of its own: the shared body and head, its two rows of the last layer."""
    model = build_classifier({**hyperparameters, "classes": 2})
    state = joint.state_dict()
    last = [name for name, module in joint.head.named_modules() if isinstance(module, nn.Linear)][-1]
    key = f"head.{last}.weight"
    state[key] = state[key][2 * index : 2 * index + 2].clone()
    model.load_state_dict(state, strict=True)
    return model.eval()


def lesion_positions(case: Case, settings: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    """The case's lesions as (type, continuous (slice, row, column) in the classifier input), from the ground truth's LPS centres and the T1 geometry."""
    if not case.lesions:
        return []
    _, image = volume_from_datasets(case.datasets("T1"))
    grid = SemicoronalGrid.centred_on(image, settings["grid_size"], settings["grid_spacing_mm"])
    voxels = classifier_voxels(grid.voxel_of(np.asarray([centre for _, centre in case.lesions])), settings, settings["classifier_size"])
    return [(kind, voxel) for (kind, _), voxel in zip(case.lesions, voxels, strict=True)]


def _patch_batch(inputs: torch.Tensor, lesions: Sequence[Sequence[tuple[str, np.ndarray]]], recipe: Recipe, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``patch_batch`` in-plane patches (all slices) of the classifier inputs, half centred near a lesion; labels ``(batch, tasks)``:
    a task is positive in a patch that holds the centre of one of its lesion types (2 voxels in from the edge)."""
    size, half = recipe.patch_size, recipe.patch_size // 2
    height, width = inputs.shape[-2:]
    patches, labels = [], []
    for _ in range(recipe.patch_batch):
        case = int(rng.integers(len(inputs)))
        if lesions[case] and rng.random() < 0.5:
            _, centre = lesions[case][int(rng.integers(len(lesions[case])))]
            row, column = (int(round(v)) + int(rng.integers(-half + 3, half - 2)) for v in centre[1:])
        else:
            row, column = (int(rng.integers(half, n - half + 1)) for n in (height, width))
        top, left = int(np.clip(row - half, 0, height - size)), int(np.clip(column - half, 0, width - size))
        patch = inputs[case, :, :, top : top + size, left : left + size].float()
        inside = {kind for kind, (_, r, c) in lesions[case] if top + 2 <= r <= top + size - 3 and left + 2 <= c <= left + size - 3}
        labels.append([int(bool(inside & set(TASK_LESIONS[task]))) for task in TASKS])
        patches.append(torch.flip(patch, dims=[-1]) if rng.random() < 0.5 else patch)
    return torch.stack(patches), torch.as_tensor(labels, dtype=torch.long)


def _train_joint_classifier(
    network: nn.Module,
    volumes: Sequence[Mapping[str, np.ndarray]],
    labels: np.ndarray,
    validation_inputs: torch.Tensor,
    validation_labels: np.ndarray,
    epochs: int,
    recipe: Recipe,
    settings: Mapping[str, Any],
    rng: np.random.Generator,
    bar: Any,
    patch_inputs: torch.Tensor | None = None,
    lesions: Sequence[Sequence[tuple[str, np.ndarray]]] = (),
) -> list[Any]:
    """One network with two logits per task (columns of ``labels``, ``(studies, tasks)``), mean class-weighted cross-entropy.

    With ``patch_inputs`` (the training studies' classifier inputs) and their ``lesions``, it first
    learns on lesion patches (the phantoms' lesion positions as patch labels: a small bright or dark
    focus is a much stronger signal in a patch than in the whole field), then on the whole field;
    the body ends in a global max-pool, so what it learned on patches applies to the whole field.
    """
    tasks = labels.shape[1]
    losses = [nn.CrossEntropyLoss(weight=_class_weights(labels[:, t])) for t in range(tasks)]
    patched = patch_inputs is not None and recipe.patch_epochs > 0
    optimizer = torch.optim.Adam(network.parameters(), lr=recipe.finetune_rate if patched else recipe.rate, weight_decay=recipe.weight_decay)
    steps = max(1, sum(1 for start in range(0, len(volumes), recipe.batch) if len(volumes) - start >= 2))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps))
    targets = torch.as_tensor(labels, dtype=torch.long)

    def loss_of(logits: torch.Tensor, target: torch.Tensor, weighted: bool = True) -> torch.Tensor:
        pairs = [logits[:, 2 * t : 2 * t + 2] for t in range(tasks)]
        if weighted:
            return sum(losses[t](pairs[t], target[:, t]) for t in range(tasks)) / tasks  # type: ignore[return-value]
        return sum(nn.functional.cross_entropy(pairs[t], target[:, t]) for t in range(tasks)) / tasks  # type: ignore[return-value]

    def train_epoch(_: int) -> dict[str, float]:
        order = rng.permutation(len(volumes))
        total, seen = 0.0, 0
        for start in range(0, len(order), recipe.batch):
            index = order[start : start + recipe.batch]
            if len(index) < 2:  # BatchNorm1d needs two samples
                continue
            batch = torch.stack([_augmented(volumes[i], settings, rng, recipe.shift_voxels) for i in index])
            total += optimizer_step(optimizer, loss_of(network(batch.contiguous(memory_format=torch.channels_last_3d)), targets[index])) * len(index)
            seen += len(index)
            schedule.step()
        return {"loss": total / max(seen, 1)}

    def validate() -> dict[str, float]:
        with torch.no_grad():
            logits = torch.cat([network(validation_inputs[i : i + 8].float()) for i in range(0, len(validation_inputs), 8)])
        target = torch.as_tensor(validation_labels, dtype=torch.long)
        numbers = {"validation_loss": float(loss_of(logits, target, weighted=False))}
        for t, task in enumerate(list(TASKS)[:tasks]):
            numbers[f"validation_auc_{task}"] = auc(validation_labels[:, t], torch.softmax(logits[:, 2 * t : 2 * t + 2], 1)[:, 1].numpy())
        numbers["validation_auc_mean"] = float(np.mean([numbers[f"validation_auc_{task}"] for task in list(TASKS)[:tasks]]))
        return numbers

    # channels-last 3D convolutions cost about a quarter less CPU time in training (measured on torch 2.13)
    network.to(memory_format=torch.channels_last_3d)
    results = []
    if patched:
        assert patch_inputs is not None
        patch_optimizer = torch.optim.Adam(network.parameters(), lr=recipe.patch_rate, weight_decay=recipe.weight_decay)
        patch_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(patch_optimizer, T_max=recipe.patch_epochs * recipe.patch_steps)

        def patch_epoch(_: int) -> dict[str, float]:
            total = 0.0
            for _ in range(recipe.patch_steps):
                batch, target = _patch_batch(patch_inputs, lesions, recipe, rng)
                total += optimizer_step(patch_optimizer, loss_of(network(batch.contiguous(memory_format=torch.channels_last_3d)), target, weighted=False))
                patch_schedule.step()
            return {"patch_loss": total / recipe.patch_steps}

        # the whole-field validation loss is off while the head has seen only patches: keep the epoch whose whole-field AUCs are best
        results.append(fit(network, recipe.patch_epochs, patch_epoch, validate, phase="classifiers (joint, lesion patches)", monitor="validation_auc_mean", mode="max", progress=bar))
    results.append(fit(network, epochs, train_epoch, validate, phase="classifiers (joint, whole field)", patience=recipe.patience, validate_before=patched, progress=bar))
    network.to(memory_format=torch.contiguous_format)
    return results


def _narrower(hyperparameters: Mapping[str, Any]) -> str:
    c = hyperparameters["classifier"]
    text = (
        f"classifier stem {c['stem_channels']} channels, planes {'/'.join(map(str, c['planes']))}, blocks {'/'.join(map(str, c['blocks']))}, "
        f"head {c['head_hidden']} hidden (published 128, 64/128/256/512, 3/4/23/3, 512)"
    )
    d = hyperparameters["denoiser"]
    if d is None:
        return text + "; no denoisers (published: DynamicUnet3D on a ResNet-18 3D encoder per sequence, 95.3 M parameters each)"
    return text + f"; denoiser stem {d['stem_channels']}, planes {'/'.join(map(str, d['planes']))}, blocks {'/'.join(map(str, d['blocks']))} (published 32, 64/128/256/512, 2/2/2/2)"


def _preprocessing_deviation(settings: Mapping[str, Any]) -> str:
    """What the pack's preprocessing does differently from the published recipe, in words."""
    x = "x".join
    parts = []
    if list(settings["grid_size"]) != PUBLISHED_PREPROCESSING["grid_size"] or list(settings["grid_spacing_mm"]) != PUBLISHED_PREPROCESSING["grid_spacing_mm"]:
        parts.append(f"grid {x(map(str, settings['grid_size']))} at {x(f'{v:g}' for v in settings['grid_spacing_mm'])} mm instead of 20x224x224 at 3.5x1x1")
    n4 = settings["n4"]
    if (n4["levels"], n4["iterations"], n4.get("shrink", 1)) != (4, 50, 1):
        parts.append(f"N4 {n4['levels']} levels x {n4['iterations']} iterations fitted on the grid shrunk {n4.get('shrink', 1)}x in-plane instead of 4 x 50 at full resolution")
    if settings.get("classifier_crop") is not None:
        crop = settings["classifier_crop"]
        mm = [c * float(v) for c, v in zip(crop, settings["grid_spacing_mm"][1:], strict=True)]
        parts.append(f"the classifier sees the central {crop[0]}x{crop[1]} grid voxels ({mm[0]:g}x{mm[1]:g} mm, both joints with margin) instead of the whole grid")
    if list(settings["classifier_size"]) != PUBLISHED_PREPROCESSING["classifier_size"]:
        parts.append(f"classifier input {x(map(str, settings['classifier_size']))} instead of 16x192x192")
    return "; ".join(parts) or "none"


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The cut-off maximising sensitivity + specificity - 1 (the paper fixed its cut-offs on the validation set)."""
    fpr, tpr, thresholds = roc_curve(labels, scores)
    finite = np.isfinite(thresholds)
    best = int(np.argmax(np.where(finite, tpr - fpr, -np.inf)))
    return float(np.clip(thresholds[best], 0.01, 0.99))


def train(
    data: Path,
    out: Path,
    *,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = True,
    architecture: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    recipe: Recipe | None = None,
    cache: Path | None = None,
) -> ModelPack:
    """Train the five networks on the phantom studies in ``data``; write the pack to ``out``."""
    started = time.perf_counter()
    recipe = recipe or Recipe()
    epochs = DEFAULT_EPOCHS if epochs is None else int(epochs)
    settings = dict(preprocessing or DEMO_PREPROCESSING)
    hyperparameters = dict(architecture or {"classifier": DEMO_CLASSIFIER, "denoiser": DEMO_DENOISER})
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    cases = find_cases(data)
    train_cases, validation_cases = split_by_patient(
        cases, recipe.validation_fraction, seed, patient=lambda c: c.patient_id, label=lambda c: bool(c.labels["active_inflammation"])
    )
    networks = build_networks(hyperparameters)
    phases = []
    thresholds: dict[str, float] = {}
    validation_metrics: dict[str, Any] = {}
    with progress_display(progress) as bar:
        grids = _prepare(train_cases, settings, cache, bar, "training studies")
        validation_grids = _prepare(validation_cases, settings, cache, bar, "validation studies")
        for sequence, denoiser in networks.denoisers.items():
            volumes = [ZScore()(p[sequence])[None, None] for p in grids]
            held = [ZScore()(p[sequence])[None, None] for p in validation_grids]
            phases.append(_train_denoiser(denoiser, volumes, held, recipe, rng, bar, sequence))
            denoiser.eval()
        # what the classifiers see before their crop: the denoised volumes, or the grid volumes when there is no denoiser
        inputs = [{s: denoise(networks.denoisers[s], p[s]) if s in networks.denoisers else p[s] for s in SEQUENCES} for p in grids]
        validation_inputs = torch.cat([classifier_input(p, networks.denoisers, settings) for p in validation_grids])
        labels = np.asarray([[c.labels[task] for task in TASKS] for c in train_cases])
        validation_labels = np.asarray([[c.labels[task] for task in TASKS] for c in validation_cases])
        for t, task in enumerate(TASKS):
            if labels[:, t].min() == labels[:, t].max():
                raise ValueError(f"the training studies need both labels of {task}")
        joint = build_classifier({**hyperparameters["classifier"], "classes": 2 * len(TASKS)})
        patch_inputs = torch.cat([classifier_input(p, {}, settings) for p in inputs]) if recipe.patch_epochs > 0 else None
        lesions = [[(kind, voxel) for kind, voxel in lesion_positions(c, settings)] for c in train_cases] if recipe.patch_epochs > 0 else []
        phases.extend(_train_joint_classifier(joint, inputs, labels, validation_inputs, validation_labels, epochs, recipe, settings, rng, bar, patch_inputs, lesions))
        joint.eval()
        for t, task in enumerate(TASKS):
            network = networks.classifiers[task] = task_model(joint, t, hyperparameters["classifier"])
            scores = np.asarray([probability(network, validation_inputs[i : i + 1]) for i in range(len(validation_cases))])
            truth = validation_labels[:, t]
            thresholds[task] = youden_threshold(truth, scores) if 0 < truth.sum() < len(truth) else 0.5
            validation_metrics[task] = {"auc": round(auc(truth, scores), 4), "threshold": round(thresholds[task], 4), "positives": int(truth.sum())}
    training, held, everything = describe(train_cases), describe(validation_cases), describe(cases)
    manifest = {
        "name": "t1stir-3d-demo",
        "version": PACK_VERSION,
        "chain": CHAIN,
        "demo": True,
        "architecture": {
            "name": (
                "dual-encoder bottleneck ResNet 3D per task, narrow (Bressem et al. 2022 / faimed3d tree), "
                + ("with a faimed3d DynamicUnet3D denoiser per sequence" if networks.denoisers else "without the denoising U-Nets (demonstration deviation)")
            ),
            "hyperparameters": {
                **hyperparameters,
                "models": MODELS if networks.denoisers else MODELS.split("; one denoising")[0] + "; no denoisers (denoiser: null)",
                "narrower_than_published": _narrower(hyperparameters),
                "joint_training": (
                    "the three task models were trained as one network of this tree with six logits (two per task, "
                    "the mean of the three cross-entropies) and split: each task model is the shared "
                    "body and head with its own two rows of the last linear layer, so the three share every other weight "
                    "(the paper trained one model per label)"
                    + (
                        "; first on lesion patches labelled from the phantoms' lesion positions, then on the whole field "
                        "with patient labels (the paper: patient labels only)"
                        if recipe.patch_epochs > 0
                        else ""
                    )
                ),
            },
        },
        "preprocessing": {
            **settings,
            "demo_deviation": _preprocessing_deviation(settings),
        },
        "outputs": [
            {"name": task, "concept": CONCEPTS[task], "threshold": round(thresholds[task], 4), "description": f"softmax probability of class 1 of its own model: {text}; threshold chosen on the validation phantoms (Youden)"}
            for task, text in TASKS.items()
        ],
        "training_data": (
            f"{everything['studies']} synthetic phantom studies from sijnode.pipeline.phantom (generator {', '.join(everything['generator_versions'])}, "
            f"seeds {everything['seeds']}), semicoronal T1 and STIR only. Patient-wise split: {training['studies']} training, "
            f"{held['studies']} validation. Labels from ground_truth.json: "
            + ", ".join(f"{task} <- {key}" for task, key in LABEL_KEYS.items())
            + ". No patient data."
        ),
        "intended_use": INTENDED_USE,
        "evaluation": {"validation": {"studies": held["studies"], **validation_metrics}},
    }
    pack = write_pack(out, manifest, networks.state_dict())
    write_training_report(
        out,
        chain=CHAIN,
        seed=seed,
        seconds=time.perf_counter() - started,
        parameters=sum(count_parameters(n) for n in [*networks.denoisers.values(), *networks.classifiers.values()]),
        phases=phases,
        split={"training": [c.study for c in train_cases], "validation": [c.study for c in validation_cases]},
        recipe={
            **asdict(recipe),
            "epochs": epochs,
            "optimizer": "Adam, cosine-annealed rate from `rate`",
            "classifier_loss": "one network, two logits per task: mean over the tasks of cross-entropy (whole field: class weights (neg, pos) = (prevalence, 1 - prevalence) as in spa); split into one model per task",
            "classifier_phases": (
                f"{recipe.patch_epochs} x {recipe.patch_steps} steps on {recipe.patch_batch} lesion patches of {recipe.patch_size}x{recipe.patch_size} voxels "
                "(half placed near a ground-truth lesion centre; a task is positive in a patch holding one of its lesion types: "
                + "; ".join(f"{task} <- {', '.join(kinds)}" for task, kinds in TASK_LESIONS.items())
                + f"), then up to {epochs} whole-field epochs with patient labels"
                if recipe.patch_epochs > 0
                else f"up to {epochs} whole-field epochs with patient labels"
            ),
            "denoiser_loss": "MSE" if networks.denoisers else "no denoisers",
            "augmentation": f"in-plane shift of the grid by up to {recipe.shift_voxels} voxels before the crop, left-right mirror p=0.5 (classifiers)"
            + (", Gaussian noise (denoisers)" if networks.denoisers else ""),
        },
        extra={"thresholds": thresholds, "validation": validation_metrics, "data": {"training": training, "validation": held}},
    )
    return pack


def evaluate(pack: ModelPack, data: Path, out: Path, *, cache: Path | None = None) -> dict[str, Any]:
    """Run the pack on every phantom study in ``data`` as the chain does; write the shared report to ``out``."""
    started = time.perf_counter()
    out = Path(out)
    networks: Networks = load_networks(pack)
    settings = dict(pack.manifest.preprocessing)
    outputs = [OutputSpec(task, pack.manifest.output(task).threshold, description=text) for task, text in TASKS.items()]
    cases = find_cases(data)
    results = []
    for case in cases:
        volumes = classifier_input(case.grid_volumes(settings, cache), networks.denoisers, settings)
        results.append(
            CaseResult(
                study=case.study,
                probabilities={task: probability(model, volumes) for task, model in networks.classifiers.items()},
                labels=dict(case.labels),
                subgroups=case.subgroups,
                details={"seed": case.seed},
            )
        )
    manifest = pack.manifest
    summary = describe(cases)
    report = evaluation_report(
        results,
        outputs,
        pack=pack_identity(manifest, sum(count_parameters(n) for n in [*networks.denoisers.values(), *networks.classifiers.values()])),
        data={"folder": str(Path(data)), **summary, "labels": dict(LABEL_KEYS)},
        seconds=time.perf_counter() - started,
    )
    notes = [
        "**Demonstration on synthetic phantoms, not a clinical validation.** The numbers say how well the",
        "demonstration pack separates phantoms; they say nothing about patients.",
        "",
        f"- Held-out data: {summary['studies']} phantom studies, seeds {summary['seeds']}; subgroups {summary['subgroups']}. "
        "Hard negatives: structural-only studies for the two activity outputs, active-only studies for the structural output, "
        "active studies below the ASAS definition for the ASAS output.",
        "- For comparison, the paper (Bressem et al. 2022) reports on 116 external test patients: AUC 0.94 (active inflammatory),",
        "  0.88 (ASAS), 0.89 (structural).",
    ]
    paths = write_evaluation(out, report, results, outputs, title=f"Evaluation of {manifest.name} {manifest.version} on {len(results)} held-out phantoms", notes=notes)
    if out.resolve() == pack.folder.resolve():
        update_evaluation(pack, HELD_OUT, manifest_summary(report, f"{summary['studies']} phantom studies, seeds {summary['seeds']}"))
    return {"outputs": report["outputs"], "roc_png": str(paths["roc_png"]), "report": str(paths["report"])}
