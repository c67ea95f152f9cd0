"""The DICOM result encoders (pipeline/encode): SR, heatmap SCs and Parametric Maps.

Every object is checked by the tools a PACS team would use (dciodvfy, dsrdump, dsr2html,
PixelMed's DicomSRValidator) and read back with highdicom; each validator is also shown a
deliberately broken object, so that its assertion is known to be able to fail.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import zipfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr._concepts_dict import concepts as DICOM_CONCEPTS
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.encode import (
    encode_heatmaps,
    encode_parametric_maps,
    encode_result,
    encode_sr,
)
from pipeline.encode.codes import (
    CODES,
    IHE_SCHEME,
    PRIVATE_SCHEME,
    concept,
    laterality_code,
    region_code,
    site_code,
)
from pipeline.encode.common import DEMONSTRATION, NOT_FOR_DIAGNOSIS, device_uid
from pipeline.encode.heatmap import burned_in_lines
from pipeline.encode.render import (
    display_grayscale,
    layout_text,
    render_heatmap,
)
from pipeline.results import ChainResult, Finding, ImageRef, Laterality, Region, Site
from tests.dicom3tools import dciodvfy_errors
from tests.encode_fixtures import (
    PATIENT_NAME,
    chain_result,
    mr_series,
    pelvis_radiograph,
)

DSRDUMP = shutil.which("dsrdump")
DSR2HTML = shutil.which("dsr2html")
JAVA = shutil.which("java")
PIXELMED = Path("/usr/share/java/pixelmed.jar")

needs_dcmtk = pytest.mark.skipif(DSRDUMP is None or DSR2HTML is None, reason="dcmtk not installed")
needs_pixelmed = pytest.mark.skipif(
    JAVA is None or not PIXELMED.exists(), reason="java or pixelmed.jar not installed"
)


# --- validators ---------------------------------------------------------------------------


# PixelMed's own main() validates one file per JVM, and most of a run is compiling its 6 MB
# stylesheet; this launcher (Java's single-file source mode) compiles it once for all files.
_VALIDATE_SRS_JAVA = """
import com.pixelmed.validate.DicomSRValidator;
public class ValidateSRs {
    public static void main(String[] paths) throws Exception {
        DicomSRValidator validator = new DicomSRValidator();
        for (String path : paths) {
            System.out.println("=== " + path);
            System.out.print(validator.validate(path));
        }
    }
}
"""


def pixelmed_sr_validator(paths: Sequence[Path], folder: Path) -> dict[Path, str]:
    """PixelMed DicomSRValidator's report on each file. It exits 0 whatever it finds, so the
    report is what tells.

    Its XPath checks take about 2 s per SR; the files are shared round-robin between up to two JVMs
    that run side by side (9 SRs: 22 s in one, 16 s in two, on the 2-core test machine)."""
    launcher = folder / "ValidateSRs.java"
    launcher.write_text(_VALIDATE_SRS_JAVA)
    options = [
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",  # a short run: a quick JIT is faster
        "-Djdk.xml.xpathExprOpLimit=0",
        "-Djdk.xml.xpathExprGrpLimit=0",
        "-Djdk.xml.xpathTotalOpLimit=0",
    ]
    paths = [str(p) for p in paths]
    groups = [paths[k :: 2] for k in range(min(2, len(paths), os.cpu_count() or 1))]
    runs = [
        subprocess.Popen([JAVA, *options, "-cp", str(PIXELMED), str(launcher), *group], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for group in groups
    ]
    reports = {}
    for run in runs:
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr
        for chunk in stdout.split("=== ")[1:]:
            path, _, report = chunk.partition("\n")
            reports[Path(path)] = report
    assert set(reports) == {Path(p) for p in paths}, "PixelMed reported on other files than it was given"
    return reports


def sr_validator_errors(report: str) -> list[str]:
    """The error lines of a validator report; a report that never reached the end of the
    TID 1500 and IOD checks counts as an error too."""
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    for milestone in (
        "Found Root Template TID_1500",
        "Root Template Validation Complete",
        "IOD validation complete",
    ):
        if milestone not in report:
            errors.append(f"validator did not report {milestone!r}")
    return errors


def write(dataset: pydicom.Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


# --- shared results -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_result() -> ChainResult:
    """A demonstration pack's result on a series with a ProcedureCodeSequence and a window."""
    return chain_result(mr_series(procedure_code=True, window=True), demonstration=True)


@pytest.fixture(scope="module")
def plain_result() -> ChainResult:
    """A regular pack's result on a series without procedure code or window."""
    return chain_result(mr_series(procedure_code=False, window=False), demonstration=False)


@pytest.fixture(scope="module")
def radiograph_result() -> ChainResult:
    """A regular pack's result on a pelvis radiograph: patient-level radiographic sacroiliitis."""
    finding = Finding.patient_level(concept("radiographic sacroiliitis"), Site.SACROILIAC_JOINT, 0.7, 0.5)
    return chain_result([pelvis_radiograph()], demonstration=False, findings=[finding])


@pytest.fixture(scope="module")
def encoded(
    demo_result: ChainResult, plain_result: ChainResult, radiograph_result: ChainResult
) -> dict[str, list[pydicom.Dataset]]:
    return {
        "demo": encode_result(demo_result, parametric_maps=True),
        "plain": encode_result(plain_result, parametric_maps=True),
        # No Parametric Map for a radiograph (see encode_parametric_maps): SR and heatmap only.
        "radiograph": encode_result(radiograph_result, parametric_maps=True),
    }


@pytest.fixture(scope="module")
def files(
    encoded: dict[str, list[pydicom.Dataset]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[Path]]:
    folder = tmp_path_factory.mktemp("encoded")
    return {
        name: [write(ds, folder / f"{name}-{i}.dcm") for i, ds in enumerate(datasets)]
        for name, datasets in encoded.items()
    }


def broken_sr(sr: pydicom.Dataset, path: Path) -> Path:
    """The SR with the value of its first Probability taken out: a NUM item without a number."""
    ds = copy.deepcopy(sr)
    (imaging,) = [
        item for item in ds.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    (probability, *_) = [
        item for item in imaging.ContentSequence[0].ContentSequence if item.ValueType == "NUM"
    ]
    del probability.MeasuredValueSequence
    return write(ds, path)


@pytest.fixture(scope="module")
def sr_validator_reports(
    files: dict[str, list[Path]],
    encoded: dict[str, list[pydicom.Dataset]],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    """Validator reports for the demo MR SR, a radiograph SR and a broken (radiograph) SR.

    The validator takes seconds per SR (more for big ones), so the radiograph SRs are small.
    """
    # tests/run installs pixelmed-apps (and its JRE): a missing validator is a failure, not a skip.
    assert JAVA is not None and PIXELMED.exists(), "java or pixelmed.jar missing: install the Debian package pixelmed-apps"
    folder = tmp_path_factory.mktemp("validator")
    paths = {
        "demo": files["demo"][0],
        "radiograph": files["radiograph"][0],
        "broken": broken_sr(encoded["radiograph"][0], folder / "broken.dcm"),
    }
    reports = pixelmed_sr_validator(list(paths.values()), folder)
    return {name: reports[path] for name, path in paths.items()}


def measurement_groups(sr: pydicom.Dataset) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The SR's TID 1501 groups, as highdicom reads them back from the encoded bytes."""
    return hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()


def finding_groups(sr: pydicom.Dataset) -> dict[str, hd.sr.MeasurementsAndQualitativeEvaluations]:
    return {g.tracking_identifier: g for g in measurement_groups(sr) if g.finding_type is not None}


def reread(dataset: pydicom.Dataset, tmp_path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(write(dataset, tmp_path / "reread.dcm"))


# --- codes ----------------------------------------------------------------------------------


# Standard codes that pydicom's dictionary lacks, and where they were checked instead.
CHECKED_ELSEWHERE = {"qualitative evaluations": "PixelMed's TID 1500, row 12"}


def test_standard_codes_are_in_the_dicom_dictionary_with_their_meaning() -> None:
    """Every SCT/DCM/UCUM/LN code in the table exists in PS3.16 (as shipped with pydicom) with
    the meaning we write; a mistyped or invented code fails here."""
    for name, code in CODES.items():
        if code.scheme.startswith("99") or name in CHECKED_ELSEWHERE:
            continue
        meanings = {
            meaning.lower()
            for by_code in DICOM_CONCEPTS[code.scheme].values()
            for value, (meaning, _cids) in by_code.items()
            if value == code.value
        }
        assert meanings, f"{name}: ({code.value}, {code.scheme}) is not a DICOM-known code"
        assert code.meaning.lower() in meanings, f"{name}: {code.meaning!r} not among {meanings}"


@needs_pixelmed
def test_codes_checked_elsewhere_are_in_pixelmeds_templates() -> None:
    with zipfile.ZipFile(PIXELMED) as jar:
        templates = jar.read("com/pixelmed/validate/DicomSRDescriptionsCompiled.xsl").decode()
    for name in CHECKED_ELSEWHERE:
        code = CODES[name]
        assert f"({code.value},{code.scheme},&quot;{code.meaning}&quot;)" in templates, name


def test_codes_fit_their_value_representations_and_known_schemes() -> None:
    for name, code in CODES.items():
        assert code.scheme in {"SCT", "DCM", "UCUM", "LN", "UMLS", PRIVATE_SCHEME, IHE_SCHEME}, name
        assert len(code.value) <= 16 and len(code.meaning) <= 64, name  # SH and LO


def test_concept_names_the_table_and_rejects_strangers() -> None:
    assert concept("sacroiliac joint").value == "39723000"
    assert concept("probability") == CODES["probability"]
    with pytest.raises(KeyError, match="known"):
        concept("multiple sclerosis")


def test_sacroiliitis_is_not_coded_as_multiple_sclerosis() -> None:
    """24700007 was suggested for sacroiliitis; in SNOMED CT it is Multiple sclerosis."""
    assert all(code.value != "24700007" for code in CODES.values())


# --- the whole encoding ---------------------------------------------------------------------


def test_encode_result_gives_sr_then_heatmaps_then_maps_each_in_its_own_series(
    encoded: dict[str, list[pydicom.Dataset]], demo_result: ChainResult
) -> None:
    datasets = encoded["demo"]
    kinds = [str(ds.SOPClassUID) for ds in datasets]
    sr, sc, pm = (
        "1.2.840.10008.5.1.4.1.1.88.34",
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.30",
    )
    assert kinds == [sr, sc, sc, pm, pm]  # two key maps: two heatmaps, two parametric maps
    series = {
        kind: {ds.SeriesInstanceUID for ds, k in zip(datasets, kinds) if k == kind}
        for kind in (sr, sc, pm)
    }
    assert all(len(uids) == 1 for uids in series.values())
    assert len(set.union(*series.values())) == 3
    assert [ds.SeriesNumber for ds in datasets] == [9000, 9001, 9001, 9002, 9002]
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    source = demo_result.sources[0]
    for ds in datasets:
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate) == (
            PATIENT_NAME,
            source.PatientID,
            source.PatientBirthDate,
        )
        assert ds.AccessionNumber == source.AccessionNumber


def test_no_maps_no_heatmap_series() -> None:
    result = replace(chain_result(demonstration=False), maps=())
    assert [str(ds.Modality) for ds in encode_result(result, parametric_maps=True)] == ["SR"]


@pytest.mark.parametrize("name", ["demo", "plain", "radiograph"])
def test_every_object_passes_dciodvfy(files: dict[str, list[Path]], name: str) -> None:
    for path in files[name]:
        assert dciodvfy_errors(path) == [], path.name


def test_dciodvfy_check_catches_a_broken_object(
    files: dict[str, list[Path]], tmp_path: Path
) -> None:
    for path, keyword in [
        (files["demo"][0], "CompletionFlag"),
        (files["demo"][1], "ConversionType"),
    ]:
        ds = pydicom.dcmread(path)
        delattr(ds, keyword)
        assert dciodvfy_errors(write(ds, tmp_path / path.name)), keyword


# --- the Structured Report ------------------------------------------------------------------


@needs_dcmtk
@pytest.mark.parametrize("name", ["demo", "plain", "radiograph"])
def test_sr_passes_dsrdump_and_renders_with_dsr2html(
    files: dict[str, list[Path]], name: str
) -> None:
    path = files[name][0]
    dump = subprocess.run(
        [DSRDUMP, str(path)], check=False, capture_output=True, text=True, timeout=60
    )
    assert dump.returncode == 0, dump.stderr
    assert "Imaging Measurement Report" in dump.stdout
    html = subprocess.run(
        [DSR2HTML, str(path)], check=False, capture_output=True, text=True, timeout=60
    )
    assert html.returncode == 0, html.stderr
    assert "sacroiliac joint" in html.stdout and "Sacroiliac joint" in html.stdout


@needs_pixelmed
@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo", "radiograph"])
def test_sr_passes_pixelmed_sr_validator(sr_validator_reports: dict[str, str], name: str) -> None:
    assert sr_validator_errors(sr_validator_reports[name]) == []


@needs_pixelmed
@pytest.mark.slow
def test_pixelmed_check_catches_a_broken_sr(sr_validator_reports: dict[str, str]) -> None:
    errors = sr_validator_errors(sr_validator_reports["broken"])
    assert any("Missing value" in line for line in errors), sr_validator_reports["broken"]


def test_sr_header(encoded: dict[str, list[pydicom.Dataset]], demo_result: ChainResult) -> None:
    sr = encoded["demo"][0]
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.SeriesDescription.startswith(DEMONSTRATION)
    assert "sij-mri-demo 0.3.1" in sr.SeriesDescription
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {source.SOPInstanceUID for source in demo_result.sources}
    schemes = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    assert {PRIVATE_SCHEME, IHE_SCHEME, "99HOSPITAL"} <= schemes  # ours, IHE's, the site's


def test_sr_image_library_lists_every_source(
    encoded: dict[str, list[pydicom.Dataset]], demo_result: ChainResult
) -> None:
    sr = hd.sr.Comprehensive3DSR.from_dataset(encoded["demo"][0])
    (library,) = hd.sr.utils.find_content_items(sr, name=pydicom.sr.codedict.codes.DCM.ImageLibrary)
    listed = {
        item.referenced_sop_instance_uid
        for item in hd.sr.utils.find_content_items(
            library, value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True
        )
    }
    assert listed == {source.SOPInstanceUID for source in demo_result.sources}


def test_ihe_contributing_equipment_names_the_pack_build(
    encoded: dict[str, list[pydicom.Dataset]], demo_result: ChainResult
) -> None:
    provenance = demo_result.provenance
    for ds in encoded["demo"]:
        (item,) = [
            e
            for e in ds.ContributingEquipmentSequence
            if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
        ]
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
            "99IHE",
            "Processing Algorithm",
        )
        assert (item.Manufacturer, item.ManufacturerModelName, item.SoftwareVersions) == (
            "sijnode",
            provenance.pack_name,
            provenance.pack_version,
        )
        assert item.DeviceUID == generate_uid(entropy_srcs=[provenance.device_uid_seed])


def test_device_uid_follows_the_pack_build(demo_result: ChainResult) -> None:
    provenance = demo_result.provenance
    assert device_uid(provenance) == device_uid(replace(provenance, timings_s={"inference": 9.0}))
    assert device_uid(provenance) != device_uid(replace(provenance, weights_sha256="cd" * 32))
    assert device_uid(provenance) != device_uid(replace(provenance, pack_version="0.3.2"))


def test_procedure_reported_and_performed_procedure(
    encoded: dict[str, list[pydicom.Dataset]],
) -> None:
    def reported(sr: pydicom.Dataset) -> tuple[str, str]:
        (item,) = [
            i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"
        ]
        code = item.ConceptCodeSequence[0]
        return code.CodeValue, code.CodingSchemeDesignator

    demo, plain, radiograph = (encoded[name][0] for name in ("demo", "plain", "radiograph"))
    # The site's own code is kept as the performed procedure; Procedure Reported is CID 100.
    assert reported(demo) == ("25056-3", "LN") == reported(plain)  # MRI unspecified body region
    assert reported(radiograph) == ("363679005", "SCT")  # Imaging procedure
    assert [c.CodeValue for c in demo.PerformedProcedureCodeSequence] == ["MRSIJ"]
    assert len(plain.PerformedProcedureCodeSequence) == 0


# The SNOMED CT codes a reader's system will look for, written out (not taken from codes.py).
EXPECTED_SITE = {Site.SACROILIAC_JOINT: "39723000", Site.ILIUM: "22356005", Site.SACRUM: "54735007"}
EXPECTED_LATERALITY = {
    Laterality.LEFT: "7771000",
    Laterality.RIGHT: "24028007",
}
EXPECTED_MODIFIER = {Region.UPPER: "264217000", Region.LOWER: "261089000"}  # superior, inferior


def test_findings_come_back_with_site_laterality_region_probability_and_presence(
    encoded: dict[str, list[pydicom.Dataset]], demo_result: ChainResult
) -> None:
    groups = finding_groups(encoded["demo"][0])
    assert len(groups) == len(demo_result.findings)
    for finding in demo_result.findings:
        group = groups[f"{finding.concept.meaning}, {finding.label}"]
        assert group.tracking_uid
        assert group.finding_type.value == finding.concept.value
        (site,) = group.finding_sites
        assert (site.value.value, site.value.scheme_designator) == (
            EXPECTED_SITE[finding.site],
            "SCT",
        )
        assert site.laterality.value == EXPECTED_LATERALITY[finding.laterality]  # per-side findings
        if finding.region is None:
            assert site.topographical_modifier is None
        else:
            assert site.topographical_modifier.value == EXPECTED_MODIFIER[finding.region]
        (probability,) = group.get_measurements(
            name=hd.sr.CodedConcept("122157", "DCM", "Probability")
        )
        assert probability.value == pytest.approx(finding.probability)
        assert (probability.unit.value, probability.unit.scheme_designator) == ("1", "UCUM")
        (threshold,) = group.get_measurements(name=hd.sr.CodedConcept("122411", "DCM", "Threshold Value"))
        assert threshold.value == pytest.approx(finding.threshold)
        (evaluation,) = decisions(probability)
        assert evaluation.name.value == finding.concept.value
        expected = ("52101004", "Present") if finding.present else ("272519000", "Absent")
        assert (evaluation.value.value, evaluation.value.meaning) == expected
    assert len({g.tracking_uid for g in groups.values()}) == len(groups)


def decisions(probability: hd.sr.Measurement) -> list[hd.sr.CodeContentItem]:
    """The coded Present/Absent: the probability's concept modifier (TID 300 row 2)."""
    return [
        hd.sr.CodeContentItem.from_dataset(item)
        for item in probability[0].ContentSequence
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue not in ("121401", "370129005")
    ]


def test_patient_level_radiograph_finding_has_no_side_and_no_modifier(
    encoded: dict[str, list[pydicom.Dataset]],
) -> None:
    """A patient-level finding is not bilateral: its site carries no laterality at all."""
    (group,) = finding_groups(encoded["radiograph"][0]).values()
    (site,) = group.finding_sites
    assert site.value.value == "39723000"
    assert site.laterality is None and site.topographical_modifier is None


def test_code_helpers_agree_with_the_expected_codes() -> None:
    assert {s: site_code(s).value for s in Site} == EXPECTED_SITE
    assert {lat: laterality_code(lat).value for lat in Laterality} == EXPECTED_LATERALITY
    assert {r: region_code(r).value for r in Region} == EXPECTED_MODIFIER


def test_presence_flips_at_the_threshold(demo_result: ChainResult) -> None:
    at = Finding(concept("erosion"), Site.SACRUM, 0.7, 0.7, Laterality.LEFT)
    below = Finding(concept("erosion"), Site.SACRUM, 0.6999, 0.7, Laterality.RIGHT)
    sr = encode_sr(replace(demo_result, findings=[at, below], maps=[]), generate_uid(), 9000)
    groups = finding_groups(sr)
    presence = {key: decisions(g.get_measurements()[0])[0].value.meaning for key, g in groups.items()}
    assert presence == {"Erosion, left sacrum": "Present", "Erosion, right sacrum": "Absent"}


def test_every_group_identifies_the_algorithm_and_its_threshold(
    encoded: dict[str, list[pydicom.Dataset]], demo_result: ChainResult
) -> None:
    provenance = demo_result.provenance
    for group in measurement_groups(encoded["demo"][0]):
        texts = {
            (item.name.value, item.value)
            for item in hd.sr.utils.find_content_items(
                group[0], value_type=hd.sr.ValueTypeValues.TEXT
            )
        }
        assert ("111001", provenance.pack_name) in texts  # Algorithm Name
        assert ("111003", provenance.pack_version) in texts  # Algorithm Version
        parameters = {value for name, value in texts if name == "111002"}
        assert f"weights sha256={provenance.weights_sha256}" in parameters
        assert "device=cpu" in parameters  # the fixture's provenance ran on the CPU
        if group.finding_type is not None:
            assert "operating threshold=0.5" in parameters


def test_algorithm_parameters_name_the_device_but_not_the_timings(demo_result: ChainResult) -> None:
    """The device is part of how a result was made; timings differ on every run, so an SR
    that recorded them would change each time the same result is re-encoded."""
    on_gpu = replace(demo_result.provenance, device="cuda", timings_s={"inference": 0.01})
    sr = encode_sr(replace(demo_result, provenance=on_gpu), generate_uid(), 9000)
    for group in measurement_groups(sr):
        parameters = [
            item.value
            for item in hd.sr.utils.find_content_items(
                group[0], name=hd.sr.CodedConcept("111002", "DCM", "Algorithm Parameters")
            )
        ]
        assert "device=cuda" in parameters
        assert not any("0.01" in parameter or "inference" in parameter for parameter in parameters)


def test_observer_is_the_pack_build_device(
    encoded: dict[str, list[pydicom.Dataset]], demo_result: ChainResult
) -> None:
    sr = hd.sr.Comprehensive3DSR.from_dataset(encoded["demo"][0])
    (uid,) = hd.sr.utils.find_content_items(
        sr, name=hd.sr.CodedConcept("121012", "DCM", "Device Observer UID")
    )
    assert uid.value == device_uid(demo_result.provenance)


def test_finding_note_is_in_the_findings_line_read_first(
    encoded: dict[str, list[pydicom.Dataset]], demo_result: ChainResult
) -> None:
    """TID 1500 row 14 (report-level text): the finding's line carries its note."""
    (noted,) = [f for f in demo_result.findings if f.note]
    lines = [text for text in _text_values(encoded["demo"][0]) if text.endswith(noted.note)]
    assert len(lines) == 1 and noted.label in lines[0] and "PRESENT: probability 0.91" in lines[0]


def test_image_scores_are_measurements_on_their_source_images(
    encoded: dict[str, list[pydicom.Dataset]], demo_result: ChainResult
) -> None:
    (group,) = [g for g in measurement_groups(encoded["demo"][0]) if g.finding_type is None]
    measurements = group.get_measurements()
    top = sorted(demo_result.image_scores, key=lambda s: -s.value)[:5]  # the top scores only
    expected = {s.source.sop_instance_uid: s.value for s in top}
    found = {m.referenced_images[0].referenced_sop_instance_uid: m.value for m in measurements}
    assert found == pytest.approx(expected)
    assert {m.name.meaning for m in measurements} == {"Attention weight"}


def test_references_outside_the_sources_are_refused(demo_result: ChainResult) -> None:
    stranger = ImageRef(str(demo_result.sources[0].SOPClassUID), generate_uid())
    finding = Finding.patient_level(concept("erosion"), Site.ILIUM, 0.4, 0.5, evidence=(stranger,))
    with pytest.raises(ValueError, match="not among"):
        encode_sr(replace(demo_result, findings=[finding], maps=[]), generate_uid(), 9000)


# --- demonstration labelling ----------------------------------------------------------------


def _text_values(sr: pydicom.Dataset) -> list[str]:
    return [
        item.value
        for item in hd.sr.utils.find_content_items(
            hd.sr.Comprehensive3DSR.from_dataset(sr),
            value_type=hd.sr.ValueTypeValues.TEXT,
            recursive=True,
        )
    ]


def test_demonstration_results_say_so_everywhere(encoded: dict[str, list[pydicom.Dataset]]) -> None:
    demo, plain = encoded["demo"], encoded["plain"]
    assert all(ds.SeriesDescription.startswith(DEMONSTRATION) for ds in demo)
    assert not any(DEMONSTRATION in ds.SeriesDescription for ds in plain)
    assert any(text.startswith(f"{DEMONSTRATION}:") for text in _text_values(demo[0]))
    assert not any(DEMONSTRATION in text for text in _text_values(plain[0]))


def test_demonstration_is_burned_into_the_heatmap(
    encoded: dict[str, list[pydicom.Dataset]], demo_result: ChainResult
) -> None:
    lines = burned_in_lines(demo_result.provenance, demo_result.findings, "Instance 2: attention")
    assert lines[0] == DEMONSTRATION and f"{NOT_FOR_DIAGNOSIS} - sij-mri-demo 0.3.1" in lines
    assert DEMONSTRATION not in burned_in_lines(
        replace(demo_result.provenance, demonstration=False)
    )
    assert any("Active sacroiliitis: PRESENT, p = 0.91 (threshold 0.50), left sacroiliac joint" == line for line in lines)
    # The line's box in the encoded pixels holds white text on the black band below the image.
    sc = encoded["demo"][1]
    source = demo_result.sources[len(demo_result.sources) // 2]
    layout = layout_text(lines, source.Columns, source.Rows)
    assert (layout.height, layout.width) == (sc.Rows, sc.Columns)
    x0, y0, x1, y1 = layout.boxes[layout.lines.index(DEMONSTRATION)]
    box = sc.pixel_array[y0:y1, x0:x1]
    assert y0 >= source.Rows and (box.min(axis=-1) > 200).sum() >= 10


# --- heatmaps -------------------------------------------------------------------------------


def test_heatmaps_keep_the_source_geometry_and_reference_it(
    encoded: dict[str, list[pydicom.Dataset]], demo_result: ChainResult, tmp_path: Path
) -> None:
    heatmaps = [reread(ds, tmp_path) for ds in encoded["demo"][1:3]]
    key_maps = [m for m in demo_result.maps if m.key]
    for sc, heat in zip(heatmaps, key_maps):
        source = next(
            s for s in demo_result.sources if s.SOPInstanceUID == heat.source.sop_instance_uid
        )
        # the source's pixels at the top left (same spacing), the text band below
        assert sc.Rows > source.Rows and sc.Columns >= source.Columns
        assert [float(v) for v in sc.PixelSpacing] == [float(v) for v in source.PixelSpacing]
        assert (sc.SamplesPerPixel, sc.PhotometricInterpretation, sc.BitsAllocated) == (3, "RGB", 8)
        assert sc.BurnedInAnnotation == "YES"
        assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert list(sc.PatientOrientation) == ["L", "P"]  # IOP 1\0\0\0\1\0
        (ref,) = sc.SourceImageSequence
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
            source.SOPClassUID,
            source.SOPInstanceUID,
        )


def test_radiograph_heatmap_takes_patient_orientation_and_imager_spacing(
    encoded: dict[str, list[pydicom.Dataset]],
) -> None:
    _, *heatmaps = encoded["radiograph"]  # no Parametric Maps: no frame of reference
    assert [ds.SOPClassUID.name for ds in heatmaps] == ["Secondary Capture Image Storage"] * 2
    for sc in heatmaps:
        assert list(sc.PatientOrientation) == ["R", "F"]
        assert [float(v) for v in sc.PixelSpacing] == [0.15, 0.15]
        assert sc.Columns == 320 and sc.Rows > 110  # a 256-wide source: canvas widened, band below


def test_overlay_is_drawn_where_the_map_is_high(
    encoded: dict[str, list[pydicom.Dataset]], demo_result: ChainResult
) -> None:
    """The key map is hot in the left half of the image: colour there, gray on the right."""
    sc = encoded["demo"][1]
    source = demo_result.sources[len(demo_result.sources) // 2]
    image = sc.pixel_array[: source.Rows, : source.Columns].astype(int)  # the image above the band
    saturation = image.max(axis=-1) - image.min(axis=-1)
    half = source.Columns // 2
    assert (saturation[:, : half - 1] > 40).mean() > 0.95
    assert saturation[:, half + 1 :].max() == 0


def test_burned_in_text_fits_small_images() -> None:
    lines = [DEMONSTRATION, NOT_FOR_DIAGNOSIS, "sij-mri-demo 0.3.1"]
    for rows, columns in [(64, 64), (110, 256), (256, 110), (512, 512)]:
        layout = layout_text(lines, columns, rows)
        assert all(
            0 <= x0 and rows <= y0 and x1 <= layout.width and y1 <= layout.scale_top for x0, y0, x1, y1 in layout.boxes
        )  # in the band below the image, above the colour bar
        assert " ".join(layout.lines).split() == " ".join(lines).split()  # wrapped, nothing lost
        gray, values = np.full((rows, columns), 0.3), np.zeros((rows, columns))
        rgb, drawn = render_heatmap(gray, values, lines)
        assert rgb.shape == (layout.height, max(columns, 320), 3) and drawn == layout


def test_window_of_the_source_is_applied() -> None:
    windowed, bare = mr_series(1, window=True)[0], mr_series(1, window=False)[0]
    gray = display_grayscale(windowed)
    stored = windowed.pixel_array
    # WindowCenter 600, WidthWidth 1200: 0 → 0, 200 → ~1/3, 1000 → ~5/6.
    assert gray[stored == 0].max() == 0.0
    assert gray[stored == 200].mean() == pytest.approx(200.5 / 1199, abs=1e-3)
    assert gray[stored == 1000].mean() == pytest.approx(1000.5 / 1199, abs=1e-3)
    # Without a window: percentiles span the range, so the bright joints saturate.
    assert display_grayscale(bare)[bare.pixel_array == 1000].min() == 1.0


def test_header_only_source_gets_a_black_background(demo_result: ChainResult) -> None:
    headers = []
    for source in demo_result.sources:
        # A deep copy: pydicom.Dataset(source) shares the element dict, so deleting PixelData
        # from it would strip the module-scoped fixture's sources too.
        header = copy.deepcopy(source)
        del header.PixelData
        headers.append(header)
    result = replace(demo_result, sources=headers)
    (first, *_) = encode_heatmaps(result, generate_uid(), 9001)
    assert first.Rows > headers[0].Rows  # the text band below
    # Where the map is 0 (it is cold right of the middle), above the text band and left of the
    # colour bar, only the background shows: black without pixels, the image with them.
    (key_map, *_) = [heat for heat in result.maps if heat.key]
    area = (slice(0, headers[0].Rows), slice(0, headers[0].Columns))  # the image, above the band
    background = key_map.values[area] == 0
    assert background.sum() > 100
    assert first.pixel_array[area][background].max() == 0
    (with_pixels, *_) = encode_heatmaps(demo_result, generate_uid(), 9001)
    assert with_pixels.pixel_array[area][background].max() > 0


# --- parametric maps ------------------------------------------------------------------------


def test_parametric_maps_carry_the_float_values_and_their_quantity(
    encoded: dict[str, list[pydicom.Dataset]], demo_result: ChainResult
) -> None:
    maps = encoded["demo"][3:]
    key_maps = [m for m in demo_result.maps if m.key]
    quantities = []
    for pm, heat in zip(maps, key_maps):
        values = np.frombuffer(pm.FloatPixelData, dtype=np.float32).reshape(pm.Rows, pm.Columns)
        np.testing.assert_array_equal(values, heat.values)
        mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        quantities.append(mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue)
        assert pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0].FrameLaterality == "B"
    assert quantities == ["130402", "130403"]  # class activation; gradient-weighted (Grad-CAM)


def test_parametric_maps_on_request_only(demo_result: ChainResult) -> None:
    assert encode_parametric_maps(demo_result, generate_uid(), 9002)
    kinds = [ds.SOPClassUID.name for ds in encode_result(demo_result)]
    assert kinds == ["Comprehensive 3D SR Storage", *["Secondary Capture Image Storage"] * 2]


def test_output_plan_numbers_names_and_links_each_kind(demo_result: ChainResult) -> None:
    """Result 2 of a chain with base 9300: each kind in its own series at base + offset + 10,
    a site's SR description kept behind the demonstration mark, "result 2" on every series,
    segmentation overlays apart from the heatmaps, and the SR pointing at its predecessor."""
    from pipeline.results import Category, Map, MapMeaning
    from pipeline.route import ChainSeries, OutputKind, OutputPlan

    source = demo_result.sources[len(demo_result.sources) // 2]
    overlay = Map(
        ImageRef.of(source),
        np.zeros((int(source.Rows), int(source.Columns))),
        MapMeaning.SEGMENTATION,
        categories=(Category(1.0, "sacrum"),),
    )
    result = replace(demo_result, maps=[*demo_result.maps, overlay])
    (first, *_) = encode_result(result)
    series = ChainSeries(base=9300, descriptions={OutputKind.SR: "SIJ MRI AI"})
    datasets = encode_result(result, parametric_maps=True, plan=OutputPlan.for_chain(series, 2, [first]))
    numbers = {int(ds.SeriesNumber): str(ds.SeriesDescription) for ds in datasets}
    assert sorted(numbers) == [9310, 9311, 9312, 9313]
    assert numbers[9310] == f"{DEMONSTRATION} SIJ MRI AI result 2"
    assert all(text.endswith(" result 2") and len(text) <= 64 for text in numbers.values())
    assert "overlays" in numbers[9313] and [ds.SeriesNumber for ds in datasets].count(9313) == 1
    reference = datasets[0].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert reference.SeriesInstanceUID == first.SeriesInstanceUID
    assert reference.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert first.SeriesNumber == 9000 and str(first.SeriesDescription).endswith(" result 1")
