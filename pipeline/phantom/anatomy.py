"""The 3-D pelvis: analytic shapes in patient coordinates, sampled wherever a series needs.

Three frames are used:

* **LPS** -- DICOM patient coordinates of the scanner (what IPP/IOP describe).
* **body frame** -- the patient's own axes (x left, y posterior, z superior, in mm),
  origin at the midpoint between the two sacroiliac joints.  The study's small patient
  rotation and position in the field of view map the body frame into LPS.
* **sacrum frame** (u, v, w) -- u = body x, v along the long axis of the sacrum
  towards its base (superior and anterior, tilted by the sacral tilt), w perpendicular
  to the sacral plate towards the pelvis (anterior).  The sacrum is a tilted,
  curved wedge in this frame, and each joint cleft follows its lateral surface.  The
  coordinate ``m`` (per side) is the distance lateral from the sacral joint surface:
  sacrum for m < 0, cleft for 0 < m < cleft width, ilium beyond.

Every structure is a signed distance field; the partial-volume fraction of each tissue
at a sample point follows from the distance and the voxel size.  Because all series
sample the same analytic fields, series in different planes of one study are
geometrically consistent by construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from .geometry import rotation_matrix
from .sdf import (
    FAR,
    Box,
    box_from_distances,
    capsule,
    capsule_box,
    dot3,
    ellipse_distance,
    ellipsoid_distance,
    inside_fraction,
    smooth_min,
    sphere,
    sphere_box,
)
from .seeding import rng_for

if TYPE_CHECKING:
    from .lesions import PlacedLesion

# Tissue classes whose partial-volume fractions make up every sample (they sum to 1).
TISSUES: tuple[str, ...] = (
    "air",
    "fat",
    "muscle",
    "viscera",
    "disc",
    "cortex",
    "marrow",
    "cleft",
    "edema",
    "sclerosis",
    "fat_lesion",
    "erosion",
)
T = {name: index for index, name in enumerate(TISSUES)}

# Anatomy label map values (the segmentation masks written for every series).
ANATOMY_LABELS: dict[str, int] = {
    "background": 0,
    "sacrum": 1,
    "left_ilium": 2,
    "right_ilium": 3,
    "left_joint": 4,
    "right_joint": 5,
    "other_bone": 6,
    "soft_tissue": 7,
    "fat": 8,
}
JOINT_LINE_LABELS: dict[str, int] = {"none": 0, "left": 1, "right": 2}

SIDE_SIGN: dict[str, int] = {"left": 1, "right": -1}  # patient's left is +x
BONES: tuple[str, ...] = ("sacrum", "left_ilium", "right_ilium", "other")

CORTEX_MM = {"sacrum": 1.2, "ilium": 1.5, "other": 2.5}
LESION_EDGE_MM = 1.5  # soft edge of focal lesions: marrow changes fade over ~1.5 mm


@dataclass(frozen=True)
class Anatomy:
    """Per-study anatomy parameters (mm and degrees); all plain numbers, JSON-able."""

    # pose of the body frame in LPS
    yaw_deg: float
    roll_deg: float
    pitch_deg: float
    offset_lps: tuple[float, float, float]
    # overall size
    scale: float
    # sacrum
    sacral_tilt_deg: float  # long axis from vertical, base tilted anteriorly
    joint_angle_deg: float  # axial angle of the joint from the sagittal plane (keystone)
    sacrum_length_up: float
    sacrum_length_down: float
    sacrum_half_width_top: float
    sacrum_half_width_bottom: float
    sacrum_half_thickness_top: float
    sacrum_half_thickness_bottom: float
    sacral_curvature: float  # 1/mm, anterior concavity
    joint_length: float
    cleft_width_left: float
    cleft_width_right: float
    ilium_thickness: float
    # soft tissue
    body_half_width: float
    body_half_depth: float
    back_soft_tissue: float
    fat_thickness: float
    # pelvis
    acetabulum: tuple[float, float, float]  # left acetabulum centre in the body frame
    femoral_head_radius: float
    wing_half_width: float
    wing_half_depth: float
    wing_center_y: float
    wing_flare: float
    crest_height: float

    def to_json(self) -> dict:
        """The parameters as a JSON-able dict (recorded in the ground truth)."""
        return {key: (list(value) if isinstance(value, tuple) else value) for key, value in asdict(self).items()}


def sample_anatomy(seed: int) -> Anatomy:
    """Random, plausible adult pelvis for study ``seed`` (its own random stream)."""
    rng = rng_for(seed, "anatomy")
    scale = float(rng.uniform(0.9, 1.1))
    u = lambda low, high: float(rng.uniform(low, high))
    return Anatomy(
        yaw_deg=u(-5, 5),
        roll_deg=u(-4, 4),
        pitch_deg=u(-6, 6),
        offset_lps=(u(-10, 10), u(-12, 12), u(-12, 12)),
        scale=scale,
        sacral_tilt_deg=u(26, 44),
        joint_angle_deg=u(14, 28),
        sacrum_length_up=u(44, 50) * scale,
        sacrum_length_down=u(58, 68) * scale,
        sacrum_half_width_top=u(50, 56) * scale,
        sacrum_half_width_bottom=u(12, 16) * scale,
        sacrum_half_thickness_top=u(22, 26) * scale,
        sacrum_half_thickness_bottom=u(5, 7) * scale,
        sacral_curvature=u(0.0025, 0.005),
        joint_length=u(48, 58) * scale,
        cleft_width_left=u(2.2, 3.6),
        cleft_width_right=u(2.2, 3.6),
        ilium_thickness=u(20, 28) * scale,
        body_half_width=u(150, 185) * scale,
        body_half_depth=u(115, 150) * scale,
        back_soft_tissue=u(35, 60),
        fat_thickness=u(10, 32),
        acetabulum=(u(88, 96) * scale, u(-44, -34) * scale, u(-100, -88) * scale),
        femoral_head_radius=u(21, 25) * scale,
        wing_half_width=u(112, 124) * scale,
        wing_half_depth=u(66, 76) * scale,
        wing_center_y=u(-58, -48) * scale,
        wing_flare=u(0.15, 0.3),
        crest_height=u(68, 82) * scale,
    )


@dataclass
class Composition:
    """Tissue fractions and masks at a set of sample points.

    ``fractions`` has shape (len(TISSUES), N) and sums to 1 over the first axis.
    ``labels`` (ANATOMY_LABELS), ``joint_line`` (JOINT_LINE_LABELS) and
    ``lesion_bits`` (bit ``i`` set where lesion with mask_bit ``i`` is) have shape (N,).
    ``occupancy`` holds boolean masks of the sacrum, each ilium and each joint cleft
    (OCCUPANCY), which the radiograph projects into its masks.
    """

    fractions: np.ndarray
    fine_texture: np.ndarray
    coarse_texture: np.ndarray
    labels: np.ndarray | None = None
    joint_line: np.ndarray | None = None
    lesion_bits: np.ndarray | None = None
    occupancy: dict[str, np.ndarray] = field(default_factory=dict)

    def scattered(self, index: np.ndarray, size: int) -> Composition:
        """This composition (of samples ``index``) placed among ``size`` samples that are all air."""
        fractions = np.zeros((self.fractions.shape[0], size), dtype=np.float32)
        fractions[T["air"]] = 1.0
        fractions[:, index] = self.fractions

        def spread(values: np.ndarray | None) -> np.ndarray | None:
            if values is None:
                return None
            full = np.zeros(size, dtype=values.dtype)
            full[index] = values
            return full

        return Composition(
            fractions,
            spread(self.fine_texture),
            spread(self.coarse_texture),
            spread(self.labels),
            spread(self.joint_line),
            spread(self.lesion_bits),
            {name: spread(mask) for name, mask in self.occupancy.items()},
        )


@dataclass(frozen=True)
class _Texture:
    """Band-limited random field evaluated anywhere, so it is the same in every series.

    A sum of cosines whose phases are warped by a second, slower sum: the warp breaks
    the regular interference pattern a plain sum of a few cosines shows.  Cosines are
    used because they cost a fraction of a 3-D noise-volume lookup.
    """

    wave_vectors: np.ndarray  # (K, 3) radians per mm
    phases: np.ndarray  # (K,)
    warp_vectors: np.ndarray  # (J, 3)
    warp_phases: np.ndarray  # (J,)

    @classmethod
    def random(cls, rng: np.random.Generator, count: int, wavelength_mm: tuple[float, float]) -> _Texture:
        def waves(number: int, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
            directions = rng.normal(size=(number, 3))
            directions /= np.linalg.norm(directions, axis=1, keepdims=True)
            wavelengths = np.exp(rng.uniform(np.log(low), np.log(high), size=number))
            vectors = directions * (2 * np.pi / wavelengths)[:, None]
            return vectors.astype(np.float32), rng.uniform(0, 2 * np.pi, size=number).astype(np.float32)

        vectors, phases = waves(count, *wavelength_mm)
        warp_vectors, warp_phases = waves(2, 2.5 * wavelength_mm[0], 2.5 * wavelength_mm[1])
        return cls(vectors, phases, warp_vectors, warp_phases)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Zero-mean field of unit variance at body-frame ``points`` (3, N)."""
        warp = np.zeros(points.shape[1], dtype=np.float32)
        for vector, phase in zip(self.warp_vectors, self.warp_phases):
            warp += np.cos(dot3(vector, points) + phase)
        warp *= np.float32(1.6)
        total = np.zeros(points.shape[1], dtype=np.float32)
        for index, (vector, phase) in enumerate(zip(self.wave_vectors, self.phases)):
            # alternate the warp's sign so the components do not move together
            total += np.cos(dot3(vector, points) + phase + (warp if index % 2 else -warp))
        return total * np.float32(np.sqrt(2.0 / len(self.phases)))


@dataclass
class _Sacral:
    """Sacrum-frame coordinates of the samples near the sacrum and joints (the "core")."""

    index: np.ndarray  # positions within the bony subset
    points: np.ndarray  # body-frame points (3, n)
    u: np.ndarray
    v: np.ndarray
    w: np.ndarray
    wc: np.ndarray  # curved mid-surface w at v
    ht: np.ndarray  # half thickness at v
    hw: np.ndarray  # half width at (v, w)


@dataclass
class _Structures:
    """Signed distances of the bony structures at a set of samples (see _structure_sdfs)."""

    sdf: dict[str, np.ndarray]  # per bone, all samples (FAR where culled)
    disc: np.ndarray  # all samples
    core: _Sacral  # samples near the sacrum and joints
    sacrum_solid: np.ndarray | None = None  # core samples: the wedge without its holes
    holes: np.ndarray | None = None  # core samples: canal and foramina
    m: dict[str, np.ndarray] = field(default_factory=dict)  # core samples, per side
    width: dict[str, np.ndarray] = field(default_factory=dict)  # core samples, per side
    cleft: dict[str, np.ndarray] = field(default_factory=dict)  # core samples, per side


@dataclass
class _BoneSample:
    """Bone, cleft and lesion fractions on the bony subset of the samples."""

    outer: dict[str, np.ndarray]
    marrow: dict[str, np.ndarray]
    cleft: dict[str, np.ndarray]
    holes: np.ndarray
    disc: np.ndarray
    lesion_tissue: dict[str, np.ndarray]
    labels: np.ndarray | None
    joint_line: np.ndarray | None
    lesion_bits: np.ndarray | None
    occupancy: dict[str, np.ndarray]


BOX_MARGIN_MM = 10.0  # culling margin: wider than any partial-volume ramp plus the smooth-min fillet
BODY_CENTER_Y = -10.0  # body-frame y of the body's widest line, just in front of the joints


class PhantomModel:
    """Anatomy plus placed lesions; answers "what tissue is at these LPS points?"."""

    def __init__(self, anatomy: Anatomy, lesions: list[PlacedLesion], seed: int) -> None:
        self.anatomy = anatomy
        self.lesions = list(lesions)
        a = anatomy
        self.rotation = rotation_matrix(a.yaw_deg, a.roll_deg, a.pitch_deg)  # body -> LPS
        self.origin_lps = np.asarray(a.offset_lps, dtype=np.float64)
        tilt = np.deg2rad(a.sacral_tilt_deg)
        self.e_u = np.array([1.0, 0.0, 0.0])
        self.e_v = np.array([0.0, -np.sin(tilt), np.cos(tilt)])
        self.e_w = np.array([0.0, -np.cos(tilt), -np.sin(tilt)])
        self.v_top = a.sacrum_length_up
        self.v_bottom = -a.sacrum_length_down
        self.joint_top = self.v_top - 5.0
        self.joint_bottom = self.joint_top - a.joint_length
        self.joint_mid = 0.5 * (self.joint_top + self.joint_bottom)
        self.keystone = float(np.tan(np.deg2rad(a.joint_angle_deg)))
        self.hw_slope = (a.sacrum_half_width_top - a.sacrum_half_width_bottom) / (self.v_top - self.v_bottom)
        self.m_norm = float(np.sqrt(1.0 + self.hw_slope**2 + self.keystone**2))
        self.v_curve = 0.5 * (self.v_top + self.v_bottom)
        # sacrum-frame origin in the body frame: the joint centre (v = joint_mid, w = 0) is body 0
        self.sacrum_origin = -self.joint_mid * self.e_v
        rng = rng_for(seed, "texture")
        self.fine_texture = _Texture.random(rng, 6, (2.0, 6.0))
        self.coarse_texture = _Texture.random(rng, 5, (12.0, 40.0))
        self.fascia = _Texture.random(rng, 3, (60.0, 140.0))
        # distance from the body's widest line to the skin of the back, at the joints' level
        sacrum_back = a.sacrum_half_thickness_top * 0.7
        self.back_depth = sacrum_back + a.back_soft_tissue - BODY_CENTER_Y

    # ------------------------------------------------------------------ frames
    def to_body(self, points_lps: np.ndarray) -> np.ndarray:
        """LPS points (..., 3) -> body-frame points (3, N) float32."""
        flat = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
        shifted = [flat[:, i] - self.origin_lps[i] for i in range(3)]
        r = self.rotation
        return np.stack(
            [(shifted[0] * r[0, j] + shifted[1] * r[1, j] + shifted[2] * r[2, j]).astype(np.float32) for j in range(3)]
        )

    def lps_to_body_vector(self, vector: np.ndarray) -> np.ndarray:
        """Rotate an LPS direction into the body frame."""
        return self.rotation.T @ np.asarray(vector, dtype=np.float64)

    def plane_to_body(self, origin_lps, row_step_lps, col_step_lps, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Body-frame points (3, rows*columns) of the grid ``origin + c*row_step + r*col_step``
        for the (possibly fractional) row and column indices given.

        Same points as ``to_body`` of the LPS grid, computed directly in float32: the
        grid is affine, so only three vectors need rotating.
        """
        r = self.rotation.T
        origin = (r @ (np.asarray(origin_lps, dtype=np.float64) - self.origin_lps)).astype(np.float32)
        along_row = (r @ np.asarray(row_step_lps, dtype=np.float64)).astype(np.float32)
        along_col = (r @ np.asarray(col_step_lps, dtype=np.float64)).astype(np.float32)
        cols = np.asarray(columns, dtype=np.float32)
        rows_ = np.asarray(rows, dtype=np.float32)
        points = (
            origin[:, None, None]
            + along_row[:, None, None] * cols[None, None, :]
            + along_col[:, None, None] * rows_[None, :, None]
        )
        return points.reshape(3, rows_.size * cols.size)

    def body_to_lps(self, points_body: np.ndarray) -> np.ndarray:
        """Body-frame points (..., 3) -> LPS (..., 3)."""
        return np.asarray(points_body, dtype=np.float64) @ self.rotation.T + self.origin_lps

    def sacrum_to_body(self, u: float, v: float, w: float) -> np.ndarray:
        """Sacrum-frame (u, v, w) -> body-frame point (3,)."""
        return self.sacrum_origin + u * self.e_u + v * self.e_v + w * self.e_w

    def sacrum_to_lps(self, u: float, v: float, w: float) -> np.ndarray:
        return self.body_to_lps(self.sacrum_to_body(u, v, w))

    @property
    def sacral_axis_lps(self) -> np.ndarray:
        """Unit vector along the long axis of the sacrum (towards its base) in LPS."""
        return self.rotation @ self.e_v

    @property
    def joint_center_lps(self) -> np.ndarray:
        """Midpoint between the two joints (the body-frame origin) in LPS."""
        return self.origin_lps.copy()

    # ------------------------------------------------------------------ sacral shape
    def _t(self, v):
        return np.clip((v - self.v_bottom) * (1.0 / (self.v_top - self.v_bottom)), 0.0, 1.0)

    def half_width(self, v: np.ndarray | float) -> np.ndarray | float:
        """Sacral half width at the curved mid-surface."""
        a = self.anatomy
        return a.sacrum_half_width_bottom + (a.sacrum_half_width_top - a.sacrum_half_width_bottom) * self._t(v)

    def half_thickness(self, v: np.ndarray | float) -> np.ndarray | float:
        """Sacral half thickness: thick S1 body at the base, thin towards the apex."""
        a = self.anatomy
        t = self._t(v)
        return a.sacrum_half_thickness_bottom + (a.sacrum_half_thickness_top - a.sacrum_half_thickness_bottom) * t * np.sqrt(t)

    def mid_surface(self, v: np.ndarray | float) -> np.ndarray | float:
        """w of the curved sacral mid-surface (anterior concavity), 0 at the joint centre."""
        k = self.anatomy.sacral_curvature
        d = v - self.v_curve
        return k * (d * d - (self.joint_mid - self.v_curve) ** 2)

    def lateral_distance(self, side: str, u: np.ndarray, hw: np.ndarray) -> np.ndarray:
        """``m``: distance lateral from the sacral joint surface on ``side`` (mm)."""
        return (SIDE_SIGN[side] * u - hw) * np.float32(1.0 / self.m_norm)

    def region_weight(self, region: str, v: np.ndarray) -> np.ndarray:
        """Smooth indicator of the upper / lower half of the joint (or 1 for the whole)."""
        if region == "whole":
            return np.ones_like(v)
        upper = np.clip(0.5 + (v - np.float32(self.joint_mid)) * np.float32(0.5), 0.0, 1.0)
        return upper if region == "upper" else 1.0 - upper

    def cleft_width(self, side: str, v: np.ndarray) -> np.ndarray:
        """Joint-space width along the joint, including narrowing / widening lesions."""
        base = self.anatomy.cleft_width_left if side == "left" else self.anatomy.cleft_width_right
        width = np.full_like(v, base)
        for lesion in self.lesions:
            if lesion.side == side and lesion.type in ("narrowing", "widening"):
                weight = self.region_weight(lesion.region, v)
                width += weight * (np.float32(lesion.target_width_mm) - width)
        return width

    # ------------------------------------------------------------------ culling boxes
    def _sacral_box(self, u_range, v_range, w_range) -> Box:
        corners = np.array([self.sacrum_to_body(u, v, w) for u in u_range for v in v_range for w in w_range])
        return Box(tuple(corners.min(0).tolist()), tuple(corners.max(0).tolist()))

    @cached_property
    def boxes(self) -> dict[str, Box]:
        """Body-frame bounding boxes used to evaluate each structure only near itself."""
        a = self.anatomy
        # the auricular blocks reach 10 mm behind the sacrum; the keystone widens the sacrum in front
        w_extent = a.sacrum_half_thickness_top + 2.0 * a.sacral_curvature * 60.0**2 + 14.0
        hw = a.sacrum_half_width_top + self.keystone * w_extent
        reach = (hw + 8.0) * self.m_norm + a.ilium_thickness + 4.0
        boxes = {
            "core": self._sacral_box((-reach, reach), (self.v_bottom - 5, self.v_top + 10), (-w_extent, w_extent)),
            "lumbar": _union(
                sphere_box(self._lumbar_frame()[0], 0.0),
                sphere_box(self._lumbar_frame()[0] + 40.0 * a.scale * self._lumbar_frame()[1], 0.0),
                grow=30.0 * a.scale,
            ),
        }
        parts = self._pelvis_parts
        lower = [name for name in parts if not name.startswith("femoral") and name != "trochanter"]
        femur = [name for name in parts if name.startswith("femoral") or name == "trochanter"]
        boxes["hip_lower_left"] = _union(*(_part_box(parts[name]) for name in lower))
        boxes["femur_left"] = _union(*(_part_box(parts[name]) for name in femur))
        boxes["wing_left"] = Box(
            (float(self.half_width(self.joint_mid)), a.wing_center_y - 45.0, -70.0 * a.scale),
            (a.wing_half_width + 18.0 * a.scale + 16, a.wing_center_y + a.wing_half_depth + 30, a.crest_height + 5),
        )
        for name in ("hip_lower", "femur", "wing"):
            boxes[f"{name}_right"] = boxes[f"{name}_left"].mirrored_x()
        boxes["all"] = _union(*boxes.values())
        return boxes

    culling = True  # tests switch this off to check that culling never changes a result

    def _inside(self, box: Box, points: np.ndarray) -> np.ndarray:
        """Indices of ``points`` (3, n) inside ``box`` grown by the culling margin."""
        if not self.culling:
            return np.arange(points.shape[1])
        low = np.asarray(box.low, dtype=np.float32) - BOX_MARGIN_MM
        high = np.asarray(box.high, dtype=np.float32) + BOX_MARGIN_MM
        x, y, z = points
        mask = (z >= low[2]) & (z <= high[2])
        mask &= x >= low[0]
        mask &= x <= high[0]
        mask &= y >= low[1]
        mask &= y <= high[1]
        return np.flatnonzero(mask)

    # ------------------------------------------------------------------ pelvis parts (left; x mirrored for right)
    @cached_property
    def _pelvis_parts(self) -> dict[str, tuple]:
        """Capsules (start, end, radius) and spheres (centre, None, radius) of hip bone and femur."""
        a = self.anatomy
        s = a.scale
        acetabulum = np.asarray(a.acetabulum)
        r_head = a.femoral_head_radius
        hw_joint = float(self.half_width(self.joint_mid))
        tuberosity = np.array([60.0, -12.0, -152.0]) * s
        pubis_top = np.array([15.0, -98.0, -108.0]) * s
        pubis_bottom = np.array([15.0, -92.0, -132.0]) * s
        return {
            "ilium_body": (np.array([hw_joint + 16.0, 2.0, -24.0 * s]), acetabulum + np.array([-4, 4, 26]) * s, 17.0 * s),
            "ischium": (acetabulum + np.array([-4, 16, -14]) * s, tuberosity, 13.0 * s),
            "superior_ramus": (acetabulum + np.array([-14, -18, -4]) * s, pubis_top, 9.0 * s),
            "pubic_body": (pubis_top, pubis_bottom, 10.0 * s),
            "inferior_ramus": (pubis_bottom, tuberosity + np.array([-5, -8, 8]) * s, 8.0 * s),
            "acetabular_cup": (acetabulum, None, r_head + 13.0 * s),
            "femoral_head": (acetabulum, None, r_head),
            "femoral_neck": (acetabulum, acetabulum + np.array([36, 6, -28]) * s, 14.0 * s),
            "femoral_shaft": (acetabulum + np.array([50, 8, -45]) * s, acetabulum + np.array([32, 2, -270]) * s, 14.0 * s),
            "trochanter": (acetabulum + np.array([55, 12, -22]) * s, None, 18.0 * s),
        }

    def _lumbar_frame(self) -> tuple[np.ndarray, np.ndarray]:
        """S1 endplate centre and the L5 axis (lordotic: steeper than the sacrum)."""
        a = self.anatomy
        endplate = self.sacrum_to_body(0.0, self.v_top, self.mid_surface(self.v_top) + 0.3 * a.sacrum_half_thickness_top)
        axis = self.e_v + np.array([0.0, 0.0, 0.6])
        return endplate, axis / np.linalg.norm(axis)

    # ------------------------------------------------------------------ structure SDFs
    def _sacral_coordinates(self, index: np.ndarray, points: np.ndarray) -> _Sacral:
        rel = points - self.sacrum_origin.astype(np.float32)[:, None]
        u = points[0]
        ev, ew = self.e_v.astype(np.float32), self.e_w.astype(np.float32)
        v = ev[1] * rel[1] + ev[2] * rel[2]
        w = ew[1] * rel[1] + ew[2] * rel[2]
        wc = self.mid_surface(v).astype(np.float32)
        ht = self.half_thickness(v).astype(np.float32)
        hw = (self.half_width(v) + np.float32(self.keystone) * (w - wc)).astype(np.float32)
        return _Sacral(index, points, u, v, w, wc, ht, hw)

    def _sacrum(self, c: _Sacral) -> tuple[np.ndarray, np.ndarray]:
        """SDFs of the solid sacral wedge and of its holes (canal and foramina)."""
        f32 = np.float32
        solid = box_from_distances(
            (np.abs(c.u) - c.hw) * f32(1.0 / self.m_norm),
            np.abs(c.w - c.wc) - c.ht,
            np.maximum(c.v - f32(self.v_top), f32(self.v_bottom) - c.v),
            rounding=3.0,
        )
        return solid, self._sacral_holes(c)

    def _sacral_holes(self, c: _Sacral) -> np.ndarray:
        """SDF of the sacral canal and the four pairs of anterior sacral foramina."""
        s = self.anatomy.scale
        f32 = np.float32
        canal_radius = f32(4.0 * s) * (1.0 + self._t(c.v))
        depth = c.w - c.wc + f32(0.45) * c.ht
        holes = np.sqrt(c.u * c.u + depth * depth) - canal_radius
        length = self.v_top - self.v_bottom
        for index, fraction in enumerate((0.2, 0.4, 0.58, 0.74)):
            v_hole = self.v_top - fraction * length
            radius = (5.5 - 0.8 * index) * s
            if radius <= 0:
                continue
            u_hole = f32(0.42 * float(self.half_width(v_hole)))
            dv = (c.v - f32(v_hole)) ** 2
            du = np.abs(c.u) - u_hole  # both sides at once: the foramina are symmetric
            np.minimum(holes, np.sqrt(du * du + dv) - f32(radius), out=holes)
        return holes

    def _auricular_block(self, c: _Sacral, m: np.ndarray, width: np.ndarray) -> np.ndarray:
        """SDF of the ilium's joint part: parallel to the sacral surface across the cleft, reaching back (PSIS)."""
        f32 = np.float32
        d_m = np.maximum(width - m, m - (width + f32(self.anatomy.ilium_thickness)))
        d_v = np.maximum(c.v - f32(self.joint_top + 8), f32(self.joint_bottom - 6) - c.v)
        d_w = np.maximum((c.wc - c.ht - f32(10.0 * self.anatomy.scale)) - c.w, c.w - (c.wc + c.ht))
        return box_from_distances(d_m, d_v, d_w, rounding=2.0)

    def _cleft(self, c: _Sacral, m: np.ndarray, width: np.ndarray) -> np.ndarray:
        f32 = np.float32
        return box_from_distances(
            np.maximum(-m, m - width),
            np.maximum(c.v - f32(self.joint_top), f32(self.joint_bottom) - c.v),
            np.abs(c.w - c.wc) - c.ht,
        )

    def _wing(self, mirrored: np.ndarray) -> np.ndarray:
        """Iliac wing: a curved plate on an elliptic cylinder flaring upwards, cut at the crest."""
        a = self.anatomy
        s = a.scale
        f32 = np.float32
        x, y, z = mirrored
        # convex lateral outline: widest a little below the crest, narrowing towards the acetabulum
        above = z - f32(40.0 * s)
        half_width = f32(a.wing_half_width + 18.0 * s) - f32(0.0035 / s) * above * above
        half_depth = f32(a.wing_half_depth) + f32(0.5 * a.wing_flare) * z
        # thin blade anteriorly, thick posteriorly where the wing joins the sacroiliac part
        half_thickness = f32(4.5 * s) + f32(0.12) * np.clip(y - f32(a.wing_center_y), 0.0, 60.0)
        wing = np.abs(ellipse_distance(x, y - f32(a.wing_center_y), half_width, half_depth)) - half_thickness
        # the crest arches: highest over the middle of the wing, lower at the PSIS and the ASIS
        crest = (
            f32(a.crest_height)
            - f32(0.008 / s) * (x - f32(115.0 * s)) ** 2
            - f32(0.013 / s) * (y + f32(30.0 * s)) ** 2
        )
        np.maximum(wing, f32(self.half_width(self.joint_mid) + 6.0) - x, out=wing)
        np.maximum(wing, f32(a.wing_center_y - 38.0 * s) - y, out=wing)
        np.maximum(wing, z - crest, out=wing)
        np.maximum(wing, f32(-62.0 * s) - z, out=wing)
        return wing

    def _hip_lower(self, mirrored: np.ndarray) -> np.ndarray:
        """Ilium body, acetabular cup, ischium and pubis, smoothly joined."""
        a = self.anatomy
        s = a.scale
        parts = self._pelvis_parts
        k = float(7.0 * s)
        result = None
        for name in ("ilium_body", "ischium", "superior_ramus", "pubic_body", "inferior_ramus"):
            start, end, radius = parts[name]
            shape = capsule(mirrored, start, end, radius)
            result = shape if result is None else smooth_min(result, shape, k)
        center, _, outer = parts["acetabular_cup"]
        inner = a.femoral_head_radius + 2.0 * s  # 2 mm of hip cartilage around the head
        distance = sphere(mirrored, center, 0.0)
        shell = np.maximum(distance - np.float32(outer), np.float32(inner) - distance)
        opening = np.array([0.75, -0.35, -0.55], dtype=np.float32)
        opening /= np.linalg.norm(opening)
        cut = dot3(opening, mirrored - np.asarray(center, dtype=np.float32)[:, None]) - np.float32(4.0 * s)
        return smooth_min(result, np.maximum(shell, cut), 3.0)

    def _femur(self, mirrored: np.ndarray) -> np.ndarray:
        parts = self._pelvis_parts
        k = float(8.0 * self.anatomy.scale)
        result = None
        for name in ("trochanter", "femoral_neck", "femoral_shaft"):
            start, end, radius = parts[name]
            shape = sphere(mirrored, start, radius) if end is None else capsule(mirrored, start, end, radius)
            result = shape if result is None else smooth_min(result, shape, k)
        center, _, radius = parts["femoral_head"]
        # the head sits in the cup: keep it a sharp sphere so the hip joint space stays open
        return np.minimum(result, sphere(mirrored, center, radius))

    def _lumbar(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SDFs of the L5 vertebral body and the L5/S1 disc (elliptic cylinders)."""
        s = self.anatomy.scale
        endplate, axis = self._lumbar_frame()
        across = np.cross(axis, self.e_u).astype(np.float32)
        rel = points - endplate.astype(np.float32)[:, None]
        t = dot3(axis, rel)
        p = rel[0]
        q = dot3(across, rel)

        def cylinder(t0: float, t1: float, rx: float, ry: float) -> np.ndarray:
            radial = ellipse_distance(p, q, np.float32(rx), np.float32(ry))
            axial = np.maximum(np.float32(t0) - t, t - np.float32(t1))
            return box_from_distances(radial, axial, rounding=2.0)

        return cylinder(10.0 * s, 38.0 * s, 25.0 * s, 18.0 * s), cylinder(0.0, 10.0 * s, 24.0 * s, 17.0 * s)

    # ------------------------------------------------------------------ composition
    def compose(self, points_lps: np.ndarray, voxel_mm: float, with_masks: bool = True) -> Composition:
        """Tissue fractions (and masks) at LPS ``points`` (..., 3) for voxels of size ``voxel_mm``."""
        return self.compose_body(self.to_body(points_lps), voxel_mm, with_masks)

    def compose_slice(self, geometry, index: int, with_masks: bool = True) -> Composition:
        """Composition at the pixel centres of slice ``index`` of a SliceGeometry."""
        spacing = geometry.pixel_spacing
        origin = geometry.image_position(index)
        row_step = np.asarray(geometry.row_dir) * spacing[1]
        col_step = np.asarray(geometry.col_dir) * spacing[0]

        def points_at(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
            return self.plane_to_body(origin, row_step, col_step, rows, columns)

        shape = (geometry.rows, geometry.columns)
        return self.compose_grid(points_at, shape, spacing, float(min(spacing)), with_masks)

    def compose_grid(
        self,
        points_at,
        shape: tuple[int, ...],
        spacing_mm: tuple[float, ...],
        voxel_mm: float,
        with_masks: bool = True,
        block: int = 4,
        textures: bool = True,
    ) -> Composition:
        """Composition on a structured grid of samples, evaluating bone only where it can be.

        ``points_at(*indices)`` returns body-frame points (3, N) for the grid spanned by
        one (possibly fractional) index array per axis, in C order.  A coarse pass at the
        centres of ``block``-sized blocks measures the distance to the nearest bony
        structure; a block is kept when that distance, allowing a 1.5 safety factor on
        the distance estimates, could put one of its samples within half a voxel of bone.
        Samples in other blocks are soft tissue and skip the bone model entirely.
        ``spacing_mm`` is the largest sample spacing along each axis.
        """
        centres = [np.minimum(np.arange(0, n, block) + (block - 1) / 2.0, n - 1) for n in shape]
        coarse_points = points_at(*centres)
        coarse_shape = [c.size for c in centres]
        reach = 1.5 * float(np.sqrt(sum(((block - 1) / 2.0 * d) ** 2 for d in spacing_mm))) + voxel_mm

        def expand(blocks: np.ndarray) -> np.ndarray:
            for axis, n in enumerate(shape):
                blocks = np.repeat(blocks, block, axis=axis).take(np.arange(n), axis=axis)
            return blocks.ravel()

        near_bone = self.bone_proximity(coarse_points).reshape(coarse_shape) < reach
        in_body = self.body_sdf(coarse_points).reshape(coarse_shape) < reach
        if not self.culling:
            near_bone = in_body = np.ones(coarse_shape, dtype=bool)
        near_bone, in_body = expand(near_bone), expand(in_body | near_bone)
        # the slow texture fields vary over centimetres: sample them at the block centres and interpolate
        fascia = _interpolate_grid(self.fascia(coarse_points).reshape(coarse_shape), centres, shape)
        coarse = (
            _interpolate_grid(self.coarse_texture(coarse_points).reshape(coarse_shape), centres, shape)
            if textures
            else None
        )
        points = points_at(*[np.arange(n) for n in shape])
        if in_body.all():
            return self.compose_body(
                points, voxel_mm, with_masks, bony=np.flatnonzero(near_bone), textures=textures,
                smooth_fields=(coarse, fascia),
            )
        # samples in blocks wholly outside the body are air: compose only the others
        body = np.flatnonzero(in_body)
        inner = self.compose_body(
            points[:, body], voxel_mm, with_masks, bony=np.flatnonzero(near_bone[body]), textures=textures,
            smooth_fields=(None if coarse is None else coarse[body], fascia[body]),
        )
        return inner.scattered(body, points.shape[1])

    def body_sdf(self, points: np.ndarray) -> np.ndarray:
        """Signed distance to the skin: an ellipse flatter behind (the back, the buttocks
        deepening below the joints) than in front, widening towards the hips."""
        a = self.anatomy
        f32 = np.float32
        x, y, z = points
        below = np.clip(-z, 0.0, 160.0)
        center_y = f32(BODY_CENTER_Y)
        back = f32(self.back_depth) + f32(0.3) * below
        depth = np.where(y > center_y, back, f32(a.body_half_depth))
        return ellipse_distance(x, y - center_y, f32(a.body_half_width) + f32(0.12) * below, depth)

    def compose_body(
        self,
        points: np.ndarray,
        voxel_mm: float,
        with_masks: bool = True,
        bony: np.ndarray | None = None,
        textures: bool = True,
        smooth_fields: tuple[np.ndarray | None, np.ndarray] | None = None,
    ) -> Composition:
        """Tissue fractions (and masks) at body-frame ``points`` (3, N).

        ``bony`` lists the samples that may be near bone (all inside the pelvis box by
        default).  Without ``textures`` the texture fields are left at zero (they only
        modulate signal, never the tissue fractions).  ``smooth_fields`` may bring the
        slowly varying (coarse texture, fascia) fields already evaluated.
        """
        a = self.anatomy
        f32 = np.float32
        n = points.shape[1]
        x, y, z = points

        body_sdf = self.body_sdf(points)
        f_body = inside_fraction(body_sdf, voxel_mm)
        f_inner = inside_fraction(body_sdf + f32(a.fat_thickness), voxel_mm)
        f_viscera = inside_fraction(
            ellipsoid_distance((x, y - f32(-62.0 * a.scale), z - f32(10.0)), (95.0 * a.scale, 55.0 * a.scale, 170.0)),
            voxel_mm,
        )
        given_coarse, fascia = smooth_fields if smooth_fields is not None else (None, self.fascia(points))
        if not textures:
            coarse = np.zeros(n, dtype=np.float32)
        else:
            coarse = given_coarse if given_coarse is not None else self.coarse_texture(points)
        fine = np.zeros(n, dtype=np.float32)

        if bony is None:
            bony = self._inside(self.boxes["all"], points)
        bone = self._bones(points[:, bony], voxel_mm, with_masks) if bony.size else None

        def full(values: np.ndarray | None, dtype=np.float32) -> np.ndarray:
            array = np.zeros(n, dtype=dtype)
            if values is not None:
                array[bony] = values
            return array

        fractions = np.zeros((len(TISSUES), n), dtype=np.float32)
        if bone is not None:
            if textures:
                fine[bony] = self.fine_texture(points[:, bony])
            lesion_sum = sum(bone.lesion_tissue.values())
            cortex_sub = sum(bone.outer[b] - bone.marrow[b] for b in BONES)
            marrow_sub = sum(bone.marrow[b] for b in BONES)
            bone_sub = np.minimum(sum(bone.outer[b] for b in BONES) + lesion_sum, 1.0)
            bone_total = full(bone_sub)
            fractions[T["cortex"], bony] = cortex_sub
            fractions[T["marrow"], bony] = marrow_sub
            for tissue, values in bone.lesion_tissue.items():
                fractions[T[tissue], bony] = values
            free = np.maximum(f_inner - bone_total, 0.0)
            cleft = np.minimum(full(bone.cleft["left"] + bone.cleft["right"]), free)
            free -= cleft
            holes = np.minimum(full(bone.holes), free)
            free -= holes
            disc = np.minimum(full(bone.disc), free)
            free -= disc
            fractions[T["cleft"]] = cleft
            fractions[T["disc"]] = disc
        else:
            free = f_inner.copy()
            holes = np.zeros(n, dtype=np.float32)
        viscera = free * f_viscera
        muscle_region = free - viscera
        # intermuscular fat planes: thin sheets where a slowly varying field crosses zero
        planes = muscle_region * np.clip(f32(1.0) - np.abs(fascia) * f32(9.0), 0.0, 0.8)
        fractions[T["viscera"]] = viscera
        fractions[T["muscle"]] = muscle_region - planes
        fractions[T["fat"]] = np.maximum(f_body - f_inner, 0.0) + holes + planes
        fractions[T["air"]] = np.maximum(1.0 - fractions[1:].sum(axis=0), 0.0)

        composition = Composition(fractions, fine, coarse)
        if with_masks:
            labels = np.zeros(n, dtype=np.uint8)
            labels[f_body >= 0.5] = ANATOMY_LABELS["fat"]
            labels[(fractions[T["muscle"]] + fractions[T["viscera"]] + fractions[T["disc"]]) >= 0.5] = ANATOMY_LABELS["soft_tissue"]
            composition.labels = labels
            composition.joint_line = np.zeros(n, dtype=np.uint8)
            composition.lesion_bits = np.zeros(n, dtype=np.uint16)
            composition.occupancy = {name: np.zeros(n, dtype=bool) for name in OCCUPANCY}
            if bone is not None:
                bone_labels = bone.labels
                labels[bony] = np.where(bone_labels > 0, bone_labels, labels[bony])
                composition.joint_line[bony] = bone.joint_line
                composition.lesion_bits[bony] = bone.lesion_bits
                for name in OCCUPANCY:
                    composition.occupancy[name][bony] = bone.occupancy[name]
        return composition

    def _structure_sdfs(self, points: np.ndarray) -> _Structures:
        """Signed distances of the bones (and the sacral holes, clefts, disc) at body-frame ``points``."""
        f32 = np.float32
        n = points.shape[1]
        sdf = {bone: np.full(n, FAR, dtype=np.float32) for bone in BONES}
        disc = np.full(n, FAR, dtype=np.float32)
        core_index = self._inside(self.boxes["core"], points)
        core = self._sacral_coordinates(core_index, points[:, core_index])
        structures = _Structures(sdf, disc, core)
        if core_index.size:
            solid, holes = self._sacrum(core)
            sdf["sacrum"][core_index] = np.maximum(solid, -holes)
            structures.sacrum_solid, structures.holes = solid, holes
            for side in ("left", "right"):
                m = self.lateral_distance(side, core.u, core.hw)
                width = self.cleft_width(side, core.v)
                structures.m[side], structures.width[side] = m, width
                structures.cleft[side] = self._cleft(core, m, width)
                sdf[f"{side}_ilium"][core_index] = self._auricular_block(core, m, width)

        k_hip = float(7.0 * self.anatomy.scale)
        for side in ("left", "right"):
            sign = f32(SIDE_SIGN[side])
            hip = sdf[f"{side}_ilium"]
            for name, shape in (("wing", self._wing), ("hip_lower", self._hip_lower)):
                index = self._inside(self.boxes[f"{name}_{side}"], points)
                if index.size:
                    mirrored = points[:, index] * np.array([[sign], [1], [1]], dtype=np.float32)
                    hip[index] = smooth_min(hip[index], shape(mirrored), k_hip)
            index = self._inside(self.boxes[f"femur_{side}"], points)
            if index.size:
                mirrored = points[:, index] * np.array([[sign], [1], [1]], dtype=np.float32)
                sdf["other"][index] = np.minimum(sdf["other"][index], self._femur(mirrored))
        index = self._inside(self.boxes["lumbar"], points)
        if index.size:
            l5, disc_sdf = self._lumbar(points[:, index])
            sdf["other"][index] = np.minimum(sdf["other"][index], l5)
            disc[index] = disc_sdf
        return structures

    def bone_proximity(self, points: np.ndarray) -> np.ndarray:
        """Signed distance to the nearest bony structure, counting the sacrum without its
        holes, the clefts and the disc (everything ``_bones`` gives a fraction to)."""
        structures = self._structure_sdfs(points)
        sdf = structures.sdf
        nearest = np.minimum(np.minimum(sdf["other"], structures.disc), np.minimum(sdf["left_ilium"], sdf["right_ilium"]))
        nearest = np.minimum(nearest, sdf["sacrum"])
        core = structures.core.index
        if core.size:
            solid = np.minimum(structures.sacrum_solid, np.minimum(structures.cleft["left"], structures.cleft["right"]))
            nearest[core] = np.minimum(nearest[core], solid)
        return nearest

    def _bones(self, points: np.ndarray, voxel_mm: float, with_masks: bool) -> _BoneSample:
        """Bone, cleft and lesion fractions at body-frame ``points`` (3, n) near the pelvis."""
        f32 = np.float32
        n = points.shape[1]
        step = lambda sdf: inside_fraction(sdf, voxel_mm)
        structures = self._structure_sdfs(points)
        sdf, core = structures.sdf, structures.core
        core_index = core.index
        m_side, width_side, cleft_sdf_side = structures.m, structures.width, structures.cleft
        holes = np.zeros(n, dtype=np.float32)
        cleft = {side: np.zeros(n, dtype=np.float32) for side in ("left", "right")}
        if core_index.size:
            holes[core_index] = step(structures.holes) * step(structures.sacrum_solid)
            for side in ("left", "right"):
                cleft[side][core_index] = step(cleft_sdf_side[side])
        disc = step(structures.disc)

        cortex = {"sacrum": CORTEX_MM["sacrum"], "left_ilium": CORTEX_MM["ilium"], "right_ilium": CORTEX_MM["ilium"], "other": CORTEX_MM["other"]}
        outer = {bone: step(sdf[bone]) for bone in BONES}
        marrow = {bone: step(sdf[bone] + f32(cortex[bone])) for bone in BONES}
        # bones may touch (fillets, head in cup): never let them add up beyond the voxel
        total = outer["sacrum"] + outer["left_ilium"] + outer["right_ilium"] + outer["other"]
        overfull = total > 1.0
        if np.any(overfull):
            scale = np.where(overfull, 1.0 / np.maximum(total, 1e-6), 1.0).astype(np.float32)
            for bone in BONES:
                outer[bone] *= scale
                marrow[bone] *= scale

        labels = joint_line = lesion_bits = None
        occupancy: dict[str, np.ndarray] = {}
        if with_masks:
            labels = np.zeros(n, dtype=np.uint8)
            labels[outer["other"] >= 0.5] = ANATOMY_LABELS["other_bone"]
            labels[cleft["left"] >= 0.5] = ANATOMY_LABELS["left_joint"]
            labels[cleft["right"] >= 0.5] = ANATOMY_LABELS["right_joint"]
            labels[outer["sacrum"] >= 0.5] = ANATOMY_LABELS["sacrum"]
            labels[outer["left_ilium"] >= 0.5] = ANATOMY_LABELS["left_ilium"]
            labels[outer["right_ilium"] >= 0.5] = ANATOMY_LABELS["right_ilium"]
            occupancy = {
                "sacrum": outer["sacrum"] >= 0.5,
                "left_ilium": outer["left_ilium"] >= 0.5,
                "right_ilium": outer["right_ilium"] >= 0.5,
                "left_joint": cleft["left"] >= 0.5,
                "right_joint": cleft["right"] >= 0.5,
            }
            joint_line = np.zeros(n, dtype=np.uint8)
            lesion_bits = np.zeros(n, dtype=np.uint16)
            if core_index.size:
                joint_line[core_index] = self._joint_line(core, m_side, width_side, voxel_mm)

        lesion_tissue = {name: np.zeros(n, dtype=np.float32) for name in ("edema", "sclerosis", "fat_lesion", "erosion")}
        if core_index.size and self.lesions:
            self._apply_lesions(core, m_side, width_side, cleft_sdf_side, outer, marrow, cleft, lesion_tissue, lesion_bits)
        return _BoneSample(outer, marrow, cleft, holes, disc, lesion_tissue, labels, joint_line, lesion_bits, occupancy)

    def _apply_lesions(self, core, m_side, width_side, cleft_sdf_side, outer, marrow, cleft, lesion_tissue, lesion_bits) -> None:
        """Turn normal tissue into lesion tissue, in place, and set lesion mask bits.

        Everything happens on the core samples (near the joints).  Order matters:
        ankylosis rebuilds bone across the cleft first, erosions then remove bone,
        sclerosis / fat / edema finally change the marrow that is left.
        """
        f32 = np.float32
        idx = core.index
        order = {"ankylosis": 0, "narrowing": 0, "widening": 0, "erosion": 1, "sclerosis": 2, "fat": 3, "edema": 4}
        for lesion in sorted(self.lesions, key=lambda item: order[item.type]):
            side = lesion.side
            bit = np.uint16(1 << lesion.bit)
            m = m_side[side]
            band = (m > -1.5) & (m < width_side[side] + 1.5) & (cleft_sdf_side[side] < 1.5)
            if lesion.type in ("narrowing", "widening"):
                if lesion_bits is not None:
                    mask = band & (self.region_weight(lesion.region, core.v) >= 0.5)
                    lesion_bits[idx[mask]] |= bit
                continue
            if lesion.type == "ankylosis":
                weight = self.region_weight(lesion.region, core.v) * band
                bridge = cleft[side][idx] * weight
                if lesion_bits is not None:
                    lesion_bits[idx[bridge >= 0.25]] |= bit
                cleft[side][idx] -= bridge
                # the bridge is trabecular bone continuous with both bones: the facing cortices vanish too
                for joined in ("sacrum", f"{side}_ilium"):
                    marrow[joined][idx] += (outer[joined][idx] - marrow[joined][idx]) * weight
                marrow[f"{side}_ilium"][idx] += bridge
                outer[f"{side}_ilium"][idx] += bridge
                continue
            bone = "sacrum" if lesion.bone == "sacrum" else f"{side}_ilium"
            near = self._inside(lesion.box(self), core.points)
            if not near.size:
                continue
            field = lesion.field(self, m[near], core.v[near], core.w[near])
            at = idx[near]
            if lesion.type == "erosion":
                taken = outer[bone][at] * field
                mask = taken >= 0.5
                marrow[bone][at] -= marrow[bone][at] * field
                outer[bone][at] -= taken
                lesion_tissue["erosion"][at] += taken
            else:
                base = marrow[bone][at] * field
                mask = base >= 0.5
                amount = base * f32(lesion.intensity)
                marrow[bone][at] -= amount
                outer[bone][at] -= amount
                target = {"sclerosis": "sclerosis", "fat": "fat_lesion", "edema": "edema"}[lesion.type]
                lesion_tissue[target][at] += amount
            if lesion_bits is not None:
                lesion_bits[at[mask]] |= bit

    def _joint_line(self, core: _Sacral, m_side, width_side, voxel_mm: float) -> np.ndarray:
        """Mid-line of each cleft (about one voxel thick): the line a reader would trace."""
        line = np.zeros(core.v.shape, dtype=np.uint8)
        inside = (core.v <= self.joint_top) & (core.v >= self.joint_bottom) & (np.abs(core.w - core.wc) <= core.ht)
        for side, label in (("left", JOINT_LINE_LABELS["left"]), ("right", JOINT_LINE_LABELS["right"])):
            on_line = inside & (np.abs(m_side[side] - 0.5 * width_side[side]) <= 0.5 * voxel_mm)
            line[on_line] = label
        return line


OCCUPANCY: tuple[str, ...] = ("sacrum", "left_ilium", "right_ilium", "left_joint", "right_joint")


def _interpolate_grid(values: np.ndarray, centres: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation from samples at ``centres`` (one index array per axis) to every
    integer index of ``shape``; returns the flattened (C order) result."""
    result = values.astype(np.float32)
    for axis, (positions, n) in enumerate(zip(centres, shape)):
        if positions.size == 1:
            result = np.repeat(result, n, axis=axis)
            continue
        index = np.arange(n, dtype=np.float64)
        upper = np.clip(np.searchsorted(positions, index, side="right"), 1, positions.size - 1)
        lower = upper - 1
        weight = np.clip((index - positions[lower]) / (positions[upper] - positions[lower]), 0.0, 1.0)
        view = [1] * result.ndim
        view[axis] = n
        weight = weight.astype(np.float32).reshape(view)
        result = result.take(lower, axis=axis) * (1.0 - weight) + result.take(upper, axis=axis) * weight
    return result.ravel()


def _part_box(part: tuple) -> Box:
    start, end, radius = part
    return sphere_box(start, radius) if end is None else capsule_box(start, end, radius)


def _union(*boxes: Box, grow: float = 0.0) -> Box:
    low = np.min([box.low for box in boxes], axis=0) - grow
    high = np.max([box.high for box in boxes], axis=0) + grow
    return Box(tuple(low.tolist()), tuple(high.tolist()))
