"""A chain defined in the tests: it stands in for the model chains in node tests.

It proves the plumbing (route → worker → spool → outbox → PACS) with a real DICOM object: a
Secondary Capture (highdicom) of the middle slice of its input series. It fails on purpose
when the study description asks it to ("FAIL-CHAIN"), so failure handling is tested too, and
takes its time when asked ("SLOW-CHAIN <seconds>"), so a job can be caught running.
"""

from __future__ import annotations

import re
import time

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.chains import RuntimeSettings, StudyInputs
from pipeline.route import ChainSpec


class EchoChain:
    def __init__(self, spec: ChainSpec, runtime: RuntimeSettings) -> None:
        self.name = spec.name

    def produce(self, inputs: StudyInputs) -> list[Dataset]:
        series = next(iter(inputs.series.values()))
        datasets = series.datasets()
        source = datasets[len(datasets) // 2]
        description = str(source.get("StudyDescription", ""))
        if "FAIL-CHAIN" in description:
            raise RuntimeError("the test chain was asked to fail")
        if slow := re.search(r"SLOW-CHAIN (\d+)", description):
            time.sleep(int(slow.group(1)))
        pixels = source.pixel_array.astype(np.float32)
        scaled = (255 * (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1.0)).astype(np.uint8)
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=scaled,
            photometric_interpretation="MONOCHROME2",
            bits_allocated=8,
            coordinate_system="PATIENT",
            patient_orientation=("L", "F"),
            series_instance_uid=generate_uid(),
            series_number=900,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="sijnode tests",
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        image.SeriesDescription = f"{self.name} test output"
        return [image]


class ReportingChain:
    """Reports through the node's real encoders (TID 1500 SR + heatmap SC) without a model, so
    that result versions, series numbers and predecessor references are tested as PACS sees them.

    The "probability" is the middle slice's mean intensity scaled to [0, 1]; the map is that
    slice's intensities, weighted by the probability as every evidence map is. Neither means anything clinically; the provenance says so (demonstration).
    """

    def __init__(self, spec: ChainSpec, runtime: RuntimeSettings) -> None:
        self.name = spec.name

    def produce(self, inputs: StudyInputs) -> list[Dataset]:
        from pipeline.encode import encode_result
        from pipeline.cam import evidence_map
        from pipeline.encode.codes import concept
        from pipeline.results import ChainResult, Finding, ImageRef, Map, MapMeaning, Provenance, Site

        datasets = next(iter(inputs.series.values())).datasets()
        source = datasets[len(datasets) // 2]
        pixels = source.pixel_array.astype(np.float32)
        values = (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1.0)
        finding = Finding(
            concept("active sacroiliitis"), Site.SACROILIAC_JOINT, float(values.mean()), 0.5, evidence=(ImageRef.of(source),)
        )
        provenance = Provenance(
            chain=self.name, pack_name=f"{self.name}-test", pack_version="1.0", weights_sha256="0" * 64,
            demonstration=True, device="cpu",
        )
        result = ChainResult(
            findings=[finding], provenance=provenance, sources=datasets,
            maps=[Map(ImageRef.of(source), evidence_map(values, finding.probability), MapMeaning.GRAD_CAM)],
        )
        return encode_result(result, plan=inputs.output)
