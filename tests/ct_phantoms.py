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
