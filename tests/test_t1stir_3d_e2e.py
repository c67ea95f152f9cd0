"""t1stir-3d end to end: phantom studies → storescu → sijnode → Orthanc gets the SR and the heatmaps.

The real ``sijnode serve`` with the committed demonstration pack and a real Orthanc as the PACS:
a T1 + STIR study comes back with the three findings and Grad-CAM heatmaps on T1 and STIR slices;
a study without STIR, and one whose STIR lies elsewhere than its T1, come back "not analysed" with
the reason.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread

from pipeline.phantom import generate_study, write_study
from tests.node_harness import NODE_AET, REPO, Node
from tests.peers import LOOPBACK, orthanc, run_storescu, wait_for
from tests.test_xr_anatomy_e2e import _content_texts

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
CHAIN = {
    "name": "t1stir-3d",
    "implementation": "pipeline.chains.t1stir_3d.chain:T1STIR3DChain",
    "pack": str(REPO / "packs" / "t1stir-3d-demo"),
    "requires": [
        {"role": "T1", "planes": ["coronal"], "name": "t1"},
        {"role": "STIR", "planes": ["coronal"], "name": "stir", "optional": True},
    ],
    "options": {"top_k": 1},
}
FINDINGS = {"Active inflammatory lesions of sacroiliac joints", "Active inflammatory lesions (ASAS MRI)", "Structural lesions of sacroiliac joints"}
SEEDS = {"complete": 93001, "no STIR": 93002, "apart": 93003}


def _results(pacs, study_uid: str, heatmaps: int) -> dict[str, list[str]] | None:
    """SOP class → Orthanc ids of the node's objects in the study, once the SR and ``heatmaps`` SCs are in."""
    matches = [m for m in pacs.lookup(study_uid) if m.get("Type") == "Study"]
    if not matches:
        return None
    found: dict[str, list[str]] = {}
    for series in pacs.get(f"/studies/{matches[0]['ID']}/series"):
        for instance in series["Instances"]:
            sop_class = pacs.instance_tags(instance)["SOPClassUID"]
            if sop_class in (SR_CLASS, SC_CLASS):
                found.setdefault(sop_class, []).append(instance)
    chain_srs = [i for i in found.get(SR_CLASS, []) if "t1stir-3d" in pacs.instance_tags(i).get("SeriesDescription", "") and "AI summary" not in pacs.instance_tags(i).get("SeriesDescription", "")]
    return found if chain_srs and len(found.get(SC_CLASS, [])) >= heatmaps else None


def _chain_sr(pacs, ids: list[str]):  # noqa: ANN202
    """The chain's SR among the study's SRs (the study summary's SR says "AI summary")."""
    for instance in ids:
        dataset = dcmread(io.BytesIO(pacs.instance_file(instance)))
        if "t1stir-3d" in str(dataset.get("SeriesDescription", "")) and "AI summary" not in str(dataset.get("SeriesDescription", "")):
            return dataset
    return None


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "packs" / "t1stir-3d-demo" / "manifest.yaml").is_file(), reason="packs/t1stir-3d-demo is not committed yet")
def test_t1_stir_studies_come_back_with_three_findings_or_not_analysed(tmp_path: Path) -> None:
    studies = {name: generate_study(seed, kinds=("mri",), lesions="random") for name, seed in SEEDS.items()}
    files = {}
    for name, study in studies.items():
        folder = write_study(study, tmp_path / "phantoms")
        t1, stir = sorted(folder.glob("*_T1/*.dcm")), sorted(folder.glob("*_STIR/*.dcm"))
        if name == "apart":  # the STIR stack moved 400 mm to the patient's left: it no longer overlaps the T1
            for path in stir:
                dataset = dcmread(path)
                x, y, z = (float(v) for v in dataset.ImagePositionPatient)
                dataset.ImagePositionPatient = [x + 400.0, y, z]
                dataset.save_as(path)
        files[name] = t1 + ([] if name == "no STIR" else stir)
    with orthanc(tmp_path / "orthanc") as pacs:
        overrides = {"peers": [{"name": "pacs", "ae_title": pacs.aet, "host": LOOPBACK, "port": pacs.dicom_port}], "chains": [CHAIN]}
        with Node(tmp_path / "node", overrides) as node:
            for paths in files.values():
                sent = run_storescu(paths, node.port, NODE_AET)
                assert sent.returncode == 0, sent.stderr
            complete = wait_for(
                lambda: _results(pacs, studies["complete"].study_uid, heatmaps=2),
                timeout=600, interval=2.0, what=f"the SR and heatmaps of the T1 + STIR phantom\n{node.output_tail()}",
            )
            sr = _chain_sr(pacs, complete[SR_CLASS])
            assert sr is not None
            texts = _content_texts(sr)
            assert FINDINGS <= set(texts)
            assert "Left" not in texts and "Right" not in texts and "Bilateral" not in texts  # patient level: no side
            report = hd.sr.Comprehensive3DSR.from_dataset(sr)
            groups = [g for g in report.content.get_image_measurement_groups() if g.finding_type is not None]
            assert {g.finding_type.meaning for g in groups} == FINDINGS
            sources = {name: {str(dcmread(p).SOPInstanceUID) for p in sorted(Path(files["complete"][0]).parent.parent.glob(f"*_{name}/*.dcm"))} for name in ("T1", "STIR")}
            referenced = set()
            for instance in complete[SC_CLASS]:
                heatmap = dcmread(io.BytesIO(pacs.instance_file(instance)))
                for item in heatmap.get("SourceImageSequence", []):
                    referenced.add(str(item.ReferencedSOPInstanceUID))
            assert referenced & sources["T1"] and referenced & sources["STIR"], "heatmaps on both sequences' own slices"
            for name, reason in (("no STIR", "STIR"), ("apart", "do not overlap")):
                found = wait_for(
                    lambda uid=studies[name].study_uid: _results(pacs, uid, heatmaps=0),
                    timeout=600, interval=2.0, what=f"the result of the {name} phantom\n{node.output_tail()}",
                )
                sr = _chain_sr(pacs, found[SR_CLASS])
                assert sr is not None
                texts = " ".join(_content_texts(sr))
                assert "not analysed" in texts and reason in texts, texts
                assert not FINDINGS & set(_content_texts(sr))
