"""The rollout service over a real SQLite file: create/show/list/pause/resume/abort, device
outcomes, stable phases across a store restart, maintenance windows, authorisation, and the
new tables appearing on an existing database."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from otacore.errors import PermissionDeniedError, ValidationError
from otacore.rollout import (
    MaintenanceWindowError,
    RolloutOutcomeError,
    RolloutPlanError,
    Verdict,
)
from server.events import Event, EventBus
from server.fleet import SYSTEM_ACTOR, Actor, Fleet, Role
from server.fleet.errors import (
    RolloutConflictError,
    RolloutRefusedError,
    UnknownFirmwareError,
    UnknownRolloutError,
    UnknownWindowError,
)
from server.fleet.rollouts import RolloutService
from server.store import Store, schema
from server.store.tx_rollouts import RolloutQueries
from tests.pre_alembic import drop_tables_after_baseline

MIN = 60_000
BORON = 13
DEVICES = [f"{i:024x}" for i in range(1, 61)]
CANARY = DEVICES[:8]
START = 1_780_000_000_000  # 2026-05-28 ~ 20:26 UTC


class Clock:
    """A fake wall clock the tests move by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def bus_events() -> list[Event]:
    return []


@pytest.fixture
def service(store: Store, clock: Clock, bus_events: list[Event]) -> RolloutService:
    bus = EventBus()
    bus.tap = bus_events.append
    return RolloutService(store, bus, clock=clock)


@pytest.fixture
async def product(store: Store, make_firmware: Callable[..., bytes]) -> int:
    """A product of 60 devices on v1 (8 in group canary); v1 seen running, v2 and v3 not."""
    fleet = Fleet(store, EventBus())
    with store.write() as tx:
        record = tx.insert_product(slug="sensors", name="Sensors", platform_id=BORON,
                                   description="", now=1)
        tx.insert_product(slug="other", name="Other", platform_id=BORON, description="",
                          now=1)
        for device in DEVICES:
            tx.insert_device(device, record.id, 1)
            tx.update_device(device, {"firmware_version": 1}, 1)
        canary = tx.ensure_groups(record.id, ["canary"], 1)
        for device in CANARY:
            tx.set_device_groups(device, [canary[0].id])
    for version in (1, 2, 3):
        view = await fleet.upload_firmware(SYSTEM_ACTOR, "sensors", make_firmware(version),
                                           version=version, title=f"v{version}")
        if version == 1:
            with store.write() as tx:
                tx.mark_image_running_seen(record.id, view.record.sha256,
                                           view.record.module_function,
                                           view.record.module_index, 2)
    return record.id


def developer_of(product_id: int) -> Actor:
    """A product team developer, bound to the product as the API binds it."""
    member = Actor("dev@example.com", Role.NONE, memberships=((product_id, Role.DEVELOPER),))
    return member.for_product(product_id)


async def test_create_refusals_name_the_rule(service: RolloutService, product: int) -> None:
    with pytest.raises(UnknownFirmwareError, match="no firmware version 9"):
        await service.create_rollout(SYSTEM_ACTOR, "sensors", {"version": 9})
    with pytest.raises(RolloutRefusedError, match="has not been reported running"):
        await service.create_rollout(SYSTEM_ACTOR, "sensors", {"version": 2})
    with pytest.raises(RolloutRefusedError, match="group 'nope' does not exist"):
        await service.create_rollout(SYSTEM_ACTOR, "sensors",
                                     {"version": 2, "groups": ["nope"], "force": True})
    with pytest.raises(RolloutPlanError, match="must cover 100%"):
        await service.create_rollout(SYSTEM_ACTOR, "sensors", {"version": 2, "phases": "10,50"})
    with pytest.raises(Exception, match="unknown rollout field"):
        await service.create_rollout(SYSTEM_ACTOR, "sensors", {"version": 2, "phasez": "1"})
    with pytest.raises(Exception, match="need max_failure_percent"):
        await service.create_rollout(SYSTEM_ACTOR, "sensors", {"version": 2, "min_sample": 3})
    viewer = Actor("v@example.com", Role.NONE, memberships=((product, Role.VIEWER),))
    with pytest.raises(PermissionDeniedError):
        await service.create_rollout(viewer.for_product(product), "sensors", {"version": 1})
    outsider = developer_of(product + 1)  # a developer of the other product
    with pytest.raises(PermissionDeniedError, match="firmware:release"):
        await service.create_rollout(outsider, "sensors", {"version": 1})


async def test_bad_release_aborts_in_phase_one_and_nobody_else_is_offered(
    service: RolloutService, product: int, store: Store, clock: Clock,
    bus_events: list[Event],
) -> None:
    view = await service.create_rollout(
        developer_of(product), "sensors",
        {"version": 2, "phases": "10,50,100", "max_failure_percent": 20,
         "on_failure": "abort", "force": True},
    )
    shown = view.to_dict()
    assert shown["state"] == "running" and shown["forced"] is True
    assert shown["counts"]["total"] == 60 and shown["counts"]["pending"] == 60
    first = sorted(view.rollout.members(0))
    assert len(first) == 6 == shown["phases"][0]["counts"]["total"]  # exactly 10% of 60
    rid = view.record.id
    outside = [d for d in DEVICES if d not in first]
    for device in outside:
        decision = await service.rollout_offer_decision("sensors", rid, device)
        assert decision.verdict is Verdict.PHASE_NOT_OPEN
    for device in first:
        assert (await service.rollout_offer_decision("sensors", rid, device)).allowed
        await service.record_rollout_outcome("sensors", rid, device, "offered")
    clock.now += MIN
    await service.record_rollout_outcome("sensors", rid, first[0], "rebooting")
    view = await service.record_rollout_outcome("sensors", rid, first[0], "rolled_back")
    shown = view.to_dict()
    assert shown["state"] == "aborted"
    assert "1 rolled_back" in shown["reason"]
    aborted = next(e for e in shown["events"] if e["kind"] == "aborted")
    assert aborted["data"]["discard"] == first[1:]
    assert aborted["data"]["failed_by_kind"]["rolled_back"] == 1
    assert [e["kind"] for e in shown["events"]] == [
        "started", "phase_started", "threshold_crossed", "aborted"
    ]
    names = [e.name for e in bus_events]
    assert names == ["ota/rollout/started", "ota/rollout/phase_started",
                     "ota/rollout/threshold_crossed", "ota/rollout/aborted"]
    assert json.loads(bus_events[-1].data or "")["rollout"] == rid
    for device in DEVICES:
        decision = await service.rollout_offer_decision("sensors", rid, device)
        assert decision.verdict is Verdict.ABORTED
    with store.read() as tx:
        audit = [a.action for a in tx.list_audit(product)]
        outcomes = RolloutQueries(tx.conn).device_outcomes(rid)
    assert "rollout.create.forced" in audit
    assert {o.device_id: o.outcome for o in outcomes}[first[0]] == "rolled_back"
    assert {o.outcome for o in outcomes if o.device_id in first[1:]} == {"offered"}
    # Every target is placed (a percent plan places each phase at the start) and nobody
    # outside phase 1 has an outcome: none was offered the version.
    assert len(outcomes) == len(DEVICES)
    assert {o.outcome for o in outcomes if o.device_id in outside} == {None}
    device_view = await service.device_rollout_outcomes(first[0])
    assert [(o.rollout_id, o.outcome, o.failures) for o in device_view] == [
        (rid, "rolled_back", 1)
    ]


async def test_phase_membership_is_the_same_after_a_store_restart(
    service: RolloutService, product: int, reopen: Callable[..., Store], clock: Clock
) -> None:
    view = await service.create_rollout(
        SYSTEM_ACTOR, "sensors", {"version": 2, "phases": "#5,#20,all", "force": True}
    )
    rid = view.record.id
    before = {d: view.rollout.phase_of(d) for d in DEVICES}
    await service.record_rollout_outcome("sensors", rid, sorted(view.rollout.members(0))[0],
                                         "downloading")
    reopened = reopen(pool_size=1)
    try:
        again = RolloutService(reopened, EventBus(), clock=clock)
        shown = await again.get_rollout("sensors", str(rid))
        assert {d: shown.rollout.phase_of(d) for d in DEVICES} == before
        assert shown.to_dict()["counts"]["downloading"] == 1
        decisions = [
            (await again.rollout_offer_decision("sensors", rid, d)).verdict for d in DEVICES
        ]
        originals = [
            (await service.rollout_offer_decision("sensors", rid, d)).verdict for d in DEVICES
        ]
        assert decisions == originals
    finally:
        reopened.close()


async def test_good_release_completes_phase_by_phase(
    service: RolloutService, product: int, clock: Clock
) -> None:
    view = await service.create_rollout(
        SYSTEM_ACTOR, "sensors",
        {"version": 3, "phases": [10, 50, 100], "phase_wait": 2, "max_failure_percent": 20,
         "on_failure": "abort", "force": True},
    )
    rid = view.record.id
    for _ in range(3):
        ready = [d for d in DEVICES
                 if (await service.rollout_offer_decision("sensors", rid, d)).allowed]
        assert ready
        for device in ready:
            for outcome in ("offered", "downloading", "rebooting", "succeeded"):
                view = await service.record_rollout_outcome("sensors", rid, device, outcome)
        clock.now += 2 * MIN
        view = await service.tick_rollout("sensors", rid)
    shown = view.to_dict()
    assert shown["state"] == "completed", shown["reason"]
    assert shown["counts"]["succeeded"] == 60
    assert [p["counts"]["succeeded"] for p in shown["phases"]] == [
        p["counts"]["total"] for p in shown["phases"]
    ]


async def test_operator_pause_resume_abort_are_audited_and_checked(
    service: RolloutService, product: int, store: Store
) -> None:
    view = await service.create_rollout(SYSTEM_ACTOR, "sensors", {"version": 2, "force": True})
    rid = view.record.id
    dev = developer_of(product)
    paused = await service.pause_rollout(dev, "sensors", rid, "checking battery drain")
    assert paused.to_dict()["state"] == "paused"
    assert paused.to_dict()["reason"] == "checking battery drain"
    with pytest.raises(RolloutConflictError, match="only a scheduled or running"):
        await service.pause_rollout(dev, "sensors", rid)
    assert (await service.resume_rollout(dev, "sensors", rid)).to_dict()["state"] == "running"
    with pytest.raises(RolloutConflictError, match="only a paused rollout"):
        await service.resume_rollout(dev, "sensors", rid)
    with pytest.raises(RolloutConflictError, match="already covers the product default"):
        await service.create_rollout(SYSTEM_ACTOR, "sensors", {"version": 3, "force": True})
    viewer = Actor("v@example.com", Role.NONE, memberships=((product, Role.VIEWER),))
    with pytest.raises(PermissionDeniedError):
        await service.abort_rollout(viewer.for_product(product), "sensors", rid)
    aborted = await service.abort_rollout(dev, "sensors", rid)
    assert aborted.to_dict()["reason"] == "aborted by dev@example.com"
    with pytest.raises(UnknownRolloutError, match="no rollout 999"):
        await service.get_rollout("sensors", 999)
    with pytest.raises(UnknownRolloutError):
        await service.get_rollout("other", rid)  # another product's id space
    with pytest.raises(Exception, match="positive whole number"):
        await service.get_rollout("sensors", "abc")
    # Once aborted, the scope is free again.
    again = await service.create_rollout(SYSTEM_ACTOR, "sensors", {"version": 3, "force": True})
    listed = await service.list_rollouts("sensors")
    assert [v.record.id for v in listed] == [again.record.id, rid]
    assert [v.record.id for v in await service.list_rollouts("sensors", version=2)] == [rid]
    with store.read() as tx:
        actions = [a.action for a in tx.list_audit(product)]
    assert {"rollout.pause", "rollout.resume", "rollout.abort"} <= set(actions)


async def test_group_rollout_targets_the_group_and_later_joiners(
    service: RolloutService, product: int, store: Store
) -> None:
    view = await service.create_rollout(
        SYSTEM_ACTOR, "sensors", {"version": 2, "groups": "canary", "force": True}
    )
    rid = view.record.id
    assert view.rollout.targets == set(CANARY)
    with store.write() as tx:
        tx.ensure_groups(product, ["field"], 2)
    with pytest.raises(RolloutConflictError, match=r"already covers group\(s\) canary"):
        await service.create_rollout(
            SYSTEM_ACTOR, "sensors", {"version": 3, "groups": "field,canary", "force": True}
        )
    assert (await service.rollout_offer_decision("sensors", rid, DEVICES[30])).verdict is (
        Verdict.NOT_TARGETED
    )
    with store.write() as tx:
        canary = tx.get_group(product, "canary")
        assert canary is not None
        tx.set_device_groups(DEVICES[30], [canary.id])
    assert (await service.rollout_offer_decision("sensors", rid, DEVICES[30])).allowed
    shown = await service.get_rollout("sensors", rid)
    assert shown.to_dict()["counts"]["total"] == len(CANARY) + 1


async def test_outcomes_of_strangers_are_refused_and_nothing_changes(
    service: RolloutService, product: int
) -> None:
    view = await service.create_rollout(
        SYSTEM_ACTOR, "sensors", {"version": 2, "groups": ["canary"], "force": True}
    )
    rid = view.record.id
    with pytest.raises(RolloutOutcomeError, match="has no place in rollout"):
        await service.record_rollout_outcome("sensors", rid, DEVICES[40], "succeeded")
    with pytest.raises(ValidationError, match="24 hexadecimal digits"):
        await service.record_rollout_outcome("sensors", rid, "not-a-device", "succeeded")
    with pytest.raises(RolloutOutcomeError, match="unknown outcome 'melted'"):
        await service.record_rollout_outcome("sensors", rid, CANARY[0], "melted")
    shown = await service.record_rollout_outcome("sensors", rid, CANARY[0].upper(),
                                                 "downloading")
    assert shown.to_dict()["counts"]["downloading"] == 1
    assert shown.to_dict()["counts"]["total"] == len(CANARY)


async def test_precedence_rules_decide_the_target_set(
    service: RolloutService, product: int, store: Store
) -> None:
    with store.write() as tx:
        tx.update_device(DEVICES[20], {"development": True}, 2)  # rule 1: no automatic update
        tx.update_device(DEVICES[21], {"desired_firmware_version": 1}, 2)  # rule 2: locked
        canary = tx.get_group(product, "canary")
        assert canary is not None
        tx.set_release(product, canary.id, version=3, intelligent=False, actor="t", now=2)
    view = await service.create_rollout(SYSTEM_ACTOR, "sensors", {"version": 2, "force": True})
    # The canary group's own release (v3) wins over a product default rollout (rule 3).
    expected = set(DEVICES) - {DEVICES[20], DEVICES[21]} - set(CANARY)
    assert view.rollout.targets == expected
    decision = await service.rollout_offer_decision("sensors", view.record.id, DEVICES[21])
    assert decision.verdict is Verdict.NOT_TARGETED


async def test_devices_already_on_the_version_are_not_targets(
    service: RolloutService, product: int
) -> None:
    view = await service.create_rollout(SYSTEM_ACTOR, "sensors", {"version": 1})
    assert view.rollout.targets == set()
    assert view.to_dict()["state"] == "completed"  # nothing to deliver


async def test_reboot_timeout_on_the_fake_clock(
    service: RolloutService, product: int, clock: Clock
) -> None:
    view = await service.create_rollout(
        SYSTEM_ACTOR, "sensors",
        {"version": 2, "force": True, "reboot_timeout": 5, "max_failure_percent": 50,
         "min_sample": 2},
    )
    rid = view.record.id
    for device in DEVICES[:2]:
        await service.record_rollout_outcome("sensors", rid, device, "rebooting")
    clock.now += 5 * MIN - 1
    assert (await service.tick_rollout("sensors", rid)).to_dict()["counts"]["timed_out"] == 0
    clock.now += 1
    shown = (await service.tick_rollout("sensors", rid)).to_dict()
    assert shown["counts"]["timed_out"] == 2
    assert shown["state"] == "paused" and "2 timed_out" in shown["reason"]


async def test_a_scheduled_rollout_starts_on_the_periodic_tick(
    service: RolloutService, product: int, clock: Clock
) -> None:
    view = await service.create_rollout(
        SYSTEM_ACTOR, "sensors", {"version": 2, "force": True, "start_at": START + 10 * MIN}
    )
    assert view.to_dict()["state"] == "scheduled"
    decision = await service.rollout_offer_decision("sensors", view.record.id, DEVICES[0])
    assert decision.verdict is Verdict.SCHEDULED and decision.retry_at == START + 10 * MIN
    assert [v.to_dict()["state"] for v in await service.tick_active_rollouts()] == ["scheduled"]
    clock.now += 10 * MIN
    (ticked,) = await service.tick_active_rollouts()
    assert ticked.to_dict()["state"] == "running"
    assert (await service.rollout_offer_decision("sensors", view.record.id, DEVICES[0])).allowed
    json.dumps(ticked.to_dict())  # what `ota rollout show --json` prints


async def test_maintenance_windows_gate_offers(
    service: RolloutService, product: int, clock: Clock, store: Store
) -> None:
    view = await service.create_rollout(SYSTEM_ACTOR, "sensors", {"version": 2, "force": True})
    rid = view.record.id
    dev = developer_of(product)
    window = await service.set_window(dev, "sensors", cron="0 2 * * *", duration=60,
                                      timezone="Europe/Berlin")
    assert (window.group, window.cron, window.timezone) == (None, "0 2 * * *", "Europe/Berlin")
    await service.set_window(dev, "sensors", cron="0 4 * * *", duration="30",
                             timezone="UTC", group="canary")
    listed = await service.list_windows("sensors")
    assert [(w.group, w.cron) for w in listed] == [(None, "0 2 * * *"), ("canary", "0 4 * * *")]
    # START is 20:26 UTC: outside both windows.
    plain = await service.rollout_offer_decision("sensors", rid, DEVICES[40])
    assert plain.verdict is Verdict.OUTSIDE_WINDOW
    assert plain.retry_at == START - START % (24 * 60 * MIN) + 24 * 60 * MIN  # 02:00 CEST
    canary = await service.rollout_offer_decision("sensors", rid, CANARY[0])
    assert canary.retry_at == plain.retry_at + 4 * 60 * MIN  # its group's window: 04:00 UTC
    forced = await service.rollout_offer_decision("sensors", rid, DEVICES[40], force_window=True)
    assert forced.allowed and forced.forced
    await service.audit_forced_offer(dev, "sensors", rid, DEVICES[40], forced)
    with pytest.raises(ValidationError, match="only a decision marked forced"):
        await service.audit_forced_offer(dev, "sensors", rid, DEVICES[40], plain)
    clock.now = plain.retry_at
    assert (await service.rollout_offer_decision("sensors", rid, DEVICES[40])).allowed
    assert not (await service.rollout_offer_decision("sensors", rid, CANARY[0])).allowed
    with pytest.raises(MaintenanceWindowError, match="unknown time zone"):
        await service.set_window(dev, "sensors", cron="0 2 * * *", duration=60,
                                 timezone="Moon/Base")
    with pytest.raises(RolloutRefusedError, match="no group 'nope'"):
        await service.set_window(dev, "sensors", cron="0 2 * * *", duration=60, group="nope")
    await service.clear_window(dev, "sensors")
    await service.clear_window(dev, "sensors", group="canary")
    with pytest.raises(UnknownWindowError, match="has no maintenance window"):
        await service.clear_window(dev, "sensors")
    assert await service.list_windows("sensors") == []
    with store.read() as tx:
        actions = [a.action for a in tx.list_audit(product)]
    assert actions.count("window.set") == 2 and actions.count("window.clear") == 2
    assert actions.count("rollout.offer.forced_window") == 1


def _drop_rollout_tables(engine: sa.Engine) -> None:
    """What a store of a server from before rollouts (and before Alembic) looks like."""
    with engine.begin() as conn:
        for table in ("rollout_events", "rollout_device_outcomes", "rollouts",
                      "maintenance_windows", "alembic_version"):
            conn.exec_driver_sql(f"DROP TABLE {table}")
        drop_tables_after_baseline(conn)


def test_an_existing_database_gets_the_rollout_tables(data_dir: Path) -> None:
    store = Store.open_dir(data_dir, pool_size=1)
    _drop_rollout_tables(store.engine)
    store.close()
    reopened = Store.open_dir(data_dir, pool_size=1)
    try:
        names = set(sa.inspect(reopened.engine).get_table_names())
        assert {"rollouts", "rollout_device_outcomes", "rollout_events",
                "maintenance_windows"} <= names
        assert schema.rollouts.c.state_data is not None
    finally:
        reopened.close()



async def test_a_rollout_noted_while_the_active_ones_are_read_stays_known(
    store: Store
) -> None:
    """A periodic tick reads the active rollouts and replaces what the process knows with
    that read; a rollout created (and noted) while the read ran must stay known, or the
    results of its devices' updates, asked of rollouts_may_steer, go unrecorded (seen as
    a phase stuck below its succeeded count in tests/test_rollout_abort.py)."""
    fleet = Fleet(store, EventBus())
    fleet._set_rollout_products(set(), fleet._rollout_notes_mark())  # a first tick: none
    assert not await fleet.rollouts_may_steer(7)
    since = fleet._rollout_notes_mark()  # a tick's read begins (it will find none) ...
    fleet.note_rollout_product(7)  # ... a rollout of product 7 is created meanwhile ...
    fleet._set_rollout_products(set(), since)  # ... and the read's result is applied
    assert await fleet.rollouts_may_steer(7)
    # An offer read begun before the note that says "no rollout" does not undo it either.
    fleet.note_rollout_product(7, active=False, read_since=since)
    assert await fleet.rollouts_may_steer(7)
    # Knowledge newer than every note applies.
    fleet.note_rollout_product(7, active=False, read_since=fleet._rollout_notes_mark())
    assert not await fleet.rollouts_may_steer(7)
    fleet._set_rollout_products({7}, fleet._rollout_notes_mark())
    assert await fleet.rollouts_may_steer(7)
