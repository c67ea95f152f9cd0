"""t2fs-mil end to end: phantom MRI studies → storescu → sijnode → Orthanc gets the SR and the heatmaps.

The real ``sijnode serve`` process with the committed demonstration pack, a real Orthanc as the
PACS: a study with bone marrow edema must come back Present, a healthy one Absent.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread

from pipeline.packs import load_pack
from pipeline.phantom import generate_study, write_study
from tests.node_harness import NODE_AET, Node
from tests.peers import LOOPBACK, orthanc, run_storescu, wait_for
from tests.test_t2fs_mil import EDEMA_SEED, EDEMA_SPEC, HEALTHY_SEED

REPO = Path(__file__).resolve().parent.parent
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
T2FS_MIL_CHAIN = {
    "name": "t2fs-mil",
    "implementation": "pipeline.chains.t2fs_mil.chain:T2FSMILChain",
    "pack": str(REPO / "packs" / "t2fs-mil-demo"),
    "requires": [{"role": "T2FS", "planes": ["axial"]}],
}


def _outputs(pacs, study_uid: str) -> dict[str, list[str]] | None:
    """SOP class → Orthanc instance ids of the study's series that the node made (None until the SR and heatmaps are in)."""
    matches = [m for m in pacs.lookup(study_uid) if m.get("Type") == "Study"]
    if not matches:
        return None
    found: dict[str, list[str]] = {}
    for series in pacs.get(f"/studies/{matches[0]['ID']}/series"):
        if series["MainDicomTags"].get("Modality") == "MR" and "sijnode" not in series["MainDicomTags"].get("SeriesDescription", ""):
            continue
        if "summary" in series["MainDicomTags"].get("SeriesDescription", ""):
            continue  # the study summary (issue 10) is checked in tests/test_radiologist.py
        for instance in series["Instances"]:
            sop_class = pacs.instance_tags(instance)["SOPClassUID"]
            found.setdefault(sop_class, []).append(instance)
    if COMPREHENSIVE_3D_SR in found and len(found.get(SECONDARY_CAPTURE, [])) >= 3:
        return found
    return None


def _presence(sr_bytes: bytes) -> tuple[str, float]:
    """(Present/Absent, probability) of the active sacroiliitis finding in the SR."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(dcmread(io.BytesIO(sr_bytes)))
    groups = [g for g in sr.content.get_image_measurement_groups() if g.finding_type is not None]
    (group,) = [g for g in groups if g.finding_type.meaning == "Active sacroiliitis"]
    (probability,) = group.get_measurements(name=hd.sr.CodedConcept("122157", "DCM", "Probability"))
    # the coded decision is the probability's concept modifier (pipeline/encode/sr.py)
    (decision,) = [item for item in probability[0].ContentSequence if item.ValueType == "CODE"]
    return str(decision.ConceptCodeSequence[0].CodeMeaning), float(probability.value)


def algorithm_identification(sr_bytes: bytes) -> tuple[set[str], set[str], set[str]]:
    """TID 4019 in an SR: (algorithm names, versions, parameters) found anywhere in its content tree."""
    found: dict[str, set[str]] = {"111001": set(), "111003": set(), "111002": set()}

    def walk(items) -> None:  # noqa: ANN001 (a pydicom Sequence)
        for item in items:
            code = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else None
            if code in found and "TextValue" in item:
                found[code].add(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(dcmread(io.BytesIO(sr_bytes)).ContentSequence)
    return found["111001"], found["111003"], found["111002"]


@pytest.mark.slow
def test_phantoms_sent_with_storescu_come_back_to_orthanc_as_sr_and_heatmaps(tmp_path: Path) -> None:
    studies = {
        "edema": generate_study(EDEMA_SEED, kinds=("mri",), lesions=EDEMA_SPEC),
        "healthy": generate_study(HEALTHY_SEED, kinds=("mri",), lesions="none"),
    }
    folders = {name: write_study(study, tmp_path / "phantoms") for name, study in studies.items()}
    with orthanc(tmp_path / "orthanc") as pacs:
        overrides = {
            "peers": [{"name": "pacs", "ae_title": pacs.aet, "host": LOOPBACK, "port": pacs.dicom_port}],
            "chains": [T2FS_MIL_CHAIN],
        }
        with Node(tmp_path / "node", overrides) as node:
            for folder in folders.values():
                sent = run_storescu(sorted(folder.glob("*/*.dcm")), node.port, NODE_AET)
                assert sent.returncode == 0, sent.stderr
            outputs = {
                name: wait_for(
                    lambda uid=study.study_uid: _outputs(pacs, uid),
                    timeout=240,
                    interval=1.0,
                    what=f"the SR and heatmaps of the {name} phantom in Orthanc\n{node.output_tail()}",
                )
                for name, study in studies.items()
            }
            presence = {}
            for name, found in outputs.items():
                assert len(found[COMPREHENSIVE_3D_SR]) == 1
                assert len(found[SECONDARY_CAPTURE]) == 3  # Grad-CAM heatmaps of the three most attended slices
                assert set(found) == {COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE}
                sr_bytes = pacs.instance_file(found[COMPREHENSIVE_3D_SR][0])
                presence[name] = _presence(sr_bytes)
                # the SR names the pack that made it: the manifest's name, version and weights
                manifest = load_pack(T2FS_MIL_CHAIN["pack"]).manifest
                names, versions, parameters = algorithm_identification(sr_bytes)
                assert (names, versions) == ({manifest.name}, {manifest.version})
                assert f"weights sha256={manifest.weights.sha256}" in parameters
                heatmap = pacs.instance_tags(found[SECONDARY_CAPTURE][0])
                assert heatmap["StudyInstanceUID"] == studies[name].study_uid
            assert presence["edema"][0] == "Present", presence
            assert presence["healthy"][0] == "Absent", presence
