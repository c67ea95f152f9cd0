"""Every fp32 runtime of ``pipeline.chains.base.PreparedNetwork`` keeps xr-anatomy within its
golden-output tolerances (tests/test_xr_anatomy_golden.py), and computes what eager computes.

``compile`` (torch.compile) is left out here: it compiles for minutes on a 2-core machine;
bench/xr_anatomy --runtimes compile measures it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydicom import dcmread

from pipeline.chains import base
from pipeline.chains.xr_anatomy.model import build_segmenter
from tests import test_xr_anatomy_golden as golden_test

RUNTIMES = ["torchscript", "onednn", "channels_last", "onnxruntime"]


@pytest.fixture
def runtime(request: pytest.FixtureRequest):
    base.set_runtime(request.param)
    yield request.param
    base.set_runtime("eager")


@pytest.mark.parametrize("runtime", RUNTIMES, indirect=True)
def test_each_runtime_keeps_the_golden_outputs(runtime: str) -> None:
    golden = json.loads(golden_test.GOLDEN.read_text())
    model = golden_test._model()
    assert model.segmenter.runtime == runtime and model.classifier.runtime == runtime
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = golden_test.summary(model.analyze(dcmread(golden_test.INPUT), with_gradcam=True))
    finally:
        torch.set_num_threads(before)
    assert got["probability"] == pytest.approx(golden["probability"], abs=golden_test.PROBABILITY_TOLERANCE)
    assert np.abs(np.subtract(got["crop_box"], golden["crop_box"])).max() <= golden_test.BOX_TOLERANCE_PX
    np.testing.assert_allclose(got["class_pixels"], golden["class_pixels"], rtol=golden_test.CLASS_COUNT_TOLERANCE)
    assert got["gradcam"]["argmax"] == golden["gradcam"]["argmax"]
    assert got["gradcam"]["sum"] == pytest.approx(golden["gradcam"]["sum"], rel=1e-3)


@pytest.mark.parametrize("name", RUNTIMES)
def test_each_runtime_computes_what_eager_computes(name: str) -> None:
    torch.manual_seed(0)
    network = build_segmenter({"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 2, "classes": 4}).eval()
    prepared = base.PreparedNetwork(network, name)
    x, other_shape = torch.randn(1, 1, 96, 96), torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected, expected_other = network(x), network(other_shape)
    with base.inference_context():
        got, got_other = prepared(x), prepared(other_shape)  # each shape prepared on its first call
        again = prepared(x)
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-5 * scale
    assert float((got_other - expected_other).abs().max()) <= 1e-5 * scale
    assert torch.equal(again, got)
    with pytest.raises(ValueError, match="runtime must be one of"):
        base.set_runtime("tensorrt")


def test_the_lighter_grad_cam_draws_the_same_map_as_a_full_backward_pass() -> None:
    """xr-anatomy's Grad-CAM stops its backward pass at the target block (backward_from); MONAI's
    GradCAM over the whole network (every parameter requiring gradients) draws the same map."""
    import copy

    from monai.visualize import GradCAM

    from pipeline.cam import normalize_cam
    from pipeline.chains.xr_anatomy.inference import POSITIVE_CLASS, EigenGradCAM, last_block
    from pipeline.chains.xr_anatomy.preprocess import radiograph_gray

    model = golden_test._model()
    full_network = copy.deepcopy(model.networks.classifier)
    gray = radiograph_gray(dcmread(golden_test.INPUT))
    _, x = model.classify(gray[: gray.shape[0] // 2, : gray.shape[1] // 2])
    lighter = model.gradcam_on_input(x)
    assert not model.networks.classifier.conv1.weight.requires_grad  # the trunk records no gradients
    assert all(p.requires_grad for p in full_network.parameters())
    kind = EigenGradCAM if model.eigen_smooth else GradCAM
    full = kind(nn_module=full_network, target_layers=last_block(full_network), postprocessing=normalize_cam)
    target = POSITIVE_CLASS if model.gradcam_class == "positive" else model.predicted_class(x)
    with torch.enable_grad():
        reference = full(x[None], class_idx=target)[0, 0]
    assert float(lighter.abs().max()) > 0
    assert float((lighter - reference).abs().max()) <= 1e-6
