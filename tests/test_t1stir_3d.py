"""t1stir-3d: the published module trees, preprocessing, Grad-CAM per sequence, the importer, the chain.

The full-size networks are built on the meta device (names, shapes and counts without memory or
compute); forward passes use narrow versions of the same trees. bench/t1stir_3d runs the full size.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.chains.t1stir_3d.importer import WeightsImportError, import_spa_models
from pipeline.chains.t1stir_3d.inference import (
    TASKS,
    GradCAMExplainer,
    build_networks,
    classifier_input,
    load_networks,
    on_source_slice,
    slice_points,
)
from pipeline.chains.t1stir_3d.model import (
    PUBLISHED_CLASSIFIER,
    PUBLISHED_CLASSIFIER_PARAMETERS,
    PUBLISHED_DENOISER,
    PUBLISHED_DENOISER_PARAMETERS,
    SEQUENCES,
    build_classifier,
    build_denoiser,
)
from pipeline.chains.t1stir_3d.preprocess import (
    PUBLISHED_PREPROCESSING,
    ClipUpperQuantile,
    N4BiasFieldCorrection,
    NoOverlapError,
    SemicoronalGrid,
    classifier_field,
    classifier_transform,
    prepare_pair,
    volume_from_datasets,
)
from pipeline.packs import load_pack
from pipeline.phantom import generate_study
from pipeline.training import count_parameters

TINY_CLASSIFIER = {"stem_channels": 8, "planes": [4, 8, 8, 16], "blocks": [1, 2, 1, 1], "head_hidden": 16}
TINY_DENOISER = {"stem_channels": 4, "planes": [4, 8, 8, 8], "blocks": [1, 1, 1, 1]}
TINY_PREPROCESSING = {
    "recipe": "bressem2022-t1stir-v1",
    "grid_size": [12, 48, 48],
    "grid_spacing_mm": [3.5, 4.0, 4.0],
    "clip_upper_quantile": 0.99,
    "n4": {"levels": 2, "iterations": 5, "shrink": 2},
    "classifier_size": [8, 40, 40],
    "min_overlap": 0.5,
}
STUDY_SEED = 4242


@pytest.fixture(scope="module")
def study():
    """One phantom MRI study (semicoronal T1 and STIR), shared by the tests of this module."""
    generated = generate_study(STUDY_SEED, kinds=("mri",), lesions="random")
    return {info.role: datasets for info, datasets in generated.series if info.role in SEQUENCES}


def _meta(builder, hyperparameters):  # noqa: ANN001, ANN202
    with torch.device("meta"):
        return builder(hyperparameters)


def test_published_classifier_is_the_faimed3d_resnet101_tree_with_spa_head() -> None:
    model = _meta(build_classifier, PUBLISHED_CLASSIFIER)
    assert count_parameters(model) == PUBLISHED_CLASSIFIER_PARAMETERS
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # stem: Conv3d 1→128, kernel 2×5×5, no bias, BN, ReLU, and no max-pool
    assert shapes["body.0.0.0.weight"] == (128, 1, 2, 5, 5)
    assert "body.0.0.0.bias" not in shapes
    stem_conv = model.body[0][0][0]
    assert (stem_conv.stride, stem_conv.padding) == ((1, 3, 3), (1, 1, 1))
    assert [type(m).__name__ for m in model.body[0][0]] == ["Conv3d", "BatchNorm3d", "ReLU"]
    # bottleneck stages 3/4/23/3, the first from 128 channels
    blocks = [len({k.split(".")[3] for k in shapes if k.startswith(f"body.0.{stage}.")}) for stage in (1, 2, 3, 4)]
    assert blocks == [3, 4, 23, 3]
    assert shapes["body.0.1.0.conv1.weight"] == (64, 128, 1, 1, 1)
    assert shapes["body.0.1.0.downsample.0.weight"] == (256, 128, 1, 1, 1)
    assert shapes["body.0.4.2.conv3.weight"] == (2048, 512, 1, 1, 1)
    assert type(model.body[1]).__name__ == "AdaptiveMaxPool3d"
    # head: concat pool, BN(4096), Dropout .25, Linear 4096→512 no bias, ReLU, BN(512), Dropout .5, Linear 512→2 no bias
    head_keys = sorted(k for k in shapes if k.startswith("head."))
    assert head_keys == sorted(
        [f"head.1.1.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
        + ["head.1.3.weight"]
        + [f"head.1.5.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
        + ["head.1.7.weight"]
    )
    assert shapes["head.1.1.weight"] == (4096,) and shapes["head.1.3.weight"] == (512, 4096) and shapes["head.1.7.weight"] == (2, 512)
    assert [type(m).__name__ for m in model.head[1]] == ["Flatten", "BatchNorm1d", "Dropout", "Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear"]
    assert (model.head[1][2].p, model.head[1][6].p) == (0.25, 0.5)


def test_published_denoiser_is_the_faimed3d_dynamic_unet_tree() -> None:
    model = _meta(build_denoiser, PUBLISHED_DENOISER)
    assert count_parameters(model) == PUBLISHED_DENOISER_PARAMETERS
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["layers.0.0.0.weight"] == (32, 1, 3, 3, 3) and shapes["layers.0.0.0.bias"] == (32,)  # spa's replaced stem
    assert shapes["layers.0.1.0.conv1.weight"] == (64, 32, 3, 3, 3)  # basic blocks from 32 channels
    assert shapes["layers.1.0.0.weight"] == (1024, 512, 3, 3, 3) and shapes["layers.1.1.0.weight"] == (512, 1024, 3, 3, 3)
    assert shapes["layers.2.up.0.0.weight"] == (512, 256, 3, 3, 3)  # ConvTranspose3d(512 → 256)
    assert shapes["layers.2.bn.weight"] == (256,) and shapes["layers.4.conv2.0.weight"] == (128, 128, 3, 3, 3)
    assert shapes["layers.5.0.0.weight"] == (128, 128, 3, 3, 3)
    assert shapes["layers.8.convpath.1.0.weight"] == (129, 129, 3, 3, 3)
    assert shapes["layers.9.0.weight"] == (1, 129, 1, 1, 1)
    assert not any(k.startswith(("layers.6.", "layers.7.")) for k in shapes)  # ResizeToOrig, MergeLayer: no weights


def test_narrow_networks_run_and_keep_shapes() -> None:
    torch.manual_seed(0)
    classifier = build_classifier(TINY_CLASSIFIER).eval()
    denoiser = build_denoiser(TINY_DENOISER).eval()
    with torch.no_grad():
        assert classifier(torch.randn(2, 2, 8, 40, 40)).shape == (2, 2)
        assert denoiser(torch.randn(1, 1, 12, 48, 48)).shape == (1, 1, 12, 48, 48)


def test_sequences_share_the_encoder_and_the_head_is_symmetric_in_them() -> None:
    torch.manual_seed(1)
    model = build_classifier(TINY_CLASSIFIER).eval()
    x = torch.randn(1, 2, 8, 40, 40)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.flip(1)), atol=1e-6)  # concat pool over the two sequences


def _manual_gradcam(model, volumes: torch.Tensor, index: int) -> np.ndarray:  # noqa: ANN001
    """Grad-CAM by hand on sequence ``index``'s own pass: the other sequence's features fixed, layer4 of this pass."""
    fixed = [model.encode(volumes[:, i : i + 1]).detach() for i in range(2)]
    captured = {}
    hook = model.body[0][4].register_forward_hook(lambda module, inputs, output: captured.__setitem__("a", output))
    features = list(fixed)
    features[index] = model.encode(volumes[:, index : index + 1])
    hook.remove()
    activation = captured["a"]
    (gradient,) = torch.autograd.grad(model.classify(features)[0, 1], activation)
    cam = torch.relu((gradient.mean(dim=(2, 3, 4), keepdim=True) * activation).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=volumes.shape[2:], mode="trilinear", align_corners=False)[0, 0]
    return (cam / cam.max()).detach().numpy() if cam.max() > 0 else cam.detach().numpy()


def test_gradcam_taps_each_sequence_on_its_own_pass() -> None:
    torch.manual_seed(2)
    model = build_classifier(TINY_CLASSIFIER).eval()
    volumes = torch.cat([torch.randn(1, 1, 8, 40, 40), torch.randn(1, 1, 8, 40, 40) * 2 + 1], 1)
    maps = GradCAMExplainer(model).maps(volumes)
    assert not any(module.training for module in model.modules())  # Grad-CAM leaves the classifier in eval mode
    assert set(maps) == set(SEQUENCES) and maps["T1"].shape == (8, 40, 40)
    expected = {sequence: _manual_gradcam(model, volumes, index) for index, sequence in enumerate(SEQUENCES)}
    for sequence in SEQUENCES:
        assert np.allclose(maps[sequence], expected[sequence], atol=1e-4), sequence
        assert maps[sequence].min() >= 0 and maps[sequence].max() <= 1
    # the two passes' maps differ, so a hook that saw the other pass would fail the comparison above
    assert not np.allclose(expected["T1"], expected["STIR"], atol=1e-2)


def test_volumes_carry_dicom_geometry_and_the_grid_maps_back_to_source_pixels(study) -> None:
    ordered, image = volume_from_datasets(study["T1"])
    first = ordered[0]
    assert np.allclose(image.GetOrigin(), [float(v) for v in first.ImagePositionPatient])
    assert np.allclose(np.asarray(image.GetDirection()).reshape(3, 3)[:, 0], [float(v) for v in first.ImageOrientationPatient[:3]])
    grid = SemicoronalGrid.centred_on(image, (20, 224, 224), (3.5, 1.0, 1.0))
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    assert np.allclose(grid.voxel_of(centre), [9.5, 111.5, 111.5], atol=1e-6)
    # a map that is 1 in one grid slab lights the source slice through that slab
    cam = np.zeros((20, 224, 224), dtype=np.float32)
    middle = len(ordered) // 2
    slab = int(round(grid.voxel_of(np.asarray([float(v) for v in ordered[middle].ImagePositionPatient]))[0]))
    cam[slab] = 1.0
    assert on_source_slice(cam, grid, ordered[middle], PUBLISHED_PREPROCESSING).max() > 0.5
    assert on_source_slice(cam, grid, ordered[0], PUBLISHED_PREPROCESSING).max() == 0.0


def test_a_classifier_crop_is_the_grid_centre_and_grad_cam_maps_back_through_it(study) -> None:
    settings = {**TINY_PREPROCESSING, "classifier_crop": [32, 24], "classifier_size": [8, 16, 12]}
    assert classifier_field(settings) == ((0, 8, 12), (12, 32, 24))
    assert classifier_field(TINY_PREPROCESSING) == ((0, 0, 0), (12, 48, 48))
    with pytest.raises(ValueError, match="does not fit"):
        classifier_field({**settings, "classifier_crop": [64, 24]})
    # the transform crops the centre, then resizes: a marker outside the crop is gone, one inside stays
    volume = np.zeros((12, 48, 48), dtype=np.float32)
    volume[6, 2, 2] = 1000.0
    assert classifier_transform(settings)(volume).shape == (1, 8, 16, 12)
    assert float(classifier_transform(settings)(volume).abs().max()) == 0.0
    # a marker in the grid, through the classifier's crop and resize as a "map", lands back on the
    # source pixel at the marker's place
    ordered, image = volume_from_datasets(study["T1"])
    grid = SemicoronalGrid.centred_on(image, settings["grid_size"], settings["grid_spacing_mm"])
    middle = ordered[len(ordered) // 2]
    slab = int(round(grid.voxel_of(np.asarray([float(v) for v in middle.ImagePositionPatient]))[0]))
    marker = np.zeros((12, 48, 48), dtype=np.float32)
    marker[slab, 20:24, 15:19] = 1.0  # inside the crop (rows 8-39, columns 12-35)
    cam = classifier_transform({**settings, "classifier_size": [12, 32, 24]})(marker)[0].numpy()
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    on_slice = on_source_slice(cam, grid, middle, settings)
    peak = np.unravel_index(int(np.argmax(on_slice)), on_slice.shape)
    where = grid.voxel_of(slice_points(middle)[peak])
    assert 19.0 <= where[1] <= 25.0 and 14.0 <= where[2] <= 20.0, where


def test_preprocessing_clips_corrects_and_refuses_series_that_do_not_overlap(study) -> None:
    volume = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    clipped = ClipUpperQuantile(0.99)(volume)
    assert clipped.max() == pytest.approx(np.quantile(volume, 0.99)) and clipped.min() == 0
    # N4 flattens a smooth multiplicative bias on a uniform block
    z, y, x = np.mgrid[0:8, 0:32, 0:32]
    biased = (100.0 * np.exp(0.6 * x / 32)).astype(np.float32) + 1.0
    corrected = N4BiasFieldCorrection((3.5, 2.0, 2.0), levels=2, iterations=10)(biased)
    assert corrected.std() / corrected.mean() < 0.5 * biased.std() / biased.mean()
    pair = prepare_pair(study["T1"], study["STIR"], TINY_PREPROCESSING)
    assert pair.overlap > 0.9 and pair.series["STIR"].grid_volume.shape == (12, 48, 48)
    moved = copy.deepcopy(study["STIR"])
    for dataset in moved:
        position = [float(v) for v in dataset.ImagePositionPatient]
        dataset.ImagePositionPatient = [position[0] + 400.0, position[1], position[2]]
    with pytest.raises(NoOverlapError, match="do not overlap"):
        prepare_pair(study["T1"], moved, TINY_PREPROCESSING)


def test_a_pack_without_denoisers_feeds_the_grid_volumes_to_the_classifiers(tmp_path: Path) -> None:
    from pipeline.chains.t1stir_3d.importer import published_manifest
    from pipeline.packs import PackError, write_pack

    architecture = {"classifier": TINY_CLASSIFIER, "denoiser": None}
    networks = build_networks(architecture)
    assert networks.denoisers == {} and not any(k.startswith("denoiser") for k in networks.state_dict())
    volumes = {"T1": np.random.default_rng(0).normal(size=(12, 48, 48)).astype(np.float32), "STIR": np.ones((12, 48, 48), dtype=np.float32)}
    volumes["STIR"][:, :, 24:] = 3.0
    x = classifier_input(volumes, networks.denoisers, TINY_PREPROCESSING)
    for index, sequence in enumerate(SEQUENCES):
        assert torch.allclose(x[0, index : index + 1], classifier_transform(TINY_PREPROCESSING)(volumes[sequence]))
    manifest = published_manifest({}, {}, architecture=architecture, preprocessing=TINY_PREPROCESSING)
    pack = write_pack(tmp_path / "pack", {**manifest, "name": "t1stir-3d-test", "demo": True}, networks.state_dict())
    loaded = load_networks(load_pack(pack.folder, chain="t1stir-3d"))
    assert loaded.denoisers == {} and set(loaded.classifiers) == set(TASKS)
    # denoiser weights in a pack that declares none are refused
    extra = {**networks.state_dict(), **{f"denoiser_t1.{k}": v for k, v in build_denoiser(TINY_DENOISER).state_dict().items()}}
    with pytest.raises(PackError, match="unexpected weights"):
        load_networks(pack, extra)


def _fastai_files(folder: Path, classifier: dict, denoiser: dict, seed: int = 3) -> tuple[dict, dict, dict]:
    """fastai SaveModelCallback files ({'model': state_dict, 'opt': ...}) of networks built from the module tree."""
    torch.manual_seed(seed)
    classifiers, denoisers, networks = {}, {}, {}
    for task in TASKS:
        model = build_classifier(classifier)
        for module in model.modules():  # non-trivial BN statistics, as after training
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm3d)):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
        path = folder / f"both_sequences_{task}_resnet101_3d_denoised_192px.pth"
        torch.save({"model": model.state_dict(), "opt": {"state": {}, "param_groups": [{"lr": 1e-3}]}}, path)
        classifiers[task], networks[task] = path, model.eval()
    for sequence in SEQUENCES:
        model = build_denoiser(denoiser)
        path = folder / f"denoising_unet_resnet18_3d_{sequence}.pth"
        state = {f"module.{k}": v for k, v in model.state_dict().items()} if sequence == "STIR" else model.state_dict()
        torch.save({"model": state, "opt": None} if sequence == "T1" else state, path)
        denoisers[sequence], networks[sequence] = path, model.eval()
    return classifiers, denoisers, networks


def test_import_of_spa_checkpoints_is_bit_exact_and_gives_equal_outputs(tmp_path: Path) -> None:
    architecture = {"classifier": TINY_CLASSIFIER, "denoiser": TINY_DENOISER}
    classifiers, denoisers, networks = _fastai_files(tmp_path, TINY_CLASSIFIER, TINY_DENOISER)
    pack = import_spa_models(classifiers, denoisers, tmp_path / "pack", thresholds={"structural_lesions": 0.4}, architecture=architecture, preprocessing=TINY_PREPROCESSING)
    pack = load_pack(pack.folder, chain="t1stir-3d")
    assert pack.manifest.output("structural_lesions").threshold == 0.4 and pack.manifest.output("active_inflammation").threshold == 0.5
    imported = load_networks(pack)
    for task in TASKS:
        for key, value in networks[task].state_dict().items():
            assert torch.equal(imported.classifiers[task].state_dict()[key], value), key
    for sequence in SEQUENCES:
        for key, value in networks[sequence].state_dict().items():
            assert torch.equal(imported.denoisers[sequence].state_dict()[key], value), key
    x, v = torch.randn(2, 2, 8, 40, 40), torch.randn(1, 1, 12, 48, 48)
    with torch.no_grad():
        for task in TASKS:
            assert torch.equal(imported.classifiers[task](x), networks[task](x))
        for sequence in SEQUENCES:
            assert torch.equal(imported.denoisers[sequence](v), networks[sequence](v))


def test_import_refuses_wrong_keys_shapes_and_dtypes(tmp_path: Path) -> None:
    architecture = {"classifier": TINY_CLASSIFIER, "denoiser": TINY_DENOISER}
    classifiers, denoisers, _ = _fastai_files(tmp_path, TINY_CLASSIFIER, TINY_DENOISER)
    saved = torch.load(classifiers["asas_active_sacroiliitis"], weights_only=True)

    def attempt(state: dict, match: str) -> None:
        torch.save({"model": state}, classifiers["asas_active_sacroiliitis"])
        with pytest.raises(WeightsImportError, match=match):
            import_spa_models(classifiers, denoisers, tmp_path / "bad", architecture=architecture, preprocessing=TINY_PREPROCESSING)
        assert not (tmp_path / "bad").exists()

    state = dict(saved["model"])
    attempt({k: v for k, v in state.items() if k != "head.1.3.weight"}, r"missing key\(s\): head.1.3.weight")
    attempt({**state, "head.1.3.bias": torch.zeros(16)}, r"unexpected key\(s\): head.1.3.bias")
    attempt({**state, "body.0.0.0.weight": torch.zeros(8, 1, 3, 5, 5)}, "body.0.0.0.weight has shape")
    attempt({**state, "head.1.7.weight": state["head.1.7.weight"].half()}, "torch.float16")
    with pytest.raises(WeightsImportError, match="one classifier file per task"):
        import_spa_models({"active_inflammation": classifiers["active_inflammation"]}, denoisers, tmp_path / "bad")


def _tiny_pack(folder: Path):  # noqa: ANN202
    from pipeline.chains.t1stir_3d.importer import published_manifest
    from pipeline.packs import write_pack

    torch.manual_seed(5)
    architecture = {"classifier": TINY_CLASSIFIER, "denoiser": TINY_DENOISER}
    manifest = published_manifest({}, {}, architecture=architecture, preprocessing=TINY_PREPROCESSING)
    return write_pack(folder, {**manifest, "name": "t1stir-3d-test", "demo": True}, build_networks(architecture).state_dict())


def test_chain_reports_three_patient_level_findings_with_heatmaps_per_sequence(study, tmp_path: Path) -> None:
    from pipeline.chains import RuntimeSettings, SeriesInput, StudyInputs
    from pipeline.chains.t1stir_3d.chain import T1STIR3DChain
    from pipeline.route import ChainSpec

    pack = _tiny_pack(tmp_path / "pack")
    folders = {}
    for sequence, datasets in study.items():
        folder = tmp_path / sequence
        folder.mkdir()
        for index, dataset in enumerate(datasets):
            dataset.save_as(folder / f"{index:04d}.dcm", enforce_file_format=True)
        folders[sequence] = SeriesInput(sequence.lower(), str(datasets[0].SeriesInstanceUID), tuple(sorted(folder.glob("*.dcm"))))
    spec = ChainSpec(
        name="t1stir-3d",
        implementation="pipeline.chains.t1stir_3d.chain:T1STIR3DChain",
        pack=str(pack.folder),
        requires=[{"role": "T1", "planes": ["coronal"], "name": "t1"}, {"role": "STIR", "planes": ["coronal"], "name": "stir", "optional": True}],
        options={"top_k": 2},
    )
    chain = T1STIR3DChain(spec, RuntimeSettings())
    result = chain.run(StudyInputs("1.2.3", {"t1": folders["T1"], "stir": folders["STIR"]}))
    assert result.not_analysed is None
    assert len(result.findings) == 3 and all(f.laterality is None and f.region is None for f in result.findings)
    assert {f.concept.meaning for f in result.findings} == {
        "Active inflammatory lesions of sacroiliac joints",
        "Active inflammatory lesions (ASAS MRI)",
        "Structural lesions of sacroiliac joints",
    }
    t1_uids = {str(ds.SOPInstanceUID) for ds in study["T1"]}
    stir_uids = {str(ds.SOPInstanceUID) for ds in study["STIR"]}
    on_t1 = [m for m in result.maps if m.source.sop_instance_uid in t1_uids]
    on_stir = [m for m in result.maps if m.source.sop_instance_uid in stir_uids]
    # up to three tasks × top_k slices, each on its own sequence's slices (an all-zero map of the
    # untrained network draws nothing)
    assert 1 <= len(on_t1) <= 6 and 1 <= len(on_stir) <= 6 and len(on_t1) + len(on_stir) == len(result.maps)
    assert all("T1 pass" in m.caption for m in on_t1) and all("STIR pass" in m.caption for m in on_stir)
    assert set(result.provenance.timings_s) >= {"read", "preprocess", "denoise", "classify", "gradcam"}

    without_stir = chain.run(StudyInputs("1.2.3", {"t1": folders["T1"]}))
    assert without_stir.not_analysed is not None and "STIR" in without_stir.not_analysed.detail
    assert not without_stir.findings


def test_routing_gives_the_chain_a_study_without_stir_so_it_can_say_why() -> None:
    from pipeline.classify import Plane, Role
    from pipeline.route import ChainSpec, SeriesCandidate, plan_routing

    spec = ChainSpec(
        name="t1stir-3d",
        implementation="pipeline.chains.t1stir_3d.chain:T1STIR3DChain",
        requires=[{"role": "T1", "planes": ["coronal"], "name": "t1"}, {"role": "STIR", "planes": ["coronal"], "name": "stir", "optional": True}],
    )
    t1 = SeriesCandidate("1.1", Role.T1, Plane.CORONAL, True, 18, 2)
    stir = SeriesCandidate("1.2", Role.STIR, Plane.CORONAL, True, 18, 3)
    axial_stir = SeriesCandidate("1.3", Role.STIR, Plane.AXIAL, True, 30, 4)
    assert plan_routing([t1, stir], [spec]).jobs[0].inputs == {"t1": "1.1", "stir": "1.2"}
    plan = plan_routing([t1, axial_stir], [spec])
    assert plan.jobs[0].inputs == {"t1": "1.1"} and "without optional stir" in plan.lines[0]
    plan = plan_routing([stir], [spec])
    assert not plan.jobs and "needs t1" in plan.lines[0]



# ---------------------------------------------------------------- the demonstration trainer


def test_lesion_patches_centre_on_lesions_and_keep_negatives_away_from_them() -> None:
    from pipeline.chains.t1stir_3d.train import LesionPatches

    inputs = torch.zeros(2, 2, 16, 64, 64)
    inputs[0, 1, 6:9, 40:44, 10:14] = 5.0  # one bright "lesion" in study 0's STIR
    centres = [np.array([[7.5, 42.0, 12.0]]), np.zeros((0, 3))]
    patches = LesionPatches(inputs, centres, (8, 16, 16), np.random.default_rng(0))
    batch, labels = patches.batch(64)
    assert batch.shape == (64, 2, 8, 16, 16) and 0 < int(labels.sum()) < 64
    peaks = batch[:, 1].amax(dim=(1, 2, 3))
    assert bool((peaks[labels == 1] == 5.0).all())  # the lesion is inside every positive patch (mirrored or not)
    assert bool((peaks[labels == 0] == 0.0).all())  # and in no negative one
    assert not LesionPatches(inputs, [np.zeros((0, 3))] * 2, (8, 16, 16), np.random.default_rng(0)).batch(4)[1].any()


@pytest.mark.slow
def test_training_on_tiny_phantoms_finds_their_lesions_and_writes_a_pack_the_chain_loads(tmp_path: Path) -> None:
    """Both classifier phases on eight tiny phantoms; the lesion centres land on the lesions; evaluate reports all three outputs."""
    import json

    from pipeline.chains.t1stir_3d.data import find_cases
    from pipeline.chains.t1stir_3d.train import Recipe, evaluate, train
    from pipeline.phantom import write_study

    def spec(*lesions: tuple[str, str, str]) -> dict:
        return {"lesions": [{"type": t, "side": side, "quadrant": q, "severity": "severe", "size_mm": 18} for t, side, q in lesions]}

    edema, sclerosis = ("edema", "left", "upper_ilium"), ("sclerosis", "right", "lower_sacrum")
    specs = [spec(edema, sclerosis), spec(edema, sclerosis), spec(edema), spec(edema), spec(sclerosis), spec(sclerosis), spec(), spec()]
    for seed, lesions in enumerate(specs, start=94301):
        write_study(generate_study(seed, kinds=("mri",), lesions=lesions), tmp_path / "data")
    settings = {**TINY_PREPROCESSING, "classifier_crop": [40, 40], "classifier_size": [8, 40, 40]}
    cases = find_cases(tmp_path / "data")
    # the centres the patch phase uses sit on the edema: bright on STIR at the classifier's own voxels
    networks = build_networks({"classifier": TINY_CLASSIFIER, "denoiser": None})
    for case in cases[:4]:
        x = classifier_input(case.grid_volumes(settings), networks.denoisers, settings)
        (z, y, c), = np.round(case.lesion_voxels("active_inflammation", settings)).astype(int)
        stir = x[0, 1].numpy()
        assert stir[z, y, c] > np.quantile(stir, 0.95), case.study
    recipe = Recipe(denoiser_epochs=1, denoiser_steps=1, patch_epochs=2, patch_steps=3, patch_batch=4, patch_validation=4, batch=4)
    pack = train(tmp_path / "data", tmp_path / "pack", epochs=2, progress=False, architecture={"classifier": TINY_CLASSIFIER, "denoiser": TINY_DENOISER}, preprocessing=settings, recipe=recipe, cache=tmp_path / "cache")
    training = json.loads((pack.folder / "training.json").read_text())
    assert set(training["phases"]) == {"denoiser T1", "denoiser STIR"} | {f"{phase} {task}" for phase in ("lesion patches", "whole studies") for task in TASKS}
    assert len(training["phases"]["lesion patches structural_lesions"]["history"]) == 2
    assert training["phases"]["whole studies active_inflammation"]["history"][0]["epoch"] == 0  # the patch-trained head competes
    assert "patches" in pack.manifest.training["classifiers"] and pack.manifest.preprocessing["classifier_crop"] == [40, 40]
    assert all(0.01 <= pack.manifest.output(task).threshold <= 0.99 for task in TASKS)
    assert set(load_networks(pack).classifiers) == set(TASKS)
    report = evaluate(pack, tmp_path / "data", tmp_path / "evaluation", cache=tmp_path / "cache")
    assert set(report["outputs"]) == set(TASKS) and Path(report["roc_png"]).stat().st_size > 0
    # one output trained again from that pack: the rest of it is copied, bit for bit
    again = train(tmp_path / "data", tmp_path / "again", epochs=1, progress=False, recipe=recipe, cache=tmp_path / "cache", base=pack, tasks=["structural_lesions"])
    before, after = load_networks(pack).state_dict(), load_networks(again).state_dict()
    assert before.keys() == after.keys()
    changed = {key.split(".")[0] for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"classifier_structural_lesions"}
    for task in ("active_inflammation", "asas_active_sacroiliitis"):
        assert again.manifest.output(task).threshold == pack.manifest.output(task).threshold
    retrained = json.loads((again.folder / "training.json").read_text())
    assert set(retrained["phases"]) == {"lesion patches structural_lesions", "whole studies structural_lesions"}
    assert retrained["base"]["retrained"] == ["structural_lesions"] and retrained["base"]["training"]["phases"] == training["phases"]


@pytest.mark.slow
def test_the_shipped_pack_ranks_lesions_above_a_healthy_phantom() -> None:
    """The committed demonstration pack: two severe edemas score higher for active inflammation, and a
    sclerosis with a fat lesion higher for structural lesions, than a healthy phantom of the same seed."""
    from pipeline.chains.t1stir_3d.inference import probability

    pack = load_pack(Path(__file__).resolve().parent.parent / "packs" / "t1stir-3d-demo", chain="t1stir-3d")
    networks, settings = load_networks(pack), dict(pack.manifest.preprocessing)
    specs = {
        "edema": [("edema", "left", "upper_ilium", 16), ("edema", "right", "lower_sacrum", 16)],
        "structural": [("sclerosis", "right", "lower_ilium", 20), ("fat", "left", "upper_ilium", 14)],
        "healthy": [],
    }
    scores = {}
    for name, lesions in specs.items():
        spec = {"lesions": [{"type": t, "side": side, "quadrant": q, "severity": "severe", "size_mm": size} for t, side, q, size in lesions]}
        series = {info.role: datasets for info, datasets in generate_study(94401, kinds=("mri",), lesions=spec).series}
        pair = prepare_pair(series["T1"], series["STIR"], settings)
        x = classifier_input({s: pair.series[s].grid_volume for s in SEQUENCES}, networks.denoisers, settings)
        scores[name] = {task: probability(model, x) for task, model in networks.classifiers.items()}
    assert scores["edema"]["active_inflammation"] > scores["healthy"]["active_inflammation"], scores
    assert scores["edema"]["asas_active_sacroiliitis"] > scores["healthy"]["asas_active_sacroiliitis"], scores
    assert scores["structural"]["structural_lesions"] > scores["healthy"]["structural_lesions"], scores
