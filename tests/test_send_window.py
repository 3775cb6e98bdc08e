"""Windows of messages through the live sessions (issue 14 item 4): a TLS session seals a
window in one batch and sends it in one write; a session handler frames a run of a
transfer's chunks with the chunk framing kernel and sends it after what its link holds.

Real servers and real OpenSSL peers: the TLS records go to a device whose session our own
layer continues (to count records), the chunks to devices over TLS 1.3 and DTLS 1.2 that
parse them with the same CoAP link the server uses.
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import pytest
import trio

from otacore.coap import Code
from otacore.module import build_module
from otacore.protocol.link import RequestReceived, UdpLink
from otacore.protocol.ota_wire import parse_transfer, transfer_request
from otacore.records.tls13 import ApplicationData
from otacore.records.tls13_protocol import MAX_PLAINTEXT
from otacore.transfer import Chunk, PreparedFile, UpdateStart
from server.authorization import MemoryDeviceDirectory
from server.devices.plane import DevicePlane
from server.transport import DeviceSession, SessionClosed
from server.transport.client import connect_dtls
from tests.device_client import LinkDevice
from tests.device_server import start_device_server as start_real_server
from tests.test_transport_tls import (
    PATIENCE,
    DeviceKit,
    EchoHandler,
    make_device_kit,
    start_device_server,
)
from tests.test_transport_tls_records import open_layer_device

#: A window of CoAP-over-TCP-sized messages whose stream spans three records.
WINDOW = [bytes([n % 251]) * size for n, size in enumerate([700, 9000, 16_384, 5, 12_000, 1])]


class WindowHandler(EchoHandler):
    """Answers ``window`` with :data:`WINDOW` in one ``send_window``, ``closed`` by closing
    the session and then trying one (remembering the error)."""

    def __init__(self) -> None:
        super().__init__()
        self.error: Exception | None = None

    async def run(self, session: DeviceSession) -> None:
        self.sessions.append(session)
        while True:
            data = await session.receive()
            if data == b"window":
                await session.send_window(WINDOW)
            elif data == b"closed":
                session.close()
                try:
                    await session.send_window([b"late"])
                except SessionClosed as exc:
                    self.error = exc
                raise SessionClosed("closed")
            else:
                await session.send(data)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> DeviceKit:
    return make_device_kit(tmp_path_factory.mktemp("send-window-kit"))


async def test_a_tls_window_is_one_batch_of_full_records(
    nursery: trio.Nursery, kit: DeviceKit
) -> None:
    handler = WindowHandler()
    server = await start_device_server(nursery, kit, kit.directory(), handler, udp=False)
    device = await open_layer_device(server, kit.good, first_data=b"window")
    expected = b"".join(WINDOW)
    received, seen = await device.receive_until(expected[-100:])
    assert received == expected
    # The window's stream is cut into records of 2^14 bytes (RFC 8446 5.1), not one
    # record per message: the batch seal takes the joined frames.
    records = [event for event in seen if isinstance(event, ApplicationData)]
    tail = len(expected) - 2 * MAX_PLAINTEXT
    assert [len(record.data) for record in records] == [MAX_PLAINTEXT, MAX_PLAINTEXT, tail]
    # The session goes on: sequence numbers advanced as the window's records took them.
    await device.send(device.layer.send_application_data(b"after"))
    received, _ = await device.receive_until(b"after")
    assert received == b"after"
    # The registry's session leads to its handler (set as the handler started).
    (session,) = handler.sessions
    assert session.handler is handler and server.registry.handler(kit.good_id) is handler


async def test_a_window_on_a_closed_session_raises_session_closed(
    nursery: trio.Nursery, kit: DeviceKit
) -> None:
    handler = WindowHandler()
    server = await start_device_server(nursery, kit, kit.directory(), handler, udp=False)
    device = await open_layer_device(server, kit.good, first_data=b"closed")
    with trio.fail_after(PATIENCE):
        while handler.error is None:
            await trio.sleep(0.01)
    assert isinstance(handler.error, SessionClosed)
    await device.stream.aclose()


#: A window of CoAP-over-UDP-sized messages: one datagram each.
UDP_WINDOW = [bytes([n + 1]) * size for n, size in enumerate([1, 1024, 700, 1152, 33])]


class UdpWindowHandler(EchoHandler):
    """Answers ``window`` with :data:`UDP_WINDOW` in one ``send_window``; echoes the rest."""

    async def run(self, session: DeviceSession) -> None:
        self.sessions.append(session)
        while True:
            data = await session.receive()
            if data == b"window":
                await session.send_window(UDP_WINDOW)
            else:
                await session.send(data)


async def test_a_dtls_window_is_one_record_per_datagram_sealed_in_one_batch(
    nursery: trio.Nursery, kit: DeviceKit
) -> None:
    """DtlsSession.send_window seals the window with one seal_many; an OpenSSL peer opens
    each message as its own datagram, in order, and the session goes on after it (the
    batch advanced the sequence numbers as single seals would: a reused one would be
    dropped by OpenSSL's replay check, RFC 6347 4.1.2.6)."""
    handler = UdpWindowHandler()
    server = await start_device_server(nursery, kit, kit.directory(), handler, tcp=False)
    assert server.udp_address is not None
    sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    with trio.DTLSEndpoint(sock) as endpoint, trio.fail_after(PATIENCE):
        channel = await connect_dtls(endpoint, server.udp_address, kit.good)
        await channel.send(b"window")
        received = [await channel.receive() for _ in UDP_WINDOW]
        assert received == UDP_WINDOW
        await channel.send(b"after")
        assert await channel.receive() == b"after"
        await channel.send(b"window")
        assert [await channel.receive() for _ in UDP_WINDOW] == UDP_WINDOW


# --- chunks from a session handler -------------------------------------------------------


def _plane(handle: object) -> DevicePlane:
    plane = getattr(handle, "devices", None)
    assert isinstance(plane, DevicePlane)
    return plane


@pytest.mark.parametrize("transport", ["tcp", "udp"])
async def test_a_run_of_chunks_follows_what_the_link_holds(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    seed = 14
    print(f"seed {seed}")
    image = build_module(random.Random(seed).randbytes(20_000), platform_id=13, function=5,
                         version=2)  # fmt: skip
    chunk_size = 512
    prepared = PreparedFile(image, chunk_size)
    server = await start_real_server(nursery, tmp_path, count=1)
    (device_id,) = server.device_ids
    device = await LinkDevice.connect(server.creds_dir, device_id, transport,
                                      server.address(transport))  # fmt: skip
    assert (await device.hello()).code == Code.CHANGED
    handler = _plane(server.handle).live[device_id]
    # Something already queued on the link (the transfer's start) leaves first.
    start = UpdateStart(7, len(image), chunk_size, prepared.sha256,
                        module_function=5, module_index=1, module_version=2)  # fmt: skip
    handler.link.notify(transfer_request(start), trio.current_time())
    # A retransmission's order too. Over DTLS at most 8 (with the start, within the 10
    # datagrams trio's DTLSEndpoint queues for the test device by default).
    numbers = [3, 1, 2, *range(4, 30), prepared.chunk_count]
    if transport == "udp":
        numbers = [*numbers[:7], prepared.chunk_count]
    views = [memoryview(image)[(n - 1) * chunk_size : n * chunk_size] for n in numbers]
    chunks = [Chunk(7, n, zlib.crc32(v), v) for n, v in zip(numbers, views, strict=True)]
    await handler.send_chunks(prepared, chunks)
    got = []
    message_ids = []
    with trio.fail_after(PATIENCE):
        while len(got) < 1 + len(chunks):
            event = await device.wait_for(lambda e: isinstance(e, RequestReceived))
            assert isinstance(event, RequestReceived)
            got.append(parse_transfer(event.message))
            message_ids.append(event.message.message_id)
    assert isinstance(got[0], UpdateStart) and got[0].transfer_id == 7
    for received, sent in zip(got[1:], chunks, strict=True):
        assert isinstance(received, Chunk)
        assert (received.transfer_id, received.index, received.crc32) == (7, sent.index,
                                                                           sent.crc32)
        assert bytes(received.data) == bytes(sent.data)
    if transport == "udp":
        # Each chunk is a NON with its own id from the link's message layer, after the
        # start's: the ids run on (RFC 7252 4.4), wrapping at 65536.
        assert isinstance(handler.link, UdpLink)
        expected = [(message_ids[0] + k) & 0xFFFF for k in range(len(message_ids))]
        assert message_ids == expected
    await device.aclose()


async def test_an_empty_window_sends_nothing(nursery: trio.Nursery, kit: DeviceKit) -> None:
    directory: MemoryDeviceDirectory = kit.directory()
    handler = WindowHandler()
    server = await start_device_server(nursery, kit, directory, handler, udp=False)
    device = await open_layer_device(server, kit.good, first_data=b"ping")
    received, _ = await device.receive_until(b"ping")
    assert received == b"ping"
    (session,) = handler.sessions
    sequence = session.layer.write_seq  # type: ignore[attr-defined]
    await session.send_window([])
    assert session.layer.write_seq == sequence  # type: ignore[attr-defined]
    await device.stream.aclose()
