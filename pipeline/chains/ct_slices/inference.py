"""One CT series through the chain's steps: joint slices, per-slice probabilities, study probability, Grad-CAM.

Shared by the node's chain, ``sijnode evaluate`` and the benchmark, so all three run the same code.

Slice → study: the study probability is the mean of the ``k`` highest slice probabilities after
the single highest is set aside (``k`` = 3 by default; with ``k`` or fewer slices, their median).
One slice, however wrong, moves each order statistic only to its neighbour's value, so it cannot
flip the study by itself, in either direction; the price is that a lesion must show on at least
two of the analysed slices, which at the 0.6–5 mm slices the chain accepts and lesions of a few
millimetres and more it does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydicom import Dataset
from torch import nn

from pipeline.cam import normalize_cam
from pipeline.packs import PackError

from .model import NETWORKS, SELECTIONS, NetworkSpec, build_network, last_stage
from .preprocess import Box, Settings, Volume, network_input, paste, read_volume, windowed

OUTPUT = "sacroiliitis"  # the manifest output this chain reports
POSITIVE_CLASS = 1  # 0 no sacroiliitis, 1 sacroiliitis
DEFAULT_TOP_K = 3

Timer = Callable[[str], AbstractContextManager[Any]]


def _untimed(step: str) -> AbstractContextManager[Any]:
    return nullcontext()


def aggregation_rule(k: int) -> str:
    """The slice → study rule for ``k`` in words (SR parameters, manifest)."""
    if k == 1:
        return "the second-highest slice probability (the highest is set aside)"
    return f"the mean of the top {k} slice probabilities after the highest is set aside"


def study_probability(slice_probabilities: Sequence[float], k: int = DEFAULT_TOP_K) -> float:
    """The slice → study rule of the module docstring: mean of ranks 2..k+1, or the median of ≤ k slices."""
    ranked = sorted((float(p) for p in slice_probabilities), reverse=True)
    if not ranked:
        raise ValueError("no slice probabilities to aggregate")
    if len(ranked) <= k:
        return float(np.median(ranked))
    return float(np.mean(ranked[1 : k + 1]))


@dataclass(frozen=True)
class Analysis:
    """What the chain found in one series."""

    volume: Volume
    slice_probabilities: np.ndarray  # per selected slice (volume.selected order); empty when no joints
    network_probabilities: Mapping[str, np.ndarray]  # per network, per selected slice
    probability: float | None  # the study's; None when the joints were not found
    gradcam: Mapping[int, np.ndarray]  # ordered-slice index → map on that source slice's grid, in [0, 1]

    @property
    def analysed(self) -> bool:
        return self.probability is not None

    def ranking(self) -> list[int]:
        """Positions in ``volume.selected``, most suspicious first."""
        return [int(i) for i in np.argsort(-self.slice_probabilities, kind="stable")]


class CTSlicesModel:
    """The pack's network(s) with their preprocessing, ready to analyse CT series."""

    def __init__(self, networks: Mapping[str, nn.Module], specs: Mapping[str, NetworkSpec], settings: Settings, top_k: int = DEFAULT_TOP_K, device: str = "cpu") -> None:
        self.networks = {name: net.to(device).eval() for name, net in networks.items()}
        self.specs = dict(specs)
        self.settings = settings
        self.top_k = top_k
        self.device = device
        self._cams: dict[str, Any] = {}

    @classmethod
    def from_manifest(cls, manifest: Any, state_dict: Mapping[str, torch.Tensor], device: str = "cpu") -> CTSlicesModel:
        """Build the networks the manifest selects and load their weights strictly (PackError otherwise)."""
        specs = manifest_specs(manifest.architecture.hyperparameters, manifest.name)
        try:
            settings = Settings.from_manifest(manifest.preprocessing)
        except (KeyError, TypeError, ValueError) as error:
            raise PackError(f"pack {manifest.name}: preprocessing: {error}") from None
        networks = {}
        for name, spec in specs.items():
            network = build_network(spec)
            prefix = name + "."
            own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            try:
                network.load_state_dict(own, strict=True)
            except RuntimeError as error:
                raise PackError(f"pack {manifest.name}: {name} weights do not fit its architecture: {error}") from None
            networks[name] = network
        stray = sorted(k for k in state_dict if k.split(".", 1)[0] not in specs)
        if stray:
            raise PackError(f"pack {manifest.name}: weights for networks the manifest does not select: {stray[:4]}")
        top_k = int(manifest.architecture.hyperparameters.get("aggregation", {}).get("top_k", DEFAULT_TOP_K))
        return cls(networks, specs, settings, top_k, device)

    # -- steps ---------------------------------------------------------------------------------
    def inputs(self, volume: Volume) -> dict[str, torch.Tensor]:
        """Each network's input batch for the selected slices."""
        assert volume.box is not None
        crops = np.stack([windowed(volume.hu[i], volume.box, self.settings) for i in volume.selected])
        return {name: network_input(crops, spec.input_size, name, self.settings) for name, spec in self.specs.items()}

    @torch.no_grad()
    def slice_probabilities(self, inputs: Mapping[str, torch.Tensor], chunk: int = 8) -> dict[str, np.ndarray]:
        out = {}
        for name, batch in inputs.items():
            parts = [torch.softmax(self.networks[name](part.to(self.device)).float(), 1)[:, POSITIVE_CLASS] for part in batch.split(chunk)]
            out[name] = torch.cat(parts).cpu().numpy().astype(np.float64)
        return out

    def gradcam(self, inputs: Mapping[str, torch.Tensor], positions: Sequence[int], box: Box, shape: tuple[int, int]) -> list[np.ndarray]:
        """Grad-CAM of the last convolutional stage for the slices at ``positions`` (of the batch),
        averaged over the networks, on the source grid (zero outside the crop), in [0, 1]."""
        if not positions:
            return []
        total = np.zeros((len(positions), box.size_rows, box.size_cols), dtype=np.float32)
        for name, batch in inputs.items():
            cam = self._cam(name)
            with torch.enable_grad():
                raw = cam(batch[list(positions)].to(self.device), class_idx=POSITIVE_CLASS)
            on_crop = F.interpolate(raw.detach().float().cpu(), size=(box.size_rows, box.size_cols), mode="bilinear", align_corners=False)
            total += on_crop[:, 0].numpy()
        mean = normalize_cam(torch.as_tensor(total / len(inputs))).numpy()
        return [np.clip(paste(m, box, shape), 0.0, 1.0) for m in mean]

    def _cam(self, name: str) -> Any:
        """MONAI's GradCAM on a private copy of the network (its hooks stay for good), normalised by pipeline.cam."""
        from monai.visualize import GradCAM

        if name not in self._cams:
            network = copy.deepcopy(self.networks[name]).eval()
            for module in network.modules():  # backward hooks cannot follow in-place ReLUs
                if isinstance(module, nn.ReLU):
                    module.inplace = False
            self._cams[name] = GradCAM(nn_module=network, target_layers=last_stage(network), postprocessing=normalize_cam)
        return self._cams[name]

    # -- the whole series ------------------------------------------------------------------------
    def analyze(self, datasets: Sequence[Dataset], *, gradcam_slices: int = 3, timed: Timer = _untimed) -> Analysis:
        with timed("slice selection"):
            volume = read_volume(datasets, self.settings)
        if not volume.selected:
            return Analysis(volume, np.zeros(0), {}, None, {})
        with timed("preprocess"):
            inputs = self.inputs(volume)
        with timed("inference"):
            per_network = self.slice_probabilities(inputs)
            slices = np.mean(np.stack(list(per_network.values())), axis=0)
            probability = study_probability(slices, self.top_k)
        maps: dict[int, np.ndarray] = {}
        top = [int(i) for i in np.argsort(-slices, kind="stable")[:gradcam_slices]]
        if top:
            with timed("grad-cam"):
                assert volume.box is not None
                shape = volume.hu[volume.selected[0]].shape
                for position, cam in zip(top, self.gradcam(inputs, top, volume.box, shape)):
                    maps[volume.selected[position]] = cam
        return Analysis(volume, slices, per_network, probability, maps)


def manifest_specs(hyperparameters: Mapping[str, Any], pack_name: str = "pack") -> dict[str, NetworkSpec]:
    """The networks ``model`` selects (one, or both for ``average``), from the manifest's hyperparameters."""
    selection = hyperparameters.get("model")
    if selection not in SELECTIONS:
        raise PackError(f"pack {pack_name}: architecture.hyperparameters.model must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    names = NETWORKS if selection == "average" else (selection,)
    networks = hyperparameters.get("networks", {})
    try:
        return {name: NetworkSpec.from_mapping(name, networks.get(name, {})) for name in names}
    except (TypeError, ValueError) as error:
        raise PackError(f"pack {pack_name}: {error}") from None
