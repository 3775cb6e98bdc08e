"""The TCP device server after the hand-over: OpenSSL runs the handshake only, the session
is our TLS 1.3 record layer over the plain socket (issue 14 items 1-3).

Devices here are real OpenSSL peers: stdlib ``ssl`` clients, ``openssl s_client``, and a
pyOpenSSL client whose session our own layer continues on the device side (to send what
stdlib ssl cannot: KeyUpdate requests, tampered and unexpected records).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import shutil
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from OpenSSL import SSL

from otacore.errors import PeerAlertError, RecordHandoverError, ValidationError
from otacore.records.tls13 import (
    AlertDescription,
    ApplicationData,
    CloseNotifyReceived,
    KeyUpdateReceived,
    SessionTicketReceived,
    Tls13Event,
    Tls13RecordLayer,
)
from otacore.records.tls13_handover import Tls13Handover, Tls13Handshake, enable_record_export
from otacore.records.tls13_keys import traffic_key_and_iv
from server.authorization import MemoryDeviceDirectory
from server.transport import (
    CloseReason,
    DeviceServer,
    DeviceSession,
    RefuseReason,
    SessionLimits,
)
from server.transport.client import DeviceCredentials, connect_tls
from server.transport.tls_handshake import (
    _keep_tickets,
    _ServerHandshake,
    make_tls_handshake_context,
    server_hello_resumes,
)
from server.transport.tls_idle import CIPHER_IDLE_SECONDS, IdleSweeper
from server.transport.tls_session import TlsSession
from tests.test_transport_tls import (
    FAST_LIMITS,
    PATIENCE,
    DeviceKit,
    EchoHandler,
    ask,
    eventually,
    make_device_kit,
    start_device_server,
    tcp,
)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> DeviceKit:
    return make_device_kit(tmp_path_factory.mktemp("tls-records-kit"))


@pytest.fixture
def directory(kit: DeviceKit) -> MemoryDeviceDirectory:
    return kit.directory()


@pytest.fixture
def handler() -> EchoHandler:
    return EchoHandler()


@pytest.fixture
async def server(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory, handler: EchoHandler
) -> DeviceServer:
    return await start_device_server(nursery, kit, directory, handler, udp=False)


# --- a device whose session our layer continues ------------------------------------------


def device_context(credentials: DeviceCredentials) -> SSL.Context:
    """A pyOpenSSL TLS 1.3 device context whose secrets go to the hand-over."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.use_certificate_chain_file(str(credentials.cert_path))
    context.use_privatekey_file(str(credentials.key_path))
    context.load_verify_locations(str(credentials.ca_path))
    context.set_verify(SSL.VERIFY_PEER)
    context.set_alpn_protos([b"coap"])
    enable_record_export(context)
    return context


@dataclass
class LayerDevice:
    """A device on a real TCP connection, its session continued by our record layer."""

    stream: trio.SocketStream
    handover: Tls13Handover
    layer: Tls13RecordLayer

    async def send(self, wire: bytes) -> None:
        await self.stream.send_all(wire)

    async def events(self) -> list[Tls13Event]:
        """The events of the next bytes from the server but its session tickets (raises on
        its alerts)."""
        with trio.fail_after(PATIENCE):
            while True:
                data = await self.stream.receive_some()
                assert data, "the server closed the connection"
                events = [
                    event
                    for event in self.layer.receive_data(data)
                    if not isinstance(event, SessionTicketReceived)
                ]
                if events:
                    return events

    async def receive_until(self, wanted: bytes) -> tuple[bytes, list[Tls13Event]]:
        """Application data until it ends with ``wanted``, and every event seen."""
        received = b""
        seen: list[Tls13Event] = []
        while not received.endswith(wanted):
            events = await self.events()
            seen += events
            received += b"".join(e.data for e in events if isinstance(e, ApplicationData))
        return received, seen


async def open_layer_device(
    server: DeviceServer, credentials: DeviceCredentials, first_data: bytes = b""
) -> LayerDevice:
    """Handshake as ``credentials``' device, then continue with our record layer.
    ``first_data`` goes in the same TCP write as the device's Finished."""
    stream = await trio.open_tcp_stream(*tcp(server))
    handshake = Tls13Handshake(device_context(credentials), is_server=False, absorb_tickets=True)
    with trio.fail_after(PATIENCE):
        await stream.send_all(handshake.data_to_send())  # ClientHello
        while not handshake.complete:
            data = await stream.receive_some()
            assert data, "the server closed the connection during the handshake"
            handshake.receive_data(data)
        final_flight = handshake.data_to_send()
        handover = handshake.take_over()
        layer = handover.record_layer()
        wire = final_flight + (layer.send_application_data(first_data) if first_data else b"")
        await stream.send_all(wire)
    device = LayerDevice(stream, handover, layer)
    if handover.unprocessed:
        layer.receive_data(handover.unprocessed)
    return device


# --- tests -------------------------------------------------------------------------------


async def test_an_established_session_holds_no_openssl_object(
    server: DeviceServer, kit: DeviceKit, handler: EchoHandler
) -> None:
    def openssl_objects() -> int:
        gc.collect()
        return sum(isinstance(o, (SSL.Connection, Tls13Handshake)) for o in gc.get_objects())

    before = openssl_objects()  # (other tests' garbage, if any, does not count)
    first = await connect_tls(tcp(server), kit.good)
    second = await connect_tls(tcp(server), kit.other)
    assert await ask(first, b"who") == f"{kit.good_id}|tcp|False".encode()
    assert await ask(second, b"hello") == b"hello"
    assert openssl_objects() == before
    assert all(isinstance(session, TlsSession) for session in handler.sessions)
    assert len(server.registry) == 2
    await first.aclose()
    await second.aclose()
    await eventually(lambda: server.stats.closed[("tcp", CloseReason.PEER)] == 2)


async def test_alpn_and_first_data_with_the_finished(server: DeviceServer, kit: DeviceKit) -> None:
    """The device's first record arrives in the same TCP segment as its Finished: the
    hand-over passes it on unread, and the session answers it."""
    device = await open_layer_device(server, kit.good, first_data=b"who")
    assert device.handover.alpn_protocol == b"coap"
    received, _ = await device.receive_until(b"|False")
    assert received == f"{kit.good_id}|tcp|False".encode()


async def test_key_update_requested_by_the_device_is_answered(
    server: DeviceServer, kit: DeviceKit, handler: EchoHandler
) -> None:
    device = await open_layer_device(server, kit.good)
    layer = device.layer
    await device.send(layer.send_application_data(b"before"))
    await device.receive_until(b"before")
    server_write_secret = layer.read_secret
    # RFC 8446 4.6.3: update_requested; the server must update before its next record.
    await device.send(
        layer.update_keys(request_peer_update=True) + layer.send_application_data(b"after")
    )
    received, events = await device.receive_until(b"after")
    assert received == b"after"
    assert events[0] == KeyUpdateReceived(update_requested=False)
    assert layer.read_secret != server_write_secret
    session = handler.sessions[0]
    assert isinstance(session, TlsSession)
    assert session.layer.read_seq == 1 and session.layer.write_seq == 1
    # Both directions go on under the new keys.
    await device.send(layer.send_application_data(b"again"))
    assert (await device.receive_until(b"again"))[0] == b"again"


async def test_a_tampered_record_gets_its_alert_and_ends_only_that_session(
    server: DeviceServer, kit: DeviceKit
) -> None:
    other = await connect_tls(tcp(server), kit.other)
    assert await ask(other, b"hi") == b"hi"
    device = await open_layer_device(server, kit.good)
    record = bytearray(device.layer.send_application_data(b"tampered"))
    record[-1] ^= 1  # the tag no longer matches (RFC 8446 5.2)
    await device.send(bytes(record))
    with pytest.raises(PeerAlertError, match="bad_record_mac"):
        await device.events()
    await eventually(lambda: server.stats.closed[("tcp", CloseReason.TRANSPORT_ERROR)] == 1)
    assert await ask(other, b"alive") == b"alive"
    assert len(server.registry) == 1


@pytest.mark.parametrize(
    ("wire", "alert"),
    [
        # A plaintext ClientHello after the handshake: a renegotiation attempt (RFC 8446 5).
        (bytes((22, 3, 3, 0, 4, 1, 0, 0, 0)), "unexpected_message"),
        # A header announcing more than 2^14 + 256 bytes (RFC 8446 5.2).
        (bytes((23, 3, 3, 0x48, 0x01)), "record_overflow"),
    ],
)
async def test_unexpected_records_close_the_session_with_their_alert(
    server: DeviceServer, kit: DeviceKit, wire: bytes, alert: str
) -> None:
    device = await open_layer_device(server, kit.good)
    await device.send(device.layer.send_application_data(b"ok"))
    await device.receive_until(b"ok")
    await device.send(wire)
    with pytest.raises(PeerAlertError, match=alert):
        await device.events()
    await eventually(lambda: server.stats.closed[("tcp", CloseReason.TRANSPORT_ERROR)] == 1)


async def test_close_notify_from_the_device_is_answered(
    server: DeviceServer, kit: DeviceKit
) -> None:
    """The server answers close_notify with its own (RFC 8446 6.1) and closes; the device
    sees no truncation."""
    device = await open_layer_device(server, kit.good)
    await device.send(device.layer.send_application_data(b"bye"))
    await device.receive_until(b"bye")
    await device.send(device.layer.close())
    with trio.fail_after(PATIENCE):
        while data := await device.stream.receive_some():
            assert device.layer.receive_data(data) in ([], [CloseNotifyReceived()])
    assert device.layer.alert_received == AlertDescription.CLOSE_NOTIFY
    await eventually(lambda: server.stats.closed[("tcp", CloseReason.PEER)] == 1)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(rate=1.0)


async def test_quiet_session_drops_its_ciphers_and_goes_on(
    nursery: trio.Nursery,
    kit: DeviceKit,
    directory: MemoryDeviceDirectory,
    clock: trio.testing.MockClock,
) -> None:
    handler = EchoHandler()
    limits = SessionLimits(handshake_timeout=600.0, idle_timeout=600.0)
    server = await start_device_server(nursery, kit, directory, handler, limits=limits, udp=False)
    stream = await connect_tls(tcp(server), kit.good)
    assert await ask(stream, b"one") == b"one"
    session = handler.sessions[0]
    assert isinstance(session, TlsSession)
    assert session._ciphers_held
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the session waits again
    clock.jump(CIPHER_IDLE_SECONDS + 1)
    await eventually(lambda: not session._ciphers_held)
    assert await ask(stream, b"two") == b"two"  # derived again from the secrets
    assert session._ciphers_held
    await stream.aclose()


# --- the handshake -------------------------------------------------------------------------


def _memory_handshake(
    server_context: SSL.Context,
    client_context: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, Tls13Handover, list[bytes]]:
    """Our server handshake against a stdlib (OpenSSL) client on memory BIOs; returns the
    client, its incoming BIO, the hand-over and the server's flights."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(incoming, outgoing)
    if session is not None:
        client.session = session
    handshake = _ServerHandshake(server_context)
    flights: list[bytes] = []
    for _ in range(10):
        with contextlib.suppress(ssl.SSLWantReadError):
            client.do_handshake()
        data = outgoing.read()
        if data:
            handshake.receive_data(data)
        flight = handshake.data_to_send()
        if handshake.complete:
            return client, incoming, handshake.take_over(), [*flights, flight]
        if flight:
            flights.append(flight)
            incoming.write(flight)
    raise AssertionError("the handshake did not complete")


def test_one_ticket_is_sent_and_it_resumes(kit: DeviceKit) -> None:
    """OpenSSL writes two tickets; the server sends one (the write sequence continues after
    it) and the device resumes with it."""
    client_context = kit.good.tls_context()
    server_context = make_tls_handshake_context(kit.pki)  # its ticket key decrypts them
    client, incoming, handover, flights = _memory_handshake(server_context, client_context)
    assert handover.write_seq == 2  # OpenSSL's two tickets
    assert server_hello_resumes(flights[0]) is False
    tickets, handover = _keep_tickets(flights[-1], handover, 1)
    assert len(tickets) < len(flights[-1]) and handover.write_seq == 1
    layer = handover.record_layer()
    incoming.write(tickets + layer.send_application_data(b"sealed after one ticket"))
    assert client.read(100) == b"sealed after one ticket"
    assert client.session is not None and client.session.has_ticket

    again, incoming, handover, flights = _memory_handshake(
        server_context, client_context, client.session
    )
    assert server_hello_resumes(flights[0]) is True
    tickets, handover = _keep_tickets(flights[-1], handover, 1)
    incoming.write(tickets + handover.record_layer().send_application_data(b"resumed"))
    assert again.read(100) == b"resumed"
    assert again.session_reused


def test_server_hello_resumes_reads_only_server_hellos() -> None:
    assert server_hello_resumes(b"") is None
    assert server_hello_resumes(bytes((21, 3, 3, 0, 2, 2, 40))) is None  # an alert
    hello_retry = bytes.fromhex(
        "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
    )
    body = b"\x03\x03" + hello_retry + b"\x00" + b"\x13\x01" + b"\x00" + b"\x00\x00"
    message = bytes((2,)) + len(body).to_bytes(3, "big") + body
    record = bytes((22, 3, 3)) + len(message).to_bytes(2, "big") + message
    assert server_hello_resumes(record) is None  # RFC 8446 4.1.4: not the real one yet


def test_a_tampered_ticket_flight_is_kept_whole(kit: DeviceKit) -> None:
    """Only records proven to hold tickets are dropped."""
    _, _, handover, flights = _memory_handshake(
        make_tls_handshake_context(kit.pki), kit.good.tls_context()
    )
    tampered = bytearray(flights[-1])
    tampered[-1] ^= 1
    kept, same = _keep_tickets(bytes(tampered), handover, 1)
    assert kept == bytes(tampered) and same is handover
    key, _ = traffic_key_and_iv(handover.suite, handover.write_secret)
    assert key  # the hand-over still names the key the records were sealed under


@pytest.mark.parametrize(
    "garbage", [b"GET / HTTP/1.1\r\n", bytes(range(5)), b"\x16\x02\x01\x00\x05"]
)
def test_bytes_that_are_not_a_tls_record_fail_the_handshake_at_once(
    kit: DeviceKit, garbage: bytes
) -> None:
    """The handshake does not wait for the body a garbage header announces."""
    handshake = Tls13Handshake(make_tls_handshake_context(kit.pki), is_server=True)
    with pytest.raises(RecordHandoverError):
        handshake.receive_data(garbage)
    handshake.abort()


async def test_expired_certificate_detail_comes_from_openssl(
    server: DeviceServer, kit: DeviceKit, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="otacloud.devices")
    with contextlib.suppress(trio.BrokenResourceError):
        stream = await connect_tls(tcp(server), kit.expired)
        with trio.fail_after(PATIENCE):
            await stream.send_all(b"who")
            await stream.receive_some()
    await eventually(lambda: server.stats.refused[("tcp", RefuseReason.HANDSHAKE_FAILED)] == 1)
    assert "certificate has expired (chain depth 0)" in caplog.text


# --- openssl s_client against the server ----------------------------------------------------

OPENSSL = shutil.which("openssl")


@contextlib.asynccontextmanager
async def s_client(server: DeviceServer, device: DeviceCredentials) -> AsyncIterator[trio.Process]:
    assert OPENSSL is not None
    command = [
        OPENSSL, "s_client", "-tls1_3", "-alpn", "coap",
        "-connect", f"127.0.0.1:{tcp(server)[1]}",
        "-cert", str(device.cert_path), "-key", str(device.key_path),
        "-CAfile", str(device.ca_path), "-verify_return_error",
    ]  # fmt: skip
    process = await trio.lowlevel.open_process(
        command, stdin=-1, stdout=-1, stderr=-2  # pipes; stderr into stdout
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def read_until(process: trio.Process, wanted: bytes, seen: bytearray) -> None:
    assert process.stdout is not None
    with trio.fail_after(PATIENCE):
        while wanted not in seen:
            chunk = await process.stdout.receive_some()
            assert chunk, f"s_client ended before printing {wanted!r}: {bytes(seen)!r}"
            seen += chunk


@pytest.mark.skipif(OPENSSL is None, reason="needs openssl")
async def test_openssl_s_client_key_update_and_quit(
    server: DeviceServer, kit: DeviceKit, handler: EchoHandler
) -> None:
    """s_client's ``K`` sends KeyUpdate(update_requested) (RFC 8446 4.6.3): the server
    answers it before its next record, which s_client then reads."""
    async with s_client(server, kit.good) as process:
        assert process.stdin is not None
        seen = bytearray()
        await process.stdin.send_all(b"hello\n")
        await read_until(process, b"hello", seen)
        session = handler.sessions[0]
        assert isinstance(session, TlsSession)
        first_secret = session.layer.read_secret
        # Each command must be alone in its chunk of s_client's stdin.
        await process.stdin.send_all(b"K\n")
        await eventually(lambda: session.layer.read_secret != first_secret)
        await process.stdin.send_all(b"after the update\n")
        await read_until(process, b"after the update", seen)
        assert session.layer.write_seq == 1  # our KeyUpdate reset it, then one record
        await process.stdin.send_all(b"Q\n")  # close_notify
        assert await process.wait() == 0
    await eventually(lambda: server.stats.closed[("tcp", CloseReason.PEER)] == 1)
    assert server.stats.full_handshakes["tcp"] == 1


# --- the idle sweeper ---------------------------------------------------------------------


class FakeSession:
    """A session as the sweeper sees it: last traffic at ``last``; ``sending`` refuses."""

    def __init__(self, last: float, sending: bool = False) -> None:
        self.last = last
        self.sending = sending
        self.rested = 0

    def quiet_for(self, now: float) -> float:
        return now - self.last

    def rest(self) -> bool:
        if self.sending:
            return False
        self.rested += 1
        return True


def test_sweeper_rests_quiet_sessions_and_trims_after_frees() -> None:
    calls: list[int] = []

    def trim(pad: int) -> int:
        calls.append(pad)
        return 1

    sweeper = IdleSweeper(trim, quiet_after=5.0, trim_interval=2.0)
    quiet, busy, sending = FakeSession(0.0), FakeSession(4.0), FakeSession(0.0, sending=True)
    for session in (quiet, busy, sending):
        sweeper.busy(session)
    assert sweeper.sweep(5.0) == 1
    assert (quiet.rested, busy.rested, sending.rested) == (1, 0, 0)
    assert sweeper.holding_ciphers == 2  # the sending one is tried again next sweep
    assert calls == [0] and sweeper.trims == 1
    # Nothing freed since: no trim. A handshake ended: a trim, but not within 2 s.
    assert sweeper.sweep(6.0) == 0 and sweeper.trims == 1
    sweeper.note_freed()
    sweeper.sweep(6.5)
    assert sweeper.trims == 1
    sweeper.sweep(7.0)
    assert sweeper.trims == 2
    sending.sending = False
    assert sweeper.sweep(9.0) == 2  # busy is quiet too by now
    sweeper.forget(busy)
    assert sweeper.holding_ciphers == 0


async def test_a_session_joins_the_sweeper_once_per_busy_spell(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    handler = EchoHandler()
    server = await start_device_server(nursery, kit, directory, handler, udp=False)
    stream = await connect_tls(tcp(server), kit.good)
    assert await ask(stream, b"one") == b"one"
    session = handler.sessions[0]
    assert isinstance(session, TlsSession) and session._sweeper is not None
    assert session._sweeper.holding_ciphers == 1
    await stream.aclose()
    await eventually(lambda: server.stats.closed[("tcp", CloseReason.PEER)] == 1)
    assert session._sweeper.holding_ciphers == 0  # an ended session is forgotten


async def test_the_sweeper_follows_the_operators_settings(
    nursery: trio.Nursery,
    kit: DeviceKit,
    directory: MemoryDeviceDirectory,
    clock: trio.testing.MockClock,
) -> None:
    """``cipher_idle_timeout`` and ``idle_sweep_interval`` (``[sessions]``) drive when a
    quiet session drops its ciphers; ``heap_trim_interval = 0`` never trims."""
    handler = EchoHandler()
    limits = SessionLimits(handshake_timeout=600.0, idle_timeout=600.0,
                           cipher_idle_timeout=50.0, idle_sweep_interval=10.0,
                           heap_trim_interval=0.0)  # fmt: skip
    server = await start_device_server(nursery, kit, directory, handler, limits=limits, udp=False)
    stream = await connect_tls(tcp(server), kit.good)
    assert await ask(stream, b"one") == b"one"
    session = handler.sessions[0]
    assert isinstance(session, TlsSession) and session._sweeper is not None
    sweeper = session._sweeper
    assert (sweeper.quiet_after, sweeper.interval) == (50.0, 10.0) and not sweeper.can_trim
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    clock.jump(CIPHER_IDLE_SECONDS * 4)  # far past the default: sweeps ran, kept them
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    assert session._ciphers_held
    clock.jump(50.0 + 10.0)
    await eventually(lambda: not session._ciphers_held)
    assert sweeper.trims == 0
    assert await ask(stream, b"two") == b"two"
    await stream.aclose()


def test_sweeper_settings_are_checked_and_reach_the_sweeper() -> None:
    limits = SessionLimits(cipher_idle_timeout=7.5, idle_sweep_interval=0.5,
                           heap_trim_interval=30.0)  # fmt: skip
    sweeper = IdleSweeper.from_limits(limits)
    assert (sweeper.quiet_after, sweeper.interval, sweeper.trim_interval) == (7.5, 0.5, 30.0)
    assert sweeper.can_trim  # glibc here
    assert not IdleSweeper.from_limits(SessionLimits(heap_trim_interval=0)).can_trim
    for bad in ({"cipher_idle_timeout": 0}, {"idle_sweep_interval": -1},
                {"heap_trim_interval": -0.5}):  # fmt: skip
        with pytest.raises(ValidationError, match=next(iter(bad))):
            SessionLimits(**bad)  # type: ignore[arg-type]
    overridden = SessionLimits.with_overrides({"cipher_idle_timeout": "12"})
    assert overridden.cipher_idle_timeout == 12.0


def test_the_sweeper_finds_glibc_here() -> None:
    """This machine's C library is glibc: the heap is trimmed (elsewhere only ciphers drop)."""
    assert IdleSweeper().can_trim


# --- sends larger than the socket buffer -----------------------------------------------------


class BulkHandler(EchoHandler):
    """Answers ``bulk`` with ``BULK`` bytes in one send (far more than the socket buffers
    hold, so the write completes only as the device reads)."""

    BULK = bytes(range(256)) * (16 * 4096)  # 16 MiB

    async def run(self, session: DeviceSession) -> None:
        self.sessions.append(session)
        while True:
            if await session.receive() == b"bulk":
                await session.send(self.BULK)


async def test_a_send_larger_than_the_socket_buffer_arrives_whole(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    server = await start_device_server(nursery, kit, directory, BulkHandler(), udp=False)
    stream = await connect_tls(tcp(server), kit.good)
    await stream.send_all(b"bulk")
    received = bytearray()
    with trio.fail_after(PATIENCE):
        while len(received) < len(BulkHandler.BULK):
            received += await stream.receive_some(1 << 20)
    assert received == BulkHandler.BULK
    await stream.aclose()


async def test_a_device_that_stops_reading_is_closed_after_the_send_timeout(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    limits = dataclasses.replace(FAST_LIMITS, send_timeout=0.5)
    server = await start_device_server(
        nursery, kit, directory, BulkHandler(), limits=limits, udp=False
    )
    stream = await connect_tls(tcp(server), kit.good)
    await stream.send_all(b"bulk")  # and never read the answer
    await eventually(lambda: server.stats.closed[("tcp", CloseReason.SEND_TIMEOUT)] == 1)
    assert len(server.registry) == 0
    await trio.aclose_forcefully(stream)
