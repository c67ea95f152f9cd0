"""Import the published weights of Dorfner et al. (2024) into a model pack.

The authors publish two files (FJDorfner/Anatomy-Aware-Classification-axSpA, gradio_code):

* ``classification_model.ckpt`` -- a PyTorch Lightning checkpoint. Its ``state_dict`` holds the
  LightningModule's ``self.model``, a torchvision ``resnet50()`` whose conv1 was replaced by a
  one-channel convolution and whose ``fc`` is the head Sequential; every key is prefixed ``model.``.
* ``segmentation_model.pt`` -- a torch file whose ``network`` entry is the MONAI UNet's state dict.

Both are checked key by key and shape by shape against the published architecture
(:data:`.model.PUBLISHED_HYPERPARAMETERS`) before anything is written; a missing, unexpected or
misshapen key is a :class:`WeightsImportError` that names it.

Key mapping (checkpoint, after stripping ``model.`` → pack, after ``classifier.``); MONAI's ResNet
(2-D, bottleneck, ``conv1_t_size=7``, ``conv1_t_stride=2``, ``bias_downsample=False``,
``shortcut_type="B"``) names its modules as torchvision does, so the mapping is one to one:

==========================================  ==========================================  ======================
torchvision ResNet-50 (checkpoint)          MONAI ResNet (pack)                         shape
==========================================  ==========================================  ======================
conv1.weight                                conv1.weight                                64×1×7×7
bn1.{weight,bias,running_mean,running_var}  bn1.{same}                                  64
bn1.num_batches_tracked                     bn1.num_batches_tracked                     scalar
layer{1-4}.{i}.conv1.weight                 layer{1-4}.{i}.conv1.weight                 1×1 reduce
layer{1-4}.{i}.conv2.weight                 layer{1-4}.{i}.conv2.weight                 3×3 (the stride)
layer{1-4}.{i}.conv3.weight                 layer{1-4}.{i}.conv3.weight                 1×1 expand (×4)
layer{1-4}.{i}.bn{1,2,3}.*                  layer{1-4}.{i}.bn{1,2,3}.*                  BatchNorm2d
layer{1-4}.0.downsample.0.weight            layer{1-4}.0.downsample.0.weight            1×1 conv, no bias
layer{1-4}.0.downsample.1.*                 layer{1-4}.0.downsample.1.*                 BatchNorm2d
fc.0.{weight,bias}                          fc.0.{weight,bias}                          Linear(2048, 1024)
fc.2.{weight,bias,running_*,num_batches}    fc.2.{same}                                 BatchNorm1d(1024)
fc.4.{weight,bias}                          fc.4.{weight,bias}                          Linear(1024, 2)
==========================================  ==========================================  ======================

Blocks per stage i: 3/4/6/3. The head's indices follow "Linear – ReLU – BatchNorm1d – Dropout –
Linear": fc.1 (ReLU) and fc.3 (Dropout) hold no parameters, which is why only 0, 2 and 4 appear.
MONAI's own ``fc`` (a single Linear) is replaced by the same Sequential (:func:`.model.head`).
Lightning keys outside ``model.`` (losses, metrics) are ignored and reported.

Checkpoints are read with ``torch.load(weights_only=True)``: no code from the file runs. A file
that needs full unpickling is refused unless ``trust_pickle=True`` (only for files from a source
the site trusts).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.chains.checkpoints import WeightsImportError, check_state_dict, load_checkpoint
from pipeline.packs import ModelPack, sha256_of, write_pack

from .model import (
    CLASSIFIER_PREFIX,
    PUBLISHED_HYPERPARAMETERS,
    PUBLISHED_PREPROCESSING,
    SEGMENTER_PREFIX,
    build_classifier,
    build_segmenter,
)

LIGHTNING_PREFIX = "model."
SEGMENTER_ENTRY = "network"
PUBLISHED_THRESHOLD = 0.59

# torchvision → MONAI, one rule per module kind; each rule is the identity (see the table above),
# written out so that a change on either side shows up as an unmapped key, not as silent garbage.
_KEY_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(conv1\.weight)$"), r"\1"),
    (re.compile(r"^(bn1\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"), r"\1"),
    (re.compile(r"^(layer[1-4]\.\d+\.conv[123]\.weight)$"), r"\1"),
    (re.compile(r"^(layer[1-4]\.\d+\.bn[123]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"), r"\1"),
    (re.compile(r"^(layer[1-4]\.0\.downsample\.0\.weight)$"), r"\1"),
    (re.compile(r"^(layer[1-4]\.0\.downsample\.1\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"), r"\1"),
    (re.compile(r"^(fc\.[04]\.(?:weight|bias))$"), r"\1"),
    (re.compile(r"^(fc\.2\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"), r"\1"),
)


def torchvision_to_monai(key: str) -> str:
    """The MONAI ResNet name of a torchvision ResNet-50 (+ head) parameter name."""
    for pattern, replacement in _KEY_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    raise WeightsImportError(f"classifier checkpoint key {LIGHTNING_PREFIX}{key} has no MONAI counterpart")


def classifier_state_dict(checkpoint: Any, path: Path | str = "classifier checkpoint") -> tuple[dict[str, torch.Tensor], list[str]]:
    """The classifier's state dict (MONAI names) from a Lightning checkpoint, and the ignored keys."""
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise WeightsImportError(f"{path}: not a PyTorch Lightning checkpoint (no 'state_dict' entry)")
    state = checkpoint["state_dict"]
    ignored = sorted(k for k in state if not k.startswith(LIGHTNING_PREFIX))
    mapped = {torchvision_to_monai(k[len(LIGHTNING_PREFIX):]): v for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}
    if not mapped:
        raise WeightsImportError(f"{path}: no '{LIGHTNING_PREFIX}' keys in its state_dict")
    expected = build_classifier(PUBLISHED_HYPERPARAMETERS["classifier"]).state_dict()
    check_state_dict(mapped, expected, f"classifier {path}")
    return mapped, ignored


def segmenter_state_dict(saved: Any, path: Path | str = "segmenter file") -> dict[str, torch.Tensor]:
    """The UNet's state dict from the published torch file's ``network`` entry."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get(SEGMENTER_ENTRY), Mapping):
        raise WeightsImportError(f"{path}: no '{SEGMENTER_ENTRY}' entry holding the UNet's state dict")
    state = dict(saved[SEGMENTER_ENTRY])
    expected = build_segmenter(PUBLISHED_HYPERPARAMETERS["segmenter"]).state_dict()
    check_state_dict(state, expected, f"segmenter {path}")
    return state


def published_manifest(classifier_sha: str, segmenter_sha: str, ignored: list[str]) -> dict[str, Any]:
    return {
        "name": "anatomy-aware-dorfner2024",
        "version": f"published-{classifier_sha[:8]}-{segmenter_sha[:8]}",
        "chain": "xr-anatomy",
        "demo": False,
        "architecture": {
            "name": "MONAI UNet (sacrum/ilium segmentation) + ResNet-50 with MLP head (Dorfner et al. 2024)",
            "hyperparameters": PUBLISHED_HYPERPARAMETERS,
        },
        "preprocessing": PUBLISHED_PREPROCESSING,
        "outputs": [
            {
                "name": "radiographic_sacroiliitis",
                "concept": "radiographic sacroiliitis",
                "threshold": PUBLISHED_THRESHOLD,
                "description": "softmax probability of class 1; published cut-off: positive when p > 0.59",
            }
        ],
        "training_data": (
            "Published weights of Dorfner et al. 2024 (anatomy-aware model; see the paper for the "
            f"cohorts). Imported from classification_model.ckpt (sha256 {classifier_sha}) and "
            f"segmentation_model.pt (sha256 {segmenter_sha})"
            + (f"; checkpoint keys ignored: {', '.join(ignored)}" if ignored else "")
        ),
        "intended_use": (
            "Research use: detection of radiographic sacroiliitis (modified New York criteria) on AP "
            "pelvic radiographs of adults with suspected axial spondyloarthritis. Not for diagnosis."
        ),
        "evaluation": {
            "source": "Dorfner et al. 2024, external test sets (as published, not re-measured here)",
            "auc_external": [0.899, 0.846, 0.957],
            "auc_external_without_anatomy": [0.853, 0.817, 0.947],
            "progression_odds_ratio_p_ge_0.7": {"value": 2.16, "ci95_low": 1.19, "ci95_high": 3.86},
        },
    }


def import_anatomy_aware(classifier: Path, segmenter: Path, out: Path, *, trust_pickle: bool = False) -> ModelPack:
    """Turn the published ``classification_model.ckpt`` and ``segmentation_model.pt`` into a pack at ``out``.

    Backs ``sijnode packs import-anatomy-aware --classifier ... --segmenter ... --out PACK``.
    Raises :class:`WeightsImportError` (naming the offending keys) before writing anything when
    a file does not match the published architecture.
    """
    classifier, segmenter, out = Path(classifier), Path(segmenter), Path(out)
    classifier_state, ignored = classifier_state_dict(load_checkpoint(classifier, trust_pickle), classifier)
    segmenter_state = segmenter_state_dict(load_checkpoint(segmenter, trust_pickle), segmenter)
    state = {SEGMENTER_PREFIX + k: v for k, v in segmenter_state.items()}
    state.update({CLASSIFIER_PREFIX + k: v for k, v in classifier_state.items()})
    manifest = published_manifest(sha256_of(classifier), sha256_of(segmenter), ignored)
    return write_pack(out, manifest, state)
