"""Forward passes of the t1stir-3d pack: denoising, the three task classifiers, Grad-CAM per sequence.

Shared by the chain, ``sijnode evaluate`` and the benchmark, so all three run the same code.

A pack holds five networks in one state dict, keys prefixed by their role:
``denoiser_t1.``, ``denoiser_stir.`` and ``classifier_<task>.`` for each task in :data:`TASKS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydicom import Dataset
from scipy import ndimage

from pipeline.cam import normalize_cam
from pipeline.chains.t1stir_3d.model import (
    SEQUENCES,
    DenoisingUNet3D,
    DualEncoderClassifier,
    build_classifier,
    build_denoiser,
)
from pipeline.chains.t1stir_3d.preprocess import (
    PUBLISHED_PREPROCESSING,
    REQUIRED_KEYS,
    SemicoronalGrid,
    ZScore,
    classifier_transform,
    classifier_voxels,
)
from pipeline.packs import ModelPack, PackError

#: the paper's three patient-level outputs, one model each: manifest output name → what it is
TASKS: dict[str, str] = {
    "active_inflammation": "active inflammatory lesions indicative of axSpA (any: bone marrow edema, capsulitis, enthesitis, ...)",
    "asas_active_sacroiliitis": "active sacroiliitis by the ASAS MRI definition (bone marrow edema)",
    "structural_lesions": "structural lesions indicative of axSpA (erosion, sclerosis, fat lesion, ankylosis, ...)",
}
#: the coded concept (pipeline.encode.codes) of each task's finding
CONCEPTS: dict[str, str] = {
    "active_inflammation": "active inflammatory changes",
    "asas_active_sacroiliitis": "inflammatory changes",
    "structural_lesions": "structural changes",
}
#: how the outputs map to models, as the manifest states it
MODELS = (
    "one dual-encoder classifier per output, as in the paper (spa trains one model per label): weights "
    "classifier_active_inflammation.*, classifier_asas_active_sacroiliitis.*, classifier_structural_lesions.*; "
    "one denoising U-Net per sequence shared by all three: denoiser_t1.*, denoiser_stir.*"
)
RECIPE = PUBLISHED_PREPROCESSING["recipe"]


def denoiser_prefix(sequence: str) -> str:
    return f"denoiser_{sequence.lower()}."


def classifier_prefix(task: str) -> str:
    return f"classifier_{task}."


@dataclass
class Networks:
    """The pack's networks, in eval mode."""

    denoisers: dict[str, DenoisingUNet3D]  # "T1", "STIR"
    classifiers: dict[str, DualEncoderClassifier]  # by task

    def to(self, device: str) -> Networks:
        for network in [*self.denoisers.values(), *self.classifiers.values()]:
            network.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for sequence, network in self.denoisers.items():
            state.update({denoiser_prefix(sequence) + k: v for k, v in network.state_dict().items()})
        for task, network in self.classifiers.items():
            state.update({classifier_prefix(task) + k: v for k, v in network.state_dict().items()})
        return state


def build_networks(architecture: Mapping[str, Any], tasks: Sequence[str] = tuple(TASKS)) -> Networks:
    """Fresh networks from a manifest's ``architecture.hyperparameters`` (``classifier``, ``denoiser``).

    ``denoiser: null`` declares a pack without denoisers (a demonstration deviation: the grid
    volumes go to the classifiers as they are); published and imported packs always have both.
    """
    denoiser = architecture["denoiser"]
    return Networks(
        denoisers={} if denoiser is None else {sequence: build_denoiser(denoiser) for sequence in SEQUENCES},
        classifiers={task: build_classifier(architecture["classifier"]) for task in tasks},
    )


def check_manifest(pack: ModelPack) -> dict[str, Any]:
    """The pack's preprocessing settings, after checking it is a t1stir-3d pack this code can run."""
    manifest = pack.manifest
    settings = manifest.preprocessing
    if settings.get("recipe") != RECIPE:
        raise PackError(f"pack {manifest.name}: preprocessing recipe {settings.get('recipe')!r}, this chain implements {RECIPE!r}")
    missing = [key for key in REQUIRED_KEYS if key not in settings]
    if missing:
        raise PackError(f"pack {manifest.name}: preprocessing lacks {missing}")
    for task in TASKS:
        manifest.output(task)
    hyperparameters = manifest.architecture.hyperparameters
    if not {"classifier", "denoiser"} <= set(hyperparameters):
        raise PackError(f"pack {manifest.name}: architecture hyperparameters need 'classifier' and 'denoiser'")
    return dict(settings)


def load_networks(pack: ModelPack, state_dict: Mapping[str, torch.Tensor] | None = None) -> Networks:
    """Build the pack's five networks and load its (verified) weights strictly."""
    check_manifest(pack)
    try:
        # on the meta device, then the weights assigned: no random init, no second copy of ~1.8 GB
        with torch.device("meta"):
            networks = build_networks(pack.manifest.architecture.hyperparameters)
    except (TypeError, ValueError) as error:
        raise PackError(f"pack {pack.manifest.name}: {error}") from None
    weights = pack.load_state_dict() if state_dict is None else state_dict
    expected = set(networks.state_dict())
    unexpected = sorted(set(weights) - expected)
    if unexpected:
        raise PackError(f"pack {pack.manifest.name}: unexpected weights {unexpected[:5]}")
    parts: list[tuple[str, torch.nn.Module]] = [(denoiser_prefix(s), n) for s, n in networks.denoisers.items()]
    parts += [(classifier_prefix(t), n) for t, n in networks.classifiers.items()]
    for prefix, network in parts:
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        try:
            network.load_state_dict(own, strict=True, assign=True)
        except RuntimeError as error:
            raise PackError(f"pack {pack.manifest.name}: weights {prefix}* do not fit the architecture: {error}") from None
        network.eval()
    return networks


@torch.no_grad()
def denoise(denoiser: DenoisingUNet3D, grid_volume: np.ndarray) -> np.ndarray:
    """The U-Net on one z-scored grid volume ``(slices, rows, columns)``; the output in the same units."""
    device = next(denoiser.parameters()).device
    volume = ZScore()(grid_volume)[None, None].to(device)
    return denoiser(volume)[0, 0].float().cpu().numpy()


def classifier_input(grid_volumes: Mapping[str, np.ndarray], denoisers: Mapping[str, DenoisingUNet3D], settings: Mapping[str, Any]) -> torch.Tensor:
    """Denoise each sequence's grid volume with its own U-Net (if the pack has one), crop, resize and normalise: ``(1, 2, D, H, W)`` in :data:`SEQUENCES` order."""
    to_classifier = classifier_transform(settings)
    volumes = [to_classifier(denoise(denoisers[s], grid_volumes[s]) if s in denoisers else grid_volumes[s]) for s in SEQUENCES]
    return torch.cat(volumes)[None]


@torch.no_grad()
def probability(classifier: DualEncoderClassifier, volumes: torch.Tensor) -> float:
    """Softmax probability of class 1 (the positive label)."""
    classifier.eval()
    return float(torch.softmax(classifier(volumes.to(next(classifier.parameters()).device)), dim=1)[0, 1])


class SequencePass(torch.nn.Module):
    """The classifier seen from one sequence: that sequence's pass through the shared body, the other's fixed.

    Grad-CAM on ``model.body.0.4`` through this wrapper taps only this sequence's pass, so the
    T1 and STIR maps are never mixed (a hook on the shared encoder would otherwise see both).
    """

    def __init__(self, model: DualEncoderClassifier) -> None:
        super().__init__()
        self.model = model
        self.fixed: list[torch.Tensor] = []
        self.index = 0

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        features = [f.expand(volume.shape[0], *f.shape[1:]) for f in self.fixed]
        features[self.index] = self.model.encode(volume)
        return self.model.classify(features)


class GradCAMExplainer:
    """MONAI GradCAM per sequence on the last ResNet stage of one task classifier.

    Unlike t2fs_mil it wraps the classifier itself, not a copy: a copy of three published
    ResNet-101s would cost another ~1 GB. MONAI's hooks only record the target layer's
    activations and gradients; they change no output.
    """

    def __init__(self, model: DualEncoderClassifier) -> None:
        from monai.visualize import GradCAM

        # the wrapper in eval mode too: MONAI puts the wrapped module back into the mode it found,
        # and a wrapper in (default) training mode would leave the classifier's BatchNorm training
        self.wrapper = SequencePass(model).eval()
        self.cam = GradCAM(self.wrapper, target_layers="model.body.0.4", postprocessing=normalize_cam)

    def maps(self, volumes: torch.Tensor) -> dict[str, np.ndarray]:
        """Per sequence, the map ``(D, H, W)`` in [0, 1] on the classifier grid, for the positive class."""
        volumes = volumes.to(next(self.wrapper.parameters()).device)
        with torch.no_grad():
            self.wrapper.fixed = [self.wrapper.model.encode(volumes[:, i : i + 1]) for i in range(len(SEQUENCES))]
        maps = {}
        for index, sequence in enumerate(SEQUENCES):
            self.wrapper.index = index
            with torch.enable_grad():
                raw = self.cam(volumes[:, index : index + 1].detach().clone(), class_idx=1)
            maps[sequence] = raw[0, 0].detach().clamp(0, 1).cpu().numpy()
        return maps


def slice_points(dataset: Dataset) -> np.ndarray:
    """LPS coordinates ``(rows, columns, 3)`` of every pixel centre of one slice."""
    orientation = np.asarray([float(v) for v in dataset.ImageOrientationPatient])
    position = np.asarray([float(v) for v in dataset.ImagePositionPatient])
    row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
    rows = np.arange(int(dataset.Rows))[:, None, None] * row_spacing * orientation[3:]
    columns = np.arange(int(dataset.Columns))[None, :, None] * column_spacing * orientation[:3]
    return position + rows + columns


def on_source_slice(cam: np.ndarray, grid: SemicoronalGrid, dataset: Dataset, settings: Mapping[str, Any]) -> np.ndarray:
    """A map on the classifier input (a resize of the grid, or of its :func:`classifier_field`) sampled (trilinear) on one source slice's pixels, in [0, 1]."""
    index = classifier_voxels(grid.voxel_of(slice_points(dataset)), {**settings, "grid_size": list(grid.size)}, cam.shape)
    values = ndimage.map_coordinates(cam, np.moveaxis(index, -1, 0), order=1, mode="constant", cval=0.0)
    return np.clip(values, 0.0, 1.0).astype(np.float32)


def most_informative(cam: np.ndarray, grid: SemicoronalGrid, datasets: Sequence[Dataset], count: int, settings: Mapping[str, Any]) -> list[tuple[int, np.ndarray]]:
    """The ``count`` source slices on which the map carries the most weight: (index, map on that slice), best first."""
    sampled = [on_source_slice(cam, grid, dataset, settings) for dataset in datasets]
    weight = [float(values.sum()) for values in sampled]
    order = np.argsort(weight, kind="stable")[::-1][:count]
    return [(int(i), sampled[int(i)]) for i in order if weight[int(i)] > 0]
