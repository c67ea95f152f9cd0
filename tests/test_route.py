"""Routing a classified study to the chains declared in config.yaml."""

from __future__ import annotations

import itertools
import subprocess
import sys
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

import pipeline.route
from pipeline.classify import Plane, Role
from pipeline.route import (
    ChainRequirement,
    ChainSpec,
    RoutedJob,
    SeriesCandidate,
    explain_routing,
    plan_routing,
    route_study,
)

CHAINS_YAML = """
chains:
  - name: sij-mri-coronal
    implementation: pipeline.chains.sij_mri:CoronalChain
    pack: sij-mri-2024
    requires:
      - {role: T1, planes: [coronal]}
      - {role: STIR, planes: [coronal]}
  - name: sij-mri-axial
    implementation: pipeline.chains.sij_mri:AxialChain
    requires:
      - {role: T2FS, planes: [axial]}
  - name: sij-ct
    implementation: pipeline.chains.sij_ct:Chain
    requires:
      - {role: CT, planes: [axial]}
  - name: sij-xr
    implementation: pipeline.chains.sij_xr:Chain
    options: {threshold: 0.5}
    requires:
      - {role: XR, planes: [coronal], name: pelvis_ap}
  - name: sij-experimental
    implementation: pipeline.chains.sij_mri:Experimental
    enabled: false
    requires:
      - {role: STIR}
"""


@pytest.fixture
def chains() -> list[ChainSpec]:
    return [ChainSpec.model_validate(raw) for raw in yaml.safe_load(CHAINS_YAML)["chains"]]


def series(
    uid: str,
    role: Role,
    plane: Plane,
    *,
    counts: bool = True,
    instances: int = 20,
    number: int | None = 1,
) -> SeriesCandidate:
    return SeriesCandidate(uid, role, plane, counts, instances, number)


def test_chain_config_parses(chains: list[ChainSpec]) -> None:
    coronal, axial, ct, xr, experimental = chains
    assert [r.key for r in coronal.requires] == ["t1", "stir"]
    assert coronal.pack == "sij-mri-2024" and coronal.enabled
    assert axial.requires[0].key == "t2fs"
    assert xr.requires[0].key == "pelvis_ap" and xr.options == {"threshold": 0.5}
    assert not experimental.enabled and experimental.requires[0].planes == []


def test_mri_study_gets_one_job_per_applicable_chain(chains: list[ChainSpec]) -> None:
    study = [
        series("loc", Role.OTHER, Plane.SAGITTAL, counts=False, instances=9),
        series("t1cor", Role.T1, Plane.CORONAL, number=3),
        series("stircor", Role.STIR, Plane.CORONAL, number=4),
        series("t2fsax", Role.T2FS, Plane.AXIAL, number=5),
    ]
    assert route_study(study, chains) == [
        RoutedJob("sij-mri-coronal", {"t1": "t1cor", "stir": "stircor"}),
        RoutedJob("sij-mri-axial", {"t2fs": "t2fsax"}),
    ]


def test_coronal_t2fs_does_not_feed_the_axial_chain(chains: list[ChainSpec]) -> None:
    study = [series("t2fscor", Role.T2FS, Plane.CORONAL), series("t1cor", Role.T1, Plane.CORONAL)]
    assert route_study(study, chains) == []
    lines = explain_routing(study, chains)
    axial = next(line for line in lines if "'sij-mri-axial'" in line)
    assert "not routed" in axial and "T2FS axial" in axial and "other planes (coronal)" in axial


def test_series_not_counted_as_input_are_never_chosen(chains: list[ChainSpec]) -> None:
    # A STIR MPR would be STIR coronal if it counted; it must not satisfy the chain.
    study = [
        series("t1cor", Role.T1, Plane.CORONAL),
        series("stir-mpr", Role.STIR, Plane.CORONAL, counts=False, instances=200),
    ]
    assert route_study(study, chains) == []
    coronal = explain_routing(study, chains)[0]
    assert "needs stir = STIR coronal" in coronal and "1 STIR series not counted as input" in coronal


def test_study_without_applicable_chain_routes_nothing(chains: list[ChainSpec]) -> None:
    study = [series("t2", Role.OTHER, Plane.AXIAL), series("loc", Role.OTHER, Plane.CORONAL, counts=False)]
    assert route_study(study, chains) == []
    lines = explain_routing(study, chains)
    assert len(lines) == len(chains)
    assert all("not routed" in line for line in lines)
    assert "no T1 series" in lines[0]
    assert route_study([], chains) == []


def test_disabled_chain_is_never_routed(chains: list[ChainSpec]) -> None:
    study = [series("stir", Role.STIR, Plane.AXIAL)]
    assert route_study(study, chains) == []
    assert explain_routing(study, chains)[-1] == "chain 'sij-experimental': not routed: disabled"
    enabled = chains[-1].model_copy(update={"enabled": True})
    assert route_study(study, [enabled]) == [RoutedJob("sij-experimental", {"stir": "stir"})]


def test_ct_and_xr_studies(chains: list[ChainSpec]) -> None:
    ct = [series("scout", Role.OTHER, Plane.CORONAL, counts=False), series("ax", Role.CT, Plane.AXIAL)]
    assert route_study(ct, chains) == [RoutedJob("sij-ct", {"ct": "ax"})]
    xr = [series("lat", Role.XR, Plane.SAGITTAL), series("ap", Role.XR, Plane.CORONAL, instances=1)]
    assert route_study(xr, chains) == [RoutedJob("sij-xr", {"pelvis_ap": "ap"})]


# --------------------------------------------------------------------------------------------
# Choosing among several fitting series
# --------------------------------------------------------------------------------------------

AXIAL_T2FS = ChainSpec(
    name="axial", implementation="pkg.mod:Chain", requires=[ChainRequirement(role=Role.T2FS, planes=[Plane.AXIAL])]
)


@pytest.mark.parametrize(
    ("candidates", "winner"),
    [
        # Most instances wins, whatever the series numbers.
        ([("a", 20, 9), ("b", 24, 2)], "b"),
        # Same count: the highest series number (a repeat after motion is numbered later).
        ([("a", 24, 5), ("b", 24, 7)], "b"),
        # A known series number beats a missing one.
        ([("a", 24, None), ("b", 24, 1)], "b"),
        # Same count and number: the lowest UID, so the choice never depends on input order.
        ([("1.2.9", 24, 5), ("1.2.10", 24, 5)], "1.2.10"),
    ],
    ids=["instances", "series-number", "missing-number", "uid"],
)
def test_preferred_series_is_deterministic(candidates: list[tuple[str, int, int | None]], winner: str) -> None:
    fitting = [series(uid, Role.T2FS, Plane.AXIAL, instances=n, number=num) for uid, n, num in candidates]
    for order in itertools.permutations(fitting):
        assert route_study(list(order), [AXIAL_T2FS]) == [RoutedJob("axial", {"t2fs": winner})]


def two_t1_chain() -> ChainSpec:
    return ChainSpec(
        name="two-t1",
        implementation="pkg.mod:Chain",
        requires=[
            ChainRequirement(role=Role.T1, name="t1_any"),
            ChainRequirement(role=Role.T1, planes=[Plane.CORONAL], name="t1_cor"),
        ],
    )


def test_one_series_never_serves_two_requirements() -> None:
    only = [series("t1cor", Role.T1, Plane.CORONAL)]
    assert route_study(only, [two_t1_chain()]) == []
    line = explain_routing(only, [two_t1_chain()])[0]
    assert "not enough fitting series to give each its own" in line


def test_assignment_leaves_the_constrained_series_to_the_later_requirement() -> None:
    # Greedy choice would give the bigger coronal T1 to "any plane" and then fail "coronal".
    study = [series("t1cor", Role.T1, Plane.CORONAL, instances=30), series("t1ax", Role.T1, Plane.AXIAL)]
    assert route_study(study, [two_t1_chain()]) == [RoutedJob("two-t1", {"t1_any": "t1ax", "t1_cor": "t1cor"})]


def test_assignment_prefers_best_series_when_there_is_room() -> None:
    study = [
        series("t1cor-big", Role.T1, Plane.CORONAL, instances=30),
        series("t1cor-small", Role.T1, Plane.CORONAL, instances=20),
        series("t1ax", Role.T1, Plane.AXIAL, instances=25),
    ]
    assert route_study(study, [two_t1_chain()]) == [
        RoutedJob("two-t1", {"t1_any": "t1cor-big", "t1_cor": "t1cor-small"})
    ]


def test_many_competing_requirements_route_quickly() -> None:
    """The assignment search is polynomial: 6 requirements over 40 series fit, then do not."""
    requirements = [ChainRequirement(role=Role.STIR, name=f"stir{i}") for i in range(6)]
    chain = ChainSpec(name="many", implementation="pkg.mod:Chain", requires=requirements)
    study = [series(f"s{i:02d}", Role.STIR, Plane.CORONAL, instances=i) for i in range(40)]
    assert route_study(study, [chain])[0].inputs == {f"stir{i}": f"s{39 - i:02d}" for i in range(6)}
    # Unsatisfiable last requirement: trying combinations would take 40·39·…·35 steps.
    impossible = ChainSpec(
        name="impossible",
        implementation="pkg.mod:Chain",
        requires=[*requirements, ChainRequirement(role=Role.STIR, planes=[Plane.AXIAL], name="stir_ax")],
    )
    assert route_study(study, [impossible]) == []
    assert "needs stir_ax = STIR axial" in explain_routing(study, [impossible])[0]


def test_one_series_may_feed_several_chains(chains: list[ChainSpec]) -> None:
    second = ChainSpec(name="stir-only", implementation="pkg.mod:Chain", requires=[ChainRequirement(role=Role.STIR)])
    study = [series("t1", Role.T1, Plane.CORONAL), series("stir", Role.STIR, Plane.CORONAL)]
    jobs = route_study(study, [chains[0], second])
    assert [job.inputs["stir"] for job in jobs] == ["stir", "stir"]


# --------------------------------------------------------------------------------------------
# Explanations and validation
# --------------------------------------------------------------------------------------------


def test_explain_names_chosen_series(chains: list[ChainSpec]) -> None:
    study = [series("1.2.3", Role.T1, Plane.CORONAL, number=3, instances=22), series("1.2.4", Role.STIR, Plane.CORONAL)]
    line = explain_routing(study, chains)[0]
    assert line.startswith("chain 'sij-mri-coronal': routed:")
    assert "t1 ← 1.2.3 (T1 coronal, series #3, 22 instances)" in line


def test_plan_routing_matches_each_chain_once_for_jobs_and_lines(
    chains: list[ChainSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    study = [series("t1cor", Role.T1, Plane.CORONAL), series("stircor", Role.STIR, Plane.CORONAL)]
    planned: list[str] = []
    plan_chain = pipeline.route._plan_chain

    def counting(chain: ChainSpec, ordered: Any) -> Any:
        planned.append(chain.name)
        return plan_chain(chain, ordered)

    monkeypatch.setattr(pipeline.route, "_plan_chain", counting)
    plan = plan_routing(study, chains)
    assert planned == [chain.name for chain in chains]
    assert plan.jobs == route_study(study, chains) == [
        RoutedJob("sij-mri-coronal", {"t1": "t1cor", "stir": "stircor"})
    ]
    assert plan.lines == explain_routing(study, chains)
    assert len(plan.lines) == len(chains) and plan.lines[0].startswith("chain 'sij-mri-coronal': routed:")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"implementation": "no_colon_here"}, "package.module:Attribute"),
        ({"implementation": "pkg.mod:"}, "package.module:Attribute"),
        ({"requires": []}, "at least 1"),
        ({"requires": [{"role": "T1"}, {"role": "T1"}]}, "used twice"),
        ({"requires": [{"role": "OTHER"}]}, "cannot require role OTHER"),
        ({"requires": [{"role": "T1", "planes": ["semicoronal"]}]}, "planes"),
        ({"requires": [{"role": "T1", "plane": "coronal"}]}, "Extra inputs"),
        ({"enabeld": False}, "Extra inputs"),
    ],
)
def test_invalid_chains_are_rejected(raw: dict[str, Any], message: str) -> None:
    base = {"name": "c", "implementation": "pkg.mod:Chain", "requires": [{"role": "T1"}]}
    with pytest.raises(ValidationError, match=message):
        ChainSpec.model_validate({**base, **raw})


def test_duplicate_chain_names_are_rejected(chains: list[ChainSpec]) -> None:
    with pytest.raises(ValueError, match="declared twice"):
        route_study([], [chains[0], chains[0]])


def test_routing_and_classification_never_import_torch() -> None:
    """The node process imports these modules; even an attempted torch import is a failure
    (checked by recording import attempts, so it holds whether or not torch is installed)."""
    code = (
        "import sys\n"
        "attempts = []\n"
        "class Recorder:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        attempts.append(name)\n"
        "sys.meta_path.insert(0, Recorder())\n"
        "import pipeline.route, pipeline.classify\n"
        "sys.exit(1 if any(n.split('.')[0] == 'torch' for n in attempts) else 0)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
