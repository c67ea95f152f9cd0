"""The node's xr-anatomy chain: an AP pelvic radiograph in, one patient-level finding and two maps out.

Finding: radiographic sacroiliitis (modified New York criteria), site sacroiliac joint, patient
level (the classifier sees both joints in one crop and has one output: no side is decided), the
probability of the classifier's positive class, the pack's operating threshold (0.59
published). ``Finding.present`` is ``probability >= threshold`` while the paper calls a
radiograph positive when p > 0.59: the two differ only for p exactly equal to 0.59, a set of
measure zero for a softmax output, so the framework's rule is kept. At p >= 0.7 with the
published model (a pack whose manifest records the paper's progression odds ratio), the
finding's note says what the paper found such confident predictions to mean, and for whom:
patients whom readers graded *without* radiographic sacroiliitis. A demonstration pack never
carries the note: the paper's finding is about the published model.

Maps (on the radiograph's pixel grid): the Grad-CAM of ``layer4[-1]`` (of the predicted or the
positive class, as the pack says; its caption names the class), drawn back from the crop onto
the whole radiograph and scaled by the probability (``evidence_map``), and the segmentation
overlay of :mod:`.overlay` as a categorical map.

Explanation (never a finding): the share of the Grad-CAM inside each side's joint box, i.e.
where the model looked, per side.

Options (config.yaml ``chains[].options``; ``ModelChain`` refuses unknown ones):

* ``sw_batch_size`` (default 1): sliding windows the segmenter runs at a time (memory versus speed);
* ``parametric_maps`` (default false): also encode the maps as Parametric Maps (ModelChain).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydicom import Dataset

from pipeline.chains import StudyInputs
from pipeline.chains.base import ModelChain
import numpy as np

from pipeline.cam import evidence_map
from pipeline.results import (
    Category,
    ChainResult,
    Finding,
    ImageRef,
    Laterality,
    Map,
    MapMeaning,
    SideExplanation,
    Site,
)

from .inference import Analysis, AnatomyAwareModel
from .overlay import BONE, JOINT, MARK, segmentation_overlay

OUTPUT = "radiographic_sacroiliitis"  # the manifest output this chain reports
HIGH_CONFIDENCE = 0.7
#: the manifest's record of the paper's progression result; only a pack carrying it gets the note
PROGRESSION_EVIDENCE = "progression_odds_ratio_p_ge_0.7"
HIGH_CONFIDENCE_NOTE = (
    "Confident prediction (p >= 0.70). This applies only if readers do not grade radiographic "
    "sacroiliitis on this radiograph: in the seed study (Dorfner et al. 2024, 135 patients without "
    "radiographic sacroiliitis at baseline), such confident false-positive predictions of this model "
    "(30 patients, 12 of whom progressed) carried an odds ratio of 2.16 (95 % CI 1.19-3.86) for "
    "progression to radiographic sacroiliitis within two years."
)
CLASS_NAMES = ("no radiographic sacroiliitis", "radiographic sacroiliitis")
OVERLAY_CAPTION = "Segmentation and joint regions the classifier used"
OVERLAY_CATEGORIES = (
    Category(BONE, "sacrum and ilia"),
    Category(JOINT, "joint regions"),
    Category(MARK, "joint and crop boxes, L/R letters (patient's side)"),
)


class XRAnatomyChain(ModelChain):
    """Anatomy-aware radiographic sacroiliitis detection (Dorfner et al. 2024) on one radiograph."""

    chain_name = "xr-anatomy"
    option_defaults: ClassVar[Mapping[str, Any]] = {"sw_batch_size": 1}
    option_minimums: ClassVar[Mapping[str, float]] = {"sw_batch_size": 1}

    def build(self, state_dict: dict) -> None:
        self.model = AnatomyAwareModel.from_pack(
            self.pack.manifest, state_dict, self.device, sw_batch_size=self.settings["sw_batch_size"]
        )
        self.threshold = self.pack.manifest.output(OUTPUT).threshold

    def run(self, inputs: StudyInputs) -> ChainResult:
        from pipeline.encode.codes import concept

        source = self._radiograph(inputs)
        analysis = self.model.analyze(source, timed=self.timed)
        ref = ImageRef.of(source)
        finding = Finding.patient_level(
            concept("radiographic sacroiliitis"),
            Site.SACROILIAC_JOINT,
            min(max(analysis.probability, 0.0), 1.0),
            self.threshold,
            evidence=(ref,),
            note=self.note(analysis),
        )
        with self.timed("overlay"):
            overlay = segmentation_overlay(analysis.labels, analysis.classes, analysis.crop)
        maps = [
            Map(ref, overlay.values, MapMeaning.SEGMENTATION, caption=OVERLAY_CAPTION, categories=OVERLAY_CATEGORIES)
        ]
        explanations: list[SideExplanation] = []
        if analysis.gradcam is not None:
            maps.insert(0, Map(ref, evidence_map(analysis.gradcam, finding.probability), MapMeaning.GRAD_CAM, caption=self.gradcam_caption(analysis)))
            explanations = self.explanations(analysis, finding)
        return ChainResult(
            findings=[finding],
            provenance=self.provenance(**self.parameters(analysis)),
            sources=[source],
            maps=maps,
            explanations=explanations,
        )

    @staticmethod
    def explanations(analysis: Analysis, finding: Finding) -> list[SideExplanation]:
        """The share of the (unscaled) Grad-CAM inside each side's joint box: where the model looked."""
        from pipeline.encode.codes import concept

        cam = analysis.gradcam
        total = float(cam.sum()) if cam is not None else 0.0
        if cam is None or total <= 0:
            return []
        return [
            SideExplanation(
                finding.concept,
                Laterality(side),
                float(np.clip(cam[analysis.crop.regions[side].box.slices].sum() / total, 0.0, 1.0)),
                concept("share of Grad-CAM in joint box"),
            )
            for side in ("left", "right")
        ]

    # -- helpers ----------------------------------------------------------------------------------
    def _radiograph(self, inputs: StudyInputs) -> Dataset:
        """The radiograph: the first image (instance-number order) of the XR input series."""
        series = inputs.series.get("xr") or next(iter(inputs.series.values()))
        datasets = series.datasets()
        if not datasets:
            raise ValueError(f"series {series.series_uid} has no images")
        return datasets[0]

    def gradcam_caption(self, analysis: Analysis) -> str:
        """What the Grad-CAM map shows: which class, which layer, which smoothing."""
        target = CLASS_NAMES[int(analysis.notes.get("gradcam_class", 1))]
        smoothing = ", eigen-smoothed" if self.model.eigen_smooth else ""
        return f"Grad-CAM x p ({analysis.notes.get('gradcam_layer', 'layer4')}{smoothing}): evidence for {target}"

    def note(self, analysis: Analysis) -> str | None:
        """The finding's note: the high-confidence statement where it applies, and any joint-region fallback."""
        parts = []
        published = PROGRESSION_EVIDENCE in (self.pack.manifest.evaluation or {}) and not self.pack.manifest.demo
        if analysis.probability >= HIGH_CONFIDENCE and published:
            parts.append(HIGH_CONFIDENCE_NOTE)
        for side, method in sorted(analysis.crop.fallbacks.items()):
            parts.append(f"The {side} joint region was not found next to the sacrum; it was estimated ({method}).")
        return " ".join(parts) or None

    def parameters(self, analysis: Analysis) -> dict[str, object]:
        """Provenance parameters (written into the SR's algorithm identification)."""
        crop = analysis.crop
        parameters: dict[str, object] = {
            "decision": f"positive when p >= {self.threshold:g} (paper: p > 0.59)",
            "high_confidence_threshold": HIGH_CONFIDENCE,
            "segmentation_resample": self.model.segmentation.resample,
            "otsu_trim": self.model.otsu_trim,
            "gradcam": f"{analysis.notes.get('gradcam_layer', 'layer4')}, {self.model.gradcam_class} class"
            + (", eigen-smoothed" if self.model.eigen_smooth else ""),
            "crop_box_rc": crop.box.as_list(),
            "left_joint_box_rc": crop.regions["left"].box.as_list(),
            "right_joint_box_rc": crop.regions["right"].box.as_list(),
            "sacrum_dilation_px": crop.dilation_px,
            "patient_left_on_image": "right" if analysis.left_on_image_right else "left",
        }
        if crop.fallbacks:
            parameters["joint_region_fallbacks"] = ", ".join(f"{s}: {m}" for s, m in sorted(crop.fallbacks.items()))
        if analysis.notes.get("ilium_classes_swapped"):
            parameters["ilium_sides"] = "assigned by position (network classes swapped)"
        return parameters
