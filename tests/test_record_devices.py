"""The load generator's ``records`` device stack (issue 14 item 8) against the real device
server over real sockets: a TLS 1.3 and a DTLS 1.2 device session whose handshake OpenSSL
runs on memory BIOs and whose records our layers seal, full then resumed, with the
server's view of each."""

from __future__ import annotations

import gc

import pytest
import trio
from OpenSSL import SSL

from server.authorization import MemoryDeviceDirectory
from server.bench.fleet.record_devices import (
    DeviceResumption,
    DtlsRecordConnection,
    TlsRecordConnection,
    connect_records,
)
from server.transport import DeviceServer
from tests.test_transport_tls import (
    PATIENCE,
    DeviceKit,
    EchoHandler,
    make_device_kit,
    start_device_server,
)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> DeviceKit:
    return make_device_kit(tmp_path_factory.mktemp("record-devices-kit"))


@pytest.fixture
async def server(nursery: trio.Nursery, kit: DeviceKit) -> DeviceServer:
    directory: MemoryDeviceDirectory = kit.directory()
    return await start_device_server(nursery, kit, directory, EchoHandler())


def address(server: DeviceServer, transport: str) -> tuple[str, int]:
    found = server.tcp_address if transport == "tcp" else server.udp_address
    assert found is not None
    return found


async def who(connection: TlsRecordConnection | DtlsRecordConnection) -> bytes:
    await connection.send([b"who"])
    with trio.fail_after(PATIENCE):
        return await connection.receive()


@pytest.mark.parametrize("transport", ["tcp", "udp"])
async def test_full_then_resumed_session_over_our_record_layers(
    server: DeviceServer, kit: DeviceKit, transport: str
) -> None:
    resumable = DeviceResumption(kit.good)
    with trio.fail_after(PATIENCE):
        first, resumed = await connect_records(transport, address(server, transport), resumable)
    assert not resumed
    assert await who(first) == f"{kit.good_id}|{transport}|False".encode()
    assert first.session is not None
    resumable.session = first.session
    await first.aclose()

    with trio.fail_after(PATIENCE):
        second, resumed = await connect_records(transport, address(server, transport), resumable)
    assert resumed
    assert await who(second) == f"{kit.good_id}|{transport}|True".encode()
    # Several messages in one batch, both directions (a window of CoAP messages).
    await second.send([b"one", b"two"])
    received = b""
    with trio.fail_after(PATIENCE):
        while received not in (b"onetwo",):
            received += await second.receive()
    await second.aclose()

    # resume=False: a full handshake even with a session at hand.
    with trio.fail_after(PATIENCE):
        third, resumed = await connect_records(
            transport, address(server, transport), resumable, resume=False
        )
    assert not resumed and resumable.session is not None
    await third.aclose()


async def test_an_established_device_session_holds_no_openssl_connection(
    server: DeviceServer, kit: DeviceKit
) -> None:
    def connections() -> int:
        gc.collect()
        return sum(isinstance(o, SSL.Connection) for o in gc.get_objects())

    before = connections()
    held = []
    for transport in ("tcp", "udp"):
        resumable = DeviceResumption(kit.other)
        with trio.fail_after(PATIENCE):
            connection, _ = await connect_records(transport, address(server, transport), resumable)
        assert await who(connection) == f"{kit.other_id}|{transport}|False".encode()
        held.append(connection)
    assert connections() == before  # server side and device side: records only
    for connection in held:
        await connection.aclose()
