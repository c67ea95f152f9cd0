"""The xr-anatomy chain: published architecture, preprocessing, joint regions, the importer,
Grad-CAM, the committed demo pack on phantoms, and the patient's sides in the overlay."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import skimage
import torch
from monai.networks.nets import UNet
from monai.visualize.class_activation_maps import default_normalizer
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage
from torch import nn

from pipeline.chains import RuntimeSettings, SeriesInput, StudyInputs
from pipeline.chains.xr_anatomy.chain import (
    HIGH_CONFIDENCE_NOTE,
    PROGRESSION_EVIDENCE,
    XRAnatomyChain,
)
from pipeline.chains.xr_anatomy.data import PhantomRadiograph
from pipeline.chains.xr_anatomy.importer import (
    WeightsImportError,
    classifier_state_dict,
    import_anatomy_aware,
    segmenter_state_dict,
)
from pipeline.chains.xr_anatomy.inference import AnatomyAwareModel, normalize_cam
from pipeline.chains.xr_anatomy.joints import (
    Box,
    JointRegionError,
    dilate_square,
    ilium_classes,
    joint_regions,
)
from pipeline.chains.xr_anatomy.model import (
    PUBLISHED_HYPERPARAMETERS,
    PUBLISHED_PREPROCESSING,
    Networks,
    build_classifier,
    build_segmenter,
    load_networks,
)
from pipeline.chains.xr_anatomy.preprocess import (
    ClassificationSettings,
    SegmentationSettings,
    classifier_input,
    enhance,
    map_to_crop,
    radiograph_gray,
    segmenter_input,
)
from pipeline.chains.xr_anatomy.train import split
from pipeline.packs import load_pack
from pipeline.phantom import generate_study, write_study
from pipeline.results import ChainResult, Laterality, MapMeaning, Scope, Site
from pipeline.route import ChainSpec
from pipeline.training import count_parameters

REPO = Path(__file__).resolve().parent.parent
DEMO_PACK = REPO / "packs" / "xr-anatomy-demo"
IMPLEMENTATION = "pipeline.chains.xr_anatomy.chain:XRAnatomyChain"

# Phantoms the committed demo pack is checked on (outside its training and evaluation seeds).
NEGATIVE_SEED, NEGATIVE_SPEC = 90011, "none"
POSITIVE_SEED, POSITIVE_SPEC = 90012, {"lesions": [], "mny_grade": {"left": 3, "right": 3}}

PUBLISHED_SEGMENTATION = SegmentationSettings.from_manifest(PUBLISHED_PREPROCESSING)
PUBLISHED_CLASSIFICATION = ClassificationSettings.from_manifest(PUBLISHED_PREPROCESSING)


# --- a torchvision ResNet-50 in plain torch: the layout the published checkpoint has ------------
class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: the stride on the 3×3 convolution)."""

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class TorchvisionResNet50(nn.Module):
    """resnet50() with the published one-channel conv1 and head (``fc`` Sequential)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for index, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))
            layers = [Bottleneck(inplanes, planes, stride, downsample)]
            inplanes = planes * 4
            layers += [Bottleneck(inplanes, planes, 1, None) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(), nn.BatchNorm1d(1024), nn.Dropout(0), nn.Linear(1024, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torchvision_keys() -> list[str]:
    """The published checkpoint's parameter names, written out from torchvision's resnet50 layout."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight", *(f"bn1.{p}" for p in bn)]
    for layer, blocks in zip(range(1, 5), (3, 4, 6, 3)):
        for block in range(blocks):
            stem = f"layer{layer}.{block}"
            for i in (1, 2, 3):
                keys += [f"{stem}.conv{i}.weight", *(f"{stem}.bn{i}.{p}" for p in bn)]
            if block == 0:
                keys += [f"{stem}.downsample.0.weight", *(f"{stem}.downsample.1.{p}" for p in bn)]
    keys += ["fc.0.weight", "fc.0.bias", *(f"fc.2.{p}" for p in bn), "fc.4.weight", "fc.4.bias"]
    return keys


def randomize_batchnorm(module: nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode outputs test every tensor."""
    generator = torch.Generator().manual_seed(seed)
    for child in module.modules():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = child.num_features
            child.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            child.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            child.weight.data.copy_(1 + 0.1 * torch.randn(n, generator=generator))
            child.bias.data.copy_(0.1 * torch.randn(n, generator=generator))
            child.num_batches_tracked.fill_(7)


def lightning_checkpoint(model: nn.Module) -> dict:
    """A checkpoint as PyTorch Lightning writes it for a LightningModule holding ``self.model``."""
    return {
        "epoch": 24,
        "global_step": 3125,
        "pytorch-lightning_version": "2.2.1",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"only_fc": False, "max_lr": 0.001, "wd": 0.0001, "first_dropout": 0.1},
        "loops": {},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
    }


# --- architecture ----------------------------------------------------------------------------
def test_published_segmenter_is_the_monai_unet_of_the_paper() -> None:
    unet = build_segmenter(PUBLISHED_HYPERPARAMETERS["segmenter"])
    reference = UNet(spatial_dims=2, in_channels=1, out_channels=4, channels=(64, 128, 256, 512), strides=(2, 2, 2), num_res_units=3)
    assert count_parameters(unet) == count_parameters(reference) == 9_541_545
    assert {k: v.shape for k, v in unet.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    with torch.no_grad():
        assert unet.eval()(torch.zeros(1, 1, 64, 64)).shape == (1, 4, 64, 64)


def test_published_classifier_is_resnet50_with_the_published_head() -> None:
    resnet = build_classifier(PUBLISHED_HYPERPARAMETERS["classifier"])
    reference = TorchvisionResNet50()
    assert list(reference.state_dict()) == torchvision_keys()
    assert {k: v.shape for k, v in resnet.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert count_parameters(resnet) == count_parameters(reference) == 25_604_034
    assert resnet.conv1.weight.shape == (64, 1, 7, 7) and resnet.conv1.stride == (2, 2)
    assert all(m[0].bias is None for m in (resnet.layer1[0].downsample, resnet.layer4[0].downsample))
    assert [type(m) for m in resnet.fc] == [nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert (resnet.fc[0].in_features, resnet.fc[0].out_features, resnet.fc[4].out_features) == (2048, 1024, 2)
    with torch.no_grad():
        assert resnet.eval()(torch.zeros(2, 1, 64, 96)).shape == (2, 2)


# --- preprocessing ---------------------------------------------------------------------------
def test_segmenter_input_is_768_square_in_minus_one_to_one() -> None:
    gray = np.random.default_rng(0).random((300, 420)).astype(np.float32)
    x = segmenter_input(gray, PUBLISHED_SEGMENTATION)
    assert x.shape == (1, 1, 768, 768)
    assert float(x.min()) == pytest.approx(-1.0) and float(x.max()) == pytest.approx(1.0)


def test_classifier_input_is_416_by_628_with_the_longest_side_resized_and_padding_symmetric() -> None:
    crop = np.random.default_rng(1).random((470, 1021)).astype(np.float32)
    x = classifier_input(crop, PUBLISHED_CLASSIFICATION)
    assert x.shape == (1, 416, 628)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    rows = np.flatnonzero(x[0].abs().sum(axis=1).numpy() > 0)  # the 1021 → 628 resize gives 289 rows
    assert (rows[0], 416 - 1 - rows[-1]) == (63, 64) and rows.size == 289
    # Maps on the input go back onto the crop: everything inside the image region lands on the crop.
    back = map_to_crop(torch.ones(416, 628), x, PUBLISHED_CLASSIFICATION)
    assert back.shape == crop.shape and np.allclose(back, 1.0, atol=1e-5)


def test_enhancement_matches_the_published_skimage_steps_on_a_one_plane_volume() -> None:
    crop = np.random.default_rng(2).random((90, 140)) * 200
    # The published CustomCLAHE, step by step, on the (1, H, W) array it was given.
    im = skimage.exposure.rescale_intensity(crop[None], in_range="image", out_range=(0, 1))
    im_noi = skimage.filters.median(im)
    im_fil = im_noi - 0.6 * skimage.filters.gaussian(im_noi, sigma=1)
    im_fil = skimage.exposure.rescale_intensity(im_fil, in_range="image", out_range=(0, 1))
    published = skimage.exposure.equalize_adapthist(im_fil, kernel_size=None, clip_limit=0.01)[0]
    np.testing.assert_allclose(enhance(crop, PUBLISHED_CLASSIFICATION), published, atol=1e-6)


def _radiograph(pixels: np.ndarray, photometric: str = "MONOCHROME2", orientation: tuple[str, str] = ("L", "F")) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation = photometric
    ds.PatientOrientation = list(orientation)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def test_grayscale_is_the_displayed_image_on_256_levels() -> None:
    ramp = np.tile(np.linspace(0, 4095, 300), (20, 1))
    normal = radiograph_gray(_radiograph(ramp))
    inverted = radiograph_gray(_radiograph(ramp, "MONOCHROME1"))
    assert np.unique(normal).size <= 256 and normal.dtype == np.float32
    assert normal[0, 0] < normal[0, -1] and inverted[0, 0] > inverted[0, -1]
    np.testing.assert_allclose(normal + inverted, 1.0, atol=1.5 / 255)


class BrightIsSacrum(nn.Module):
    """A stand-in segmenter: class 1 (sacrum) where its input is bright, background elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 4, *x.shape[2:])
        logits[:, 1] = x[:, 0]
        return logits


@pytest.mark.parametrize("transpose", [False, True])
def test_segmentation_comes_back_in_the_radiographs_row_and_column_order(transpose: bool) -> None:
    gray = np.zeros((90, 150), dtype=np.float32)
    gray[10:30, 100:140] = 1.0
    preprocessing = {
        **PUBLISHED_PREPROCESSING,
        "segmentation": {"size": [64, 64], "gaussian_sigma": 0.1, "roi_size": [64, 64], "overlap": 0.75, "transpose": transpose},
    }
    model = AnatomyAwareModel(Networks(BrightIsSacrum(), nn.Identity()), preprocessing)  # type: ignore[arg-type]
    network_input = segmenter_input(gray, model.segmentation)[0, 0]
    # the block (rows 10-29, columns 100-139) is at (14, 50) on the 64×64 grid, or at (50, 14) transposed
    assert bool(network_input[14, 50] > 0) is (not transpose) and bool(network_input[50, 14] > 0) is transpose
    labels = model.segment(gray)
    assert labels.shape == gray.shape
    np.testing.assert_allclose(Box.of(labels == 1).as_list(), [10, 100, 30, 140], atol=3)


# --- joint regions ---------------------------------------------------------------------------
def _pelvis() -> np.ndarray:
    """Sacrum (1) 100 columns wide; ilium 2 two columns right of it, ilium 3 two columns left."""
    labels = np.zeros((200, 300), dtype=np.uint8)
    labels[50:151, 100:200] = 1  # bounding-box width (last − first column) 99 → dilation round(4.95) = 5
    labels[60:161, 202:280] = 2
    labels[40:161, 20:98] = 3
    return labels


def test_joint_region_is_the_sacrum_dilated_by_5_percent_of_its_width_intersected_with_each_ilium() -> None:
    crop = joint_regions(_pelvis(), {"left": 2, "right": 3})
    assert crop.dilation_px == 5
    assert crop.regions["left"].box == Box(60, 202, 156, 205)  # rows 45..155 of the dilation ∩ ilium rows 60..160
    assert crop.regions["right"].box == Box(45, 95, 156, 98)
    assert crop.box == Box(45, 95, 156, 205) and crop.fallbacks == {}


def test_square_dilation_equals_binary_dilation() -> None:
    mask = np.random.default_rng(3).random((80, 90)) > 0.97
    expected = ndimage.binary_dilation(mask, structure=np.ones((9, 9), dtype=bool))
    np.testing.assert_array_equal(dilate_square(mask, 4), expected)


def test_joint_region_keeps_the_largest_component_per_side() -> None:
    labels = _pelvis()
    labels[46:50, 202:204] = 2  # a small ilium island inside the dilated sacrum, above the joint
    crop = joint_regions(labels, {"left": 2, "right": 3})
    assert crop.regions["left"].box.r0 == 60  # the island (rows 46-49) is dropped


def test_joint_region_falls_back_to_the_median_height_band_and_then_to_the_mirror_image() -> None:
    labels = _pelvis()
    labels[labels == 3] = 0
    labels[40:161, 20:60] = 3  # the right ilium, far from the sacrum: no intersection
    crop = joint_regions(labels, {"left": 2, "right": 3})
    assert crop.fallbacks == {"right": "median-height band"}
    assert crop.regions["right"].box == Box(40, 15, 161, 64)  # every column has the median height; ±5 columns

    labels[labels == 3] = 0  # no right ilium at all: mirror the left region about the sacrum's middle
    crop = joint_regions(labels, {"left": 2, "right": 3})
    assert crop.fallbacks == {"right": "mirrored"}
    assert crop.regions["right"].box == Box(60, 95, 156, 98)

    with pytest.raises(JointRegionError, match="no sacrum"):
        joint_regions(np.where(labels == 1, 0, labels), {"left": 2, "right": 3})


def test_ilium_sides_follow_the_image_orientation_not_the_class_numbers() -> None:
    labels = _pelvis()  # class 2 lies on the image's right
    assert ilium_classes(labels, 2, 3, left_on_image_right=True) == {"left": 2, "right": 3}
    assert ilium_classes(labels, 2, 3, left_on_image_right=False) == {"left": 3, "right": 2}
    assert ilium_classes(labels[:, ::-1], 2, 3, left_on_image_right=True) == {"left": 3, "right": 2}


# --- the importer ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def published_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Checkpoints in exactly the published layout, with random (but non-trivial) weights."""
    torch.manual_seed(11)
    root = tmp_path_factory.mktemp("published")
    resnet = TorchvisionResNet50().eval()
    randomize_batchnorm(resnet, 12)
    unet = UNet(spatial_dims=2, in_channels=1, out_channels=4, channels=(64, 128, 256, 512), strides=(2, 2, 2), num_res_units=3).eval()
    checkpoint = lightning_checkpoint(resnet)
    checkpoint["state_dict"]["criterion.pos_weight"] = torch.tensor([1.5])  # a Lightning module's loss buffer
    torch.save(checkpoint, root / "classification_model.ckpt")
    torch.save({"network": unet.state_dict(), "epoch": 80}, root / "segmentation_model.pt")
    return {"root": root, "resnet": resnet, "unet": unet, "checkpoint": checkpoint}


def test_imported_pack_gives_the_outputs_of_the_published_modules(published_files: dict, tmp_path: Path) -> None:
    root = published_files["root"]
    pack = import_anatomy_aware(root / "classification_model.ckpt", root / "segmentation_model.pt", tmp_path / "pack")
    assert load_pack(tmp_path / "pack", chain="xr-anatomy").manifest.demo is False
    assert pack.manifest.output("radiographic_sacroiliitis").threshold == 0.59
    assert "criterion.pos_weight" in pack.manifest.training_data  # ignored keys are reported
    networks = load_networks(pack.manifest.architecture.hyperparameters, pack.load_state_dict())
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(2, 1, 96, 128, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(networks.classifier(x), published_files["resnet"](x))
        image = torch.rand(1, 1, 64, 64, generator=generator)
        torch.testing.assert_close(networks.segmenter(image), published_files["unet"](image))


def test_importer_names_missing_and_misshapen_keys(published_files: dict, tmp_path: Path) -> None:
    state = published_files["checkpoint"]["state_dict"]

    missing = {**published_files["checkpoint"], "state_dict": {k: v for k, v in state.items() if k != "model.layer3.2.bn2.running_var"}}
    with pytest.raises(WeightsImportError, match=r"missing key\(s\): layer3\.2\.bn2\.running_var"):
        classifier_state_dict(missing)

    wrong = {**published_files["checkpoint"], "state_dict": {**state, "model.fc.4.weight": torch.zeros(3, 1024)}}
    with pytest.raises(WeightsImportError, match=r"fc\.4\.weight has shape \(3, 1024\), expected \(2, 1024\)"):
        classifier_state_dict(wrong)

    extra = {**published_files["checkpoint"], "state_dict": {**state, "model.fc.6.weight": torch.zeros(2, 2)}}
    with pytest.raises(WeightsImportError, match=r"model\.fc\.6\.weight has no MONAI counterpart"):
        classifier_state_dict(extra)

    with pytest.raises(WeightsImportError, match="no 'network' entry"):
        segmenter_state_dict({"model": {}})
    unet_state = dict(published_files["unet"].state_dict())
    unet_state["model.0.conv.unit0.conv.weight"] = torch.zeros(64, 1, 5, 5)
    with pytest.raises(WeightsImportError, match=r"model\.0\.conv\.unit0\.conv\.weight has shape \(64, 1, 5, 5\)"):
        segmenter_state_dict({"network": unet_state})

    # A bad file writes nothing.
    torch.save(missing, tmp_path / "bad.ckpt")
    with pytest.raises(WeightsImportError):
        import_anatomy_aware(tmp_path / "bad.ckpt", published_files["root"] / "segmentation_model.pt", tmp_path / "pack")
    assert not (tmp_path / "pack").exists()


def test_cli_imports_the_published_files_and_refuses_a_bad_one(published_files: dict, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from tests.node_harness import REPO

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", "--json", "packs", "import-anatomy-aware", *args],
            cwd=REPO, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )

    root = published_files["root"]
    done = cli("--classifier", str(root / "classification_model.ckpt"), "--segmenter", str(root / "segmentation_model.pt"), "--out", str(tmp_path / "pack"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sha256"] == load_pack(tmp_path / "pack").manifest.weights.sha256
    refused = cli("--classifier", str(root / "segmentation_model.pt"), "--segmenter", str(root / "segmentation_model.pt"), "--out", str(tmp_path / "bad"))
    assert refused.returncode == 2 and refused.stdout.strip()  # invalid input: exit 2, the error as JSON (--json)
    assert not (tmp_path / "bad").exists()


# --- Grad-CAM --------------------------------------------------------------------------------
def test_grad_cam_normalization_keeps_high_as_evidence() -> None:
    raw = torch.tensor([[[[0.0, 1.0, 3.0]]]])
    np.testing.assert_allclose(normalize_cam(raw).numpy().ravel(), [0.0, 1 / 3, 1.0], rtol=1e-6)
    # MONAI's default postprocessing would have inverted it: the strongest evidence at 0.
    np.testing.assert_allclose(default_normalizer(raw).numpy().ravel(), [1.0, 2 / 3, 0.0], rtol=1e-6)
    assert float(normalize_cam(torch.zeros(1, 1, 2, 2)).max()) == 0.0


# --- the committed demo pack on phantoms ---------------------------------------------------------
@dataclass
class Phantom:
    path: Path
    dataset: Dataset
    masks: dict[str, np.ndarray]
    positive: bool

    def inputs(self) -> StudyInputs:
        return StudyInputs(str(self.dataset.StudyInstanceUID), {"xr": SeriesInput("xr", str(self.dataset.SeriesInstanceUID), (self.path,))})


def _phantom(seed: int, lesions: object, root: Path) -> Phantom:
    study = generate_study(seed, kinds=("xr",), lesions=lesions)
    folder = write_study(study, root)
    (info,) = [info for info, _ in study.series]
    path = min((folder / info.folder).glob("*.dcm"))
    return Phantom(path, dcmread(path), study.masks, bool(study.ground_truth["labels"]["radiographic_sacroiliitis"]))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Phantom]:
    root = tmp_path_factory.mktemp("xr-phantoms")
    return {"negative": _phantom(NEGATIVE_SEED, NEGATIVE_SPEC, root), "positive": _phantom(POSITIVE_SEED, POSITIVE_SPEC, root)}


@pytest.fixture(scope="module")
def demo_chain() -> XRAnatomyChain:
    spec = ChainSpec(name="xr-anatomy", implementation=IMPLEMENTATION, pack=str(DEMO_PACK), requires=[{"role": "XR"}])
    return XRAnatomyChain(spec, RuntimeSettings(torch_threads=2))


@pytest.fixture(scope="module")
def results(demo_chain: XRAnatomyChain, phantoms: dict[str, Phantom]) -> dict[str, ChainResult]:
    return {name: demo_chain.run(phantom.inputs()) for name, phantom in phantoms.items()}


def test_demo_pack_is_a_small_declared_demonstration() -> None:
    pack = load_pack(DEMO_PACK, chain="xr-anatomy")
    pack.verify()
    assert pack.manifest.demo is True
    assert pack.weights_path.stat().st_size < 25 * 1024 * 1024
    assert pack.manifest.output("radiographic_sacroiliitis").threshold == 0.59
    assert "demonstration" in pack.manifest.architecture.name
    assert pack.manifest.evaluation["held_out"]["radiographic_sacroiliitis"]["auc"]["value"] > 0.5


def test_unknown_or_mistyped_options_are_refused() -> None:
    def spec(**options: object) -> ChainSpec:
        return ChainSpec(name="xr-anatomy", implementation=IMPLEMENTATION, pack=str(DEMO_PACK), requires=[{"role": "XR"}], options=options)

    with pytest.raises(ValueError, match=r"unknown option\(s\) \['flip'\]"):
        XRAnatomyChain(spec(flip=True), RuntimeSettings())
    with pytest.raises(ValueError, match="option sw_batch_size must be of type int"):
        XRAnatomyChain(spec(sw_batch_size="4"), RuntimeSettings())
    with pytest.raises(ValueError, match="option sw_batch_size must be at least 1"):
        XRAnatomyChain(spec(sw_batch_size=0), RuntimeSettings())


def test_training_split_keeps_a_patients_studies_together() -> None:
    studies = [
        # studies 0 and 1: one patient
        PhantomRadiograph(Path(f"/nowhere/S-{i}"), Path(f"/nowhere/S-{i}/1.dcm"), i % 2 == 0, (0, 0), "PAT-0" if i < 2 else f"PAT-{i}", i)
        for i in range(12)
    ]
    for seed in range(10):
        train_idx, val_idx = split(studies, seed)
        assert sorted(train_idx + val_idx) == list(range(12))
        assert (0 in val_idx) == (1 in val_idx), seed


def test_demo_pack_tells_radiographic_sacroiliitis_from_a_healthy_pelvis(results: dict[str, ChainResult], phantoms: dict[str, Phantom]) -> None:
    assert phantoms["positive"].positive and not phantoms["negative"].positive
    for name, result in results.items():
        (finding,) = result.findings
        assert finding.concept.meaning.startswith("Radiographic sacroiliitis")
        assert (finding.site, finding.scope, finding.laterality, finding.threshold) == (Site.SACROILIAC_JOINT, Scope.PATIENT, None, 0.59)
        assert finding.evidence[0].sop_instance_uid == str(phantoms[name].dataset.SOPInstanceUID)
        assert finding.present is phantoms[name].positive, f"{name}: p = {finding.probability:.3f}"
    # The paper's progression statement is about the published model: a demonstration pack never carries it.
    (positive,) = results["positive"].findings
    assert positive.probability >= 0.7 and positive.note is None
    (negative,) = results["negative"].findings
    assert negative.probability < 0.59 and negative.note is None
    assert results["negative"].provenance.demonstration is True


def test_maps_lie_on_the_radiograph_grid_and_grad_cam_is_normalized_inside_the_crop(results: dict[str, ChainResult], phantoms: dict[str, Phantom]) -> None:
    for name, result in results.items():
        shape = phantoms[name].masks["XR_sacrum"].shape
        cam, overlay = result.maps
        assert (cam.meaning, overlay.meaning) == (MapMeaning.GRAD_CAM, MapMeaning.SEGMENTATION)
        assert cam.values.shape == overlay.values.shape == shape
        # on the shared absolute scale: the peak is the finding's probability (pipeline.cam.evidence_map)
        assert 0.0 <= cam.values.min() and cam.values.max() == pytest.approx(result.findings[0].probability, abs=1e-3)
        # where the model looked, per side: an explanation that sums to at most the whole map
        shares = {e.laterality: e.value for e in result.explanations}
        assert set(shares) == {Laterality.LEFT, Laterality.RIGHT} and sum(shares.values()) <= 1.0 + 1e-6
        r0, c0, r1, c1 = result.provenance.parameters["crop_box_rc"]
        outside = np.ones(shape, dtype=bool)
        outside[r0:r1, c0:c1] = False
        assert not cam.values[outside].any()


def _letter_pixels(values: np.ndarray, centre: tuple[int, int], half: int) -> np.ndarray:
    r, c = centre
    return values[max(r - half, 0) : r + half, max(c - half, 0) : c + half] == 1.0


def test_overlay_marks_the_patients_left_ilium_and_joint_where_the_ground_truth_has_them(
    demo_chain: XRAnatomyChain, phantoms: dict[str, Phantom]
) -> None:
    phantom = phantoms["negative"]
    from pipeline.chains.xr_anatomy.overlay import segmentation_overlay

    def check(dataset: Dataset, masks: dict[str, np.ndarray]) -> None:
        analysis = demo_chain.model.analyze(dataset, with_gradcam=False)
        overlay = segmentation_overlay(analysis.labels, analysis.classes, analysis.crop)
        half = min(masks["XR_sacrum"].shape) // 24
        for side in ("left", "right"):
            centre = overlay.letters[side]
            assert masks[f"XR_{side}_ilium"][centre], f"the {side} letter is not on the {side} ilium"
            assert _letter_pixels(overlay.values, centre, half).any()
            rows, cols = np.nonzero(masks[f"XR_{side}_joint"])
            box = analysis.crop.regions[side].box
            assert box.r0 <= rows.mean() < box.r1 and abs(cols.mean() - (box.c0 + box.c1) / 2) < (box.c1 - box.c0)
            assert masks[f"XR_{side}_joint"][analysis.crop.box.slices].sum() >= 0.95 * masks[f"XR_{side}_joint"].sum()

    # As sent (PatientOrientation L\F: the patient's left on the image's right) ...
    assert list(phantom.dataset.PatientOrientation) == ["L", "F"]
    check(phantom.dataset, phantom.masks)
    # ... and mirrored with PatientOrientation R\F: the letters follow the patient, not the image.
    flipped = dcmread(phantom.path)
    flipped.PixelData = np.ascontiguousarray(flipped.pixel_array[:, ::-1]).tobytes()
    flipped.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    flipped.PatientOrientation = ["R", "F"]
    check(flipped, {k: np.ascontiguousarray(v[:, ::-1]) for k, v in phantom.masks.items()})


def test_chain_produces_the_sr_and_two_heatmaps(demo_chain: XRAnatomyChain, phantoms: dict[str, Phantom]) -> None:
    datasets = demo_chain.produce(phantoms["positive"].inputs())
    modalities = [str(ds.Modality) for ds in datasets]
    assert modalities[0] == "SR" and len(datasets) == 3
    for heatmap in datasets[1:]:
        # the radiograph's pixels at the top left, the text band below (pipeline/encode/render.py)
        assert heatmap.Rows > phantoms["positive"].dataset.Rows and heatmap.Columns == phantoms["positive"].dataset.Columns
        assert str(heatmap.StudyInstanceUID) == str(phantoms["positive"].dataset.StudyInstanceUID)
    assert set(demo_chain.timings) >= {"segmentation", "joint region", "classification", "grad-cam", "encode"}


def test_train_and_evaluate_write_a_pack_that_records_its_data_and_held_out_numbers(tmp_path: Path) -> None:
    """`sijnode train xr-anatomy` then `sijnode evaluate`, one epoch on a few phantoms."""
    from pipeline.packs import HELD_OUT
    from pipeline.training import evaluate_pack, train_chain

    for seed in range(8):
        write_study(generate_study(seed, kinds=("xr",)), tmp_path / "train")
    for seed in range(100, 104):
        write_study(generate_study(seed, kinds=("xr",)), tmp_path / "held-out")

    pack = train_chain("xr-anatomy", tmp_path / "train", tmp_path / "pack", epochs=1, progress=False)
    assert pack.manifest.chain == "xr-anatomy" and pack.manifest.demo
    assert "8 phantom AP pelvic radiographs (pipeline.phantom" in pack.manifest.training_data
    assert "seeds 0-7," in pack.manifest.training_data
    weights = pack.manifest.weights.sha256

    report = evaluate_pack(pack.folder, tmp_path / "held-out")
    metrics = report["outputs"]["radiographic_sacroiliitis"]["metrics"]
    assert set(metrics) >= {"auc", "sensitivity", "specificity"}
    assert (pack.folder / "roc.png").is_file() and (pack.folder / "EVALUATION.md").is_file()
    assert json.loads((pack.folder / "training.json").read_text())["phases"]["classifier"]["selection"] == "last"
    again = load_pack(pack.folder)
    again.verify()
    assert again.manifest.weights.sha256 == weights, "evaluation rewrites the manifest, never the weights"
    held_out = again.manifest.evaluation[HELD_OUT]
    assert held_out["data"].startswith("4 phantom radiographs (seeds 100-103, ")
    assert held_out["radiographic_sacroiliitis"]["auc"]["value"] == pytest.approx(metrics["auc"]["value"], abs=1e-4)


def test_the_progression_note_is_shown_only_for_the_published_model_and_confident_predictions(tmp_path: Path) -> None:
    """The paper's odds ratio is about its model's confident predictions (p >= 0.7) in patients
    without radiographic sacroiliitis: the note says so, and only a non-demo pack that records
    the paper's result (what the importer writes) carries it."""
    import shutil
    from types import SimpleNamespace

    import yaml

    folder = tmp_path / "published-like"
    shutil.copytree(DEMO_PACK, folder)
    manifest = yaml.safe_load((folder / "manifest.yaml").read_text())
    manifest["demo"] = False
    manifest["evaluation"][PROGRESSION_EVIDENCE] = {"value": 2.16, "ci95_low": 1.19, "ci95_high": 3.86}
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    def chain_spec(pack: Path) -> ChainSpec:
        return ChainSpec(name="xr-anatomy", implementation=IMPLEMENTATION, pack=str(pack), requires=[{"role": "XR"}])

    chain = XRAnatomyChain(chain_spec(folder), RuntimeSettings())
    no_fallback = SimpleNamespace(fallbacks={})
    assert chain.note(SimpleNamespace(probability=0.71, crop=no_fallback)) == HIGH_CONFIDENCE_NOTE  # type: ignore[arg-type]
    assert chain.note(SimpleNamespace(probability=0.69, crop=no_fallback)) is None  # type: ignore[arg-type]
    assert "only if readers do not grade radiographic sacroiliitis" in HIGH_CONFIDENCE_NOTE
    demo = XRAnatomyChain(chain_spec(DEMO_PACK), RuntimeSettings())
    assert demo.note(SimpleNamespace(probability=0.99, crop=no_fallback)) is None  # type: ignore[arg-type]
