"""Training and evaluation of t1stir-3d packs on phantom studies (``sijnode train`` / ``sijnode evaluate``).

The loop, progress display, best-epoch selection and reports are the shared harness
(:mod:`pipeline.training`, :mod:`pipeline.evaluation`); this module holds only what is the chain's:

1. **Preprocessing** of every study as the chain does it (grid, clip, N4), cached per study.
2. **Denoisers**, one per sequence: the published ones learned raw → preprocessed volumes of the
   authors' scanners with noise augmentation; phantoms have no second, cleaner acquisition, so the
   demonstration denoiser is a denoising auto-encoder: z-scored preprocessed volume plus Gaussian
   noise (σ 0.1–0.3) in, the volume out, MSE (the published loss).
3. **Classifiers**, one per task as in the paper, each on the denoised T1 + STIR volumes (computed
   once), in two phases (a demonstration choice, declared in the manifest):

   a. *Lesion patches*: the whole model (shared encoder, per-sequence max-pool, head: it takes any
      input size) on 2-channel patches of the training volumes, labelled 1 when centred (± a
      quarter patch) on one of the study's lesions behind the output and 0 when away from all of
      them (:class:`LesionPatches`; lesion centres from the phantoms' ground truth, training only).
      Trained on whole studies alone (160 labels), the model did not learn to find lesions of a
      few voxels in a 96×96×16 volume (validation AUC 0.4–0.6 in every run, this and earlier
      sessions); on patches it sees thousands of located examples.
   b. *Whole studies*: the encoder frozen, its per-sequence max-pooled features of every training
      study (and of its left-right mirror image) train the head with the study labels: the
      published max-pool then sees whole volumes, so the head learns how a lesion's feature peak
      compares with a whole study's. Cross-entropy with class weights as in spa (published:
      label-smoothing cross-entropy with class weights, MixUp and heavy augmentation, end to end).
   Adam throughout; each phase keeps the epoch with the lowest validation loss.
4. **Thresholds** as in the paper: chosen on the validation set (Youden's J), written to the manifest.

By default it trains the narrow demonstration architecture on a coarser grid
(:data:`DEMO_CLASSIFIER`, :data:`DEMO_DENOISER`, :data:`DEMO_PREPROCESSING`); all of it is declared
in the manifest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.chains.t1stir_3d.data import LABEL_KEYS, LESION_TYPES, Case, describe, find_cases
from pipeline.chains.t1stir_3d.inference import (
    CONCEPTS,
    MODELS,
    TASKS,
    Networks,
    build_networks,
    classifier_input,
    load_networks,
    probability,
)
from pipeline.chains.t1stir_3d.model import SEQUENCES, DualEncoderClassifier
from pipeline.chains.t1stir_3d.preprocess import PUBLISHED_PREPROCESSING, ZScore
from pipeline.evaluation import (
    CaseResult,
    OutputSpec,
    auc,
    evaluation_report,
    manifest_summary,
    pack_identity,
    write_evaluation,
    youden_threshold,
)
from pipeline.packs import HELD_OUT, ModelPack, update_evaluation, write_pack
from pipeline.training import (
    TRAINING_REPORT,
    count_parameters,
    demo_intended_use,
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
DEMO_DENOISER: dict[str, Any] = {"stem_channels": 8, "planes": [8, 16, 32, 32], "blocks": [1, 1, 1, 1]}
#: the published recipe on a 2 mm in-plane grid of the same 224 mm field, and a cheaper N4 fit; the
#: classifier sees the central 192 mm at the grid's 2 mm (a resize of the whole field to 96 would
#: shrink lesions of a few voxels further)
DEMO_PREPROCESSING: dict[str, Any] = {
    **PUBLISHED_PREPROCESSING,
    "grid_size": [20, 112, 112],
    "grid_spacing_mm": [3.5, 2.0, 2.0],
    "n4": {**PUBLISHED_PREPROCESSING["n4"], "iterations": 10, "shrink": 4},
    "classifier_crop": [96, 96],
    "classifier_size": [16, 96, 96],
}
#: epochs of the whole-study phase (the head); the patch phase has its own in :class:`Recipe`
DEFAULT_EPOCHS = 30
INTENDED_USE = demo_intended_use("t1stir-3d")


@dataclass(frozen=True)
class Recipe:
    validation_fraction: float = 0.2
    denoiser_epochs: int = 3
    denoiser_steps: int = 8
    denoiser_rate: float = 1e-3
    noise_sigma: tuple[float, float] = (0.1, 0.3)
    patch_size: tuple[int, int, int] = (8, 32, 32)  # classifier-input voxels: 28 × 64 × 64 mm at the demo grid
    patch_epochs: int = 12
    patch_steps: int = 250
    patch_batch: int = 16
    patch_validation: int = 64  # patches of each label from the validation studies
    hard_negatives: float = 0.5  # share of label-0 patches cut from lesion-free studies where other studies have lesions
    batch: int = 16
    rate: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 10


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


class LesionPatches:
    """Patches of classifier inputs ``(N, 2, D, H, W)``: label 1 centred (± a quarter patch) on one of a
    study's lesion centres; label 0 where no lesion centre lies inside the patch or within a quarter
    patch of it (lesions reach beyond their centres).

    ``hard`` of the label-0 patches are hard negatives: cut from a study without lesions at a place
    where another study has one (near the joints, where the anatomy resembles the lesions), so that
    the model cannot learn "joint region" for "lesion"; the rest anywhere.

    ``centres``: per study, ``(n, 3)`` continuous classifier voxels (:meth:`Case.lesion_voxels`).
    """

    def __init__(self, inputs: torch.Tensor, centres: Sequence[np.ndarray], size: Sequence[int], rng: np.random.Generator, hard: float = 0.0) -> None:
        self.inputs, self.centres, self.rng, self.hard = inputs, [np.asarray(c, dtype=float).reshape(-1, 3) for c in centres], rng, hard
        self.shape = np.asarray(inputs.shape[2:])
        self.size = np.minimum(np.asarray(size, dtype=int), self.shape)
        self.with_lesions = [i for i, c in enumerate(self.centres) if len(c)]
        self.without_lesions = [i for i, c in enumerate(self.centres) if not len(c)]

    def _cut(self, study: int, start: np.ndarray) -> torch.Tensor:
        (z, y, x), (d, h, w) = start, self.size
        return self.inputs[study, :, z : z + d, y : y + h, x : x + w].float()

    def _start(self, centre: np.ndarray) -> np.ndarray:
        return np.clip(np.round(centre - self.size / 2).astype(int), 0, self.shape - self.size)

    def sample(self, positive: bool) -> torch.Tensor:
        if positive:
            study = self.with_lesions[int(self.rng.integers(len(self.with_lesions)))]
            lesions = self.centres[study]
            centre = lesions[int(self.rng.integers(len(lesions)))] + self.rng.uniform(-0.25, 0.25, 3) * self.size
            return self._cut(study, self._start(centre))
        if self.with_lesions and self.without_lesions and self.rng.random() < self.hard:
            study = self.without_lesions[int(self.rng.integers(len(self.without_lesions)))]
            elsewhere = self.centres[self.with_lesions[int(self.rng.integers(len(self.with_lesions)))]]
            centre = elsewhere[int(self.rng.integers(len(elsewhere)))] + self.rng.uniform(-0.25, 0.25, 3) * self.size
            return self._cut(study, self._start(centre))
        study = int(self.rng.integers(len(self.inputs)))
        margin = 0.25 * self.size
        for _ in range(100):
            start = self.rng.integers(0, self.shape - self.size + 1)
            if all(((lesion < start - margin) | (lesion >= start + self.size + margin)).any() for lesion in self.centres[study]):
                break
        else:  # a study full of lesions: a patch from a study without any instead
            free = self.without_lesions or [study]
            study = free[int(self.rng.integers(len(free)))]
        return self._cut(study, start)

    def batch(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` patches, about half of each label, randomly mirrored left-right."""
        labels = self.rng.random(count) < 0.5
        if self.with_lesions:
            labels[0], labels[-1] = True, False  # both labels in every batch
        else:
            labels[:] = False
        patches = torch.stack([self.sample(bool(label)) for label in labels])
        mirror = torch.as_tensor(self.rng.random(count) < 0.5)
        patches = torch.where(mirror[:, None, None, None, None], torch.flip(patches, dims=[-1]), patches)
        return patches, torch.as_tensor(labels, dtype=torch.long)


def _train_on_patches(network: DualEncoderClassifier, patches: LesionPatches, validation: tuple[torch.Tensor, torch.Tensor], recipe: Recipe, bar: Any, task: str) -> Any:
    """Phase (a): the whole model on lesion / lesion-free patches."""
    optimizer = torch.optim.Adam(network.parameters(), lr=recipe.rate, weight_decay=recipe.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    held, held_labels = validation

    def train_epoch(_: int) -> dict[str, float]:
        total = 0.0
        for _ in range(recipe.patch_steps):
            batch, labels = patches.batch(recipe.patch_batch)
            total += optimizer_step(optimizer, loss_fn(network(batch), labels))
        return {"loss": total / recipe.patch_steps}

    def validate() -> dict[str, float]:
        with torch.no_grad():
            logits = torch.cat([network(held[i : i + 32]) for i in range(0, len(held), 32)])
        numbers = {"validation_loss": float(loss_fn(logits, held_labels))}
        if 0 < int(held_labels.sum()) < len(held_labels):
            numbers["validation_auc"] = auc(held_labels.numpy(), torch.softmax(logits, 1)[:, 1].numpy())
        return numbers

    return fit(network, recipe.patch_epochs, train_epoch, validate, phase=f"lesion patches {task}", progress=bar)


@torch.no_grad()
def pooled_features(network: DualEncoderClassifier, inputs: torch.Tensor) -> torch.Tensor:
    """Each study's per-sequence max-pooled encoder features ``(N, C, 2, 1, 1)``: what the head sees."""
    network.eval()
    batches = [inputs[i : i + 8].float() for i in range(0, len(inputs), 8)]
    return torch.cat([torch.cat([network.encode(batch[:, k : k + 1]) for k in range(len(SEQUENCES))], 2) for batch in batches])


def _train_head(network: DualEncoderClassifier, inputs: torch.Tensor, labels: np.ndarray, validation_inputs: torch.Tensor, validation_labels: np.ndarray, epochs: int, recipe: Recipe, rng: np.random.Generator, bar: Any, task: str) -> Any:
    """Phase (b): the encoder frozen, the head on whole studies' pooled features (and their mirror images')."""
    features = torch.cat([pooled_features(network, inputs), pooled_features(network, torch.flip(inputs, dims=[-1]))])
    targets = torch.as_tensor(np.concatenate([labels, labels]), dtype=torch.long)
    held = pooled_features(network, validation_inputs)
    prevalence = float(labels.mean())
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([prevalence, 1 - prevalence], dtype=torch.float32))  # spa: (neg, pos) = (p, 1-p)
    optimizer = torch.optim.Adam(network.head.parameters(), lr=recipe.rate, weight_decay=recipe.weight_decay)

    def train_epoch(_: int) -> dict[str, float]:
        network.head.train()
        order = rng.permutation(len(targets))
        total, count = 0.0, 0
        for start in range(0, len(order), recipe.batch):
            index = order[start : start + recipe.batch]
            if len(index) < 2:  # BatchNorm1d needs two samples
                continue
            total += optimizer_step(optimizer, loss_fn(network.head(features[index]), targets[index])) * len(index)
            count += len(index)
        return {"loss": total / max(count, 1)}

    def validate() -> dict[str, float]:
        network.head.eval()
        with torch.no_grad():
            logits = network.head(held)
        p = torch.softmax(logits, 1)[:, 1].numpy()
        loss = float(nn.functional.cross_entropy(logits, torch.as_tensor(validation_labels, dtype=torch.long)))
        return {"validation_loss": loss, "validation_auc": auc(validation_labels, p)}

    result = fit(network.head, epochs, train_epoch, validate, phase=f"whole studies {task}", validate_before=True, patience=recipe.patience, progress=bar)
    network.eval()
    return result


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
    base: ModelPack | None = None,
    tasks: Sequence[str] | None = None,
) -> ModelPack:
    """Train the five networks on the phantom studies in ``data``; write the pack to ``out``.

    With ``base``, a pack made by this trainer, start from it instead: its preprocessing,
    architecture and denoisers stay, and only the classifiers of ``tasks`` are trained again (the
    others are copied with their thresholds); ``seed`` gives the same split as the base's.
    """
    started = time.perf_counter()
    recipe = recipe or Recipe()
    epochs = DEFAULT_EPOCHS if epochs is None else int(epochs)
    tasks = list(tasks or TASKS)
    if unknown := set(tasks) - set(TASKS):
        raise ValueError(f"unknown outputs {sorted(unknown)}; known: {', '.join(TASKS)}")
    if base is not None:
        architecture = {key: base.manifest.architecture.hyperparameters[key] for key in ("classifier", "denoiser")}
        preprocessing = base.manifest.preprocessing
    settings = dict(preprocessing or DEMO_PREPROCESSING)
    hyperparameters = dict(architecture or {"classifier": DEMO_CLASSIFIER, "denoiser": DEMO_DENOISER})
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    cases = find_cases(data)
    train_cases, validation_cases = split_by_patient(
        cases, recipe.validation_fraction, seed, patient=lambda c: c.patient_id, label=lambda c: bool(c.labels["active_inflammation"])
    )
    networks = build_networks(hyperparameters) if base is None else load_networks(base)
    if base is not None:  # the base's networks; the classifiers to train again start afresh
        networks.classifiers.update(build_networks(hyperparameters, tasks).classifiers)
    phases = []
    thresholds: dict[str, float] = {}
    validation_metrics: dict[str, Any] = {}
    for task in set(TASKS) - set(tasks):  # kept from the base pack
        thresholds[task] = float(base.manifest.output(task).threshold)  # type: ignore[union-attr]
        validation_metrics[task] = base.manifest.evaluation["validation"][task]  # type: ignore[union-attr]
    with progress_display(progress) as bar:
        grids = _prepare(train_cases, settings, cache, bar, "training studies")
        validation_grids = _prepare(validation_cases, settings, cache, bar, "validation studies")
        for sequence in SEQUENCES if base is None else ():
            volumes = [ZScore()(p[sequence])[None, None] for p in grids]
            held = [ZScore()(p[sequence])[None, None] for p in validation_grids]
            phases.append(_train_denoiser(networks.denoisers[sequence], volumes, held, recipe, rng, bar, sequence))
            networks.denoisers[sequence].eval()
        inputs = torch.cat([classifier_input(p, networks.denoisers, settings) for p in grids]).half()
        validation_inputs = torch.cat([classifier_input(p, networks.denoisers, settings) for p in validation_grids]).half()
        for task in tasks:
            labels = np.asarray([c.labels[task] for c in train_cases])
            validation_labels = np.asarray([c.labels[task] for c in validation_cases])
            if labels.min() == labels.max():
                raise ValueError(f"the training studies need both labels of {task}")
            network = networks.classifiers[task]
            patches = LesionPatches(inputs, [c.lesion_voxels(task, settings) for c in train_cases], recipe.patch_size, rng, recipe.hard_negatives)
            held_patches = LesionPatches(validation_inputs, [c.lesion_voxels(task, settings) for c in validation_cases], recipe.patch_size, rng, recipe.hard_negatives)
            phases.append(_train_on_patches(network, patches, held_patches.batch(2 * recipe.patch_validation), recipe, bar, task))
            phases.append(_train_head(network, inputs, labels, validation_inputs, validation_labels, epochs, recipe, rng, bar, task))
            scores = np.asarray([probability(network, validation_inputs[i : i + 1].float()) for i in range(len(validation_cases))])
            thresholds[task] = youden_threshold(validation_labels, scores) if 0 < validation_labels.sum() < len(validation_labels) else 0.5
            validation_metrics[task] = {"auc": round(auc(validation_labels, scores), 4), "threshold": round(thresholds[task], 4), "positives": int(validation_labels.sum())}
    training, held, everything = describe(train_cases), describe(validation_cases), describe(cases)
    manifest = {
        "name": "t1stir-3d-demo",
        "version": PACK_VERSION,
        "chain": CHAIN,
        "demo": True,
        "architecture": {
            "name": "faimed3d DynamicUnet3D (ResNet-18 3D encoder) denoiser per sequence + dual-encoder bottleneck ResNet 3D per task, narrow (Bressem et al. 2022 trees)",
            "hyperparameters": {
                **hyperparameters,
                "models": MODELS,
                "narrower_than_published": "classifier stem 16 channels, planes 8/16/32/64, one bottleneck block per stage (published 128, 64/128/256/512, 3/4/23/3); denoiser stem 8, planes 8/16/32/32, one basic block per stage (published 32, 64/128/256/512, 2/2/2/2)",
            },
        },
        "preprocessing": {
            **settings,
            "demo_deviation": "grid 20x112x112 at 3.5x2x2 mm (same 224 mm field) instead of 20x224x224 at 3.5x1x1; the classifier sees the central 96x96 of it (192 mm) at 16x96x96 instead of the whole grid at 16x192x192; N4 4 levels x 10 iterations fitted on the grid shrunk 4x in-plane instead of 4 x 50 at full resolution",
        },
        "outputs": [
            {"name": task, "concept": CONCEPTS[task], "threshold": round(thresholds[task], 4), "description": f"softmax probability of class 1 of its own model: {text}; threshold chosen on the validation phantoms (Youden)"}
            for task, text in TASKS.items()
        ],
        "training": {
            "classifiers": (
                f"demonstration recipe, not the paper's: (a) each task model, whole, on {recipe.patch_size[0]}x{recipe.patch_size[1]}x{recipe.patch_size[2]} patches of its "
                "training volumes, label 1 when centred on a lesion behind its output (phantom ground-truth centres: "
                + "; ".join(f"{task}: {', '.join(types)}" for task, types in LESION_TYPES.items())
                + f") and 0 away from all of them ({recipe.hard_negatives:.0%} of those cut from lesion-free studies where other studies have lesions); "
                "(b) encoder frozen, the head on whole studies' max-pooled features with the study labels. "
                "The paper trained end to end on whole studies; on phantoms that did not learn (validation AUC 0.4-0.6)"
            ),
            "denoisers": "denoising auto-encoders on the phantoms' preprocessed volumes (no cleaner second acquisition exists)",
        },
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
            "optimizer": "Adam",
            "classifier_loss": "cross-entropy; whole studies with class weights (neg, pos) = (prevalence, 1 - prevalence) as in spa, patches balanced",
            "denoiser_loss": "MSE",
            "augmentation": "left-right mirror p=0.5 (patches; whole studies: every study and its mirror image), Gaussian noise (denoisers)",
        },
        extra={
            "thresholds": thresholds,
            "validation": validation_metrics,
            "data": {"training": training, "validation": held},
            **({} if base is None else {"base": {"pack": f"{base.manifest.name} {base.manifest.version}", "weights_sha256": base.manifest.weights.sha256, "retrained": tasks, "training": json.loads((base.folder / TRAINING_REPORT).read_text())}}),
        },
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
