"""t2fs-mil as the paper builds it: 3-channel ImageNet input, 8-bit → resize → equalise, two
classes with softmax, and the importer for a torchvision ResNet-18 + gated-attention checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.chains.t2fs_mil.importer import import_paper_checkpoint
from pipeline.chains.t2fs_mil.inference import load_model, predict
from pipeline.chains.t2fs_mil.model import INFLAMED, PAPER_HYPERPARAMETERS, build_model
from pipeline.chains.t2fs_mil.preprocess import IMAGENET_MEAN, IMAGENET_STD, PAPER_PREPROCESSING, preprocess_slices
from pipeline.chains.checkpoints import WeightsImportError
from pipeline.training import count_parameters

#: torchvision's ResNet-18 parameter and buffer names, written out (torchvision is not installed)
def torchvision_resnet18_keys() -> list[str]:
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight", *(f"bn1.{b}" for b in bn)]
    for stage in range(1, 5):
        for block in range(2):
            name = f"layer{stage}.{block}"
            keys += [f"{name}.conv1.weight", *(f"{name}.bn1.{b}" for b in bn), f"{name}.conv2.weight", *(f"{name}.bn2.{b}" for b in bn)]
            if stage > 1 and block == 0:
                keys += [f"{name}.downsample.0.weight", *(f"{name}.downsample.1.{b}" for b in bn)]
    return keys


def paper_checkpoint(seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A randomly initialised paper-layout network and its state dict under the paper's names."""
    torch.manual_seed(seed)
    model = build_model(PAPER_HYPERPARAMETERS).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    heads = {
        "attention.V": "attention_V.0", "attention.U": "attention_U.0", "attention.w": "attention_weights", "classifier": "classifier.0",
    }
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("encoder."):
            state["feature_extractor." + key.removeprefix("encoder.")] = value.clone()
        else:
            module, _, leaf = key.rpartition(".")
            state[f"{heads[module]}.{leaf}"] = value.clone()
    state["feature_extractor.fc.weight"] = torch.zeros(1000, 512)
    state["feature_extractor.fc.bias"] = torch.zeros(1000)
    return model, state


def test_the_paper_network_has_torchvisions_module_tree_and_size() -> None:
    model = build_model(PAPER_HYPERPARAMETERS)
    encoder = [k.removeprefix("encoder.") for k in model.state_dict() if k.startswith("encoder.")]
    assert encoder == torchvision_resnet18_keys()
    assert model.encoder.conv1.weight.shape == (64, 3, 7, 7)
    assert model.classifier.weight.shape == (2, 512)
    # torchvision ResNet-18 without fc: 11,176,512; gated attention 2×(512·128+128) + 129; classifier 1,026
    assert count_parameters(model) == 11_176_512 + 2 * (512 * 128 + 128) + 129 + 1_026


def test_paper_preprocessing_is_8_bit_resize_equalise_then_imagenet_on_three_channels() -> None:
    rng = np.random.default_rng(0)
    slices = [rng.gamma(2.0, 150.0, (110, 256)).astype(np.float32) for _ in range(3)]  # the paper's 110×256 matrix
    bag = preprocess_slices(slices, 64, PAPER_PREPROCESSING["recipe"])
    assert bag.shape == (3, 3, 64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    unit = bag * std + mean  # back to [0, 1]
    assert torch.allclose(unit[:, 0], unit[:, 1], atol=1e-5) and torch.allclose(unit[:, 0], unit[:, 2], atol=1e-5)
    assert float(unit.min()) >= -1e-5 and float(unit.max()) <= 1 + 1e-5
    counts = np.histogram(unit[0, 0].numpy(), bins=8, range=(0, 1))[0]
    assert counts.min() > 0.5 * counts.mean(), "histogram equalisation spreads the values"


def test_a_paper_layout_checkpoint_imports_bit_exactly_and_predicts_the_same(tmp_path: Path) -> None:
    source, state = paper_checkpoint()
    torch.save({"state_dict": state}, tmp_path / "mil.pt")
    pack = import_paper_checkpoint(tmp_path / "mil.pt", tmp_path / "pack")
    pack.verify()
    assert pack.manifest.preprocessing["recipe"] == "keskin2026-t2fs-paper"
    assert "dropped: feature_extractor.fc.weight, feature_extractor.fc.bias" in pack.manifest.training_data
    model = load_model(pack)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    bag = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        expected = torch.softmax(source.forward_bag(bag).logit, dim=-1)[INFLAMED]
    assert predict(model, bag, tta=False).probability == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("attention_U.0.bias"), "missing key(s): attention.U.bias"),
        (lambda s: s.__setitem__("attention_weights.weight", torch.zeros(1, 64)), "attention.w.weight has shape (1, 64), expected (1, 128)"),
        (lambda s: s.__setitem__("feature_extractor.layer5.0.conv1.weight", torch.zeros(1)), "unexpected key(s)"),
        (lambda s: s.__setitem__("classifier.0.weight", torch.zeros(1, 512)), "classifier.weight has shape (1, 512), expected (2, 512)"),
    ],
)
def test_the_importer_refuses_a_checkpoint_that_does_not_fit(tmp_path: Path, change: object, message: str) -> None:
    _, state = paper_checkpoint()
    change(state)  # type: ignore[operator]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsImportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_paper_checkpoint(tmp_path / "bad.pt", tmp_path / "pack")
    assert not (tmp_path / "pack").exists(), "nothing is written"
