"""The device plane end to end: real TLS 1.3 / DTLS 1.2 sessions carrying CoAP to the real
server, which records hello and describe, streams events, and refuses what it must."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

from otacore.coap import Code, Message, MessageType, encode_udp
from otacore.messages import Dependency, ModuleDescription
from otacore.protocol.link import PeerReleased
from server.events import STATUS
from tests.device_client import LinkDevice
from tests.device_server import start_device_server
from tests.test_revocation import assert_refused

TRANSPORTS = ["tcp", "udp"]
COAP_CLIENT = shutil.which("coap-client-openssl") or shutil.which("coap-client")


def _modules() -> list[ModuleDescription]:
    return [
        ModuleDescription(4, 1, 5003, 0, 600_000, bytes(range(32)),
                          (Dependency(2, 0, 2001),)),
        ModuleDescription(5, 1, 7, 0, 90_000, bytes(32), (Dependency(4, 1, 5003),)),
    ]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_hello_and_describe_update_the_device_record(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=1)
    device_id = kit.device_ids[0]
    with kit.handle.bus.subscribe(device_id=device_id) as events:
        device = await LinkDevice.connect(kit.creds_dir, device_id, transport,
                                          kit.address(transport))
        answer = await device.hello(product_version=7)
        assert answer.code == Code.CHANGED
        assert (await device.describe(_modules())).code == Code.CHANGED
        assert (await device.publish("sensor/temp", "21.5")).code == Code.CHANGED
        seen = []
        with trio.fail_after(20):
            while len(seen) < 3:
                seen.append(await events.receive.receive())
        assert (seen[0].name, seen[0].data) == (STATUS, "online")
        assert seen[1].name == "spark/device/describe"
        assert (seen[2].name, seen[2].data, seen[2].coreid) == ("sensor/temp", "21.5", device_id)
        async with kit.api() as api:
            record = (await api.get(f"/v1/products/{kit.product_id}/devices/{device_id}")).json()
        assert record["online"] is True
        assert record["firmware_version"] == 7 and record["system_version"] == 5003
        assert [m["version"] for m in record["modules"]] == [5003, 7]
        if transport == "udp":
            # DTLS has no connection to close: a device says goodbye (or times out idle).
            assert (await device.goodbye()).code == Code.CHANGED
        await device.aclose()
        with trio.fail_after(20):
            while True:
                event = await events.receive.receive()
                if event.name == STATUS:
                    assert event.data == "offline"
                    break


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_device_cannot_speak_for_another(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=2)
    mine, other = kit.device_ids
    device = await LinkDevice.connect(kit.creds_dir, mine, transport, kit.address(transport))
    answer = await device.hello(device_id=other)
    assert answer.code == Code.FORBIDDEN
    await device.wait_closed()
    async with kit.api() as api:
        record = (await api.get(f"/v1/products/{kit.product_id}/devices/{other}")).json()
    assert record["online"] is False and record["firmware_version"] is None


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_malformed_messages_close_only_the_offender(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=2)
    bad_id, good_id = kit.device_ids
    good = await LinkDevice.connect(kit.creds_dir, good_id, transport, kit.address(transport))
    bad = await LinkDevice.connect(kit.creds_dir, bad_id, transport, kit.address(transport))
    assert (await bad.hello()).code == Code.CHANGED
    # A payload that is not msgpack gets 4.00; repeated violations end the session.
    junk = Message(MessageType.CON, Code.POST, payload=b"\xc1\xc1 not msgpack")
    junk.set_uri_path("d")
    assert (await bad.request(junk)).code == Code.BAD_REQUEST
    if transport == "tcp":
        await bad.send_raw(b"\xf0" + b"\xff" * 8)  # a frame far past the size limit: fatal
    else:
        for _ in range(6):  # garbage datagrams: each one a violation, then closed
            await bad.send_raw(b"\x40\x02" + b"\xff" * 5)
    await bad.wait_closed(timeout=15) if transport == "tcp" else None
    unknown = Message(MessageType.CON, Code.POST)
    unknown.set_uri_path("nope")
    assert (await good.request(unknown)).code == Code.NOT_FOUND
    assert (await good.hello()).code == Code.CHANGED  # the server still serves the others
    await good.aclose()
    await bad.aclose()


async def test_udp_duplicate_hello_is_answered_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    kit = await start_device_server(nursery, tmp_path, count=1)
    device = await LinkDevice.connect(kit.creds_dir, kit.device_ids[0], "udp", kit.udp)
    assert (await device.hello()).code == Code.CHANGED
    ping = Message(MessageType.CON, Code.EMPTY, message_id=4242)
    await device.send_raw(encode_udp(ping))  # CoAP ping: answered with an empty ACK
    await device.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_revocation_closes_the_live_session_and_refuses_the_next(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=1)
    device_id = kit.device_ids[0]
    device = await LinkDevice.connect(kit.creds_dir, device_id, transport, kit.address(transport))
    assert (await device.hello()).code == Code.CHANGED
    async with kit.api() as api:
        result = await api.post(f"/v1/products/{kit.product_id}/devices/{device_id}/revoke")
        assert result.status_code == 200, result.text
    await device.wait_closed()
    # The next session is refused by the server (counted as NOT_AUTHORIZED), not merely
    # slow to answer.
    await assert_refused(kit, kit.creds_dir, device_id, transport)


async def test_graceful_shutdown_tells_tcp_devices_to_come_back(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=1)
    device = await LinkDevice.connect(kit.creds_dir, kit.device_ids[0], "tcp", kit.tcp)
    assert (await device.hello()).code == Code.CHANGED
    kit.handle.shutdown.set()
    released = await device.wait_for(lambda e: isinstance(e, PeerReleased))
    assert released == PeerReleased(abort=False)


@pytest.mark.skipif(COAP_CLIENT is None and not os.environ.get("CI"),
                    reason="libcoap's coap-client is not installed (CI installs it)")
@pytest.mark.parametrize("scheme", ["coaps", "coaps+tcp"])
async def test_libcoap_gets_well_known_core_from_the_real_server(
    nursery: trio.Nursery, tmp_path: Path, scheme: str
) -> None:
    assert COAP_CLIENT is not None
    kit = await start_device_server(nursery, tmp_path, count=1)
    device_dir = kit.creds_dir / kit.device_ids[0]
    port = (kit.udp if scheme == "coaps" else kit.tcp)[1]
    command = [COAP_CLIENT, "-m", "get", "-B", "10", "-c", str(device_dir / "cert.pem"),
               "-j", str(device_dir / "key.pem"), "-R", str(kit.creds_dir / "ca.pem"),
               f"{scheme}://127.0.0.1:{port}/.well-known/core"]
    with trio.fail_after(20):
        result = await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                        check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b'</h>;rt="ota.hello"' in result.stdout
