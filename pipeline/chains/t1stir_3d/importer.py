"""Import models trained with the authors' code (kbressem/spa on faimed3d) into a t1stir-3d pack.

No weights were published; a site that trained the models with spa has one fastai
``SaveModelCallback`` file per model: a dict ``{'model': state_dict, 'opt': optimizer state}``
(``with_opt=True``, as spa saves them) or the bare state dict (``with_opt=False``). One file per task
classifier (spa trains one model per label) and one per denoiser (T1, TIRM/STIR).

Key layout (see :mod:`.model` for the module trees), checked key by key and shape by shape before
anything is written; a missing, unexpected or misshapen key is a :class:`WeightsImportError` naming it:

* classifier (spa ``SequentialModel``): ``body.0.0.{0,1}.*`` stem conv and BN, ``body.0.{1-4}.{i}.*``
  bottleneck stages (3/4/23/3 blocks), ``head.1.1.*`` BN(4096), ``head.1.3.weight`` Linear 4096→512,
  ``head.1.5.*`` BN(512), ``head.1.7.weight`` Linear 512→2;
* denoiser (faimed3d ``DynamicUnet3D``, a fastai ``SequentialEx``): ``layers.0.*`` the ResNet-18 3D
  encoder, ``layers.1.*`` middle convs, ``layers.{2,3,4}.*`` U-Net blocks, ``layers.5.*`` transpose
  conv, ``layers.8.convpath.*`` final ResBlock, ``layers.9.0.*`` output conv.

A ``module.`` prefix on every key (a model saved while wrapped in DataParallel, spa's
``to_parallel()``) is stripped. Tensors are copied bit for bit (no dtype change: fp16 weights from
``to_fp16()`` are refused, because the pack stores float32 and a silent cast would not be an import).
Files are read with ``torch.load(weights_only=True)``: fastai's optimizer state is plain tensors and
numbers, so no code from the file runs; ``trust_pickle=True`` lifts this for files the site trusts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.chains.t1stir_3d.inference import MODELS, TASKS, classifier_prefix, denoiser_prefix
from pipeline.chains.t1stir_3d.model import (
    PUBLISHED_CLASSIFIER,
    PUBLISHED_DENOISER,
    SEQUENCES,
    build_classifier,
    build_denoiser,
)
from pipeline.chains.t1stir_3d.preprocess import PUBLISHED_PREPROCESSING
from pipeline.chains.checkpoints import WeightsImportError, check_state_dict, load_checkpoint
from pipeline.packs import ModelPack, sha256_of, write_pack

FASTAI_ENTRY = "model"
DATA_PARALLEL_PREFIX = "module."
#: the paper chose each cut-off on its validation set and did not publish it: 0.5 unless the site gives one
DEFAULT_THRESHOLD = 0.5

__all__ = ["WeightsImportError", "fastai_state_dict", "import_spa_models"]


def fastai_state_dict(saved: Any, expected: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """The state dict in a fastai model file, checked against ``expected`` (keys, shapes, dtypes)."""
    state = saved.get(FASTAI_ENTRY) if isinstance(saved, Mapping) and FASTAI_ENTRY in saved else saved
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsImportError(f"{what}: not a fastai model file (a dict with the state dict under '{FASTAI_ENTRY}', or a state dict)")
    if all(key.startswith(DATA_PARALLEL_PREFIX) for key in state):
        state = {key[len(DATA_PARALLEL_PREFIX):]: value for key, value in state.items()}
    check_state_dict(state, expected, what)
    wrong = [f"{k} is {state[k].dtype}, expected {v.dtype}" for k, v in expected.items() if state[k].dtype != v.dtype]
    if wrong:
        raise WeightsImportError(f"{what}: " + "; ".join(wrong[:5]))
    return dict(state)


def published_manifest(
    sources: Mapping[str, tuple[Path, str]],
    thresholds: Mapping[str, float],
    *,
    architecture: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of an imported pack (published architecture and preprocessing unless given)."""
    files = "; ".join(f"{role}: {path.name} (sha256 {digest})" for role, (path, digest) in sources.items())
    return {
        "name": "t1stir-3d-bressem2022",
        "version": "imported-" + ("-".join(digest[:6] for _, digest in sources.values()) or "none"),
        "chain": "t1stir-3d",
        "demo": False,
        "architecture": {
            "name": "faimed3d DynamicUnet3D (resnet18_3d) denoiser per sequence + dual-encoder ResNet-101 3D per task (Bressem et al. 2022)",
            "hyperparameters": {**(architecture or {"classifier": PUBLISHED_CLASSIFIER, "denoiser": PUBLISHED_DENOISER}), "models": MODELS},
        },
        "preprocessing": dict(preprocessing or PUBLISHED_PREPROCESSING),
        "outputs": [
            {"name": task, "concept": _concept(task), "threshold": float(thresholds.get(task, DEFAULT_THRESHOLD)), "description": f"softmax probability of class 1 of its own model: {text}"}
            for task, text in TASKS.items()
        ],
        "training_data": f"Models trained by the site with kbressem/spa; imported from {files}",
        "intended_use": (
            "Research use: detection of active inflammatory, ASAS-defined active and structural changes of the sacroiliac "
            "joints on semicoronal T1 and STIR MRI of adults with suspected axial spondyloarthritis. Not for diagnosis."
        ),
        "evaluation": {
            "source": "Bressem et al. 2022, external test set of 116 patients (as published, not re-measured here)",
            "auc_external": {"active_inflammation": 0.94, "asas_active_sacroiliitis": 0.88, "structural_lesions": 0.89},
        },
    }


def _concept(task: str) -> str:
    from pipeline.chains.t1stir_3d.inference import CONCEPTS

    return CONCEPTS[task]


def import_spa_models(
    classifiers: Mapping[str, Path],
    denoisers: Mapping[str, Path],
    out: Path,
    *,
    thresholds: Mapping[str, float] | None = None,
    trust_pickle: bool = False,
    architecture: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
) -> ModelPack:
    """Turn spa's model files (``classifiers`` by task, ``denoisers`` by sequence T1/STIR) into a pack at ``out``.

    Backs ``sijnode packs import-t1stir-3d``. Everything is checked before anything is written.
    ``architecture`` (``{"classifier": ..., "denoiser": ...}`` hyperparameters) and ``preprocessing``
    default to the published ones; a site that trained narrower variants with spa passes its own.
    """
    architecture = dict(architecture or {"classifier": PUBLISHED_CLASSIFIER, "denoiser": PUBLISHED_DENOISER})
    if set(classifiers) != set(TASKS):
        raise WeightsImportError(f"one classifier file per task is needed: {sorted(TASKS)}; got {sorted(classifiers)}")
    if set(denoisers) != set(SEQUENCES):
        raise WeightsImportError(f"one denoiser file per sequence is needed: {list(SEQUENCES)}; got {sorted(denoisers)}")
    unknown = sorted(set(thresholds or {}) - set(TASKS))
    if unknown:
        raise WeightsImportError(f"thresholds for unknown outputs {unknown}")
    with torch.device("meta"):  # only the names, shapes and dtypes are needed: no memory, no init
        expected_classifier = build_classifier(architecture["classifier"]).state_dict()
        expected_denoiser = build_denoiser(architecture["denoiser"]).state_dict()
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, tuple[Path, str]] = {}
    for sequence in SEQUENCES:
        path = Path(denoisers[sequence])
        own = fastai_state_dict(load_checkpoint(path, trust_pickle), expected_denoiser, f"{sequence} denoiser {path}")
        state.update({denoiser_prefix(sequence) + k: v for k, v in own.items()})
        sources[f"denoiser {sequence}"] = (path, sha256_of(path))
    for task in TASKS:
        path = Path(classifiers[task])
        own = fastai_state_dict(load_checkpoint(path, trust_pickle), expected_classifier, f"{task} classifier {path}")
        state.update({classifier_prefix(task) + k: v for k, v in own.items()})
        sources[f"classifier {task}"] = (path, sha256_of(path))
    manifest = published_manifest(sources, thresholds or {}, architecture=architecture, preprocessing=preprocessing)
    return write_pack(out, manifest, state)
