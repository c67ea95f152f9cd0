"""The base every model chain builds on: its pack, its device, and run → ChainResult → DICOM."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

from pydicom import Dataset

from pipeline.chains import RuntimeSettings, StudyInputs
from pipeline.packs import ModelPack, load_pack
from pipeline.results import ChainResult, Provenance
from pipeline.route import ChainSpec


def select_device(requested: str) -> str:
    """'cpu', 'cuda' (an error without a GPU) or 'auto' (cuda when present)."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("workers.device is cuda but no CUDA device is available")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class ModelChain(ABC):
    """A chain with a model pack. Subclasses implement ``build`` and ``run``."""

    #: the chain name packs must declare in their manifest
    chain_name: str

    def __init__(self, spec: ChainSpec, runtime: RuntimeSettings) -> None:
        import torch

        if not spec.pack:
            raise ValueError(f"chain {spec.name} needs a model pack (chains[].pack in config.yaml)")
        self.name = spec.name
        self.options = dict(spec.options)
        self.pack: ModelPack = load_pack(spec.pack, chain=self.chain_name)
        self.device = select_device(runtime.device)
        torch.set_num_threads(runtime.torch_threads)
        self.timings: dict[str, float] = {}
        self.build(self.pack.load_state_dict())

    @abstractmethod
    def build(self, state_dict: dict) -> None:
        """Construct the networks from the pack's manifest and load ``state_dict`` strictly."""

    @abstractmethod
    def run(self, inputs: StudyInputs) -> ChainResult:
        """Turn the study's input series into findings, maps and scores."""

    def produce(self, inputs: StudyInputs) -> list[Dataset]:
        from pipeline.encode import encode_result

        self.timings = {}
        result = self.run(inputs)
        with self.timed("encode"):
            return encode_result(result, parametric_maps=bool(self.options.get("parametric_maps", False)))

    def provenance(self, **parameters: object) -> Provenance:
        manifest = self.pack.manifest
        return Provenance(
            chain=self.name,
            pack_name=manifest.name,
            pack_version=manifest.version,
            weights_sha256=manifest.weights.sha256,
            demonstration=manifest.demo,
            device=self.device,
            timings_s=dict(self.timings),
            parameters=dict(parameters),
        )

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[step] = round(self.timings.get(step, 0.0) + time.perf_counter() - start, 4)
