"""t1stir-quadrants (Jamaludin et al. 2026): the parts built so far, each against real behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.chains.t1stir_quadrants.annotators import (
    BASE,
    INFERENCE_NODE,
    PAPER_HIERARCHY,
    AnnotatorHierarchy,
    multi_reader_loss,
)
from pipeline.evaluation import auc, threshold_metrics
from pipeline.phantom.readers import GRADED_OUTPUTS, READERS, SESSIONS, confusion_arrays, simulate_readings
from pipeline.phantom.seeding import rng_for


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small tensors: more threads only contend with the other test processes on the shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- annotator matrices


def test_annotator_matrices_have_the_papers_form_and_tree():
    annotators = AnnotatorHierarchy(3)
    with torch.no_grad():
        for logits in annotators.rate_logits.values():
            logits.normal_()
    for node in PAPER_HIERARCHY:
        matrix = annotators.matrix(node)
        torch.testing.assert_close(matrix.sum(dim=1), torch.ones(3, 2))  # column-stochastic
        assert (matrix >= 0).all()
        low_rank = matrix - torch.eye(2)
        assert all(torch.linalg.matrix_rank(m) == 1 for m in low_rank)  # B = I + a (x) b
    assert annotators.order.index("R1R2") < annotators.order.index("R1") < annotators.order.index("R1S3")
    probability = torch.tensor([[0.1, 0.5, 0.9]])
    predictions = annotators(probability)
    two_class = torch.stack([1 - probability, probability], dim=-1)  # (1, outputs, 2)
    expected = torch.einsum("oij,noj->noi", annotators.composed_matrix("R2S3"), two_class)[..., 1]
    torch.testing.assert_close(predictions["R2S3"], expected)
    trace = sum(annotators.matrix(node).diagonal(dim1=-2, dim2=-1).sum() for node in PAPER_HIERARCHY)
    torch.testing.assert_close(annotators.trace_penalty(), trace)


def test_unused_consensus_labels_contribute_nothing():
    annotators = AnnotatorHierarchy(2)
    probability = torch.tensor([[0.3, 0.6]], requires_grad=True)
    labels = {"R1R2": torch.tensor([[-1, 1]]), "R1S1": torch.tensor([[-1, -1]])}
    loss = multi_reader_loss(annotators(probability), labels, annotators, trace_weight=0.0)
    loss.backward()
    assert probability.grad[0, 0] == 0 and probability.grad[0, 1] != 0
    assert annotators.rate_logits["R1S1"].grad is None or not annotators.rate_logits["R1S1"].grad.any()


def _synthetic_reads(cases: int, features: int, seed: int):
    """Linear-logistic truth for the 14 outputs and the phantom's simulated readers over it."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(features, len(GRADED_OUTPUTS)))
    bias = rng.normal(-1.0, 0.3, size=len(GRADED_OUTPUTS))

    def draw(n: int):
        x = rng.normal(size=(n, features))
        z = 3 * x @ weights / np.sqrt(features) + bias + 0.5 * rng.normal(size=(n, len(GRADED_OUTPUTS)))
        return torch.tensor(x, dtype=torch.float32), (z > 0).astype(np.int8)

    x, truth = draw(cases)
    x_test, truth_test = draw(4000)
    readings = simulate_readings(truth, {(r, s): rng_for(seed, r, s) for r in READERS for s in SESSIONS})
    labels = {name: torch.tensor(values, dtype=torch.long) for name, values in readings.items()}
    return x, labels, x_test, truth_test


def _scores(truth: np.ndarray, probability: np.ndarray) -> tuple[float, float]:
    outputs = range(truth.shape[1])
    mean_auc = np.nanmean([auc(truth[:, o], probability[:, o]) for o in outputs])
    balanced = np.nanmean([threshold_metrics(truth[:, o], probability[:, o], 0.5)["balanced_accuracy"] for o in outputs])
    return float(mean_auc), float(balanced)


@pytest.fixture(scope="module")
def multi_reader_fit():
    """A linear network trained on all nine label sets through the hierarchy, and one trained on R1S1 alone."""
    torch.manual_seed(0)
    x, labels, x_test, truth_test = _synthetic_reads(cases=600, features=32, seed=0)
    epochs, rate = 200, 0.05
    network, annotators = nn.Linear(x.shape[1], len(GRADED_OUTPUTS)), AnnotatorHierarchy(len(GRADED_OUTPUTS))
    optimizer = torch.optim.Adam([*network.parameters(), *annotators.parameters()], lr=rate)
    for _ in range(epochs):
        optimizer.zero_grad()
        multi_reader_loss(annotators(torch.sigmoid(network(x))), labels, annotators).backward()
        optimizer.step()
    torch.manual_seed(0)
    single = nn.Linear(x.shape[1], len(GRADED_OUTPUTS))
    optimizer = torch.optim.Adam(single.parameters(), lr=rate)
    for _ in range(epochs):
        optimizer.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(single(x), labels["R1S1"].float()).backward()
        optimizer.step()
    with torch.no_grad():
        consensus = annotators(torch.sigmoid(network(x_test)))[INFERENCE_NODE].numpy()
        single_reader = torch.sigmoid(single(x_test)).numpy()
    return annotators, truth_test, consensus, single_reader


def test_learned_annotator_matrices_recover_the_simulated_readers_confusion(multi_reader_fit):
    annotators = multi_reader_fit[0]
    errors, assumed_perfect = [], []
    with torch.no_grad():
        for reader in READERS:
            miss, false_call = confusion_arrays(reader)
            for session in SESSIONS:
                matrix = annotators.composed_matrix(reader + session).numpy()  # base -> this reading
                errors += [np.abs(matrix[:, 1, 0] - false_call), np.abs(matrix[:, 0, 1] - miss)]
                assumed_perfect += [false_call, miss]
    error = float(np.mean(errors))
    true_rates = np.concatenate(assumed_perfect)
    chance = float(np.abs(np.random.default_rng(1).random((2000, true_rates.size)) - true_rates).mean())
    print(f"confusion recovery: mean |error| {error:.3f}, chance {chance:.3f}, identity {true_rates.mean():.3f}")
    assert error < chance / 4
    assert error < true_rates.mean() / 2  # better than assuming perfect readers
    # reader-specific: R1 misses erosions more than R2, R2 misses edema more than R1 (as simulated)
    erosion, edema = GRADED_OUTPUTS.index("erosion_upper_ilium"), GRADED_OUTPUTS.index("edema_upper_ilium")
    with torch.no_grad():
        r1, r2 = annotators.composed_matrix("R1S1").numpy(), annotators.composed_matrix("R2S1").numpy()
    assert r1[erosion, 0, 1] > r2[erosion, 0, 1] and r2[edema, 0, 1] > r1[edema, 0, 1]


def test_consensus_output_beats_training_on_one_readers_labels(multi_reader_fit):
    _, truth, consensus, single_reader = multi_reader_fit
    consensus_auc, consensus_balanced = _scores(truth, consensus)
    single_auc, single_balanced = _scores(truth, single_reader)
    print(f"AUC {consensus_auc:.3f} vs {single_auc:.3f}; balanced accuracy {consensus_balanced:.3f} vs {single_balanced:.3f}")
    assert consensus_auc > single_auc + 0.01
    assert consensus_balanced > single_balanced + 0.03
    assert BASE in PAPER_HIERARCHY.values()


# ---------------------------------------------------------------- networks at the published sizes


def test_networks_at_published_sizes_and_shapes():
    from pipeline.chains.t1stir_quadrants.model import (
        CONTOUR_CHANNELS,
        REFERENCE_PARAMETERS,
        SEED_HYPERPARAMETERS,
        build_models,
    )
    from pipeline.training import count_parameters

    unet, classifier = build_models(SEED_HYPERPARAMETERS)
    assert count_parameters(unet) == REFERENCE_PARAMETERS["contour_unet"] == 31_112_520
    assert count_parameters(classifier.encoder) == REFERENCE_PARAMETERS["lesion_encoder"] == 21_278_400
    assert count_parameters(classifier) == REFERENCE_PARAMETERS["lesion_classifier"]
    assert len(classifier.heads) == len(GRADED_OUTPUTS) == 14
    assert CONTOUR_CHANNELS == (
        "left_start", "left_end", "left_uvf_x", "left_uvf_y", "right_start", "right_end", "right_uvf_x", "right_uvf_y"
    )
    assert not hasattr(classifier, "stir_encoder")  # one encoder, shared by T1 and STIR
    # shapes through the same modules, narrowed so the shared CPUs are spared a 31 M forward pass
    unet, classifier = build_models({**SEED_HYPERPARAMETERS, "unet_features": [4, 4, 8, 8, 16, 4], "widen_factor": 0.125})
    with torch.no_grad():
        assert unet.eval()(torch.zeros(1, 1, 224, 224)).shape == (1, 8, 224, 224)
        # T1 and STIR regions may have different slice counts
        logits = classifier.eval()(torch.randn(3, 1, 112, 112), torch.randn(5, 1, 112, 112))
    assert logits.shape == (1, 14)


def test_hyperparameters_are_checked():
    from pipeline.chains.t1stir_quadrants.model import Hyperparameters

    with pytest.raises(ValueError, match="resnet34"):
        Hyperparameters.from_mapping({"encoder": "resnet18"})
    with pytest.raises(ValueError, match="unknown"):
        Hyperparameters.from_mapping({"depth": 3})
    with pytest.raises(ValueError, match="multiple of 16"):
        Hyperparameters.from_mapping({"contour_size": 100})
    narrow = Hyperparameters.from_mapping({"unet_features": [8, 8, 16, 32, 64, 8], "widen_factor": 0.125})
    assert narrow.unet_features == (8, 8, 16, 32, 64, 8) and Hyperparameters.from_mapping(narrow.as_dict()) == narrow


# ---------------------------------------------------------------- contouring targets and extraction


@pytest.fixture(scope="module")
def coronal_t1():
    """A phantom's coronal T1: its joint-line masks and geometry."""
    from pipeline.phantom import generate_study

    study = generate_study(11, kinds=("mri",), lesions="none")
    (t1,) = [series for series in study.series if series.info.role == "T1"]
    return study.masks["T1_joint_line"], t1.datasets


def _ground_truth_polylines(line: np.ndarray, dataset, frame) -> dict:
    from pipeline.chains.t1stir_quadrants.preprocess import superior_direction
    from pipeline.chains.t1stir_quadrants.targets import polyline_from_mask
    from pipeline.phantom import JOINT_LINE_LABELS

    up = superior_direction(dataset.ImageOrientationPatient, dataset.PixelSpacing)
    polylines = {}
    for side in ("left", "right"):
        vertices = polyline_from_mask(line == JOINT_LINE_LABELS[side], up)
        polylines[side] = None if vertices is None else frame.to_grid(vertices)
    return polylines


def _middle_slice(coronal_t1):
    """The middle slice's true polylines, targets and grid spacing (mm)."""
    from pipeline.chains.t1stir_quadrants.preprocess import SquareFrame
    from pipeline.chains.t1stir_quadrants.targets import contour_targets

    lines, datasets = coronal_t1
    frame = SquareFrame(*lines.shape[1:])
    index = len(datasets) // 2
    polylines = _ground_truth_polylines(lines[index], datasets[index], frame)
    return polylines, contour_targets(polylines, (224, 224)), frame.grid_spacing_mm(datasets[0].PixelSpacing)


def test_square_frame_maps_points_as_the_image_is_resampled():
    from pipeline.chains.t1stir_quadrants.preprocess import SquareFrame

    frame = SquareFrame(208, 256)
    image = np.zeros((208, 256), dtype=np.float32)
    image[60:64, 200:204] = 1.0  # a blob centred at (61.5, 201.5)
    grid = frame.image(image)[0].numpy()
    assert grid.shape == (224, 224)
    rows, cols = np.mgrid[:224, :224]
    weights = np.clip(grid, 0, None)
    centroid = np.array([(rows * weights).sum(), (cols * weights).sum()]) / weights.sum()
    np.testing.assert_allclose(centroid, frame.to_grid([61.5, 201.5]), atol=0.1)
    np.testing.assert_allclose(frame.to_source(frame.to_grid([[3.0, 250.0]])), [[3.0, 250.0]])
    assert frame.grid_spacing_mm([0.8, 0.8]) == pytest.approx((0.8 * 256 / 224, 0.8 * 256 / 224))


def test_contours_walked_on_ground_truth_fields_match_the_phantom_joint_lines(coronal_t1):
    from pipeline.chains.t1stir_quadrants.contour import contour_rms_mm, trace_contour
    from pipeline.chains.t1stir_quadrants.preprocess import SquareFrame
    from pipeline.chains.t1stir_quadrants.targets import contour_targets

    lines, datasets = coronal_t1
    frame = SquareFrame(*lines.shape[1:])
    spacing = frame.grid_spacing_mm(datasets[0].PixelSpacing)
    errors, coverage, noisy_errors = [], [], []
    rng = np.random.default_rng(0)
    for index, dataset in enumerate(datasets):
        polylines = _ground_truth_polylines(lines[index], dataset, frame)
        targets = contour_targets(polylines, (224, 224))
        for j, side in enumerate(("left", "right")):
            truth = polylines[side]
            if truth is None:
                assert not targets[4 * j : 4 * j + 4].any()
                assert trace_contour(*targets[4 * j : 4 * j + 4]).failure == "no start"
                continue
            walk = trace_contour(*targets[4 * j : 4 * j + 4])
            assert walk.ok, (index, side, walk.failure)
            errors.append(contour_rms_mm(walk.vertices, truth, spacing))
            coverage.append(contour_rms_mm(truth, walk.vertices, spacing))  # the whole joint, not a piece
            noisy = targets[4 * j : 4 * j + 4] + rng.normal(0, 0.15, size=(4, 224, 224)).astype(np.float32)
            noisy_walk = trace_contour(*noisy)
            assert noisy_walk.ok, (index, side, noisy_walk.failure)
            noisy_errors.append(contour_rms_mm(noisy_walk.vertices, truth, spacing))
    assert len(errors) >= 20
    p95, noisy_p95 = np.percentile(errors, 95), np.percentile(noisy_errors, 95)
    print(f"contour RMS error on ground-truth fields: 95% below {p95:.2f} mm (noisy field {noisy_p95:.2f} mm)")
    assert p95 < 0.5 and max(coverage) < 0.5  # the paper's learnt fields: 95% below 2.76 mm
    assert noisy_p95 < 2.76


def test_walk_failure_rules():
    from pipeline.chains.t1stir_quadrants.contour import trace_contour
    from pipeline.chains.t1stir_quadrants.targets import contour_targets

    vertices = np.stack([np.linspace(40, 120, 50), np.full(50, 80.0)], axis=1)
    targets = contour_targets({"left": vertices, "right": None}, (224, 224))
    start, end, x, y = targets[:4]
    assert trace_contour(start, end, x, y).ok
    assert trace_contour(np.zeros_like(start), end, x, y).failure == "no start"
    assert trace_contour(start, np.zeros_like(end), x, y).failure == "no end"
    assert trace_contour(start, end, np.zeros_like(x), np.zeros_like(y)).failure == "weak field"
    assert trace_contour(start, end, -x, -y).failure in ("left the image", "too long")
    sideways = np.ones_like(x)  # a field that never turns to the end
    assert trace_contour(start, end, sideways, np.zeros_like(y)).failure == "left the image"


def test_left_right_flip_swaps_the_joint_channels(coronal_t1):
    from pipeline.chains.t1stir_quadrants.targets import contour_targets, flip_left_right

    polylines, targets, _ = _middle_slice(coronal_t1)
    image = np.arange(224 * 224, dtype=np.float32).reshape(224, 224)
    flipped_image, flipped = flip_left_right(image, targets)
    mirror = lambda v: np.stack([v[:, 0], 223 - v[:, 1]], axis=1)  # noqa: E731
    expected = contour_targets({"left": mirror(polylines["right"]), "right": mirror(polylines["left"])}, (224, 224))
    assert np.array_equal(flipped_image, image[:, ::-1])
    np.testing.assert_allclose(flipped[[0, 1, 4, 5]], expected[[0, 1, 4, 5]], atol=1e-5)
    agree = np.isclose(flipped, expected, atol=1e-4).mean()
    assert agree > 0.999  # the field, but for nearest-point ties
    # the patient's left joint is on the image's right in this geometry, and the flip moves its channels' mass left
    left_heat = targets[0]
    assert np.unravel_index(left_heat.argmax(), left_heat.shape)[1] > 112
    assert np.unravel_index(flipped[4].argmax(), left_heat.shape)[1] < 112


# ---------------------------------------------------------------- regions and quadrants

QUADRANT_SPEC = {
    "lesions": [
        {"type": "edema", "side": "left", "quadrant": "upper_ilium", "severity": "severe"},
        {"type": "fat", "side": "right", "quadrant": "lower_sacrum", "severity": "severe"},
    ]
}


@pytest.fixture(scope="module")
def quadrant_study():
    from pipeline.phantom import generate_study

    return generate_study(12, kinds=("mri",), lesions=QUADRANT_SPEC)


def test_quadrants_put_phantom_bone_and_lesions_on_their_side_and_quadrant(quadrant_study):
    from pipeline.chains.t1stir_quadrants.preprocess import SquareFrame, patient_left_direction, superior_direction
    from pipeline.chains.t1stir_quadrants.regions import joint_regions
    from pipeline.phantom import ANATOMY_LABELS, SIDES

    study = quadrant_study
    (stir,) = [series for series in study.series if series.info.role == "STIR"]
    first = stir.datasets[0]
    lines = study.masks["STIR_joint_line"]
    frame = SquareFrame(*lines.shape[1:])
    contours = [_ground_truth_polylines(lines[i], first, frame) for i in range(len(lines))]
    up = superior_direction(first.ImageOrientationPatient, first.PixelSpacing)
    regions = joint_regions(contours, up, patient_left_direction(first.ImageOrientationPatient, first.PixelSpacing))
    # levelled: the mean left-right line through the joints' upper and lower points is horizontal
    found = {side: [c[side] for c in contours if c[side] is not None] for side in SIDES}
    upper = {side: regions.level(np.mean([v[0] for v in found[side]], axis=0)) for side in SIDES}
    lower = {side: regions.level(np.mean([v[-1] for v in found[side]], axis=0)) for side in SIDES}
    slope = sum((e["left"][0] - e["right"][0]) / (e["left"][1] - e["right"][1]) for e in (upper, lower))
    assert abs(slope) < 1e-6
    source = np.stack(np.mgrid[: lines.shape[1], : lines.shape[2]], axis=-1).reshape(-1, 2)
    grid = frame.to_grid(source)
    wanted = {"edema": (SIDES.index("left"), 0), "fat": (SIDES.index("right"), 3)}  # upper ilium / lower sacrum
    lesion_hits = {kind: [0, 0, 0] for kind in wanted}  # pixels, inside a box, in the right quadrant
    bone = {"ilium": [0, 0], "sacrum": [0, 0]}
    for index in range(len(lines)):
        assigned = regions.quadrant_of(index, grid)
        for record in study.ground_truth["lesions"]:
            hit = ((study.masks["STIR_lesions"][index].ravel() >> record["mask_bit"]) & 1).astype(bool)
            side, quadrant = wanted[record["type"]]
            counts = lesion_hits[record["type"]]
            counts[0] += hit.sum()
            counts[1] += (assigned[hit, 0] >= 0).sum()
            counts[2] += ((assigned[hit, 0] == side) & (assigned[hit, 1] == quadrant)).sum()
        anatomy = study.masks["STIR_anatomy"][index].ravel()
        for s, side in enumerate(SIDES):
            for name, label, ilium in (("ilium", f"{side}_ilium", True), ("sacrum", "sacrum", False)):
                here = (anatomy == ANATOMY_LABELS[label]) & (assigned[:, 0] == s)
                bone[name][0] += here.sum()
                bone[name][1] += (np.isin(assigned[here, 1], [0, 1]) == ilium).sum()
    print(f"lesion pixels [all, in a box, in their quadrant]: {lesion_hits}; bone [in boxes, on its side]: {bone}")
    for total, inside, right in lesion_hits.values():
        assert inside > 0.2 * total and right == inside
    assert bone["sacrum"][1] > 0.95 * bone["sacrum"][0] and bone["ilium"][1] > 0.8 * bone["ilium"][0]


@pytest.mark.parametrize("turn_deg", [0.0, 25.0, 180.0])
def test_quadrants_follow_the_patient_not_the_image_orientation(turn_deg):
    from pipeline.chains.t1stir_quadrants.regions import RegionError, joint_regions

    # upright reference: head up (-row), patient left towards larger columns, joints slanting outwards downwards
    left = np.stack([np.linspace(80, 130, 30), np.linspace(140, 150, 30)], axis=1)
    right = np.stack([np.linspace(80, 130, 30), np.linspace(84, 74, 30)], axis=1)
    probes = {  # (point, side index, quadrant index)
        "left upper ilium": (np.array([90.0, 150.0]), 0, 0),
        "left lower sacrum": (np.array([125.0, 140.0]), 0, 3),
        "right upper sacrum": (np.array([90.0, 83.5]), 1, 2),
        "right lower ilium": (np.array([125.0, 74.3]), 1, 1),
    }
    angle = np.radians(turn_deg)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.full(2, 111.5)
    move = lambda p: (np.asarray(p) - centre) @ turn.T + centre  # noqa: E731
    contours = [{"left": move(left), "right": move(right)}] * 3
    regions = joint_regions(contours, turn @ np.array([-1.0, 0.0]), turn @ np.array([0.0, 1.0]))
    for name, (point, side, quadrant) in probes.items():
        assert regions.quadrant_of(1, move(point)[None]).tolist() == [[side, quadrant]], name
    assert regions.quadrant_of(0, move(np.array([100.0, 112.0]))[None]).tolist() == [[-1, -1]]  # between the joints
    with pytest.raises(RegionError, match="right"):
        joint_regions([{"left": left, "right": None}], np.array([-1.0, 0.0]), np.array([0.0, 1.0]))


@pytest.mark.parametrize(
    "orientation",
    [
        (1, 0, 0, 0, 0.6, -0.8),  # the phantom's semicoronal: already canonical
        (-1, 0, 0, 0, 0, -1),  # columns run to the patient's right
        (1, 0, 0, 0, 0, 1),  # rows run to the head (upside down)
        (0, 0, -1, 1, 0, 0),  # transposed: columns run to the feet, rows to the left
        (0, 0.6, 0.8, -1, 0, 0),  # transposed and both reversed
    ],
)
def test_canonical_orientation_puts_head_up_and_patient_left_on_image_right(orientation):
    from pipeline.chains.t1stir_quadrants.preprocess import CanonicalOrientation

    along_cols, along_rows = np.array(orientation[:3], float), np.array(orientation[3:], float)
    shape = (40, 60)

    def lps(points):  # source (row, col) -> patient coordinates, as ImagePositionPatient + IOP define them
        points = np.asarray(points, float)
        return points[..., :1] * along_rows + points[..., 1:] * along_cols

    canonical = CanonicalOrientation.from_geometry(orientation, shape)
    origin = canonical.to_source(np.array([[10.0, 10.0]]))
    down = canonical.to_source(np.array([[11.0, 10.0]]))
    right = canonical.to_source(np.array([[10.0, 11.0]]))
    assert (lps(down) - lps(origin))[0, 2] < 0  # next canonical row is towards the feet
    assert (lps(right) - lps(origin))[0, 0] > 0  # next canonical column is towards the patient's left
    marker = np.zeros(shape)
    marker[7, 51] = 1
    moved = canonical.image(marker)
    assert moved.shape == canonical.shape
    assert tuple(np.argwhere(moved)[0]) == tuple(canonical.to_canonical([7.0, 51.0]).astype(int))
    np.testing.assert_allclose(canonical.to_source(canonical.to_canonical([[7.0, 51.0]])), [[7.0, 51.0]])


def test_phantom_series_become_contour_samples_and_levelled_joint_crops(quadrant_study):
    from pipeline.chains.t1stir_quadrants.data import (
        contour_samples,
        coronal_series,
        crop_joint,
        phantom_contours,
        reader_labels,
        series_regions,
    )

    study = quadrant_study
    (stir,) = [series for series in study.series if series.info.role == "STIR"]
    first = stir.datasets[0]
    series = coronal_series("STIR", [d.pixel_array for d in stir.datasets], first.ImageOrientationPatient, first.PixelSpacing)
    contours = phantom_contours(series, study.masks["STIR_joint_line"])
    inputs, targets = contour_samples(series, contours)
    assert inputs.shape == (len(stir.datasets), 1, 224, 224) and targets.shape == (len(stir.datasets), 8, 224, 224)
    assert targets[:, 0].max() == pytest.approx(1.0, abs=0.05)  # a left start peak exists
    left_start = np.unravel_index(targets[len(targets) // 2, 0].argmax(), (224, 224))
    assert left_start[1] > 112  # the patient's left joint on the image's right
    regions = series_regions(contours)
    for record in study.ground_truth["lesions"]:
        bits = ((study.masks["STIR_lesions"] >> record["mask_bit"]) & 1).astype(np.float32)
        grid = np.stack([series.frame.image(series.orientation.image(b))[0].numpy() for b in bits])
        own = crop_joint(grid, regions, record["side"], 64)
        other = crop_joint(grid, regions, "right" if record["side"] == "left" else "left", 64)
        assert own.sum() > 20 and other.sum() == 0
        rows, cols = np.nonzero(own.max(axis=0) > 0.5)
        upper = rows.mean() < 32
        toward_image_right = cols.mean() > 32  # levelled crops keep the canonical layout
        if record["type"] == "edema":  # left upper ilium: upper, lateral = towards the patient's left = image right
            assert upper and toward_image_right
        else:  # right lower sacrum: lower, medial = towards the patient's left = image right
            assert not upper and toward_image_right
    crops = crop_joint(series.images, regions, "left", 64)
    assert crops.shape == (len(stir.datasets), 64, 64) and crops.std() > 0
    labels = reader_labels(study.ground_truth["readers"], "left")
    assert set(labels) == {"R1S1", "R1S2", "R1S3", "R2S1", "R2S2", "R2S3", "R1", "R2", "R1R2"}
    assert all(v.shape == (14,) and set(np.unique(v)) <= {-1, 0, 1} for v in labels.values())
    truth = study.ground_truth["readers"]["truth"]["left"]
    used = labels["R1R2"] >= 0
    assert sum(truth.values()) == 1 and truth["edema_upper_ilium"] == 1
    assert used.sum() >= 10


# ---------------------------------------------------------------- contouring training pieces


def test_augmentation_moves_image_maps_and_field_together(coronal_t1):
    from pipeline.chains.t1stir_quadrants.contour import contour_rms_mm
    from pipeline.chains.t1stir_quadrants.train import Augmentation, Similarity, walk_outputs

    polylines, targets, spacing = _middle_slice(coronal_t1)
    image = np.zeros((224, 224), np.float32)
    image[100, 60] = 1.0
    rng = np.random.default_rng(3)
    for _ in range(3):
        move = Similarity.random(rng, 224, Augmentation())
        warped_image, warped = move.warp(image, targets)
        np.testing.assert_allclose(
            np.unravel_index(warped_image.argmax(), warped_image.shape), move.points([100.0, 60.0], 224), atol=1.0
        )
        for joint, walk in walk_outputs(warped).items():
            assert walk.ok, walk.failure
            assert contour_rms_mm(walk.vertices, move.points(polylines[joint], 224), spacing) < 0.6


def test_crop_augmentation_moves_all_slices_alike_and_keeps_lesions_in_their_quadrant():
    """The classifier's augmentation: seeded, one draw for every slice of a crop, small enough that a spot in the
    middle of a quadrant stays in that quadrant; probability 0 leaves crops untouched."""
    from pipeline.chains.t1stir_quadrants.train import Recipe, crop_augmentation
    from pipeline.training import augment_slices

    crop = torch.zeros(4, 1, 64, 64)
    crop[:, :, 12:20, 12:20] = 5.0  # the middle of the upper left quadrant, on every slice
    noiseless = Recipe(crop_noise=0.0)  # the noise is drawn per pixel; the rest once per crop
    runs = [[augment_slices(transform, crop, per_slice=False) for _ in range(20)] for transform in (crop_augmentation(noiseless, 7), crop_augmentation(noiseless, 7))]
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # the seed fixes the draws
    assert any(not torch.equal(out, crop) for out in runs[0])
    for out in runs[0]:
        assert all(torch.equal(out[0], out[k]) for k in range(1, 4))  # one draw for all slices of the crop
        row, col = np.unravel_index(int(out[0, 0].argmax()), (64, 64))
        assert row < 32 and col < 32
    untouched = crop_augmentation(Recipe(crop_probability=0.0), 7)
    assert torch.equal(augment_slices(untouched, crop, per_slice=False), crop)


def test_contour_loss_weights_heatmap_peaks_and_learns_a_batch():
    from pipeline.chains.t1stir_quadrants.model import build_contour_unet, Hyperparameters
    from pipeline.chains.t1stir_quadrants.targets import contour_targets
    from pipeline.chains.t1stir_quadrants.train import contour_loss

    vertices = np.stack([np.linspace(10, 50, 20), np.linspace(40, 44, 20)], axis=1)
    target = torch.tensor(contour_targets({"left": vertices, "right": vertices[:, ::-1] * [1, 0] + [0, 20]}, (64, 64)))[None]
    zero = torch.zeros_like(target)
    peak_only = zero.clone()
    peak_only[:, 0] = target[:, 0]
    assert contour_loss(peak_only, target) < contour_loss(zero, target)
    assert contour_loss(target, target) == 0
    torch.manual_seed(0)
    unet = build_contour_unet(Hyperparameters(unet_features=(8, 8, 16, 16, 32, 8), contour_size=64))
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3, betas=(0.9, 0.999))
    image = torch.randn(1, 1, 64, 64)
    first = contour_loss(unet(image), target).item()
    for _ in range(30):
        optimizer.zero_grad()
        loss = contour_loss(unet(image), target)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_field_loss_weighs_the_band_along_the_joint_line():
    from pipeline.chains.t1stir_quadrants.train import FIELD_WEIGHT, _FIELD, field_weights
    from pipeline.chains.t1stir_quadrants.targets import contour_targets

    vertices = np.stack([np.linspace(60, 160, 60), np.full(60, 80.0)], axis=1)
    target = torch.tensor(contour_targets({"left": vertices, "right": None}, (224, 224)))[None]
    weights = field_weights(target[:, _FIELD])[0]
    on_line, beside, far = weights[0, 110, 80], weights[0, 110, 83], weights[0, 110, 140]
    assert on_line > 0.3 * FIELD_WEIGHT and beside > 0.3 * FIELD_WEIGHT  # where the field turns from tangent to "towards"
    assert far < 1 + 0.1 * FIELD_WEIGHT  # the smooth "towards" field away from the joint
    assert torch.all(weights[1] == 1)  # no right joint on this slice: no field, no extra weight


def test_classifier_learns_a_phantom_joint_through_the_annotator_tree(quadrant_study):
    from pipeline.chains.t1stir_quadrants.annotators import INFERENCE_NODE, AnnotatorHierarchy
    from pipeline.chains.t1stir_quadrants.data import (
        coronal_series,
        crop_joint,
        phantom_contours,
        reader_labels,
        series_regions,
    )
    from pipeline.chains.t1stir_quadrants.model import Hyperparameters, QuadrantLesionClassifier
    from pipeline.chains.t1stir_quadrants.train import joint_loss, normalise_slices

    crops = {}
    for role in ("T1", "STIR"):
        (entry,) = [series for series in quadrant_study.series if series.info.role == role]
        first = entry.datasets[0]
        series = coronal_series(role, [d.pixel_array for d in entry.datasets], first.ImageOrientationPatient, first.PixelSpacing)
        regions = series_regions(phantom_contours(series, quadrant_study.masks[f"{role}_joint_line"]))
        crops[role] = torch.from_numpy(normalise_slices(crop_joint(series.images, regions, "left", 32)))[:, None]
    labels = {k: torch.from_numpy(v).long() for k, v in reader_labels(quadrant_study.ground_truth["readers"], "left").items()}
    torch.manual_seed(0)
    classifier = QuadrantLesionClassifier(Hyperparameters(widen_factor=0.125, roi_size=32))
    annotators = AnnotatorHierarchy(len(GRADED_OUTPUTS))
    optimizer = torch.optim.Adam([*classifier.parameters(), *annotators.parameters()], lr=1e-3)
    classifier.eval()  # one joint: batch-norm statistics of a single case would be meaningless
    first = joint_loss(classifier, annotators, crops["T1"], crops["STIR"], labels).item()
    for _ in range(15):
        optimizer.zero_grad()
        loss = joint_loss(classifier, annotators, crops["T1"], crops["STIR"], labels)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    with torch.no_grad():
        consensus = annotators(torch.sigmoid(classifier(crops["T1"], crops["STIR"])))[INFERENCE_NODE][0]
    edema = GRADED_OUTPUTS.index("edema_upper_ilium")
    assert consensus[edema] > 0.5 and consensus.argmax() == edema  # the one lesion of this joint


# ---------------------------------------------------------------- the chain, the trainer and the evaluation

DEMO_PACK = __import__("pathlib").Path(__file__).resolve().parent.parent / "packs" / "t1stir-quadrants-demo"
needs_demo_pack = pytest.mark.skipif(not (DEMO_PACK / "manifest.yaml").is_file(), reason="packs/t1stir-quadrants-demo is not committed yet")


def _series_inputs(study, folder):  # noqa: ANN001, ANN202
    from pipeline.chains import SeriesInput
    from pipeline.phantom import write_study

    written = write_study(study, folder)
    return {
        key: SeriesInput(key, "1.2.3." + key[-1], tuple(sorted(written.glob(f"*_{role}/*.dcm"))))
        for key, role in (("t1", "T1"), ("stir", "STIR"))
    }


def _demo_chain():  # noqa: ANN202
    from pipeline.chains import RuntimeSettings
    from pipeline.chains.t1stir_quadrants.chain import T1STIRQuadrantsChain
    from pipeline.route import ChainSpec

    spec = ChainSpec(
        name="t1stir-quadrants",
        implementation="pipeline.chains.t1stir_quadrants.chain:T1STIRQuadrantsChain",
        pack=str(DEMO_PACK),
        requires=[{"role": "T1", "planes": ["coronal"], "name": "t1"}, {"role": "STIR", "planes": ["coronal"], "name": "stir", "optional": True}],
        options={"gradcam_limit": 2},
    )
    return T1STIRQuadrantsChain(spec, RuntimeSettings(torch_threads=1))


@needs_demo_pack
@pytest.mark.slow
def test_chain_decides_every_quadrant_of_both_joints_from_its_networks_alone(tmp_path) -> None:  # noqa: ANN001
    """A left lower-ilium edema phantom (DICOM files only: no mask or ground truth reaches the chain) through the
    demonstration pack."""
    from pipeline.chains import StudyInputs
    from pipeline.phantom import generate_study
    from pipeline.results import Laterality, MapMeaning, Region, Scope, Site

    study = generate_study(94002, kinds=("mri",), lesions={"lesions": [{"type": "edema", "side": "left", "quadrant": "lower_ilium", "severity": "severe"}]})
    inputs = _series_inputs(study, tmp_path)
    for path in tmp_path.glob("*/ground_truth.json"):
        path.unlink()
    for path in tmp_path.glob("*/masks.npz"):
        path.unlink()
    chain = _demo_chain()
    result = chain.run(StudyInputs(study.study_uid, inputs))
    assert result.not_analysed is None, result.not_analysed
    quadrant = [f for f in result.findings if f.scope is Scope.QUADRANT]
    per_side = [f for f in result.findings if f.scope is Scope.SIDE]
    assert len(quadrant) == 24 and len(per_side) == 4 and len(result.findings) == 28  # the paper's 28 outputs per patient
    assert {f.concept.meaning for f in per_side} == {"Subchondral sclerosis", "Ankylosis"}
    assert all(f.site is Site.SACROILIAC_JOINT for f in per_side)
    # every probability is the network's consensus output for that joint (nothing from ground truth, which was deleted)
    assert {f.laterality for f in result.findings} == {Laterality.LEFT, Laterality.RIGHT}
    assert {(f.site, f.region) for f in quadrant} == {(site, region) for site in (Site.ILIUM, Site.SACRUM) for region in Region}
    # the contours: the joint lines traced on each sequence's key slice (at most a left and a right one per
    # sequence; the demo pack traces only some), an overlay where both sides were traced
    assert 1 <= len(result.contours) <= 4 and {c.laterality for c in result.contours} <= {Laterality.LEFT, Laterality.RIGHT}
    sources = {str(ds.SOPInstanceUID) for ds in result.sources}
    assert all(c.source.sop_instance_uid in sources and c.length_mm > 0 for c in result.contours)
    overlays = [m for m in result.maps if m.meaning is MapMeaning.SEGMENTATION]
    assert len(overlays) <= 2 and all(m.categorical for m in overlays)
    cams = [m for m in result.maps if m.meaning is MapMeaning.GRAD_CAM]
    present = [f for f in result.findings if f.present]
    assert len(cams) <= min(2, len(present)) and all("Grad-CAM" in m.caption for m in cams)
    for cam in cams:  # each explains a Present finding: its peak is at most that finding's probability
        assert float(cam.values.max()) <= max(f.probability for f in present) + 1e-6
    assert "contour and classify" in result.provenance.timings_s

    without_stir = chain.run(StudyInputs(study.study_uid, {"t1": inputs["t1"]}))
    assert without_stir.not_analysed is not None and "STIR" in without_stir.not_analysed.detail and not without_stir.findings


@pytest.mark.slow
def test_train_and_evaluate_through_the_cli_on_three_phantoms(tmp_path) -> None:  # noqa: ANN001
    """``sijnode train t1stir-quadrants`` (one epoch, both phases) then ``sijnode evaluate``: a loadable pack and the shared report."""
    import json

    from node.cli import main
    from pipeline.packs import load_pack
    from pipeline.phantom import generate_study, write_study

    for seed in (94201, 94202, 94203):
        write_study(generate_study(seed, kinds=("mri",), lesions="random"), tmp_path / "data")
    assert main(["train", "t1stir-quadrants", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "pack"), "--epochs", "1", "--json"]) == 0
    pack = load_pack(tmp_path / "pack")
    training = json.loads((pack.folder / "training.json").read_text())
    assert set(training["phases"]) == {"contouring U-Net", "lesion classifier"}
    assert [o.name for o in pack.manifest.outputs] == list(GRADED_OUTPUTS)
    assert pack.manifest.architecture.hyperparameters["networks"]["contour_size"] == 224
    write_study(generate_study(94204, kinds=("mri",), lesions="none"), tmp_path / "held")
    assert main(["evaluate", str(pack.folder), "--data", str(tmp_path / "held"), "--json"]) == 0
    report = json.loads((pack.folder / "evaluation.json").read_text())
    assert set(report["outputs"]) == set(GRADED_OUTPUTS)
    assert [c["study"] for c in report["cases"]] == ["SYNTH-94204:left", "SYNTH-94204:right"]
    assert report["contour_error"]["joints_on_slices"] > 0 and "pooled" in report
    assert (pack.folder / "contour_error.png").stat().st_size > 0 and (pack.folder / "roc.png").stat().st_size > 0
    # the classifier learnt from the regions of the contours its U-Net walks, or, where a one-epoch U-Net walks
    # none, from the true joint lines; the validation joints say which
    assert training["recipe"]["classifier_regions"] == "walked"
    validation = pack.manifest.evaluation["validation"]
    assert validation["joints_on_walked_regions"] <= validation["joints"] == 2 * len(training["split"]["validation"])

    # the classifier trained again from this pack: the U-Net's weights kept bit for bit, the classifier's changed
    from pipeline.chains.t1stir_quadrants.train import train

    retrain = ["--base", str(pack.folder), "--retrain", "classifier"]
    assert main(["train", "t1stir-quadrants", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "again"), "--epochs", "1", "--json", *retrain]) == 0
    again = load_pack(tmp_path / "again")
    before, after = pack.load_state_dict(), again.load_state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("contour."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("classifier."))
    report = json.loads((again.folder / "training.json").read_text())
    assert set(report["phases"]) == {"lesion classifier"} and report["base"]["kept"] == ["contouring"]
    assert report["split"] == training["split"]  # the base's studies stay on their side of its split
    with pytest.raises(ValueError, match="phases"):
        train(tmp_path / "data", tmp_path / "none", epochs=1, progress=False, phases=("classifier",))
    with pytest.raises(ValueError, match="phases"):
        train(tmp_path / "data", tmp_path / "none", epochs=1, progress=False, base=pack, phases=("classifier", "denoiser"))


def test_thresholds_reach_the_specificity_asked_for_on_the_validation_joints() -> None:
    from pipeline.chains.t1stir_quadrants.train import lesion_thresholds
    from pipeline.evaluation import specific_threshold

    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.2).astype(int)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0, 1).astype(np.float32)
    for specificity in (0.9, 0.95, 0.99):
        cut = specific_threshold(labels, scores, specificity)
        assert np.mean(scores[labels == 0] < cut) >= specificity
        assert cut == round(cut, 4)  # on the manifest's grid, and still above the negatives it must keep below
        # the lowest such cut-off: one grid step lower, one more negative would reach it
        assert np.mean(scores[labels == 0] < cut - 1e-4) < specificity or cut - 1e-4 <= scores[labels == 0].min()
    truth = np.zeros((100, len(GRADED_OUTPUTS)), int)
    values = rng.random((100, len(GRADED_OUTPUTS)))
    truth[:20] = 1
    values[:20] += 0.5  # positives score higher: Youden's cut-off lies low, the specificity rule raises it
    youden = lesion_thresholds(truth, values)
    strict = lesion_thresholds(truth, values, 0.99)
    assert set(strict) == set(youden) and all(strict[k] >= youden[k] for k in strict)
    negatives = values[20:, [GRADED_OUTPUTS.index(o) for o in GRADED_OUTPUTS if o.startswith("fat")]].ravel()
    assert np.mean(negatives < strict["fat"]) >= 0.99


def test_walked_contours_on_the_wrong_half_are_dropped() -> None:
    from pipeline.chains.t1stir_quadrants.inference import consistent_contours

    line = np.stack([np.linspace(80, 130, 20), np.linspace(150, 160, 20)], axis=1)  # a left joint: image right
    mirrored = line * [1, -1] + [0, 223]
    contours = [{"left": line + [k * 0.5, 0], "right": mirrored} for k in range(5)]
    contours.append({"left": line + [40, 0], "right": mirrored})  # 40 px lower: joint ends move between slices, kept
    contours.append({"left": mirrored, "right": None})  # "left" traced on the patient's right half
    kept, dropped = consistent_contours(contours, 224)
    assert dropped == [{}] * 6 + [{"left": "on the other joint's half of the image"}]
    assert [c["left"] is not None for c in kept] == [True] * 6 + [False]
    assert all(c["right"] is not None for c in kept[:6])


def test_only_confident_contours_shape_the_regions() -> None:
    """A stray walk the network is unsure of (here 60 px off) neither tilts nor widens its joint's region."""
    from types import SimpleNamespace

    from pipeline.chains.t1stir_quadrants.data import series_regions
    from pipeline.chains.t1stir_quadrants.inference import SeriesContours, confident_contours, regions_of

    line = np.stack([np.linspace(80, 130, 20), np.linspace(150, 160, 20)], axis=1)  # left joint: image right
    mirrored = line * [1, -1] + [0, 223]
    contours = [{"left": line, "right": mirrored} for _ in range(4)] + [{"left": line + [60, 30], "right": mirrored}]
    confidence = [{"left": 0.8, "right": 0.7}] * 4 + [{"left": 0.3, "right": 0.7}]
    grid = SimpleNamespace(frame=SimpleNamespace(size=224))  # regions need only the grid's size
    contoured = SeriesContours("T1", [], grid, contours, confidence=confidence)  # type: ignore[arg-type]
    kept = confident_contours(contoured)
    assert [c["left"] is not None for c in kept] == [True] * 4 + [False] and all(c["right"] is not None for c in kept)
    with_stray = series_regions(contours, 224)
    without = series_regions(contours[:4], 224)
    assert regions_of(contoured).boxes == without.boxes != with_stray.boxes
