"""The segmenter's input and output orientation, through the published app's MONAI transforms and the chain's.

The app (FJDorfner/Anatomy-Aware-Classification-axSpA, gradio_code/Model_Seg.py) loads a PNG
with MONAI's LoadImage, resizes, normalises, smooths and scales it, runs the UNet by sliding
window, takes the argmax with the largest components, brings the class map back with
``Invert`` of its transforms and finally applies ``Rotate90(k=3)``. On an asymmetric image and a
position-wise "segmenter" (each pixel's class from its own intensity), so that any flip or turn
shows, the chain with ``transpose`` (the published pack's setting) feeds the network the same
tensor and gets the same class map as the app's ``Invert``, transposed into the radiograph's
(rows, columns); the app's last ``Rotate90(k=3)`` mirrors that map left-right.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import (
    AsDiscrete,
    Compose,
    EnsureChannelFirst,
    GaussianSmooth,
    Invert,
    KeepLargestConnectedComponent,
    Lambda,
    LoadImage,
    NormalizeIntensity,
    Resize,
    Rotate90,
    ScaleIntensity,
)
from PIL import Image
from torch import nn

from pipeline.chains.xr_anatomy.inference import AnatomyAwareModel
from pipeline.chains.xr_anatomy.model import Networks, build_networks
from pipeline.chains.xr_anatomy.train import DEMO_HYPERPARAMETERS
from pipeline.chains.xr_anatomy.preprocess import SegmentationSettings, segmenter_input

SIZE = 64


class IntensityBands(nn.Module):
    """Class k where the scaled input is nearest band centre k: a segmenter without any spatial mixing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centres = torch.tensor([-1.0, -0.2, 0.4, 1.0], dtype=x.dtype).reshape(1, 4, 1, 1)
        return -50.0 * (x - centres) ** 2


def _asymmetric_png(path: Path) -> np.ndarray:
    """A 60×100 8-bit image with three grey levels in places no flip or turn maps onto each other."""
    image = np.zeros((60, 100), dtype=np.uint8)
    image[4:24, 8:34] = 255
    image[4:12, 34:50] = 255  # an L: not symmetric under any flip
    image[32:56, 58:96] = 170
    image[40:56, 10:20] = 90
    Image.fromarray(image).save(path)
    return image


def _app_pipeline(path: Path) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The app's steps: (network input, class map after Invert, class map after Rotate90(k=3))."""
    pre = Compose(
        [
            LoadImage(image_only=True),
            EnsureChannelFirst(),
            Resize(spatial_size=(SIZE, SIZE)),
            Lambda(func=lambda x: x.squeeze(-1)),
            NormalizeIntensity(),
            GaussianSmooth(sigma=0.1),
            ScaleIntensity(minv=-1, maxv=1),
        ]
    )
    image = pre(str(path))
    logits = SlidingWindowInferer(roi_size=(SIZE, SIZE), sw_batch_size=1, overlap=0.75)(image[None], IntensityBands())[0]
    post = Compose([AsDiscrete(argmax=True, to_onehot=4), KeepLargestConnectedComponent(), AsDiscrete(argmax=True), Invert(pre)])
    inverted = post(logits)
    rotated = Rotate90(spatial_axes=(0, 1), k=3)(inverted)
    return image.as_tensor(), inverted.squeeze().numpy().astype(np.uint8), rotated.squeeze().numpy().astype(np.uint8)


def test_the_chain_feeds_and_reads_the_segmenter_as_the_app_does(tmp_path: Path) -> None:
    pixels = _asymmetric_png(tmp_path / "asymmetric.png")
    app_input, app_inverted, app_rotated = _app_pipeline(tmp_path / "asymmetric.png")
    assert app_inverted.shape == (100, 60), "LoadImage gives a PNG as (columns, rows)"

    settings = SegmentationSettings(size=(SIZE, SIZE), gaussian_sigma=0.1, roi_size=(SIZE, SIZE), overlap=0.75, transpose=True)
    gray = pixels.astype(np.float32) / 255.0
    ours = segmenter_input(gray, settings)[0]
    assert torch.allclose(ours, app_input.float(), atol=1e-5), "the network sees the same tensor"

    networks = Networks(segmenter=IntensityBands(), classifier=build_networks(DEMO_HYPERPARAMETERS).classifier)  # type: ignore[arg-type]
    preprocessing = {
        "segmentation": {"size": [SIZE, SIZE], "gaussian_sigma": 0.1, "roi_size": [SIZE, SIZE], "overlap": 0.75, "transpose": True, "resample": "labels"},
        "classification": {"size": [64, 96], "median_size": 3, "unsharp_weight": 0.6, "unsharp_sigma": 1.0, "clahe_clip_limit": 0.01},
    }
    labels = AnatomyAwareModel(networks, preprocessing).segment(gray)
    assert labels.shape == pixels.shape
    assert len(np.unique(labels)) == 4, "every band is found"
    np.testing.assert_array_equal(labels, app_inverted.T)
    # the app's final Rotate90(k=3) of the (columns, rows) map is the (rows, columns) map mirrored
    np.testing.assert_array_equal(app_rotated, labels[:, ::-1])
    # the class map lies on the pixels it came from (the bright L → the top band, up to the
    # resampling at its edges); the app's rotated map does not
    assert (labels[pixels == 255] == 3).mean() > 0.8 and (labels[pixels == 0] == 0).mean() > 0.9
    assert (app_rotated[pixels == 255] == 3).mean() < 0.5
