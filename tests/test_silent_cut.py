"""A silent network cut between devices and the server (coverage lost, a NAT binding
expired): no FIN, no RST, no close_notify, just nothing, over TLS 1.3 and DTLS 1.2.

Emulated devices reach a real in-process server through :class:`SilentRelay` (real
sockets). The server must find a silent device out by its idle timeout
(``sessions.idle_timeout``, short here through the real settings), mark it offline once and
keep nothing of its session; the device must find the dead path out by its unanswered
keep-alive pings and, once the path is back, come online again in one new session. Mid-
download, the device resumes from the chunks it holds. A NAT rebinding (the device's
datagrams suddenly from a new port) cannot be followed by DTLS 1.2 without connection ids
(RFC 9146; OpenSSL has none): the device handshakes again and the old session is closed,
not counted twice.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from otacore.protocol.link import Transport
from otacore.transfer import RetransmitPolicy
from server import metrics
from server.emulator.fleet import EmulatedFleet
from server.fleet.deltas import RELEASE_BYTES_EVENT
from server.transport.limits import SessionLimits
from server.transport.session import CloseReason, DeviceSession
from server.transport.session_registry import SessionRegistry
from tests.silent_relay import SilentRelay
from tests.test_ota_e2e_kit import (
    STEP,
    SYSTEM_5003,
    TRANSPORTS,
    OtaRig,
    WatchedFlash,
    app,
    flash_statuses,
    ota_rig,
    running,
    updated_to,
)

#: The server closes a session this long after the device was last heard (seconds).
IDLE = 3.0
#: Devices ping after this much silence and give up on a ping unanswered this long: they
#: find a dead path out in about 3 s, and keep a live session open (IDLE > interval).
KEEPALIVE = {"keepalive_interval": 1.0, "keepalive_timeout": 2.0}
#: How long a test waits for what takes about IDLE (slack for two busy cores).
SLOW_STEP = STEP + IDLE
STATUS = "spark/status"
CHUNK = 1024
SMALL_WINDOWS = {
    "tcp_chunk_size": CHUNK,
    "udp_chunk_size": CHUNK,
    "window_limit": 4,
    "progress_step": 16 * 1024,
}
#: The transfer's retransmission timers: probes every second at most, for a minute.
PROBING = RetransmitPolicy(initial_rto=0.5, min_rto=0.5, max_rto=1.0, max_rounds=60)


@asynccontextmanager
async def cut_rig(nursery: trio.Nursery, tmp_path: Path, count: int = 1, idle: float = IDLE
                  ) -> AsyncIterator[tuple[OtaRig, SilentRelay]]:
    """The server (idle timeout ``idle``) with ``count`` devices, and a relay in front."""
    async with ota_rig(nursery, tmp_path, count=count,
                       device_limits=SessionLimits(idle_timeout=idle)) as rig:
        relay: SilentRelay = await nursery.start(SilentRelay(rig.kit.tcp, rig.kit.udp).run)
        yield rig, relay


async def release_probed_v2(rig: OtaRig) -> bytes:
    """Release a 200 KB v2 to the product, sent in small windows whose sender probes a
    silent device (PROBING); returns the image."""
    rig.tune_engine(**SMALL_WINDOWS, transfer_policy=PROBING)
    v2 = app(2, size=200 * 1024)
    await rig.upload_device_os(SYSTEM_5003)
    await rig.upload(2, v2)
    await rig.release(2, product_default=True)
    return v2


def registry_of(rig: OtaRig) -> SessionRegistry:
    server = rig.kit.handle.device_server
    assert server is not None
    return server.registry


def fleet_through(rig: OtaRig, relay: SilentRelay, devices: list[tuple[str, Transport]],
                  **settings: Any) -> EmulatedFleet:
    """Devices that reach the server through the relay, with short keep-alive timers."""
    return rig.fleet(devices, server=relay.tcp_address, udp_server=relay.udp_address,
                     **{**KEEPALIVE, **settings})


def sessions_gauge(transport: str) -> float:
    """``ota_sessions{transport}`` of this process (other tests' servers may add to it:
    compare differences)."""
    value = metrics.REGISTRY.get_sample_value("ota_sessions", {"transport": transport})
    return value or 0.0


async def wait_ended(rig: OtaRig, transport: str, reason: str, count: int = 1) -> None:
    """Return once ``count`` sessions closed for ``reason`` have run their end (the
    handler's finish, the farewell, the connection's count)."""
    server = rig.kit.handle.device_server
    assert server is not None
    with trio.fail_after(SLOW_STEP):
        while server.host.stats.closed[(transport, reason)] < count:
            await trio.sleep(0.02)


def statuses(rig: OtaRig, device_id: str) -> list[str]:
    """The device's ``spark/status`` data, in order."""
    return [(d or "").strip() for d in rig.events.named(STATUS, device_id)]


async def wait_session(registry: SessionRegistry, device_id: str,
                       check: Any, timeout: float = SLOW_STEP) -> DeviceSession | None:
    """Poll the registry until ``check(session or None)`` holds; return the session."""
    with trio.fail_after(timeout):
        while not check(registry.get(device_id)):
            await trio.sleep(0.02)
    return registry.get(device_id)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_idle_session_whose_path_dies_is_closed_once_and_the_device_comes_back(
        nursery: trio.Nursery, tmp_path: Path, transport: Transport) -> None:
    async with cut_rig(nursery, tmp_path) as (rig, relay):
        (device_id,) = rig.ids
        registry = registry_of(rig)
        fleet = fleet_through(rig, relay, [(device_id, transport)])
        async with running(fleet):
            device = fleet.device(device_id).device
            await rig.wait_device(device_id, lambda d: d["online"])
            first = registry.get(device_id)
            assert first is not None
            await rig.events.wait_for(STATUS, device_id, "online")
            sessions, live, gauge = device.sessions, len(registry), sessions_gauge(transport)
            relay.cut()
            cut_at = trio.current_time()
            await wait_session(registry, device_id, lambda s: s is None)
            # Closed by its idle timeout (nothing else can reach the server), once the
            # device had been silent for IDLE: it was heard at most a keep-alive interval
            # before the cut.
            assert first.close_reason == CloseReason.IDLE
            assert trio.current_time() - cut_at >= IDLE - KEEPALIVE["keepalive_interval"]
            await rig.wait_device(device_id, lambda d: not d["online"])
            await rig.events.wait_for(STATUS, device_id, "offline")
            # Nothing of the session is left: registry, gauge, updater, connection, peer.
            await wait_ended(rig, transport, CloseReason.IDLE)
            assert len(registry) == live - 1
            assert sessions_gauge(transport) == gauge - 1
            assert rig.engine.updaters == {}
            server = rig.kit.handle.device_server
            assert server is not None and server.udp_endpoint is not None
            assert server.host.live[transport] == 0
            assert server.udp_endpoint.peers == {}
            # The device found the dead path out by its unanswered ping, and cannot
            # connect while it stays dead.
            await fleet.wait_until(lambda f: not device.online, timeout=SLOW_STEP)
            assert "keep-alive" in device.last_error, device.last_error
            assert device.sessions == sessions

            relay.restore()
            await fleet.wait_until(lambda f: device.online, timeout=SLOW_STEP)
            second = await wait_session(registry, device_id, lambda s: s is not None)
            await rig.wait_device(device_id, lambda d: d["online"])
            await rig.events.wait_for(STATUS, device_id, "online", count=2)
            await rig.events.catch_up(rig.kit.handle.bus, rig.product)
            assert second is not first and not second.closed
            assert device.sessions == sessions + 1  # one new session, not one per attempt
            assert statuses(rig, device_id) == ["online", "offline", "online"]
            assert len(registry) == live
            assert sessions_gauge(transport) == gauge


async def release_progress(rig: OtaRig, version: int) -> dict[str, Any]:
    response = await rig.api.get(f"/v1/products/{rig.product}/firmware/{version}/progress")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def assert_counted_once(rig: OtaRig, device_id: str, size: int) -> None:
    """The release's byte counters took the device's transfer once, the whole image
    (whatever the sessions it took), and no more than it (a resumed transfer sends the
    rest, not the image again)."""
    await rig.events.wait_for(RELEASE_BYTES_EVENT, device_id)
    await rig.events.catch_up(rig.kit.handle.bus, rig.product)
    counted = [json.loads(d or "{}") for d in rig.events.named(RELEASE_BYTES_EVENT, device_id)]
    assert len(counted) == 1, counted
    (bytes_event,) = counted
    assert bytes_event["bytes_full_image"] == bytes_event["release_bytes_full_images"] == size
    assert 0 < bytes_event["bytes_sent"] <= size, bytes_event


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_download_whose_path_dies_resumes_from_the_chunks_held(
        nursery: trio.Nursery, tmp_path: Path, transport: Transport) -> None:
    """Halfway through a 200 KB image the path dies: the server finds the device out by
    its idle timeout (its transfer's retransmissions to a silent device do not keep the
    session), the release shows the device offline mid-update; once the path is back the
    device resumes where it was and the release counts it updated, once."""
    async with cut_rig(nursery, tmp_path) as (rig, relay):
        (device_id,) = rig.ids
        registry = registry_of(rig)
        # As in production (max_rto 30 s, idle_timeout 120 s), the sender probes a silent
        # device more often than the idle timeout, and for longer than it.
        v2 = await release_probed_v2(rig)
        fleet = fleet_through(rig, relay, [(device_id, transport)], ota_chunk_size=CHUNK)
        cut: list[float] = []

        def cut_now(_: int) -> None:
            relay.cut()
            cut.append(trio.current_time())

        watched = WatchedFlash.install(fleet, device_id, marks=[len(v2) // 2], on_mark=cut_now)
        async with running(fleet):
            device = fleet.device(device_id).device
            await rig.wait_device(device_id, lambda d: d["online"])
            first = registry.get(device_id)
            assert first is not None
            await fleet.wait_until(lambda f: bool(cut), timeout=SLOW_STEP)
            await wait_session(registry, device_id, lambda s: s is None)
            assert first.close_reason == CloseReason.IDLE
            await rig.wait_device(device_id, lambda d: not d["online"])
            await fleet.wait_until(lambda f: not device.online, timeout=SLOW_STEP)
            assert "keep-alive" in device.last_error, device.last_error
            held = watched.written
            assert held < len(v2)
            progress = await release_progress(rig, 2)
            assert (progress["updated"], progress["updating"], progress["failed"]) == (0, 1, 0)
            assert [d["online"] for d in progress["updating_devices"]] == [False]

            # Back through a NAT that forgot the device: a new source port over UDP.
            relay.restore(rebind=True)
            await fleet.wait_until(updated_to(device_id, 2), timeout=SLOW_STEP)
            await rig.events.wait_for("spark/flash/status", device_id, "success")
        # Resumed, not started over: one download from zero, and at most a few windows
        # of chunks (in flight at the cut) written twice.
        assert watched.restarts == 1
        assert len(v2) <= watched.written <= len(v2) + 4 * SMALL_WINDOWS["window_limit"] * CHUNK
        assert flash_statuses(rig.events, device_id) == ["started", "success"]
        with trio.fail_after(STEP):
            while True:
                progress = await release_progress(rig, 2)
                if progress["updated"] == 1:
                    break
                await trio.sleep(0.05)
        assert (progress["target"], progress["updated"], progress["updating"],
                progress["failed"]) == (1, 1, 0, 0), progress
        await assert_counted_once(rig, device_id, len(v2))
        assert progress["updating_devices"] == []


async def test_a_nat_rebinding_makes_the_device_handshake_again_and_closes_the_old_session(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """Mid-session, with no gap in time, the device's datagrams start coming from a new
    port (its NAT binding changed). DTLS 1.2 binds a session to the peer's address and has
    no connection id here (RFC 9146; OpenSSL has none), so the server drops them as a
    stranger's; the device's ping goes unanswered, it handshakes again (resuming its DTLS
    session), and that session replaces the old one: one session, one device online.

    The server's idle timeout is long here: the old session must end because the new one
    replaced it, not because it went quiet."""
    async with cut_rig(nursery, tmp_path, idle=60.0) as (rig, relay):
        (device_id,) = rig.ids
        registry = registry_of(rig)
        server = rig.kit.handle.device_server
        assert server is not None and server.udp_endpoint is not None
        stats = server.udp_endpoint.stats
        fleet = fleet_through(rig, relay, [(device_id, "udp")])
        async with running(fleet):
            device = fleet.device(device_id).device
            await rig.wait_device(device_id, lambda d: d["online"])
            await rig.events.wait_for(STATUS, device_id, "online")
            first = registry.get(device_id)
            assert first is not None
            sessions, live, gauge = device.sessions, len(registry), sessions_gauge("udp")
            strangers = sum(stats.dropped.values())

            relay.rebind()
            second = await wait_session(registry, device_id,
                                        lambda s: s is not None and s is not first)
            assert second is not None
            assert first.close_reason == CloseReason.REPLACED
            assert second.peer != first.peer  # from the device's new socket, via the NAT
            assert second.resumed  # an abbreviated handshake (RFC 5246 7.3)
            # The device's records from its new port reached the server and were dropped
            # (not a ClientHello: a stranger's), which is why the device gave up.
            assert sum(stats.dropped.values()) > strangers
            assert "keep-alive" in device.last_error, device.last_error
            await fleet.wait_until(lambda f: device.online, timeout=SLOW_STEP)
            assert device.sessions == sessions + 1
            # The old session's end ran after the new one took the device: no offline
            # event, and no second online one (the device never left).
            await wait_ended(rig, "udp", CloseReason.REPLACED)
            await rig.events.catch_up(rig.kit.handle.bus, rig.product)
            assert statuses(rig, device_id) == ["online"]
            assert (await rig.device(device_id))["online"] is True
            assert len(registry) == live
            assert sessions_gauge("udp") == gauge
            host = server.host
            assert host.live["udp"] == 1  # the new session's connection only
            assert list(server.udp_endpoint.peers) == [second.peer]


async def test_a_nat_rebinding_mid_download_resumes_in_the_new_session(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """Halfway through a download the device's NAT binding changes: its acks reach the
    server from a port no session has, the chunks go to a port that is gone. The device
    hears nothing, handshakes again; the new session replaces the old one (whose transfer
    ends with it) and the download resumes where it was."""
    async with cut_rig(nursery, tmp_path, idle=60.0) as (rig, relay):
        (device_id,) = rig.ids
        registry = registry_of(rig)
        v2 = await release_probed_v2(rig)
        fleet = fleet_through(rig, relay, [(device_id, "udp")], ota_chunk_size=CHUNK)
        watched = WatchedFlash.install(fleet, device_id, marks=[len(v2) // 2],
                                       on_mark=lambda _: relay.rebind())
        async with running(fleet):
            await rig.wait_device(device_id, lambda d: d["online"])
            first = registry.get(device_id)
            assert first is not None
            await fleet.wait_until(updated_to(device_id, 2), timeout=SLOW_STEP)
            await rig.events.wait_for("spark/flash/status", device_id, "success")
            assert relay.stats.rebinds == 1
            assert first.close_reason == CloseReason.REPLACED
        assert watched.restarts == 1
        assert len(v2) <= watched.written <= len(v2) + 4 * SMALL_WINDOWS["window_limit"] * CHUNK
        assert flash_statuses(rig.events, device_id) == ["started", "success"]
        with trio.fail_after(STEP):
            while (progress := await release_progress(rig, 2))["updated"] != 1:
                await trio.sleep(0.05)
        assert (progress["target"], progress["updated"], progress["updating"],
                progress["failed"]) == (1, 1, 0, 0), progress
        await assert_counted_once(rig, device_id, len(v2))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_cut_the_device_finds_out_first_ends_in_one_new_session(
        nursery: trio.Nursery, tmp_path: Path, transport: Transport) -> None:
    """The path dies and comes back before the server's idle timeout (long here), after
    the device gave up on its ping: the device's new session replaces the old one, which
    the server had not closed yet. Over TCP the old connection's last bytes (the ping,
    close_notify) reach the server once the path is back, before or after the new
    session: the old session ends either way, and the device ends online in one
    session, counted once."""
    async with cut_rig(nursery, tmp_path, idle=60.0) as (rig, relay):
        (device_id,) = rig.ids
        registry = registry_of(rig)
        fleet = fleet_through(rig, relay, [(device_id, transport)])
        async with running(fleet):
            device = fleet.device(device_id).device
            await rig.wait_device(device_id, lambda d: d["online"])
            await rig.events.wait_for(STATUS, device_id, "online")
            first = registry.get(device_id)
            assert first is not None
            sessions, live, gauge = device.sessions, len(registry), sessions_gauge(transport)

            relay.cut()
            await fleet.wait_until(lambda f: not device.online, timeout=SLOW_STEP)
            assert "keep-alive" in device.last_error, device.last_error
            assert registry.get(device_id) is first and not first.closed  # none the wiser
            relay.restore()
            second = await wait_session(registry, device_id,
                                        lambda s: s is not None and s is not first)
            assert second is not None
            await fleet.wait_until(lambda f: device.online, timeout=SLOW_STEP)
            # Replaced by the new session, or (TCP) ended by the device's close_notify
            # that the path carried at last, whichever reached the server first.
            reason = first.close_reason
            assert reason in (CloseReason.REPLACED, CloseReason.PEER), reason
            await wait_ended(rig, transport, str(reason))
            await wait_session(registry, device_id, lambda s: s is second)
            await rig.wait_device(device_id, lambda d: d["online"])
            await rig.events.catch_up(rig.kit.handle.bus, rig.product)
            assert device.sessions == sessions + 1
            # Never an "offline" after the new session took the device.
            expected = ["online"] if reason == CloseReason.REPLACED else [
                "online", "offline", "online"]
            assert statuses(rig, device_id) == expected
            assert (await rig.device(device_id))["online"] is True
            assert len(registry) == live
            assert sessions_gauge(transport) == gauge
            assert registry.get(device_id) is second and not second.closed


async def test_a_cut_under_a_fleet_closes_every_session_once_and_all_come_back(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """A cell tower goes down: every device behind the relay goes silent at once, over
    both transports. Each session is closed by its idle timeout, each device marked
    offline once; once the path is back every device is online again, in one session."""
    count = 8
    async with cut_rig(nursery, tmp_path, count=count) as (rig, relay):
        registry = registry_of(rig)
        server = rig.kit.handle.device_server
        assert server is not None
        members: list[tuple[str, Transport]] = [
            (device_id, TRANSPORTS[i % 2]) for i, device_id in enumerate(rig.ids)]
        fleet = fleet_through(rig, relay, members)
        async with running(fleet):
            await fleet.wait_until(lambda f: f.summary().online == count, timeout=SLOW_STEP)
            for device_id in rig.ids:
                await rig.events.wait_for(STATUS, device_id, "online")
            firsts = {device_id: registry.get(device_id) for device_id in rig.ids}
            sessions = {d: fleet.device(d).device.sessions for d in rig.ids}
            live, gauges = len(registry), {t: sessions_gauge(t) for t in TRANSPORTS}

            relay.cut()
            with trio.fail_after(SLOW_STEP):
                while any(registry.get(d) is not None for d in rig.ids):
                    await trio.sleep(0.05)
            assert {s.close_reason for s in firsts.values() if s is not None} == {
                CloseReason.IDLE}
            for transport in TRANSPORTS:
                await wait_ended(rig, transport, CloseReason.IDLE, count=count // 2)
                assert server.host.live[transport] == 0
                assert sessions_gauge(transport) == gauges[transport] - count // 2
            assert len(registry) == live - count
            await fleet.wait_until(lambda f: f.summary().online == 0, timeout=SLOW_STEP)

            relay.restore()
            await fleet.wait_until(lambda f: f.summary().online == count, timeout=SLOW_STEP)
            with trio.fail_after(SLOW_STEP):
                while len(registry) != live:
                    await trio.sleep(0.05)
            for device_id in rig.ids:
                await rig.events.wait_for(STATUS, device_id, "online", count=2)
            await rig.events.catch_up(rig.kit.handle.bus, rig.product)
            for device_id in rig.ids:
                assert statuses(rig, device_id) == ["online", "offline", "online"], device_id
                assert fleet.device(device_id).device.sessions == sessions[device_id] + 1
            assert {t: sessions_gauge(t) for t in TRANSPORTS} == gauges
