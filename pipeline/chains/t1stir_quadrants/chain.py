"""The ``t1stir-quadrants`` chain: coronal T1 + STIR -> per joint and quadrant lesion findings (Jamaludin et al. 2026).

Per sequence the contouring U-Net traces both joint lines on every slice (patient sides from
the DICOM geometry), the regions are cut from those contours, and the shared ResNet-34 with
14 heads classifies each joint; the reported probability is the annotator tree's
inter-reader consensus (R1R2). The model decides per joint and per quadrant, so:

* edema, erosion and fat lesion: **per quadrant** findings (site ilium / sacrum, region
  upper / lower, side left / right: all four quadrants of both joints, 8 per site);
* sclerosis and ankylosis: **per side** findings at the sacroiliac joint.

Outputs besides the findings: the key slice's traced joint lines of each sequence as SR
SCOORD polylines and drawn as an overlay; Grad-CAM on the source slice for each Present
finding (STIR for edema, T1 for the other lesion types). No STIR or no T1, a series that is
not coronal, or joints the contouring cannot find: "not analysed" with the reason.

Options (config.yaml ``chains[].options``): ``gradcam_limit`` (default 6): Grad-CAM heatmaps
for at most that many Present findings, the most probable first; 0 turns Grad-CAM off;
``parametric_maps`` (ModelChain).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from pydicom import Dataset

from pipeline.cam import evidence_map
from pipeline.chains import StudyInputs
from pipeline.chains.base import ModelChain
from pipeline.phantom.lesions import SIDES
from pipeline.phantom.readers import GRADED_OUTPUTS, JOINT_LESIONS_GRADED, output_lesion_type
from pipeline.results import (
    Category,
    ChainResult,
    Contour,
    Finding,
    ImageRef,
    Laterality,
    Map,
    MapMeaning,
    NotAnalysedReason,
    Region,
    Site,
)

from .data import SEQUENCES, sorted_slices
from .inference import (
    JointsNotFound,
    QuadrantGradCAM,
    StudyAnalysis,
    analyse,
    contour_to_source,
    crop_to_source,
    load_networks,
)
from .train import LESION_CONCEPTS

#: input keys (config.yaml ``requires[].name``) per sequence
INPUT_KEYS: dict[str, str] = {"T1": "t1", "STIR": "stir"}
#: the sequence whose Grad-CAM is shown for each lesion type (where the lesion shows best)
CAM_SEQUENCE: dict[str, str] = {"edema": "STIR", "erosion": "T1", "fat": "T1", "sclerosis": "T1", "ankylosis": "T1"}
#: overlay categories of the traced joint lines
CONTOUR_CATEGORIES = (Category(1.0, "left joint line (traced)"), Category(0.5, "right joint line (traced)"))
LATERALITY = {"left": Laterality.LEFT, "right": Laterality.RIGHT}
CONTOUR_DESCRIPTION = "joint line traced by the contouring network"


def quadrant_place(output: str) -> tuple[Site, Region] | None:
    """``edema_upper_ilium`` -> (ilium, upper); None for the per-joint outputs."""
    if output_lesion_type(output) in JOINT_LESIONS_GRADED:
        return None
    _, region, bone = output.split("_")
    return Site(bone), Region(region)


def key_slice(analysis: StudyAnalysis, sequence: str) -> int:
    """The slice shown: of those where both joint lines were traced, the one whose less certain contour is the most
    certain (:func:`~.inference.contour_confidence`); the first slice when no slice has both."""
    contoured = analysis.contoured[sequence]
    scores = [min(c.values()) if len(c) == len(SIDES) else -1.0 for c in contoured.confidence]
    return int(np.argmax(scores)) if scores else 0


def polyline_length_mm(points: np.ndarray, dataset: Dataset) -> float:
    """Length of a (row, col) source polyline in mm from PixelSpacing (row, col)."""
    spacing = np.array([float(v) for v in dataset.PixelSpacing])
    return float(np.linalg.norm(np.diff(points, axis=0) * spacing, axis=1).sum())


def rasterise(contours: Mapping[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Joint lines (source (row, col) points per side) drawn 3 pixels wide with their category values."""
    from scipy.ndimage import grey_dilation

    canvas = np.zeros(shape, dtype=np.float32)
    for category, side in zip(CONTOUR_CATEGORIES, SIDES):
        points = contours[side]
        steps = max(int(np.ceil(np.linalg.norm(np.diff(points, axis=0), axis=1).sum() * 2)), 2)
        distance = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
        along = np.linspace(0.0, distance[-1], steps)
        dense = np.stack([np.interp(along, distance, points[:, k]) for k in range(2)], axis=1)
        rows, cols = np.round(dense).astype(int).T
        inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        line = np.zeros(shape, dtype=np.float32)
        line[rows[inside], cols[inside]] = category.value
        canvas = np.where(line > 0, line, canvas)
    return grey_dilation(canvas, size=(3, 3))


class T1STIRQuadrantsChain(ModelChain):
    chain_name = "t1stir-quadrants"
    option_defaults: ClassVar[Mapping[str, Any]] = {"gradcam_limit": 6}
    option_minimums: ClassVar[Mapping[str, float]] = {"gradcam_limit": 0}

    def build(self, state_dict: dict) -> None:
        self.networks = load_networks(self.pack, state_dict).to(self.device)
        self.outputs = {output: self.pack.manifest.output(output) for output in GRADED_OUTPUTS}
        self.explainer = QuadrantGradCAM(self.networks.classifier) if self.settings["gradcam_limit"] > 0 else None

    def run(self, inputs: StudyInputs) -> ChainResult:
        from pipeline.encode.codes import concept

        with self.timed("read"):
            datasets = {s: sorted_slices(inputs.series[key].datasets()) for s, key in INPUT_KEYS.items() if key in inputs.series}
        missing = [s for s in SEQUENCES if s not in datasets]
        if missing:
            return self._not_analysed(
                datasets, NotAnalysedReason.OTHER_INPUTS_MISSING, f"no coronal {' and '.join(missing)} series in the study: the model needs both T1 and STIR"
            )
        with self.timed("contour and classify"):
            try:
                analysis = analyse(self.networks, datasets)
            except JointsNotFound as error:
                return self._not_analysed(datasets, NotAnalysedReason.INPUT_UNUSABLE, str(error))
            except ValueError as error:  # e.g. a slice that does not contain the head-foot axis
                return self._not_analysed(datasets, NotAnalysedReason.INPUT_UNUSABLE, f"the series cannot be contoured: {error}")
        keys = {s: key_slice(analysis, s) for s in SEQUENCES}
        contours, maps = self._contours(analysis, keys)
        cams, cam_evidence = self._gradcams(analysis) if self.explainer else ([], {})
        findings = []
        for side in SIDES:
            for index, output in enumerate(GRADED_OUTPUTS):
                kind = output_lesion_type(output)
                probability = float(np.clip(analysis.probabilities[side][index], 0.0, 1.0))
                key = keys[CAM_SEQUENCE[kind]]
                evidence = cam_evidence.get((side, output)) or (ImageRef.of(analysis.contoured[CAM_SEQUENCE[kind]].datasets[key]),)
                place = quadrant_place(output)
                threshold = self.outputs[output].threshold
                if place is None:
                    findings.append(
                        Finding.per_side(concept(LESION_CONCEPTS[kind]), Site.SACROILIAC_JOINT, LATERALITY[side], probability, threshold, evidence=evidence)
                    )
                else:
                    site, region = place
                    findings.append(
                        Finding.per_quadrant(concept(LESION_CONCEPTS[kind]), site, LATERALITY[side], region, probability, threshold, evidence=evidence)
                    )
        parameters: dict[str, object] = {
            "output": "inter-reader consensus (R1R2)",
            "contoured slices": ", ".join(
                f"{s} {analysis.contoured[s].found['left']}/{analysis.contoured[s].found['right']} of {len(analysis.contoured[s].contours)} (left/right)"
                for s in SEQUENCES
            ),
        }
        sources = [ds for s in SEQUENCES for ds in analysis.contoured[s].datasets]
        return ChainResult(
            findings=findings, provenance=self.provenance(**parameters), sources=sources, maps=[*maps, *cams], contours=contours
        )

    def _contours(self, analysis: StudyAnalysis, keys: Mapping[str, int]) -> tuple[list[Contour], list[Map]]:
        """The key slice's traced joint lines per sequence, as SCOORD contours and as one overlay per sequence."""
        contours, maps = [], []
        for sequence in SEQUENCES:
            contoured = analysis.contoured[sequence]
            dataset = contoured.datasets[keys[sequence]]
            on_source = {}
            for side in SIDES:
                vertices = contoured.contours[keys[sequence]][side]
                if vertices is None:
                    continue
                points = contour_to_source(vertices, contoured.series)
                on_source[side] = points
                contours.append(
                    Contour(ImageRef.of(dataset), points, Site.SACROILIAC_JOINT, f"{sequence} {CONTOUR_DESCRIPTION}", LATERALITY[side], polyline_length_mm(points, dataset))
                )
            if len(on_source) == len(SIDES):
                maps.append(
                    Map(
                        source=ImageRef.of(dataset),
                        values=rasterise(on_source, (int(dataset.Rows), int(dataset.Columns))),
                        meaning=MapMeaning.SEGMENTATION,
                        caption=f"{sequence} joint lines traced by the contouring network, slice {keys[sequence] + 1} of {len(contoured.datasets)}",
                        categories=CONTOUR_CATEGORIES,
                    )
                )
        return contours, maps

    def _gradcams(self, analysis: StudyAnalysis) -> tuple[list[Map], dict[tuple[str, str], tuple[ImageRef, ...]]]:
        """Grad-CAM on the source slice for the most probable Present findings (at most ``gradcam_limit``)."""
        present = [
            (float(analysis.probabilities[side][i]), side, output)
            for side in SIDES
            for i, output in enumerate(GRADED_OUTPUTS)
            if analysis.probabilities[side][i] >= self.outputs[output].threshold
        ]
        maps, evidence = [], {}
        with self.timed("gradcam"):
            for probability, side, output in sorted(present, reverse=True)[: self.settings["gradcam_limit"]]:
                sequence = CAM_SEQUENCE[output_lesion_type(output)]
                crops = self.explainer.maps(analysis.inputs[side], output, sequence)
                index = int(np.argmax(crops.reshape(len(crops), -1).sum(axis=1)))
                if crops[index].max() <= 0:
                    continue
                contoured = analysis.contoured[sequence]
                values = crop_to_source(crops[index], side, analysis.regions[sequence], contoured.series, self.networks.hyperparameters.roi_size)
                if values.max() <= 0:
                    continue
                source = ImageRef.of(contoured.datasets[index])
                evidence[(side, output)] = (source,)
                maps.append(
                    Map(
                        source=source,
                        values=evidence_map(values / values.max(), probability),
                        meaning=MapMeaning.GRAD_CAM,
                        caption=f"Grad-CAM x p, {output.replace('_', ' ')}, {side} joint, {sequence} slice {index + 1} of {len(contoured.datasets)}",
                    )
                )
        return maps, evidence

    def _not_analysed(self, datasets: Mapping[str, list], reason: NotAnalysedReason, detail: str) -> ChainResult:
        sources = [ds for series in datasets.values() for ds in series]
        return ChainResult.not_analysed_result(self.provenance(), sources, reason, detail)
