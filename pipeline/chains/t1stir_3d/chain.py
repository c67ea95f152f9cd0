"""The ``t1stir-3d`` chain: semicoronal T1 + STIR → three patient-level findings and Grad-CAM per sequence.

Bressem et al. (2022): both series on one 3.5×1×1 mm grid, clipped and bias-corrected, denoised by
a 3D U-Net per sequence, then one dual-encoder 3D ResNet-101 per task (active inflammatory lesions,
ASAS active sacroiliitis, structural lesions). Each model gives one probability for the examination:
the findings have no side and no quadrant.

Options (config.yaml ``chains[].options``):

* ``top_k`` (default 1): Grad-CAM heatmaps per task and sequence, on the source slices where the map
  carries the most weight; 0 turns Grad-CAM off;
* ``parametric_maps`` (default false): also encode the maps as Parametric Maps (ModelChain).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from pipeline.chains import StudyInputs
from pipeline.chains.base import ModelChain
from pipeline.chains.t1stir_3d.inference import (
    CONCEPTS,
    TASKS,
    GradCAMExplainer,
    check_manifest,
    classifier_input,
    load_networks,
    most_informative,
    probability,
)
from pipeline.chains.t1stir_3d.model import SEQUENCES
from pipeline.chains.t1stir_3d.preprocess import (
    NoOverlapError,
    SeriesGeometryError,
    prepare_pair,
)
from pipeline.cam import evidence_map
from pipeline.results import ChainResult, Finding, ImageRef, Map, MapMeaning, NotAnalysedReason, Site

#: input keys (config.yaml ``requires[].name``) per sequence
INPUT_KEYS: dict[str, str] = {"T1": "t1", "STIR": "stir"}

PATIENT_LEVEL_NOTE = (
    "One probability for the examination (semicoronal T1 and STIR together, both sacroiliac joints): "
    "the model does not say which side or where; the Grad-CAM images show where it looked."
)


class T1STIR3DChain(ModelChain):
    chain_name = "t1stir-3d"
    option_defaults: ClassVar[Mapping[str, Any]] = {"top_k": 1}
    option_minimums: ClassVar[Mapping[str, float]] = {"top_k": 0}

    def build(self, state_dict: dict) -> None:
        self.preprocessing = check_manifest(self.pack)
        self.networks = load_networks(self.pack, state_dict).to(self.device)
        self.explainers = {task: GradCAMExplainer(model) for task, model in self.networks.classifiers.items()} if self.settings["top_k"] > 0 else {}
        self.outputs = {task: self.pack.manifest.output(task) for task in TASKS}

    def run(self, inputs: StudyInputs) -> ChainResult:
        from pipeline.encode.codes import concept

        with self.timed("read"):
            datasets = {s: inputs.series[key].datasets() for s, key in INPUT_KEYS.items() if key in inputs.series}
        missing = [s for s in SEQUENCES if s not in datasets]
        if missing:
            return self._not_analysed(datasets, f"no semicoronal {' and '.join(missing)} series in the study: the models need both T1 and STIR")
        with self.timed("preprocess"):
            try:
                pair = prepare_pair(datasets["T1"], datasets["STIR"], self.preprocessing)
            except (NoOverlapError, SeriesGeometryError) as error:
                return self._not_analysed(datasets, str(error))
        with self.timed("denoise"):
            volumes = classifier_input({s: pair.series[s].grid_volume for s in SEQUENCES}, self.networks.denoisers, self.preprocessing)
        with self.timed("classify"):
            probabilities = {task: probability(model, volumes) for task, model in self.networks.classifiers.items()}
        maps: list[Map] = []
        evidence: dict[str, list[ImageRef]] = {task: [] for task in TASKS}
        if self.explainers:
            with self.timed("gradcam"):
                for task, explainer in self.explainers.items():
                    for sequence, cam in explainer.maps(volumes).items():
                        ordered = pair.series[sequence].datasets
                        for rank, (index, values) in enumerate(most_informative(cam, pair.grid, ordered, self.settings["top_k"], self.preprocessing), start=1):
                            source = ImageRef.of(ordered[index])
                            evidence[task].append(source)
                            maps.append(
                                Map(
                                    source=source,
                                    values=evidence_map(values, probabilities[task]),
                                    meaning=MapMeaning.GRAD_CAM,
                                    caption=f"Grad-CAM x p, {TASKS[task].split(' (')[0]}, {sequence} pass, slice {index + 1} of {len(ordered)} (rank {rank} by map weight)",
                                )
                            )
        findings = [
            Finding.patient_level(
                concept(CONCEPTS[task]),
                Site.SACROILIAC_JOINT,
                float(np.clip(probabilities[task], 0.0, 1.0)),
                self.outputs[task].threshold,
                evidence=tuple(evidence[task]) or tuple(ImageRef.of(ds) for s in SEQUENCES for ds in pair.series[s].datasets[:1]),
                note=PATIENT_LEVEL_NOTE,
            )
            for task in TASKS
        ]
        parameters: dict[str, object] = {
            "T1/STIR overlap": round(pair.overlap, 3),
            "grid": "x".join(str(v) for v in pair.grid.size),
            "classifier input": "x".join(str(v) for v in volumes.shape[2:]),
        }
        sources = [ds for s in SEQUENCES for ds in pair.series[s].datasets]
        return ChainResult(findings=findings, provenance=self.provenance(**parameters), sources=sources, maps=maps)

    def _not_analysed(self, datasets: Mapping[str, list], detail: str) -> ChainResult:
        """The "not analysed" result, with the reason, over whatever series the study had."""
        sources = [ds for series in datasets.values() for ds in series]
        return ChainResult.not_analysed_result(self.provenance(), sources, NotAnalysedReason.INPUT_UNUSABLE, detail)
