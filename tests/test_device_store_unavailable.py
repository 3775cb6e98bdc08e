"""Devices that connect while the store cannot write are told to come back later.

The store being away (a database restart or cut, an SQLite file locked past its busy
timeout) is not the device's fault:

* a Hello whose write fails is answered 5.03 Service Unavailable with a Max-Age (RFC 7252
  section 5.9.3.4), not 4.03 Forbidden, which says the device itself was refused;
* a device the server has seen before gets through its handshake (authorizing it only
  reads), and the session's first write (its presence) fails: the session ends as "store
  unavailable", logged as a refusal, not as a handler failure with a traceback;
* a certificate never seen before must be remembered (a write) before its device may go on:
  it is refused at the handshake as "store unavailable", counted and logged as one
  aggregated warning per burst, not as a traceback per device.

Either way the device reconnects by its back-off and is served once the store writes again.
The store is made unavailable for real: another connection holds the SQLite file's write
lock (``BEGIN IMMEDIATE``), and the server's busy timeout is short for these tests, so its
writes fail with "database is locked".
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from otacore.coap import Code, OptionNumber, decode_udp
from otacore.device.emulated import EmulatedDevice
from otacore.protocol.link import Transport
from server.devices.device_requests import STORE_RETRY_AFTER
from server.emulator.fleet import EmulatedFleet
from server.store import sqlite as sqlite_store
from server.store.store import DB_FILENAME
from server.transport.session import CloseReason
from server.transport.session_host import RefuseReason, TransportStats
from tests.test_ota_e2e_kit import STEP, TRANSPORTS, OtaRig, ota_rig, running


@pytest.fixture(autouse=True)
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # Read when each store connection opens (PRAGMA busy_timeout): short for this server.
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 200)


@contextmanager
def write_lock(database: Path) -> Iterator[sqlite3.Connection]:
    """Hold the SQLite file's write lock (until rolled back or closed)."""
    conn = sqlite3.connect(database, timeout=STEP, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
    finally:
        conn.close()


def note_disconnects(device: EmulatedDevice) -> list[str]:
    """Why the device's sessions ended, in order."""
    reasons: list[str] = []
    disconnect = device._disconnect

    def noted(reason: str) -> None:
        reasons.append(reason)
        disconnect(reason)

    device._disconnect = noted  # type: ignore[method-assign]
    return reasons


def note_max_ages(device: EmulatedDevice) -> list[int | None]:
    """The Max-Age of every 5.03 a UDP device hears (one CoAP message per datagram)."""
    max_ages: list[int | None] = []
    hear = device.receive

    def receive(data: bytes, now: float) -> None:
        message = decode_udp(data)
        if message.code == Code.SERVICE_UNAVAILABLE:
            max_ages.append(message.uint_option(OptionNumber.MAX_AGE))
        hear(data, now)

    device.receive = receive  # type: ignore[method-assign]
    return max_ages


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_hello_whose_write_fails_gets_5_03_and_the_device_comes_back(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        fleet = rig.fleet([(device_id, transport)])
        fleet.open()  # makes the runners (blocking file I/O, before any session)
        device = fleet.device(device_id).device
        reasons = note_disconnects(device)
        max_ages = note_max_ages(device) if transport == "udp" else []
        server_fleet = rig.kit.handle.fleet
        device_online = server_fleet.device_online
        locks: list[sqlite3.Connection] = []

        async def online_then_locked(*args: Any, **kwargs: Any) -> Any:
            # The session's presence is written; the store goes away before its Hello.
            result = await device_online(*args, **kwargs)
            if not locks:
                conn = sqlite3.connect(rig.kit.data_dir / DB_FILENAME, timeout=STEP,
                                       isolation_level=None)
                conn.execute("BEGIN IMMEDIATE")
                locks.append(conn)
            return result

        monkeypatch.setattr(server_fleet, "device_online", online_then_locked)
        try:
            async with running(fleet):
                with trio.fail_after(STEP):
                    while not any("Hello" in reason for reason in reasons):
                        await trio.sleep(0.01)
                print("device:", reasons)
                assert "the server answered Hello with 5.03" in reasons[0], reasons
                assert fleet.summary().online == 0
                locks[0].rollback()  # the store writes again
                await fleet.wait_until(lambda f: f.summary().online == 1, timeout=STEP)
        finally:
            for conn in locks:
                conn.close()
        assert all("4.03" not in reason for reason in reasons), reasons
        if transport == "udp":
            assert max_ages and set(max_ages) == {STORE_RETRY_AFTER}, max_ages


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_session_whose_presence_write_fails_ends_as_store_unavailable(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        fleet = rig.fleet([(device_id, transport)])
        async with running(fleet):  # once online, the server has seen its certificate
            await fleet.wait_until(lambda f: f.summary().online == 1, timeout=STEP)
        stats = device_server_stats(rig)
        # Power back on: a new session, the store away.
        await turned_away_then_served(rig, fleet, caplog, lambda: stats.closed[
            (transport, CloseReason.STORE_UNAVAILABLE)])


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_new_certificate_while_the_store_is_locked_is_refused_as_store_unavailable(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        fleet = rig.fleet([(device_id, transport)])
        stats = device_server_stats(rig)
        await turned_away_then_served(rig, fleet, caplog, lambda: stats.refused[
            (transport, RefuseReason.STORE_UNAVAILABLE)])


def device_server_stats(rig: OtaRig) -> TransportStats:
    server = rig.kit.handle.device_server
    assert server is not None
    return server.stats


async def turned_away_then_served(rig: OtaRig, fleet: EmulatedFleet,
                                  caplog: pytest.LogCaptureFixture,
                                  turned_away: Callable[[], int]) -> None:
    """Run the fleet while the store is locked until ``turned_away()`` counts a device sent
    away; then unlock: the device is served. The outage was logged as refusals (one line
    per burst), not as handler failures with a traceback."""
    with caplog.at_level(logging.WARNING), write_lock(rig.kit.data_dir / DB_FILENAME) as lock:
        async with running(fleet):
            with trio.fail_after(STEP):
                while turned_away() < 1:
                    await trio.sleep(0.01)
            assert fleet.summary().online == 0
            lock.rollback()
            await fleet.wait_until(lambda f: f.summary().online == 1, timeout=STEP)
    tracebacks = [r for r in caplog.records if r.exc_info and r.name.startswith("otacloud")]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
    assert any("store unavailable" in r.getMessage() for r in caplog.records)
