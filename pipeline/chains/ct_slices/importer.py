"""Bring your own weights: a site's ResNeXt-50 / Inception-v4 checkpoints into a ct-slices pack.

Fu et al. (2024) publish no weights. A site that trained the architecture elsewhere has, in the
two usual layouts:

* torchvision ``resnext50_32x4d`` with ``fc`` replaced by a 2-class ``Linear(2048, 2)``: keys
  ``conv1.weight``, ``bn1.*``, ``layer{1-4}.{i}.conv{1,2,3}.weight``, ``...bn{1,2,3}.*``,
  ``layer{1-4}.0.downsample.{0,1}.*``, ``fc.weight`` (2×2048), ``fc.bias``;
* timm ``inception_v4`` (``num_classes=2``): ``features.{0-21}....conv.weight`` and ``.bn.*``
  of every conv–BN–ReLU unit, ``last_linear.weight`` (2×1536), ``last_linear.bias``.

:mod:`.model` builds both module trees exactly, so the keys map one to one; every key and shape
is checked against the published network (``check_state_dict``: missing, unexpected and
misshapen keys are named) and the tensors are stored unchanged (bit-exact). A state dict may come
bare, or under ``state_dict``/``model``/``model_state_dict``, with DataParallel's ``module.``
prefix. Files are read with ``torch.load(weights_only=True)``: no code from them runs, unless
``trust_pickle``.

The paper gives no operating threshold; the pack uses 0.5 on the softmax (the 2-class argmax)
unless the site gives its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.chains.checkpoints import WeightsImportError, check_state_dict, load_checkpoint
from pipeline.packs import ModelPack, sha256_of, write_pack

from .inference import OUTPUT
from .model import INCEPTION, RESNEXT, build_network, published_spec
from .preprocess import PUBLISHED_PREPROCESSING

DEFAULT_THRESHOLD = 0.5
_WRAPPERS = ("state_dict", "model_state_dict", "model")
_PARALLEL_PREFIX = "module."

__all__ = ["WeightsImportError", "import_ct_slices", "network_state_dict"]


def _unwrap(saved: Any, path: Path | str) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: bare or under a usual entry, without DataParallel's prefix."""
    state = saved
    for key in _WRAPPERS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsImportError(f"{path}: not a state dict of tensors (bare or under {', '.join(_WRAPPERS)})")
    if all(k.startswith(_PARALLEL_PREFIX) for k in state):
        state = {k[len(_PARALLEL_PREFIX) :]: v for k, v in state.items()}
    return dict(state)


def network_state_dict(saved: Any, network: str, path: Path | str = "checkpoint") -> dict[str, torch.Tensor]:
    """``saved``'s state dict after strict key and shape checks against the published ``network``."""
    state = _unwrap(saved, path)
    expected = build_network(published_spec(network)).state_dict()
    layout = "torchvision resnext50_32x4d with a 2-class fc" if network == RESNEXT else "timm inception_v4 with num_classes=2"
    check_state_dict(state, expected, f"{network} checkpoint {path} ({layout})")
    return state


def published_manifest(networks: Mapping[str, str], threshold: float) -> dict[str, Any]:
    """The manifest of an imported pack; ``networks`` maps each network to its checkpoint's sha256."""
    model = "average" if len(networks) == 2 else next(iter(networks))
    sources = "; ".join(f"{name} from a checkpoint of sha256 {sha}" for name, sha in networks.items())
    return {
        "name": f"ct-slices-{model}",
        "version": "imported-" + "-".join(sha[:8] for sha in networks.values()),
        "chain": "ct-slices",
        "demo": False,
        "architecture": {
            "name": f"Fu et al. 2024: {model} (ResNeXt-50 32x4d / Inception-v4, 2-class heads), published sizes",
            "hyperparameters": {
                "model": model,
                "networks": {name: published_spec(name).as_dict() for name in networks},
                "aggregation": {"top_k": 3},
            },
        },
        "preprocessing": PUBLISHED_PREPROCESSING,
        "outputs": [
            {
                "name": OUTPUT,
                "concept": "sacroiliitis",
                "threshold": threshold,
                "description": "study probability of sacroiliitis (softmax class 1, aggregated over the joint slices)",
            }
        ],
        "training_data": f"Site-trained weights imported with sijnode packs import-ct-slices: {sources}",
        "intended_use": "Research use: sacroiliitis on axial pelvic CT of adults. Not for diagnosis.",
    }


def import_ct_slices(
    out: Path,
    *,
    resnext50: Path | None = None,
    inception_v4: Path | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    trust_pickle: bool = False,
) -> ModelPack:
    """Write a pack at ``out`` from one or both checkpoints (both: the manifest averages them).

    Backs ``sijnode packs import-ct-slices``. Raises :class:`WeightsImportError` before writing
    anything when a checkpoint does not match its published architecture.
    """
    files = {name: Path(path) for name, path in ((RESNEXT, resnext50), (INCEPTION, inception_v4)) if path is not None}
    if not files:
        raise WeightsImportError("give a ResNeXt-50 checkpoint, an Inception-v4 checkpoint, or both")
    if not 0.0 <= threshold <= 1.0:
        raise WeightsImportError(f"threshold {threshold} is outside [0, 1]")
    state: dict[str, torch.Tensor] = {}
    for name, path in files.items():
        for key, tensor in network_state_dict(load_checkpoint(path, trust_pickle), name, path).items():
            state[f"{name}.{key}"] = tensor
    manifest = published_manifest({name: sha256_of(path) for name, path in files.items()}, threshold)
    return write_pack(Path(out), manifest, state)
