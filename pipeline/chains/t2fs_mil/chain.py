"""The ``t2fs-mil`` chain: axial T2FS series → probability of active sacroiliitis, slice attention, Grad-CAM.

Keskin et al. (2026): ResNet-18 slice features, gated attention over the slices, a bag
classifier, horizontal-flip test-time augmentation. One probability per series: it covers both
joints together, so the finding is patient level (``Finding.patient_level``: no laterality, not
"bilateral"); the seed model has no per-side output and this chain does not invent one. Its
Grad-CAM maps are scaled by that probability (``pipeline.cam.evidence_map``).

Options (config.yaml ``chains[].options``):

* ``tta`` (default true): average the probabilities of the bag and its left-right mirror image;
* ``top_k`` (default 3): Grad-CAM maps (key images) for this many of the most attended slices;
  0 turns Grad-CAM off;
* ``batch_slices`` (default 16): slices encoded at a time (memory versus speed);
* ``parametric_maps`` (default false): also encode the maps as Parametric Maps (ModelChain).

``ModelChain`` refuses unknown options and values of the wrong type or out of range.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from pipeline.chains import StudyInputs
from pipeline.chains.base import ModelChain
from pipeline.chains.t2fs_mil.inference import (
    OUTPUT,
    GradCAMExplainer,
    load_model,
    predict,
    to_source_grid,
)
from pipeline.chains.t2fs_mil.preprocess import preprocess_series
from pipeline.cam import evidence_map
from pipeline.results import (
    ChainResult,
    Finding,
    ImageRef,
    ImageScore,
    Map,
    MapMeaning,
    Site,
)

INPUT_KEY = "t2fs"

PATIENT_LEVEL_NOTE = (
    "One probability for the axial T2FS series as a whole (both sacroiliac joints together): "
    "the model does not decide a side; the attention weights and Grad-CAM images show where it looked."
)


class T2FSMILChain(ModelChain):
    chain_name = "t2fs-mil"
    option_defaults: ClassVar[Mapping[str, Any]] = {"tta": True, "top_k": 3, "batch_slices": 16}
    option_minimums: ClassVar[Mapping[str, float]] = {"top_k": 0, "batch_slices": 1}

    def build(self, state_dict: dict) -> None:
        self.model = load_model(self.pack, state_dict).to(self.device)  # checks the manifest too
        self.hyperparameters = self.model.hyperparameters
        self.explainer = GradCAMExplainer(self.model) if self.settings["top_k"] > 0 else None
        self.output = self.pack.manifest.output(OUTPUT)

    def run(self, inputs: StudyInputs) -> ChainResult:
        from pipeline.encode.codes import concept

        tta, top_k = self.settings["tta"], self.settings["top_k"]
        with self.timed("read"):
            datasets = self.single_series(inputs, INPUT_KEY, "axial T2FS").datasets()
        with self.timed("preprocess"):
            ordered, bag = preprocess_series(datasets, self.hyperparameters.input_size, self.model.recipe)
            bag = bag.to(self.device)
        with self.timed("inference"):
            prediction = predict(self.model, bag, tta=tta, chunk=self.settings["batch_slices"])
        probability = float(np.clip(prediction.probability, 0.0, 1.0))
        ranked = [int(i) for i in np.argsort(-prediction.attention, kind="stable")]
        top = ranked[: min(top_k, len(ordered))]
        maps: list[Map] = []
        if self.explainer is not None and top:
            with self.timed("gradcam"):
                cams = self.explainer.maps(bag, prediction.features, top)
                for index, cam in zip(top, cams):
                    source = ordered[index]
                    maps.append(
                        Map(
                            source=ImageRef.of(source),
                            values=evidence_map(to_source_grid(cam, int(source.Rows), int(source.Columns)), probability),
                            meaning=MapMeaning.GRAD_CAM,
                            key=True,
                            caption=(
                                f"Grad-CAM x p, attention rank {ranked.index(index) + 1} of {len(ordered)} "
                                f"(weight {prediction.attention[index]:.3f})"
                            ),
                        )
                    )
        finding = Finding.patient_level(
            concept(self.output.concept),
            Site.SACROILIAC_JOINT,
            probability,
            self.output.threshold,
            evidence=tuple(ImageRef.of(ordered[i]) for i in top),
            note=PATIENT_LEVEL_NOTE,
        )
        attention_concept = concept("attention weight")
        scores = [
            ImageScore(ImageRef.of(source), float(weight), attention_concept)
            for source, weight in zip(ordered, prediction.attention)
        ]
        parameters: dict[str, object] = {
            "tta": "horizontal flip" if tta else "off",
            "slices": len(ordered),
            "input_size": self.hyperparameters.input_size,
            "preprocessing": self.model.recipe,
            "output": "sigmoid of one logit" if self.hyperparameters.classes == 1 else 'softmax, class "Inflamed"',
            "probability without TTA": round(prediction.probability_original, 4),
        }
        if prediction.probability_flipped is not None:
            parameters["probability of the flipped bag"] = round(prediction.probability_flipped, 4)
        return ChainResult(
            findings=[finding],
            provenance=self.provenance(**parameters),
            sources=ordered,
            maps=maps,
            image_scores=scores,
        )
