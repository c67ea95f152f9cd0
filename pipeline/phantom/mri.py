"""MRI series: semicoronal T1 TSE and STIR, axial T2 TSE with fat suppression.

Planning mimics a technologist: the semicoronal stack is tilted to the long axis of
the sacrum seen on the sagittal localizer (a few degrees of planning error), the
axial stack follows the scanner axes.  Rendering samples the anatomy at the pixel
centres, turns tissue fractions into signal, and adds what an MR image has: blur
from the acquired (lower) resolution, a coil bias field and Rician noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .anatomy import PhantomModel
from .geometry import SliceGeometry, unit
from .seeding import rng_for
from .series import RenderedSeries, SeriesPlan
from .tissues import signal
from .vendors import Vendor

_NOISE = {"T1": (0.022, 0.035), "STIR": (0.016, 0.026), "T2FS": (0.016, 0.026)}  # sigma relative to fat on T1


def _even(value: float) -> int:
    return max(2, round(value / 2.0) * 2)


def plan_mri(model: PhantomModel, vendor: Vendor, seed: int, first_series_number: int = 1) -> list[SeriesPlan]:
    """Semicoronal T1 and STIR sharing slice positions, then an axial T2FS stack."""
    rng = rng_for(seed, "mri-protocol")
    scanner = vendor.mr_scanners[int(rng.integers(len(vendor.mr_scanners)))]

    # semicoronal: rows run along the sacrum (tilted in the sagittal plane), columns to the patient's left
    axis = model.sacral_axis_lps
    up = unit([0.0, axis[1], axis[2]])
    error = np.deg2rad(rng.uniform(-3.0, 3.0))  # planning error about the left-right axis
    c, s = np.cos(error), np.sin(error)
    up = np.array([0.0, c * up[1] - s * up[2], s * up[1] + c * up[2]])
    col_dir = -up
    tilt = float(np.degrees(np.arccos(np.clip(-col_dir[2], -1.0, 1.0))))
    joint_center = model.joint_center_lps
    n_cor = int(rng.integers(15, 21))
    thickness_cor = float(rng.choice([3.0, 3.5, 4.0]))
    spacing_cor = round(thickness_cor * float(rng.choice([1.0, 1.1, 1.2])), 2)
    direction = 1.0 if vendor.coronal_ascending else -1.0
    offsets_cor = tuple(float(direction * (k - (n_cor - 1) / 2.0) * spacing_cor) for k in range(n_cor))
    fov_cor = float(rng.uniform(240.0, 300.0))
    phase_fraction_cor = float(rng.choice([0.75, 0.8125, 0.875, 1.0]))
    columns_t1 = int(rng.choice([256, 320, 384]))
    columns_stir = columns_t1 if rng.random() < 0.5 else int(rng.choice([256, 320]))
    center_cor = (
        joint_center
        + col_dir * rng.uniform(5.0, 25.0)  # technologists include the hips below the joints
        + np.array([rng.uniform(-4, 4), 0.0, 0.0])
        + np.cross([1.0, 0.0, 0.0], col_dir) * rng.uniform(-3, 3)
    )

    def coronal(columns: int) -> SliceGeometry:
        spacing = fov_cor / columns
        rows = _even(columns * phase_fraction_cor)
        return SliceGeometry(
            row_dir=(1.0, 0.0, 0.0),
            col_dir=tuple(float(v) for v in col_dir),
            center=tuple(float(v) for v in center_cor),
            rows=rows,
            columns=columns,
            pixel_spacing=(spacing, spacing),
            slice_thickness=thickness_cor,
            slice_offsets=offsets_cor,
        )

    # axial T2FS; the Siemens seed protocol: TR/TE 2220/66 ms, matrix 110x256, FOV 250 mm
    n_ax = int(rng.integers(25, 61))
    thickness_ax = float(rng.choice([3.0, 3.3, 3.5]))
    spacing_ax = round(thickness_ax * float(rng.choice([1.0, 1.1])), 2)
    fov_ax = 250.0 if vendor.name == "Siemens" else float(rng.uniform(230.0, 300.0))
    columns_ax = 256 if n_ax > 40 else int(rng.choice([256, 320]))
    rows_ax = _even(columns_ax * float(rng.choice([0.75, 0.875, 1.0])))
    direction = 1.0 if vendor.axial_ascending else -1.0
    center_ax = joint_center + np.array([rng.uniform(-4, 4), rng.uniform(-5, 10), rng.uniform(-20, 0)])
    axial = SliceGeometry(
        row_dir=(1.0, 0.0, 0.0),
        col_dir=(0.0, 1.0, 0.0),
        center=tuple(float(v) for v in center_ax),
        rows=rows_ax,
        columns=columns_ax,
        pixel_spacing=(fov_ax / columns_ax, fov_ax / columns_ax),
        slice_thickness=thickness_ax,
        slice_offsets=tuple(float(direction * (k - (n_ax - 1) / 2.0) * spacing_ax) for k in range(n_ax)),
    )

    plans = []
    for number, (role, geometry, plane) in enumerate(
        (("T1", coronal(columns_t1), "coronal"), ("STIR", coronal(columns_stir), "coronal"), ("T2FS", axial, "axial")),
        start=first_series_number,
    ):
        sequence = vendor.mr[role]
        if role == "T2FS" and vendor.name == "Siemens":
            freq, phase = 256, 110  # the seed protocol
        else:
            freq = _even(geometry.columns * float(rng.choice([0.8, 1.0])))
            phase = _even(geometry.rows * float(rng.uniform(0.5, 0.8)))
        timing = {
            "RepetitionTime": round(float(rng.uniform(*sequence.repetition_ms)), 1),
            "EchoTime": round(float(rng.uniform(*sequence.echo_ms)), 2),
        }
        if sequence.inversion_ms is not None:
            timing["InversionTime"] = round(float(rng.uniform(*sequence.inversion_ms[scanner.field_tesla])), 1)
        plans.append(
            SeriesPlan(
                role=role,
                plane=plane,
                modality="MR",
                series_number=number,
                description=sequence.description,
                vendor=vendor,
                geometry=geometry,
                tilt_deg=tilt if plane == "coronal" else 0.0,
                acquisition={
                    "sequence": sequence,
                    "scanner": scanner,
                    "frequency_samples": freq,
                    "phase_steps": phase,
                    # a rectangular field of view is cut along the phase direction: head-feet
                    # (COL) when the image has fewer rows than columns, else left-right (ROW)
                    "phase_direction": "COL" if geometry.rows < geometry.columns or plane == "axial" else "ROW",
                    "pixel_bandwidth": round(float(rng.uniform(150, 300)), 1),
                    **timing,
                },
            )
        )
    return plans


def render_mri(model: PhantomModel, plans: list[SeriesPlan], seed: int) -> list[RenderedSeries]:
    """Render MR series; series with identical grids share one anatomy sampling."""
    rendered: dict[str, RenderedSeries] = {}
    groups: dict[tuple, list[SeriesPlan]] = {}
    for plan in plans:
        g = plan.geometry
        key = (g.row_dir, g.col_dir, g.center, g.rows, g.columns, g.pixel_spacing, g.slice_offsets)
        groups.setdefault(key, []).append(plan)
    for group in groups.values():
        geometry: SliceGeometry = group[0].geometry  # type: ignore[assignment]
        contrasts = [plan.role for plan in group]
        raw, masks = sample_slices(model, geometry, contrasts)
        for plan in group:
            pixels, window = _acquire(raw[plan.role], plan, seed)
            rendered[plan.role] = RenderedSeries(plan, pixels, {k: v.copy() for k, v in masks.items()}, window)
    return [rendered[plan.role] for plan in plans]


def sample_slices(
    model: PhantomModel, geometry: SliceGeometry, contrasts: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Ideal signal per contrast and the ground-truth masks, slice by slice."""
    shape = geometry.shape
    raw = {contrast: np.empty(shape, dtype=np.float32) for contrast in contrasts}
    masks = {
        "anatomy": np.empty(shape, dtype=np.uint8),
        "joint_line": np.empty(shape, dtype=np.uint8),
        "lesions": np.empty(shape, dtype=np.uint16),
    }
    for index in range(geometry.n_slices):
        composition = model.compose_slice(geometry, index)
        for contrast in contrasts:
            values = signal(composition.fractions, composition.fine_texture, composition.coarse_texture, contrast)
            raw[contrast][index] = values.reshape(shape[1:])
        masks["anatomy"][index] = composition.labels.reshape(shape[1:])
        masks["joint_line"][index] = composition.joint_line.reshape(shape[1:])
        masks["lesions"][index] = composition.lesion_bits.reshape(shape[1:])
    return raw, masks


def _acquire(ideal: np.ndarray, plan: SeriesPlan, seed: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Resolution blur, coil bias field, Rician noise, scaling to stored integers."""
    geometry: SliceGeometry = plan.geometry  # type: ignore[assignment]
    acquisition = plan.acquisition
    rng = rng_for(seed, "mri-noise", plan.role)
    # the image was acquired on a coarser k-space grid than it is displayed on
    if acquisition["phase_direction"] == "COL":
        along_rows, along_columns = acquisition["phase_steps"], acquisition["frequency_samples"]
    else:
        along_rows, along_columns = acquisition["frequency_samples"], acquisition["phase_steps"]
    sigma_rows = 0.45 * max(geometry.rows / along_rows, 0.8)
    sigma_columns = 0.45 * max(geometry.columns / along_columns, 0.8)
    image = ndimage.gaussian_filter(ideal, sigma=(0.0, sigma_rows, sigma_columns), mode="nearest")
    image *= _bias_field(geometry, rng)
    sigma = np.float32(rng.uniform(*_NOISE[plan.role]))
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imaginary * imaginary)
    vendor = plan.vendor
    brightest = float(np.percentile(magnitude[:, ::4, ::4], 99.8)) or 1.0
    target = float(rng.uniform(*vendor.mr_max_value))
    limit = 2**vendor.mr_bits_stored - 1
    stored = np.clip(np.rint(magnitude * np.float32(target / brightest)), 0, limit).astype(np.uint16)
    low, high = np.percentile(stored[:, ::4, ::4], [1.0, 99.5])
    return stored, (float(round((low + high) / 2.0)), float(max(round(high - low), 1.0)))


def _bias_field(geometry: SliceGeometry, rng: np.random.Generator) -> np.ndarray:
    """Smooth receive-coil shading: brighter posteriorly (spine coil), a random tilt, a central dip.

    exp(g . p - dip |p|^2) with p the position from the stack centre in units of 200 mm;
    row, column and normal directions are orthonormal, so it separates per axis.
    """
    gradient = rng.normal(0.0, 0.12, size=3)
    gradient[1] += rng.uniform(0.25, 0.5)  # posterior coil elements are closest to the sacrum
    dip = rng.uniform(0.05, 0.2)
    cols = (np.arange(geometry.columns) - (geometry.columns - 1) / 2.0) * geometry.pixel_spacing[1] / 200.0
    rows = (np.arange(geometry.rows) - (geometry.rows - 1) / 2.0) * geometry.pixel_spacing[0] / 200.0
    depth = np.asarray(geometry.slice_offsets) / 200.0
    along_columns = cols * float(gradient @ np.asarray(geometry.row_dir)) - dip * cols**2
    along_rows = rows * float(gradient @ np.asarray(geometry.col_dir)) - dip * rows**2
    along_depth = depth * float(gradient @ geometry.normal) - dip * depth**2
    exponent = along_depth[:, None, None] + along_rows[None, :, None] + along_columns[None, None, :]
    return np.exp(exponent).astype(np.float32)
