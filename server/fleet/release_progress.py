"""How a release is going (issue 17): per-release device counts, the devices updating now
and those that failed with their reasons, the update-latency curve, and the bytes sent
against full images; and the product's audit log, paged, for those who may read it."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from otacore.errors import ValidationError
from otacore.precedence import FleetArrays, FleetTargets, TargetReason, resolve_fleet
from server.fleet.base import FleetBase, check_version, releases_of
from server.fleet.errors import UnknownFirmwareError, UnknownProductError
from server.fleet.roles import AUDIT_SCOPE, Actor
from server.store import AuditRecord, FirmwareRecord, ProductRecord, ReleaseRecord
from server.store.tx_release_progress import (
    ProgressInputs,
    ResultRow,
    UpdateResultRecord,
    UpdatingDevice,
)

#: Upper bounds (ms) of the latency histogram's buckets; the last bucket is open-ended.
LATENCY_BUCKETS_MS = (
    10_000, 60_000, 5 * 60_000, 15 * 60_000, 3_600_000, 6 * 3_600_000, 24 * 3_600_000,
)
#: At most this many points describe the cumulative curve (enough for a chart).
CURVE_POINTS = 60
#: The most devices listed as updating and as failed (their counts are complete).
MAX_LIST_LIMIT = 500
#: Audit log pages: default and largest page size.
AUDIT_PAGE = 50
MAX_AUDIT_PAGE = 200

#: ``ReleaseProgress.state`` values.
NOT_RELEASED = "Not released"
NO_TARGET = "No devices targeted"
ALL_UPDATED = "All updated"
IN_PROGRESS = "In progress"
FINISHED_WITH_FAILURES = "Finished with failures"


@dataclass(frozen=True)
class ReleaseCounts:
    """The devices one release (the product default or a group's) decides, by state.

    ``target``: devices whose target the release decides under the precedence rules;
    ``updated``: those reporting the version; ``updating``: those with a transfer of the
    version in flight; ``failed``: those whose last update of the version since the release
    failed (running something else, nothing in flight); ``pending``: the rest."""

    release: ReleaseRecord
    target: int = 0
    updated: int = 0
    updating: int = 0
    failed: int = 0

    @property
    def group_name(self) -> str | None:
        """The release's group (None: the product default)."""
        return self.release.group_name

    @property
    def intelligent(self) -> bool:
        """An immediate (intelligent) release."""
        return self.release.intelligent

    @property
    def released_at(self) -> int:
        """When it was released (epoch ms): latencies count from here."""
        return self.release.released_at

    @property
    def released_by(self) -> str:
        """Who released it."""
        return self.release.released_by

    @property
    def pending(self) -> int:
        """Targeted devices neither updated, updating nor failed."""
        return self.target - self.updated - self.updating - self.failed


@dataclass(frozen=True)
class FailedDevice:
    """A targeted device whose last update of the version since its release failed."""

    device_id: str
    error: str
    failed_at: int
    firmware_version: int | None
    online: bool


@dataclass(frozen=True)
class LatencySummary:
    """Time from the release to each updated device's success.

    ``percentiles`` maps 50/90/99 to milliseconds (nearest rank; None with no point);
    ``histogram`` holds (upper bound ms or None for the open last bucket, count);
    ``curve`` holds (ms, devices updated by then) points of the cumulative curve."""

    count: int
    percentiles: dict[int, int | None]
    histogram: tuple[tuple[int | None, int], ...]
    curve: tuple[tuple[int, int], ...]
    max_ms: int | None


def nearest_rank(sorted_ms: Sequence[int], percent: int) -> int | None:
    """The ``percent``-th percentile of sorted values by the nearest-rank method."""
    if not sorted_ms:
        return None
    rank = max(1, math.ceil(percent / 100 * len(sorted_ms)))
    return sorted_ms[rank - 1]


def latency_summary(sorted_ms: Sequence[int]) -> LatencySummary:
    """Percentiles, histogram and cumulative curve of sorted latencies."""
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for value in sorted_ms:
        index = next((i for i, bound in enumerate(LATENCY_BUCKETS_MS) if value <= bound),
                     len(LATENCY_BUCKETS_MS))
        counts[index] += 1
    bounds: list[int | None] = [*LATENCY_BUCKETS_MS, None]
    total = len(sorted_ms)
    curve: list[tuple[int, int]] = []
    if total:
        step = max(1, math.ceil(total / CURVE_POINTS))
        # The i-th point: by sorted_ms[i - 1] ms, i devices were updated; the last one always.
        ranks = sorted({*range(step, total + 1, step), total})
        curve = [(sorted_ms[rank - 1], rank) for rank in ranks]
    return LatencySummary(
        count=total,
        percentiles={p: nearest_rank(sorted_ms, p) for p in (50, 90, 99)},
        histogram=tuple(zip(bounds, counts, strict=True)),
        curve=tuple(curve),
        max_ms=sorted_ms[-1] if total else None,
    )


def fleet_targets(inputs: ProgressInputs) -> FleetTargets:
    """Every device's target under the precedence rules (``resolve_fleet``: one vectorised
    pass over the product, the same rules as one device's ``target_firmware_for``)."""
    devices = inputs.devices
    count = len(devices.ids)
    index = {device_id: i for i, device_id in enumerate(devices.ids)}
    names = sorted({name for _, name in inputs.memberships})
    name_index = {name: j for j, name in enumerate(names)}
    pairs = [(index[device], name_index[name]) for device, name in inputs.memberships
             if device in index]
    owners = np.array([i for i, _ in pairs], dtype=np.int64)
    groups = np.array([j for _, j in pairs], dtype=np.int32)
    order = np.argsort(owners, kind="stable")
    per_device = np.bincount(owners, minlength=count) if pairs else np.zeros(count, np.int64)
    fleet = FleetArrays(
        development=np.array(devices.development, dtype=np.bool_).reshape(count),
        locked_version=np.array([-1 if v is None else v for v in devices.locked_version],
                                dtype=np.int32).reshape(count),
        group_indptr=np.concatenate(([0], np.cumsum(per_device))).astype(np.int64),
        group_ids=groups[order],
        group_names=tuple(names),
    )
    return resolve_fleet(fleet, releases_of(inputs.releases))


@dataclass(frozen=True)
class ComputedProgress:
    """Counts per release, latencies and the lists, before the bytes are attached."""

    releases: tuple[ReleaseCounts, ...]
    latencies_ms: tuple[int, ...]
    updating: tuple[UpdatingDevice, ...]
    failed: tuple[FailedDevice, ...]


def compute_progress(inputs: ProgressInputs, version: int, list_limit: int) -> ComputedProgress:
    """Classify every device a release of ``version`` decides (see :class:`ReleaseCounts`)."""
    mine = [r for r in inputs.releases if r.version == version]
    by_group = {r.group_name: r for r in mine}
    counts = {r.id: {"target": 0, "updated": 0, "updating": 0, "failed": 0} for r in mine}
    if not mine:
        return ComputedProgress((), (), (), ())
    targets = fleet_targets(inputs)
    results: dict[str, list[ResultRow]] = defaultdict(list)
    for row in inputs.results:
        results[row.device_id].append(row)
    in_flight = {row.device_id: row for row in inputs.in_flight}
    latencies: list[int] = []
    updating: list[UpdatingDevice] = []
    failed: list[FailedDevice] = []
    chosen = np.flatnonzero((targets.version == version) & (
        (targets.reason == TargetReason.GROUP_RELEASE)
        | (targets.reason == TargetReason.PRODUCT_DEFAULT)))
    devices = inputs.devices
    for i in chosen.tolist():
        device_id, running = devices.ids[i], devices.firmware_version[i]
        group = int(targets.group_index[i])
        release = by_group.get(None if group < 0 else targets.group_names[group])
        if release is None:  # cannot happen: the rules chose one of these releases
            continue
        tally = counts[release.id]
        tally["target"] += 1
        if running == version:
            tally["updated"] += 1
            successes = [row.finished_at for row in results.get(device_id, ())
                         if row.result == "success" and row.finished_at >= release.released_at]
            if successes:
                latencies.append(min(successes) - release.released_at)
        elif device_id in in_flight:
            tally["updating"] += 1
            updating.append(in_flight[device_id])
        else:
            failures = [row for row in results.get(device_id, ())
                        if row.result == "failed" and row.finished_at >= release.released_at]
            if failures:
                tally["failed"] += 1
                last = failures[-1]
                failed.append(FailedDevice(device_id, last.error, last.finished_at, running,
                                           bool(devices.online[i])))
    updating.sort(key=lambda row: (-row.updated_at, row.device_id))
    failed.sort(key=lambda row: (-row.failed_at, row.device_id))
    return ComputedProgress(
        tuple(ReleaseCounts(r, **counts[r.id]) for r in mine),
        tuple(sorted(latencies)),
        tuple(updating[:list_limit]),
        tuple(failed[:list_limit]),
    )


@dataclass(frozen=True)
class TransferBytes:
    """What delivering the version cost against full images.

    ``bytes_sent`` went over the air for the ``transfers`` completed so far, which as full
    images would have been ``bytes_full``; ``full_images_for_target`` is every targeted
    device receiving the whole image (target count x image size)."""

    bytes_sent: int
    bytes_full: int
    full_transfers: int
    compressed_transfers: int
    delta_transfers: int
    full_images_for_target: int

    @property
    def transfers(self) -> int:
        """Completed transfers of every kind."""
        return self.full_transfers + self.compressed_transfers + self.delta_transfers

    @property
    def saved_percent(self) -> float | None:
        """Share of ``bytes_full`` that deltas and compression saved (None before any)."""
        if self.bytes_full <= 0:
            return None
        return 100.0 * (self.bytes_full - self.bytes_sent) / self.bytes_full


@dataclass(frozen=True)
class ReleaseProgress:
    """How the releases of one firmware version in a product are going."""

    product: ProductRecord
    firmware: FirmwareRecord
    releases: tuple[ReleaseCounts, ...]
    latency: LatencySummary
    updating: tuple[UpdatingDevice, ...]
    failed: tuple[FailedDevice, ...]
    transfer_bytes: TransferBytes

    @property
    def target(self) -> int:
        """Devices the version's releases decide."""
        return sum(r.target for r in self.releases)

    @property
    def updated(self) -> int:
        """Of those, devices reporting the version."""
        return sum(r.updated for r in self.releases)

    @property
    def updating_count(self) -> int:
        """Of those, devices with a transfer of the version in flight."""
        return sum(r.updating for r in self.releases)

    @property
    def failed_count(self) -> int:
        """Of those, devices whose last update of the version failed."""
        return sum(r.failed for r in self.releases)

    @property
    def pending(self) -> int:
        """The rest of the targeted devices."""
        return sum(r.pending for r in self.releases)

    @property
    def state(self) -> str:
        """A one-line state: "All updated" once every targeted device reports the version."""
        if not self.releases:
            return NOT_RELEASED
        if self.target == 0:
            return NO_TARGET
        if self.updated == self.target:
            return ALL_UPDATED
        if self.updating_count == 0 and self.pending == 0:
            return FINISHED_WITH_FAILURES
        return IN_PROGRESS


@dataclass(frozen=True)
class AuditPage:
    """One page of a product's audit log, newest first; ``next_before`` continues it."""

    entries: tuple[AuditRecord, ...]
    next_before: int | None


def _bounded_int(value: object, what: str, low: int, high: int) -> int:
    """An integer in low..high from an int or a digit string, or ValidationError."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and (
            len(value.strip()) <= 19):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(f"{what} must be an integer {low}..{high}")
    return value


def _optional_text(value: object, what: str, longest: int) -> str | None:
    """A short filter text (None or empty: no filter), or ValidationError."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > longest or not value.isprintable():
        raise ValidationError(f"{what} must be printable text of at most {longest} characters")
    return value


class ReleaseProgressService(FleetBase):
    """Release progress and the audit log."""

    async def release_progress(
        self, product_ref: int | str, version: object, *, list_limit: object = 50
    ) -> ReleaseProgress:
        """How the releases of firmware ``version`` are going (a few aggregate queries,
        whatever the number of devices)."""
        number = check_version(version)
        limit = _bounded_int(list_limit, "list_limit", 0, MAX_LIST_LIMIT)

        def work() -> ReleaseProgress:
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                record = tx.get_firmware(product.id, number)
                if record is None:
                    raise UnknownFirmwareError(
                        f"product {product.slug} has no firmware version {number}")
                inputs = tx.release_progress_inputs(product.id, number)
                counters = tx.get_transfer_bytes(product.id, number)
            computed = compute_progress(inputs, number, limit)
            target = sum(r.target for r in computed.releases)
            sent = TransferBytes(
                bytes_sent=counters["bytes_sent"],
                bytes_full=counters["bytes_full"],
                full_transfers=counters["full_transfers"],
                compressed_transfers=counters["compressed_transfers"],
                delta_transfers=counters["delta_transfers"],
                full_images_for_target=target * record.size,
            )
            return ReleaseProgress(product, record, computed.releases,
                                   latency_summary(computed.latencies_ms), computed.updating,
                                   computed.failed, sent)

        return await self._read(work)

    async def update_results(
        self, product_ref: int | str, device_id: str, *, limit: object = 20
    ) -> list[UpdateResultRecord]:
        """How the device's latest updates ended (newest first): version, release / lock /
        flash, success or failure with its reason, transfer kind, start and end (for a
        device page's update history)."""
        size = _bounded_int(limit, "limit", 1, MAX_AUDIT_PAGE)

        def work() -> list[UpdateResultRecord]:
            with self.store.read() as tx:
                device = self._device_in(tx, self._product(tx, product_ref), device_id)
                return tx.list_update_results(device.id, limit=size)

        return await self._read(work)

    async def list_audit(
        self,
        actor: Actor,
        product_ref: int | str,
        *,
        before: object = None,
        limit: object = AUDIT_PAGE,
        action: object = None,
        by: object = None,
    ) -> AuditPage:
        """A page of the product's audit log, newest first, for those holding the
        ``audit:list`` scope on it (owners and administrators, installation-wide or on the
        product's team, and API users given it): entries older than id ``before``, whose
        action starts with ``action`` and whose actor is ``by``."""
        size = _bounded_int(limit, "limit", 1, MAX_AUDIT_PAGE)
        before_id = None if before in (None, "") else _bounded_int(
            before, "before", 1, 2**63 - 1)
        action_prefix = _optional_text(action, "action", 64)
        actor_name = _optional_text(by, "actor", 200)

        def work() -> AuditPage:
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                if not actor.belongs_to(product.id):  # not its product: look absent
                    raise UnknownProductError(
                        f"product {str(product_ref)[:80]!r} not found (give its id or slug)")
                actor.require_scope(AUDIT_SCOPE, product.id, "read the audit log",
                                    product.slug)
                rows = tx.list_audit(product.id, size + 1, before_id=before_id,
                                     action_prefix=action_prefix, actor=actor_name)
            more = len(rows) > size
            entries = tuple(rows[:size])
            return AuditPage(entries, entries[-1].id if more and entries else None)

        return await self._read(work)
