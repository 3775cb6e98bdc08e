"""Tests for otacore.precedence: Particle's firmware precedence rules, scalar and fleet forms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacore.errors import ValidationError
from otacore.precedence import (
    MAX_VERSION,
    NO_TARGET,
    UNLOCKED,
    DeviceTargeting,
    FleetArrays,
    PrecedenceInputError,
    ProductReleases,
    Release,
    Target,
    TargetReason,
    resolve_fleet,
    target_firmware_for,
    target_version_for,
    targets_for_fleet,
)

R = TargetReason


def both_forms(device: DeviceTargeting, releases: ProductReleases) -> Target:
    """The scalar result, after checking the fleet form agrees with it.

    The device sits between two neighbours (one in no group, one in every group) so CSR
    offsets of its row are neither at the start nor at the end of the arrays.
    """
    names = sorted(set(releases.group_releases) | device.groups)
    fleet_devices = [DeviceTargeting(), device, DeviceTargeting(groups=frozenset(names))]
    fleet = FleetArrays.from_devices(fleet_devices)
    result = resolve_fleet(fleet, releases)
    scalar = target_firmware_for(device, releases)
    assert result.target(1) == scalar
    assert [result.target(i) for i in (0, 2)] == [
        target_firmware_for(d, releases) for d in (fleet_devices[0], fleet_devices[2])
    ]
    return scalar


@dataclass(frozen=True)
class Case:
    id: str
    device: DeviceTargeting
    releases: ProductReleases
    expected: Target


def dev(
    development: bool = False, locked: int | None = None, groups: tuple[str, ...] = ()
) -> DeviceTargeting:
    return DeviceTargeting(development, locked, frozenset(groups))


def rel(default: int | Release | None = None, **groups: int | Release) -> ProductReleases:
    """ProductReleases from ints (standard releases) or Release objects."""

    def as_release(value: int | Release) -> Release:
        return value if isinstance(value, Release) else Release(value)

    return ProductReleases(
        None if default is None else as_release(default),
        {name: as_release(value) for name, value in groups.items()},
    )


IMM = True  # readability in the table below

CASES = [
    # rule 5 and rule 4
    Case("nothing-released", dev(), rel(), Target(None, R.NONE)),
    Case("groups-but-nothing-released", dev(groups=("a", "b")), rel(), Target(None, R.NONE)),
    Case("default-only", dev(), rel(5), Target(5, R.PRODUCT_DEFAULT)),
    Case(
        "default-immediate",
        dev(),
        rel(Release(5, IMM)),
        Target(5, R.PRODUCT_DEFAULT, None, IMM),
    ),
    Case("default-version-0", dev(), rel(0), Target(0, R.PRODUCT_DEFAULT)),
    Case(
        "groups-without-release-fall-to-default",
        dev(groups=("x", "y")),
        rel(6, a=9),
        Target(6, R.PRODUCT_DEFAULT),
    ),
    Case(
        "groups-without-release-no-default",
        dev(groups=("x",)),
        rel(None, a=9),
        Target(None, R.NONE),
    ),
    # rule 1: development beats everything
    Case("dev-default", dev(True), rel(5), Target(None, R.DEVELOPMENT)),
    Case("dev-locked", dev(True, 3), rel(), Target(None, R.DEVELOPMENT)),
    Case("dev-group", dev(True, groups=("a",)), rel(None, a=4), Target(None, R.DEVELOPMENT)),
    Case(
        "dev-locked-group-default",
        dev(True, 3, ("a",)),
        rel(Release(5, IMM), a=Release(4, IMM)),
        Target(None, R.DEVELOPMENT),
    ),
    Case("dev-nothing-released", dev(True), rel(), Target(None, R.DEVELOPMENT)),
    # rule 2: a lock beats groups and default
    Case("locked-no-releases", dev(locked=7), rel(), Target(7, R.LOCKED)),
    Case("locked-to-version-0", dev(locked=0), rel(5), Target(0, R.LOCKED)),
    Case("locked-to-max-version", dev(locked=MAX_VERSION), rel(), Target(MAX_VERSION, R.LOCKED)),
    Case("locked-lower-than-default", dev(locked=2), rel(8), Target(2, R.LOCKED)),
    Case("locked-higher-than-default", dev(locked=12), rel(8), Target(12, R.LOCKED)),
    Case("locked-lower-than-group", dev(locked=3, groups=("a",)), rel(1, a=9), Target(3, R.LOCKED)),
    Case(
        "locked-higher-than-group",
        dev(locked=12, groups=("a",)),
        rel(1, a=9),
        Target(12, R.LOCKED),
    ),
    Case(
        "locked-equal-to-group",
        dev(locked=9, groups=("a",)),
        rel(None, a=9),
        Target(9, R.LOCKED),
    ),
    Case(
        "locked-ignores-immediate-releases",
        dev(locked=3, groups=("a",)),
        rel(Release(1, IMM), a=Release(9, IMM)),
        Target(3, R.LOCKED),
    ),
    # rule 3: group releases, highest version among the device's groups
    Case("one-group", dev(groups=("a",)), rel(2, a=4), Target(4, R.GROUP_RELEASE, "a")),
    Case(
        "group-lower-than-default-still-wins",
        dev(groups=("a",)),
        rel(8, a=2),
        Target(2, R.GROUP_RELEASE, "a"),
    ),
    Case("group-no-default", dev(groups=("a",)), rel(None, a=4), Target(4, R.GROUP_RELEASE, "a")),
    Case("group-version-0", dev(groups=("a",)), rel(8, a=0), Target(0, R.GROUP_RELEASE, "a")),
    Case(
        "several-groups-highest-wins",
        dev(groups=("a", "b", "c")),
        rel(1, a=3, b=9, c=5),
        Target(9, R.GROUP_RELEASE, "b"),
    ),
    Case(
        "some-groups-without-release",
        dev(groups=("a", "x", "y")),
        rel(7, a=3, b=9),
        Target(3, R.GROUP_RELEASE, "a"),
    ),
    Case(
        "released-groups-device-is-not-in",
        dev(groups=("c",)),
        rel(1, a=3, b=9),
        Target(1, R.PRODUCT_DEFAULT),
    ),
    Case(
        "group-immediate-flag-carried",
        dev(groups=("a",)),
        rel(1, a=Release(4, IMM)),
        Target(4, R.GROUP_RELEASE, "a", IMM),
    ),
    Case(
        "default-immediate-not-carried-to-group",
        dev(groups=("a",)),
        rel(Release(1, IMM), a=4),
        Target(4, R.GROUP_RELEASE, "a"),
    ),
    Case(
        "higher-standard-beats-lower-immediate",
        dev(groups=("a", "b")),
        rel(None, a=9, b=Release(4, IMM)),
        Target(9, R.GROUP_RELEASE, "a"),
    ),
    Case(
        "tie-prefers-immediate",
        dev(groups=("a", "b")),
        rel(None, a=5, b=Release(5, IMM)),
        Target(5, R.GROUP_RELEASE, "b", IMM),
    ),
    Case(
        "tie-prefers-smallest-name",
        dev(groups=("b", "a", "c")),
        rel(None, a=5, b=5, c=2),
        Target(5, R.GROUP_RELEASE, "a"),
    ),
    Case(
        "tie-names-compare-case-sensitively",
        dev(groups=("beta", "Beta")),
        rel(None, beta=5, Beta=5),
        Target(5, R.GROUP_RELEASE, "Beta"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_precedence_table(case: Case) -> None:
    assert both_forms(case.device, case.releases) == case.expected
    assert target_version_for(case.device, case.releases) == case.expected.version


# --- input types ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Release(-1), id="release-negative"),
        pytest.param(lambda: Release(MAX_VERSION + 1), id="release-above-u16"),
        pytest.param(lambda: Release(True), id="release-bool"),
        pytest.param(lambda: Release(3.0), id="release-float"),  # type: ignore[arg-type]
        pytest.param(lambda: DeviceTargeting(locked_version=-1), id="locked-negative"),
        pytest.param(lambda: DeviceTargeting(locked_version="3"), id="locked-str"),  # type: ignore[arg-type]
        pytest.param(lambda: DeviceTargeting(groups="beta"), id="groups-one-str"),  # type: ignore[arg-type]
        pytest.param(lambda: ProductReleases.from_versions(MAX_VERSION + 1), id="default-big"),
        pytest.param(lambda: ProductReleases.from_versions(1, {"a": -5}), id="group-negative"),
    ],
)
def test_bad_inputs_raise(make: Callable[[], object]) -> None:
    with pytest.raises(PrecedenceInputError) as info:
        make()
    assert isinstance(info.value, ValidationError)
    assert "0..65535" in str(info.value) or "group names" in str(info.value)


def test_device_groups_accept_any_iterable() -> None:
    device = DeviceTargeting(groups=["a", "b", "a"])  # type: ignore[arg-type]
    assert device.groups == frozenset({"a", "b"})
    assert hash(device) == hash(DeviceTargeting(groups=frozenset({"b", "a"})))


def test_product_releases_copy_the_mapping() -> None:
    groups = {"a": Release(3)}
    releases = ProductReleases(Release(1), groups)
    groups["a"] = Release(9)
    groups["b"] = Release(9)
    assert dict(releases.group_releases) == {"a": Release(3)}
    with pytest.raises(TypeError):
        releases.group_releases["c"] = Release(1)  # type: ignore[index]
    assert ProductReleases.from_versions(1, {"a": 3}) == releases
    assert hash(releases) == hash(ProductReleases.from_versions(1, {"a": 3}))


# --- fleet arrays --------------------------------------------------------------------------


def small_fleet_args() -> dict[str, object]:
    return {
        "development": np.array([False, True, False]),
        "locked_version": np.array([UNLOCKED, 3, 4], dtype=np.int32),
        "group_indptr": np.array([0, 2, 2, 3], dtype=np.int64),
        "group_ids": np.array([0, 1, 1], dtype=np.int32),
        "group_names": ("a", "b"),
    }


def test_fleet_arrays_accept_the_small_fleet() -> None:
    fleet = FleetArrays(**small_fleet_args())  # type: ignore[arg-type]
    assert len(fleet) == 3
    assert fleet.locked_version.dtype == np.int32 and fleet.group_indptr.dtype == np.int64


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        pytest.param("development", np.array([0, 1, 0]), "bool", id="dev-not-bool"),
        pytest.param("development", np.zeros((1, 3), bool), "bool", id="dev-2d"),
        pytest.param("locked_version", np.array([-1, 3]), "locked versions", id="locked-short"),
        pytest.param(
            "locked_version", np.array([-2, 3, 4]), "-1..65535", id="locked-below-sentinel"
        ),
        pytest.param(
            "locked_version", np.array([-1, 3, 65536]), "-1..65535", id="locked-above-u16"
        ),
        pytest.param(
            "locked_version", np.array([-1, 3, 2**32 + 4]), "-1..65535", id="locked-would-wrap"
        ),
        pytest.param("locked_version", np.array([-1.0, 3.0, 4.0]), "integer", id="locked-float"),
        pytest.param("group_indptr", np.array([0, 2, 3]), "group_indptr entry", id="indptr-short"),
        pytest.param("group_indptr", np.array([1, 2, 2, 3]), "rise from 0", id="indptr-not-0"),
        pytest.param("group_indptr", np.array([0, 2, 1, 3]), "rise from 0", id="indptr-falls"),
        pytest.param("group_indptr", np.array([0, 2, 2, 2]), "rise from 0", id="indptr-end-short"),
        pytest.param("group_indptr", np.array([0, 2, 2, 4]), "0..3", id="indptr-past-ids"),
        pytest.param("group_ids", np.array([0, 2, 1]), "0..1", id="ids-past-names"),
        pytest.param("group_ids", np.array([0, -1, 1]), "0..1", id="ids-negative"),
        pytest.param("group_ids", np.array([0, 1, 1, 1]), "rise from 0", id="ids-past-indptr"),
        pytest.param("group_names", ("a", "a"), "repeat", id="names-repeat"),
        pytest.param("group_names", ("a",), "0..0", id="names-too-few"),
    ],
)
def test_fleet_arrays_reject_malformed(field: str, value: object, message: str) -> None:
    args = small_fleet_args()
    args[field] = value
    with pytest.raises(PrecedenceInputError, match=message.replace(".", r"\.")):
        FleetArrays(**args)  # type: ignore[arg-type]


def test_fleet_arrays_are_read_only() -> None:
    fleet = FleetArrays(**small_fleet_args())  # type: ignore[arg-type]
    for array in (fleet.development, fleet.locked_version, fleet.group_indptr, fleet.group_ids):
        with pytest.raises(ValueError):
            array[0] = 0


def test_from_devices_builds_csr_with_extra_names_first() -> None:
    fleet = FleetArrays.from_devices(
        [dev(groups=("c", "a")), dev(True, 4), dev(locked=2, groups=("z",))],
        group_names=["unused", "c"],
    )
    assert fleet.group_names == ("unused", "c", "a", "z")
    assert fleet.development.tolist() == [False, True, False]
    assert fleet.locked_version.tolist() == [UNLOCKED, 4, 2]
    assert fleet.group_indptr.tolist() == [0, 2, 2, 3]
    assert fleet.group_ids.tolist() == [2, 1, 3]  # each row's names in sorted order


def test_empty_fleet() -> None:
    fleet = FleetArrays.from_devices([])
    result = resolve_fleet(fleet, rel(3, a=4))
    assert len(fleet) == 0 and fleet.group_indptr.tolist() == [0]
    for array, dtype in ((result.version, np.int32), (result.reason, np.int8)):
        assert array.shape == (0,) and array.dtype == dtype
    assert targets_for_fleet(fleet, rel()).shape == (0,)


def test_fleet_with_no_memberships_at_all() -> None:
    fleet = FleetArrays.from_devices([dev(), dev(locked=1), dev(True)])
    assert fleet.group_ids.size == 0 and fleet.group_names == ()
    assert targets_for_fleet(fleet, rel(5, a=9)).tolist() == [5, 1, NO_TARGET]
    assert targets_for_fleet(fleet, rel()).tolist() == [NO_TARGET, 1, NO_TARGET]


def test_fleet_outputs_have_documented_dtypes_and_codes() -> None:
    devices = [dev(True), dev(locked=3), dev(groups=("a",)), dev(groups=("x",)), dev()]
    fleet = FleetArrays.from_devices(devices, group_names=["a", "x"])
    result = resolve_fleet(fleet, rel(None, a=Release(7, IMM)))
    assert result.version.dtype == np.int32 and result.reason.dtype == np.int8
    assert result.group_index.dtype == np.int32 and result.immediate.dtype == np.bool_
    assert result.version.tolist() == [NO_TARGET, 3, 7, NO_TARGET, NO_TARGET]
    assert result.reason.tolist() == [R.DEVELOPMENT, R.LOCKED, R.GROUP_RELEASE, R.NONE, R.NONE]
    assert result.group_index.tolist() == [-1, -1, 0, -1, -1]
    assert result.immediate.tolist() == [False, False, True, False, False]


def test_fleet_from_raw_arrays_with_repeated_and_unsorted_ids() -> None:
    fleet = FleetArrays(
        development=np.zeros(4, dtype=bool),
        locked_version=np.full(4, UNLOCKED),
        group_indptr=np.array([0, 0, 4, 4, 6]),
        group_ids=np.array([2, 0, 2, 1, 1, 1]),
        group_names=("b", "c", "a"),
    )
    result = resolve_fleet(fleet, rel(1, a=5, b=5, c=3))
    assert result.version.tolist() == [1, 5, 1, 3]
    assert [result.target(i).group for i in range(4)] == [None, "a", None, "c"]


# --- the fleet form equals the scalar form -----------------------------------------------

NAMES = ["a", "b", "beta", "Beta", "eu-west", "é", ""]
versions = st.one_of(st.integers(0, 6), st.just(MAX_VERSION))
releases_st = st.builds(
    ProductReleases,
    st.none() | st.builds(Release, versions, st.booleans()),
    st.dictionaries(st.sampled_from(NAMES), st.builds(Release, versions, st.booleans())),
)
devices_st = st.builds(
    DeviceTargeting,
    st.booleans(),
    st.none() | versions,
    st.frozensets(st.sampled_from(NAMES), max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(
    devices=st.lists(devices_st, max_size=40),
    releases=releases_st,
    extra_names=st.lists(st.sampled_from(NAMES), max_size=3),
)
def test_fleet_form_equals_scalar(
    devices: list[DeviceTargeting], releases: ProductReleases, extra_names: list[str]
) -> None:
    fleet = FleetArrays.from_devices(devices, group_names=extra_names)
    result = resolve_fleet(fleet, releases)
    assert [result.target(i) for i in range(len(devices))] == [
        target_firmware_for(d, releases) for d in devices
    ]
    expected_versions = [target_version_for(d, releases) for d in devices]
    assert targets_for_fleet(fleet, releases).tolist() == [
        NO_TARGET if v is None else v for v in expected_versions
    ]


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, len(NAMES) - 1), max_size=5), max_size=30),
    flags=st.lists(st.tuples(st.booleans(), st.none() | versions), min_size=30, max_size=30),
    releases=releases_st,
)
def test_raw_csr_fleet_equals_scalar(
    rows: list[list[int]], flags: list[tuple[bool, int | None]], releases: ProductReleases
) -> None:
    """CSR rows straight from arrays: any order, repeated ids, empty rows anywhere."""
    fleet = FleetArrays(
        development=np.array([f[0] for f in flags[: len(rows)]], dtype=bool),
        locked_version=np.array([UNLOCKED if f[1] is None else f[1] for f in flags[: len(rows)]]),
        group_indptr=np.cumsum([0] + [len(r) for r in rows]),
        group_ids=np.array([g for r in rows for g in r], dtype=np.int64),
        group_names=tuple(NAMES),
    )
    result = resolve_fleet(fleet, releases)
    for i, (row, (development, locked)) in enumerate(zip(rows, flags, strict=False)):
        device = DeviceTargeting(development, locked, frozenset(NAMES[g] for g in row))
        assert result.target(i) == target_firmware_for(device, releases)
