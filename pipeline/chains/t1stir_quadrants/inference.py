"""Forward passes of a t1stir-quadrants pack: contouring, regions, the lesion classifier's consensus output, Grad-CAM.

Shared by the chain, ``sijnode evaluate`` and the benchmark, so all three run the same code.

A pack holds three modules in one state dict, keys prefixed by their role: ``contour.`` (the
contouring U-Net), ``classifier.`` (shared ResNet-34 + 14 heads) and ``annotators.`` (the
annotator matrices; at inference only the path to the inter-reader consensus ``R1R2`` is
used, as in the paper).

Everything the chain reports comes from these networks: the contours are walked on the
U-Net's own heatmaps and field (no ground truth at inference), the regions come from those
contours, the probabilities are the consensus node's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydicom import Dataset
from torch import nn

from pipeline.cam import normalize_cam
from pipeline.packs import ModelPack, PackError
from pipeline.phantom.lesions import SIDES
from pipeline.phantom.readers import GRADED_OUTPUTS

from .annotators import INFERENCE_NODE, AnnotatorHierarchy
from .contour import Walk
from .data import SEQUENCES, CoronalSeries, joint_crops, series_of, series_regions, series_volume
from .model import CONTOUR_MAPS, JOINTS, Hyperparameters, QuadrantLesionClassifier, build_contour_unet
from .regions import JointRegions, RegionError
from .train import normalise_slices, walk_outputs

PREFIXES = {"unet": "contour.", "classifier": "classifier.", "annotators": "annotators."}
#: the classifier layer Grad-CAM taps: ResNet-34's third stage (a finer map than the last stage's 2 x 2 on a 64-pixel crop)
CAM_LAYER = "model.encoder.layer3"


@dataclass
class Networks:
    """The pack's three modules, in eval mode."""

    hyperparameters: Hyperparameters
    unet: nn.Module
    classifier: QuadrantLesionClassifier
    annotators: AnnotatorHierarchy

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "classifier": self.classifier, "annotators": self.annotators}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for role, module in self.modules().items():
            state.update({PREFIXES[role] + k: v for k, v in module.state_dict().items()})
        return state

    def to(self, device: str) -> Networks:
        for module in self.modules().values():
            module.to(device)
        return self


def build_networks(hyperparameters: Mapping[str, Any] | Hyperparameters) -> Networks:
    """Fresh networks from a manifest's ``architecture.hyperparameters["networks"]`` (or a :class:`Hyperparameters`)."""
    parameters = hyperparameters if isinstance(hyperparameters, Hyperparameters) else Hyperparameters.from_mapping(hyperparameters)
    return Networks(parameters, build_contour_unet(parameters), QuadrantLesionClassifier(parameters), AnnotatorHierarchy(len(GRADED_OUTPUTS)))


def check_manifest(pack: ModelPack) -> Hyperparameters:
    """The pack's network hyperparameters, after checking it has this chain's 14 outputs."""
    manifest = pack.manifest
    for output in GRADED_OUTPUTS:
        manifest.output(output)
    try:
        return Hyperparameters.from_mapping(manifest.architecture.hyperparameters.get("networks", {}))
    except (TypeError, ValueError) as error:
        raise PackError(f"pack {manifest.name}: {error}") from None


def load_networks(pack: ModelPack, state_dict: Mapping[str, torch.Tensor] | None = None) -> Networks:
    """Build the pack's networks and load its (verified) weights strictly."""
    networks = build_networks(check_manifest(pack))
    weights = pack.load_state_dict() if state_dict is None else state_dict
    unexpected = sorted(k for k in weights if not any(k.startswith(p) for p in PREFIXES.values()))
    if unexpected:
        raise PackError(f"pack {pack.manifest.name}: unexpected weights {unexpected[:5]}")
    for role, module in networks.modules().items():
        prefix = PREFIXES[role]
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(own, strict=True)
        except RuntimeError as error:
            raise PackError(f"pack {pack.manifest.name}: weights {prefix}* do not fit the architecture: {error}") from None
        module.eval()
    return networks


# ------------------------------------------------------------------ contouring


@dataclass
class SeriesContours:
    """One coronal series, its network outputs walked into per-slice contours (224 grid, superior first)."""

    role: str
    datasets: list[Dataset]
    series: CoronalSeries
    contours: list[dict[str, np.ndarray | None]]
    peaks: dict[str, float] = field(default_factory=dict)  # per channel, the highest heatmap value over the slices
    reasons: list[dict[str, str]] = field(default_factory=list)  # per slice, side -> why it has no contour
    confidence: list[dict[str, float]] = field(default_factory=list)  # per slice, side with a contour -> contour_confidence

    @property
    def failures(self) -> dict[str, int]:
        """Walk failure reason -> count (slices x joints)."""
        return count_reasons(self.reasons)

    @property
    def found(self) -> dict[str, int]:
        """Per side, on how many slices its contour was walked."""
        return {side: sum(c.get(side) is not None for c in self.contours) for side in SIDES}


def unet_outputs(unet: nn.Module, images: np.ndarray, batch: int = 2) -> np.ndarray:
    """The contouring U-Net on a series' 224-grid slices (slices, H, W) -> outputs (slices, 8, H, W).

    Two slices at a time: at the published widths one 64-channel map of the first level is 12.8 MB per slice,
    and on 2 CPU threads 18 slices took 12.5 s and 1.0 GB peak RSS in batches of 2 against 13.8 s and 1.9 GB
    in batches of 8 (bench/README.md, t1stir-quadrants study benchmark)."""
    from pipeline.chains.base import inference_context

    inputs = torch.from_numpy(normalise_slices(images)[:, None])
    device = next(unet.parameters()).device
    with inference_context():
        return np.concatenate([unet(inputs[i : i + batch].to(device)).float().cpu().numpy() for i in range(0, len(inputs), batch)])


def count_reasons(reasons: Sequence[Mapping[str, str]]) -> dict[str, int]:
    """Per-slice failure reasons -> how often each occurs."""
    return dict(Counter(reason for slice_reasons in reasons for reason in slice_reasons.values()))


def walk_reasons(outputs: np.ndarray) -> tuple[list[dict[str, np.ndarray | None]], list[dict[str, str]]]:
    """Per slice the walked contours (None where the walk failed) and, per side that failed, the reason."""
    contours, reasons = [], []
    for slice_outputs in outputs:
        walks: dict[str, Walk] = walk_outputs(slice_outputs)
        contours.append({side: walk.vertices if walk.ok else None for side, walk in walks.items()})
        reasons.append({side: walk.failure for side, walk in walks.items() if not walk.ok})
    return contours, reasons


WRONG_HALF = "on the other joint's half of the image"


def consistent_contours(
    contours: Sequence[Mapping[str, np.ndarray | None]], size: int
) -> tuple[list[dict[str, np.ndarray | None]], list[dict[str, str]]]:
    """Drop walked contours that cannot be their joint's: on the wrong half of the canonical image (the patient's
    left joint lies on the image's right, from the DICOM geometry). Returns the kept contours and, per slice, the
    sides dropped with the reason (:data:`WRONG_HALF`)."""
    kept = [dict(c) for c in contours]
    dropped: list[dict[str, str]] = [{} for _ in kept]
    for side in SIDES:
        for c, why in zip(kept, dropped):
            v = c.get(side)
            if v is not None and ((np.median(v[:, 1]) > size / 2) != (side == "left")):
                c[side], why[side] = None, WRONG_HALF
    return kept, dropped


def contour_confidence(outputs: np.ndarray, side: str, vertices: np.ndarray) -> float:
    """How sure the network is of one walked contour: the weaker of its start and end heatmap peaks times the mean
    field magnitude along the contour (both near 1 where the network has learnt the joint line).

    Used to pick the slice whose contours are shown.  On 40 series (the e2e test's 8 single-edema phantoms and 12
    validation phantoms, the 0.1.0 pack's U-Net) the key slice's contours lay within 3 mm of the true joint lines on
    33 of 40 with this measure, on 22 of 40 with the longest contours (the earlier rule: a long walk is often one that
    strayed)."""
    from scipy.ndimage import map_coordinates

    base = JOINTS.index(side) * len(CONTOUR_MAPS)
    start, end, field_x, field_y = outputs[base : base + 4]
    along = np.hypot(map_coordinates(field_x, vertices.T, order=1), map_coordinates(field_y, vertices.T, order=1))
    return float(min(start.max(), end.max()) * along.mean())


def contour_series(unet: nn.Module, role: str, datasets: Sequence[Dataset], size: int = 224) -> SeriesContours:
    """Sorted datasets of one coronal series -> its contours, walked on the U-Net's outputs (those on the wrong half dropped)."""
    series = series_of(role, datasets, size)
    outputs = unet_outputs(unet, series.images)
    walked, reasons = walk_reasons(outputs)
    contours, dropped = consistent_contours(walked, size)
    for why, wrong_half in zip(reasons, dropped):
        why.update(wrong_half)
    peaks = {name: float(outputs[:, i].max()) for i, name in enumerate(("left_start", "left_end")) }
    peaks.update({name: float(outputs[:, 4 + i].max()) for i, name in enumerate(("right_start", "right_end"))})
    confidence = [{side: contour_confidence(out, side, v) for side, v in c.items() if v is not None} for out, c in zip(outputs, contours)]
    return SeriesContours(role, list(datasets), series, contours, peaks, reasons, confidence)


#: a walked contour shapes its joint's region only if its confidence is at least this share of the series' best for
#: that joint (our choice: on the e2e test's phantoms, a third to two thirds of a series' walked contours lay over 3 mm
#: from the joint line, and they tilted and widened the region until a right upper-ilium edema read as upper sacrum)
REGION_CONFIDENCE = 0.5


def confident_contours(contoured: SeriesContours, share: float = REGION_CONFIDENCE) -> list[dict[str, np.ndarray | None]]:
    """The series' walked contours, each joint's kept where its confidence is at least ``share`` of that joint's best."""
    best = {side: max((c.get(side, 0.0) for c in contoured.confidence), default=0.0) for side in SIDES}
    return [
        {side: v if v is not None and confidence.get(side, 0.0) >= share * best[side] else None for side, v in contours.items()}
        for contours, confidence in zip(contoured.contours, contoured.confidence)
    ]


def regions_of(contoured: SeriesContours) -> JointRegions:
    """The series' joint regions from its confident walked contours (:func:`confident_contours`); :class:`RegionError`
    when a joint was found on no slice."""
    return series_regions(confident_contours(contoured), contoured.series.frame.size)


# ------------------------------------------------------------------ classification


def joint_inputs(
    volumes: Mapping[str, np.ndarray], regions: Mapping[str, JointRegions], side: str, roi_size: int
) -> dict[str, torch.Tensor]:
    """Per sequence the joint's crops as classifier input (slices, 1, R, R) from series-z-scored 224-grid volumes."""
    return {s: torch.from_numpy(joint_crops(volumes[s], regions[s], side, roi_size))[:, None].float() for s in SEQUENCES}


def consensus_probabilities(networks: Networks, inputs: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The 14 probabilities of the inter-reader consensus node (R1R2) for one joint."""
    from pipeline.chains.base import inference_context

    device = next(networks.classifier.parameters()).device
    with inference_context():
        probability = torch.sigmoid(networks.classifier(inputs["T1"].to(device), inputs["STIR"].to(device)).float())
        return networks.annotators(probability)[INFERENCE_NODE][0].float().cpu().numpy()


@dataclass
class StudyAnalysis:
    """A study through the networks: contours and regions per sequence, per side the 14 consensus probabilities."""

    contoured: dict[str, SeriesContours]
    regions: dict[str, JointRegions]
    volumes: dict[str, np.ndarray]  # series-z-scored 224-grid slices
    probabilities: dict[str, np.ndarray]  # side -> (14,)
    inputs: dict[str, dict[str, torch.Tensor]]  # side -> sequence -> crops


class JointsNotFound(ValueError):
    """The contouring found a joint on no slice of a sequence: the study cannot be analysed."""


def analyse(networks: Networks, datasets: Mapping[str, Sequence[Dataset]]) -> StudyAnalysis:
    """Contour both sequences, cut the regions, classify both joints. :class:`JointsNotFound` says why it could not."""
    size = networks.hyperparameters.contour_size
    contoured = {s: contour_series(networks.unet, s, datasets[s], size) for s in SEQUENCES}
    regions = {}
    for sequence, series in contoured.items():
        try:
            regions[sequence] = regions_of(series)
        except RegionError as error:
            reasons = ", ".join(f"{reason} x{count}" for reason, count in sorted(series.failures.items())) or "none"
            raise JointsNotFound(
                f"joint contours not found on the {sequence} series ({error}; contour walk failures: {reasons})"
            ) from None
    volumes = {s: series_volume(contoured[s].series.images) for s in SEQUENCES}
    roi = networks.hyperparameters.roi_size
    inputs = {side: joint_inputs(volumes, regions, side, roi) for side in SIDES}
    probabilities = {side: consensus_probabilities(networks, inputs[side]) for side in SIDES}
    return StudyAnalysis(contoured, regions, volumes, probabilities, inputs)


# ------------------------------------------------------------------ Grad-CAM


class SequencePass(nn.Module):
    """The classifier seen from one sequence's slices: that sequence's embedding live, the other's fixed.

    So a Grad-CAM of one head taps only the slices of one sequence (the encoder is shared
    between T1 and STIR; a hook on it would otherwise see both passes).
    """

    def __init__(self, model: QuadrantLesionClassifier) -> None:
        super().__init__()
        self.model = model
        self.fixed: dict[str, torch.Tensor] = {}
        self.sequence = "STIR"

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        embeddings = {s: self.fixed[s] for s in SEQUENCES}
        embeddings[self.sequence] = self.model.embed(slices)
        joint = torch.cat([embeddings[s] for s in SEQUENCES])
        return torch.cat([head(joint) for head in self.model.heads]).reshape(1, len(GRADED_OUTPUTS))


class QuadrantGradCAM:
    """MONAI GradCAM of one head of the lesion classifier over one sequence's joint crops."""

    def __init__(self, model: QuadrantLesionClassifier) -> None:
        from monai.visualize import GradCAM

        self.wrapper = SequencePass(model).eval()
        # raw maps: normalised over all slices of the joint together below, not slice by slice
        self.cam = GradCAM(self.wrapper, target_layers=CAM_LAYER, postprocessing=lambda x: x)

    def maps(self, inputs: Mapping[str, torch.Tensor], output: str, sequence: str) -> np.ndarray:
        """(slices, R, R) in [0, 1]: where head ``output`` looked on each of ``sequence``'s crops (one scale over the slices)."""
        device = next(self.wrapper.parameters()).device
        with torch.no_grad():
            self.wrapper.fixed = {s: self.wrapper.model.embed(inputs[s].to(device)) for s in SEQUENCES}
        self.wrapper.sequence = sequence
        with torch.enable_grad():
            raw = self.cam(inputs[sequence].to(device).detach().clone(), class_idx=GRADED_OUTPUTS.index(output))
        raw = raw[:, 0].detach().float().cpu()
        peak = float(raw.max())
        return normalize_cam(raw.reshape(1, -1)).reshape(raw.shape).numpy() if peak > 0 else np.zeros(raw.shape, np.float32)


def crop_to_source(
    crop_map: np.ndarray, side: str, regions: JointRegions, series: CoronalSeries, roi_size: int
) -> np.ndarray:
    """A map on one joint crop (R, R) -> the same map on the source slice's pixel grid (rows, cols), 0 outside the box.

    The inverse of the crop: source pixel -> canonical -> 224 grid -> levelled frame -> crop
    pixel (mirrored for the right joint, as :func:`~.data.joint_crops` mirrors it), bilinear.
    """
    from scipy.ndimage import map_coordinates

    rows, cols = series.orientation.source_shape
    source = np.stack(np.mgrid[:rows, :cols], axis=-1).reshape(-1, 2).astype(float)
    levelled = regions.level(series.frame.to_grid(series.orientation.to_canonical(source)))
    row0, col0, row1, col1 = regions.boxes[side]
    r = (levelled[:, 0] - row0) / max(row1 - row0, 1e-6) * (roi_size - 1)
    c = (levelled[:, 1] - col0) / max(col1 - col0, 1e-6) * (roi_size - 1)
    if side == "right":
        c = (roi_size - 1) - c
    values = map_coordinates(np.asarray(crop_map, dtype=np.float32), np.stack([r, c]), order=1, mode="constant", cval=0.0)
    return np.clip(values.reshape(rows, cols), 0.0, 1.0).astype(np.float32)


def contour_to_source(vertices: np.ndarray, series: CoronalSeries) -> np.ndarray:
    """Contour vertices on the 224 grid (K, 2) -> source (row, col) pixel coordinates."""
    return series.orientation.to_source(series.frame.to_source(vertices))
