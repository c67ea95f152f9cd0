"""t1stir-quadrants end to end, laterality above all: Orthanc pushes coronal T1 + STIR phantoms to the real
``sijnode serve`` (committed demonstration pack); each phantom has one bone marrow edema in one quadrant.

For every side and quadrant (8 phantoms, generated once, sent together to one node): the chain's SR in
Orthanc has a Present edema finding for exactly that side and quadrant (laterality and site/region as
coded concepts) and no Present finding of any kind on the other side; the traced joint lines come back
as SCOORD polylines and as an overlay whose drawn pixels lie on the phantom's joint lines.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from pipeline.phantom import QUADRANTS, SIDES, generate_study, write_study
from storage.models import Job
from tests.node_harness import NODE_AET, REPO, Node
from tests.peers import LOOPBACK, orthanc, wait_for
from tests.test_ct_slices_e2e import _texts

PACK = REPO / "packs" / "t1stir-quadrants-demo"
CHAIN = {
    "name": "t1stir-quadrants",
    "implementation": "pipeline.chains.t1stir_quadrants.chain:T1STIRQuadrantsChain",
    "pack": str(PACK),
    "requires": [
        {"role": "T1", "planes": ["coronal"], "name": "t1"},
        {"role": "STIR", "planes": ["coronal"], "name": "stir", "optional": True},
    ],
    "options": {"gradcam_limit": 2},
}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
CASES = [(side, quadrant) for side in SIDES for quadrant in QUADRANTS]
FIRST_SEED = 94001


def _outputs(pacs, study_uid: str) -> dict[str, list[bytes]] | None:
    """SOP class -> files of the chain's objects in the study, once its SR and its contour overlays are in."""
    matches = [m for m in pacs.lookup(study_uid) if m.get("Type") == "Study"]
    if not matches:
        return None
    found: dict[str, list[bytes]] = {}
    for series in pacs.get(f"/studies/{matches[0]['ID']}/series"):
        if "t1stir-quadrants" not in series["MainDicomTags"].get("SeriesDescription", ""):
            continue
        for instance in series["Instances"]:
            found.setdefault(pacs.instance_tags(instance)["SOPClassUID"], []).append(pacs.instance_file(instance))
    if SR_CLASS not in found:
        return None
    not_analysed = b"not analysed" in found[SR_CLASS][0]  # such an SR comes alone
    return found if SC_CLASS in found or not_analysed else None


def _present(sr) -> list[tuple[str, str, str | None, str | None]]:  # noqa: ANN001
    """(finding, site, side, region) of every Present finding, read from the coded SR content."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    present = []
    for group in report.content.get_image_measurement_groups():
        if group.finding_type is None or not group.finding_sites:
            continue
        (probability,) = group.get_measurements(name=hd.sr.CodedConcept("122157", "DCM", "Probability"))
        decisions = [m for m in probability[0].ContentSequence if m.ValueType == "CODE" and m.RelationshipType == "HAS CONCEPT MOD"]
        if any(d.ConceptCodeSequence[0].CodeMeaning == "Present" for d in decisions):
            (site,) = group.finding_sites
            side = site.laterality.meaning if site.laterality is not None else None
            region = site.topographical_modifier.meaning if site.topographical_modifier is not None else None
            present.append((group.finding_type.meaning, site.value.meaning, side, region))
    return present


@pytest.fixture(scope="module")
def quadrant_phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    folder = tmp_path_factory.mktemp("quadrant-phantoms")
    studies = {}
    for offset, (side, quadrant) in enumerate(CASES):
        spec = {"lesions": [{"type": "edema", "side": side, "quadrant": quadrant, "severity": "severe"}]}
        studies[(side, quadrant)] = write_study(generate_study(FIRST_SEED + offset, kinds=("mri",), lesions=spec), folder)
    return studies


@pytest.fixture(scope="module")
def node_outputs(quadrant_phantoms: dict[tuple[str, str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, list[bytes]]]:
    """All 8 phantoms pushed by Orthanc to one node; the chain's objects per phantom as Orthanc holds them."""
    if not (PACK / "manifest.yaml").is_file():
        pytest.skip("packs/t1stir-quadrants-demo is not committed yet")
    tmp_path = tmp_path_factory.mktemp("quadrants-e2e")
    with orthanc(tmp_path / "orthanc") as pacs:
        overrides = {
            "peers": [{"name": "pacs", "ae_title": pacs.aet, "host": LOOPBACK, "port": pacs.dicom_port}],
            "chains": [CHAIN],
            "workers": {"processes": 2, "torch_threads": 1},
        }
        with Node(tmp_path / "node", overrides) as node:
            pacs.set_modality("sijnode", NODE_AET, node.port)
            for folder in quadrant_phantoms.values():
                ids = [pacs.upload(path)["ID"] for path in sorted([*folder.glob("*_T1/*.dcm"), *folder.glob("*_STIR/*.dcm")])]
                pacs.store_to("sijnode", ids)
            wait_for(
                lambda: (done := [j for j in node.rows(Job) if j.state in ("done", "failed")]) and len(done) == len(CASES) and done or None,
                timeout=900, interval=2.0, what=f"{len(CASES)} t1stir-quadrants jobs\n{node.output_tail()}",
            )
            assert {j.state for j in node.rows(Job)} == {"done"}, node.output_tail()
            outputs = {}
            for case, folder in quadrant_phantoms.items():
                study_uid = str(dcmread(next(folder.glob("*_T1/*.dcm")), stop_before_pixels=True).StudyInstanceUID)
                outputs[case] = wait_for(lambda uid=study_uid: _outputs(pacs, uid), timeout=120, what=f"outputs of {case} in Orthanc\n{node.output_tail()}")
    return outputs


@pytest.mark.slow
def test_the_traced_joint_lines_come_back_on_the_joints_of_every_phantom(
    quadrant_phantoms: dict[tuple[str, str], Path], node_outputs: dict[tuple[str, str], dict[str, list[bytes]]]
) -> None:
    """Per phantom: 28 findings (24 per quadrant, 4 per joint), SCOORD polylines and overlays on the phantom's joint lines."""
    problems: list[str] = []
    for (side, quadrant), found in node_outputs.items():
        (sr_bytes,) = found[SR_CLASS]
        sr = dcmread(io.BytesIO(sr_bytes))
        if SC_CLASS not in found:
            problems.append(f"{side} {quadrant}: not analysed: {[t for t in _texts(sr) if 'not analysed' in t]}")
            continue
        report = hd.sr.Comprehensive3DSR.from_dataset(sr)
        groups = [g for g in report.content.get_image_measurement_groups() if g.finding_type is not None and g.finding_sites]
        sides = [g.finding_sites[0].laterality.meaning for g in groups]
        if len(groups) != 28 or sides.count("Left") != 14 or sides.count("Right") != 14:
            problems.append(f"{side} {quadrant}: {len(groups)} findings, sides {sorted(set(sides))}")
        _check_contours(sr, found[SC_CLASS], quadrant_phantoms[(side, quadrant)], problems, f"{side} {quadrant}")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_one_edema_per_quadrant_is_present_on_its_own_side_and_quadrant_only(
    node_outputs: dict[tuple[str, str], dict[str, list[bytes]]]
) -> None:
    """The issue's laterality criterion, for all four quadrants on both sides."""
    problems = []
    for (side, quadrant), found in node_outputs.items():
        (sr_bytes,) = found[SR_CLASS]
        region, bone = quadrant.split("_")
        wanted = ("Edema", bone.capitalize(), side.capitalize(), {"upper": "Superior", "lower": "Inferior"}[region])
        present = _present(dcmread(io.BytesIO(sr_bytes)))
        if wanted not in present:
            problems.append(f"{side} {quadrant}: no Present edema there; Present: {present}")
        other = "Right" if side == "left" else "Left"
        if any(p[2] == other for p in present):
            problems.append(f"{side} {quadrant}: Present on the {other.lower()} side: {[p for p in present if p[2] == other]}")
    assert not problems, "\n".join(problems)


def _check_contours(sr, overlays: list[bytes], folder: Path, problems: list[str], case: str) -> None:  # noqa: ANN001
    """The SR's SCOORD polylines and the overlay's drawn pixels lie on the phantom's joint lines (within 3 mm)."""
    from scipy.ndimage import distance_transform_edt

    masks = np.load(folder / "masks.npz")
    uids = {}
    for sequence in ("T1", "STIR"):
        for index, path in enumerate(sorted(folder.glob(f"*_{sequence}/*.dcm"))):
            dataset = dcmread(path, stop_before_pixels=True)
            uids[str(dataset.SOPInstanceUID)] = (sequence, int(dataset.InstanceNumber) - 1, float(dataset.PixelSpacing[0]))
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    polylines = report.content.get_planar_roi_measurement_groups()
    sides = {g.finding_sites[0].laterality.meaning for g in polylines}
    if len(polylines) != 4 or sides != {"Left", "Right"}:
        problems.append(f"{case}: expected a left and a right joint line per sequence, got {len(polylines)} ({sides})")
    for group in polylines:
        region = group.roi
        uid = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID  # the SCOORD's IMAGE item
        sequence, index, spacing = uids[str(uid)]
        side = group.finding_sites[0].laterality.meaning.lower()
        line = masks[f"{sequence}_joint_line"][index] == {"left": 1, "right": 2}[side]
        distance = distance_transform_edt(~line) * spacing
        points = np.asarray(region.value, dtype=float).reshape(-1, 2) - 0.5  # DICOM (column, row) -> pixel centres
        rows, cols = np.round(points[:, 1]).astype(int), np.round(points[:, 0]).astype(int)
        far = float(np.median(distance[rows, cols]))
        if far > 3.0:
            problems.append(f"{case}: the {side} {sequence} polyline lies {far:.1f} mm (median) from the joint line")
    drawn = 0
    for payload in overlays:
        overlay = dcmread(io.BytesIO(payload))
        if "overlay" not in str(overlay.SeriesDescription).lower():
            continue
        uid = str(overlay.SourceImageSequence[0].ReferencedSOPInstanceUID)
        sequence, index, spacing = uids[uid]
        lines = masks[f"{sequence}_joint_line"][index] > 0
        distance = distance_transform_edt(~lines) * spacing
        rgb = overlay.pixel_array[: lines.shape[0], : lines.shape[1]].astype(int)
        coloured = (np.abs(rgb[..., 0] - rgb[..., 1]) > 60) | (np.abs(rgb[..., 1] - rgb[..., 2]) > 60)
        drawn += 1
        if coloured.sum() < 20 or float(np.median(distance[coloured])) > 3.0:
            problems.append(f"{case}: overlay on {sequence} slice {index + 1}: {int(coloured.sum())} coloured pixels, median {float(np.median(distance[coloured])) if coloured.any() else -1:.1f} mm from the joint lines")
    if drawn != 2:
        problems.append(f"{case}: {drawn} contour overlays (one per sequence expected)")
