"""What a planned and a rendered series look like, whatever the modality."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .geometry import ProjectionGeometry, SliceGeometry
from .vendors import Vendor

ROLES: tuple[str, ...] = ("T1", "STIR", "T2FS", "CT", "XR")
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal", "oblique")


@dataclass(frozen=True)
class SeriesPlan:
    """A series before rendering: its role, geometry and acquisition parameters."""

    role: str  # one of ROLES
    plane: str  # one of PLANES (semicoronal counts as coronal)
    modality: str  # MR, CT or DX
    series_number: int
    description: str
    vendor: Vendor
    geometry: SliceGeometry | ProjectionGeometry
    tilt_deg: float = 0.0  # angle of the slice plane from the pure anatomical plane
    acquisition: dict[str, Any] = field(default_factory=dict)  # modality-specific DICOM values

    @property
    def folder(self) -> str:
        """Series folder name inside the study folder, e.g. ``003_T2FS``."""
        return f"{self.series_number:03d}_{self.role}"


@dataclass
class RenderedSeries:
    """Pixel data (stored values) and ground-truth masks of one series.

    ``pixels`` is (slices, rows, columns) for slice series and (rows, columns) for the
    radiograph; ``masks`` maps mask names (without the role prefix) to arrays of the
    same in-plane layout.
    """

    plan: SeriesPlan
    pixels: np.ndarray
    masks: dict[str, np.ndarray]
    window: tuple[float, float]  # (center, width) in output units (HU for CT)
    rescale: tuple[float, float] = (0.0, 1.0)  # (intercept, slope)
