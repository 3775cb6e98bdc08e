"""Rollout state that scales (issue 15), on a real SQLite file: recording an outcome writes
one device row and a small rollout state whatever the target set's size, and reads neither
the target set nor the other devices' rows (a light change, from the saved tally); light
changes decide exactly as full loads (a differential test); an offer decision for a placed
device reads its own row, not the product's devices; finished rollouts are counted by the
database; listings filter by state in SQL; a rollout saved in the old format (every
device's progress inside its state) still loads and moves to rows."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

from otacore.errors import ValidationError
from otacore.module import build_module
from otacore.platforms import ModuleFunction
from otacore.rollout import RolloutOutcomeError, Verdict
from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.fleet.errors import RolloutConflictError
from server.store import Store, schema
from server.store.tx_rollouts import RolloutQueries

BORON = 13
START = 1_780_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> int:
        return self.now


@dataclass
class Statements:
    """What the engine executed while :func:`watching`: each statement with its rows."""

    seen: list[tuple[str, int, object]] = field(default_factory=list)

    def rows_written(self, table: str) -> int:
        return sum(rows for text, rows, _ in self.seen
                   if text.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))
                   and f" {table}" in text.split("WHERE")[0])

    def state_bytes(self) -> int:
        """Bytes of the rollouts.state_data written (UPDATE rollouts ... state_data)."""
        total = 0
        for text, _, params in self.seen:
            if not text.lstrip().upper().startswith("UPDATE ROLLOUTS "):
                continue
            # SQLite's driver takes a tuple of plain strings; psycopg a mapping whose JSON
            # values are wrapped (psycopg.types.json.Json keeps the value in ``obj``).
            values = params.values() if isinstance(params, Mapping) else params
            for value in values if isinstance(values, Iterable) else ():
                if hasattr(value, "obj"):
                    value = json.dumps(value.obj)
                if isinstance(value, str):
                    total += len(value)
        return total

    def reads_product_devices(self) -> bool:
        return any("FROM devices" in text and "WHERE devices.product_id" in text
                   for text, _, _ in self.seen)


@contextmanager
def watching(store: Store) -> Iterator[Statements]:
    statements = Statements()

    def listen(conn: object, cursor: object, text: str, params: object, context: object,
               executemany: bool) -> None:
        rows = len(params) if executemany else 1  # type: ignore[arg-type]
        statements.seen.append((text, rows, params))

    sa.event.listen(store.engine, "before_cursor_execute", listen)
    try:
        yield statements
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", listen)


def _fleet_of(store: Store, size: int, clock: Clock) -> tuple[Fleet, int, list[str]]:
    """A product of ``size`` devices on v1, with v2 uploaded (not yet seen running)."""
    fleet = Fleet(store, EventBus(), clock=clock)
    product = fleet.create_product_sync(SYSTEM_ACTOR, "Scale", BORON)
    devices = [f"{i:024x}" for i in range(1, size + 1)]
    columns = {"product_id": product.id, "name": None, "notes": "", "development": False,
               "desired_firmware_version": None, "flash_requested": False,
               "firmware_updates_forced": False, "firmware_updates_enabled": True,
               "updates_pending": False, "reset_pending": False, "online": False,
               "certs_revoked": False, "firmware_version": 1, "created_at": 0,
               "updated_at": 0}
    with store.write() as tx:
        tx.conn.execute(sa.insert(schema.devices), [{"id": d, **columns} for d in devices])
    return fleet, product.id, devices


async def _upload(fleet: Fleet, product_id: int, version: int) -> None:
    image = build_module(hashlib.shake_256(b"scale%d" % version).digest(4096),
                         platform_id=BORON, function=ModuleFunction.USER_PART, version=6,
                         product_id=BORON, product_version=version)
    await fleet.upload_firmware(SYSTEM_ACTOR, product_id, image, version=version, title="v")


@pytest.mark.parametrize("size", [200, 4_000])
async def test_recording_an_outcome_writes_one_device_row_and_a_small_state(
    store: Store, size: int
) -> None:
    clock = Clock()
    fleet, product_id, _ = _fleet_of(store, size, clock)
    await _upload(fleet, product_id, 2)
    with watching(store) as created:
        view = await fleet.create_rollout(SYSTEM_ACTOR, product_id,
                                          {"version": 2, "phases": "10,50,100", "force": True})
    rid = view.record.id
    # Creating it places every target once (a percent plan places all phases at the start).
    assert created.rows_written("rollout_device_outcomes") == size
    first = sorted(view.rollout.members(0))
    assert len(first) == size // 10
    for n, outcome in enumerate(("offered", "downloading", "rebooting", "succeeded")):
        clock.now += 1000
        with watching(store) as recorded:
            await fleet.record_rollout_outcome(product_id, rid, first[n], outcome)
        # O(1): one device row, whatever the size; the rollout's state stays small; and
        # the change is light: the product's devices (its target set) are not read.
        assert recorded.rows_written("rollout_device_outcomes") == 1
        assert 0 < recorded.state_bytes() < 1024
        assert not recorded.reads_product_devices()
    with store.read() as tx:
        rows = {o.device_id: o for o in RolloutQueries(tx.conn).device_outcomes(rid)}
        state = RolloutQueries(tx.conn).get_rollout(product_id, rid)
    assert state is not None and "devices" not in state.state_data
    assert len(json.dumps(state.state_data)) < 1024
    assert [rows[d].outcome for d in first[:4]] == [
        "offered", "downloading", "rebooting", "succeeded"]
    assert rows[first[3]].updated_at == clock.now  # when its outcome came
    shown = (await fleet.get_rollout(product_id, rid)).to_dict()
    assert shown["counts"]["total"] == size and shown["counts"]["succeeded"] == 1


async def test_offer_decision_of_a_placed_device_reads_its_row_not_the_fleet(
    store: Store
) -> None:
    clock = Clock()
    fleet, product_id, _ = _fleet_of(store, 300, clock)
    await _upload(fleet, product_id, 2)
    view = await fleet.create_rollout(SYSTEM_ACTOR, product_id,
                                      {"version": 2, "phases": "10,100", "force": True})
    rid = view.record.id
    first, second = view.rollout.members(0)[0], view.rollout.members(1)[0]
    with watching(store) as asked:
        assert (await fleet.rollout_offer_decision(product_id, rid, first)).allowed
        decision = await fleet.rollout_offer_decision(product_id, rid, second)
        assert decision.verdict is Verdict.PHASE_NOT_OPEN and decision.phase == 1
    assert not asked.reads_product_devices()
    # A device that joined the target set since the last change has no row yet: its
    # decision reads the whole target set, which places it (exactly: phase 1 is now
    # ceil(10% of 301) = 31 devices, so the newcomer fills the 31st place).
    with store.write() as tx:
        tx.insert_device(f"{999_999:024x}", product_id, 0)
        tx.update_device(f"{999_999:024x}", {"firmware_version": 1}, 0)
    with watching(store) as joined:
        decision = await fleet.rollout_offer_decision(product_id, rid, f"{999_999:024x}")
    assert joined.reads_product_devices()
    assert decision.verdict is Verdict.OFFER and decision.phase == 0


async def test_finished_rollouts_are_counted_by_the_database_and_filtered_by_state(
    store: Store
) -> None:
    clock = Clock()
    fleet, product_id, _ = _fleet_of(store, 40, clock)
    await _upload(fleet, product_id, 2)
    await _upload(fleet, product_id, 3)
    bad = await fleet.create_rollout(
        SYSTEM_ACTOR, product_id,
        {"version": 2, "phases": "#4,all", "max_failure_percent": 20, "min_sample": 1,
         "on_failure": "abort", "force": True})
    failing = sorted(bad.rollout.members(0))[0]
    for outcome in ("offered", "downloading", "rebooting", "rolled_back"):
        live = await fleet.record_rollout_outcome(product_id, bad.record.id, failing, outcome)
    assert live.state.value == "aborted"
    # Its view now comes from a GROUP BY over its rows (and the target count it saved):
    # the same counts as the machine's: 3 of phase 1 and the 36 devices never placed
    # pending in the total.
    finished = await fleet.get_rollout(product_id, bad.record.id)
    assert finished.counts == live.counts
    assert finished.to_dict()["counts"]["pending"] == 3 + 36
    assert finished.to_dict()["counts"]["rolled_back"] == 1
    assert finished.to_dict()["phases"][0]["counts"]["total"] == 4
    good = await fleet.create_rollout(SYSTEM_ACTOR, product_id,
                                      {"version": 3, "phases": "100", "force": True})
    listed = await fleet.list_rollouts(product_id, state="aborted")
    assert [v.record.id for v in listed] == [bad.record.id]
    listed = await fleet.list_rollouts(product_id, state="running,aborted")
    assert [v.record.id for v in listed] == [good.record.id, bad.record.id]
    assert await fleet.list_rollouts(product_id, state=["completed"]) == []
    with pytest.raises(ValidationError, match=r"unknown rollout state.*'exploded'"):
        await fleet.list_rollouts(product_id, state="running,exploded")


async def test_a_rollout_saved_in_format_1_loads_and_moves_to_rows(store: Store) -> None:
    """state_data as the previous release wrote it (format 1: every device's progress in
    it, a percent plan's devices without an outcome unplaced) loads; its devices keep
    their progress; the next change stores them per device and the state shrinks."""
    clock = Clock()
    fleet, product_id, _ = _fleet_of(store, 30, clock)
    await _upload(fleet, product_id, 2)
    view = await fleet.create_rollout(SYSTEM_ACTOR, product_id,
                                      {"version": 2, "phases": "50,100", "force": True})
    rid = view.record.id
    first = sorted(view.rollout.members(0))
    old_state = {k: v for k, v in view.rollout.to_dict().items()
                 if k not in ("tally", "uncounted", "targets")}  # format 2's own keys
    old_state.update({"v": 1, "devices": {first[0]: [0, "downloading", 0, 0, clock.now]}})
    with store.write() as tx:  # as the old release left it: rows only for touched devices
        tx.conn.execute(sa.delete(schema.rollout_device_outcomes)
                        .where(schema.rollout_device_outcomes.c.device_id != first[0]))
        tx.conn.execute(sa.update(schema.rollouts).where(schema.rollouts.c.id == rid)
                        .values(state_data=old_state))
    shown = await fleet.get_rollout(product_id, rid)
    assert shown.to_dict()["counts"]["downloading"] == 1
    assert shown.to_dict()["counts"]["total"] == 30
    decision = await fleet.rollout_offer_decision(product_id, rid, first[0])
    assert decision.verdict is Verdict.IN_FLIGHT
    clock.now += 1000
    await fleet.record_rollout_outcome(product_id, rid, first[0], "rebooting")
    with store.read() as tx:
        q = RolloutQueries(tx.conn)
        record = q.get_rollout(product_id, rid)
        rows = q.device_outcomes(rid)
    assert record is not None and record.state_data["v"] == 2
    assert "devices" not in record.state_data
    assert len(rows) == 30  # every target placed and stored per device
    assert {r.device_id: r.outcome for r in rows}[first[0]] == "rebooting"


def _full_only(fleet: Fleet) -> Fleet:
    """The fleet with light changes turned off: every change loads the whole rollout."""
    fleet._light_machine = lambda *args, **kwargs: None  # type: ignore[method-assign]
    return fleet


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_light_changes_decide_exactly_as_full_loads(
    store: Store, tmp_path: Path, seed: int
) -> None:
    """The same random history (outcomes, claims, ticks, devices joining and leaving) on
    two stores, one with light changes and one loading every change in full, ends in the
    same state, rows, events and counts: whatever a light machine could not decide
    exactly it handed to a full load."""
    print(f"seed {seed}")
    rng = random.Random(seed)
    other = Store.open_dir(tmp_path / "full", pool_size=2)
    try:
        clocks = (Clock(), Clock())
        fleets = [_fleet_of(store, 120, clocks[0]), _fleet_of(other, 120, clocks[1])]
        _full_only(fleets[1][0])
        light_fleet = fleets[0][0]
        restores = light_fleet._light_machine
        light_used: list[bool] = []

        def counted(*args: object, **kwargs: object) -> object:
            machine = restores(*args, **kwargs)  # type: ignore[arg-type]
            light_used.append(machine is not None)
            return machine

        light_fleet._light_machine = counted  # type: ignore[method-assign,assignment]
        spec = {"version": 2, "phases": "10,40,100", "max_failure_percent": 30,
                "min_sample": 6, "on_failure": "pause", "backoff_failures": 2,
                "success_percent": 50,
                "backoff_minutes": 5, "max_per_minute": 8, "force": True}
        for fleet, product_id, _ in fleets:
            await _upload(fleet, product_id, 2)
            view = await fleet.create_rollout(SYSTEM_ACTOR, product_id, spec)
        devices = fleets[0][2]
        first = sorted(view.rollout.members(0))  # the same in both (same ids, same hash)
        outcomes = ["downloading", "rebooting", "succeeded", "succeeded", "rolled_back",
                    "download_failed"]
        for step in range(250):
            roll = rng.random()
            device = rng.choice(first if rng.random() < 0.6 else devices)
            outcome = rng.choice(outcomes)
            later = rng.choice([1000, 60_000, 400_000])
            results = []
            for (fleet, product_id, _), clock, db in zip(fleets, clocks, (store, other),
                                                        strict=True):
                if roll < 0.05:
                    clock.now += later
                    results.append((await fleet.tick_rollout(product_id, 1)).to_dict())
                elif roll < 0.08:  # a device joins (placed at the tick that follows)
                    new_id = f"{10_000 + step:024x}"
                    with db.write() as tx:
                        tx.insert_device(new_id, product_id, 0)
                        tx.update_device(new_id, {"firmware_version": 1}, 0)
                    results.append((await fleet.tick_rollout(product_id, 1)).to_dict())
                elif roll < 0.1:  # an operator resumes (a pause by the threshold)
                    try:
                        view = await fleet.resume_rollout(SYSTEM_ACTOR, product_id, 1)
                    except RolloutConflictError as exc:
                        results.append(str(exc))
                    else:
                        results.append(view.to_dict())
                elif roll < 0.5:
                    claim = fleet.claim_rollout_offer_work(product_id, 1, device)
                    results.append(await fleet.run_write(claim))
                else:
                    try:
                        view = await fleet.record_rollout_outcome(
                            product_id, 1, device, outcome)
                    except RolloutOutcomeError as exc:
                        results.append(str(exc))
                    else:
                        results.append(view.to_dict())
            light, full = results
            if isinstance(light, dict) and isinstance(full, dict):
                for key in ("updated_at",):
                    light.pop(key), full.pop(key)
            assert light == full, (seed, step)
        with store.read() as a, other.read() as b:
            assert (RolloutQueries(a.conn).device_outcomes(1)
                    == RolloutQueries(b.conn).device_outcomes(1))
            state_a = RolloutQueries(a.conn).get_rollout(fleets[0][1], 1)
            state_b = RolloutQueries(b.conn).get_rollout(fleets[1][1], 1)
            assert state_a is not None and state_b is not None
            assert state_a.state == state_b.state
            kinds = {e.kind for e in RolloutQueries(a.conn).rollout_events(1)}
        # The history went light most of the time, and decided phases or thresholds too
        # (a light machine hands those to a full load).
        assert sum(light_used) > 100, light_used
        assert kinds & {"phase_advanced", "threshold_crossed", "paused"}, kinds
    finally:
        other.close()


async def test_offer_decision_outside_a_full_count_phase_reads_no_target_set(
    store: Store
) -> None:
    clock = Clock()
    fleet, product_id, devices = _fleet_of(store, 300, clock)
    await _upload(fleet, product_id, 2)
    view = await fleet.create_rollout(SYSTEM_ACTOR, product_id,
                                      {"version": 2, "phases": "#5,#20,all", "force": True})
    rid = view.record.id
    first = set(view.rollout.members(0))
    outside = next(d for d in devices if d not in first)
    with watching(store) as asked:
        decision = await fleet.rollout_offer_decision(product_id, rid, outside)
    assert decision.verdict is Verdict.PHASE_NOT_OPEN and decision.phase is None
    assert not asked.reads_product_devices()  # phase 1 holds its 5: nobody else fits
    # A phase 1 device leaves (deleted): a place is free, found at the next full load.
    with store.write() as tx:
        tx.delete_device(sorted(first)[0])
    await fleet.tick_rollout(product_id, rid)
    shown = await fleet.get_rollout(product_id, rid)
    assert len(shown.rollout.members(0)) == 5
    newcomer = (set(shown.rollout.members(0)) - first).pop()
    assert (await fleet.rollout_offer_decision(product_id, rid, newcomer)).allowed
