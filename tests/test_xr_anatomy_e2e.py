"""End to end: a phantom radiograph sent with storescu comes back to Orthanc as an SR and heatmaps.

The real ``sijnode serve`` runs the xr-anatomy chain with the committed demo pack; Orthanc is the
PACS the results go to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from pipeline.packs import load_pack
from pipeline.phantom import generate_study, write_study
from storage.models import Delivery, Job
from tests.node_harness import NODE_AET, REPO, Node
from tests.peers import LOOPBACK, orthanc, run_storescu, wait_for

XR_CHAIN = {
    "name": "xr-anatomy",
    "implementation": "pipeline.chains.xr_anatomy.chain:XRAnatomyChain",
    "pack": str(REPO / "packs" / "xr-anatomy-demo"),
    "requires": [{"role": "XR"}],
}
SEED, SPEC = 90013, {"lesions": [], "mny_grade": {"left": 4, "right": 2}}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture



def _content_texts(dataset) -> list[str]:
    """Every concept meaning and text value in an SR's content tree."""
    found = []
    for item in dataset.get("ContentSequence", []):
        for name in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for code in item.get(name, []):
                found.append(str(code.CodeMeaning))
        if "TextValue" in item:
            found.append(str(item.TextValue))
        found += _content_texts(item)
    return found


def test_phantom_radiograph_comes_back_as_sr_and_heatmaps_in_orthanc(tmp_path: Path) -> None:
    study = generate_study(SEED, kinds=("xr",), lesions=SPEC)
    folder = write_study(study, tmp_path / "study")
    files = sorted(folder.glob("*_XR/*.dcm"))
    source = dcmread(files[0])

    with orthanc(tmp_path / "orthanc") as pacs:
        overrides = {
            "peers": [{"name": "pacs", "ae_title": pacs.aet, "host": LOOPBACK, "port": pacs.dicom_port}],
            "chains": [XR_CHAIN],
        }
        with Node(tmp_path / "node", overrides) as node:
            sent = run_storescu(files, node.port, NODE_AET)
            assert sent.returncode == 0, sent.stderr

            jobs = wait_for(
                lambda: [j for j in node.rows(Job) if j.state in ("done", "failed")] or None,
                timeout=150, interval=0.5, what=f"the xr-anatomy job\n{node.output_tail()}",
            )
            assert [(j.chain, j.state) for j in jobs] == [("xr-anatomy", "done")], node.output_tail()
            delivered = wait_for(
                lambda: (d := [d for d in node.rows(Delivery) if d.state == "done"]) and len(d) >= 5 and d or None,
                timeout=60, what=f"five deliveries acknowledged (SR, 2 heatmaps, summary card and SR)\n{node.output_tail()}",
            )

            received = {}
            for delivery in delivered:
                instance_id = pacs.instance_id_for(delivery.output_uid)
                assert instance_id is not None
                received[delivery.output_uid] = dcmread(DicomBytesIO(pacs.instance_file(instance_id)))

    received = {uid: ds for uid, ds in received.items() if "summary" not in ds.SeriesDescription}  # tests/test_radiologist.py
    classes = sorted(str(ds.SOPClassUID) for ds in received.values())
    assert classes == [SC_CLASS, SC_CLASS, SR_CLASS]
    (sr,) = [ds for ds in received.values() if str(ds.SOPClassUID) == SR_CLASS]
    assert str(sr.StudyInstanceUID) == str(source.StudyInstanceUID)
    texts = _content_texts(sr)
    assert "Radiographic sacroiliitis (modified New York criteria)" in texts
    assert "Bilateral" not in texts  # a patient-level finding has no side
    manifest = load_pack(XR_CHAIN["pack"]).manifest  # the SR names the pack that made it (TID 4019)
    assert {manifest.name, manifest.version, f"weights sha256={manifest.weights.sha256}"} <= set(texts)
    for heatmap in (ds for ds in received.values() if str(ds.SOPClassUID) == SC_CLASS):
        assert heatmap.Rows > source.Rows and heatmap.Columns == source.Columns  # the text band below
        assert str(heatmap.SourceImageSequence[0].ReferencedSOPInstanceUID) == str(source.SOPInstanceUID)
        assert list(heatmap.PatientOrientation) == ["L", "F"]
        assert np.asarray(heatmap.pixel_array).shape == (heatmap.Rows, source.Columns, 3)
