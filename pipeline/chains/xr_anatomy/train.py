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

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from pipeline.evaluation import (
    BOOTSTRAP_RESAMPLES,
    auc,
    evaluate_binary,
    plot_roc,
    threshold_metrics,
)
from pipeline.packs import HELD_OUT, ModelPack, update_evaluation, write_pack
from pipeline.training import count_parameters, seed_ranges, split_by_patient

from .data import LEFT_ILIUM, RIGHT_ILIUM, SACRUM, PhantomRadiograph, find_radiographs
from .importer import PUBLISHED_THRESHOLD
from .joints import Box, JointRegionError, ilium_classes, joint_regions
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
    "segmentation": {"size": [192, 192], "gaussian_sigma": 0.1, "roi_size": [192, 192], "overlap": 0.75},
    "joint_region": {"dilation_fraction": 0.05},
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


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


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
    studies: Sequence[PhantomRadiograph], preprocessing: dict[str, Any], seed: int, progress: bool
) -> dict[str, torch.Tensor]:
    """Segmenter inputs/targets, and two classifier crops per study with their lesion masks, as tensors."""
    segmentation = SegmentationSettings.from_manifest(preprocessing)
    classification = ClassificationSettings.from_manifest(preprocessing)
    resize = classifier_transform(classification)
    rng = np.random.default_rng(seed)
    columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("images", "targets", "crops", "jittered", "lesions", "lesions_jittered")}
    labels, grades = [], []
    start = time.perf_counter()
    for index, study in enumerate(studies):
        gray = radiograph_gray(study.dataset())
        truth = study.anatomy_labels()
        lesions = study.lesion_mask()
        columns["images"].append(segmenter_input(gray, segmentation)[0].half())
        columns["targets"].append(torch.as_tensor(labels_to_grid(truth, segmentation.size))[None])
        # The phantom is displayed L\F: the left ilium lies on the image's right.
        box = joint_regions(truth, ilium_classes(truth, LEFT_ILIUM, RIGHT_ILIUM, True), SACRUM).box
        for suffix, region in (("", box), ("_jittered", jitter_box(box, gray.shape, rng))):
            crop_key = "crops" if not suffix else "jittered"
            columns[crop_key].append(plain(classifier_input(gray[region.slices], classification)).half())
            mask = MetaTensor(torch.as_tensor(lesions[region.slices], dtype=torch.float32)[None])
            columns["lesions" + suffix].append((plain(resize(mask)) > 0.5).to(torch.uint8))
        labels.append(int(study.positive))
        grades.append(study.grades)
        if progress and (index + 1) % 20 == 0:
            _log(True, f"  prepared {index + 1}/{len(studies)} studies ({time.perf_counter() - start:.0f} s)")
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
    epochs: int, seed: int, progress: bool,
) -> dict[str, float]:
    from monai.losses import DiceCELoss

    generator = torch.Generator().manual_seed(seed)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(segmenter.parameters(), lr=3e-3, weight_decay=1e-5)
    batch = 8
    steps = max(1, epochs * int(np.ceil(len(train_idx) / batch)))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    val_loss = float("nan")
    train_t = torch.as_tensor(train_idx)
    for epoch in range(epochs):
        segmenter.train()
        order = train_t[torch.randperm(len(train_t), generator=generator)]
        total = 0.0
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            images, targets = data["images"][index].float(), data["targets"][index]
            if torch.rand(1, generator=generator) < 0.5:
                images, targets = _flip_segmentation(images, targets)
            images = images * (1 + 0.2 * (torch.rand(1, generator=generator) - 0.5))  # contrast jitter
            loss = loss_fn(segmenter(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        val_loss = _segmenter_loss(segmenter, data, val_idx, loss_fn)
        _log(progress, f"  segmenter epoch {epoch + 1}/{epochs}: train {total / len(order):.4f}, validation {val_loss:.4f}")
    segmenter.eval()
    return {"epochs": epochs, "validation_loss": round(val_loss, 4), "dice": _dice(segmenter, data, val_idx)}


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
    epochs: int, seed: int, progress: bool,
) -> dict[str, float]:
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
    val_loss = val_auc = float("nan")
    train_t = torch.as_tensor(train_idx)
    try:
        for epoch in range(epochs):
            classifier.train()
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
                gamma = torch.exp(0.2 * (torch.rand(len(index), 1, 1, 1, generator=generator) - 0.5))
                x = x.clamp_min(0) ** gamma  # brightness jitter, stays in [0, 1]
                loss = loss_fn(classifier(x), targets) + LESION_WEIGHT * probe.loss(lesions)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(index)
            val_loss, val_auc = _classifier_validation(classifier, data, val_idx, loss_fn)
            _log(progress, f"  classifier epoch {epoch + 1}/{epochs}: train {total / len(order):.4f}, validation {val_loss:.4f} (AUC {val_auc:.3f})")
    finally:
        probe.remove()
    classifier.eval()
    return {"epochs": epochs, "validation_loss": round(val_loss, 4), "validation_auc_ground_truth_crops": round(val_auc, 4)}


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
    torch.manual_seed(seed)
    started = time.perf_counter()
    studies = find_radiographs(data)
    train_idx, val_idx = split(studies, seed)
    _log(progress, f"xr-anatomy: {len(studies)} phantom radiographs ({len(train_idx)} training, {len(val_idx)} validation)")
    tensors = prepare(studies, DEMO_PREPROCESSING, seed, progress)
    prepared_s = time.perf_counter() - started
    networks = build_networks(DEMO_HYPERPARAMETERS)
    segmenter_report = train_segmenter(
        networks.segmenter, tensors, train_idx, val_idx, epochs or SEGMENTER_EPOCHS, seed, progress
    )
    classifier_report = train_classifier(
        networks.classifier, tensors, train_idx, val_idx, epochs or CLASSIFIER_EPOCHS, seed, progress
    )
    validation = _validate_pipeline(networks, [studies[i] for i in val_idx], progress)
    elapsed = time.perf_counter() - started
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
    _log(progress, f"xr-anatomy: wrote {pack.folder} in {elapsed:.0f} s")
    return pack


def _validate_pipeline(networks: Networks, studies: Sequence[PhantomRadiograph], progress: bool) -> dict[str, Any]:
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
    _log(progress, f"  validation (whole pipeline): {summary}")
    return summary


# -------------------------------------------------------------------------------- evaluation
def evaluate(pack: ModelPack, data: Path, out: Path) -> dict[str, Any]:
    """Held-out evaluation of a pack: AUC, balanced accuracy, sensitivity and specificity at the
    pack's threshold with bootstrap 95 % CIs, a ROC plot, and segmentation quality (Dice per class,
    the share of each ground-truth joint inside the crop box)."""
    from .inference import AnatomyAwareModel

    torch.set_num_threads(1)
    threshold = pack.manifest.output("radiographic_sacroiliitis").threshold
    model = AnatomyAwareModel.from_pack(pack.manifest, pack.load_state_dict())
    studies = find_radiographs(data)
    rows = []
    for study in studies:
        truth = study.anatomy_labels()
        joints = study.joint_masks()
        try:
            analysis = model.analyze(study.dataset(), with_gradcam=False)
        except JointRegionError as error:
            rows.append({"study": study.folder.name, "label": int(study.positive), "probability": 0.0, "error": str(error)})
            continue
        labels = analysis.labels
        # the network's ilium classes by patient side (it may have swapped them), against the truth's
        classes = (("sacrum", SACRUM, SACRUM), ("left_ilium", analysis.classes["left"], LEFT_ILIUM), ("right_ilium", analysis.classes["right"], RIGHT_ILIUM))
        dice = {name: _dice_score(labels == found, truth == expected) for name, found, expected in classes}
        coverage = {side: float(joints[side][analysis.crop.box.slices].sum()) / max(int(joints[side].sum()), 1) for side in joints}
        rows.append(
            {
                "study": study.folder.name,
                "label": int(study.positive),
                "grades": list(study.grades),
                "probability": round(analysis.probability, 5),
                "dice": {k: round(v, 4) for k, v in dice.items()},
                "joint_coverage": {k: round(v, 4) for k, v in coverage.items()},
                "fallbacks": analysis.crop.fallbacks,
            }
        )
    labels = np.array([r["label"] for r in rows])
    scores = np.array([r["probability"] for r in rows])
    estimates = evaluate_binary(labels, scores, threshold)
    metrics = {name: estimates[name].as_dict() for name in ("auc", "balanced_accuracy", "sensitivity", "specificity")}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    roc = plot_roc({pack.manifest.name: (labels, scores)}, out / "roc.png", "xr-anatomy: radiographic sacroiliitis")
    segmented = [r for r in rows if "dice" in r]
    summary = {
        "n": len(rows),
        "positives": int(labels.sum()),
        "threshold": threshold,
        "segmentation_dice_mean": {
            k: round(float(np.mean([r["dice"][k] for r in segmented])), 4) for k in ("sacrum", "left_ilium", "right_ilium")
        } if segmented else {},
        "joint_coverage_min": round(float(min(min(r["joint_coverage"].values()) for r in segmented)), 4) if segmented else None,
        "failures": [r["study"] for r in rows if "error" in r],
    }
    report_path = out / "evaluation.json"
    report_path.write_text(json.dumps({"pack": pack.manifest.name, "version": pack.manifest.version, "metrics": metrics, **summary, "studies": rows}, indent=2) + "\n")
    (out / "evaluation.md").write_text(_markdown(pack, metrics, summary, data))
    if out.resolve() == pack.folder.resolve():
        # the manifest then says what the pack was measured to do
        update_evaluation(pack, HELD_OUT, held_out_summary(metrics, summary, studies))
    return {"variants": {"": metrics}, "roc_png": str(roc), "report": str(report_path), **summary}


def held_out_summary(
    metrics: dict[str, dict[str, float]], summary: dict[str, Any], studies: Sequence[PhantomRadiograph]
) -> dict[str, Any]:
    """The held-out evaluation as the manifest records it (``evaluation.held_out``)."""
    return {
        "data": (
            f"{summary['n']} phantom radiographs (seeds {seed_ranges([s.seed for s in studies])}, "
            f"{summary['positives']} with radiographic "
            "sacroiliitis), none among the training studies"
        ),
        **{name: {k: round(v, 4) for k, v in m.items()} for name, m in metrics.items()},
        "segmentation_dice_mean": summary["segmentation_dice_mean"],
        "report": "evaluation.md",
    }


def _markdown(pack: ModelPack, metrics: dict[str, dict[str, float]], summary: dict[str, Any], data: Path) -> str:
    lines = [
        f"# Evaluation of {pack.manifest.name} {pack.manifest.version}",
        "",
        (
            f"{summary['n']} held-out phantom radiographs ({summary['positives']} with radiographic sacroiliitis) "
            f"from `{data.name}`; decision at p >= {summary['threshold']:g}; 95 % CIs by bootstrap over studies "
            f"({BOOTSTRAP_RESAMPLES} resamples)."
        ),
        "",
        "| metric | value | 95 % CI |",
        "|---|---|---|",
    ]
    for name, m in metrics.items():
        lines.append(f"| {name} | {m['value']:.3f} | {m['ci95_low']:.3f}–{m['ci95_high']:.3f} |")
    lines += [
        "",
        f"Segmentation Dice (mean, full resolution): {summary['segmentation_dice_mean']}.",
        f"Smallest share of a ground-truth joint inside the crop box: {summary['joint_coverage_min']}.",
        f"Studies without a joint region: {summary['failures'] or 'none'}.",
        "",
        "ROC curve: `roc.png`. Per-study numbers: `evaluation.json`.",
        "",
    ]
    return "\n".join(lines)
