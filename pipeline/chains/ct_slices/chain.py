"""The node's ct-slices chain: an axial pelvic CT in, one patient-level finding, slice scores and Grad-CAM out.

Fu et al. (2024) classify single CT images; a PACS sends a volume. The chain finds the slices
through the sacroiliac joints (:mod:`.joints`), classifies each with the pack's network
(ResNeXt-50, Inception-v4, or the mean of both: the manifest's ``model``), and aggregates them to
one study probability by the rule in :mod:`.inference` (one noisy slice cannot flip it).

Finding: sacroiliitis, site sacroiliac joint, patient level: the seed has no per-side output,
so the finding carries no side. The SR lists the analysed slices (its image library), the
``report_slices`` most suspicious slices with their probabilities, and the Grad-CAM of the last
convolutional stage on the ``gradcam_slices`` most suspicious slices as heatmaps, drawn on the
source slice in the pack's bone window (``Map.display_window``), whatever window the series carries.

A series whose joints are not found, that is not one stack of slices, or whose slices are
further apart than the chain supports, gets a "not analysed" result with the reason, never a guess.

Options (config.yaml ``chains[].options``; ``ModelChain`` refuses unknown ones):

* ``gradcam_slices`` (default 3): heatmaps for this many of the most suspicious slices (0: none);
* ``report_slices`` (default 5): per-slice probabilities listed in the SR, most suspicious first;
* ``parametric_maps`` (default false): also encode the maps as Parametric Maps (ModelChain).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydicom import Dataset

from pipeline.cam import evidence_map
from pipeline.chains import StudyInputs
from pipeline.chains.base import ModelChain
from pipeline.chains.t2fs_mil.preprocess import SliceOrderError
from pipeline.results import (
    ChainResult,
    Finding,
    ImageRef,
    ImageScore,
    Map,
    MapMeaning,
    NotAnalysedReason,
    Site,
)

from .inference import OUTPUT, Analysis, CTSlicesModel, aggregation_rule, study_probability
from .preprocess import slice_spacing_mm

INPUT_KEY = "ct"
#: the thickest slice spacing the chain analyses (the issue's 0.6-5 mm, with rounding room)
MAX_SLICE_SPACING_MM = 5.5
PATIENT_LEVEL_NOTE = (
    "One probability for the patient (both sacroiliac joints together): the model classifies whole slices "
    "and does not decide a side. The study probability comes from the most suspicious slices with the "
    "single highest set aside, so one slice cannot decide it."
)


class CTSlicesChain(ModelChain):
    """Sacroiliitis on axial CT with ResNeXt-50 / Inception-v4 over the joint slices (Fu et al. 2024)."""

    chain_name = "ct-slices"
    option_defaults: ClassVar[Mapping[str, Any]] = {"gradcam_slices": 3, "report_slices": 5}
    option_minimums: ClassVar[Mapping[str, float]] = {"gradcam_slices": 0, "report_slices": 1}

    def build(self, state_dict: dict) -> None:
        self.model = CTSlicesModel.from_manifest(self.pack.manifest, state_dict, self.device)
        self.output = self.pack.manifest.output(OUTPUT)

    def run(self, inputs: StudyInputs) -> ChainResult:
        with self.timed("read"):
            datasets = self.single_series(inputs, INPUT_KEY, "axial CT").datasets()
        try:
            spacing = slice_spacing_mm(datasets) if datasets else 0.0
            if spacing > MAX_SLICE_SPACING_MM:
                return self._not_analysed(datasets, f"slices {spacing:.1f} mm apart; this chain analyses series of 0.6-5 mm slices")
            analysis = self.model.analyze(datasets, gradcam_slices=self.settings["gradcam_slices"], timed=self.timed)
        except SliceOrderError as error:
            return self._not_analysed(datasets, str(error))
        if not analysis.analysed:
            return self._not_analysed(analysis.volume.datasets, analysis.volume.joints.reason)
        return self._result(analysis)

    def _not_analysed(self, datasets: list[Dataset], detail: str) -> ChainResult:
        return ChainResult.not_analysed_result(self.provenance(), datasets[:1], NotAnalysedReason.INPUT_UNUSABLE, detail)

    def _result(self, analysis: Analysis) -> ChainResult:
        from pipeline.encode.codes import concept

        volume = analysis.volume
        assert analysis.probability is not None
        sources = [volume.datasets[i] for i in volume.selected]
        ranking = analysis.ranking()
        probability = min(max(analysis.probability, 0.0), 1.0)
        top = ranking[: self.settings["report_slices"]]
        finding = Finding.patient_level(
            concept(self.output.concept),
            Site.SACROILIAC_JOINT,
            probability,
            self.output.threshold,
            evidence=tuple(ImageRef.of(sources[i]) for i in ranking[: max(1, self.settings["gradcam_slices"])]),
            note=PATIENT_LEVEL_NOTE,
        )
        scores = [ImageScore(ImageRef.of(sources[i]), float(analysis.slice_probabilities[i]), concept("probability")) for i in top]
        maps = []
        window = (self.model.settings.window_center, self.model.settings.window_width)  # the networks' bone window, as the paper reads CT
        for rank, position in enumerate(ranking):
            index = volume.selected[position]
            if index in analysis.gradcam:
                maps.append(
                    Map(
                        ImageRef.of(volume.datasets[index]),
                        evidence_map(analysis.gradcam[index], probability),
                        MapMeaning.GRAD_CAM,
                        caption=(
                            f"Grad-CAM (last convolutional stage), slice {rank + 1} of {len(sources)} by probability "
                            f"(slice p = {analysis.slice_probabilities[position]:.3f}), scaled by the study probability; "
                            f"bone window C {window[0]:g} / W {window[1]:g} HU"
                        ),
                        display_window=window,
                    )
                )
        return ChainResult(
            findings=[finding],
            provenance=self.provenance(**self.parameters(analysis)),
            sources=sources,
            maps=maps,
            image_scores=scores,
        )

    def parameters(self, analysis: Analysis) -> dict[str, object]:
        """Provenance parameters (written into the SR's algorithm identification)."""
        volume = analysis.volume
        hyper = self.pack.manifest.architecture.hyperparameters
        parameters: dict[str, object] = {
            "model": hyper["model"],
            "aggregation": aggregation_rule(self.model.top_k),
            "joint slices found": len(volume.joints.indices),
            "slices analysed": len(volume.selected),
            "crop box rc": volume.box.as_list() if volume.box else "",
        }
        for name, values in analysis.network_probabilities.items():
            parameters[f"{name} study probability"] = round(study_probability(values, self.model.top_k), 4)
        return parameters
