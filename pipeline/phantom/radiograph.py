"""AP pelvic radiograph: a divergent-beam projection through the 3-D phantom.

The line integral of attenuation is computed on a coarse grid of rays (1.3 mm apart at
the detector, 2 mm steps in depth), then interpolated to the detector's pixel pitch
(0.15-0.2 mm); scatter, the log transform, the unsharp masking every DR system applies
and quantum noise at full resolution make it look like a processed radiograph.
Masks of the sacrum, each ilium, each joint and each lesion are projections too: a
detector pixel belongs to a structure when its ray passes through at least half a
millimetre of it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .anatomy import BODY_CENTER_Y, OCCUPANCY, PhantomModel
from .geometry import ProjectionGeometry
from .seeding import rng_for
from .series import RenderedSeries, SeriesPlan
from .tissues import attenuation_vector
from .vendors import Vendor

RAY_SPACING_MM = 1.3  # coarse ray spacing at the detector
DEPTH_STEP_MM = 2.0  # sampling step along the beam
MASK_PATH_MM = 0.5  # a ray "hits" a structure after this much path through it
BITS_STORED = 12


def plan_radiograph(model: PhantomModel, vendor: Vendor, seed: int, series_number: int) -> SeriesPlan:
    """AP view, patient supine on the table, detector in the bucky under the table."""
    rng = rng_for(seed, "xr-protocol")
    pitch = vendor.xr_pixel_pitch_mm
    # at least 2000 detector columns, as wide as the cassette allows
    width_mm = float(rng.uniform(max(380.0, 2000 * pitch + 2.0), 430.0))
    height_mm = float(rng.uniform(300.0, 350.0))
    columns = round(width_mm / pitch / 2.0) * 2
    rows = round(height_mm / pitch / 2.0) * 2
    anatomy = model.anatomy
    joint_center = model.joint_center_lps
    back_y = float(joint_center[1] + BODY_CENTER_Y + model.back_depth)
    detector_y = back_y + float(rng.uniform(40.0, 70.0))  # table top, grid and detector housing
    source_to_detector = float(rng.uniform(1100.0, 1200.0))
    center_x = float(joint_center[0] + rng.uniform(-8.0, 8.0))
    # the central ray is aimed midway between the joints and the symphysis
    center_z = float(joint_center[2] - anatomy.scale * rng.uniform(40.0, 60.0))
    geometry = ProjectionGeometry(
        source=(center_x, detector_y - source_to_detector, center_z),
        detector_y=detector_y,
        detector_center=(center_x, center_z),
        rows=rows,
        columns=columns,
        imager_pixel_spacing=pitch,
    )
    source_y = detector_y - source_to_detector
    return SeriesPlan(
        role="XR",
        plane="coronal",
        modality="DX",
        series_number=series_number,
        description=vendor.xr_description,
        vendor=vendor,
        geometry=geometry,
        acquisition={
            "kvp": float(rng.choice([75.0, 77.0, 80.0, 81.0, 85.0])),
            "exposure_mas": round(float(rng.uniform(16.0, 40.0)), 1),
            "exposure_time_ms": int(rng.integers(20, 120)),
            "source_to_detector_mm": round(source_to_detector, 1),
            "source_to_patient_mm": round(back_y - source_y, 1),
            "magnification": round(geometry.magnification_at(float(joint_center[1])), 4),
            "grid": "FOCUSED",
        },
    )


def render_radiograph(model: PhantomModel, plan: SeriesPlan, seed: int) -> RenderedSeries:
    """Processed, presentation-ready radiograph (MONOCHROME2: bone bright)."""
    geometry: ProjectionGeometry = plan.geometry  # type: ignore[assignment]
    ray_rows = _ray_positions(geometry.rows, RAY_SPACING_MM / geometry.imager_pixel_spacing)
    ray_cols = _ray_positions(geometry.columns, RAY_SPACING_MM / geometry.imager_pixel_spacing)
    paths = _project(model, geometry, ray_rows, ray_cols)
    rng = rng_for(seed, "xr-noise")

    line_integral = paths.pop("attenuation")
    ray_mm = RAY_SPACING_MM / geometry.magnification_at(float(model.joint_center_lps[1]))
    primary = np.exp(-line_integral)
    scatter = float(rng.uniform(0.3, 0.6)) * ndimage.gaussian_filter(primary, 40.0 / ray_mm, mode="nearest")
    log_signal = -np.log(primary + scatter + 1e-4)
    # DR processing: dynamic-range compression flattens the thick soft-tissue background,
    # unsharp masking lifts bone edges
    wide = ndimage.gaussian_filter(log_signal, 50.0 / ray_mm, mode="nearest")
    near = ndimage.gaussian_filter(log_signal, 12.0 / ray_mm, mode="nearest")
    processed = log_signal - float(rng.uniform(0.6, 0.8)) * wide + float(rng.uniform(0.8, 1.4)) * (log_signal - near)

    image = _upsample(processed, ray_rows, ray_cols, geometry.rows, geometry.columns)
    noise_scale = _upsample(np.exp(0.5 * line_integral), ray_rows, ray_cols, geometry.rows, geometry.columns)
    # quantum noise: its standard deviation in the log image grows as exp(L / 2) with the
    # attenuation L along the ray (fewer photons); lightly correlated by the detector
    noise = ndimage.gaussian_filter(rng.standard_normal(image.shape, dtype=np.float32), 0.7)
    image += noise * noise_scale * np.float32(rng.uniform(0.0035, 0.006))
    # scale to the patient, not the air around: direct exposure saturates black, bone is brightest
    in_patient = processed[line_integral > 1.0]
    low, high = np.percentile(in_patient if in_patient.size else processed, [1.0, 99.9])
    scaled = np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0)
    scaled **= np.float32(rng.uniform(1.1, 1.4))  # presentation curve: soft tissue mid-grey
    stored = np.rint(scaled * (2**BITS_STORED - 1)).astype(np.uint16)

    masks = {}
    for name in OCCUPANCY:
        masks[name] = _upsample(paths[name], ray_rows, ray_cols, geometry.rows, geometry.columns) >= MASK_PATH_MM
    lesion_bits = np.zeros((geometry.rows, geometry.columns), dtype=np.uint16)
    for bit, hit in paths["lesion_hits"].items():
        upsampled = _upsample(hit.astype(np.float32), ray_rows, ray_cols, geometry.rows, geometry.columns)
        lesion_bits[upsampled >= 0.5] |= np.uint16(1 << bit)
    masks["lesions"] = lesion_bits
    lo, hi = np.percentile(stored[::8, ::8], [2.0, 99.5])
    return RenderedSeries(plan, stored, masks, window=(float(round((lo + hi) / 2)), float(max(round(hi - lo), 1))))


def _ray_positions(n_pixels: int, step_pixels: float) -> np.ndarray:
    """Coarse ray positions in detector pixel units, covering the first to the last pixel."""
    count = int(np.ceil((n_pixels - 1) / step_pixels)) + 1
    return np.linspace(0.0, n_pixels - 1.0, count)


def _project(
    model: PhantomModel, geometry: ProjectionGeometry, ray_rows: np.ndarray, ray_cols: np.ndarray
) -> dict:
    """Line integrals of attenuation and path lengths through each masked structure."""
    source = np.asarray(geometry.source, dtype=np.float64)
    joint_y = float(model.joint_center_lps[1])
    anatomy = model.anatomy
    front = joint_y + BODY_CENTER_Y - anatomy.body_half_depth - 10.0
    back = joint_y + BODY_CENTER_Y + model.back_depth + 0.3 * 160.0 + 10.0
    depths = np.arange(front, min(back, geometry.detector_y - 1.0), DEPTH_STEP_MM)
    t = ((depths - source[1]) / (geometry.detector_y - source[1])).astype(np.float32)
    detector_x, _ = geometry.detector_xz(np.zeros(1), ray_cols)
    _, detector_z = geometry.detector_xz(ray_rows, np.zeros(1))
    dx_all = (detector_x - source[0]).astype(np.float64)
    dz_all = (detector_z - source[2]).astype(np.float64)
    span_y = geometry.detector_y - source[1]
    base = model.lps_to_body_vector(source - model.origin_lps).astype(np.float32)
    ex, ey, ez = (model.lps_to_body_vector(axis).astype(np.float32) for axis in np.eye(3))
    mu = attenuation_vector()
    magnification = geometry.magnification_at(joint_y)
    ray_spacing = RAY_SPACING_MM / magnification
    n_rows, n_cols = ray_rows.size, ray_cols.size
    result = {"attenuation": np.zeros((n_rows, n_cols), dtype=np.float32)}
    for name in OCCUPANCY:
        result[name] = np.zeros((n_rows, n_cols), dtype=np.float32)
    hits: dict[int, np.ndarray] = {}
    chunk = 16  # rays rows per pass: a multiple of the culling block keeps blocks aligned
    for start in range(0, n_rows, chunk):
        rows = slice(start, min(start + chunk, n_rows))
        dz_rows = dz_all[rows]

        def points_at(i: np.ndarray, j: np.ndarray, k: np.ndarray, dz_rows: np.ndarray = dz_rows) -> np.ndarray:
            """Body-frame samples (3, i*j*k): ray (i, j) from the source, at depth plane k."""
            dz = np.interp(i, np.arange(dz_rows.size), dz_rows).astype(np.float32)
            dx = np.interp(j, np.arange(dx_all.size), dx_all).astype(np.float32)
            tk = np.interp(k, np.arange(t.size), t).astype(np.float32)
            across = ex[:, None] * dx[None, :] + ey[:, None] * np.float32(span_y)  # (3, j)
            up = ez[:, None] * dz[None, :]  # (3, i)
            direction = up[:, :, None] + across[:, None, :]  # (3, i, j): source to detector pixel
            points = base[:, None, None, None] + direction[..., None] * tk[None, None, None, :]
            return points.reshape(3, -1)

        shape = (dz_rows.size, n_cols, t.size)
        # textures only modulate MR and CT signal, not attenuation: skip them
        composition = model.compose_grid(
            points_at, shape, (ray_spacing, ray_spacing, DEPTH_STEP_MM), DEPTH_STEP_MM, textures=False
        )
        # path length of one depth step along each (oblique) ray
        step = DEPTH_STEP_MM * np.sqrt(
            1.0 + (dx_all[None, :] ** 2 + dz_rows[:, None] ** 2) / span_y**2
        ).astype(np.float32)
        attenuation = np.einsum("t,tn->n", mu, composition.fractions).reshape(shape)
        result["attenuation"][rows] = attenuation.sum(axis=2) * step
        for name in OCCUPANCY:
            result[name][rows] = composition.occupancy[name].reshape(shape).sum(axis=2) * step
        bits = np.bitwise_or.reduce(composition.lesion_bits.reshape(shape), axis=2)
        for lesion in model.lesions:
            mask = (bits >> lesion.bit) & 1
            if lesion.bit not in hits:
                hits[lesion.bit] = np.zeros((n_rows, n_cols), dtype=bool)
            hits[lesion.bit][rows] = mask.astype(bool)
    result["lesion_hits"] = hits
    return result


def _upsample(coarse: np.ndarray, ray_rows: np.ndarray, ray_cols: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Bilinear interpolation from the ray grid to every detector pixel."""
    def weights(positions: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pixel = np.arange(n, dtype=np.float64)
        upper = np.clip(np.searchsorted(positions, pixel, side="right"), 1, positions.size - 1)
        lower = upper - 1
        fraction = (pixel - positions[lower]) / (positions[upper] - positions[lower])
        return lower, upper, np.clip(fraction, 0.0, 1.0).astype(np.float32)

    r0, r1, fr = weights(ray_rows, rows)
    c0, c1, fc = weights(ray_cols, columns)
    data = coarse.astype(np.float32)
    along_columns = data[:, c0] * (1.0 - fc)[None, :] + data[:, c1] * fc[None, :]
    return along_columns[r0] * (1.0 - fr)[:, None] + along_columns[r1] * fr[:, None]
