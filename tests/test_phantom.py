"""Tests of the synthetic sacroiliac-joint phantom generator (pipeline.phantom).

The expensive studies are generated once per module; everything else reads them.
Laterality is checked the way a radiologist's viewer would find it: the lesion is
located in the image (study with the lesion minus the same seed without it) and its
side is read from the DICOM geometry only -- never from the generator's internals.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLSLossless

from pipeline.phantom import (
    ANATOMY_LABELS,
    GENERATOR_VERSION,
    KINDS,
    LESION_TYPES,
    QUADRANTS,
    generate_study,
    write_studies,
    write_study,
)
from pipeline.phantom.anatomy import PhantomModel, sample_anatomy
from pipeline.phantom.dicom import (
    encode,
    resolve_transfer_syntax,
    series_datasets,
    study_identity,
)
from pipeline.phantom.labels import (
    asas_positive,
    mny_grade_for_side,
    radiographic_sacroiliitis,
)
from pipeline.phantom.lesions import LesionSpec, place_lesions, resolve_lesion_specs
from pipeline.phantom.mri import plan_mri
from pipeline.phantom.series import RenderedSeries
from pipeline.phantom.vendors import VENDORS
from tests.dicom3tools import dciodvfy_errors
from tests.phantom_helpers import (
    lps_of_pixel,
    radiograph_side_of_column,
    stack,
    values,
)

LATERALITY_SEED = 13  # GE; a seed with a light CT (38 slices) keeps the module fast
EDEMA_SEED = 4  # Siemens
EDEMA_SPEC = {
    "lesions": [
        {"type": "edema", "side": "left", "quadrant": "upper_ilium", "severity": "severe", "size_mm": 16},
        {"type": "fat", "side": "right", "quadrant": "lower_sacrum", "size_mm": 14},
    ]
}


def _sclerosis(side: str) -> dict:
    return {"lesions": [{"type": "sclerosis", "side": side, "quadrant": "upper_ilium", "severity": "severe", "size_mm": 18}]}


@pytest.fixture(scope="module")
def sclerotic():
    """The laterality seed with a severe sclerosis in the upper ilium of the left, then the right side."""
    return {side: generate_study(LATERALITY_SEED, lesions=_sclerosis(side)) for side in ("left", "right")}


@pytest.fixture(scope="module")
def edema_mri():
    """MRI only: a severe edema in the left upper ilium and a fat lesion in the right lower sacrum."""
    return generate_study(EDEMA_SEED, kinds=("mri",), lesions=EDEMA_SPEC)


@pytest.fixture(scope="module")
def written_left(sclerotic, tmp_path_factory):
    return write_study(sclerotic["left"], tmp_path_factory.mktemp("phantom"))


def _series(study, role):
    return next(datasets for info, datasets in study.series if info.role == role)


# ---------------------------------------------------------------------------------- laterality
@pytest.mark.parametrize("side", ["left", "right"])
def test_lesion_side_as_a_viewer_reads_it_in_every_plane_and_the_radiograph(sclerotic, side):
    """Same seed, sclerosis on the left minus sclerosis on the right: the only differences
    are the two lesions.  Sclerosis is dense on CT and the radiograph and dark on MRI, so
    the left lesion is where that difference is most positive (CT, XR) or most negative
    (MRI), the right lesion the opposite.  Its side is then read from the headers alone."""
    study = sclerotic[side]
    lesion = study.ground_truth["lesions"][0]
    midline_x = study.ground_truth["anatomy"]["joint_center_lps_mm"][0]
    pairs = zip(sclerotic["left"].series, sclerotic["right"].series)
    for (info, left_datasets), (_, right_datasets) in pairs:
        difference = stack(left_datasets) - stack(right_datasets)
        denser_on_left = info.role in ("CT", "XR")
        pick = np.argmax if denser_on_left == (side == "left") else np.argmin
        slice_index, row, column = np.unravel_index(pick(difference), difference.shape)
        datasets = study.series[[i.role for i, _ in study.series].index(info.role)].datasets
        if info.role == "XR":
            seen = radiograph_side_of_column(datasets[0], column)
            assert seen == side, f"XR: lesion at column {column} of {datasets[0].Columns} read as {seen}"
            _, cols = np.nonzero((study.masks["XR_lesions"] >> lesion["mask_bit"]) & 1)
            assert abs(np.median(cols) - column) < 150, "radiograph mask and image disagree"
            continue
        position = lps_of_pixel(datasets[slice_index], row, column)
        seen = "left" if position[0] > midline_x else "right"  # +x is the patient's left in LPS
        assert seen == side, f"{info.role}: lesion found at LPS {position} read as {seen}"
        assert (position[0] > 0) == (side == "left")
        assert np.linalg.norm(position - np.asarray(lesion["center_lps_mm"])) < 25.0, info.role


@pytest.mark.parametrize("side", ["left", "right"])
def test_ground_truth_masks_sit_on_the_named_side(sclerotic, side):
    study = sclerotic[side]
    bit = study.ground_truth["lesions"][0]["mask_bit"]
    for info, datasets in study.series:
        if info.role == "XR":
            continue
        lesion = (study.masks[f"{info.role}_lesions"] >> bit) & 1
        anatomy = study.masks[f"{info.role}_anatomy"]
        k, r, c = (round(float(np.median(axis))) for axis in np.nonzero(lesion))
        assert anatomy[k, r, c] == ANATOMY_LABELS[f"{side}_ilium"], info.role
        assert (lps_of_pixel(datasets[k], r, c)[0] > 0) == (side == "left"), info.role


def test_anatomy_masks_left_ilium_is_on_the_patients_left(sclerotic):
    study = sclerotic["left"]  # a lesion does not change the anatomy labels
    for info, datasets in study.series:
        if info.role == "XR":
            mean_column = {
                name: np.nonzero(study.masks[f"XR_{name}"])[1].mean() for name in ("left_ilium", "sacrum", "right_ilium")
            }
            assert str(datasets[0].PatientOrientation[0]) == "L"
            assert mean_column["left_ilium"] > mean_column["sacrum"] > mean_column["right_ilium"]
            continue
        anatomy = study.masks[f"{info.role}_anatomy"]
        k = anatomy.shape[0] // 2
        mean_x = {}
        for name in ("left_ilium", "sacrum", "right_ilium"):
            rows, cols = np.nonzero(anatomy[k] == ANATOMY_LABELS[name])
            mean_x[name] = lps_of_pixel(datasets[k], rows.mean(), cols.mean())[0]
        assert mean_x["left_ilium"] > mean_x["sacrum"] > mean_x["right_ilium"], info.role


# ---------------------------------------------------------------------------------- geometry and headers
def test_series_geometry_matches_headers_and_protocols(sclerotic):
    study = sclerotic["right"]
    roles = [info.role for info, _ in study.series]
    assert sorted(roles) == ["CT", "STIR", "T1", "T2FS", "XR"]
    study_uids = {ds.StudyInstanceUID for _, datasets in study.series for ds in datasets}
    assert study_uids == {study.study_uid}
    instance_uids = [ds.SOPInstanceUID for _, datasets in study.series for ds in datasets]
    assert len(set(instance_uids)) == len(instance_uids)
    assert len({info.series_uid for info, _ in study.series}) == len(roles)
    mr_frames = {ds.FrameOfReferenceUID for info, datasets in study.series if info.modality == "MR" for ds in datasets}
    assert len(mr_frames) == 1, "all MR series of a study share one frame of reference"
    records = {record["role"]: record for record in study.ground_truth["series"]}
    for info, datasets in study.series:
        first = datasets[0]
        assert first.pixel_array.shape == (first.Rows, first.Columns)
        assert records[info.role]["plane"] == info.plane
        if info.role == "XR":
            assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
            assert 2000 <= max(first.Rows, first.Columns) <= 3000
            assert 0.14 <= float(first.ImagerPixelSpacing[0]) <= 0.2
            assert first.ViewPosition == "AP" and list(first.PatientOrientation) == ["L", "F"]
            continue
        orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for ds in datasets])
        steps = np.diff(positions @ normal)
        assert np.allclose(np.abs(steps), float(first.SpacingBetweenSlices), atol=1e-3), info.role
        assert np.allclose(steps, steps[0], atol=1e-3), "slices evenly spaced, one direction"
        in_plane = np.diff(positions, axis=0) - np.outer(np.diff(positions @ normal), normal)
        assert np.abs(in_plane).max() < 1e-3, "slices stacked along their normal"
        assert float(first.SliceThickness) <= float(first.SpacingBetweenSlices) + 1e-6
        assert [ds.InstanceNumber for ds in datasets] == list(range(1, len(datasets) + 1))
        tilt = np.degrees(np.arccos(abs(normal[1]))) if info.plane == "coronal" else np.degrees(np.arccos(abs(normal[2])))
        assert tilt == pytest.approx(records[info.role]["tilt_deg"], abs=0.01)
        if info.role in ("T1", "STIR"):
            assert info.plane == "coronal" and 15 <= len(datasets) <= 20
            assert 3.0 <= float(first.SliceThickness) <= 4.0
            assert 20.0 <= info.tilt_deg <= 55.0, "semicoronal: tilted along the sacrum"
        if info.role == "T2FS":
            assert info.plane == "axial" and 25 <= len(datasets) <= 60
            assert 3.0 <= float(first.SliceThickness) <= 3.5
        if info.role == "CT":
            assert 1.0 <= float(first.SliceThickness) <= 3.0 and first.RescaleIntercept == -1024
    t1 = [tuple(ds.ImagePositionPatient) for ds in _series(study, "T1")]
    stir = [tuple(ds.ImagePositionPatient) for ds in _series(study, "STIR")]
    stir_ds, t1_ds = _series(study, "STIR")[0], _series(study, "T1")[0]
    if (stir_ds.Rows, stir_ds.Columns) == (t1_ds.Rows, t1_ds.Columns):
        assert t1 == stir


def test_ct_is_in_hounsfield_units(sclerotic):
    datasets = _series(sclerotic["right"], "CT")
    anatomy = sclerotic["right"].masks["CT_anatomy"]
    hu = stack(datasets) * float(datasets[0].RescaleSlope) + float(datasets[0].RescaleIntercept)
    assert np.median(hu[anatomy == ANATOMY_LABELS["background"]]) < -900
    assert -150 < np.median(hu[anatomy == ANATOMY_LABELS["fat"]]) < -50
    assert 20 < np.median(hu[anatomy == ANATOMY_LABELS["soft_tissue"]]) < 90
    assert np.percentile(hu[anatomy == ANATOMY_LABELS["sacrum"]], 95) > 700


def test_vendor_naming_rotates_and_validates(tmp_path):
    """Headers of every vendor's MR series (small stand-in pixels: only headers are checked here)."""
    seen = []
    for seed, vendor in enumerate(VENDORS):
        model = PhantomModel(sample_anatomy(seed), [], seed)
        identity = study_identity(seed, f"test|{seed}")
        for plan in plan_mri(model, vendor, seed):
            pixels = np.full((2, plan.geometry.rows, plan.geometry.columns), 100, dtype=np.uint16)
            datasets = series_datasets(RenderedSeries(plan, pixels, {}, (100.0, 200.0)), identity)
            ds = datasets[0]
            seen.append((vendor.name, plan.role, str(ds.SeriesDescription)))
            assert ds.Manufacturer == vendor.manufacturer
            assert ds.SeriesDescription == vendor.mr[plan.role].description
            assert ds.ImageType[0] == "ORIGINAL"
            if plan.role == "STIR":
                assert "IR" in values(ds, "ScanningSequence") and 100 <= float(ds.InversionTime) <= 250
            if plan.role == "T2FS":
                assert {"FS", "SFS"} & set(values(ds, "ScanOptions"))
            path = tmp_path / f"{vendor.name}_{plan.role}.dcm"
            ds.save_as(path, enforce_file_format=True)
            errors = dciodvfy_errors(path)
            assert not errors, (vendor.name, plan.role, errors)
    assert ("Siemens", "T2FS", "t2_tse_tra_fs") in seen and ("GE", "STIR", "Cor STIR") in seen
    assert ("Philips", "T2FS", "T2W_TSE_SPAIR_TRA") in seen and ("Canon", "T1", "T1 FSE COR") in seen


def test_synthetic_identity(sclerotic):
    ds = sclerotic["left"].series[0].datasets[0]
    assert str(ds.PatientName) == f"PHANTOM^SIJ-{LATERALITY_SEED:04d}"
    assert ds.PatientID == f"SYNTH-{LATERALITY_SEED:04d}"
    assert "SYNTHETIC" in ds.StudyDescription.upper()


# ---------------------------------------------------------------------------------- DICOM validity
def test_every_kind_passes_dciodvfy(written_left):
    for series_folder in sorted(path for path in written_left.iterdir() if path.is_dir()):
        errors = dciodvfy_errors(series_folder / "0001.dcm")
        assert not errors, (series_folder.name, errors)


@pytest.mark.parametrize("syntax", ["rle", "jpeg-ls", "jpeg2000"])
def test_compressed_transfer_syntaxes_are_lossless_and_valid(sclerotic, tmp_path, syntax):
    for info, datasets in sclerotic["left"].series:
        dataset = copy.deepcopy(datasets[len(datasets) // 2])
        original = dataset.pixel_array.copy()
        encode(dataset, resolve_transfer_syntax(syntax))
        path = tmp_path / f"{info.role}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        reread = pydicom.dcmread(path)
        assert reread.file_meta.TransferSyntaxUID == resolve_transfer_syntax(syntax)
        assert np.array_equal(reread.pixel_array, original), info.role
        assert reread.SOPInstanceUID == dataset.SOPInstanceUID, "lossless recoding keeps the instance"
        errors = dciodvfy_errors(path)
        assert not errors, (syntax, info.role, errors)


# ---------------------------------------------------------------------------------- determinism and files
def test_same_seed_same_pixels_and_uids_whatever_else_is_generated(sclerotic):
    reference = sclerotic["left"]
    again = generate_study(LATERALITY_SEED, kinds=("mri",), lesions=_sclerosis("left"))
    assert [info.role for info, _ in again.series] == ["T1", "STIR", "T2FS"]
    for info, datasets in again.series:
        expected = _series(reference, info.role)
        assert [ds.SOPInstanceUID for ds in datasets] == [ds.SOPInstanceUID for ds in expected]
        assert all(a.PixelData == b.PixelData for a, b in zip(datasets, expected)), info.role
        for mask in ("anatomy", "joint_line", "lesions"):
            assert np.array_equal(again.masks[f"{info.role}_{mask}"], reference.masks[f"{info.role}_{mask}"])
    assert again.study_uid == reference.study_uid
    (lesion,), (expected_lesion,) = again.ground_truth["lesions"], reference.ground_truth["lesions"]
    assert lesion["slices"] == {role: expected_lesion["slices"][role] for role in ("T1", "STIR", "T2FS")}
    assert lesion["center_lps_mm"] == expected_lesion["center_lps_mm"]
    assert sclerotic["right"].study_uid != reference.study_uid, "different content never reuses UIDs"


def test_healthy_study_has_no_lesions():
    healthy = generate_study(EDEMA_SEED + 2, kinds=("mri",), lesions="none")
    truth = healthy.ground_truth
    assert truth["labels"]["healthy"] and not truth["lesions"]
    assert not any(truth["labels"][name] for name in ("active_inflammation", "asas_mri_positive", "structural_change"))
    assert truth["mny_grade"] == {"left": 0, "right": 0}
    assert all(not mask.any() for name, mask in healthy.masks.items() if name.endswith("_lesions"))


def test_write_studies_with_spec_file_and_compression(edema_mri, tmp_path):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(EDEMA_SPEC))
    stale = tmp_path / "out" / f"SYNTH-{EDEMA_SEED:04d}" / "010_CT"  # as if written before with CT
    stale.mkdir(parents=True)
    (stale / "0001.dcm").write_bytes(b"stale")
    folders = write_studies(tmp_path / "out", seed=EDEMA_SEED, count=2, kinds=("mri",), lesions=spec_path, transfer_syntax="jpeg-ls")
    assert [folder.name for folder in folders] == [f"SYNTH-{EDEMA_SEED:04d}", f"SYNTH-{EDEMA_SEED + 1:04d}"]
    assert not stale.exists(), "series folders of an earlier write are removed"
    truth = json.loads((folders[0] / "ground_truth.json").read_text())
    assert truth["generator_version"] == GENERATOR_VERSION and truth["seed"] == EDEMA_SEED
    assert [(l["type"], l["side"], l["quadrant"]) for l in truth["lesions"]] == [
        ("edema", "left", "upper_ilium"),
        ("fat", "right", "lower_sacrum"),
    ]
    masks = np.load(folders[0] / "masks.npz")
    for record in truth["series"]:
        files = sorted((folders[0] / record["folder"]).glob("*.dcm"))
        assert len(files) == record["n_images"]
        datasets = [pydicom.dcmread(path) for path in files]
        assert datasets[0].file_meta.TransferSyntaxUID == JPEGLSLossless
        assert masks[f"{record['role']}_anatomy"].shape == (len(files), datasets[0].Rows, datasets[0].Columns)
        assert [str(ds.SOPInstanceUID) for ds in datasets] == record["sop_instance_uids"]
        pixels = stack(datasets)
        reference = stack(_series(edema_mri, record["role"]))
        assert np.array_equal(pixels, reference), "written, compressed and read back: the same pixels"
        lesion_bits = masks[f"{record['role']}_lesions"]
        for lesion in truth["lesions"]:
            inside = ((lesion_bits >> lesion["mask_bit"]) & 1).astype(bool)
            assert set(np.nonzero(inside)[0].tolist()) >= set(lesion["slices"][record["role"]])
            _check_signal(record["role"], lesion["type"], pixels, inside, masks[f"{record['role']}_anatomy"])
    in_memory = dict(edema_mri.ground_truth, transfer_syntax=truth["transfer_syntax"])
    assert json.loads(json.dumps(in_memory)) == truth


def _check_signal(role: str, kind: str, pixels: np.ndarray, inside: np.ndarray, anatomy: np.ndarray) -> None:
    """Edema: bright on STIR/T2FS, dark on T1; fat: bright on T1, dark on STIR/T2FS (vs. normal marrow)."""
    marrow = np.isin(anatomy, [ANATOMY_LABELS["sacrum"], ANATOMY_LABELS["left_ilium"], ANATOMY_LABELS["right_ilium"]])
    normal = np.median(pixels[marrow & ~inside])
    lesion = np.median(pixels[inside])
    brighter = {("edema", "T1"): False, ("edema", "STIR"): True, ("edema", "T2FS"): True,
                ("fat", "T1"): True, ("fat", "STIR"): False, ("fat", "T2FS"): False}[(kind, role)]
    assert (lesion > normal) == brighter, (kind, role, lesion, normal)


# ---------------------------------------------------------------------------------- labels and SPEC
def _lesion(kind: str, side: str = "left", severity: str = "moderate", region: str = "upper", quadrant: str | None = "upper_ilium"):
    return LesionSpec(kind, side, quadrant if kind in ("edema", "erosion", "sclerosis", "fat") else None, region, severity)


def test_modified_new_york_grades():
    assert mny_grade_for_side([], "left") == 0
    assert mny_grade_for_side([_lesion("edema"), _lesion("fat")], "left") == 0
    assert mny_grade_for_side([_lesion("erosion", severity="mild")], "left") == 1
    assert mny_grade_for_side([_lesion("erosion"), _lesion("sclerosis")], "left") == 2
    assert mny_grade_for_side([_lesion("erosion")] * 3, "left") == 3
    assert mny_grade_for_side([_lesion("narrowing", region="whole")], "left") == 3
    assert mny_grade_for_side([_lesion("ankylosis", region="lower")], "left") == 3
    assert mny_grade_for_side([_lesion("ankylosis", region="whole")], "left") == 4
    assert mny_grade_for_side([_lesion("ankylosis", side="right", region="whole")], "left") == 0
    assert radiographic_sacroiliitis({"left": 2, "right": 2})
    assert radiographic_sacroiliitis({"left": 3, "right": 0})
    assert not radiographic_sacroiliitis({"left": 2, "right": 1})


def test_asas_mri_definition():
    assert asas_positive([[4, 5]])  # one lesion on two consecutive slices
    assert asas_positive([[4], [4]])  # two lesions on one slice
    assert not asas_positive([[4], [6]])
    assert not asas_positive([[3, 5]])
    assert not asas_positive([])


def test_spec_grade_is_filled_in_and_checked():
    specs, normalised = resolve_lesion_specs(11, {"mny_grade": {"left": 4, "right": 2}})
    assert mny_grade_for_side(specs, "left") == 4 and mny_grade_for_side(specs, "right") == 2
    assert normalised["mny_grade"] == {"left": 4, "right": 2}
    with pytest.raises(ValueError, match="grade"):
        resolve_lesion_specs(11, {"lesions": [{"type": "erosion", "side": "left", "quadrant": "upper_ilium"}], "mny_grade": {"left": 4}})
    for bad in (
        {"lesions": [{"type": "cyst", "side": "left", "quadrant": "upper_ilium"}]},
        {"lesions": [{"type": "edema", "side": "middle", "quadrant": "upper_ilium"}]},
        {"lesions": [{"type": "edema", "side": "left"}]},
        {"lesions": [{"type": "edema", "side": "left", "quadrant": "upper_ilium", "colour": "red"}]},
        {"lesions": [{"type": "narrowing", "side": "left"}, {"type": "widening", "side": "left"}]},
        {"mny_grade": {"left": 5}},
    ):
        with pytest.raises(ValueError):
            resolve_lesion_specs(0, bad)


def test_random_lesions_cover_healthy_and_diseased():
    labels = [resolve_lesion_specs(seed, "random")[0] for seed in range(40)]
    assert any(not specs for specs in labels), "some random studies are healthy"
    kinds = {spec.type for specs in labels for spec in specs}
    assert kinds == set(LESION_TYPES)
    assert {spec.quadrant for specs in labels for spec in specs if spec.quadrant} == set(QUADRANTS)


def test_ground_truth_labels_follow_the_lesions(sclerotic):
    truth = sclerotic["left"].ground_truth
    assert truth["mny_grade"] == {"left": 2, "right": 0}
    assert truth["labels"]["structural_change"] and not truth["labels"]["active_inflammation"]
    assert not truth["labels"]["radiographic_sacroiliitis"] and not truth["labels"]["asas_mri_positive"]
    assert truth["quadrant_findings"]["left"]["upper_ilium"] == ["sclerosis"]
    lesion = truth["lesions"][0]
    assert lesion["xr"]["pixels"] > 0 and lesion["xr"]["visible"]
    assert all(lesion["slices"][role] for role in ("T1", "STIR", "T2FS", "CT"))
    json.dumps(truth)  # JSON-able as stored
    assert set(truth["kinds"]) == set(KINDS)


def test_asas_label_from_rendered_stir(edema_mri):
    """The ASAS label follows the STIR slices of the edema, and is the same when no MRI is rendered."""
    truth = edema_mri.ground_truth
    stir_slices = truth["lesions"][0]["slices"]["STIR"]
    assert len(stir_slices) >= 2 and truth["labels"]["asas_mri_positive"]
    assert truth["labels"]["asas_mri_positive"] == asas_positive([stir_slices])
    assert truth["labels"]["active_inflammation"] and truth["labels"]["structural_change"]
    without_mri = generate_study(EDEMA_SEED, kinds=("xr",), lesions=EDEMA_SPEC).ground_truth
    assert without_mri["labels"] == truth["labels"]
    assert without_mri["lesions"][0]["xr"]["visible"] is False


# ---------------------------------------------------------------------------------- internals
def test_bone_culling_never_changes_the_result():
    seed = 6
    model = PhantomModel(sample_anatomy(seed), [], seed)
    specs = [LesionSpec("erosion", "left", "upper_ilium", "upper", "severe", 6.0), LesionSpec("widening", "right", None, "lower")]
    place_lesions(model, specs, seed)
    reference = PhantomModel(model.anatomy, model.lesions, seed)
    reference.culling = False
    for plan in plan_mri(model, VENDORS[seed % 4], seed):
        for index in (0, plan.geometry.n_slices // 2):
            fast, full = model.compose_slice(plan.geometry, index), reference.compose_slice(plan.geometry, index)
            assert np.abs(fast.fractions - full.fractions).max() < 1e-4
            assert np.array_equal(fast.labels, full.labels) and np.array_equal(fast.lesion_bits, full.lesion_bits)
