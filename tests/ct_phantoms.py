"""Phantom CT studies the ct-slices tests share: one with the joints in view, one of the lumbar spine above them."""

from __future__ import annotations

from dataclasses import replace
from unittest import mock

from pipeline.phantom import PhantomStudy, generate_study
from pipeline.phantom import study as phantom_study

#: how far above the joints' centre (mm, towards the head) the lumbar CT is centred
LUMBAR_SHIFT_MM = 115.0


def ct_above_the_joints(seed: int) -> PhantomStudy:
    """A phantom CT of the lumbar spine above the sacroiliac joints: the phantom's own CT plan, moved
    ``LUMBAR_SHIFT_MM`` towards the head and shortened to 40 slices (the phantom renders what the plan covers)."""
    original = phantom_study.plan_ct

    def lumbar_plan(*args: object, **kwargs: object):  # noqa: ANN202 (a SeriesPlan)
        plan = original(*args, **kwargs)
        geometry = plan.geometry
        x, y, z = geometry.center
        offsets = geometry.slice_offsets
        middle = len(offsets) // 2
        return replace(plan, geometry=replace(geometry, center=(x, y, z + LUMBAR_SHIFT_MM), slice_offsets=offsets[max(0, middle - 20) : middle + 20]))

    with mock.patch.object(phantom_study, "plan_ct", lumbar_plan):
        return generate_study(seed, kinds=("ct",), lesions="none")


def ct_with_slices(seed: int, thickness_mm: float, coverage_mm: float, fov_mm: float | None = None, matrix: int = 512) -> PhantomStudy:
    """A phantom CT (right-sided grade 2) with slices ``thickness_mm`` apart over ``coverage_mm``
    centred on the joints; with ``fov_mm``, a joints-only field of view of ``matrix`` pixels
    centred on them (the phantom renders what the plan covers, so thin slices stay cheap)."""
    original = phantom_study.plan_ct

    def plan(model, *args: object, **kwargs: object):  # noqa: ANN001, ANN202 (a PhantomModel in, a SeriesPlan out)
        planned = original(model, *args, **kwargs)
        geometry = planned.geometry
        count = int(round(coverage_mm / thickness_mm))
        offsets = tuple(-(k - (count - 1) / 2.0) * thickness_mm for k in range(count))
        x, y, _ = geometry.center
        joints = model.joint_center_lps
        changes: dict[str, object] = {"slice_thickness": thickness_mm, "slice_offsets": offsets, "center": (x, y, float(joints[2]))}
        if fov_mm is not None:
            changes.update(rows=matrix, columns=matrix, pixel_spacing=(fov_mm / matrix, fov_mm / matrix), center=tuple(float(v) for v in joints))
        return replace(planned, geometry=replace(geometry, **changes))

    with mock.patch.object(phantom_study, "plan_ct", plan):
        return generate_study(seed, kinds=("ct",), lesions={"lesions": [], "mny_grade": {"left": 0, "right": 2}})
