"""Which product firmware each device should run: Particle's precedence rules.

Pure and sans-IO. The rules (Particle docs, "OTA updates"; /work/shared/reference/
particle-facts.md), first match wins:

1. A development device gets no automatic product firmware, neither released nor locked.
2. A device locked to a version gets that version, above everything else.
3. A device in groups with released firmware gets the highest version released to them.
4. Otherwise it gets the product-default release.
5. Otherwise it gets no automatic update.

Ties in rule 3 go to an immediate (intelligent) release over a standard one, then to the
smallest group name, so the reported group and ``immediate`` flag are deterministic.
:func:`target_firmware_for` (one device) and :func:`resolve_fleet` / :func:`targets_for_fleet`
(a whole product as numpy arrays) give identical results.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType

import numpy as np
from numpy.typing import NDArray

from otacore.errors import ValidationError

#: Product firmware versions are u16 (the module suffix's product version field).
MAX_VERSION = 0xFFFF
#: Array value meaning "no target" (and, in ``FleetArrays.locked_version``, "not locked").
NO_TARGET = -1
UNLOCKED = -1


class PrecedenceInputError(ValidationError):
    """Device targeting, releases or fleet arrays are malformed."""


class TargetReason(IntEnum):
    """The rule that decided a device's target (int8 codes in the fleet form)."""

    NONE = 0
    DEVELOPMENT = 1
    LOCKED = 2
    GROUP_RELEASE = 3
    PRODUCT_DEFAULT = 4


def _check_version(version: object, what: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
        raise PrecedenceInputError(f"{what} must be an int in 0..{MAX_VERSION}, not {version!r}")


@dataclass(frozen=True)
class Release:
    """A released product firmware version; ``immediate`` marks an intelligent release."""

    version: int
    immediate: bool = False

    def __post_init__(self) -> None:
        _check_version(self.version, "release version")


@dataclass(frozen=True)
class DeviceTargeting:
    """The per-device settings the rules read. ``groups`` may be given as any iterable."""

    development: bool = False
    locked_version: int | None = None
    groups: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.locked_version is not None:
            _check_version(self.locked_version, "locked firmware version")
        if isinstance(self.groups, str):
            raise PrecedenceInputError("groups must be a collection of group names, not one str")
        object.__setattr__(self, "groups", frozenset(self.groups))


@dataclass(frozen=True)
class ProductReleases:
    """A product's releases: the product default and the group name -> release map."""

    product_default: Release | None = None
    group_releases: Mapping[str, Release] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:  # a read-only copy: the caller's dict may change later
        object.__setattr__(self, "group_releases", MappingProxyType(dict(self.group_releases)))

    @classmethod
    def from_versions(
        cls, product_default: int | None = None, group_releases: Mapping[str, int] | None = None
    ) -> ProductReleases:
        """Build from plain version numbers (all standard, not immediate, releases)."""
        default = None if product_default is None else Release(product_default)
        groups = {name: Release(v) for name, v in (group_releases or {}).items()}
        return cls(default, groups)


@dataclass(frozen=True)
class Target:
    """A device's target (``version`` None: no automatic update) and the rule that decided it.

    ``group`` names the winning group of GROUP_RELEASE; ``immediate`` is the deciding release's
    intelligent flag (never set for a lock: flashing on lock is the caller's one-off action)."""

    version: int | None
    reason: TargetReason
    group: str | None = None
    immediate: bool = False


def target_firmware_for(device: DeviceTargeting, releases: ProductReleases) -> Target:
    """Apply the precedence rules to one device."""
    if device.development:  # rule 1: not even a lock applies
        return Target(None, TargetReason.DEVELOPMENT)
    if device.locked_version is not None:  # rule 2
        return Target(device.locked_version, TargetReason.LOCKED)
    group_releases = releases.group_releases
    released = [(g, group_releases[g]) for g in device.groups if g in group_releases]
    if released:  # rule 3: highest version, then immediate, then smallest name
        name, rel = min(released, key=lambda gr: (-gr[1].version, not gr[1].immediate, gr[0]))
        return Target(rel.version, TargetReason.GROUP_RELEASE, name, rel.immediate)
    default = releases.product_default
    if default is not None:  # rule 4
        return Target(default.version, TargetReason.PRODUCT_DEFAULT, None, default.immediate)
    return Target(None, TargetReason.NONE)  # rule 5


def target_version_for(device: DeviceTargeting, releases: ProductReleases) -> int | None:
    """The target version alone (None: no automatic update)."""
    return target_firmware_for(device, releases).version


def _int_array(values: object, dtype: type[np.integer], lo: int, hi: int, what: str) -> NDArray:
    array = np.asarray(values)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise PrecedenceInputError(f"{what} must be a 1-D integer array, got {array.dtype}")
    if array.size and (array.min() < lo or array.max() > hi):  # checked before any narrowing
        raise PrecedenceInputError(f"{what} values must lie within {lo}..{hi}")
    return array.astype(dtype, copy=False)


@dataclass(frozen=True, eq=False)
class FleetArrays:
    """A product's devices as arrays; group membership in CSR form.

    Device ``i`` belongs to groups ``group_names[j]`` for ``j`` in
    ``group_ids[group_indptr[i]:group_indptr[i + 1]]`` (repeats are harmless).
    ``locked_version`` holds UNLOCKED (-1) for unlocked devices. Arrays are converted to the
    annotated dtypes, checked once here and kept as read-only views: do not change the arrays
    passed in afterwards (the checks would no longer hold)."""

    development: NDArray[np.bool_]
    locked_version: NDArray[np.int32]
    group_indptr: NDArray[np.int64]
    group_ids: NDArray[np.int32]
    group_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        dev, names = np.asarray(self.development), tuple(self.group_names)
        if dev.ndim != 1 or dev.dtype != np.bool_:
            raise PrecedenceInputError(f"development must be a 1-D bool array, got {dev.dtype}")
        if len(set(names)) != len(names):
            raise PrecedenceInputError("group_names must not repeat a name")
        locked = _int_array(self.locked_version, np.int32, UNLOCKED, MAX_VERSION, "locked_version")
        ids = _int_array(self.group_ids, np.int32, 0, len(names) - 1, "group_ids (name indexes)")
        indptr = _int_array(self.group_indptr, np.int64, 0, ids.size, "group_indptr")
        if locked.size != dev.size or indptr.size != dev.size + 1:
            raise PrecedenceInputError(
                f"{dev.size} devices need as many locked versions and one more group_indptr "
                f"entry, got {locked.size} and {indptr.size}"
            )
        if indptr[0] != 0 or indptr[-1] != ids.size or np.any(indptr[1:] < indptr[:-1]):
            raise PrecedenceInputError(
                f"group_indptr must rise from 0 to len(group_ids) = {ids.size} without falling"
            )
        arrays = {"development": dev, "locked_version": locked, "group_indptr": indptr}
        for name, array in {**arrays, "group_ids": ids}.items():
            view = array.view()
            view.flags.writeable = False
            object.__setattr__(self, name, view)
        object.__setattr__(self, "group_names", names)

    def __len__(self) -> int:
        return int(self.development.size)

    @classmethod
    def from_devices(
        cls, devices: Iterable[DeviceTargeting], group_names: Sequence[str] = ()
    ) -> FleetArrays:
        """Build from per-device settings (``group_names`` may add groups no device is in;
        group names not listed there are appended in sorted order)."""
        devices = list(devices)
        names = list(dict.fromkeys(group_names))
        names += sorted(set().union(*(d.groups for d in devices)) - set(names))
        index = {name: i for i, name in enumerate(names)}
        locked = [UNLOCKED if d.locked_version is None else d.locked_version for d in devices]
        ids = [index[g] for d in devices for g in sorted(d.groups)]
        return cls(
            development=np.array([d.development for d in devices], dtype=np.bool_),
            locked_version=np.array(locked, dtype=np.int32),
            group_indptr=np.cumsum([0] + [len(d.groups) for d in devices], dtype=np.int64),
            group_ids=np.array(ids, dtype=np.int32),
            group_names=tuple(names),
        )


@dataclass(frozen=True, eq=False)
class FleetTargets:
    """Per-device results: version (NO_TARGET = -1 for none), reason (TargetReason codes),
    group_index into group_names (-1 unless GROUP_RELEASE) and immediate."""

    version: NDArray[np.int32]
    reason: NDArray[np.int8]
    group_index: NDArray[np.int32]
    immediate: NDArray[np.bool_]
    group_names: tuple[str, ...]

    def target(self, i: int) -> Target:
        """Device ``i``'s result as the scalar function's Target."""
        version, group = int(self.version[i]), int(self.group_index[i])
        return Target(
            version=None if version == NO_TARGET else version,
            reason=TargetReason(int(self.reason[i])),
            group=None if group < 0 else self.group_names[group],
            immediate=bool(self.immediate[i]),
        )


def resolve_fleet(fleet: FleetArrays, releases: ProductReleases) -> FleetTargets:
    """Apply the precedence rules to every device of ``fleet`` with no per-device Python loop."""
    n, names, default = len(fleet), fleet.group_names, releases.product_default
    # Rank the fleet's released groups the way rule 3 picks a winner (version, then immediate,
    # then the smaller name: two stable sorts); rank 0 stands for "no group release".
    group_releases = releases.group_releases
    released = {g: group_releases[name] for g, name in enumerate(names) if name in group_releases}
    by_name = sorted(released, key=names.__getitem__, reverse=True)
    by_rank = sorted(by_name, key=lambda g: (released[g].version, released[g].immediate))
    rank_of_group = np.zeros(len(names), dtype=np.int32)
    rank_of_group[by_rank] = np.arange(1, len(by_rank) + 1, dtype=np.int32)
    # Per-rank outcome tables; rank 0 holds rules 4-5 (product default, else nothing).
    if default is None:
        fallback_version, fallback_reason, fallback_immediate = NO_TARGET, TargetReason.NONE, False
    else:
        fallback_version, fallback_reason = default.version, TargetReason.PRODUCT_DEFAULT
        fallback_immediate = default.immediate
    ranked = [released[g] for g in by_rank]
    version_of_rank = np.array([fallback_version] + [r.version for r in ranked], np.int32)
    reason_of_rank = np.array(
        [fallback_reason] + [TargetReason.GROUP_RELEASE] * len(by_rank), np.int8
    )
    immediate_of_rank = np.array([fallback_immediate] + [r.immediate for r in ranked], bool)
    group_of_rank = np.array([-1, *by_rank], dtype=np.int32)

    # Each device's best rank over its groups (0 for devices in none). Membership j belongs to
    # the device whose CSR row holds it: the count of row ends (indptr[1:-1]) at or before j.
    indptr, m = fleet.group_indptr, fleet.group_ids.size
    entry_device = np.cumsum(np.bincount(indptr[1:-1], minlength=m + 1)[:m])
    best = np.zeros(n, dtype=np.int32)
    np.maximum.at(best, entry_device, rank_of_group[fleet.group_ids])
    version, reason = version_of_rank[best], reason_of_rank[best]  # rules 3-5
    immediate, group_index = immediate_of_rank[best], group_of_rank[best]

    locked = fleet.locked_version != UNLOCKED  # rule 2
    np.copyto(version, fleet.locked_version, where=locked)
    np.copyto(reason, np.int8(TargetReason.LOCKED), where=locked)
    dev = fleet.development  # rule 1 beats even a lock
    np.copyto(version, np.int32(NO_TARGET), where=dev)
    np.copyto(reason, np.int8(TargetReason.DEVELOPMENT), where=dev)
    overridden = locked | dev  # targets from rules 1-2 carry no group and no immediate flag
    np.copyto(immediate, False, where=overridden)
    np.copyto(group_index, np.int32(-1), where=overridden)
    return FleetTargets(version, reason, group_index, immediate, names)


def targets_for_fleet(fleet: FleetArrays, releases: ProductReleases) -> NDArray[np.int32]:
    """Target version per device as int32, NO_TARGET (-1) meaning no automatic update."""
    return resolve_fleet(fleet, releases).version
