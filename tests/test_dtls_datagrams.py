"""One message, one DTLS datagram, in both directions, over real sockets and real DTLS.

Issue 14 traced two faults of the UDP shell to this:

- two tasks sending on one DTLS session at once (the OTA sender flushing chunks while the
  session's writer answers a ping) used to put both records in the first datagram and send
  the second task an empty one: the device read two CoAP messages glued into one (a lost
  chunk, a retransmission timeout) and then an empty datagram;
- an empty datagram (or any record that yields no application data) ended the session that
  received it (``OpenSSL.SSL.WantReadError`` out of the receive), on the device or on the
  server; any host that can spoof a device's address could do the same at will.

The tests describe behaviour at the transport's API (``DeviceSession.send/receive`` on the
server, ``connect_dtls`` + ``receive_datagram`` on the device), so they hold for any DTLS
implementation behind it.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
from OpenSSL import SSL

from server.authorization import MemoryDeviceDirectory
from server.transport import DeviceServer, DeviceSession
from server.transport.client import connect_dtls, receive_datagram
from server.transport.dtls import make_dtls_server_context, send_close_notify
from tests.test_transport_tls import (
    PATIENCE,
    DeviceKit,
    EchoHandler,
    make_device_kit,
    start_device_server,
)

#: Tasks sending at once, and messages each sends, in a burst.
SENDERS = 4
PER_SENDER = 25


class BurstHandler(EchoHandler):
    """An echo handler that answers ``burst`` with SENDERS tasks sending PER_SENDER
    distinct messages each, all at once, on the same session."""

    async def run(self, session: DeviceSession) -> None:
        self.sessions.append(session)
        while True:
            data = await session.receive()
            self.heard += 1
            if data != b"burst":
                await session.send(data)
                continue
            async with trio.open_nursery() as nursery:
                for sender in range(SENDERS):
                    nursery.start_soon(self._send_many, session, sender)

    @staticmethod
    async def _send_many(session: DeviceSession, sender: int) -> None:
        for number in range(PER_SENDER):
            await session.send(f"{sender}:{number}".encode())


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> DeviceKit:
    return make_device_kit(tmp_path_factory.mktemp("dtls-datagram-kit"))


@pytest.fixture
def handler() -> BurstHandler:
    return BurstHandler()


@pytest.fixture
async def server(nursery: trio.Nursery, kit: DeviceKit, handler: BurstHandler) -> DeviceServer:
    directory: MemoryDeviceDirectory = kit.directory()
    return await start_device_server(nursery, kit, directory, handler, tcp=False)


def udp(server: DeviceServer) -> tuple[str, int]:
    assert server.udp_address is not None
    return server.udp_address


@asynccontextmanager
async def device(server: DeviceServer, kit: DeviceKit) -> AsyncIterator[trio.DTLSChannel]:
    sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    with trio.DTLSEndpoint(sock) as endpoint:
        with trio.fail_after(PATIENCE):
            channel = await connect_dtls(endpoint, udp(server), kit.good)
        yield channel


async def ask(channel: trio.DTLSChannel, message: bytes) -> bytes:
    await channel.send(message)
    with trio.fail_after(PATIENCE):
        return await receive_datagram(channel)


async def test_concurrent_sends_on_one_session_leave_as_one_datagram_each(
    server: DeviceServer, kit: DeviceKit
) -> None:
    async with device(server, kit) as channel:
        await channel.send(b"burst")
        received: list[bytes] = []
        with trio.fail_after(PATIENCE):
            while len(received) < SENDERS * PER_SENDER:
                # trio's own receive(): one datagram's plaintext, and no tolerance for an
                # empty datagram, so a glued or an empty one fails the test.
                received.append(await channel.receive())
        expected = {f"{s}:{n}".encode() for s in range(SENDERS) for n in range(PER_SENDER)}
        assert sorted(received) == sorted(expected)
        # Each sender's messages arrive in the order it sent them (loopback keeps order).
        for sender in range(SENDERS):
            mine = [m for m in received if m.startswith(f"{sender}:".encode())]
            assert mine == [f"{sender}:{n}".encode() for n in range(PER_SENDER)]
        # ... and the session still works afterwards.
        assert await ask(channel, b"after") == b"after"


async def test_server_session_survives_datagrams_without_application_data(
    server: DeviceServer, kit: DeviceKit, handler: BurstHandler
) -> None:
    noise = random.Random(14)
    print("noise seed 14")
    # From the device's own address: what a spoofing host or a duplicating network can
    # deliver. Each must be dropped without touching the session (RFC 6347 section
    # 4.1.2.7: invalid records are silently discarded).
    datagrams = (
        b"",  # no record at all
        b"\x17\xfe\xfd\x00\x01" + noise.randbytes(6) + b"\x00\x20" + noise.randbytes(32),
        b"\x15\xfe\xfd\x00\x01" + bytes(6) + b"\x00\x02",  # truncated alert record
    )
    async with device(server, kit) as channel:
        # Before the session has read anything (OpenSSL's state differs), then after.
        for label in (b"first", b"second"):
            for datagram in datagrams:
                await channel.endpoint.socket.sendto(datagram, udp(server))
            assert await ask(channel, label) == label
        assert len(handler.sessions) == 1
        assert not handler.sessions[0].closed


@asynccontextmanager
async def device_of_bare_server(
    kit: DeviceKit, serve_one: Callable[[trio.DTLSChannel], Awaitable[None]]
) -> AsyncIterator[trio.DTLSChannel]:
    """A device connected to a bare trio DTLS server (the test's own, so that it can write
    raw datagrams to the device from the server's address) running ``serve_one``."""
    server_sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await server_sock.bind(("127.0.0.1", 0))
    with trio.DTLSEndpoint(server_sock) as server_endpoint, trio.fail_after(PATIENCE):
        async with trio.open_nursery() as nursery:
            context = make_dtls_server_context(kit.pki)
            await nursery.start(server_endpoint.serve, context, serve_one)
            sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))
            with trio.DTLSEndpoint(sock) as endpoint:
                yield await connect_dtls(endpoint, server_sock.getsockname(), kit.good)
            nursery.cancel_scope.cancel()


async def test_device_survives_datagrams_without_application_data(kit: DeviceKit) -> None:
    async def serve_one(channel: trio.DTLSChannel) -> None:
        await channel.do_handshake()
        await channel.endpoint.socket.sendto(b"", channel.peer_address)  # before any read
        await channel.send(b"first")
        await channel.endpoint.socket.sendto(b"", channel.peer_address)  # after one
        await channel.endpoint.socket.sendto(b"\x17\xfe\xfd" + bytes(10), channel.peer_address)
        await channel.send(b"second")
        await trio.sleep_forever()

    async with device_of_bare_server(kit, serve_one) as channel:
        assert await receive_datagram(channel) == b"first"
        assert await receive_datagram(channel) == b"second"


async def test_receive_datagram_still_reports_a_closed_session(kit: DeviceKit) -> None:
    """Skipping datagrams without data must not hide the peer's close_notify."""

    async def serve_one(channel: trio.DTLSChannel) -> None:
        await channel.do_handshake()
        await channel.endpoint.socket.sendto(b"", channel.peer_address)
        await send_close_notify(channel)
        await trio.sleep_forever()

    async with device_of_bare_server(kit, serve_one) as channel:
        with pytest.raises(SSL.ZeroReturnError):
            await receive_datagram(channel)
