"""The t2fs-mil chain: seed architecture, TTA, slice order, Grad-CAM, packs, the committed demo pack, training."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import Dataset
from pydicom.uid import MRImageStorage, generate_uid

from pipeline.chains import RuntimeSettings, SeriesInput, StudyInputs
from pipeline.chains.t2fs_mil.chain import T2FSMILChain
from pipeline.chains.t2fs_mil.data import Case, find_cases
from pipeline.chains.t2fs_mil.inference import GradCAMExplainer, load_model, predict
from pipeline.chains.t2fs_mil.model import (
    SEED_HYPERPARAMETERS,
    GatedAttention,
    build_model,
)
from pipeline.chains.t2fs_mil.preprocess import order_slices, preprocess_series
from pipeline.chains.t2fs_mil.inference import OUTPUT
from pipeline.chains.t2fs_mil.train import DEMO_HYPERPARAMETERS, WITHOUT_TTA, Recipe, augmentation, evaluate, train
from pipeline.evaluation import METRICS as EVALUATION_METRICS
from pipeline.packs import PackError, load_pack
from pipeline.phantom import generate_study, write_study
from pipeline.results import ChainResult, MapMeaning, Scope, Site
from pipeline.route import ChainSpec
from pipeline.training import augment_slices, count_parameters, split_by_patient

REPO = Path(__file__).resolve().parent.parent
DEMO_PACK = REPO / "packs" / "t2fs-mil-demo"
IMPLEMENTATION = "pipeline.chains.t2fs_mil.chain:T2FSMILChain"

# Phantoms the committed demo pack is checked on (none of them among its training or evaluation seeds).
HEALTHY_SEED = 90004
EDEMA_SEED = 90001
EDEMA_SPEC = {
    "lesions": [
        {"type": "edema", "side": "left", "quadrant": "lower_ilium", "severity": "severe", "size_mm": 18},
        {"type": "edema", "side": "right", "quadrant": "lower_sacrum", "severity": "moderate", "size_mm": 14},
    ]
}


def chain_spec(pack: Path, **options: object) -> ChainSpec:
    return ChainSpec(
        name="t2fs-mil",
        implementation=IMPLEMENTATION,
        pack=str(pack),
        requires=[{"role": "T2FS", "planes": ["axial"]}],
        options=dict(options),
    )


@dataclass
class Phantom:
    folder: Path
    files: tuple[Path, ...]
    masks: np.ndarray  # lesion bit field of the T2FS series, (slices, rows, columns), file order
    uids: list[str]  # SOPInstanceUIDs in file order

    def inputs(self) -> StudyInputs:
        return StudyInputs("study", {"t2fs": SeriesInput("t2fs", "series", self.files)})


def _phantom(seed: int, lesions: object, root: Path) -> Phantom:
    study = generate_study(seed, kinds=("mri",), lesions=lesions)
    folder = write_study(study, root)
    (info,) = [info for info, _ in study.series if info.role == "T2FS"]
    files = tuple(sorted((folder / info.folder).glob("*.dcm")))
    (datasets,) = [datasets for info, datasets in study.series if info.role == "T2FS"]
    return Phantom(folder, files, study.masks["T2FS_lesions"], [str(ds.SOPInstanceUID) for ds in datasets])


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Phantom]:
    root = tmp_path_factory.mktemp("t2fs-phantoms")
    return {"healthy": _phantom(HEALTHY_SEED, "none", root), "edema": _phantom(EDEMA_SEED, EDEMA_SPEC, root)}


@pytest.fixture(scope="module")
def demo_chain() -> T2FSMILChain:
    return T2FSMILChain(chain_spec(DEMO_PACK), RuntimeSettings(torch_threads=2))


@pytest.fixture(scope="module")
def results(demo_chain: T2FSMILChain, phantoms: dict[str, Phantom]) -> dict[str, ChainResult]:
    return {name: demo_chain.run(phantom.inputs()) for name, phantom in phantoms.items()}


# --- architecture ----------------------------------------------------------------------------


def test_seed_architecture_is_resnet18_with_gated_attention() -> None:
    model = build_model(SEED_HYPERPARAMETERS).eval()
    assert model.feature_dim == 512
    attention = model.attention
    assert isinstance(attention, GatedAttention)
    assert (attention.V.in_features, attention.V.out_features) == (512, 128)
    assert (attention.U.in_features, attention.U.out_features) == (512, 128)
    assert (attention.w.in_features, attention.w.out_features) == (128, 1)
    assert (model.classifier.in_features, model.classifier.out_features) == (512, 1)
    # torchvision's ResNet-18 without its fc layer, one input channel: 11,170,240 weights
    assert count_parameters(model.encoder) == 11_170_240
    assert count_parameters(model) == 11_302_210

    bag = torch.randn(5, 1, 224, 224)
    with torch.no_grad():
        output = model.forward_bag(bag)
    assert output.features.shape == (5, 512)
    assert output.attention.shape == (5,)
    assert float(output.attention.sum()) == pytest.approx(1.0, abs=1e-6)
    assert bool((output.attention > 0).all())
    assert output.logit.shape == ()


def test_gated_attention_is_softmax_of_w_tanh_v_times_sigmoid_u() -> None:
    torch.manual_seed(0)
    attention = GatedAttention(512, 128)
    features = torch.randn(7, 512)
    with torch.no_grad():
        expected = torch.softmax(
            (torch.tanh(features @ attention.V.weight.T + attention.V.bias) * torch.sigmoid(features @ attention.U.weight.T + attention.U.bias))
            @ attention.w.weight.T
            + attention.w.bias,
            dim=0,
        ).squeeze(-1)
        assert torch.allclose(attention(features), expected, atol=1e-6)


def test_tta_averages_the_probabilities_of_the_bag_and_its_mirror_image(phantoms: dict[str, Phantom]) -> None:
    model = load_model(load_pack(DEMO_PACK))
    _, bag = preprocess_series([_read(p) for p in phantoms["edema"].files], model.hyperparameters.input_size)
    with torch.no_grad():
        original = float(torch.sigmoid(model.forward_bag(bag).logit))
        mirrored = float(torch.sigmoid(model.forward_bag(bag[..., torch.arange(bag.shape[-1] - 1, -1, -1)]).logit))
    assert original != pytest.approx(mirrored, abs=1e-6), "a mirrored phantom should not give the very same probability"
    with_tta = predict(model, bag, tta=True)
    without = predict(model, bag, tta=False)
    assert with_tta.probability == pytest.approx((original + mirrored) / 2, abs=1e-5)
    assert with_tta.probability_original == pytest.approx(original, abs=1e-5)
    assert with_tta.probability_flipped == pytest.approx(mirrored, abs=1e-5)
    assert without.probability == pytest.approx(original, abs=1e-5) and without.probability_flipped is None
    assert with_tta.attention.sum() == pytest.approx(1.0)


# --- slice order -----------------------------------------------------------------------------


def _slice(position: float, instance: int, orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0)) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = instance
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, column)
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = [float(v) for v in (np.array([-100.0, -80.0, 10.0]) + position * normal)]
    return ds


def test_slices_are_ordered_along_the_normal_not_by_instance_number() -> None:
    positions = [12.0, -3.0, 30.0, 0.0, -21.0]
    # instance numbers run opposite to the positions for some and at random for others
    datasets = [_slice(p, n) for p, n in zip(positions, (1, 2, 3, 4, 5))]
    ordered = order_slices(datasets)
    assert [float(ds.ImagePositionPatient[2]) - 10.0 for ds in ordered] == sorted(positions)
    # oblique stack, positions along its own normal
    oblique = (0.0, 0.8, -0.6, 1.0, 0.0, 0.0)
    datasets = [_slice(p, 10 - i, oblique) for i, p in enumerate(positions)]
    normal = np.cross(oblique[:3], oblique[3:])
    along = [float((np.asarray(ds.ImagePositionPatient) - [-100.0, -80.0, 10.0]) @ normal) for ds in order_slices(datasets)]
    assert along == pytest.approx(sorted(positions))


def test_slices_without_geometry_or_from_two_stacks_are_refused() -> None:
    bare = _slice(0.0, 1)
    del bare.ImagePositionPatient
    with pytest.raises(ValueError, match="ImagePositionPatient"):
        order_slices([_slice(1.0, 2), bare])
    with pytest.raises(ValueError, match="not parallel"):
        order_slices([_slice(1.0, 1), _slice(2.0, 2, (1, 0, 0, 0, 0, -1))])


def test_the_chain_reports_slices_in_patient_order(results: dict[str, ChainResult], phantoms: dict[str, Phantom]) -> None:
    sources = results["edema"].sources
    z = [float(ds.ImagePositionPatient[2]) for ds in sources]
    assert z == sorted(z) and len(z) == len(phantoms["edema"].files)


# --- the committed demo pack -----------------------------------------------------------------


def test_demo_pack_is_a_small_declared_demonstration() -> None:
    pack = load_pack(DEMO_PACK, chain="t2fs-mil")
    pack.verify()
    manifest = pack.manifest
    assert manifest.demo is True
    assert "not for diagnosis" in manifest.intended_use and "phantom" in manifest.training_data
    assert sum(f.stat().st_size for f in DEMO_PACK.iterdir()) < 25 * 2**20
    assert manifest.architecture.hyperparameters["encoder"] == "resnet18"
    assert manifest.architecture.hyperparameters == DEMO_HYPERPARAMETERS
    assert manifest.output("active_sacroiliitis").concept == "active sacroiliitis"
    held_out = manifest.evaluation["held_out"]
    assert set(held_out["active_sacroiliitis"]) >= {"accuracy", "sensitivity", "specificity", "f1", "auc"}
    assert set(held_out[WITHOUT_TTA]) >= {"accuracy", "sensitivity", "specificity", "f1", "auc"}
    for name in ("evaluation.json", "EVALUATION.md", "roc.png", "training.json"):
        assert (DEMO_PACK / name).is_file(), name


def test_demo_pack_finds_no_active_sacroiliitis_in_a_healthy_phantom(results: dict[str, ChainResult]) -> None:
    (finding,) = results["healthy"].findings
    assert not finding.present, finding.probability
    assert finding.site is Site.SACROILIAC_JOINT and finding.laterality is None and finding.scope is Scope.PATIENT


def test_demo_pack_finds_active_sacroiliitis_in_a_phantom_with_edema(results: dict[str, ChainResult]) -> None:
    (finding,) = results["edema"].findings
    assert finding.present, finding.probability
    assert finding.concept.meaning == "Active sacroiliitis"
    assert len(finding.evidence) == 3
    assert finding.threshold == load_pack(DEMO_PACK).manifest.output("active_sacroiliitis").threshold


def test_every_slice_gets_its_attention_weight(results: dict[str, ChainResult]) -> None:
    result = results["edema"]
    scores = {score.source.sop_instance_uid: score.value for score in result.image_scores}
    assert set(scores) == {str(ds.SOPInstanceUID) for ds in result.sources}
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert {s.concept.meaning for s in result.image_scores} == {"Attention weight"}
    top = sorted(scores, key=scores.get, reverse=True)[:3]
    assert [ref.sop_instance_uid for ref in result.findings[0].evidence] == top


def test_attention_goes_to_the_slices_with_edema(results: dict[str, ChainResult], phantoms: dict[str, Phantom]) -> None:
    phantom = phantoms["edema"]
    with_edema = {uid for uid, bits in zip(phantom.uids, phantom.masks) if bits.any()}
    scores = {score.source.sop_instance_uid: score.value for score in results["edema"].image_scores}
    mass = sum(value for uid, value in scores.items() if uid in with_edema)
    assert mass > 2 * len(with_edema) / len(scores), (mass, len(with_edema), len(scores))


def test_grad_cam_maps_are_normalized_on_the_source_grid_and_high_on_the_edema(
    results: dict[str, ChainResult], phantoms: dict[str, Phantom]
) -> None:
    result, phantom = results["edema"], phantoms["edema"]
    assert len(result.maps) == 3
    sources = {str(ds.SOPInstanceUID): ds for ds in result.sources}
    on_edema = 0
    for heat in result.maps:
        source = sources[heat.source.sop_instance_uid]
        assert heat.meaning is MapMeaning.GRAD_CAM and heat.key
        assert heat.values.shape == (source.Rows, source.Columns)
        # on the shared absolute scale: the peak is the finding's probability (pipeline.cam.evidence_map)
        assert heat.values.min() >= 0.0 and heat.values.max() == pytest.approx(result.findings[0].probability, abs=1e-3)
        lesion = phantom.masks[phantom.uids.index(heat.source.sop_instance_uid)] > 0
        if not lesion.any():
            continue
        on_edema += 1
        # high = evidence for active sacroiliitis (MONAI's default would have inverted it): the
        # edema lies in the map's top quarter, and the peak is within one cell of the last ResNet
        # stage (the demo pack's 128-pixel input gives 4 x 4 cells) of the edema
        assert heat.values[lesion].mean() > np.percentile(heat.values, 75)
        peak = np.unravel_index(np.argmax(heat.values), heat.values.shape)
        rows, columns = np.nonzero(lesion)
        distance = np.hypot((rows - peak[0]) / source.Rows, (columns - peak[1]) / source.Columns).min()
        assert distance < 0.25, distance
    assert on_edema, "no attended slice shows the edema"


def test_grad_cam_is_exact_for_the_chosen_slices() -> None:
    """Grad-CAM through the partial bag equals Grad-CAM through the whole bag, and is not inverted."""
    from monai.visualize import GradCAM

    torch.manual_seed(1)
    model = build_model({**SEED_HYPERPARAMETERS, "widen_factor": 0.125, "input_size": 64}).eval()
    bag = torch.randn(6, 1, 64, 64)
    with torch.no_grad():
        features = model.encode(bag)
    positions = [4, 1]
    maps = GradCAMExplainer(model).maps(bag, features, positions)
    reference = GradCAM(model, target_layers="encoder.layer4", postprocessing=lambda x: x)(bag, class_idx=0)[:, 0].detach()
    reference = reference[positions] / reference[positions].flatten(1).amax(1)[:, None, None]
    assert np.allclose(maps, reference.numpy(), atol=1e-4)
    assert maps.min() >= 0 and np.allclose(maps.reshape(2, -1).max(1), 1.0)


# --- options and packs -----------------------------------------------------------------------


def test_tta_and_top_k_are_options(phantoms: dict[str, Phantom]) -> None:
    chain = T2FSMILChain(chain_spec(DEMO_PACK, tta=False, top_k=1), RuntimeSettings(torch_threads=2))
    result = chain.run(phantoms["healthy"].inputs())
    assert result.provenance.parameters["tta"] == "off"
    assert "probability of the flipped bag" not in result.provenance.parameters
    assert result.findings[0].probability == pytest.approx(result.provenance.parameters["probability without TTA"], abs=1e-4)
    assert len(result.maps) == 1 and len(result.findings[0].evidence) == 1
    with pytest.raises(ValueError, match="unknown option"):
        T2FSMILChain(chain_spec(DEMO_PACK, flip=True), RuntimeSettings())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tta": "yes"}, "option tta must be of type bool"),
        ({"top_k": 1.5}, "option top_k must be of type int"),
        ({"top_k": True}, "option top_k must be of type int"),
        ({"top_k": -1}, "option top_k must be at least 0"),
        ({"batch_slices": 0}, "option batch_slices must be at least 1"),
        ({"parametric_maps": 1}, "option parametric_maps must be of type bool"),
    ],
)
def test_options_of_the_wrong_type_or_range_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        T2FSMILChain(chain_spec(DEMO_PACK, **options), RuntimeSettings())


def test_a_pack_whose_weights_do_not_match_its_sha256_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "pack"
    shutil.copytree(DEMO_PACK, broken)
    weights = broken / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PackError, match="does not match the manifest"):
        T2FSMILChain(chain_spec(broken), RuntimeSettings())


def test_a_pack_for_another_architecture_is_refused(tmp_path: Path) -> None:
    import yaml

    other = tmp_path / "pack"
    shutil.copytree(DEMO_PACK, other)
    manifest = yaml.safe_load((other / "manifest.yaml").read_text())
    manifest["architecture"]["hyperparameters"]["widen_factor"] = 0.5
    (other / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    with pytest.raises(PackError, match="do not fit its architecture"):
        T2FSMILChain(chain_spec(other), RuntimeSettings())


# --- training --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, phantoms: dict[str, Phantom]) -> Iterator[Path]:
    """Four phantoms, two with edema: the two above and two more."""
    tmp_path = tmp_path_factory.mktemp("t2fs-tiny")
    data = tmp_path / "data"
    data.mkdir()
    for phantom in phantoms.values():
        (data / phantom.folder.name).symlink_to(phantom.folder)
    root = tmp_path / "more"
    for seed, lesions in ((90007, "none"), (90003, EDEMA_SPEC)):
        phantom = _phantom(seed, lesions, root)
        (data / phantom.folder.name).symlink_to(phantom.folder)
    yield data


def _split(cases: list[Case], validation_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """``split_by_patient`` as training splits cases."""
    return split_by_patient(cases, validation_fraction, seed, patient=lambda case: case.patient_id, label=lambda case: case.label)


def test_split_is_patient_wise_and_keeps_both_labels(tiny_data: Path) -> None:
    cases = find_cases(tiny_data)
    training, validation = _split(cases, 0.5, seed=0)
    assert not {c.patient_id for c in training} & {c.patient_id for c in validation}
    assert {c.label for c in training} == {c.label for c in validation} == {False, True}


def _case(study: str, patient_id: str, label: bool) -> Case:
    folder = Path("/nowhere") / study  # the split reads no files
    return Case(folder, study, patient_id, 0, label, label, "test", folder / "t2fs")


def test_studies_of_one_patient_stay_on_one_side_of_the_split() -> None:
    # PAT-0 has a study with active inflammation and one without; eight more patients, one study each
    shared = [_case("S-0a", "PAT-0", True), _case("S-0b", "PAT-0", False)]
    cases = shared + [_case(f"S-{i}", f"PAT-{i}", i % 2 == 0) for i in range(1, 9)]
    sides = []
    for seed in range(20):
        training, validation = _split(cases, 0.25, seed)
        assert sorted(c.study for c in training + validation) == sorted(c.study for c in cases)
        assert not {c.patient_id for c in training} & {c.patient_id for c in validation}
        in_validation = [case in validation for case in shared]
        assert in_validation[0] == in_validation[1], (seed, in_validation)
        sides.append(in_validation[0])
    assert any(sides) and not all(sides), "PAT-0 should land on each side for some seed"


def test_a_tiny_training_run_writes_a_pack_the_chain_loads(tiny_data: Path, tmp_path: Path, phantoms: dict[str, Phantom]) -> None:
    tiny = {**SEED_HYPERPARAMETERS, "widen_factor": 0.125, "input_size": 64}
    recipe = Recipe(validation_fraction=0.5, warmup_steps=3, slice_batch=8, head_epochs=2)
    pack = train(tiny_data, tmp_path / "pack", epochs=1, seed=3, progress=False, hyperparameters=tiny, recipe=recipe)
    pack.verify()
    assert pack.manifest.chain == "t2fs-mil" and pack.manifest.demo
    assert pack.manifest.architecture.hyperparameters == tiny
    report = json.loads((pack.folder / "training.json").read_text())
    assert report["schema"] == "sijnode-training/1" and report["recipe"]["epochs"] == 1
    assert [h["epoch"] for h in report["phases"]["end to end"]["history"]] == [0, 1]
    assert [h["epoch"] for h in report["phases"]["MIL head on frozen features"]["history"]] == [0, 1, 2]
    assert not set(report["split"]["training"]) & set(report["split"]["validation"])
    assert any("RandFlip rows" in step for step in report["recipe"]["augmentation"])
    assert pack.manifest.training["augmentation"] == report["recipe"]["augmentation"]

    result = T2FSMILChain(chain_spec(pack.folder), RuntimeSettings()).run(phantoms["edema"].inputs())
    assert 0.0 <= result.findings[0].probability <= 1.0

    summary = evaluate(pack, tiny_data, pack.folder)
    for output in (OUTPUT, WITHOUT_TTA):
        assert set(summary["outputs"][output]["metrics"]) == set(EVALUATION_METRICS)
        assert set(summary["outputs"][output]["metrics"]["accuracy"]) == {"value", "ci95_low", "ci95_high"}
        assert summary["outputs"][output]["subgroups"]["all"]["studies"] == 4
    assert Path(summary["roc_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(summary["report"]).read_text())["data"]["studies"] == 4
    assert load_pack(pack.folder).manifest.evaluation["held_out"]["studies"] == 4


def _read(path: Path) -> Dataset:
    from pydicom import dcmread

    return dcmread(path)


def _distinct_slices(count: int = 3, size: int = 16) -> torch.Tensor:
    """(count, 1, size, size) slices without any symmetry, each different."""
    base = torch.arange(size * size, dtype=torch.float32).reshape(size, size) ** 1.3
    return torch.stack([(base + 50.0 * k) / 100.0 for k in range(count)])[:, None]


def test_the_augmentation_is_the_papers_flips_and_intensity_changes_seeded() -> None:
    slices = _distinct_slices()
    flips_only = Recipe(horizontal_flip=1.0, vertical_flip=1.0, intensity_probability=0.0)
    assert torch.equal(augment_slices(augmentation(flips_only, 0), slices, per_slice=False), slices.flip(-1).flip(-2))
    mirror_only = Recipe(horizontal_flip=1.0, vertical_flip=0.0, intensity_probability=0.0)
    assert torch.equal(augment_slices(augmentation(mirror_only, 0), slices, per_slice=True), slices.flip(-1))

    # intensity only: the geometry stays, the values change, each within its declared range
    intensity = Recipe(horizontal_flip=0.0, vertical_flip=0.0, intensity_probability=1.0, gamma=(1.0, 1.0), contrast=0.0, brightness=0.2)
    shifted = augment_slices(augmentation(intensity, 1), slices, per_slice=False)
    offset = shifted - slices
    assert torch.allclose(offset, offset.flatten()[0].expand_as(offset), atol=1e-5)  # one draw for the whole bag
    assert 0 < abs(float(offset.flatten()[0])) <= 0.2
    per_slice = augment_slices(augmentation(intensity, 1), slices, per_slice=True) - slices
    assert len({round(float(o.flatten()[0]), 5) for o in per_slice}) == len(slices)  # one draw per slice

    # seeded: the same seed gives the same draws, another seed others
    recipe = Recipe()
    runs = [[augment_slices(transform, slices, per_slice=False) for _ in range(6)] for transform in (augmentation(recipe, 7), augmentation(recipe, 7), augmentation(recipe, 8))]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))
