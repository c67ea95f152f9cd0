"""CT: an axial stack through the pelvis in Hounsfield units (bone reconstruction kernel)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .anatomy import PhantomModel
from .geometry import SliceGeometry
from .mri import sample_slices
from .seeding import rng_for
from .series import RenderedSeries, SeriesPlan
from .vendors import Vendor

RESCALE_INTERCEPT = -1024.0  # stored value 0 is -1024 HU, as Siemens, Philips and Canon store CT
# slice thickness (mm) and how often it is chosen: thin slices cost the most to render
_THICKNESSES = {"GE": ((1.25, 2.5), (0.3, 0.7)), "default": ((1.0, 1.5, 2.0, 3.0), (0.15, 0.2, 0.35, 0.3))}


def plan_ct(model: PhantomModel, vendor: Vendor, seed: int, series_number: int) -> SeriesPlan:
    """Axial stack from above the joints to below them, 512 x 512 over the pelvis."""
    rng = rng_for(seed, "ct-protocol")
    choices, weights = _THICKNESSES.get(vendor.name, _THICKNESSES["default"])
    thickness = float(rng.choice(choices, p=weights))
    coverage = float(rng.uniform(90.0, 115.0))  # the joints span about 50 mm head to feet
    n_slices = round(coverage / thickness)
    fov = float(rng.uniform(320.0, 380.0))
    joint_center = model.joint_center_lps
    center = joint_center + np.array([rng.uniform(-5, 5), rng.uniform(-40, -20), rng.uniform(-15, 0)])
    direction = -1.0 if rng.random() < 0.7 else 1.0  # most scanners store head-to-feet
    geometry = SliceGeometry(
        row_dir=(1.0, 0.0, 0.0),
        col_dir=(0.0, 1.0, 0.0),
        center=tuple(float(v) for v in center),
        rows=512,
        columns=512,
        pixel_spacing=(fov / 512.0, fov / 512.0),
        slice_thickness=thickness,
        slice_offsets=tuple(float(direction * (k - (n_slices - 1) / 2.0) * thickness) for k in range(n_slices)),
    )
    return SeriesPlan(
        role="CT",
        plane="axial",
        modality="CT",
        series_number=series_number,
        description=vendor.ct_description.format(thickness=thickness),
        vendor=vendor,
        geometry=geometry,
        acquisition={
            "kvp": float(rng.choice([100.0, 120.0])),
            "tube_current_ma": int(rng.integers(150, 350)),
            "exposure_time_ms": int(rng.integers(500, 1000)),
            "kernel": vendor.ct_kernel,
            "patient_position": "FFS" if rng.random() < 0.4 else "HFS",
            "table_height_mm": round(float(rng.uniform(140, 180)), 1),
            "reconstruction_diameter_mm": round(fov, 2),
        },
    )


def render_ct(model: PhantomModel, plan: SeriesPlan, seed: int) -> RenderedSeries:
    """HU image with a bone kernel's sharpness and correlated quantum noise."""
    geometry: SliceGeometry = plan.geometry  # type: ignore[assignment]
    raw, masks = sample_slices(model, geometry, ["HU"])
    rng = rng_for(seed, "ct-noise")
    # one blur for both: the bone kernel's point spread, and the fine-grained correlation it gives the noise
    sigma_blur = 0.6
    noise = rng.standard_normal(raw["HU"].shape, dtype=np.float32)
    noise_hu = np.float32(rng.uniform(12.0, 25.0) / _smoothed_noise_std(sigma_blur))
    noise *= noise_hu
    noise += raw["HU"]
    hu = ndimage.gaussian_filter(noise, sigma=(0.0, sigma_blur, sigma_blur), mode="nearest", truncate=3.0)
    # outside the reconstruction circle scanners store their lowest value (stored 0 = -1024 HU)
    rows, columns = geometry.rows, geometry.columns
    yy, xx = np.ogrid[0:rows, 0:columns]
    inside = (yy - (rows - 1) / 2.0) ** 2 + (xx - (columns - 1) / 2.0) ** 2 <= (min(rows, columns) / 2.0) ** 2
    hu -= np.float32(RESCALE_INTERCEPT)
    hu *= inside.astype(np.float32)
    np.clip(hu, 0, min(2 ** plan.vendor.ct_bits_stored - 1, 4095), out=hu)
    stored = np.rint(hu, out=hu).astype(np.uint16)
    return RenderedSeries(plan, stored, masks, window=(400.0, 1800.0), rescale=(RESCALE_INTERCEPT, 1.0))


def _smoothed_noise_std(sigma: float) -> float:
    """Standard deviation of unit white noise after a 2-D Gaussian blur of ``sigma`` pixels."""
    impulse = np.zeros((33, 33))
    impulse[16, 16] = 1.0
    kernel = ndimage.gaussian_filter(impulse, sigma, truncate=3.0)
    return float(np.sqrt((kernel**2).sum()))
