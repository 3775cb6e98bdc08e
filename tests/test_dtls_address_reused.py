"""A DTLS session has ended but its end is still running (the real handler's last store
writes: the device marked offline, under a busy store for seconds), and a new device
connection arrives from the same address and port (the kernel gives a freed UDP port out
again; ``ota bench fleet``'s load generator sends every device from one source address).
Its ClientHello is a new connection (RFC 6347 4.2.8): the server answers it at once, it
does not drop it as a record of the session that ended."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import trio

from otacore.records.dtls12_client import DtlsClientHandshake
from server.authorization import MemoryDeviceDirectory
from server.bench.fleet.record_devices import (
    DeviceIdentity,
    DtlsRecordConnection,
    device_contexts,
)
from server.transport import DeviceServer
from server.transport.client import DeviceCredentials
from server.transport.session import DeviceSession
from tests.test_transport_tls import (
    PATIENCE,
    DeviceKit,
    EchoHandler,
    make_device_kit,
    start_device_server,
)


class SlowEndHandler(EchoHandler):
    """Echoes; the first session's end waits (shielded, as the real handler's offline
    write is) until the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.ending = trio.Event()
        self.release = trio.Event()

    async def run(self, session: DeviceSession) -> None:
        first = not self.sessions
        try:
            await super().run(session)
        finally:
            if first:
                self.ending.set()
                with trio.CancelScope(shield=True):
                    await self.release.wait()


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> DeviceKit:
    return make_device_kit(tmp_path_factory.mktemp("dtls-reused-kit"))


async def dtls_connect(sock: trio.socket.SocketType, credentials: DeviceCredentials
                       ) -> DtlsRecordConnection:
    """A DTLS 1.2 handshake as the device over the connected UDP socket ``sock``, then our
    record layer (as the load generator's records stack does, from a chosen port)."""
    identity = DeviceIdentity.load(credentials)
    handshake = DtlsClientHandshake(
        device_contexts(credentials.ca_path).dtls, now=trio.current_time(),
        certificate=identity.certificate, private_key=identity.private_key,
    )  # fmt: skip
    while not handshake.complete:
        for datagram in handshake.datagrams_to_send():
            await sock.send(datagram)
        assert handshake.failure is None, handshake.failure
        due = handshake.next_timeout()
        with trio.move_on_at(math.inf if due is None else due):
            handshake.receive_datagram(await sock.recv(65536), trio.current_time())
            continue
        handshake.handle_timeout(trio.current_time())
    for datagram in handshake.datagrams_to_send():
        await sock.send(datagram)
    handover = handshake.take_over()
    return DtlsRecordConnection(sock, handover.layer, handover.session)


async def udp_socket(server: tuple[str, int], port: int = 0) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", port))
    await sock.connect(server)
    return sock


async def who(connection: DtlsRecordConnection) -> bytes:
    await connection.send([b"who"])
    return await connection.receive()


async def test_a_new_hello_from_the_address_of_an_ending_session_is_answered(
        nursery: trio.Nursery, kit: DeviceKit, tmp_path: Path) -> None:
    directory: MemoryDeviceDirectory = kit.directory()
    handler = SlowEndHandler()
    server: DeviceServer = await start_device_server(nursery, kit, directory, handler,
                                                     tcp=False)
    assert server.udp_address is not None and server.udp_endpoint is not None
    with trio.fail_after(PATIENCE):
        first = await dtls_connect(await udp_socket(server.udp_address), kit.good)
        assert await who(first) == f"{kit.good_id}|udp|False".encode()
        port = first.sock.getsockname()[1]
        await first.aclose()  # close_notify, then the socket: the port is free again
        await handler.ending.wait()  # the session has ended; its end is held

    # Another device from the same address and port, while that end still runs.
    try:
        with trio.fail_after(PATIENCE):
            second = await dtls_connect(await udp_socket(server.udp_address, port), kit.other)
            assert await who(second) == f"{kit.other_id}|udp|False".encode()
        await second.aclose()
    finally:
        handler.release.set()
