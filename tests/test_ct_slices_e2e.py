"""ct-slices end to end: Orthanc pushes two CT studies to the real ``sijnode serve``; the one with
the joints in view comes back as an SR and Grad-CAM heatmaps, the lumbar one as a "not analysed" SR
with the reason."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
from pydicom import dcmread

from pipeline.phantom import generate_study, write_study
from storage.models import Job
from tests.ct_phantoms import ct_above_the_joints
from tests.node_harness import NODE_AET, REPO, Node
from tests.peers import LOOPBACK, orthanc, wait_for

CT_CHAIN = {
    "name": "ct-slices",
    "implementation": "pipeline.chains.ct_slices.chain:CTSlicesChain",
    "pack": str(REPO / "packs" / "ct-slices-demo"),
    "requires": [{"role": "CT", "planes": ["axial"]}],
}
SEED, SPEC = 90031, {"lesions": [], "mny_grade": {"left": 0, "right": 3}}
LUMBAR_SEED = 90032
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture


def _outputs(pacs, study_uid: str, heatmaps: int) -> dict[str, list[bytes]] | None:
    """SOP class → files of the study's objects the node made (None until the SR and ``heatmaps`` SCs are in)."""
    matches = [m for m in pacs.lookup(study_uid) if m.get("Type") == "Study"]
    if not matches:
        return None
    found: dict[str, list[bytes]] = {}
    for series in pacs.get(f"/studies/{matches[0]['ID']}/series"):
        description = series["MainDicomTags"].get("SeriesDescription", "")
        if series["MainDicomTags"].get("Modality") == "CT" or "ct-slices" not in description:
            continue  # the source series, and objects of other writers (e.g. the study summary)
        for instance in series["Instances"]:
            found.setdefault(pacs.instance_tags(instance)["SOPClassUID"], []).append(pacs.instance_file(instance))
    ready = SR_CLASS in found and len(found.get(SC_CLASS, [])) >= heatmaps
    return found if ready else None


def _texts(dataset) -> list[str]:
    found = []
    for item in dataset.get("ContentSequence", []):
        if "TextValue" in item:
            found.append(str(item.TextValue))
        found += _texts(item)
    return found


def test_orthanc_pushes_ct_studies_and_gets_the_sr_heatmaps_and_a_not_analysed_report(tmp_path: Path) -> None:
    joints = write_study(generate_study(SEED, kinds=("ct",), lesions=SPEC), tmp_path / "studies")
    lumbar = write_study(ct_above_the_joints(LUMBAR_SEED), tmp_path / "studies")
    ct_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in joints.glob("*_CT/*.dcm")}
    with orthanc(tmp_path / "orthanc") as pacs:
        overrides = {
            "peers": [{"name": "pacs", "ae_title": pacs.aet, "host": LOOPBACK, "port": pacs.dicom_port}],
            "chains": [CT_CHAIN],
        }
        with Node(tmp_path / "node", overrides) as node:
            pacs.set_modality("sijnode", NODE_AET, node.port)
            for folder in (joints, lumbar):
                ids = [pacs.upload(path)["ID"] for path in sorted(folder.glob("*_CT/*.dcm"))]
                pacs.store_to("sijnode", ids)
            jobs = wait_for(
                lambda: (done := [j for j in node.rows(Job) if j.state in ("done", "failed")]) and len(done) == 2 and done or None,
                timeout=400, interval=1.0, what=f"two ct-slices jobs\n{node.output_tail()}",
            )
            assert sorted((j.chain, j.state) for j in jobs) == [("ct-slices", "done")] * 2, node.output_tail()
            study_uid = str(dcmread(next(joints.glob("*_CT/*.dcm")), stop_before_pixels=True).StudyInstanceUID)
            lumbar_uid = str(dcmread(next(lumbar.glob("*_CT/*.dcm")), stop_before_pixels=True).StudyInstanceUID)
            analysed = wait_for(lambda: _outputs(pacs, study_uid, 3), timeout=90, what=f"SR and heatmaps in Orthanc\n{node.output_tail()}")
            not_analysed = wait_for(lambda: _outputs(pacs, lumbar_uid, 0), timeout=90, what=f"not-analysed SR in Orthanc\n{node.output_tail()}")

    (sr_bytes,) = analysed[SR_CLASS]
    sr = hd.sr.Comprehensive3DSR.from_dataset(dcmread(io.BytesIO(sr_bytes)))
    (finding,) = [g for g in sr.content.get_image_measurement_groups() if g.finding_type is not None]
    assert finding.finding_type.meaning == "Sacroiliitis"
    (probability,) = finding.get_measurements(name=hd.sr.CodedConcept("122157", "DCM", "Probability"))
    assert 0.0 <= float(probability.value) <= 1.0
    evidence = dcmread(io.BytesIO(sr_bytes)).CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    analysed_uids = {str(item.ReferencedSOPInstanceUID) for item in evidence}
    assert analysed_uids <= ct_uids and 4 <= len(analysed_uids) < len(ct_uids)  # the joint slices, not the whole series
    heatmaps = [dcmread(io.BytesIO(b)) for b in analysed[SC_CLASS]]
    assert len(heatmaps) == 3
    for heatmap in heatmaps:
        assert str(heatmap.SourceImageSequence[0].ReferencedSOPInstanceUID) in analysed_uids
        assert heatmap.Columns == 512 and heatmap.Rows >= 512  # the source grid, and the text band below it

    (lumbar_sr,) = not_analysed[SR_CLASS]
    texts = " ".join(_texts(dcmread(io.BytesIO(lumbar_sr))))
    assert "not analysed" in texts and "sacroiliac joints were not found" in texts
    assert SC_CLASS not in not_analysed
