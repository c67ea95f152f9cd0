"""One phantom study end to end: anatomy, lesions, series, DICOM, ground truth, masks."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from pydicom.dataset import Dataset

from .anatomy import (
    ANATOMY_LABELS,
    JOINT_LINE_LABELS,
    OCCUPANCY,
    SIDE_SIGN,
    PhantomModel,
    sample_anatomy,
)
from .ct import plan_ct, render_ct
from .dicom import resolve_transfer_syntax, series_datasets, study_identity
from .geometry import ProjectionGeometry, SliceGeometry
from .labels import LESION_MIN_AREA_MM2, derive_labels, quadrant_findings
from .lesions import (
    PlacedLesion,
    lesion_center_lps,
    place_lesions,
    resolve_lesion_specs,
)
from .mri import plan_mri, render_mri
from .radiograph import plan_radiograph, render_radiograph
from .readers import readers_record
from .series import RenderedSeries, SeriesPlan
from .vendors import Vendor, vendor_for_seed
from .version import GENERATOR_VERSION

KINDS: tuple[str, ...] = ("mri", "ct", "xr")
MASK_FILE = "masks.npz"
_SERIES_FOLDER = re.compile(r"\d{3,}_(T1|STIR|T2FS|CT|XR)")
GROUND_TRUTH_FILE = "ground_truth.json"

# where each lesion type changes the image (by the physics of tissues.py)
_VISIBLE_ON = {
    "edema": ("T1", "STIR", "T2FS"),
    "fat": ("T1", "STIR", "T2FS", "CT"),
    "sclerosis": ("T1", "STIR", "T2FS", "CT", "XR"),
    "erosion": ("T1", "STIR", "T2FS", "CT", "XR"),
    "ankylosis": ("T1", "STIR", "T2FS", "CT", "XR"),
    "narrowing": ("T1", "STIR", "T2FS", "CT", "XR"),
    "widening": ("T1", "STIR", "T2FS", "CT", "XR"),
}


@dataclass(frozen=True)
class SeriesInfo:
    """What a series is, in ground-truth terms."""

    role: str  # T1, STIR, T2FS, CT or XR
    plane: str  # axial, coronal, sagittal or oblique (semicoronal is coronal)
    description: str  # SeriesDescription as the vendor writes it
    modality: str  # MR, CT or DX
    series_uid: str
    series_number: int
    folder: str
    tilt_deg: float = 0.0


class PhantomSeries(NamedTuple):
    """A series: ``info`` and its datasets in InstanceNumber order (unpacks as a pair)."""

    info: SeriesInfo
    datasets: list[Dataset]


@dataclass
class PhantomStudy:
    """A generated study: DICOM datasets per series, ground truth and masks."""

    seed: int
    study_uid: str
    folder_name: str
    series: list[PhantomSeries]
    ground_truth: dict
    masks: dict[str, np.ndarray] = field(default_factory=dict)


def _first_series_numbers(vendor: Vendor) -> dict[str, int]:
    """Series numbers as each vendor tends to assign them (localizers take the first ones)."""
    if vendor.name == "Philips":
        return {"XR": 1, "mri": 301, "mri_step": 100, "CT": 701}
    first_mr = {"Siemens": 2, "GE": 2, "Canon": 3}[vendor.name]
    return {"XR": 1, "mri": first_mr, "mri_step": 1, "CT": 10}


def _spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def generate_study(
    seed: int,
    kinds: Sequence[str] = KINDS,
    lesions: str | dict | Path = "random",
    transfer_syntax: str | None = None,
) -> PhantomStudy:
    """Generate one synthetic sacroiliac-joint study (see the package docstring)."""
    kinds = _check_kinds(kinds)
    syntax = resolve_transfer_syntax(transfer_syntax)
    model = PhantomModel(sample_anatomy(seed), [], seed)
    specs, normalised_spec = resolve_lesion_specs(seed, lesions)
    placed = place_lesions(model, specs, seed)
    vendor = vendor_for_seed(seed)
    numbers = _first_series_numbers(vendor)

    mri_plans = [
        replace(plan, series_number=numbers["mri"] + i * numbers["mri_step"])
        for i, plan in enumerate(plan_mri(model, vendor, seed))
    ]
    rendered: list[RenderedSeries] = []
    if "xr" in kinds:
        rendered.append(render_radiograph(model, plan_radiograph(model, vendor, seed, numbers["XR"]), seed))
    if "mri" in kinds:
        rendered.extend(render_mri(model, mri_plans, seed))
    if "ct" in kinds:
        rendered.append(render_ct(model, plan_ct(model, vendor, seed, numbers["CT"]), seed))
    rendered.sort(key=lambda series: series.plan.series_number)

    uid_key = f"sijnode-phantom|{GENERATOR_VERSION}|{seed}|{_spec_hash(normalised_spec)}"
    identity = study_identity(seed, uid_key)
    series: list[PhantomSeries] = []
    masks: dict[str, np.ndarray] = {}
    for item in rendered:
        plan = item.plan
        datasets = series_datasets(item, identity, str(syntax))
        info = SeriesInfo(
            role=plan.role,
            plane=plan.plane,
            description=plan.description,
            modality=plan.modality,
            series_uid=str(datasets[0].SeriesInstanceUID),
            series_number=plan.series_number,
            folder=plan.folder,
            tilt_deg=round(plan.tilt_deg, 3),
        )
        series.append(PhantomSeries(info, datasets))
        for name, mask in item.masks.items():
            masks[f"{plan.role}_{name}"] = mask

    edema_stir_slices = _stir_edema_coverage(model, mri_plans, rendered)
    lesion_records = [_lesion_record(model, lesion, rendered) for lesion in placed]
    labels = derive_labels(lesion_records, edema_stir_slices)
    ground_truth = {
        "generator": "sijnode.pipeline.phantom",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "synthetic": True,
        "study_uid": identity.study_uid,
        "patient_id": identity.patient_id,
        "patient_name": identity.patient_name,
        "kinds": list(kinds),
        "vendor": vendor.name,
        "transfer_syntax": str(syntax),
        "lesion_spec": normalised_spec,
        "anatomy": _anatomy_record(model),
        "series": [_series_record(item, entry) for item, entry in zip(rendered, series)],
        "lesions": lesion_records,
        "mny_grade": labels["mny_grade"],
        "labels": labels,
        "quadrant_findings": quadrant_findings(lesion_records),
        "readers": readers_record(seed, lesion_records),
        "masks": _mask_legend(masks),
        "conventions": {
            "coordinates": "DICOM patient LPS in mm: +x patient's left, +y posterior, +z head",
            "sides": "patient's left / right",
            "slice_index": "0-based position in the series folder and mask arrays; InstanceNumber = index + 1",
            "lesion_slices": f"slices where the lesion covers at least {LESION_MIN_AREA_MM2} mm^2",
            "asas_basis": "semicoronal STIR slice coverage of edema lesions (computed even when MRI is not rendered)",
        },
    }
    return PhantomStudy(seed, identity.study_uid, f"SYNTH-{seed:04d}", series, ground_truth, masks)


def write_studies(
    out_dir: Path,
    seed: int = 0,
    count: int = 1,
    kinds: Sequence[str] = KINDS,
    lesions: str | dict | Path = "random",
    transfer_syntax: str | None = None,
) -> list[Path]:
    """Write ``count`` studies with seeds ``seed .. seed+count-1``; return their folders.

    Layout: ``out_dir/SYNTH-0007/002_T1/0001.dcm`` ... plus ``ground_truth.json`` and
    ``masks.npz`` in each study folder.  A study folder that exists is overwritten.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    out_dir = Path(out_dir)
    folders = []
    for study_seed in range(seed, seed + count):
        study = generate_study(study_seed, kinds, lesions, transfer_syntax)
        folders.append(write_study(study, out_dir))
    return folders


def write_study(study: PhantomStudy, out_dir: Path) -> Path:
    """Write one generated study below ``out_dir``; return its folder."""
    folder = Path(out_dir) / study.folder_name
    current = {info.folder for info, _ in study.series}
    if folder.is_dir():
        # a study written before with other kinds: drop its series folders, so that the
        # folder holds exactly what ground_truth.json describes
        for child in folder.iterdir():
            if child.is_dir() and child.name not in current and _SERIES_FOLDER.fullmatch(child.name):
                shutil.rmtree(child)
    for info, datasets in study.series:
        series_folder = folder / info.folder
        series_folder.mkdir(parents=True, exist_ok=True)
        for stale in series_folder.glob("*.dcm"):
            stale.unlink()
        for index, dataset in enumerate(datasets):
            dataset.save_as(series_folder / f"{index + 1:04d}.dcm", enforce_file_format=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / GROUND_TRUTH_FILE).write_text(json.dumps(study.ground_truth, indent=2) + "\n")
    np.savez_compressed(folder / MASK_FILE, **study.masks)
    return folder


# ---------------------------------------------------------------------------------- helpers
def phantom_study_folders(data: Path, *, required: bool = False) -> list[Path]:
    """The phantom study folders at or below ``data`` (each holds a ``ground_truth.json``), in
    path order; ``required``: none is an error. ``os.walk`` rather than ``Path.glob`` because it
    follows symbolic links, so a data set can be assembled from links to studies written elsewhere."""
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"{data} is not a folder of phantom studies (write some with sijnode phantom)")
    folders = sorted(Path(root) for root, _, files in os.walk(data, followlinks=True) if GROUND_TRUTH_FILE in files)
    if required and not folders:
        raise FileNotFoundError(f"{data}: no phantom studies ({GROUND_TRUTH_FILE} in sub-folders); write some with sijnode phantom")
    return folders


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = [part.strip() for part in kinds.split(",") if part.strip()]
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    return tuple(kind for kind in KINDS if kind in kinds)


def _slices_with(mask_bits: np.ndarray, bit: int, pixel_area: float) -> list[int]:
    """Slice indices where the lesion with ``bit`` covers at least LESION_MIN_AREA_MM2."""
    counts = ((mask_bits >> bit) & 1).reshape(mask_bits.shape[0], -1).sum(axis=1)
    return [int(i) for i in np.flatnonzero(counts * pixel_area >= LESION_MIN_AREA_MM2)]


def _stir_edema_coverage(model: PhantomModel, mri_plans: list[SeriesPlan], rendered: list[RenderedSeries]) -> list[list[int]]:
    """STIR slice coverage of each edema lesion (sampled if the MRI was not rendered)."""
    edema = [lesion for lesion in model.lesions if lesion.type == "edema"]
    if not edema:
        return []
    stir = next((item for item in rendered if item.plan.role == "STIR"), None)
    geometry: SliceGeometry = next(plan for plan in mri_plans if plan.role == "STIR").geometry  # type: ignore[assignment]
    if stir is not None:
        bits = stir.masks["lesions"]
    else:
        bits = np.stack([model.compose_slice(geometry, k).lesion_bits for k in range(geometry.n_slices)])
        bits = bits.reshape(geometry.shape)
    area = geometry.pixel_spacing[0] * geometry.pixel_spacing[1]
    return [_slices_with(bits, lesion.bit, area) for lesion in edema]


def _lesion_record(model: PhantomModel, lesion: PlacedLesion, rendered: list[RenderedSeries]) -> dict:
    center = lesion_center_lps(model, lesion)
    record: dict = {
        "id": lesion.id,
        "type": lesion.type,
        "side": lesion.side,
        "quadrant": lesion.quadrant,
        "region": lesion.region,
        "quadrants": lesion.quadrants,
        "severity": lesion.severity,
        "mask_bit": lesion.bit,
        "center_lps_mm": [round(float(v), 2) for v in center],
        "visible_on": list(_VISIBLE_ON[lesion.type]),
    }
    if lesion.radii_mvw is not None:
        r_m, r_v, r_w = lesion.radii_mvw
        record["size_mm"] = {
            "depth_from_joint": round(2 * r_m, 2),
            "along_joint": round(2 * r_v, 2),
            "across_joint": round(2 * r_w, 2),
        }
    if lesion.target_width_mm is not None:
        record["joint_width_mm"] = round(lesion.target_width_mm, 2)
    if lesion.type == "ankylosis":
        record["extent"] = "total" if lesion.region == "whole" else "partial"
    slices: dict[str, list[int]] = {}
    for item in rendered:
        geometry = item.plan.geometry
        bits = item.masks["lesions"]
        if isinstance(geometry, SliceGeometry):
            area = geometry.pixel_spacing[0] * geometry.pixel_spacing[1]
            slices[item.plan.role] = _slices_with(bits, lesion.bit, area)
        elif isinstance(geometry, ProjectionGeometry):
            hit = ((bits >> lesion.bit) & 1).astype(bool)
            rows, cols = np.nonzero(hit)
            projected = geometry.project(center)
            record["xr"] = {
                "pixels": int(hit.sum()),
                "bbox_rc": [int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())] if rows.size else None,
                "center_rc": [round(float(projected[0]), 1), round(float(projected[1]), 1)],
                "visible": "XR" in _VISIBLE_ON[lesion.type],
            }
    record["slices"] = slices
    return record


def _anatomy_record(model: PhantomModel) -> dict:
    joint_center = model.joint_center_lps
    return {
        "parameters": model.anatomy.to_json(),
        "joint_center_lps_mm": [round(float(v), 2) for v in joint_center],
        "sacral_axis_lps": [round(float(v), 4) for v in model.sacral_axis_lps],
        "left_joint_center_lps_mm": [round(float(v), 2) for v in _joint_point(model, "left")],
        "right_joint_center_lps_mm": [round(float(v), 2) for v in _joint_point(model, "right")],
    }


def _joint_point(model: PhantomModel, side: str) -> np.ndarray:
    v = model.joint_mid
    w = float(model.mid_surface(v))
    width = float(model.cleft_width(side, np.array([v], dtype=np.float32))[0])
    u = SIDE_SIGN[side] * (float(model.half_width(v)) + 0.5 * width * model.m_norm)
    return model.sacrum_to_lps(u, v, w)


def _series_record(item: RenderedSeries, entry: PhantomSeries) -> dict:
    plan = item.plan
    info, datasets = entry
    first = datasets[0]
    record = {
        "role": info.role,
        "plane": info.plane,
        "tilt_deg": info.tilt_deg,
        "modality": info.modality,
        "description": info.description,
        "series_number": info.series_number,
        "series_uid": info.series_uid,
        "folder": info.folder,
        "n_images": len(datasets),
        "vendor": plan.vendor.name,
        "manufacturer": str(first.Manufacturer),
        "model": str(first.ManufacturerModelName),
        "rows": int(first.Rows),
        "columns": int(first.Columns),
        "sop_instance_uids": [str(ds.SOPInstanceUID) for ds in datasets],
        "masks": sorted(f"{plan.role}_{name}" for name in item.masks),
    }
    geometry = plan.geometry
    if isinstance(geometry, SliceGeometry):
        record.update(
            {
                "frame_of_reference_uid": str(first.FrameOfReferenceUID),
                "pixel_spacing": [float(v) for v in geometry.pixel_spacing],
                "slice_thickness": geometry.slice_thickness,
                "spacing_between_slices": geometry.spacing_between_slices,
                "image_orientation_patient": geometry.image_orientation,
                "slice_normal": [round(float(v), 6) for v in geometry.normal],
            }
        )
        for key in ("RepetitionTime", "EchoTime", "InversionTime"):
            if key in plan.acquisition:
                record[key] = plan.acquisition[key]
    else:
        record.update(
            {
                "imager_pixel_spacing": geometry.imager_pixel_spacing,
                "patient_orientation": ["L", "F"],
                "view_position": "AP",
                "source_lps_mm": [round(float(v), 2) for v in geometry.source],
                "detector_y_lps_mm": round(geometry.detector_y, 2),
                "detector_center_xz_mm": [round(float(v), 2) for v in geometry.detector_center],
                "magnification_at_joints": plan.acquisition["magnification"],
            }
        )
    return record


def _mask_legend(masks: dict[str, np.ndarray]) -> dict:
    return {
        "file": MASK_FILE,
        "arrays": {name: {"shape": list(mask.shape), "dtype": str(mask.dtype)} for name, mask in sorted(masks.items())},
        "anatomy_labels": ANATOMY_LABELS,
        "joint_line_labels": JOINT_LINE_LABELS,
        "lesions": "bit field: bit i set where the lesion with mask_bit i is",
        "radiograph": f"XR_<{'|'.join(OCCUPANCY)}>: boolean, the ray passes through >= 0.5 mm of the structure",
        "layout": "slice series (slices, rows, columns) in file order; radiograph (rows, columns)",
    }
