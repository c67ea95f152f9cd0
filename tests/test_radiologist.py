"""What the radiologist reads (issue 10): true laterality, template-clean SRs, readable
dsr2html, heatmaps that inform, and one study summary.

Checked with the tools a PACS team uses: dsr2html (the text a reader sees), PixelMed's
DicomSRValidator (no warning and no error), dciodvfy (no error). The end-to-end test sends
radiographs with left-only, right-only, bilateral and no sacroiliitis, and an MRI study with
series no chain takes, through the real node into Orthanc and reads back what PACS holds.
"""

from __future__ import annotations

import html
import re
import subprocess
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid

from pipeline.cam import evidence_map
from pipeline.encode.codes import concept
from pipeline.encode.heatmap import encode_heatmaps
from pipeline.encode.render import font_px, layout_text, render_heatmap
from pipeline.encode.sr import encode_sr
from pipeline.encode.summary import (
    StudySummary,
    chain_outcome,
    encode_summary,
    series_fates,
)
from pipeline.results import (
    Category,
    ChainResult,
    Finding,
    ImageRef,
    Laterality,
    Map,
    MapMeaning,
    NotAnalysedReason,
    SideExplanation,
    Site,
)
from pipeline.route import ChainSpec
from tests.dicom3tools import dciodvfy_errors
from tests.encode_fixtures import chain_result, demo_provenance, mr_series, pelvis_radiograph
from tests.test_encode import DSR2HTML, pixelmed_sr_validator

XR_CHAINS = [
    ChainSpec(name="xr-anatomy", implementation="pipeline.chains.xr_anatomy.chain:XRAnatomyChain", requires=[{"role": "XR"}]),
    ChainSpec(name="t2fs-mil", implementation="pipeline.chains.t2fs_mil.chain:T2FSMILChain", requires=[{"role": "T2FS", "planes": ["axial"]}]),
]
#: the smallest text height, relative to the image's larger side, that we accept: at 0.015 a
#: 2,350-row radiograph fitted into a 1,000-pixel viewport still shows text 15 px high
MIN_TEXT_FRACTION = 0.015


def reader_text(path: Path) -> str:
    """dsr2html's page as plain text (tags removed), as a browser would show it."""
    page = subprocess.run([DSR2HTML, str(path)], capture_output=True, text=True, timeout=60, check=True).stdout
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def warnings_and_errors(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith(("Warning", "Error"))]


# --- results as a radiograph chain and a per-side chain would make them --------------------------


@pytest.fixture(scope="module")
def radiograph_result() -> ChainResult:
    """A patient-level finding with per-side explanations, a note, a Grad-CAM and a categorical overlay."""
    source = pelvis_radiograph()
    sacroiliitis = concept("radiographic sacroiliitis")
    finding = Finding.patient_level(
        sacroiliitis, Site.SACROILIAC_JOINT, 0.7352, 0.59, evidence=(ImageRef.of(source),), note="High-confidence prediction (p >= 0.70)."
    )
    cam = np.zeros((int(source.Rows), int(source.Columns)), dtype=np.float32)
    cam[30:80, 150:200] = 1.0
    labels = np.zeros_like(cam)
    labels[20:90, 40:110] = 0.5
    labels[40:60, 60:80] = 0.8
    share = concept("share of Grad-CAM in joint box")
    return ChainResult(
        findings=[finding],
        provenance=replace(demo_provenance(), chain="xr-anatomy", pack_name="xr-anatomy-demo"),
        sources=[source],
        maps=[
            Map(ImageRef.of(source), evidence_map(cam, finding.probability), MapMeaning.GRAD_CAM, caption="Grad-CAM x p"),
            Map(ImageRef.of(source), labels, MapMeaning.SEGMENTATION, caption="segmentation",
                categories=(Category(0.5, "sacrum and ilia"), Category(0.8, "joint regions"))),
        ],
        explanations=[
            SideExplanation(sacroiliitis, Laterality.LEFT, 0.12, share),
            SideExplanation(sacroiliitis, Laterality.RIGHT, 0.81, share),
        ],
    )


@pytest.fixture(scope="module")
def srs(radiograph_result: ChainResult, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Written SRs: patient level with explanations; per side and per quadrant with slice scores;
    not analysed; and the study summary."""
    folder = tmp_path_factory.mktemp("srs")
    per_side = chain_result(mr_series(12, procedure_code=True, window=True))
    not_analysed = ChainResult.not_analysed_result(
        demo_provenance(), mr_series(2), NotAnalysedReason.INPUT_UNUSABLE, "2 slices; the model needs 8"
    )
    summary = StudySummary("1.2.3", (), ())
    objects = {
        "patient level": encode_sr(radiograph_result, generate_uid(), 9000),
        "per side": encode_sr(per_side, generate_uid(), 9000),
        "not analysed": encode_sr(not_analysed, generate_uid(), 9000),
        "summary": encode_summary(summary, mr_series(1)[0], 1)[1],
    }
    paths = {}
    for name, dataset in objects.items():
        paths[name] = folder / f"{name.replace(' ', '_')}.dcm"
        dataset.save_as(paths[name], enforce_file_format=True)
    return paths


# --- 1. laterality ----------------------------------------------------------------------------


def test_a_patient_level_finding_states_no_side(srs: dict[str, Path]) -> None:
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(srs["patient level"]))
    groups = sr.content.get_image_measurement_groups()
    (finding,) = [g for g in groups if g.finding_type.meaning.startswith("Radiographic")]
    (site,) = finding.finding_sites
    assert site.laterality is None
    # the sides appear only in the explanation group, labelled as such, without a decision
    (explanation,) = [g for g in groups if g.finding_type.meaning == "Visual explanation"]
    assert explanation.tracking_identifier.startswith("Explanation, not a finding")
    assert {m.finding_sites[0].laterality.meaning for m in explanation.get_measurements()} == {"Left", "Right"}
    decisions = {"52101004", "272519000"}  # Present, Absent
    assert not any(
        item.ValueType == "CODE" and item.ConceptCodeSequence[0].CodeValue in decisions
        for m in explanation.get_measurements()
        for item in m[0].ContentSequence
    )


# --- 2. template-clean ------------------------------------------------------------------------


@pytest.mark.slow
def test_pixelmed_finds_no_warning_and_no_error_in_any_sr(srs: dict[str, Path], tmp_path: Path) -> None:
    reports = pixelmed_sr_validator(list(srs.values()), tmp_path)
    for name, path in srs.items():
        report = reports[path]
        assert "Root Template Validation Complete" in report, (name, report[-2000:])
        assert warnings_and_errors(report) == [], (name, report[-3000:])


def test_dciodvfy_finds_no_error_in_the_srs_heatmaps_and_card(
    srs: dict[str, Path], radiograph_result: ChainResult, tmp_path: Path
) -> None:
    heatmaps = encode_heatmaps(radiograph_result, generate_uid(), 9001)
    card = encode_summary(StudySummary("1.2.3", (), ()), pelvis_radiograph(), 1)[0]
    paths = list(srs.values())
    for index, dataset in enumerate([*heatmaps, card]):
        paths.append(tmp_path / f"{index}.dcm")
        dataset.save_as(paths[-1], enforce_file_format=True)
    for path in paths:
        assert dciodvfy_errors(path) == [], path


# --- 3. readable --------------------------------------------------------------------------------


def test_dsr2html_shows_the_findings_before_the_image_library(srs: dict[str, Path]) -> None:
    text = reader_text(srs["patient level"])
    library = text.index("Image Library")
    for expected in (
        "DEMONSTRATION: produced by the demonstration pack",
        "PRESENT: probability 0.74 of radiographic sacroiliitis (modified New York criteria) (present at >= 0.59); "
        "sacroiliac joints, both sides together (no side decided). High-confidence prediction",
        "Explanation, not a finding (where the model looked for radiographic sacroiliitis (modified New York criteria)): "
        "share of Grad-CAM in joint box, left 0.12, right 0.81",
    ):
        assert 0 <= text.index(expected) < library, expected
    assert "Bilateral" not in text
    assert "0.7352" not in text  # two decimals for the reader (full precision stays in FloatingPointValue)


def test_dsr2html_shows_sides_and_a_labelled_top_list_of_slices(srs: dict[str, Path]) -> None:
    text = reader_text(srs["per side"])
    library = text.index("Image Library")
    assert 0 <= text.index("PRESENT: probability 0.91 of active sacroiliitis (present at >= 0.50); left sacroiliac joint") < library
    assert 0 <= text.index("ABSENT: probability 0.05 of edema (present at >= 0.50); right ilium, upper") < library
    top = re.search(r"Top 5 of 12 images by attention weight: ((instance \d+: [0-9.]+; ){4}instance \d+: [0-9.]+)", text)
    assert top is not None and top.start() < library
    assert top.group(1).startswith("instance 12: 0.600; instance 11: ")
    section = text[library : text.index("Imaging Measurements", library)]
    assert section.count("MR image") == 6  # the cited images only (5 top-scored, 1 evidence), not all 12 slices


def test_not_analysed_is_said_in_words(srs: dict[str, Path]) -> None:
    assert "not analysed: input unusable (2 slices; the model needs 8)" in reader_text(srs["not analysed"])


# --- 4. heatmaps --------------------------------------------------------------------------------


def _text_rows(rgb: np.ndarray, top: int) -> int:
    """Rows of the band below ``top`` that hold white text pixels in the first text line."""
    band = rgb[top:]
    white = (band.min(axis=-1) > 200).any(axis=1)
    first = int(np.argmax(white))
    end = first + int(np.argmin(white[first:]))
    return end - first


@pytest.mark.parametrize("rows, columns", [(256, 256), (512, 448), (2350, 2000)])
def test_heatmap_text_is_legible_in_a_1000_pixel_viewport_and_off_the_image(rows: int, columns: int) -> None:
    lines = ["DEMONSTRATION", "Radiographic sacroiliitis: PRESENT, p = 0.74 (threshold 0.59)", "Instance 1: Grad-CAM x p"]
    gray, values = np.full((rows, columns), 0.5), np.zeros((rows, columns))
    rgb, layout = render_heatmap(gray, values, lines)
    assert (rgb[:rows, :columns] == np.round(255 * 0.5)).all()  # not one pixel of text on the image
    measured = _text_rows(rgb, rows)  # the capital D's height as drawn
    fitted = 1000 / max(rgb.shape[:2])  # the whole heatmap fitted into a 1,000-pixel viewport
    assert measured / max(rows, columns) >= MIN_TEXT_FRACTION * 0.65, measured  # cap height ~ 0.7 of the font
    assert font_px(rows, columns) / max(rows, columns) >= MIN_TEXT_FRACTION
    assert measured * fitted >= 7, (measured, fitted)
    assert layout.top == rows


def test_a_negative_study_does_not_look_positive(radiograph_result: ChainResult) -> None:
    """The same Grad-CAM shape at p = 0.13 and at p = 0.9: the negative one leaves the image gray."""
    source = radiograph_result.sources[0]
    cam = np.zeros((int(source.Rows), int(source.Columns)), dtype=np.float32)
    cam[30:80, 150:200] = 1.0
    gray = np.full(cam.shape, 0.5)
    colour = {}
    for p in (0.13, 0.9):
        rgb, _ = render_heatmap(gray, evidence_map(cam, p), ["x"])
        image = rgb[: cam.shape[0], : cam.shape[1]].astype(int)[cam > 0]  # where the model looked
        colour[p] = float((image.max(axis=-1) - image.min(axis=-1)).mean())
    assert colour[0.13] == 0 and colour[0.9] > 20, colour


def test_categorical_overlay_has_a_legend_and_captions_name_the_instance(radiograph_result: ChainResult) -> None:
    cam_sc, overlay_sc = encode_heatmaps(radiograph_result, generate_uid(), 9001)
    source = radiograph_result.sources[0]
    assert "Instance 1: Grad-CAM x p" in cam_sc.ImageComments and "PRESENT, p = 0.74 (threshold 0.59)" in cam_sc.ImageComments
    band = overlay_sc.pixel_array[source.Rows :]
    # the legend: swatches of the two category colours (green, orange) in the band
    for colour in ((0, 200, 80), (255, 150, 0)):
        assert (np.abs(band.astype(int) - colour).sum(axis=-1) == 0).sum() > 20, colour
    # the colour bar: the jet scale's red end, and its tick labels, are in the Grad-CAM's band
    cam_band = cam_sc.pixel_array[source.Rows :].astype(int)
    assert ((cam_band[..., 0] > 120) & (cam_band[..., 2] < 30) & (cam_band[..., 1] < 30)).sum() > 10


def test_rendered_examples_under_docs_are_legible() -> None:
    """The committed examples (docs/heatmaps/*.png): text height >= 1.5 % of the image's larger side."""
    from PIL import Image

    examples = sorted((Path(__file__).resolve().parent.parent / "docs" / "heatmaps").glob("*.png"))
    assert len(examples) >= 3
    for path in examples:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        source_rows = int(path.stem.rsplit("-", 1)[-1])  # file names end in the source's row count
        measured = _text_rows(rgb, source_rows)
        assert measured / max(source_rows, rgb.shape[1]) >= MIN_TEXT_FRACTION * 0.65, (path.name, measured)


# --- 5. the summary -------------------------------------------------------------------------------


def _series(uid: str, number: int, role: str, plane: str, counts: bool = True, reason: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(series_uid=uid, series_number=number, description=f"s{number}", modality="MR",
                           role=role, plane=plane, counts_as_input=counts, reason=reason)


def test_every_input_capable_series_gets_its_fate() -> None:
    series = [
        _series("a", 1, "OTHER", "none", False, "localizer"),
        _series("b", 2, "T2FS", "axial"),
        _series("c", 3, "T2FS", "coronal"),
        _series("d", 4, "STIR", "coronal"),
        _series("e", 5, "T2FS", "axial"),
        _series("f", 6, "XR", "none"),
        _series("g", 7, "T1", "coronal", False, "derived image"),
    ]
    jobs = [
        SimpleNamespace(chain="t2fs-mil", state="done", inputs={"t2fs": "b"}, error=None),
        SimpleNamespace(chain="xr-anatomy", state="failed", inputs={"xr": "f"}, error="RuntimeError: out of memory\ntrace"),
    ]
    fates = {fate.series_number: fate for fate in series_fates(series, jobs, XR_CHAINS)}
    assert sorted(fates) == [2, 3, 4, 5, 6, 7]  # the localizer is no input
    assert fates[2].analysed_by == ("t2fs-mil",)
    expected = {
        3: NotAnalysedReason.WRONG_PLANE,
        4: NotAnalysedReason.NO_CHAIN_CONFIGURED,
        5: NotAnalysedReason.OTHER_SERIES_USED,
        6: NotAnalysedReason.CHAIN_FAILED,
        7: NotAnalysedReason.INPUT_UNUSABLE,
    }
    assert {n: fates[n].not_analysed.reason for n in expected} == expected
    assert "xr-anatomy: RuntimeError: out of memory" in fates[6].text
    summary = StudySummary("1.2.3", (chain_outcome(jobs[0], ["DEMONSTRATION: x", "PRESENT: probability 0.80 of y"]), chain_outcome(jobs[1], None)), tuple(fates.values()))
    texts = [text for _, text in summary.lines()]
    assert texts[0].startswith("DEMONSTRATION") and "t2fs-mil: PRESENT: probability 0.80 of y" in texts
    assert "xr-anatomy: not analysed: chain failed (RuntimeError: out of memory)" in texts
    card, sr = encode_summary(summary, mr_series(1)[0], 2)
    assert "summary" in card.SeriesDescription and "summary" in sr.SeriesDescription
    assert card.SeriesDescription.startswith("DEMONSTRATION") and card.InstanceNumber == 2
    # new content, new instance; the same content, the same instance
    again = encode_summary(summary, mr_series(1)[0], 2)[0]
    changed = encode_summary(replace(summary, chains=summary.chains[:1]), mr_series(1)[0], 3)[0]
    assert again.SOPInstanceUID == card.SOPInstanceUID != changed.SOPInstanceUID
    assert changed.SeriesInstanceUID == card.SeriesInstanceUID


# --- end to end: phantoms through the node into Orthanc ---------------------------------------------

E2E_STUDIES = {  # name → (seed, SPEC, kinds): modified New York grades per side
    "left only": (91001, {"lesions": [], "mny_grade": {"left": 4, "right": 0}}, ("mri", "xr")),
    "right only": (91002, {"lesions": [], "mny_grade": {"left": 0, "right": 4}}, ("xr",)),
    "bilateral": (91003, {"lesions": [], "mny_grade": {"left": 4, "right": 4}}, ("xr",)),
    "none": (91004, "none", ("xr",)),
    "no chain applies": (91005, "none", ("mri",)),  # only xr-anatomy configured: no job, still a summary
}
JOBLESS = "no chain applies"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _study_objects(pacs, study_uid: str, expected: int = 5) -> list[pydicom.Dataset] | None:
    """The node's objects of one study in Orthanc: chain SR, 2 heatmaps, summary card and SR
    (``expected`` 5), or only the summary card and SR of a study no chain ran on (2)."""
    matches = [m for m in pacs.lookup(study_uid) if m.get("Type") == "Study"]
    if not matches:
        return None
    found = []
    for series in pacs.get(f"/studies/{matches[0]['ID']}/series"):
        if "AI " not in series["MainDicomTags"].get("SeriesDescription", ""):
            continue
        found += [pydicom.dcmread(DicomBytesIO(pacs.instance_file(i))) for i in series["Instances"]]
    return found if len(found) >= expected else None


@pytest.mark.slow
@pytest.mark.timeout(600)  # four radiographs through the real chain on a shared CPU
def test_phantoms_through_the_node_state_no_side_and_get_a_summary(tmp_path: Path) -> None:
    from pipeline.phantom import generate_study, write_study
    from tests.node_harness import NODE_AET, REPO, Node
    from tests.peers import LOOPBACK, orthanc, run_storescu, wait_for

    chain = {"name": "xr-anatomy", "implementation": "pipeline.chains.xr_anatomy.chain:XRAnatomyChain",
             "pack": str(REPO / "packs" / "xr-anatomy-demo"), "requires": [{"role": "XR"}]}
    studies = {name: generate_study(seed, kinds=kinds, lesions=spec) for name, (seed, spec, kinds) in E2E_STUDIES.items()}
    with orthanc(tmp_path / "orthanc") as pacs:
        overrides = {"peers": [{"name": "pacs", "ae_title": pacs.aet, "host": LOOPBACK, "port": pacs.dicom_port}], "chains": [chain]}
        with Node(tmp_path / "node", overrides) as node:
            for name, study in studies.items():
                folder = write_study(study, tmp_path / "phantoms" / name.replace(" ", "-"))
                sent = run_storescu(sorted(folder.glob("*/*.dcm")), node.port, NODE_AET)
                assert sent.returncode == 0, sent.stderr
            objects = {
                name: wait_for(lambda uid=study.study_uid, n=2 if name == JOBLESS else 5: _study_objects(pacs, uid, n), timeout=300, interval=1.0,
                               what=f"the {name} phantom's results in Orthanc\n{node.output_tail()}")
                for name, study in studies.items()
            }
    srs: dict[str, Path] = {}
    # a study no chain applies to gets the summary alone, saying why each series was not analysed
    jobless = objects.pop(JOBLESS)
    assert sorted(ds.SeriesDescription for ds in jobless) == ["AI summary report sijnode", "AI summary results card sijnode"]
    srs[JOBLESS] = tmp_path / "jobless-summary.dcm"
    next(ds for ds in jobless if str(ds.SOPClassUID) == SR_CLASS).save_as(srs[JOBLESS], enforce_file_format=True)
    jobless_text = reader_text(srs[JOBLESS])
    assert "No chain ran on this study." in jobless_text and "DEMONSTRATION" not in jobless_text
    for role in ("T1", "STIR", "T2FS"):
        assert re.search(rf"\(MR {role} [a-z]+\): not analysed: no chain configured", jobless_text), (role, jobless_text)
    for name, found in objects.items():
        chain_sr = [ds for ds in found if str(ds.SOPClassUID) == SR_CLASS and "summary" not in ds.SeriesDescription]
        card = [ds for ds in found if "results card" in ds.SeriesDescription]
        summary_sr = [ds for ds in found if "summary report" in ds.SeriesDescription]
        assert (len(chain_sr), len(card), len(summary_sr)) == (1, 1, 1), [ds.SeriesDescription for ds in found]
        for kind, dataset in (("chain", chain_sr[0]), ("summary", summary_sr[0])):
            srs[f"{name} {kind}"] = tmp_path / f"{name.replace(' ', '-')}-{kind}.dcm"
            dataset.save_as(srs[f"{name} {kind}"], enforce_file_format=True)
        # no SR asserts a side: the finding's site has no laterality; sides only in the explanation
        sr = hd.sr.Comprehensive3DSR.from_dataset(chain_sr[0])
        for group in sr.content.get_image_measurement_groups():
            sides = [site.laterality for site in group.finding_sites if site.laterality is not None]
            assert not sides or group.finding_type.meaning == "Visual explanation", group.tracking_identifier
        text = reader_text(srs[f"{name} chain"])
        assert "both sides together (no side decided)" in text and "Bilateral" not in text
        assert text.index("probability") < text.index("Image Library")
        # the summary lists the chain's finding and every input-capable series with its fate
        summary_text = reader_text(srs[f"{name} summary"])
        assert "xr-anatomy: " in summary_text and "analysed by xr-anatomy" in summary_text
        assert "DEMONSTRATION" in card[0].SeriesDescription and "summary" in card[0].SeriesDescription
    mri_lines = reader_text(srs["left only summary"])
    for role in ("T1", "STIR", "T2FS"):
        assert re.search(rf"\(MR {role} [a-z]+\): not analysed: no chain configured", mri_lines), (role, mri_lines)
    reports = pixelmed_sr_validator(list(srs.values()), tmp_path)
    for name, path in srs.items():
        assert warnings_and_errors(reports[path]) == [], (name, reports[path][-2000:])
