"""Class-activation-map normalization shared by every chain that draws Grad-CAM.

MONAI's GradCAM post-processing by default maps each map's (min, max) to (1, 0): it inverts
the map. Chains pass ``normalize_cam`` instead, so high means evidence for the positive class,
then put the map on the shared absolute scale with ``evidence_map`` (the map times the probability).
"""

from __future__ import annotations

import numpy as np
import torch


def normalize_cam(raw: torch.Tensor) -> torch.Tensor:
    """Per sample (first axis): the positive part divided by its maximum, in [0, 1]; all-zero stays zero."""
    raw = torch.nan_to_num(raw.detach().float().clamp_min(0.0))
    peak = raw.flatten(1).amax(dim=1).reshape(-1, *([1] * (raw.dim() - 1)))
    return torch.where(peak > 0, raw / peak.clamp_min(1e-12), torch.zeros_like(raw))


def with_peak(values: np.ndarray, peak: float) -> np.ndarray:
    """A map resampled from a coarser or shifted grid, in [0, 1], rescaled so that its maximum is
    ``peak`` again: the new grid's pixels fall between the old grid's, where interpolation lowers
    a sharp peak, and an evidence map's peak must stay the finding's probability (:func:`evidence_map`)."""
    values = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    top = float(values.max()) if values.size else 0.0
    if top <= 0.0:
        return values
    return np.clip(values * np.float32(min(max(peak, 0.0), 1.0) / top), 0.0, 1.0).astype(np.float32)


def evidence_map(cam: np.ndarray, probability: float) -> np.ndarray:
    """A chain's evidence map on the scale every heatmap shares: ``cam`` (normalised to its own
    peak, in [0, 1]) times the probability of the finding it explains.

    A map normalised to its own peak looks the same for p = 0.13 and p = 0.98: saturated red.
    Weighted by the probability, the peak equals the probability, so on the fixed 0-1 colour
    scale a negative study stays dim and a confident positive glows. The map's shape (where the
    model looked) is unchanged. ``ChainResult`` refuses evidence maps that peak above the
    findings' probability.
    """
    values = np.clip(np.asarray(cam, dtype=np.float32), 0.0, 1.0)
    return (values * np.float32(min(max(probability, 0.0), 1.0))).astype(np.float32)
