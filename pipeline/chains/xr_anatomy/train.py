"""Training and evaluation of the xr-anatomy demonstration pack on phantom radiographs.

``sijnode train xr-anatomy --data DIR --out PACK`` and ``sijnode evaluate PACK --data DIR``.

Training (CPU, one torch thread):

1. Every study is read once: the segmenter's input and the ground-truth class map on its grid
   (sacrum over ilium where the projections overlap, see :mod:`.data`), and the classifier's
   input for two crops -- the joint box that the published rule (:mod:`.joints`) finds on the
   ground-truth masks, and the same box with each edge moved by up to 8 % (a segmenter is never
   exact, so the classifier should not depend on the box to the pixel).
2. The segmenter learns the four classes (Dice + cross-entropy); flips swap the ilium classes,
   so class 2 stays "the ilium on the image's right", as in an L\\F radiograph.
3. The classifier learns radiographic sacroiliitis (class-weighted cross-entropy) from one of
   the two crops per study and epoch, flipped at random (the mNY criterion is symmetric), half
   of them recombined from two studies' joints (:func:`mix_halves`), with an auxiliary lesion
   map loss that is dropped after training (:class:`LesionProbe`).

Both use a one-cycle learning rate that anneals to nearly zero, and keep the last epoch (on a
few dozen validation studies the best-epoch choice is noise); a seeded, stratified 15 % of the
patients (:func:`pipeline.training.split_by_patient`) is held out for the validation numbers in
the manifest. The demo
sizes are in :data:`DEMO_HYPERPARAMETERS` / :data:`DEMO_PREPROCESSING`; the published ones give
a 140 MB pack and would not train on a CPU in the time allowed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from pipeline.evaluation import (
    CaseResult,
    OutputSpec,
    auc,
    evaluation_report,
    manifest_summary,
    pack_identity,
    threshold_metrics,
    write_evaluation,
)
from pipeline.packs import HELD_OUT, ModelPack, update_evaluation, write_pack
from pipeline.training import (
    FitResult,
    count_parameters,
    fit,
    optimizer_step,
    progress_display,
    seed_everything,
    seed_ranges,
    split_by_patient,
    write_training_report,
)

from .data import LEFT_ILIUM, RIGHT_ILIUM, SACRUM, PhantomRadiograph, find_radiographs
from .importer import PUBLISHED_THRESHOLD
from .joints import Box, JointRegionError, ilium_classes, joint_regions, trimmed
from .model import Networks, build_networks
from .preprocess import (
    ClassificationSettings,
    SegmentationSettings,
    classifier_input,
    classifier_transform,
    labels_to_grid,
    plain,
    radiograph_gray,
    segmenter_input,
)

DEMO_HYPERPARAMETERS: dict[str, Any] = {
    "segmenter": {"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 2, "classes": 4},
    "classifier": {
        "block": "basic",  # ResNet-18 layout, a quarter of its width
        "layers": [2, 2, 2, 2],
        "block_inplanes": [16, 32, 64, 128],
        "head_hidden": 128,
        "dropout": 0.2,
        "classes": 2,
    },
}
DEMO_PREPROCESSING: dict[str, Any] = {
    # resample "probabilities" (a deviation from the app, which resamples the argmax labels): at
    # 192² one grid cell is 8-12 radiograph pixels, and a crop edge that jumps by a cell moved the
    # demo classifier's probability by up to 0.25 (see SegmentationSettings).
    "segmentation": {"size": [192, 192], "gaussian_sigma": 0.1, "roi_size": [192, 192], "overlap": 0.75, "resample": "probabilities"},
    "joint_region": {"dilation_fraction": 0.05, "otsu_trim": True},
    "gradcam": {"target": "predicted", "eigen_smooth": True},
    "classification": {
        "size": [208, 314],  # half the published 416×628, same aspect
        "median_size": 3,
        "unsharp_weight": 0.6,
        "unsharp_sigma": 1.0,
        "clahe_clip_limit": 0.01,
    },
}
THRESHOLD = PUBLISHED_THRESHOLD  # the demo pack operates where the published model did
SEGMENTER_EPOCHS = 20
CLASSIFIER_EPOCHS = 45
VALIDATION_FRACTION = 0.15
BOX_JITTER = 0.08
CLASSIFIER_LR = 2e-3
CLASSIFIER_WEIGHT_DECAY = 1e-4
LESION_WEIGHT = 1.0  # the auxiliary lesion-map loss (LesionProbe), relative to the classification loss
LESION_POS_WEIGHT = 4.0  # lesions cover a few per cent of the crop
CLASSIFIER_BATCH = 8
MIX_FRACTION = 0.5  # share of each batch whose halves come from two studies (mix_halves)


OUTPUT = "radiographic_sacroiliitis"


# -------------------------------------------------------------------------------------- data
def jitter_box(box: Box, shape: Sequence[int], rng: np.random.Generator, fraction: float = BOX_JITTER) -> Box:
    """``box`` with each edge moved by up to ``fraction`` of the box's height or width, inside the image."""
    height, width = box.r1 - box.r0, box.c1 - box.c0
    dr = rng.uniform(-fraction, fraction, 2) * height
    dc = rng.uniform(-fraction, fraction, 2) * width
    r0 = int(np.clip(box.r0 + dr[0], 0, shape[0] - 2))
    c0 = int(np.clip(box.c0 + dc[0], 0, shape[1] - 2))
    r1 = int(np.clip(box.r1 + dr[1], r0 + 2, shape[0]))
    c1 = int(np.clip(box.c1 + dc[1], c0 + 2, shape[1]))
    return Box(r0, c0, r1, c1)


def prepare(
    studies: Sequence[PhantomRadiograph], preprocessing: dict[str, Any], seed: int, bar: Any = None
) -> dict[str, torch.Tensor]:
    """Segmenter inputs/targets, and two classifier crops per study with their lesion masks, as tensors."""
    segmentation = SegmentationSettings.from_manifest(preprocessing)
    classification = ClassificationSettings.from_manifest(preprocessing)
    resize = classifier_transform(classification)
    rng = np.random.default_rng(seed)
    columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("images", "targets", "crops", "jittered", "lesions", "lesions_jittered")}
    labels, grades = [], []
    task = bar.add_task("prepare radiographs", total=len(studies), status="") if bar is not None else None
    for study in studies:
        gray = radiograph_gray(study.dataset())
        truth = study.anatomy_labels()
        lesions = study.lesion_mask()
        columns["images"].append(segmenter_input(gray, segmentation)[0].half())
        columns["targets"].append(torch.as_tensor(labels_to_grid(truth, segmentation.size))[None])
        # The phantom is displayed L\F: the left ilium lies on the image's right.
        crop = joint_regions(truth, ilium_classes(truth, LEFT_ILIUM, RIGHT_ILIUM, True), SACRUM)
        box = (trimmed(crop, gray) if preprocessing.get("joint_region", {}).get("otsu_trim") else crop).box
        for suffix, region in (("", box), ("_jittered", jitter_box(box, gray.shape, rng))):
            crop_key = "crops" if not suffix else "jittered"
            columns[crop_key].append(plain(classifier_input(gray[region.slices], classification)).half())
            mask = MetaTensor(torch.as_tensor(lesions[region.slices], dtype=torch.float32)[None])
            columns["lesions" + suffix].append((plain(resize(mask)) > 0.5).to(torch.uint8))
        labels.append(int(study.positive))
        grades.append(study.grades)
        if bar is not None:
            bar.advance(task)
    tensors = {k: torch.stack(v) for k, v in columns.items()}
    tensors["targets"] = tensors["targets"].long()
    tensors["labels"] = torch.as_tensor(labels)
    tensors["grades"] = torch.as_tensor(grades)  # mNY grade (left, right) of each study
    return tensors


def split(studies: Sequence[PhantomRadiograph], seed: int) -> tuple[list[int], list[int]]:
    """Seeded training / validation indices, patient-wise and stratified by label."""
    return split_by_patient(
        range(len(studies)),
        VALIDATION_FRACTION,
        seed,
        patient=lambda i: studies[i].patient_id,
        label=lambda i: studies[i].positive,
    )


# ---------------------------------------------------------------------------------- training
def _flip_segmentation(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror left-right; the ilium classes swap so that each still names its image side."""
    images, targets = images.flip(-1), targets.flip(-1)
    swapped = targets.clone()
    swapped[targets == LEFT_ILIUM] = RIGHT_ILIUM
    swapped[targets == RIGHT_ILIUM] = LEFT_ILIUM
    return images, swapped


def train_segmenter(
    segmenter: nn.Module, data: dict[str, torch.Tensor], train_idx: list[int], val_idx: list[int],
    epochs: int, seed: int, bar: Any = None,
) -> FitResult:
    """Dice + cross-entropy, one-cycle schedule, left-right flips (ilium classes swapped) and contrast jitter; keeps the last epoch."""
    from monai.losses import DiceCELoss

    generator = torch.Generator().manual_seed(seed)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(segmenter.parameters(), lr=3e-3, weight_decay=1e-5)
    batch = 8
    steps = max(1, epochs * int(np.ceil(len(train_idx) / batch)))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    train_t = torch.as_tensor(train_idx)

    def train_epoch(epoch: int) -> dict[str, float]:
        order = train_t[torch.randperm(len(train_t), generator=generator)]
        total = 0.0
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            images, targets = data["images"][index].float(), data["targets"][index]
            if torch.rand(1, generator=generator) < 0.5:
                images, targets = _flip_segmentation(images, targets)
            images = images * (1 + 0.2 * (torch.rand(1, generator=generator) - 0.5))  # contrast jitter
            total += optimizer_step(optimizer, loss_fn(segmenter(images), targets), schedule) * len(index)
        return {"train_loss": total / len(order)}

    result = fit(
        segmenter, epochs, train_epoch, lambda: {"validation_loss": _segmenter_loss(segmenter, data, val_idx, loss_fn)},
        phase="segmenter", selection="last", progress=bar,
    )
    if result.history:
        result.history[-1]["dice"] = _dice(segmenter, data, val_idx)
    return result


def _segmenter_loss(segmenter: nn.Module, data: dict[str, torch.Tensor], index: list[int], loss_fn: nn.Module) -> float:
    if not index:
        return float("nan")
    segmenter.eval()
    with torch.no_grad():
        images, targets = data["images"][index].float(), data["targets"][index]
        return float(loss_fn(segmenter(images), targets))


def _dice(segmenter: nn.Module, data: dict[str, torch.Tensor], index: list[int]) -> dict[str, float]:
    """Mean Dice per class on the segmenter's grid."""
    if not index:
        return {}
    with torch.no_grad():
        predicted = segmenter(data["images"][index].float()).argmax(1)
    truth = data["targets"][index][:, 0]
    scores = {}
    for name, value in (("sacrum", SACRUM), ("left_ilium", LEFT_ILIUM), ("right_ilium", RIGHT_ILIUM)):
        p, t = predicted == value, truth == value
        inter = (p & t).flatten(1).sum(1).float()
        denom = (p.flatten(1).sum(1) + t.flatten(1).sum(1)).float().clamp_min(1)
        scores[name] = round(float((2 * inter / denom).mean()), 4)
    return scores


def _dice_score(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Dice of two boolean masks (0 when both are empty)."""
    return 2 * float((predicted & actual).sum()) / max(int(predicted.sum() + actual.sum()), 1)


class LesionProbe(nn.Module):
    """Training only: a 1×1 convolution on the classifier's third stage that predicts where the
    radiograph shows lesions. Two hundred labels of "radiographic sacroiliitis yes/no" say little
    about *what* to look at; the phantom's lesion masks say it for every pixel, and this auxiliary
    task carries that into the backbone. The probe is dropped after training: the pack holds the
    published architecture only."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        channels = [m for m in classifier.layer3.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.conv = nn.Conv2d(channels, 1, 1)
        self.features: torch.Tensor | None = None
        self.handle = classifier.layer3.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        self.features = output

    def loss(self, lesions: torch.Tensor) -> torch.Tensor:
        assert self.features is not None
        logits = self.conv(self.features)
        target = nn.functional.adaptive_max_pool2d(lesions.float(), logits.shape[-2:])
        return nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(LESION_POS_WEIGHT))

    def remove(self) -> None:
        self.handle.remove()


def mix_halves(
    x: torch.Tensor, lesions: torch.Tensor, grades: torch.Tensor, flipped: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recombine joints across studies: a share MIX_FRACTION of the batch gets its image-right
    half from another study, and its label by the mNY rule from the two halves' grades.

    The crop is centred on the sacrum with one joint in each half, so a half is one joint, and
    the patient's side it shows is known (L\\F display: the image's left half is the patient's
    right joint, unless flipped). Two hundred studies give two hundred labels; their halves give
    forty thousand combinations, and teach the classifier that the criterion is per side
    (bilateral grade >= 2 or unilateral >= 3) rather than a lesion count.
    """
    # grade shown in the image's left / right half of each sample
    left_half = torch.where(flipped, grades[:, 0], grades[:, 1])
    right_half = torch.where(flipped, grades[:, 1], grades[:, 0])
    mixed = torch.rand(len(x), generator=generator) < MIX_FRACTION
    partner = torch.randperm(len(x), generator=generator)
    middle = x.shape[-1] // 2
    x, lesions = x.clone(), lesions.clone()
    x[mixed, ..., middle:] = x[partner[mixed], ..., middle:]
    lesions[mixed, ..., middle:] = lesions[partner[mixed], ..., middle:]
    right_half = torch.where(mixed, right_half[partner], right_half)
    low, high = torch.minimum(left_half, right_half), torch.maximum(left_half, right_half)
    targets = ((low >= 2) | (high >= 3)).long()
    return x, lesions, targets


def train_classifier(
    classifier: nn.Module, data: dict[str, torch.Tensor], train_idx: list[int], val_idx: list[int],
    epochs: int, seed: int, bar: Any = None,
) -> FitResult:
    """Class-weighted cross-entropy + the lesion probe, one-cycle schedule; keeps the last epoch."""
    generator = torch.Generator().manual_seed(seed + 1)
    labels = data["labels"]
    counts = torch.bincount(labels[train_idx], minlength=2).float().clamp_min(1)
    loss_fn = nn.CrossEntropyLoss(weight=counts.sum() / (2 * counts))
    probe = LesionProbe(classifier)
    parameters = list(classifier.parameters()) + list(probe.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=CLASSIFIER_LR, weight_decay=CLASSIFIER_WEIGHT_DECAY)
    batch = CLASSIFIER_BATCH
    steps = max(1, epochs * int(np.ceil(len(train_idx) / batch)))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=CLASSIFIER_LR, total_steps=steps, pct_start=0.2)
    train_t = torch.as_tensor(train_idx)

    def train_epoch(epoch: int) -> dict[str, float]:
        order = train_t[torch.randperm(len(train_t), generator=generator)]
        total = 0.0
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            if len(index) < 2:  # BatchNorm1d in the head needs two samples
                continue
            use_jittered = (torch.rand(len(index), generator=generator) < 0.5)[:, None, None, None]
            x = torch.where(use_jittered, data["jittered"][index], data["crops"][index]).float()
            lesions = torch.where(use_jittered, data["lesions_jittered"][index], data["lesions"][index])
            flip = (torch.rand(len(index), generator=generator) < 0.5)[:, None, None, None]
            x = torch.where(flip, x.flip(-1), x)
            lesions = torch.where(flip, lesions.flip(-1), lesions)
            x, lesions, targets = mix_halves(x, lesions, data["grades"][index], flip.flatten(), generator)
            x = augment_intensity(x, generator)
            total += optimizer_step(optimizer, loss_fn(classifier(x), targets) + LESION_WEIGHT * probe.loss(lesions), schedule) * len(index)
        return {"train_loss": total / len(order)}

    def validate() -> dict[str, float]:
        loss, area = _classifier_validation(classifier, data, val_idx, loss_fn)
        return {"validation_loss": loss, "validation_auc_ground_truth_crops": area}

    try:
        return fit(classifier, epochs, train_epoch, validate, phase="classifier", selection="last", progress=bar)
    finally:
        probe.remove()


def augment_intensity(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness (gamma) jitter per sample, staying in [0, 1]."""
    gamma = torch.exp(0.2 * (torch.rand(len(x), 1, 1, 1, generator=generator) - 0.5))
    return x.clamp_min(0) ** gamma


def _classifier_validation(classifier: nn.Module, data: dict[str, torch.Tensor], index: list[int], loss_fn: nn.Module) -> tuple[float, float]:
    if not index:
        return float("nan"), float("nan")
    classifier.eval()
    with torch.no_grad():
        logits = classifier(data["crops"][index].float())
    labels = data["labels"][index]
    scores = torch.softmax(logits, 1)[:, 1].numpy()
    return float(loss_fn(logits, labels)), auc(labels.numpy(), scores)


def train(data: Path, out: Path, *, epochs: int | None = None, seed: int = 0, progress: bool = True) -> ModelPack:
    """Train the demonstration pack on the phantom radiographs below ``data``; write it to ``out``."""
    from pipeline.phantom import GENERATOR_VERSION

    torch.set_num_threads(1)  # the node's CPU is shared
    seed_everything(seed)
    started = time.perf_counter()
    studies = find_radiographs(data)
    train_idx, val_idx = split(studies, seed)
    with progress_display(progress) as bar:
        tensors = prepare(studies, DEMO_PREPROCESSING, seed, bar)
        prepared_s = time.perf_counter() - started
        networks = build_networks(DEMO_HYPERPARAMETERS)
        segmenter_fit = train_segmenter(networks.segmenter, tensors, train_idx, val_idx, epochs or SEGMENTER_EPOCHS, seed, bar)
        classifier_fit = train_classifier(networks.classifier, tensors, train_idx, val_idx, epochs or CLASSIFIER_EPOCHS, seed, bar)
        validation = _validate_pipeline(networks, [studies[i] for i in val_idx])
    elapsed = time.perf_counter() - started
    segmenter_report = {"epochs": len(segmenter_fit.history), **{k: v for k, v in segmenter_fit.history[-1].items() if k in ("validation_loss", "dice")}}
    classifier_report = {"epochs": len(classifier_fit.history), **{k: v for k, v in classifier_fit.history[-1].items() if k.startswith("validation")}}
    manifest = {
        "name": "xr-anatomy-demo",
        "version": "1.0.0",
        "chain": "xr-anatomy",
        "demo": True,
        "architecture": {
            "name": (
                "anatomy-aware pipeline of Dorfner et al. 2024 at demonstration size: MONAI UNet "
                "8/16/32/64 on 192x192 (published 64/128/256/512 on 768x768) and a quarter-width "
                "ResNet-18-layout MONAI ResNet on 208x314 crops (published ResNet-50 on 416x628)"
            ),
            "hyperparameters": DEMO_HYPERPARAMETERS,
        },
        "preprocessing": DEMO_PREPROCESSING,
        "outputs": [
            {
                "name": "radiographic_sacroiliitis",
                "concept": "radiographic sacroiliitis",
                "threshold": THRESHOLD,
                "description": "softmax probability of class 1; the published cut-off 0.59 is kept",
            }
        ],
        "training_data": (
            f"{len(studies)} phantom AP pelvic radiographs (pipeline.phantom {GENERATOR_VERSION}, seeds "
            f"{seed_ranges([s.seed for s in studies])}, {sum(s.positive for s in studies)} with radiographic sacroiliitis), "
            f"{len(train_idx)} for training and {len(val_idx)} for validation; segmentation targets from "
            "the phantom's sacrum and ilium masks, labels from the phantom's modified New York grades."
        ),
        "intended_use": (
            "Demonstration and testing of the xr-anatomy chain only. Trained on synthetic phantoms: "
            "its outputs on real radiographs mean nothing. Not for diagnosis."
        ),
        "evaluation": {
            "validation": validation,
            "segmenter": segmenter_report,
            "classifier": classifier_report,
            "parameters": {
                "segmenter": count_parameters(networks.segmenter),
                "classifier": count_parameters(networks.classifier),
            },
            "training_seconds": round(elapsed, 1),
            "preparation_seconds": round(prepared_s, 1),
            "seed": seed,
        },
    }
    pack = write_pack(out, manifest, networks.state_dict())
    write_training_report(
        Path(out),
        chain="xr-anatomy",
        seed=seed,
        seconds=elapsed,
        parameters=count_parameters(networks.segmenter) + count_parameters(networks.classifier),
        phases=[segmenter_fit, classifier_fit],
        split={"training": [studies[i].folder.name for i in train_idx], "validation": [studies[i].folder.name for i in val_idx]},
        recipe={
            "hyperparameters": DEMO_HYPERPARAMETERS,
            "preprocessing": DEMO_PREPROCESSING,
            "validation_fraction": VALIDATION_FRACTION,
            "box_jitter": BOX_JITTER,
            "classifier_lr": CLASSIFIER_LR,
            "classifier_weight_decay": CLASSIFIER_WEIGHT_DECAY,
            "classifier_batch": CLASSIFIER_BATCH,
            "lesion_weight": LESION_WEIGHT,
            "lesion_pos_weight": LESION_POS_WEIGHT,
            "mix_fraction": MIX_FRACTION,
            "optimizer": "AdamW, one-cycle learning rate; the last epoch is kept",
        },
        extra={"validation": validation, "preparation_seconds": round(prepared_s, 1)},
    )
    return pack


def _validate_pipeline(networks: Networks, studies: Sequence[PhantomRadiograph]) -> dict[str, Any]:
    """The whole pipeline (predicted segmentation → crop → classifier) on the validation studies."""
    from .inference import AnatomyAwareModel

    if not studies:
        return {}
    model = AnatomyAwareModel(networks, DEMO_PREPROCESSING)
    scores, labels = [], []
    for study in studies:
        try:
            scores.append(model.analyze(study.dataset(), with_gradcam=False).probability)
        except JointRegionError:
            scores.append(0.0)
        labels.append(int(study.positive))
    metrics = threshold_metrics(np.array(labels), np.array(scores), THRESHOLD)
    summary = {"n": len(studies), "auc": round(auc(np.array(labels), np.array(scores)), 4)}
    summary.update({k: round(metrics[k], 4) for k in ("balanced_accuracy", "sensitivity", "specificity")})
    return summary


# -------------------------------------------------------------------------------- evaluation
def evaluate(pack: ModelPack, data: Path, out: Path) -> dict[str, Any]:
    """Held-out evaluation of a pack in the shared report (:mod:`pipeline.evaluation`): AUC,
    sensitivity, specificity, ... at the pack's threshold with bootstrap 95 % CIs, per-subgroup
    sensitivity/specificity (mNY grade, lesion kinds), a ROC plot; per study also segmentation
    quality (Dice per class, the share of each ground-truth joint inside the crop box)."""
    from .inference import AnatomyAwareModel

    torch.set_num_threads(1)
    started = time.perf_counter()
    threshold = pack.manifest.output(OUTPUT).threshold
    model = AnatomyAwareModel.from_pack(pack.manifest, pack.load_state_dict())
    studies = find_radiographs(data)
    results = []
    for study in studies:
        truth = study.anatomy_labels()
        joints = study.joint_masks()
        case = CaseResult(
            study=study.folder.name,
            probabilities={OUTPUT: None},
            labels={OUTPUT: int(study.positive)},
            subgroups=study.subgroups,
            details={"seed": study.seed, "grades": list(study.grades)},
        )
        try:
            analysis = model.analyze(study.dataset(), with_gradcam=False)
        except JointRegionError as error:
            case.error = str(error)
            results.append(case)
            continue
        labels = analysis.labels
        # the network's ilium classes by patient side (it may have swapped them), against the truth's
        classes = (("sacrum", SACRUM, SACRUM), ("left_ilium", analysis.classes["left"], LEFT_ILIUM), ("right_ilium", analysis.classes["right"], RIGHT_ILIUM))
        dice = {name: _dice_score(labels == found, truth == expected) for name, found, expected in classes}
        coverage = {side: float(joints[side][analysis.crop.box.slices].sum()) / max(int(joints[side].sum()), 1) for side in joints}
        case.probabilities[OUTPUT] = analysis.probability
        case.details.update(
            {
                "crop_box": analysis.crop.box.as_list(),
                "dice": {k: round(v, 4) for k, v in dice.items()},
                "joint_coverage": {k: round(v, 4) for k, v in coverage.items()},
                "fallbacks": analysis.crop.fallbacks,
            }
        )
        results.append(case)
    segmented = [c.details for c in results if "dice" in c.details]
    extra = {
        "segmentation_dice_mean": {
            k: round(float(np.mean([d["dice"][k] for d in segmented])), 4) for k in ("sacrum", "left_ilium", "right_ilium")
        } if segmented else {},
        "joint_coverage_min": round(float(min(min(d["joint_coverage"].values()) for d in segmented)), 4) if segmented else None,
    }
    manifest = pack.manifest
    seeds = seed_ranges([s.seed for s in studies])
    report = evaluation_report(
        results,
        [OutputSpec(OUTPUT, threshold, description="softmax probability of radiographic sacroiliitis (mNY), whole pipeline")],
        pack=pack_identity(manifest),
        data={"folder": str(Path(data)), "studies": len(studies), "seeds": seeds, "label": "radiographic sacroiliitis (modified New York), from ground_truth.json"},
        seconds=time.perf_counter() - started,
        extra=extra,
    )
    outputs = [OutputSpec(OUTPUT, threshold)]
    paths = write_evaluation(
        Path(out), report, results, outputs,
        title=f"Evaluation of {manifest.name} {manifest.version} on {len(results)} held-out phantom radiographs",
        notes=[
            "**Demonstration on synthetic phantoms, not a clinical validation.**",
            "",
            f"Segmentation Dice (mean, full resolution): {extra['segmentation_dice_mean']}. "
            f"Smallest share of a ground-truth joint inside the crop box: {extra['joint_coverage_min']}.",
        ],
    )
    if Path(out).resolve() == pack.folder.resolve():
        # the manifest then says what the pack was measured to do
        summary = manifest_summary(report, f"{len(studies)} phantom radiographs (seeds {seeds}, {report['outputs'][OUTPUT]['positives']} with radiographic sacroiliitis), none among the training studies")
        update_evaluation(pack, HELD_OUT, {**summary, "segmentation_dice_mean": extra["segmentation_dice_mean"]})
    return {"outputs": report["outputs"], "roc_png": str(paths["roc_png"]), "report": str(paths["report"]), **extra}
