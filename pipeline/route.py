"""Routing: which analysis chains a completed study gets, and which series feed each one.

config.yaml declares chains with the roles and planes each needs.  A completed study gets one
job per enabled chain whose every requirement is met by a distinct series that counts as input;
a study that meets no chain gets no job (the caller records that and sends nothing).

Routing only reads chain declarations: it never imports a chain's implementation, so the node
process stays free of torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.classify import Plane, Role

__all__ = [
    "ChainRequirement",
    "ChainSeries",
    "ChainSpec",
    "OutputKind",
    "OutputPlan",
    "RoutedJob",
    "RoutingPlan",
    "SeriesCandidate",
    "explain_routing",
    "plan_routing",
    "route_study",
]

_IMPLEMENTATION = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


class ChainRequirement(BaseModel):
    """One input a chain needs: a series of this role in one of these planes (empty: any)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    planes: list[Plane] = Field(default_factory=list)
    name: str | None = None  # input key handed to the chain; defaults to the role, lower-case

    @field_validator("role")
    @classmethod
    def _not_other(cls, role: Role) -> Role:
        # OTHER is "no known role" (unclassified, Dixon, ...): never a meaningful chain input.
        if role is Role.OTHER:
            raise ValueError("a chain cannot require role OTHER")
        return role

    @property
    def key(self) -> str:
        """Input key under which the chosen series UID is passed to the chain."""
        return self.name or self.role.value.lower()

    def describe(self) -> str:
        planes = "/".join(p.value for p in self.planes) if self.planes else "any plane"
        return f"{self.role.value} {planes}"


class OutputKind(str, Enum):
    """The kinds of objects a chain sends back, each in a series of its own."""

    SR = "sr"
    HEATMAPS = "heatmaps"
    PARAMETRIC_MAPS = "parametric_maps"
    OVERLAYS = "overlays"


#: Series number of each kind relative to the chain's base, for result version 1.
KIND_OFFSETS: dict[OutputKind, int] = {
    OutputKind.SR: 0,
    OutputKind.HEATMAPS: 1,
    OutputKind.PARAMETRIC_MAPS: 2,
    OutputKind.OVERLAYS: 3,
}
#: Each result version moves the chain's series numbers up by this much, within a block of
#: SERIES_BLOCK numbers per chain; version 11 reuses version 1's numbers (its description
#: still says "result 11").
VERSION_STRIDE = 10
SERIES_BLOCK = 100
#: First base given to chains without series.base: 9100, 9200, ... in declaration order.
DEFAULT_SERIES_BASE = 9100


class ChainSeries(BaseModel):
    """Series numbers and descriptions of a chain's results (config.yaml ``chains[].series``).

    Result version v of kind k is series number ``base + offset(k) + 10 * ((v - 1) % 10)``: the
    SR of version 1 is base, its heatmaps base+1, parametric maps base+2, overlays base+3;
    version 2 uses base+10 .. base+13, and so on. So every chain's series sort together in
    PACS, no two series of a study share a number (for ten versions), and the same chain, kind
    and version always get the same number.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # None: DEFAULT_SERIES_BASE + SERIES_BLOCK x the chain's position in the config.
    base: Annotated[int, Field(ge=1, le=2**31 - 1 - SERIES_BLOCK)] | None = None
    # Replaces "AI <kind> <pack> <version>"; the demonstration mark and "result N" are kept.
    descriptions: dict[OutputKind, Annotated[str, Field(min_length=1, max_length=40)]] = Field(default_factory=dict)

    def number(self, kind: OutputKind, version: int, base: int | None = None) -> int:
        start = base if base is not None else (self.base if self.base is not None else DEFAULT_SERIES_BASE)
        return start + KIND_OFFSETS[kind] + VERSION_STRIDE * ((version - 1) % (SERIES_BLOCK // VERSION_STRIDE))


@dataclass(frozen=True)
class OutputPlan:
    """How a job's objects are numbered and named: handed from the worker to the encoders."""

    version: int = 1
    numbers: Mapping[OutputKind, int] = field(
        default_factory=lambda: {kind: 9000 + offset for kind, offset in KIND_OFFSETS.items()}
    )
    descriptions: Mapping[OutputKind, str] = field(default_factory=dict)  # missing: the encoder's default
    # The SR(s) of the previous result version (headers suffice): the new SR's Predecessor
    # Documents Sequence points at them.
    previous_versions: Sequence[Any] = ()

    @classmethod
    def for_chain(cls, series: ChainSeries, version: int, previous_versions: Sequence[Any] = ()) -> OutputPlan:
        return cls(
            version=version,
            numbers={kind: series.number(kind, version) for kind in OutputKind},
            descriptions=dict(series.descriptions),
            previous_versions=tuple(previous_versions),
        )


class ChainSpec(BaseModel):
    """One analysis chain as declared in config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    implementation: str  # "package.module:Attribute"; imported by the worker, never here
    pack: str | None = None
    enabled: bool = True
    requires: list[ChainRequirement] = Field(min_length=1)  # no requirement would match every study
    options: dict[str, Any] = Field(default_factory=dict)
    series: ChainSeries = Field(default_factory=ChainSeries)

    @field_validator("implementation")
    @classmethod
    def _implementation_path(cls, value: str) -> str:
        if not _IMPLEMENTATION.match(value):
            raise ValueError(f"implementation must look like 'package.module:Attribute', got {value!r}")
        return value

    @model_validator(mode="after")
    def _unique_input_keys(self) -> ChainSpec:
        keys = [requirement.key for requirement in self.requires]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(
                f"chain {self.name!r}: input key(s) {', '.join(repeated)} used twice; "
                "give requirements of the same role distinct names"
            )
        return self


@dataclass(frozen=True)
class SeriesCandidate:
    """What routing needs to know about one classified series of the study."""

    series_uid: str
    role: Role
    plane: Plane
    counts_as_input: bool
    instance_count: int
    series_number: int | None


@dataclass(frozen=True)
class RoutedJob:
    """One chain to run on the study, with the series chosen for each input key."""

    chain: str
    inputs: dict[str, str]  # input key → series_uid


def _preference(series: SeriesCandidate) -> tuple[int, bool, int, str]:
    """Sort key, best first: most instances, then highest series number, then UID.

    A missing series number ranks below any number.
    """
    number = series.series_number
    return (-series.instance_count, number is None, -(number or 0), series.series_uid)


def _fits(series: SeriesCandidate, requirement: ChainRequirement) -> bool:
    return (
        series.counts_as_input
        and series.role is requirement.role
        and (not requirement.planes or series.plane in requirement.planes)
    )


def _can_match(requirements: Sequence[ChainRequirement], ordered: Sequence[SeriesCandidate], used: set[str]) -> bool:
    """Whether every requirement can get its own fitting series outside `used`.

    Bipartite matching by augmenting paths (Kuhn): polynomial, unlike trying combinations.
    """
    owner: dict[str, int] = {}  # series UID → index of the requirement holding it

    def augment(index: int, visited: set[str]) -> bool:
        for series in ordered:
            uid = series.series_uid
            if uid in used or uid in visited or not _fits(series, requirements[index]):
                continue
            visited.add(uid)
            if uid not in owner or augment(owner[uid], visited):
                owner[uid] = index
                return True
        return False

    return all(augment(index, set()) for index in range(len(requirements)))


def _assign(
    requirements: Sequence[ChainRequirement], ordered: Sequence[SeriesCandidate]
) -> list[SeriesCandidate] | None:
    """The preferred distinct series for each requirement, or None if no assignment exists.

    Requirements are served in declaration order, each with its best fitting series among
    those that still leave the later requirements satisfiable.  Plain greedy choice would let
    "T1, any plane" take the only coronal T1 that a later "T1 coronal" requirement needs.
    """
    used: set[str] = set()
    chosen: list[SeriesCandidate] = []
    for index, requirement in enumerate(requirements):
        rest = requirements[index + 1 :]
        pick = next(
            (
                series
                for series in ordered
                if series.series_uid not in used
                and _fits(series, requirement)
                and _can_match(rest, ordered, used | {series.series_uid})
            ),
            None,
        )
        if pick is None:
            return None
        used.add(pick.series_uid)
        chosen.append(pick)
    return chosen


def _check_chain_names(chains: Sequence[ChainSpec]) -> None:
    names = [chain.name for chain in chains]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"chain name(s) {', '.join(repeated)} declared twice")


def _describe_series(series: SeriesCandidate) -> str:
    number = f"#{series.series_number}" if series.series_number is not None else "#?"
    return (
        f"{series.series_uid} ({series.role.value} {series.plane.value}, "
        f"series {number}, {series.instance_count} instances)"
    )


def _why_unmet(requirement: ChainRequirement, series: Sequence[SeriesCandidate]) -> str:
    """Why no series fits `requirement` at all, naming the near misses (same role)."""
    same_role = [s for s in series if s.role is requirement.role]
    usable = [s for s in same_role if s.counts_as_input]
    excluded = len(same_role) - len(usable)
    if not same_role:
        return f"no {requirement.role.value} series"
    parts = []
    wrong_plane = [s for s in usable if requirement.planes and s.plane not in requirement.planes]
    if wrong_plane:
        planes = ", ".join(sorted({s.plane.value for s in wrong_plane}))
        parts.append(f"{len(wrong_plane)} {requirement.role.value} series in other planes ({planes})")
    if excluded:
        parts.append(f"{excluded} {requirement.role.value} series not counted as input")
    return "; ".join(parts)


def _plan_chain(chain: ChainSpec, ordered: Sequence[SeriesCandidate]) -> tuple[RoutedJob | None, str]:
    """The job for one chain (or None) and a sentence saying why."""
    if not chain.enabled:
        return None, f"chain '{chain.name}': not routed: disabled"
    assignment = _assign(chain.requires, ordered)
    if assignment is not None:
        inputs = {req.key: series.series_uid for req, series in zip(chain.requires, assignment)}
        chosen = ", ".join(
            f"{req.key} ← {_describe_series(series)}" for req, series in zip(chain.requires, assignment)
        )
        return RoutedJob(chain.name, inputs), f"chain '{chain.name}': routed: {chosen}"
    # Name the first requirement that cannot be met even on its own; if each can be met alone,
    # the chain fails because requirements compete for the same series.
    for requirement in chain.requires:
        if _assign([requirement], ordered) is None:
            return None, (
                f"chain '{chain.name}': not routed: needs {requirement.key} = "
                f"{requirement.describe()}, but {_why_unmet(requirement, ordered)}"
            )
    wanted = ", ".join(f"{req.key} = {req.describe()}" for req in chain.requires)
    return None, (
        f"chain '{chain.name}': not routed: needs distinct series for {wanted}, "
        "but there are not enough fitting series to give each its own"
    )


def _ordered(series: Sequence[SeriesCandidate]) -> list[SeriesCandidate]:
    return sorted(series, key=_preference)


@dataclass(frozen=True)
class RoutingPlan:
    """The routing of one study: its jobs, and one human line per chain saying why."""

    jobs: list[RoutedJob]  # in the order chains are declared; empty: no chain applies
    lines: list[str]  # per chain: routed with which series, or why not


def plan_routing(series: Sequence[SeriesCandidate], chains: Sequence[ChainSpec]) -> RoutingPlan:
    """One job per enabled chain whose every requirement is met, and the explanation of each
    chain's decision, from a single matching pass.

    For each requirement the preferred fitting series is the one with most instances, then the
    highest series number, then the lowest UID in string order; one series never serves two
    requirements of the same chain (it may serve several chains).
    """
    _check_chain_names(chains)
    ordered = _ordered(series)
    planned = [_plan_chain(chain, ordered) for chain in chains]
    return RoutingPlan([job for job, _ in planned if job is not None], [line for _, line in planned])


def route_study(series: Sequence[SeriesCandidate], chains: Sequence[ChainSpec]) -> list[RoutedJob]:
    """The jobs of :func:`plan_routing`, for callers that need no explanation."""
    return plan_routing(series, chains).jobs


def explain_routing(series: Sequence[SeriesCandidate], chains: Sequence[ChainSpec]) -> list[str]:
    """The explanation lines of :func:`plan_routing`: routed with which series, or why not."""
    return plan_routing(series, chains).lines
