"""Running the model on one bag: probability with horizontal-flip TTA, slice attention, Grad-CAM.

Shared by the chain, ``sijnode evaluate`` and the benchmark, so that all three run the same code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cam import normalize_cam, with_peak
from pipeline.chains.base import inference_context
from pipeline.chains.t2fs_mil.model import (
    T2FSMIL,
    Hyperparameters,
    INFLAMED,
    PartialBag,
    build_model,
)
from pipeline.chains.t2fs_mil.preprocess import PAPER_PREPROCESSING, RECIPES
from pipeline.packs import ModelPack, PackError

#: the manifest output this chain reports
OUTPUT = "active_sacroiliitis"


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one bag."""

    probability: float  # what the chain reports: the TTA average when TTA is on
    probability_original: float
    probability_flipped: float | None  # None without TTA
    attention: np.ndarray  # (slices,), sums to 1; the mean over the TTA views
    features: torch.Tensor  # (slices, feature_dim) of the original view, for Grad-CAM


def flip_horizontal(bag: torch.Tensor) -> torch.Tensor:
    """Mirror every slice left-right (the columns; on axial images the patient's left and right)."""
    return torch.flip(bag, dims=[-1])


@inference_context()
def predict(model: T2FSMIL, bag: torch.Tensor, *, tta: bool = True, chunk: int = 16) -> Prediction:
    """Probability of active sacroiliitis for one bag (slices, C, H, W); TTA averages the
    probabilities of the bag and its horizontal mirror image."""
    model.eval()
    original = model.forward_bag(bag, chunk)
    p_original = float(original.probability)
    if not tta:
        return Prediction(p_original, p_original, None, original.attention.cpu().numpy().astype(np.float64), original.features)
    flipped = model.forward_bag(flip_horizontal(bag), chunk)
    p_flipped = float(flipped.probability)
    attention = (0.5 * (original.attention + flipped.attention)).cpu().numpy().astype(np.float64)
    return Prediction(0.5 * (p_original + p_flipped), p_original, p_flipped, attention, original.features)


class GradCAMExplainer:
    """Grad-CAM (MONAI's GradCAM) on the last ResNet stage, for chosen slices of a bag.

    Works on a private copy of the model: MONAI registers hooks on the target layer for good,
    and the copy keeps them off the network that makes the predictions. The map is the positive
    part of the gradient-weighted activations for the bag's logit of active sacroiliitis, so high
    means evidence for the positive class; ``pipeline.cam.normalize_cam`` replaces MONAI's
    inverting post-processing and divides each slice's map by its own maximum.
    """

    def __init__(self, model: T2FSMIL) -> None:
        from monai.visualize import GradCAM

        self.model = copy.deepcopy(model).eval()
        device = next(model.parameters()).device
        self.wrapper = PartialBag(self.model, torch.zeros(1, model.feature_dim, device=device), [0])
        self.cam = GradCAM(self.wrapper, target_layers="model.encoder.layer4", postprocessing=normalize_cam)

    def maps(self, bag: torch.Tensor, features: torch.Tensor, positions: list[int]) -> np.ndarray:
        """(len(positions), H, W) maps in [0, 1] on the preprocessed grid of those slices."""
        if not positions:
            return np.zeros((0, *bag.shape[-2:]), dtype=np.float32)
        self.wrapper.fixed = features.detach().clone()
        self.wrapper.positions = list(positions)
        with torch.enable_grad():
            raw = self.cam(bag[positions].detach().clone(), class_idx=0 if self.wrapper.model.hyperparameters.classes == 1 else INFLAMED)
        return raw[:, 0].detach().clamp(0, 1).cpu().numpy()


def to_source_grid(values: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """A map on the square model grid, resized (bilinear) onto a source slice's rows × columns, in
    [0, 1], with its peak kept: the source grid's pixels fall between the model grid's, where
    bilinear sampling lowers a sharp peak, and an evidence map's peak must stay the probability."""
    tensor = torch.as_tensor(values, dtype=torch.float32)[None, None]
    resized = F.interpolate(tensor, size=(rows, columns), mode="bilinear", align_corners=False)[0, 0]
    return with_peak(resized.numpy(), float(tensor.clamp(0, 1).max()))


def check_manifest(pack: ModelPack) -> Hyperparameters:
    """The pack's hyperparameters, after checking it is a t2fs-mil pack this code can run."""
    manifest = pack.manifest
    try:
        parameters = Hyperparameters.from_mapping(manifest.architecture.hyperparameters)
    except (TypeError, ValueError) as error:
        raise PackError(f"pack {manifest.name}: {error}") from None
    recipe = manifest.preprocessing.get("recipe")
    if recipe not in RECIPES:
        raise PackError(f"pack {manifest.name}: preprocessing recipe {recipe!r}, this chain implements {', '.join(RECIPES)}")
    channels = 3 if recipe == PAPER_PREPROCESSING["recipe"] else 1
    if parameters.in_channels != channels:
        raise PackError(f"pack {manifest.name}: recipe {recipe} gives {channels}-channel slices, the network takes {parameters.in_channels}")
    manifest.output(OUTPUT)  # PackError when missing
    return parameters


def load_model(pack: ModelPack, state_dict: dict[str, torch.Tensor] | None = None) -> T2FSMIL:
    """Build the pack's network and load its (verified) weights strictly."""
    model = build_model(check_manifest(pack))
    model.recipe = str(pack.manifest.preprocessing["recipe"])
    weights = pack.load_state_dict() if state_dict is None else state_dict
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise PackError(f"pack {pack.manifest.name}: weights do not fit its architecture: {error}") from None
    return model.eval()
