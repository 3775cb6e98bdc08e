"""Release progress (issue 17) over the store, on SQLite and PostgreSQL: which devices a
release decides (the precedence rules, as the fleet engine applies them), their states,
failures with reasons, the update-latency curve on known timestamps and the bytes sent
against full images; and the product audit log's paging, filters and access rules."""

from __future__ import annotations

import random

import pytest
import sqlalchemy as sa

from otacore.errors import PermissionDeniedError, ValidationError
from otacore.precedence import DeviceTargeting, TargetReason, target_firmware_for
from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Actor, Fleet, Role
from server.fleet.base import releases_of
from server.fleet.errors import UnknownDeviceError, UnknownFirmwareError, UnknownProductError
from server.fleet.release_progress import (
    ALL_UPDATED,
    IN_PROGRESS,
    LATENCY_BUCKETS_MS,
    NOT_RELEASED,
    compute_progress,
    latency_summary,
    nearest_rank,
)
from server.store import ReleaseRecord, Store, UpdateStateRecord, schema
from server.store.tx_release_progress import DeviceColumns, ProgressInputs

BORON = 13
SIZE = 1000
T0 = 1_780_000_000_000  # the release
DEVICES = [f"{i:024x}" for i in range(1, 11)]
BETA, CANARY, DEV, LOCKED = DEVICES[0:3], DEVICES[3], DEVICES[8], DEVICES[9]


class Clock:
    """A wall clock the test sets."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def _firmware(product_id: int, version: int) -> dict[str, object]:
    return dict(product_id=product_id, version=version, title=f"v{version}", description="",
                filename="f.bin", size=SIZE, sha256=f"{version:064x}", platform_id=BORON,
                module_function=5, module_index=1, module_version=6, module_info={},
                uploaded_by="me", uploaded_at=1)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fleet(store: Store, clock: Clock) -> Fleet:
    return Fleet(store, EventBus(), clock=clock)


@pytest.fixture
def product(store: Store) -> int:
    """Ten devices on v1: three in group beta, one in canary, one development, one locked
    to v1; v2 released to the product default and to beta at T0, v3 to canary."""
    with store.write() as tx:
        record = tx.insert_product(slug="sensors", name="Sensors", platform_id=BORON,
                                   description="", now=1)
        pid = record.id
        for version in (1, 2, 3):
            tx.insert_firmware(**_firmware(pid, version))
        beta = tx.insert_group(pid, "beta", description="", color="", now=1)
        canary = tx.insert_group(pid, "canary", description="", color="", now=1)
        for device in DEVICES:
            tx.insert_device(device, pid, 1)
            tx.update_device(device, {"firmware_version": 1}, 1)
        for device in BETA:
            tx.set_device_groups(device, [beta.id])
        tx.set_device_groups(CANARY, [canary.id, beta.id])  # canary's v3 wins over beta's v2
        tx.update_device(DEV, {"development": True}, 1)
        tx.update_device(LOCKED, {"desired_firmware_version": 1}, 1)
        for group_id, version in ((None, 2), (beta.id, 2), (canary.id, 3)):
            tx.set_release(pid, group_id, version=version, intelligent=group_id == beta.id,
                           actor="me", now=T0)
    return pid


def _runs(store: Store, device: str, version: int) -> None:
    with store.write() as tx:
        tx.update_device(device, {"firmware_version": version}, T0)


async def test_progress_counts_each_state_per_release(
        store: Store, fleet: Fleet, clock: Clock, product: int) -> None:
    default = DEVICES[4:8]
    # A failure before the release does not count against it.
    clock.now = T0 - 1_000
    await fleet.record_flash_status(default[2], "failed", error="old failure")
    # Beta: one updated 5 s after the release, one in flight, one rolled back.
    clock.now = T0 + 5_000
    await fleet.record_flash_status(BETA[0], "success")
    _runs(store, BETA[0], 2)
    await fleet.record_update_progress(BETA[1], sha256=f"{2:064x}", version=2,
                                       transfer="delta", bytes_done=300, bytes_total=1000)
    clock.now = T0 + 30_000
    await fleet.record_update_progress(BETA[2], sha256=f"{2:064x}", version=2,
                                       transfer="full", bytes_done=1000, bytes_total=1000)
    await fleet.record_flash_status(BETA[2], "failed", error="rolled_back: self-test failed")
    # Default: one updated after a minute, one reporting v2 with no recorded result.
    clock.now = T0 + 60_000
    await fleet.record_flash_status(default[0], "success")
    _runs(store, default[0], 2)
    _runs(store, default[1], 2)
    with store.write() as tx:
        tx.add_transfer_bytes(product, 2, bytes_sent=300, bytes_full=SIZE, transfer="delta")
        tx.add_transfer_bytes(product, 2, bytes_sent=SIZE, bytes_full=SIZE, transfer="full")

    progress = await fleet.release_progress("sensors", 2)
    assert (progress.target, progress.updated, progress.updating_count,
            progress.failed_count, progress.pending) == (7, 3, 1, 1, 2)
    assert progress.state == IN_PROGRESS
    by_group = {r.group_name: r for r in progress.releases}
    assert set(by_group) == {None, "beta"}
    assert (by_group[None].target, by_group[None].updated, by_group[None].pending) == (4, 2, 2)
    beta = by_group["beta"]
    assert (beta.target, beta.updated, beta.updating, beta.failed) == (3, 1, 1, 1)
    assert beta.intelligent and not by_group[None].intelligent
    [updating] = progress.updating
    assert (updating.device_id, updating.transfer, updating.bytes_done,
            updating.bytes_total) == (BETA[1], "delta", 300, 1000)
    [failed] = progress.failed
    assert (failed.device_id, failed.error, failed.failed_at) == (
        BETA[2], "rolled_back: self-test failed", T0 + 30_000)
    assert progress.latency.count == 2
    assert [ms for ms, _ in progress.latency.curve] == [5_000, 60_000]
    assert progress.latency.percentiles == {50: 5_000, 90: 60_000, 99: 60_000}
    sent = progress.transfer_bytes
    assert (sent.bytes_sent, sent.bytes_full, sent.transfers) == (1300, 2000, 2)
    assert sent.full_images_for_target == 7 * SIZE
    assert sent.saved_percent == pytest.approx(35.0)

    # v3 decides only the canary device (its group's release beats beta's lower version).
    canary = await fleet.release_progress("sensors", 3)
    assert (canary.target, canary.updated) == (1, 0)
    _runs(store, CANARY, 3)
    assert (await fleet.release_progress("sensors", 3)).state == ALL_UPDATED
    # v1 is not released: locked and development devices follow no release.
    unreleased = await fleet.release_progress("sensors", 1)
    assert (unreleased.state, unreleased.target) == (NOT_RELEASED, 0)


async def test_the_failure_reason_is_recorded_with_its_transfer(
        store: Store, fleet: Fleet, clock: Clock, product: int) -> None:
    clock.now = T0 + 1
    await fleet.record_update_progress(BETA[0], sha256=f"{2:064x}", version=2,
                                       transfer="zstd", bytes_done=10, bytes_total=1000)
    clock.now = T0 + 2_500
    await fleet.record_flash_status(BETA[0], "failed", error="image_refused: bad signature")
    with store.read() as tx:
        [result] = tx.list_update_results(BETA[0])
        assert tx.get_update_state(BETA[0]) is None
    assert (result.version, result.kind, result.result, result.error, result.transfer,
            result.started_at, result.finished_at) == (
        2, "release", "failed", "image_refused: bad signature", "zstd", T0 + 1, T0 + 2_500)
    [seen] = await fleet.update_results("sensors", BETA[0].upper())
    assert seen == result
    with pytest.raises(UnknownDeviceError):
        await fleet.update_results("sensors", "f" * 24)
    # A retry that succeeds later: updated, and no longer failed.
    clock.now = T0 + 9_000
    await fleet.record_flash_status(BETA[0], "success")
    _runs(store, BETA[0], 2)
    progress = await fleet.release_progress("sensors", 2)
    assert (progress.failed_count, progress.updated, progress.failed) == (0, 1, ())
    assert progress.latency.percentiles[50] == 9_000


async def test_a_result_names_the_version_of_its_image(
        store: Store, fleet: Fleet, clock: Clock, product: int) -> None:
    """A rollout steers a device past its release target: the outcome is recorded for the
    version of the image the device got (and is no outcome of the release)."""
    clock.now = T0 + 1_000
    await fleet.record_flash_status(BETA[0], "success", application_sha256=f"{3:064x}")
    await fleet.record_flash_status(BETA[1], "failed", error="boom",
                                    application_sha256=f"{2:064x}")
    await fleet.record_flash_status(BETA[2], "failed", error="unknown image",
                                    application_sha256="cd" * 32)
    with store.read() as tx:
        got = [(r.version, r.kind, r.result) for device in BETA
               for r in tx.list_update_results(device)]
    assert got == [(3, "other", "success"), (2, "release", "failed"),
                   (2, "release", "failed")]
    assert (await fleet.release_progress("sensors", 2)).failed_count == 2


async def test_a_release_again_restarts_its_clock(
        store: Store, fleet: Fleet, clock: Clock, product: int) -> None:
    clock.now = T0 + 4_000
    await fleet.record_flash_status(BETA[0], "failed", error="download timed out")
    assert (await fleet.release_progress("sensors", 2)).failed_count == 1
    with store.write() as tx:  # released again later: earlier failures are history
        tx.set_release(product, None, version=2, intelligent=False, actor="me", now=T0 + 10_000)
        beta = tx.get_group(product, "beta")
        assert beta is not None
        tx.set_release(product, beta.id, version=2, intelligent=False, actor="me",
                       now=T0 + 10_000)
    assert (await fleet.release_progress("sensors", 2)).failed_count == 0


async def test_progress_refuses_unknown_versions_and_bad_limits(
        fleet: Fleet, product: int) -> None:
    with pytest.raises(UnknownFirmwareError, match="no firmware version 9"):
        await fleet.release_progress("sensors", 9)
    with pytest.raises(UnknownProductError):
        await fleet.release_progress("nope", 2)
    for bad in ("-1", "x", 501, True, "9" * 40):
        with pytest.raises(ValidationError):
            await fleet.release_progress("sensors", 2, list_limit=bad)
    with pytest.raises(ValidationError):
        await fleet.release_progress("sensors", "two")


@pytest.mark.parametrize("seed", [1, 7, 2026])
def test_the_targeted_devices_are_those_the_precedence_rules_give(seed: int) -> None:
    """compute_progress over random fleets picks exactly the devices (and releases) that
    target_firmware_for gives each device one at a time."""
    print(f"seed {seed}")
    rng = random.Random(seed)
    names = ["a", "b", "c", "d"]
    records = []
    for n, name in enumerate([None, *names]):
        if rng.random() < 0.8:
            records.append(ReleaseRecord(n + 1, 1, "product" if name is None else f"group:{n}",
                                         None if name is None else n, name,
                                         rng.choice([2, 3]), rng.random() < 0.5, T0, "me",
                                         0, 0, 0))
    ids, development, locked, running, memberships = [], [], [], [], []
    devices: dict[str, DeviceTargeting] = {}
    for i in range(300):
        device_id = f"{i:024x}"
        groups = frozenset(g for g in names if rng.random() < 0.3)
        targeting = DeviceTargeting(rng.random() < 0.1,
                                    rng.choice([None, None, None, 2, 3]), groups)
        devices[device_id] = targeting
        ids.append(device_id)
        development.append(targeting.development)
        locked.append(targeting.locked_version)
        running.append(rng.choice([1, 2, 3]))
        memberships += [(device_id, g) for g in sorted(groups)
                        if any(r.group_name == g for r in records)]
    inputs = ProgressInputs(
        DeviceColumns(tuple(ids), tuple(development), tuple(locked), tuple(running),
                      (False,) * len(ids)), memberships, records, [], [])
    releases = releases_of(records)
    for version in (2, 3):
        computed = compute_progress(inputs, version, 10)
        expected: dict[str | None, int] = {}
        for targeting in devices.values():
            target = target_firmware_for(targeting, releases)
            if target.version == version and target.reason in (
                    TargetReason.GROUP_RELEASE, TargetReason.PRODUCT_DEFAULT):
                expected[target.group] = expected.get(target.group, 0) + 1
        got = {r.group_name: r.target for r in computed.releases if r.target}
        assert got == expected, (seed, version)


def test_latency_summary_on_known_values() -> None:
    values = list(range(1_000, 101_000, 1_000))  # 1 s .. 100 s, 100 devices
    summary = latency_summary(values)
    assert summary.percentiles == {50: 50_000, 90: 90_000, 99: 99_000}
    assert summary.max_ms == 100_000
    histogram = dict(summary.histogram)
    assert histogram[LATENCY_BUCKETS_MS[0]] == 10  # <= 10 s
    assert histogram[LATENCY_BUCKETS_MS[1]] == 50  # 11..60 s
    assert histogram[LATENCY_BUCKETS_MS[2]] == 40  # 61..100 s
    assert sum(histogram.values()) == 100
    assert summary.curve[-1] == (100_000, 100)  # everyone, at the slowest
    assert len(summary.curve) <= 60
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in zip(summary.curve, summary.curve[1:],
                                                           strict=False))
    empty = latency_summary([])
    assert (empty.count, empty.curve, empty.percentiles[50]) == (0, (), None)
    assert nearest_rank([7], 99) == 7


async def test_progress_reads_a_fixed_number_of_statements_for_ten_thousand_devices(
        store: Store, fleet: Fleet, product: int) -> None:
    extra = [f"{i:024x}" for i in range(1_000, 11_000)]
    with store.write() as tx:
        tx.conn.execute(
            store_devices_insert(),
            [{"id": device, "product_id": product, "firmware_version": 2 if i % 2 else 1,
              "created_at": 1, "updated_at": 1} for i, device in enumerate(extra)])
        for device in extra[:100]:
            tx.put_update_state(UpdateStateRecord(device, f"{2:064x}", 2, "full", 5, SIZE,
                                                  "in_progress", T0, T0))
    statements: list[str] = []

    def listen(conn: object, cursor: object, text: str, *args: object) -> None:
        statements.append(text)

    sa.event.listen(store.engine, "before_cursor_execute", listen)
    try:
        progress = await fleet.release_progress("sensors", 2, list_limit=20)
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", listen)
    # Product, firmware, devices, memberships, releases, results, in flight, bytes: the
    # same eight statements for 10,000 devices as for ten (no query per device).
    assert len([t for t in statements if t.lstrip().upper().startswith("SELECT")]) == 8
    assert progress.target == 7 + len(extra)
    assert progress.updated == len(extra) // 2
    assert progress.updating_count == 50  # the other half of the hundred run v2 already
    assert len(progress.updating) == 20


def store_devices_insert():  # type: ignore[no-untyped-def]
    return sa.insert(schema.devices).values(
        name=None, notes="", development=False, desired_firmware_version=None,
        flash_requested=False, firmware_updates_forced=False, firmware_updates_enabled=True,
        updates_pending=False, reset_pending=False, online=False, certs_revoked=False)


# --- the audit log ----------------------------------------------------------------------------


async def _audit_entries(store: Store, product: int, count: int) -> None:
    with store.write() as tx:
        for n in range(count):
            tx.add_audit(actor="alice" if n % 2 else "bob",
                         action="firmware.release" if n % 3 == 0 else "device.update",
                         product_id=product, target=f"t{n}", details={"n": n}, now=T0 + n)
        tx.add_audit(actor="alice", action="firmware.release", product_id=None, target="",
                     details={}, now=T0)


async def test_audit_pages_and_filters(store: Store, fleet: Fleet, product: int) -> None:
    await _audit_entries(store, product, 7)
    first = await fleet.list_audit(SYSTEM_ACTOR, "sensors", limit=3)
    assert [e.details["n"] for e in first.entries] == [6, 5, 4]
    assert first.next_before == first.entries[-1].id
    second = await fleet.list_audit(SYSTEM_ACTOR, "sensors", limit="3",
                                    before=str(first.next_before))
    assert [e.details["n"] for e in second.entries] == [3, 2, 1]
    last = await fleet.list_audit(SYSTEM_ACTOR, "sensors", limit=3, before=second.next_before)
    assert [e.details["n"] for e in last.entries] == [0]
    assert last.next_before is None
    releases = await fleet.list_audit(SYSTEM_ACTOR, "sensors", action="firmware.")
    assert [e.details["n"] for e in releases.entries] == [6, 3, 0]
    by_alice = await fleet.list_audit(SYSTEM_ACTOR, "sensors", by="alice")
    assert [e.details["n"] for e in by_alice.entries] == [5, 3, 1]
    # LIKE wildcards in the prefix are literal.
    assert (await fleet.list_audit(SYSTEM_ACTOR, "sensors", action="%")).entries == ()
    for bad in ({"limit": 0}, {"limit": 201}, {"limit": "ten"}, {"before": "-3"},
                {"action": "x" * 65}, {"by": "a\nb"}, {"before": 2**64}):
        with pytest.raises(ValidationError):
            await fleet.list_audit(SYSTEM_ACTOR, "sensors", **bad)  # type: ignore[arg-type]


async def test_audit_access_rules(store: Store, fleet: Fleet, product: int) -> None:
    await _audit_entries(store, product, 2)
    with store.write() as tx:
        other = tx.insert_product(slug="other", name="Other", platform_id=BORON,
                                  description="", now=1).id
    allowed = [
        Actor("owner", Role.OWNER),
        Actor("admin", Role.ADMINISTRATOR),
        Actor("team admin", Role.NONE, memberships=((product, Role.ADMINISTRATOR),)),
        Actor("auditor", Role.NONE, api_product_id=product,
              api_scopes=frozenset({"audit:list"})),
    ]
    for actor in allowed:
        assert len((await fleet.list_audit(actor, "sensors")).entries) == 2, actor.subject
    refused = [
        Actor("developer", Role.DEVELOPER),
        Actor("viewer", Role.NONE, memberships=((product, Role.VIEWER),)),
        Actor("team developer", Role.NONE, memberships=((product, Role.DEVELOPER),)),
        Actor("api reader", Role.NONE, api_product_id=product,
              api_scopes=frozenset({"firmware:get", "events:get"})),
    ]
    for actor in refused:
        with pytest.raises(PermissionDeniedError, match="audit"):
            await fleet.list_audit(actor, "sensors")
    # Not a member of the product at all: it looks absent, as everywhere.
    strangers = [
        Actor("elsewhere", Role.NONE, memberships=((other, Role.ADMINISTRATOR),)),
        Actor("other api", Role.NONE, api_product_id=other,
              api_scopes=frozenset({"audit:list"})),
    ]
    for actor in strangers:
        with pytest.raises(UnknownProductError):
            await fleet.list_audit(actor, "sensors")
