"""The node behind a forward-everything PACS rule, with Orthanc as the PACS.

A whole study (images, a foreign SR, a KOS, a presentation state) is pushed by Orthanc with
``POST /modalities/sijnode/store``; the node's results go back to Orthanc, and Orthanc pushes the
study again, results included, as a forwarding rule would. Then results come back by storescu,
another sijnode's result arrives, and one late instance is added to one chain's input series.
Each README claim in "Connecting it to PACS" is checked here against the real node and Orthanc.
"""

from __future__ import annotations

import io
import time
from collections import Counter
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from storage.models import Counter as CounterRow
from storage.models import Delivery, Job, Study
from tests.node_harness import NODE_AET, Node, make_mr_series
from tests.peers import orthanc, run_storescu, wait_for

QUIET_SECONDS = 1
T1_CHAIN = {
    "name": "report-t1",
    "implementation": "tests.chains:ReportingChain",
    "requires": [{"role": "T1"}],
    "series": {"base": 9100},
}
STIR_CHAIN = {
    "name": "report-stir",
    "implementation": "tests.chains:ReportingChain",
    "requires": [{"role": "STIR"}],
    "series": {"base": 9200, "descriptions": {"sr": "STIR findings"}},
}


def _foreign_objects(images: list[Dataset], folder: Path) -> list[Path]:
    """What a PACS study holds besides images: a radiologist's SR, a KOS and a presentation state
    (highdicom, another vendor), each in its own series."""
    folder.mkdir(parents=True, exist_ok=True)
    common = dict(series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(), instance_number=1, manufacturer="OTHER VENDOR")
    observer = hd.sr.ObservationContext(
        observer_person_context=hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept("121006", "DCM", "Person"),
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="READER^ONE"),
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=hd.sr.CodedConcept("24861-4", "LN", "MR Pelvis"),
        referenced_images=images[:1],
        imaging_measurements=[
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(identifier="reader impression"),
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        hd.sr.CodedConcept("121071", "DCM", "Finding"), hd.sr.CodedConcept("17621005", "SCT", "Normal")
                    )
                ],
            )
        ],
    )
    sr = hd.sr.Comprehensive3DSR(evidence=images[:1], content=report[0], series_number=100, **common)
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=images[:1],
        content=hd.ko.KeyObjectSelection(
            document_title=hd.sr.CodedConcept("113000", "DCM", "Of Interest"), referenced_objects=images[:1]
        ),
        series_instance_uid=generate_uid(),
        series_number=101,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="OTHER VENDOR",
    )
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=images[:1],
        series_instance_uid=generate_uid(),
        series_number=102,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="OTHER VENDOR",
        manufacturer_model_name="Viewer",
        software_versions="1",
        device_serial_number="1",
        content_label="ANNOTATION",
    )
    paths = []
    for name, dataset in (("sr", sr), ("kos", kos), ("pr", gsps)):
        path = folder / f"{name}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# Polling reads the node's database directly (a CLI call per poll costs seconds on a busy
# machine); the CLI's own output is checked once, where it is the thing under test.
def _chest_radiograph(study_uid: str, path: Path) -> Path:
    """A DX chest PA in the same study (what a forward-everything rule also sends)."""
    ds = dcmread(make_mr_series(path.parent / "chest-template", 1)[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.SeriesDescription = ds.ProtocolName = "Thorax p.a."
    ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
    ds.SeriesNumber = 3
    for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "SliceThickness", "SpacingBetweenSlices", "FrameOfReferenceUID"):
        delattr(ds, keyword)
    ds.ImagerPixelSpacing, ds.PatientOrientation = ds.PixelSpacing, ["L", "F"]
    ds.save_as(path, enforce_file_format=True)
    return path


def _jobs(node: Node) -> list[tuple[str, int, str]]:
    return sorted((job.chain, job.result_version, job.state) for job in node.rows(Job))


def _delivered(node: Node, count: int) -> None:
    def done() -> bool:
        deliveries = node.rows(Delivery)
        return len(deliveries) >= count and all(d.state == "done" for d in deliveries)

    wait_for(done, timeout=90, interval=0.3, what=f"{count} results delivered to Orthanc\n{node.output_tail()}")


def _study(node: Node) -> Study:
    (study,) = node.rows(Study)
    return study


def _push(pacs, resource: str) -> dict:
    """Orthanc's C-STORE job to the node; raises on HTTP 500, as a failed push would."""
    answer = pacs.store_to("sijnode", resource)
    assert answer["FailedInstancesCount"] == 0, answer
    return answer


def _counters(node: Node) -> Counter:
    return Counter({counter.name: counter.value for counter in node.rows(CounterRow)})


def _study_series(pacs, study_id: str) -> list[dict]:
    return [series["MainDicomTags"] for series in pacs.get(f"/studies/{study_id}/series")]


def test_forward_everything_rule_gives_one_current_result_per_chain(tmp_path: Path) -> None:
    t1 = make_mr_series(tmp_path / "t1", 6, series_number=1)
    study_uid = str(dcmread(t1[0]).StudyInstanceUID)
    stir = make_mr_series(tmp_path / "stir", 5, study_uid=study_uid, series_description="t2_tirm_cor", series_number=2)
    late = make_mr_series(tmp_path / "late", 7, series_number=1)[6]  # the 7th slice of the T1 series
    late_ds = dcmread(late)
    late_ds.StudyInstanceUID = study_uid
    late_ds.SeriesInstanceUID = dcmread(t1[0]).SeriesInstanceUID
    late_ds.FrameOfReferenceUID = dcmread(t1[0]).FrameOfReferenceUID
    late_ds.save_as(late, enforce_file_format=True)
    foreign = _foreign_objects([dcmread(p) for p in t1], tmp_path / "foreign")
    chest = _chest_radiograph(study_uid, tmp_path / "chest.dcm")

    with orthanc(tmp_path, extra_config={"DicomAssociationCloseDelay": 0}) as pacs:
        overrides = {
            "study": {"quiet_seconds": QUIET_SECONDS},
            "peers": [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}],
            "chains": [T1_CHAIN, STIR_CHAIN],
        }
        with Node(tmp_path / "node", overrides) as node:
            pacs.set_modality("sijnode", NODE_AET, node.port)
            for path in [*t1, *stir, *foreign, chest]:
                pacs.upload(path)
            (study_id,) = pacs.studies()

            # 1. The whole study, SR, KOS and presentation state included: the push succeeds,
            #    the images are stored, exactly one job per applicable chain runs.
            _push(pacs, study_id)
            wait_for(lambda: _jobs(node) == [("report-stir", 1, "done"), ("report-t1", 1, "done")], timeout=90,
                     interval=0.3, what=f"one job per chain\n{node.output_tail()}")
            # per chain an SR and a heatmap; the study summary's card and SR follow the last job
            shown = wait_for(lambda: (s := node.cli_json("show", study_uid)) and len(s["outputs"]) == 6 and s,
                             timeout=60, interval=0.3, what=f"results and the study summary\n{node.output_tail()}")
            objects = {(o["kind"], o["sop_class_uid"]): o["count"] for o in shown["objects"]}
            assert objects == {
                ("input", "1.2.840.10008.5.1.4.1.1.4"): 11,
                ("input", "1.2.840.10008.5.1.4.1.1.1.1"): 1,  # the chest radiograph: input-capable, not an input
                ("non-input", "1.2.840.10008.5.1.4.1.1.88.34"): 1,  # Comprehensive 3D SR
                ("non-input", "1.2.840.10008.5.1.4.1.1.88.59"): 1,  # Key Object Selection
                ("non-input", "1.2.840.10008.5.1.4.1.1.11.1"): 1,  # Grayscale Softcopy PS
            }
            assert _counters(node)["non_input_objects"] == 3
            table = node.cli("show", study_uid).stdout
            assert "Objects received" in table and "Key Object Selection" in table
            explained = node.cli_json("explain", str(dcmread(chest).SeriesInstanceUID))["current_rules"]
            assert (explained["role"], explained["counts_as_input"], explained["rule"]) == ("OTHER", False, "xr-not-pelvis")
            assert "not a pelvic radiograph" in explained["reason"] and "CHEST" in explained["reason"]
            outputs = shown["outputs"]
            _delivered(node, 6)

            # 2. Orthanc forwards the whole study again, now with the node's own results and the
            #    same images: acknowledged, counted, no new job.
            _push(pacs, study_id)
            assert _counters(node)["own_results_returned"] == 6
            time.sleep(QUIET_SECONDS + 2)  # the completion loop would have routed a re-opened study
            assert _jobs(node) == [("report-stir", 1, "done"), ("report-t1", 1, "done")]
            assert _study(node).state == "complete"

            # 3. A result back by storescu, and another sijnode's result (its own UIDs, the
            #    sijnode manufacturer): counted, no job.
            heatmap = next(o for o in outputs if o["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.7")
            own_file = node.workdir / "var" / "spool" / heatmap["path"]
            other = dcmread(own_file)
            other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            other.SeriesInstanceUID = generate_uid()
            other_file = tmp_path / "other-node-heatmap.dcm"
            other.save_as(other_file, enforce_file_format=True)
            for path in (own_file, other_file):
                sent = run_storescu([path], node.port, NODE_AET)
                assert sent.returncode == 0, sent.stderr
            assert _counters(node)["own_results_returned"] == 8
            store = node.store()
            kinds = {o["kind"] for o in store.study_detail(study_uid)["objects"]}
            store.dispose()
            assert {"own-result", "sijnode-result"} <= kinds
            time.sleep(QUIET_SECONDS + 2)
            assert len(_jobs(node)) == 2

            # 4. One late instance in the T1 series: exactly one new version, of that chain only,
            #    whose SR points at version 1 and whose descriptions say "result 2".
            _push(pacs, pacs.upload(late)["ID"])
            wait_for(lambda: ("report-t1", 2, "done") in _jobs(node), timeout=90, interval=0.3, what=f"result 2\n{node.output_tail()}")
            assert _jobs(node) == [("report-stir", 1, "done"), ("report-t1", 1, "done"), ("report-t1", 2, "done")]
            assert "report-stir': inputs unchanged since result 1" in _study(node).routing_note
            _delivered(node, 8)  # result 2's SR and heatmap (and a new summary when its content changed)

            series = _study_series(pacs, study_id)
            numbers = [int(s["SeriesNumber"]) for s in series]
            # 6 input/non-input series, 6 result series, the summary's card and SR series
            assert len(numbers) == len(set(numbers)) == 14, sorted(numbers)  # no two series share a number
            ours = {int(s["SeriesNumber"]): s["SeriesDescription"] for s in series if int(s["SeriesNumber"]) >= 9000}
            assert ours == {
                9100: "DEMONSTRATION AI findings report-t1-test 1.0 result 1",
                9101: "DEMONSTRATION AI heatmaps report-t1-test 1.0 result 1",
                9110: "DEMONSTRATION AI findings report-t1-test 1.0 result 2",
                9111: "DEMONSTRATION AI heatmaps report-t1-test 1.0 result 2",
                9200: "DEMONSTRATION STIR findings result 1",
                9201: "DEMONSTRATION AI heatmaps report-stir-test 1.0 result 1",
            }
            sr_series = [s for s in series if s.get("Modality") == "SR" and int(s["SeriesNumber"]) >= 9000]
            assert len(sr_series) == 3  # per chain one SR series per version

            reports = {}
            for instance in pacs.instances():
                dataset = dcmread(io.BytesIO(pacs.instance_file(instance)), stop_before_pixels=True)
                if dataset.Modality == "SR" and dataset.get("SeriesNumber") in (9100, 9110):
                    reports[int(dataset.SeriesNumber)] = dataset
            first, second = reports[9100], reports[9110]
            assert "PredecessorDocumentsSequence" not in first
            (study_item,) = second.PredecessorDocumentsSequence
            assert study_item.StudyInstanceUID == study_uid
            (series_item,) = study_item.ReferencedSeriesSequence
            assert series_item.SeriesInstanceUID == first.SeriesInstanceUID
            (sop_item,) = series_item.ReferencedSOPSequence
            assert (sop_item.ReferencedSOPInstanceUID, sop_item.ReferencedSOPClassUID) == (first.SOPInstanceUID, first.SOPClassUID)

            # sijnode reprocess still forces a new version, even with unchanged inputs.
            assert node.cli_json("reprocess", study_uid)["version"] >= 2
            wait_for(lambda: {("report-stir", 2, "done"), ("report-t1", 3, "done")} <= set(_jobs(node)),
                     timeout=90, interval=0.3, what=f"forced versions\n{node.output_tail()}")


def test_identical_resend_under_replace_changes_nothing_but_new_content_does(tmp_path: Path) -> None:
    """Under duplicates: replace a re-sent instance replaces the stored one: only different bytes
    count as a change of the chain's inputs."""
    t1 = make_mr_series(tmp_path / "t1", 4)
    study_uid = str(dcmread(t1[0]).StudyInstanceUID)
    overrides = {"study": {"quiet_seconds": 1}, "storage": {"duplicates": "replace"}, "chains": [T1_CHAIN]}
    with Node(tmp_path / "node", overrides) as node:
        assert run_storescu(t1, node.port, NODE_AET).returncode == 0
        wait_for(lambda: _jobs(node) == [("report-t1", 1, "done")], timeout=60, interval=0.3, what="result 1")
        assert run_storescu(t1, node.port, NODE_AET).returncode == 0  # the same bytes again
        wait_for(lambda: (_study(node).state, _study(node).version) == ("complete", 2), timeout=30, interval=0.3,
                 what="re-opened study completes again")
        assert _jobs(node) == [("report-t1", 1, "done")]
        changed = dcmread(t1[0])
        changed.WindowCenter, changed.WindowWidth = 2000, 4000  # a corrected header: new content
        changed.save_as(t1[0], enforce_file_format=True)
        assert run_storescu(t1[:1], node.port, NODE_AET).returncode == 0
        wait_for(lambda: ("report-t1", 2, "done") in _jobs(node), timeout=60, interval=0.3, what="result 2 after a real replacement")
        assert _study(node).study_uid == study_uid


def test_chain_series_blocks_default_by_position_and_overlaps_are_refused() -> None:
    from node.config import ConfigError, parse_config

    unpinned = [{**chain, "series": {}} for chain in (T1_CHAIN, STIR_CHAIN)]
    assert [c.series.base for c in parse_config({"chains": unpinned}, Path(".")).chains] == [9100, 9200]
    overlapping = [T1_CHAIN, {**STIR_CHAIN, "series": {"base": 9150}}]
    with pytest.raises(ConfigError, match="report-t1 and report-stir: series.base 9100 and 9150 are less than 100 apart"):
        parse_config({"chains": overlapping}, Path("."))
