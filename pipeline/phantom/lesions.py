"""Lesions: the SPEC format, seeded random lesions, and their placement in the anatomy.

A lesion is described by *what* and *where* in radiological terms (type, patient
side, joint quadrant or joint region, severity, size); placement turns that into a
soft ellipsoid in the sacrum frame, hugging the joint surface as subchondral lesions
do.  See the package docstring for the SPEC format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .anatomy import LESION_EDGE_MM, SIDE_SIGN, PhantomModel
from .sdf import Box, ellipsoid_distance, inside_fraction
from .seeding import rng_for

SIDES: tuple[str, ...] = ("left", "right")
QUADRANTS: tuple[str, ...] = ("upper_ilium", "lower_ilium", "upper_sacrum", "lower_sacrum")
REGIONS: tuple[str, ...] = ("upper", "lower", "whole")
SEVERITIES: dict[str, float] = {"mild": 0.55, "moderate": 0.8, "severe": 1.0}
BONE_LESIONS: tuple[str, ...] = ("edema", "erosion", "sclerosis", "fat")
JOINT_LESIONS: tuple[str, ...] = ("ankylosis", "narrowing", "widening")
LESION_TYPES: tuple[str, ...] = BONE_LESIONS + JOINT_LESIONS
STRUCTURAL_TYPES: tuple[str, ...] = ("erosion", "sclerosis", "fat", "ankylosis", "narrowing", "widening")
RADIOGRAPHIC_TYPES: tuple[str, ...] = ("erosion", "sclerosis", "ankylosis", "narrowing", "widening")
MAX_LESIONS = 16  # lesion masks are 16-bit fields, one bit per lesion

# default diameter ranges (mm) of focal lesions, per type
SIZE_RANGE_MM: dict[str, tuple[float, float]] = {
    "edema": (7.0, 20.0),
    "fat": (7.0, 16.0),
    "sclerosis": (12.0, 24.0),
    "erosion": (3.0, 7.0),
}
NARROWED_WIDTH_MM = (0.6, 1.0)
WIDENED_WIDTH_MM = (5.5, 7.5)

_SPEC_KEYS = {"type", "side", "quadrant", "region", "severity", "size_mm", "depth_mm", "position"}


@dataclass(frozen=True)
class LesionSpec:
    """One requested lesion, validated and normalised."""

    type: str
    side: str
    quadrant: str | None  # bone lesions only
    region: str  # upper / lower / whole: the quadrant's half for bone lesions
    severity: str = "moderate"
    size_mm: float | None = None
    depth_mm: float | None = None
    position: float | None = None  # 0..1 along the quadrant's half of the joint (bottom..top)

    @property
    def bone(self) -> str | None:
        return None if self.quadrant is None else self.quadrant.split("_")[1]

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": self.type, "side": self.side, "severity": self.severity}
        if self.quadrant is not None:
            entry["quadrant"] = self.quadrant
        else:
            entry["region"] = self.region
        for key in ("size_mm", "depth_mm", "position"):
            value = getattr(self, key)
            if value is not None:
                entry[key] = round(float(value), 3)
        return entry

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> LesionSpec:
        """Validate one SPEC lesion entry (see the package docstring)."""
        if not isinstance(entry, dict):
            raise ValueError(f"lesion entry must be an object, got {entry!r}")  # noqa: TRY004 - a bad SPEC value
        unknown = set(entry) - _SPEC_KEYS
        if unknown:
            raise ValueError(f"unknown lesion keys {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
        kind = entry.get("type")
        if kind not in LESION_TYPES:
            raise ValueError(f"lesion type must be one of {LESION_TYPES}, got {kind!r}")
        side = entry.get("side")
        if side not in SIDES:
            raise ValueError(f"lesion side must be 'left' or 'right' (patient's), got {side!r}")
        severity = entry.get("severity", "moderate")
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {tuple(SEVERITIES)}, got {severity!r}")
        quadrant = entry.get("quadrant")
        region = entry.get("region")
        if quadrant is not None and quadrant not in QUADRANTS:
            raise ValueError(f"quadrant must be one of {QUADRANTS}, got {quadrant!r}")
        if region is not None and region not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
        if kind in BONE_LESIONS:
            if quadrant is None:
                raise ValueError(f"a {kind} lesion needs a quadrant, one of {QUADRANTS}")
            region = quadrant.split("_")[0]
        else:
            # joint-space lesions span both bones: a quadrant only picks the upper or lower half
            if region is None:
                region = quadrant.split("_")[0] if quadrant is not None else "whole"
            quadrant = None
        position = entry.get("position")
        if position is not None and not 0.0 <= float(position) <= 1.0:
            raise ValueError(f"position must be within 0..1, got {position!r}")
        for key in ("size_mm", "depth_mm"):
            if entry.get(key) is not None and float(entry[key]) <= 0:
                raise ValueError(f"{key} must be positive, got {entry[key]!r}")
        return cls(
            type=kind,
            side=side,
            quadrant=quadrant,
            region=region,
            severity=severity,
            size_mm=None if entry.get("size_mm") is None else float(entry["size_mm"]),
            depth_mm=None if entry.get("depth_mm") is None else float(entry["depth_mm"]),
            position=None if position is None else float(position),
        )


@dataclass(frozen=True)
class PlacedLesion:
    """A lesion with its geometry in the sacrum frame (m, v, w; see anatomy.py)."""

    id: int
    type: str
    side: str
    quadrant: str | None
    region: str
    severity: str
    bit: int
    center_mvw: tuple[float, float, float] | None = None
    radii_mvw: tuple[float, float, float] | None = None
    target_width_mm: float | None = None

    @property
    def bone(self) -> str | None:
        return None if self.quadrant is None else self.quadrant.split("_")[1]

    @property
    def intensity(self) -> float:
        return SEVERITIES[self.severity]

    @property
    def quadrants(self) -> list[str]:
        """Quadrants this lesion involves (joint-space lesions involve both bones)."""
        if self.quadrant is not None:
            return [self.quadrant]
        halves = ("upper", "lower") if self.region == "whole" else (self.region,)
        return [f"{half}_{bone}" for half in halves for bone in ("ilium", "sacrum")]

    def box(self, model: PhantomModel) -> Box:
        """Body-frame box that surely contains the lesion's soft ellipsoid."""
        assert self.radii_mvw is not None
        center = lesion_center_body(model, self)
        reach = max(self.radii_mvw) * 1.25 + 3.0  # soft edge plus the joint surface's curvature
        return Box(tuple((center - reach).tolist()), tuple((center + reach).tolist()))

    def field(self, model: PhantomModel, m: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Soft membership (0..1) of a focal lesion, confined to its half of the joint."""
        assert self.center_mvw is not None and self.radii_mvw is not None
        mc, vc, wc = (np.float32(c) for c in self.center_mvw)
        sdf = ellipsoid_distance((m - mc, v - vc, w - wc), self.radii_mvw)
        return inside_fraction(sdf, LESION_EDGE_MM) * model.region_weight(self.region, v)


def load_spec(lesions: str | dict | Path) -> dict | str:
    """Accept "none", "random", a SPEC dict, a path to a SPEC JSON file, or a JSON string."""
    if isinstance(lesions, Path):
        return json.loads(lesions.read_text())
    if isinstance(lesions, dict):
        return lesions
    if isinstance(lesions, str):
        if lesions in ("none", "random"):
            return lesions
        text = lesions.strip()
        if text.startswith("{"):
            return json.loads(text)
        path = Path(lesions)
        if path.is_file():
            return json.loads(path.read_text())
        raise ValueError(f"lesions must be 'none', 'random', a SPEC dict or a SPEC JSON path; got {lesions!r}")
    raise TypeError(f"unsupported lesions argument {type(lesions).__name__}")


def resolve_lesion_specs(seed: int, lesions: str | dict | Path) -> tuple[list[LesionSpec], dict]:
    """The lesion list for a study and the normalised SPEC that produced it (recorded in the ground truth)."""
    from .labels import mny_grade_for_side  # local: labels imports this module

    spec = load_spec(lesions)
    if spec == "none":
        return [], {"lesions": []}
    if spec == "random":
        specs = random_lesion_specs(seed)
        return specs, {"lesions": [s.to_json() for s in specs], "source": "random"}
    if not isinstance(spec, dict):
        raise ValueError("a lesion SPEC must be a JSON object")  # noqa: TRY004 - a bad SPEC value
    unknown = set(spec) - {"lesions", "mny_grade"}
    if unknown:
        raise ValueError(f"unknown SPEC keys {sorted(unknown)}; allowed: 'lesions', 'mny_grade'")
    specs = [LesionSpec.from_json(entry) for entry in spec.get("lesions", [])]
    requested = spec.get("mny_grade") or {}
    if set(requested) - set(SIDES):
        raise ValueError(f"mny_grade keys must be 'left'/'right', got {sorted(requested)}")
    for side, grade in requested.items():
        if not isinstance(grade, int) or not 0 <= grade <= 4:
            raise ValueError(f"mny_grade for {side} must be an integer 0..4, got {grade!r}")
        structural_here = [s for s in specs if s.side == side and s.type in RADIOGRAPHIC_TYPES]
        if not structural_here:
            specs += structural_specs_for_grade(side, grade, rng_for(seed, "spec-fill", side))
        elif mny_grade_for_side(specs, side) != grade:
            raise ValueError(
                f"SPEC asks for mNY grade {grade} on the {side} but its {side} lesions make grade "
                f"{mny_grade_for_side(specs, side)}; leave the grade out or list lesions that match"
            )
    _check_consistency(specs)
    normalised = {"lesions": [s.to_json() for s in specs]}
    if requested:
        normalised["mny_grade"] = dict(requested)
    return specs, normalised


def _check_consistency(specs: list[LesionSpec]) -> None:
    if len(specs) > MAX_LESIONS:
        raise ValueError(f"at most {MAX_LESIONS} lesions per study, got {len(specs)}")
    for side in SIDES:
        joint = [s for s in specs if s.side == side and s.type in JOINT_LESIONS]
        for index, first in enumerate(joint):
            for second in joint[index + 1 :]:
                overlapping = "whole" in (first.region, second.region) or first.region == second.region
                if overlapping and first.type != second.type:
                    raise ValueError(
                        f"{first.type} and {second.type} overlap in the {side} joint; give them different regions"
                    )


def structural_specs_for_grade(side: str, grade: int, rng: np.random.Generator) -> list[LesionSpec]:
    """Structural lesions that make modified New York grade ``grade`` on ``side`` (see labels.py)."""

    def focal(kind: str, quadrant: str, severity: str) -> LesionSpec:
        return LesionSpec(kind, side, quadrant, quadrant.split("_")[0], severity)

    def pick_quadrants(count: int) -> list[str]:
        # erosions and sclerosis favour the iliac side of the joint, as in spondyloarthritis
        weights = np.array([0.32, 0.32, 0.18, 0.18])
        chosen = rng.choice(len(QUADRANTS), size=count, replace=count > len(QUADRANTS), p=weights)
        return [QUADRANTS[i] for i in chosen]

    if grade == 0:
        return []
    if grade == 1:
        kind = str(rng.choice(["erosion", "sclerosis"]))
        return [focal(kind, pick_quadrants(1)[0], "mild")]
    if grade == 2:
        count = int(rng.integers(1, 3))
        return [focal(str(rng.choice(["erosion", "sclerosis"])), q, "moderate") for q in pick_quadrants(count)]
    if grade == 3:
        count = int(rng.integers(3, 5))
        quadrants = pick_quadrants(count)
        kinds = ["erosion", "sclerosis"] + [str(rng.choice(["erosion", "sclerosis"])) for _ in range(count - 2)]
        specs = [focal(kind, q, str(rng.choice(["moderate", "severe"]))) for kind, q in zip(kinds, quadrants)]
        extra = str(rng.choice(["none", "narrowing", "widening", "ankylosis"]))
        if extra != "none":
            region = "whole" if extra != "ankylosis" else str(rng.choice(["upper", "lower"]))
            specs.append(LesionSpec(extra, side, None, region, "moderate"))
        return specs
    if grade == 4:
        specs = [LesionSpec("ankylosis", side, None, "whole", "severe")]
        if rng.random() < 0.5:
            specs.append(focal("sclerosis", pick_quadrants(1)[0], "moderate"))
        return specs
    raise ValueError(f"mNY grade must be 0..4, got {grade}")


def random_lesion_specs(seed: int) -> list[LesionSpec]:
    """Seeded random lesions: healthy, active, structural or both (about 1 in 4 healthy)."""
    rng = rng_for(seed, "lesions")
    scenario = str(rng.choice(["healthy", "active", "structural", "both"], p=[0.25, 0.2, 0.2, 0.35]))
    specs: list[LesionSpec] = []
    main_side = str(rng.choice(SIDES))
    other_side = "right" if main_side == "left" else "left"
    if scenario in ("structural", "both"):
        main_grade = int(rng.choice([1, 2, 3, 4], p=[0.12, 0.35, 0.38, 0.15]))
        if rng.random() < 0.7:  # spondyloarthritis is usually bilateral
            other_grade = int(np.clip(main_grade + rng.integers(-1, 2), 0, 4))
        else:
            other_grade = 0
        specs += structural_specs_for_grade(main_side, main_grade, rng)
        specs += structural_specs_for_grade(other_side, other_grade, rng)
        for _ in range(int(rng.integers(0, 3))):  # fat metaplasia after inflammation
            quadrant = str(rng.choice(QUADRANTS))
            specs.append(LesionSpec("fat", main_side, quadrant, quadrant.split("_")[0], "moderate"))
    if scenario in ("active", "both"):
        for _ in range(int(rng.integers(1, 5))):
            side = main_side if rng.random() < 0.65 else other_side
            quadrant = QUADRANTS[int(rng.choice(4, p=[0.3, 0.3, 0.2, 0.2]))]
            severity = str(rng.choice(list(SEVERITIES), p=[0.25, 0.5, 0.25]))
            specs.append(LesionSpec("edema", side, quadrant, quadrant.split("_")[0], severity))
    return specs[:MAX_LESIONS]


def place_lesions(model: PhantomModel, specs: list[LesionSpec], seed: int) -> list[PlacedLesion]:
    """Give each lesion a position and size inside its quadrant and add it to ``model``.

    Joint-space lesions are placed first: they change the cleft width that the
    focal lesions are placed against.  Lesion ids and mask bits follow SPEC order.
    """
    rng = rng_for(seed, "lesion-placement")
    placed: dict[int, PlacedLesion] = {}
    for index, spec in enumerate(specs):
        if spec.type in JOINT_LESIONS:
            target = None
            if spec.type == "narrowing":
                target = float(rng.uniform(*NARROWED_WIDTH_MM))
            elif spec.type == "widening":
                target = float(rng.uniform(*WIDENED_WIDTH_MM))
            placed[index] = PlacedLesion(
                index + 1, spec.type, spec.side, None, spec.region, spec.severity, index, target_width_mm=target
            )
    model.lesions[:] = list(placed.values())
    for index, spec in enumerate(specs):
        if spec.type not in JOINT_LESIONS:
            placed[index] = _place_focal(model, spec, index, rng)
    model.lesions[:] = [placed[i] for i in range(len(specs))]
    return list(model.lesions)


def _place_focal(model: PhantomModel, spec: LesionSpec, index: int, rng: np.random.Generator) -> PlacedLesion:
    """Subchondral ellipsoid in ``spec``'s quadrant, clear of the quadrant's edges."""
    low, high = (model.joint_mid, model.joint_top) if spec.region == "upper" else (model.joint_bottom, model.joint_mid)
    diameter = spec.size_mm if spec.size_mm is not None else float(rng.uniform(*SIZE_RANGE_MM[spec.type]))
    if spec.type == "erosion":
        radii_along = diameter / 2
        depth = spec.depth_mm if spec.depth_mm is not None else float(rng.uniform(0.7, 1.0)) * diameter
        r_m = depth / 2 + 1.0
    elif spec.type == "sclerosis":
        radii_along = diameter / 2
        depth = spec.depth_mm if spec.depth_mm is not None else float(rng.uniform(5.0, 12.0))
        r_m = depth / 2 + 1.0
    else:
        radii_along = diameter / 2
        depth = spec.depth_mm if spec.depth_mm is not None else float(rng.uniform(2.0, 8.0))
        r_m = float(np.clip(diameter / 3, 2.5, 6.0))
    half_span = 0.5 * (high - low)
    r_v = float(min(radii_along, max(half_span - 2.0, 2.0)))
    margin = min(0.85 * r_v + 1.0, half_span)
    lo_v, hi_v = low + margin, high - margin
    fraction = spec.position if spec.position is not None else float(rng.uniform(0.0, 1.0))
    v_center = lo_v + fraction * (hi_v - lo_v) if hi_v > lo_v else 0.5 * (low + high)
    thickness = float(model.half_thickness(v_center))
    r_w = float(min(radii_along, max(thickness - 2.0, 2.5)))
    w_room = max(thickness - 0.5 * r_w - 2.0, 0.0)
    w_center = float(model.mid_surface(v_center)) + float(rng.uniform(-1.0, 1.0)) * w_room
    cleft = float(model.cleft_width(spec.side, np.array([v_center], dtype=np.float32))[0])
    if spec.type == "erosion":
        # straddles the subchondral cortex: open to the cleft, reaching ``depth`` into the bone
        m_center = (cleft + r_m - 1.5) if spec.bone == "ilium" else (1.5 - r_m)
    elif spec.type == "sclerosis":
        m_center = (cleft + r_m - 1.0) if spec.bone == "ilium" else (1.0 - r_m)
    else:
        m_center = (cleft + depth) if spec.bone == "ilium" else -depth
    return PlacedLesion(
        id=index + 1,
        type=spec.type,
        side=spec.side,
        quadrant=spec.quadrant,
        region=spec.region,
        severity=spec.severity,
        bit=index,
        center_mvw=(float(m_center), float(v_center), float(w_center)),
        radii_mvw=(float(r_m), r_v, r_w),
    )


def lesion_center_body(model: PhantomModel, lesion: PlacedLesion) -> np.ndarray:
    """Body-frame centre of a lesion (for joint-space lesions: the middle of its stretch of cleft)."""
    if lesion.center_mvw is None:
        low, high = {
            "upper": (model.joint_mid, model.joint_top),
            "lower": (model.joint_bottom, model.joint_mid),
            "whole": (model.joint_bottom, model.joint_top),
        }[lesion.region]
        v = 0.5 * (low + high)
        m = 0.5 * float(model.cleft_width(lesion.side, np.array([v], dtype=np.float32))[0])
        w = float(model.mid_surface(v))
    else:
        m, v, w = lesion.center_mvw
    half_width = float(model.half_width(v)) + model.keystone * (w - float(model.mid_surface(v)))
    u = SIDE_SIGN[lesion.side] * (half_width + m * model.m_norm)
    return model.sacrum_to_body(u, v, w)


def lesion_center_lps(model: PhantomModel, lesion: PlacedLesion) -> np.ndarray:
    """LPS centre of a lesion."""
    return model.body_to_lps(lesion_center_body(model, lesion))
