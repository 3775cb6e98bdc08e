"""Offers obey rollouts (issue 15), over real TLS 1.3 / DTLS 1.2 sockets and a real SQLite
file: no offer outside a maintenance window and one as it opens; a transfer in progress
when the window closes finishes; an abort cancels a transfer mid-download; a session of a
product with an active rollout costs one store read more, one without none; the periodic
tick starts a scheduled rollout by time alone (trio's MockClock); and ``ota module create
--emulated-self-test fail`` makes firmware emulated devices roll back from."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from otacore.device import read_test_behaviour
from otacore.errors import ValidationError
from otacore.protocol.link import Transport
from otacore.transfer import RetransmitPolicy, TransferStatus
from server.devices.transfer_run import rollout_failure
from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.fleet.rollouts import ROLLOUT_PRODUCTS_MAX_AGE
from server.rollout_ticks import RolloutTicker
from server.store import Store
from server.store.tx_rollouts import RolloutQueries
from tests.test_ota_e2e_kit import (
    STEP,
    SYSTEM_5003,
    TRANSPORTS,
    OtaRig,
    app,
    flash_statuses,
    ota_rig,
    product_version,
    running,
    updated_to,
)
from tests.test_ota_e2e_stale import hold_at_halfway

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
MIN_MS = 60_000
CHUNK = 1024
#: The bus events a rollout's creation publishes (started, phase_started).
CREATION_EVENTS = 2


class FakeWallClock:
    """The fleet's wall clock (epoch ms), frozen where a test puts it."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def _two_am_today() -> int:
    """Today's 02:00 UTC (epoch ms): today's opening of a ``0 2 * * *`` UTC window."""
    real = int(time.time() * 1000)
    return real - real % DAY_MS + 2 * HOUR_MS


async def _outcomes(rig: OtaRig, rollout_id: int) -> dict[str, str | None]:
    """Device -> its outcome in the rollout (rows without one are only placements)."""
    store = rig.kit.handle.store

    def read() -> dict[str, str | None]:
        with store.read() as tx:
            return {o.device_id: o.outcome
                    for o in RolloutQueries(tx.conn).device_outcomes(rollout_id)
                    if o.outcome is not None}

    return await trio.to_thread.run_sync(read)


async def _v1_fleet_and_v2(rig: OtaRig, size: int = 12_000) -> bytes:
    """v1 released to the product default (the emulated devices run it); v2 uploaded."""
    await rig.upload_device_os(SYSTEM_5003)
    await rig.upload(1, app(1))
    await rig.release(1, product_default=True)
    v2 = app(2, size=size)
    await rig.upload(2, v2)
    return v2


async def _create(rig: OtaRig, **fields: object) -> int:
    view = await rig.kit.handle.fleet.create_rollout(
        SYSTEM_ACTOR, rig.product, {"version": 2, "force": True, **fields})
    return view.record.id


async def _engine_settled(rig: OtaRig, device_id: str, rollout_events: int) -> None:
    """Every rollout event so far handled by the engine (its kicks asked) and every check
    they caused finished: what the engine has not offered by then it does not offer."""
    with trio.fail_after(STEP):
        await rig.engine.rollout_events_handled.reached(rollout_events)
    await rig.engine_done(device_id, releases=1)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_no_offer_outside_the_window_and_one_as_it_opens(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await _v1_fleet_and_v2(rig)
        opening = _two_am_today()
        clock = FakeWallClock(opening - 1000)  # one second before the window opens
        rig.kit.handle.fleet.clock = clock
        await rig.kit.handle.fleet.set_window(SYSTEM_ACTOR, rig.product, cron="0 2 * * *",
                                              duration=60, timezone="UTC")
        fleet = rig.fleet([(device_id, transport)], firmware=(SYSTEM_5003, app(1)))
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            rollout_id = await _create(rig)
            await _engine_settled(rig, device_id, CREATION_EVENTS)
            # Outside the window: nothing offered, nothing started; the updater waits
            # for the opening (the decision's retry_at) on the frozen clock.
            assert await _outcomes(rig, rollout_id) == {}
            assert flash_statuses(rig.events, device_id) == []
            assert rig.engine.updaters[device_id].rollout_retry_at == opening
            clock.now = opening  # the window opens: the updater asks again by itself
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for("spark/flash/status", device_id, "success")
        assert (await _outcomes(rig, rollout_id))[device_id] == "succeeded"
        shown = (await rig.kit.handle.fleet.get_rollout(rig.product, rollout_id)).to_dict()
        assert shown["state"] == "completed" and shown["counts"]["succeeded"] == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_transfer_in_progress_when_the_window_closes_finishes(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        patient = RetransmitPolicy(initial_rto=2.0, min_rto=2.0, max_rto=8.0, max_rounds=8)
        rig.tune_engine(tcp_chunk_size=CHUNK, udp_chunk_size=CHUNK, window_limit=4,
                        progress_step=4096, transfer_policy=patient)
        v2 = await _v1_fleet_and_v2(rig, size=48_000)
        opening = _two_am_today()
        clock = FakeWallClock(opening + 30_000)  # inside a one-minute window
        rig.kit.handle.fleet.clock = clock
        await rig.kit.handle.fleet.set_window(SYSTEM_ACTOR, rig.product, cron="0 2 * * *",
                                              duration=1, timezone="UTC")
        fleet = rig.fleet([(device_id, transport)], firmware=(SYSTEM_5003, app(1)),
                          ota_chunk_size=CHUNK)
        fleet.open()
        link, halfway, _ = hold_at_halfway(fleet, device_id, v2)
        async with running(fleet):
            rollout_id = await _create(rig)
            with trio.fail_after(STEP):
                await halfway.wait()
            clock.now = opening + 5 * MIN_MS  # the window closed mid-transfer
            updater = rig.engine.updaters[device_id]
            updater.kick()  # the transfer asks whether it still serves the target
            with trio.fail_after(STEP):
                while updater.recheck_asked:  # taken up by the transfer's staleness check
                    await trio.sleep(0.01)
            link.let_go()
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for("spark/flash/status", device_id, "success")
        assert "failed" not in flash_statuses(rig.events, device_id)
        assert (await _outcomes(rig, rollout_id))[device_id] == "succeeded"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_abort_cancels_a_transfer_mid_download(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        patient = RetransmitPolicy(initial_rto=2.0, min_rto=2.0, max_rto=8.0, max_rounds=8)
        rig.tune_engine(tcp_chunk_size=CHUNK, udp_chunk_size=CHUNK, window_limit=4,
                        progress_step=4096, transfer_policy=patient)
        v2 = await _v1_fleet_and_v2(rig, size=48_000)
        fleet = rig.fleet([(device_id, transport)], firmware=(SYSTEM_5003, app(1)),
                          ota_chunk_size=CHUNK)
        fleet.open()
        link, halfway, watched = hold_at_halfway(fleet, device_id, v2)
        async with running(fleet):
            rollout_id = await _create(rig)
            with trio.fail_after(STEP):
                await halfway.wait()
            view = await rig.kit.handle.fleet.abort_rollout(SYSTEM_ACTOR, rig.product,
                                                            rollout_id, "bad build")
            assert view.to_dict()["state"] == "aborted"
            # The engine cancels the transfer before the device hears any more.
            await rig.events.wait_for("spark/flash/status", device_id, "failed")
            link.let_go()
            await _engine_settled(rig, device_id, CREATION_EVENTS + 1)
            assert product_version(fleet, device_id) == 1
        assert flash_statuses(rig.events, device_id) == ["started", "failed"]
        assert watched.restarts == 1  # one download, cut; never offered again
        # Discarded on the server's word: not counted as the device's failure.
        assert (await _outcomes(rig, rollout_id))[device_id] in ("offered", "downloading")


def test_transfer_failures_are_counted_by_kind() -> None:
    assert rollout_failure(TransferStatus.REJECTED) == "image_refused"
    assert rollout_failure(TransferStatus.INVALID_MODULE) == "image_refused"
    assert rollout_failure(TransferStatus.TIMEOUT) == "download_failed"
    assert rollout_failure(TransferStatus.REFUSED) == "download_failed"


async def test_a_session_pays_one_read_for_an_active_rollout_and_none_without(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await _v1_fleet_and_v2(rig)
        fleet_service = rig.kit.handle.fleet
        fleet = rig.fleet([(device_id, "tcp")], firmware=(SYSTEM_5003, app(1)))
        read = "RolloutService.rollout_offer.<locals>.work"
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            await rig.engine_done(device_id, releases=1)
            before = Counter(fleet_service.round_trips.by_name)
            await rig.reconnect(fleet, device_id)
            await rig.engine_done(device_id, releases=1)
            assert fleet_service.round_trips.by_name[read] == before[read]  # none
            # A rollout held outside its window: one read per session, no offer.
            fleet_service.clock = FakeWallClock(_two_am_today() - HOUR_MS)
            await fleet_service.set_window(SYSTEM_ACTOR, rig.product, cron="0 2 * * *",
                                           duration=60, timezone="UTC")
            rollout_id = await _create(rig)
            await _engine_settled(rig, device_id, CREATION_EVENTS)
            before = Counter(fleet_service.round_trips.by_name)
            await rig.reconnect(fleet, device_id)
            await rig.engine_done(device_id, releases=1)
            assert fleet_service.round_trips.by_name[read] == before[read] + 1
            assert await _outcomes(rig, rollout_id) == {}


async def test_the_periodic_tick_starts_a_scheduled_rollout(
    store: Store, make_firmware: Callable[..., bytes], mock_clock: MockClock
) -> None:
    base_ms = 1_780_000_000_000
    # Read from the store's worker threads too: the mock clock's own reading is plain data.
    fleet = Fleet(store, EventBus(),
                  clock=lambda: base_ms + int(mock_clock.current_time() * 1000))
    with store.write() as tx:
        product = tx.insert_product(slug="sensors", name="Sensors", platform_id=13,
                                    description="", now=1)
        for i in range(1, 5):
            tx.insert_device(f"{i:024x}", product.id, 1)
            tx.update_device(f"{i:024x}", {"firmware_version": 1}, 1)
    await fleet.upload_firmware(SYSTEM_ACTOR, "sensors", make_firmware(2), version=2,
                                title="v2")
    start_at = fleet.clock() + 10 * MIN_MS
    view = await fleet.create_rollout(SYSTEM_ACTOR, "sensors",
                                      {"version": 2, "force": True, "start_at": start_at})
    assert view.state.value == "scheduled"
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValidationError, match="positive number of seconds"):
            RolloutTicker(fleet, bad)
    ticker = RolloutTicker(fleet, 60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(ticker.run)
        await ticker.ticks.reached(1)  # the first tick, at once: not due yet
        assert (await fleet.get_rollout("sensors", view.record.id)).state.value == "scheduled"
        mock_clock.jump(9 * 60)  # nine minutes on: ticks keep finding it not due
        await ticker.ticks.reached(2)
        assert (await fleet.get_rollout("sensors", view.record.id)).state.value == "scheduled"
        mock_clock.jump(61)  # past its start: the next tick starts it, nobody else acts
        await ticker.ticks.reached(3)
        shown = (await fleet.get_rollout("sensors", view.record.id)).to_dict()
        assert shown["state"] == "running"
        assert [e["kind"] for e in shown["events"]][-2:] == ["started", "phase_started"]
        nursery.cancel_scope.cancel()
    assert await fleet.rollouts_may_steer(product.id)


def _ota(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli.main", *args],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))


def test_module_create_emulated_self_test_fail_embeds_the_rollback_marker(
    tmp_path: Path
) -> None:
    raw = tmp_path / "app.raw"
    raw.write_bytes(bytes(range(256)) * 20)
    common = ["--platform-id", "13", "--version", "6", "--product-version", "2"]
    failing, passing = tmp_path / "fail.bin", tmp_path / "pass.bin"
    out = _ota("module", "create", str(raw), str(failing), *common,
               "--emulated-self-test", "fail")
    assert out.returncode == 0, out.stderr
    behaviour = read_test_behaviour(failing.read_bytes())
    assert behaviour is not None and behaviour.selftest_fail_after == 0
    assert _ota("module", "create", str(raw), str(passing), *common).returncode == 0
    plain = read_test_behaviour(passing.read_bytes())
    assert plain is None or plain.selftest_fail_after is None
    bad = _ota("module", "create", str(raw), str(tmp_path / "x.bin"), *common,
               "--emulated-self-test", "maybe")
    assert bad.returncode == 1 and "must be pass or fail" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x.bin").exists()


async def test_a_process_that_does_not_tick_learns_of_another_processs_rollout(
    store: Store, make_firmware: Callable[..., bytes], mock_clock: MockClock
) -> None:
    """Two fleets over one store stand for two server processes: the worker (which does
    not tick) knows of the main process's new rollout from its relayed event at once, or
    else within ROLLOUT_PRODUCTS_MAX_AGE; it never reads the store for it per session."""
    main, worker = Fleet(store, EventBus()), Fleet(store, EventBus())
    with store.write() as tx:
        product = tx.insert_product(slug="sensors", name="Sensors", platform_id=13,
                                    description="", now=1)
        tx.insert_device(f"{1:024x}", product.id, 1)
        tx.update_device(f"{1:024x}", {"firmware_version": 1}, 1)
    await main.upload_firmware(SYSTEM_ACTOR, "sensors", make_firmware(2), version=2,
                               title="v2")
    assert not await worker.rollouts_may_steer(product.id)  # one read: none active
    reads = worker.round_trips.reads
    await main.create_rollout(SYSTEM_ACTOR, "sensors", {"version": 2, "force": True})
    assert not await worker.rollouts_may_steer(product.id)  # the event missed: not yet
    assert worker.round_trips.reads == reads  # ... and no read per ask
    mock_clock.jump(ROLLOUT_PRODUCTS_MAX_AGE + 1)
    assert await worker.rollouts_may_steer(product.id)  # refreshed once, now known
    assert worker.round_trips.reads == reads + 1
    other = Fleet(store, EventBus())
    assert await other.rollouts_may_steer(product.id)
    other.note_rollout_product(product.id, active=False)  # e.g. it completed meanwhile
    assert not await other.rollouts_may_steer(product.id)
    other.note_rollout_product(product.id)  # a relayed rollout event: known at once
    assert await other.rollouts_may_steer(product.id)
