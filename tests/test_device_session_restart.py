"""``ota server`` keeps its DTLS device sessions across a graceful restart (issue 14, item 6):
the device plane's handler suspends what the session knows (the Hello, the product, the key
sequence, the Describe, the CoAP message ids) and the next process goes on from it, with no
handshake and no new Hello. Real servers on one data directory and UDP port, a real DTLS
device (trio's, OpenSSL inside)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from otacore.coap import Code, Message, MessageType
from otacore.messages import Dependency, Hello, ModuleDescription
from otacore.protocol.link import RequestReceived
from otacore.signing import TrustStore
from server.app import ServerConfig, ServerHandle, serve
from server.devices.keys import TRUST_FILE, read_trust_file
from server.devices.session import DeviceSessionHandler
from server.devices.suspended import SuspendedSession, SuspendedStateError
from tests.device_client import LinkDevice
from tests.test_device_session_restart_twice import start_first_server
from tests.test_ota_e2e_kit import (
    STEP,
    SYSTEM_5003,
    EventLog,
    OtaRig,
    WatchedFlash,
    app,
    updated_to,
)

PATIENCE = 30


def _modules() -> list[ModuleDescription]:
    return [
        ModuleDescription(4, 1, 5003, 0, 600_000, bytes(range(32)), (Dependency(2, 0, 2001),)),
        ModuleDescription(5, 1, 7, 0, 90_000, bytes(32), (Dependency(4, 1, 5003),)),
    ]


def _handler(handle: ServerHandle, device_id: str) -> DeviceSessionHandler | None:
    assert handle.devices is not None
    handler = handle.devices.live.get(device_id)
    return handler if isinstance(handler, DeviceSessionHandler) else None


async def _until_live(handle: ServerHandle, device_id: str) -> DeviceSessionHandler:
    with trio.fail_after(PATIENCE):
        while (handler := _handler(handle, device_id)) is None:
            await trio.sleep(0.01)
    return handler


async def _server_request_id(handler: DeviceSessionHandler, device: LinkDevice) -> int:
    """Have the server send the device a NON request; the message id it used."""
    handler.notify(Message(MessageType.NON, Code.POST, payload=b"x"))
    handler.flush_now()
    event = await device.wait_for(lambda e: isinstance(e, RequestReceived), timeout=PATIENCE)
    assert isinstance(event, RequestReceived)
    return event.message.message_id


async def test_ota_server_keeps_a_dtls_session_across_a_graceful_restart(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as first_nursery:
        kit = await start_first_server(first_nursery, tmp_path, count=1)
        first, device_id, udp_port = kit.handle, kit.device_ids[0], kit.udp[1]
        device = await LinkDevice.connect(kit.creds_dir, device_id, "udp", kit.udp)
        assert (await device.hello(product_version=7)).code == Code.CHANGED
        assert (await device.describe(_modules())).code == Code.CHANGED
        handler = await _until_live(first, device_id)
        before_id = await _server_request_id(handler, device)
        key_sequence = handler.key_sequence
        # Graceful stop: the session is saved, not closed (no close_notify to the device).
        first.shutdown.set()
    assert first.device_server is not None and first.device_server.udp_endpoint is not None
    assert first.device_server.udp_endpoint.stats.saved == 1
    assert not device.closed

    try:
        async with trio.open_nursery() as second_nursery:
            config = ServerConfig(data_dir=kit.data_dir, api_port=0, device_port=udp_port,
                                  store_threads=4, graceful_timeout=0.5)
            second: ServerHandle = await second_nursery.start(serve, config)
            # The device goes on: no Hello, no handshake.
            assert (await device.publish("temperature", "21")).code == Code.CHANGED
            restored = await _until_live(second, device_id)
            assert second.device_server is not None
            stats = second.device_server.stats
            assert stats.full_handshakes["udp"] + stats.resumed_handshakes["udp"] == 0
            assert second.device_server.udp_endpoint is not None
            assert second.device_server.udp_endpoint.stats.restored == 1
            # What the device said to the first process is known to the second.
            assert restored.hello is not None and restored.hello.product_version == 7
            assert restored.described.is_set()
            assert restored.key_sequence == key_sequence
            assert restored.product_id == kit.product_id
            # RFC 7252 4.4: the message ids go on from the first process's.
            after_id = await _server_request_id(restored, device)
            assert after_id == (before_id + 1) & 0xFFFF
            # The device is online in the store, held by the new process's session.
            view = await second.fleet.target_for_device(device_id)
            assert view.device.online
            second.shutdown.set()
    finally:
        await device.aclose()


@pytest.mark.parametrize("damage", [b"", b"\x93\x01\x02", b"\xff" * 10, b"\x96\x02" + b"\xc0" * 5,
                                    b"\x00" * 4096])
def test_unreadable_saved_state_is_refused_with_a_reason(damage: bytes) -> None:
    with pytest.raises(SuspendedStateError):
        SuspendedSession.from_bytes(damage)


HELLO = Hello(device_id="e00fce68" + "0" * 16, platform_id=13, product_id=13,
              product_version=7, system_version=5003, supports_immediate_updates=True,
              updates_enabled=True, reset_pending=False, max_message_size=1500)


def test_a_saved_state_round_trips() -> None:
    state = SuspendedSession(HELLO, 3, 2, True, 0xFFFF)
    assert SuspendedSession.from_bytes(state.to_bytes()) == state
    bare = replace(state, hello=None, product_id=None, described=False, next_message_id=0)
    assert SuspendedSession.from_bytes(bare.to_bytes()) == bare


@settings(max_examples=300, deadline=None, print_blob=True)
@given(st.binary(max_size=600))
def test_random_saved_state_is_read_or_refused(data: bytes) -> None:
    try:
        SuspendedSession.from_bytes(data)
    except SuspendedStateError as exc:
        assert str(exc)


@settings(max_examples=200, deadline=None, print_blob=True)
@given(st.data())
def test_flipped_bytes_of_a_real_state_are_read_or_refused(data: st.DataObject) -> None:
    saved = bytearray(SuspendedSession(HELLO, 3, 2, True, 1234).to_bytes())
    index = data.draw(st.integers(0, len(saved) - 1))
    saved[index] ^= data.draw(st.integers(1, 255))
    try:
        SuspendedSession.from_bytes(bytes(saved))
    except SuspendedStateError as exc:
        assert str(exc)


async def test_a_transfer_cut_by_a_graceful_restart_resumes_with_no_handshake(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """An emulated DTLS device halfway through a download when ``ota server`` restarts
    gracefully: the next process restores its session, offers the image again, and the
    device resumes from the chunks it holds, in the same DTLS session (no handshake, no
    Hello), then installs it."""
    async with trio.open_nursery() as devices:  # the device outlives both servers
        async with trio.open_nursery() as first_nursery:
            kit = await start_first_server(first_nursery, tmp_path, count=1)
            (device_id,) = kit.device_ids
            trust = TrustStore.initial(kit.product_id,
                                       read_trust_file(kit.creds_dir / TRUST_FILE))
            async with kit.api() as api:
                rig = OtaRig(kit, api, EventLog(), trust, tmp_path / "state", first_nursery)
                rig.tune_engine(tcp_chunk_size=1024, udp_chunk_size=1024, window_limit=4)
                v2 = app(2, size=48_000)
                await rig.upload_device_os(SYSTEM_5003)
                await rig.upload(2, v2)
                await rig.release(2, product_default=True)
                halfway = trio.Event()
                at_end: list[int] = []
                fleet = rig.fleet([(device_id, "udp")], ota_chunk_size=1024)
                runner_box: list[Any] = []

                def on_mark(offset: int) -> None:
                    if offset < len(v2):
                        halfway.set()
                    else:  # the whole image written: how many sessions it took
                        at_end.append(runner_box[0].device.sessions)

                watched = WatchedFlash.install(fleet, device_id, marks=[len(v2) // 2, len(v2)],
                                               on_mark=on_mark)
                runner_box.append(fleet.device(device_id))
                await devices.start(fleet.run)
                with trio.fail_after(STEP):
                    await halfway.wait()
                sessions_before = runner_box[0].device.sessions
                kit.handle.shutdown.set()
        assert kit.handle.device_server is not None
        endpoint = kit.handle.device_server.udp_endpoint
        assert endpoint is not None and endpoint.stats.saved == 1
        config = ServerConfig(data_dir=kit.data_dir, api_port=0, device_port=kit.udp[1],
                              store_threads=4, graceful_timeout=0.5)
        second: ServerHandle = await nursery.start(serve, config)
        await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
        # Resumed in the session restored, never restarted from zero.
        assert at_end == [sessions_before]
        assert watched.restarts == 1
        assert len(v2) <= watched.written <= len(v2) + 2 * 4 * 1024
        assert second.device_server is not None and second.device_server.udp_endpoint
        assert second.device_server.udp_endpoint.stats.restored == 1
        devices.cancel_scope.cancel()
    second.shutdown.set()
