"""Class-activation-map normalization shared by every chain that draws Grad-CAM.

MONAI's GradCAM post-processing by default maps each map's (min, max) to (1, 0): it inverts
the map. Chains pass ``normalize_cam`` instead, so high means evidence for the positive class.
"""

from __future__ import annotations

import torch


def normalize_cam(raw: torch.Tensor) -> torch.Tensor:
    """Per sample (first axis): the positive part divided by its maximum, in [0, 1]; all-zero stays zero."""
    raw = torch.nan_to_num(raw.detach().float().clamp_min(0.0))
    peak = raw.flatten(1).amax(dim=1).reshape(-1, *([1] * (raw.dim() - 1)))
    return torch.where(peak > 0, raw / peak.clamp_min(1e-12), torch.zeros_like(raw))
