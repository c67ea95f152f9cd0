"""Model packs: a folder with ``manifest.yaml`` and ``weights.safetensors``, sha256-checked on load.

The manifest says what the model is (architecture and hyperparameters), how to feed it
(preprocessing), what it outputs (codes and operating thresholds), what it was trained on, what
it is for, and whether it is a demonstration. Reading and verifying a pack needs no torch, so
the node can check every configured pack at start-up; loading the weights does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.yaml"
WEIGHTS = "weights.safetensors"
#: the ``evaluation`` key of the summary ``sijnode evaluate`` writes for held-out data
HELD_OUT = "held_out"


class PackError(Exception):
    """A pack is missing, malformed, or its weights do not match the manifest."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Architecture(_Strict):
    name: str
    hyperparameters: dict[str, Any] = {}


class OutputSpec(_Strict):
    """One output of the model and how it becomes a finding."""

    name: str
    concept: str  # a name in pipeline.encode.codes, e.g. "active sacroiliitis"
    threshold: float = Field(ge=0, le=1)
    description: str = ""


class WeightsSpec(_Strict):
    file: str = WEIGHTS
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(_Strict):
    name: str
    version: str
    chain: str
    demo: bool
    architecture: Architecture
    preprocessing: dict[str, Any] = {}
    outputs: list[OutputSpec]
    training_data: str
    training: dict[str, Any] = {}  # how the weights were made (recipe, augmentation); training.json has the history
    intended_use: str
    weights: WeightsSpec
    evaluation: dict[str, Any] = {}  # summary metrics; the full report lives beside the manifest

    def output(self, name: str) -> OutputSpec:
        for output in self.outputs:
            if output.name == name:
                return output
        raise PackError(f"pack {self.name} has no output {name!r}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelPack:
    folder: Path
    manifest: Manifest

    @property
    def weights_path(self) -> Path:
        return self.folder / self.manifest.weights.file

    def verify(self) -> None:
        """Raise PackError unless the weights file exists and matches the manifest's sha256."""
        if not self.weights_path.is_file():
            raise PackError(f"pack {self.manifest.name}: weights file {self.weights_path} is missing")
        actual = sha256_of(self.weights_path)
        if actual != self.manifest.weights.sha256:
            raise PackError(
                f"pack {self.manifest.name}: weights sha256 {actual} does not match the manifest's {self.manifest.weights.sha256}"
            )

    def load_state_dict(self, device: str = "cpu") -> dict[str, "torch.Tensor"]:
        """The verified weights as a torch state dict."""
        from safetensors.torch import load_file

        self.verify()
        return load_file(str(self.weights_path), device=device)


def load_pack(folder: Path | str, chain: str | None = None) -> ModelPack:
    """Read a pack's manifest (not yet the weights); ``chain`` checks it is meant for that chain."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise PackError(f"no model pack at {folder}: {MANIFEST} is missing")
    try:
        manifest = Manifest.model_validate(yaml.safe_load(manifest_path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ValidationError) as error:
        raise PackError(f"{manifest_path}: invalid manifest:\n{error}") from None
    if chain is not None and manifest.chain != chain:
        raise PackError(f"pack {manifest.name} at {folder} is for chain {manifest.chain!r}, not {chain!r}")
    return ModelPack(folder, manifest)


def write_pack(folder: Path | str, manifest: Mapping[str, Any], state_dict: Mapping[str, "torch.Tensor"]) -> ModelPack:
    """Write weights and a manifest whose sha256 matches them; returns the verified pack."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(weights))
    data = dict(manifest)
    data["weights"] = {"file": WEIGHTS, "sha256": sha256_of(weights)}
    return _write_manifest(folder, data)


def update_evaluation(pack: ModelPack, key: str, summary: Mapping[str, Any]) -> ModelPack:
    """Put ``summary`` under ``evaluation[key]`` in the pack's manifest; returns the re-read, verified pack.

    Only the manifest is rewritten: the weights, and so their sha256, are untouched.
    """
    data = yaml.safe_load((pack.folder / MANIFEST).read_text(encoding="utf-8"))
    data.setdefault("evaluation", {})[key] = dict(summary)
    return _write_manifest(pack.folder, data)


def _write_manifest(folder: Path, data: Mapping[str, Any]) -> ModelPack:
    """Validate ``data`` and write it as the folder's manifest; returns the re-read, verified pack."""
    Manifest.model_validate(data)  # fail before writing an invalid manifest
    (folder / MANIFEST).write_text(yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True), encoding="utf-8")
    pack = load_pack(folder)
    pack.verify()
    return pack
