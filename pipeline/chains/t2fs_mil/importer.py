"""Import a t2fs-mil checkpoint in the layout the paper describes (Keskin et al. 2026):
a torchvision ResNet-18 (ImageNet stem, 3 channels, ``fc`` removed) as the slice encoder,
gated attention as Ilse et al.'s reference code names it, and a two-class bag classifier.

No such checkpoint is published; this reads the layout a reimplementation of the paper would
save, with strict checks, so that a site holding weights trained the paper's way can run them:

* encoder: the torchvision ResNet-18 ``state_dict`` names (``conv1.weight``, ``bn1.*``,
  ``layer1.0.conv1.weight``, ..., ``layer4.1.bn2.*``, ``layer{2,3,4}.0.downsample.{0,1}.*``)
  under one prefix, ``feature_extractor.`` (or ``backbone.``, or none); torchvision's ``fc.*``,
  if left in, is dropped and reported;
* attention: ``attention_V.0.*`` (Linear 512→128, tanh), ``attention_U.0.*`` (Linear 512→128,
  sigmoid), ``attention_weights.*`` (Linear 128→1);
* classifier: ``classifier.*`` or ``classifier.0.*`` (Linear 512→2; class 1 "Inflamed").

MONAI's ResNet (``model.resnet18_encoder``) has torchvision's module tree, so the encoder names
carry over unchanged (asserted in the tests); every tensor is copied bit for bit. The file is read
with ``torch.load(weights_only=True)`` (a ``.safetensors`` file with safetensors); a container
dict under ``state_dict`` / ``model_state_dict`` / ``model`` is unwrapped.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.chains.t2fs_mil.inference import OUTPUT
from pipeline.chains.t2fs_mil.model import PAPER_HYPERPARAMETERS, build_model
from pipeline.chains.t2fs_mil.preprocess import PAPER_PREPROCESSING
from pipeline.chains.checkpoints import WeightsImportError, check_state_dict, load_checkpoint
from pipeline.packs import ModelPack, sha256_of, write_pack

ENCODER_PREFIXES = ("feature_extractor.", "backbone.", "")
#: the paper-layout names of our attention and classifier parameters
HEAD_KEYS = {
    "attention.V.weight": "attention_V.0.weight",
    "attention.V.bias": "attention_V.0.bias",
    "attention.U.weight": "attention_U.0.weight",
    "attention.U.bias": "attention_U.0.bias",
    "attention.w.weight": "attention_weights.weight",
    "attention.w.bias": "attention_weights.bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}
CONTAINERS = ("state_dict", "model_state_dict", "model")


def _tensors(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in CONTAINERS:
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise WeightsImportError(f"{path}: not a state dict of tensors")
    return dict(checkpoint)


def _without_sequential(key: str) -> str:
    """``classifier.0.weight`` (a Sequential around the Linear) → ``classifier.weight``."""
    return "classifier." + key.removeprefix("classifier.0.") if key.startswith("classifier.0.") else key


def paper_state_dict(found: Mapping[str, torch.Tensor], path: Path | str = "checkpoint") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our state dict (bit-exact tensors) from a paper-layout one, and the keys dropped (``fc.*``).
    Raises :class:`WeightsImportError` naming missing, unexpected or misshapen keys."""
    expected = build_model(PAPER_HYPERPARAMETERS).state_dict()
    found = {_without_sequential(key): value for key, value in found.items()}
    encoder_keys = [k.removeprefix("encoder.") for k in expected if k.startswith("encoder.")]
    prefix = next((p for p in ENCODER_PREFIXES if f"{p}conv1.weight" in found), None)
    if prefix is None:
        raise WeightsImportError(f"{path}: no ResNet-18 stem (conv1.weight under {', '.join(repr(p) for p in ENCODER_PREFIXES)})")
    renamed: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in found.items():
        if key.startswith(f"{prefix}fc."):
            dropped.append(key)
        elif key.startswith(prefix) and key.removeprefix(prefix) in encoder_keys:
            renamed["encoder." + key.removeprefix(prefix)] = value
        else:
            ours = next((mine for mine, theirs in HEAD_KEYS.items() if theirs == key), None)
            renamed[ours or f"<unexpected> {key}"] = value
    check_state_dict(renamed, expected, f"{path} (torchvision ResNet-18 + gated attention layout)")
    return {key: value.detach().clone().to(expected[key].dtype) for key, value in renamed.items()}, dropped


def import_paper_checkpoint(path: Path, out: Path, *, threshold: float = 0.5) -> ModelPack:
    """Write a t2fs-mil pack in the paper's layout (3-channel ImageNet input, two classes) from ``path``."""
    path, out = Path(path), Path(out)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        checkpoint: Any = load_file(path)
    else:
        checkpoint = load_checkpoint(path, trust_pickle=False)
    state, dropped = paper_state_dict(_tensors(checkpoint, path), path)
    model = build_model(PAPER_HYPERPARAMETERS)
    model.load_state_dict(state, strict=True)
    manifest = {
        "name": "t2fs-mil-paper-layout",
        "version": "1.0.0",
        "chain": "t2fs-mil",
        "demo": False,
        "architecture": {"name": "resnet18-gated-attention-mil (torchvision layout, two classes)", "hyperparameters": PAPER_HYPERPARAMETERS},
        "preprocessing": dict(PAPER_PREPROCESSING),
        "outputs": [
            {
                "name": OUTPUT,
                "concept": "active sacroiliitis",
                "threshold": float(threshold),
                "description": 'softmax probability of the paper\'s class "Inflamed" (index 1) from the whole axial T2FS series',
            }
        ],
        "training_data": f"Imported from {path.name} (sha256 {sha256_of(path)})" + (f"; dropped: {', '.join(dropped)}" if dropped else ""),
        "intended_use": "Research use. The node does not know how these weights were trained: validate them before any use.",
    }
    return write_pack(out, manifest, model.state_dict())
