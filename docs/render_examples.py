"""Render the committed examples under docs/: phantom heatmaps and a study summary card.

    PYTHONPATH=. python3 docs/render_examples.py

Phantom radiographs with left-only, right-only and no radiographic sacroiliitis and an axial
T2FS phantom with edema run through the shipped demonstration packs; their heatmap Secondary
Captures are written as PNGs (downscaled to at most MAX_SIDE pixels; the file name ends in the
row count of the image part, where the text band begins). The summary card lists each phantom
radiograph's finding and the MRI study's series with their fates (only xr-anatomy and t2fs-mil
configured).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from pipeline.chains import RuntimeSettings, SeriesInput, StudyInputs
from pipeline.chains.t2fs_mil.chain import T2FSMILChain
from pipeline.chains.xr_anatomy.chain import XRAnatomyChain
from pipeline.encode.heatmap import encode_heatmaps
from pipeline.encode.sr import encode_sr, report_lines
from pipeline.encode.summary import StudySummary, chain_outcome, encode_summary, series_fates
from pipeline.phantom import generate_study, write_study
from pipeline.route import ChainSpec

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
MAX_SIDE = 800
XR = ChainSpec(name="xr-anatomy", implementation="pipeline.chains.xr_anatomy.chain:XRAnatomyChain",
               pack=str(REPO / "packs" / "xr-anatomy-demo"), requires=[{"role": "XR"}])
MRI = ChainSpec(name="t2fs-mil", implementation="pipeline.chains.t2fs_mil.chain:T2FSMILChain",
                pack=str(REPO / "packs" / "t2fs-mil-demo"), requires=[{"role": "T2FS", "planes": ["axial"]}])
RADIOGRAPHS = {
    "left-only": (90013, {"lesions": [], "mny_grade": {"left": 4, "right": 0}}),
    "none": (90015, "none"),
}
MRI_STUDY = (2024, {"lesions": [{"type": "edema", "side": "left", "quadrant": "upper_ilium", "severity": "severe"}]})


def save(rgb: np.ndarray, image_rows: int, name: str) -> Path:
    scale = min(1.0, MAX_SIDE / max(rgb.shape[:2]))
    image = Image.fromarray(rgb)
    if scale < 1:
        image = image.resize((round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)), Image.LANCZOS)
    path = DOCS / "heatmaps" / f"{name}-{round(image_rows * scale)}.png"
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)  # small files (the DICOM heatmaps are 24-bit)
    return path


def inputs(folder: Path, pattern: str, key: str) -> StudyInputs:
    files = tuple(sorted(folder.glob(pattern)))
    return StudyInputs("x", {key: SeriesInput(key, "x", files)})


def main() -> None:
    runtime = RuntimeSettings(torch_threads=2)
    xr, t2fs = XRAnatomyChain(XR, runtime), T2FSMILChain(MRI, runtime)
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (seed, spec) in RADIOGRAPHS.items():
            folder = write_study(generate_study(seed, kinds=("xr",), lesions=spec), Path(tmp) / name)
            result = xr.run(inputs(folder, "*_XR/*.dcm", "xr"))
            rows = int(result.sources[0].Rows)
            for sc, heat in zip(encode_heatmaps(result, "1.2.3.4", 9001), [m for m in result.maps if m.key]):
                print(save(sc.pixel_array, rows, f"xr-{name}-{heat.meaning.value.lower()}"))
            lines = report_lines(encode_sr(result, "1.2.3.5", 9000))
            outcomes.append(chain_outcome(SimpleNamespace(chain=f"xr-anatomy ({name} phantom)", state="done"), lines))
        study = generate_study(MRI_STUDY[0], kinds=("mri",), lesions=MRI_STUDY[1])
        folder = write_study(study, Path(tmp) / "mri")
        t2fs_folder = next(p for p in sorted(folder.iterdir()) if p.is_dir() and p.name.upper().endswith("T2FS"))
        result = t2fs.run(inputs(t2fs_folder, "*.dcm", "t2fs"))
        rows = int(result.sources[0].Rows)
        for index, sc in enumerate(encode_heatmaps(result, "1.2.3.6", 9001)[:1]):
            print(save(sc.pixel_array, rows, "mri-t2fs-edema-grad-cam"))
        lines = report_lines(encode_sr(result, "1.2.3.7", 9000))
        outcomes.append(chain_outcome(SimpleNamespace(chain="t2fs-mil", state="done"), lines))
        from pydicom import dcmread

        series = []
        for number, sub in enumerate(sorted(p for p in folder.iterdir() if p.is_dir()), start=1):
            header = dcmread(next(sub.glob("*.dcm")), stop_before_pixels=True)
            role = next((r for r in ("T2FS", "STIR", "T1") if r in sub.name.upper()), "OTHER")
            normal = np.cross(*np.reshape([float(v) for v in header.ImageOrientationPatient], (2, 3)))
            plane = ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]
            series.append(SimpleNamespace(series_uid=str(header.SeriesInstanceUID), series_number=int(header.get("SeriesNumber", number)),
                                          description=str(header.get("SeriesDescription", "")), modality="MR", role=role,
                                          plane=plane, counts_as_input=True, reason=None))
        t2fs_uid = str(dcmread(next(t2fs_folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
        jobs = [SimpleNamespace(chain="t2fs-mil", state="done", inputs={"t2fs": t2fs_uid}, error=None)]
        summary = StudySummary(study.study_uid, tuple(outcomes), series_fates(series, jobs, [XR, MRI]))
        card, _ = encode_summary(summary, result.sources[0], 1)
        path = DOCS / "summary-card.png"
        Image.fromarray(card.pixel_array).save(path, optimize=True)
        print(path)
        (DOCS / "summary-card.txt").write_text("\n".join(text for _, text in summary.lines()) + "\n")


if __name__ == "__main__":
    main()
