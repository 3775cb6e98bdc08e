"""Benchmarks of the firmware precedence engine (otacore.precedence).

The fleet form on a 1,000,000-device product (50 groups, ~1.5 groups per device, 5% locked,
2% development), against the scalar function looped over the first 100,000 of those devices.
Arrays and device objects are built by module fixtures, outside the timed part. Run with:

    .venv/bin/python -m pytest bench/test_bench_precedence.py --benchmark-enable -q \
        -p no:cacheprovider --rootdir=/work/main -c /work/main/pyproject.toml
"""

from __future__ import annotations

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from otacore.precedence import (
    NO_TARGET,
    UNLOCKED,
    DeviceTargeting,
    FleetArrays,
    ProductReleases,
    Release,
    Target,
    resolve_fleet,
    target_firmware_for,
    targets_for_fleet,
)

FLEET_SIZE = 1_000_000
SCALAR_SIZE = 100_000
GROUP_COUNT = 50
SEED = 20240601


@pytest.fixture(scope="module")
def fleet() -> FleetArrays:
    """1M devices; each is in 0-3 distinct groups (mean 1.5)."""
    rng = np.random.default_rng(SEED)
    counts = rng.integers(0, 4, FLEET_SIZE)
    indptr = np.zeros(FLEET_SIZE + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    owner = np.repeat(np.arange(FLEET_SIZE), counts)
    position = np.arange(indptr[-1]) - indptr[owner]
    first_group = rng.integers(0, GROUP_COUNT, FLEET_SIZE)
    # Stride 7 is coprime with 50, so a device's (at most 4) groups are distinct.
    group_ids = (first_group[owner] + 7 * position) % GROUP_COUNT
    locked = np.where(rng.random(FLEET_SIZE) < 0.05, rng.integers(1, 60, FLEET_SIZE), UNLOCKED)
    return FleetArrays(
        development=rng.random(FLEET_SIZE) < 0.02,
        locked_version=locked.astype(np.int32),
        group_indptr=indptr,
        group_ids=group_ids.astype(np.int32),
        group_names=tuple(f"group-{i:02d}" for i in range(GROUP_COUNT)),
    )


@pytest.fixture(scope="module")
def releases(fleet: FleetArrays) -> ProductReleases:
    """Product default 10; 30 of the 50 groups released (versions 1-40, a third immediate)."""
    rng = np.random.default_rng(SEED + 1)
    released = rng.choice(GROUP_COUNT, size=30, replace=False)
    return ProductReleases(
        Release(10),
        {
            fleet.group_names[g]: Release(int(rng.integers(1, 41)), bool(g % 3 == 0))
            for g in released
        },
    )


@pytest.fixture(scope="module")
def scalar_devices(fleet: FleetArrays) -> list[DeviceTargeting]:
    """The fleet's first 100,000 devices as DeviceTargeting objects."""
    names, ids, indptr = fleet.group_names, fleet.group_ids, fleet.group_indptr
    return [
        DeviceTargeting(
            bool(fleet.development[i]),
            None if fleet.locked_version[i] == UNLOCKED else int(fleet.locked_version[i]),
            frozenset(names[j] for j in ids[indptr[i] : indptr[i + 1]]),
        )
        for i in range(SCALAR_SIZE)
    ]


@pytest.mark.benchmark(group="precedence")
def test_bench_targets_for_fleet_1m(
    benchmark: BenchmarkFixture,
    fleet: FleetArrays,
    releases: ProductReleases,
    scalar_devices: list[DeviceTargeting],
) -> None:
    versions = benchmark(targets_for_fleet, fleet, releases)
    benchmark.extra_info["devices"] = FLEET_SIZE
    assert versions.shape == (FLEET_SIZE,)
    expected = [target_firmware_for(d, releases).version for d in scalar_devices[:5000]]
    assert versions[:5000].tolist() == [NO_TARGET if v is None else v for v in expected]


@pytest.mark.benchmark(group="precedence")
def test_bench_resolve_fleet_1m(
    benchmark: BenchmarkFixture, fleet: FleetArrays, releases: ProductReleases
) -> None:
    """The full result (version, reason, group, immediate); targets_for_fleet uses it too."""
    result = benchmark(resolve_fleet, fleet, releases)
    benchmark.extra_info["devices"] = FLEET_SIZE
    benchmark.extra_info["reason_counts"] = np.bincount(result.reason, minlength=5).tolist()


@pytest.mark.benchmark(group="precedence")
def test_bench_fleet_arrays_checks_1m(benchmark: BenchmarkFixture, fleet: FleetArrays) -> None:
    """The one-off cost of building (checking) FleetArrays for 1M devices."""
    arrays = (fleet.development, fleet.locked_version, fleet.group_indptr, fleet.group_ids)
    built = benchmark(FleetArrays, *arrays, fleet.group_names)
    assert len(built) == FLEET_SIZE


@pytest.mark.benchmark(group="precedence")
def test_bench_scalar_loop_100k(
    benchmark: BenchmarkFixture, releases: ProductReleases, scalar_devices: list[DeviceTargeting]
) -> None:
    """Baseline: the scalar function over 100,000 devices."""

    def run() -> list[Target]:
        return [target_firmware_for(d, releases) for d in scalar_devices]

    targets = benchmark(run)
    benchmark.extra_info["devices"] = SCALAR_SIZE
    assert len(targets) == SCALAR_SIZE
