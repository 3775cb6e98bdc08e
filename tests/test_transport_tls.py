"""The TCP device shell: TLS 1.3 mutual auth, refusals, limits, revocation, shutdown.

Also holds the device PKI kit and the echo handler that the DTLS and openssl interop tests
import (helpers only; no tests are imported).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.authorization import ClientCertificate, MemoryDeviceDirectory
from server.identity import (
    InstallationPki,
    init_pki,
    issue_device_certificate,
    new_device_id,
    new_device_key,
    pki_dir,
    provision_devices,
    write_device_credentials,
)
from server.transport import (
    CloseReason,
    DeviceServer,
    DeviceServerConfig,
    DeviceSession,
    RefuseReason,
    SessionLimits,
    serve_devices,
)
from server.transport.client import DeviceCredentials, connect_tls

# --- shared kit -------------------------------------------------------------------------


@dataclass
class DeviceKit:
    """An installation PKI and devices of every kind the tests need."""

    pki: InstallationPki
    good: DeviceCredentials
    good_id: str
    other: DeviceCredentials
    other_id: str
    unknown: DeviceCredentials
    revoked: DeviceCredentials
    revoked_id: str
    expired: DeviceCredentials
    foreign: DeviceCredentials
    server_as_client: DeviceCredentials
    not_a_device: DeviceCredentials
    registered: list[str] = field(default_factory=list)

    def directory(self) -> MemoryDeviceDirectory:
        """A fresh directory: good, other, expired and revoked registered; revoked revoked."""
        directory = MemoryDeviceDirectory(self.registered)
        directory.revoke(self.revoked_id)
        return directory


def _signed_leaf(pki: InstallationPki, root: Path, name: str, builder_tweak: str) -> Path:
    """A CA-signed clientAuth certificate whose CN is not a device id."""
    key = new_device_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, builder_tweak)]))
        .issuer_name(pki.ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(pki.ca_key, hashes.SHA256())
    )
    directory = root / name
    write_device_credentials(directory, cert, key)
    return directory


def make_device_kit(root: Path) -> DeviceKit:
    """Create the PKI under ``root/data`` and the kit's devices under ``root/devices``."""
    ca_dir = pki_dir(root / "data")
    out = root / "devices"
    good, other, unknown, revoked = provision_devices(ca_dir, 4, out)
    pki = init_pki(ca_dir)
    ca_path = out / "ca.pem"

    def creds(directory: Path) -> DeviceCredentials:
        return DeviceCredentials(directory / "cert.pem", directory / "key.pem", ca_path)

    expired_id = new_device_id()
    expired_key = new_device_key()
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired_cert = issue_device_certificate(
        pki.ca_cert,
        pki.ca_key,
        expired_id,
        expired_key.public_key(),
        not_before=past - dt.timedelta(days=1),
        not_after=past,
    )
    write_device_credentials(out / expired_id, expired_cert, expired_key)

    (foreign_device,) = provision_devices(pki_dir(root / "foreign"), 1, root / "foreign-out")
    server_as_client = DeviceCredentials(pki.server_cert_path, pki.server_key_path, ca_path)
    kit = DeviceKit(
        pki=pki,
        good=DeviceCredentials.of(good),
        good_id=good.device_id,
        other=DeviceCredentials.of(other),
        other_id=other.device_id,
        unknown=DeviceCredentials.of(unknown),
        revoked=DeviceCredentials.of(revoked),
        revoked_id=revoked.device_id,
        expired=creds(out / expired_id),
        foreign=DeviceCredentials(foreign_device.cert_path, foreign_device.key_path, ca_path),
        server_as_client=server_as_client,
        not_a_device=creds(_signed_leaf(pki, out, "not-a-device", "not-a-device")),
    )
    kit.registered = [good.device_id, other.device_id, revoked.device_id, expired_id]
    return kit


class EchoHandler:
    """Echoes what it receives. ``who`` answers ``<id>|<transport>|<resumed>``; ``boom``
    raises; ``hush`` gets no answer; on shutdown it says ``come back later``. Remembers its
    sessions."""

    def __init__(self) -> None:
        self.sessions: list[DeviceSession] = []
        #: Messages the handler read, and of those ``hush`` (markers for tests: the
        #: server took them in).
        self.heard = 0
        self.hushed = 0

    async def run(self, session: DeviceSession) -> None:
        self.sessions.append(session)
        while True:
            data = await session.receive()
            self.heard += 1
            if data == b"who":
                reply = f"{session.device_id}|{session.transport}|{session.resumed}".encode()
                await session.send(reply)
            elif data == b"boom":
                raise RuntimeError("handler bug for this message")
            elif data == b"hush":  # a keep-alive that gets no answer
                self.hushed += 1
                continue
            else:
                await session.send(data)

    async def farewell(self, session: DeviceSession) -> None:
        await session.send(b"come back later")


#: Short limits, so the tests of timeouts end quickly; the handshake's is long enough that a
#: good device's handshake, which these servers serve alongside, completes in it on a machine
#: whose cores are busy (1 s was not: "handshake failed" under load).
FAST_LIMITS = SessionLimits(
    handshake_timeout=5.0, idle_timeout=5.0, farewell_timeout=1.0, hello_timeout=1.0
)
#: How long a test waits for something that takes milliseconds on an idle machine: long
#: enough for a machine whose cores are busy with other work, reached only on a failure.
PATIENCE = 20.0


async def start_device_server(
    nursery: trio.Nursery,
    kit: DeviceKit,
    directory: MemoryDeviceDirectory,
    handler: EchoHandler,
    *,
    limits: SessionLimits = FAST_LIMITS,
    tcp: bool = True,
    udp: bool = True,
) -> DeviceServer:
    """Start the real device server on ephemeral loopback ports."""
    config = DeviceServerConfig(
        pki_dir=kit.pki.directory,
        host="127.0.0.1",
        tcp_port=0 if tcp else None,
        udp_port=0 if udp else None,
        limits=limits,
    )
    server: DeviceServer = await nursery.start(
        serve_devices, config, lambda session: handler, directory
    )
    return server


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> DeviceKit:
    return make_device_kit(tmp_path_factory.mktemp("tls-kit"))


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


def tcp(server: DeviceServer) -> tuple[str, int]:
    assert server.tcp_address is not None
    return server.tcp_address


async def ask(stream: trio.SSLStream[trio.SocketStream], message: bytes) -> bytes:
    await stream.send_all(message)
    with trio.fail_after(PATIENCE):
        return bytes(await stream.receive_some())


async def eventually(condition: Callable[[], bool], timeout: float = PATIENCE) -> None:
    """Wait until ``condition()`` holds (server bookkeeping finishes after the client sees
    the connection end)."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


def client_hello(credentials: DeviceCredentials) -> bytes:
    """A device's whole first flight: its TLS 1.3 ClientHello (RFC 8446 section 4.1.2)."""
    tls = credentials.tls_context().wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO())
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def start_stalled_tls(
    server: DeviceServer, credentials: DeviceCredentials, how: str,
    local_address: str | None = None,
) -> trio.SocketStream:
    """A TCP connection whose TLS handshake then stalls. ``how``: ``"byte"`` sends the first
    byte of a ClientHello (RFC 8446 section 5.1: ContentType handshake(22)); ``"hello"``
    sends a whole ClientHello and reads the start of the server's answer (the server has
    computed its first flight). ``local_address``: the source address."""
    stream = await trio.open_tcp_stream(*tcp(server), local_address=local_address)
    if how == "byte":
        await stream.send_all(b"\x16")
    else:
        await stream.send_all(client_hello(credentials))
        with trio.fail_after(PATIENCE):
            assert await stream.receive_some()  # ServerHello ... Finished
    return stream


async def outcome(server: DeviceServer, credentials: DeviceCredentials) -> str:
    """What a device sees: its identity answer, or how the connection ended."""
    try:
        stream = await connect_tls(tcp(server), credentials)
    except trio.BrokenResourceError:
        return "handshake failed"
    try:
        answer = await ask(stream, b"who")
    except trio.BrokenResourceError:
        return "broken"
    finally:
        await trio.aclose_forcefully(stream)
    return answer.decode() or "closed"


# --- tests -------------------------------------------------------------------------------


async def test_device_session_is_bound_to_the_certificate_device_id(
    server: DeviceServer, kit: DeviceKit, handler: EchoHandler
) -> None:
    stream = await connect_tls(tcp(server), kit.good)
    assert stream.selected_alpn_protocol() == "coap"
    assert stream.version() == "TLSv1.3"
    assert await ask(stream, b"who") == f"{kit.good_id}|tcp|False".encode()
    assert await ask(stream, b"hello") == b"hello"
    assert server.registry.get(kit.good_id) is handler.sessions[0]
    assert server.stats.full_handshakes["tcp"] == 1
    await stream.aclose()


async def test_session_ticket_resumes_and_is_reauthorized(
    server: DeviceServer, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    context = kit.good.tls_context()
    first = await connect_tls(tcp(server), kit.good, context=context)
    await ask(first, b"hello")  # the ticket arrives with the first server data
    ticket_session = first.session
    await first.aclose()
    second = await connect_tls(tcp(server), kit.good, context=context, session=ticket_session)
    assert second.session_reused
    assert await ask(second, b"who") == f"{kit.good_id}|tcp|True".encode()
    assert server.stats.resumed_handshakes["tcp"] == 1
    await second.aclose()
    # Revocation applies to resumed handshakes too.
    directory.revoke(kit.good_id)
    third = await connect_tls(tcp(server), kit.good, context=context, session=ticket_session)
    assert third.session_reused
    with trio.fail_after(PATIENCE):
        assert await third.receive_some() == b""  # close_notify right after the handshake
    assert server.stats.refused[("tcp", RefuseReason.NOT_AUTHORIZED)] == 1


@pytest.mark.parametrize(
    ("device", "reason", "detail"),
    [
        ("unknown", RefuseReason.NOT_AUTHORIZED, ""),
        ("revoked", RefuseReason.NOT_AUTHORIZED, ""),
        ("expired", RefuseReason.HANDSHAKE_FAILED, "certificate has expired"),
        ("foreign", RefuseReason.HANDSHAKE_FAILED, "unable to get local issuer certificate"),
        ("server_as_client", RefuseReason.HANDSHAKE_FAILED, "unsuitable certificate purpose"),
        ("not_a_device", RefuseReason.BAD_CERTIFICATE, "URI SAN"),
    ],
)
async def test_bad_devices_are_refused_and_others_still_served(
    server: DeviceServer,
    kit: DeviceKit,
    device: str,
    reason: str,
    detail: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG", logger="otacloud.devices")
    result = await outcome(server, getattr(kit, device))
    assert result in {"closed", "broken"}, result
    assert server.stats.refused[("tcp", reason)] == 1
    assert detail in caplog.text
    assert sum(server.stats.refused.values()) == 1
    assert len(server.registry) == 0
    assert await outcome(server, kit.good) == f"{kit.good_id}|tcp|False"


async def test_client_without_certificate_is_refused(server: DeviceServer, kit: DeviceKit) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(kit.good.ca_path))
    context.check_hostname = False
    bare = trio.SSLStream(await trio.open_tcp_stream(*tcp(server)), context)
    with pytest.raises(trio.BrokenResourceError):
        await bare.do_handshake()
        await ask(bare, b"who")
    await trio.aclose_forcefully(bare)
    assert server.stats.refused[("tcp", RefuseReason.HANDSHAKE_FAILED)] == 1
    assert await outcome(server, kit.good) == f"{kit.good_id}|tcp|False"


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x00\x05hello",  # a TLS record header with a nonsense handshake
        bytes(range(256)) * 4,
    ],
)
async def test_garbage_instead_of_client_hello(
    server: DeviceServer, kit: DeviceKit, garbage: bytes
) -> None:
    raw = await trio.open_tcp_stream(*tcp(server))
    await raw.send_all(garbage)
    with trio.fail_after(PATIENCE):
        while True:
            try:
                if not await raw.receive_some():
                    break
            except trio.BrokenResourceError:  # reset by the server
                break
    await raw.aclose()
    assert server.stats.refused[("tcp", RefuseReason.HANDSHAKE_FAILED)] == 1
    assert await outcome(server, kit.good) == f"{kit.good_id}|tcp|False"


async def test_silent_client_is_closed_without_ever_holding_a_slot(
    server: DeviceServer, kit: DeviceKit
) -> None:
    """A connection that sends nothing waits for its ClientHello outside the handshake
    slots, and is closed after ``hello_timeout``."""
    silent = await trio.open_tcp_stream(*tcp(server))
    start = trio.current_time()
    await eventually(lambda: server.host.pending_connections == 1)
    assert server.host.handshakes_in_progress == 0
    assert await outcome(server, kit.good) == f"{kit.good_id}|tcp|False"
    with trio.fail_after(PATIENCE):
        assert await silent.receive_some() == b""
    # Not before the timeout (timers never fire early), and because of it.
    assert trio.current_time() - start >= FAST_LIMITS.hello_timeout * 0.9
    assert server.stats.refused[("tcp", RefuseReason.SILENT)] == 1
    assert server.stats.refused[("tcp", RefuseReason.HANDSHAKE_TIMEOUT)] == 0
    await silent.aclose()


@pytest.mark.parametrize("how", ["byte", "hello"])
async def test_stalled_handshake_holds_no_slot_and_times_out(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory, how: str
) -> None:
    """A connection that starts its handshake and stalls (after one byte, or after the
    server answered its ClientHello) holds no handshake slot while it waits: with a single
    slot, another device is served meanwhile. It is closed at the handshake timeout."""
    limits = dataclasses.replace(FAST_LIMITS, max_handshakes=1)
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=limits)
    stalled = await start_stalled_tls(server, kit.other, how)
    start = trio.current_time()
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the server took it all in
    assert server.host.handshakes_in_progress == 0
    assert await outcome(server, kit.good) == f"{kit.good_id}|tcp|False"
    with trio.fail_after(PATIENCE):
        with contextlib.suppress(trio.BrokenResourceError):  # closed, or reset unread
            while await stalled.receive_some():
                pass
    # Not before the timeout (timers never fire early), and because of it.
    assert trio.current_time() - start >= limits.handshake_timeout * 0.9
    assert server.stats.refused[("tcp", RefuseReason.HANDSHAKE_TIMEOUT)] == 1
    assert server.host.handshakes_in_progress == 0
    await stalled.aclose()


async def test_revoking_closes_the_live_session(
    server: DeviceServer, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    stream = await connect_tls(tcp(server), kit.good)
    await ask(stream, b"hello")
    directory.revoke(kit.good_id)
    assert server.registry.close_device(kit.good_id)
    with trio.fail_after(PATIENCE):
        assert await stream.receive_some() == b""  # close_notify
    assert await outcome(server, kit.good) == "closed"
    await eventually(lambda: server.stats.closed[("tcp", CloseReason.REVOKED)] == 1)
    assert not server.registry.close_device(kit.good_id)


async def test_new_session_replaces_the_old_one_of_the_same_device(
    server: DeviceServer, kit: DeviceKit
) -> None:
    first = await connect_tls(tcp(server), kit.good)
    await ask(first, b"one")
    second = await connect_tls(tcp(server), kit.good)
    await ask(second, b"two")
    with trio.fail_after(PATIENCE):
        assert await first.receive_some() == b""
    assert await ask(second, b"still") == b"still"


async def test_handler_error_ends_only_its_session(server: DeviceServer, kit: DeviceKit) -> None:
    other = await connect_tls(tcp(server), kit.other)
    await ask(other, b"hi")
    failing = await connect_tls(tcp(server), kit.good)
    await failing.send_all(b"boom")
    with trio.fail_after(PATIENCE):
        assert await failing.receive_some() == b""
    await eventually(lambda: server.stats.closed[("tcp", CloseReason.HANDLER_ERROR)] == 1)
    assert await ask(other, b"alive") == b"alive"


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Trio's clock for the test: real time, plus the jumps the test makes (so the test
    decides when a timeout fires, however slow or busy the machine)."""
    return trio.testing.MockClock(rate=1.0)


async def test_idle_session_is_closed_and_traffic_keeps_it_open(
    nursery: trio.Nursery,
    kit: DeviceKit,
    directory: MemoryDeviceDirectory,
    clock: trio.testing.MockClock,
) -> None:
    limits = SessionLimits(handshake_timeout=600.0, idle_timeout=600.0)
    handler = EchoHandler()
    server = await start_device_server(nursery, kit, directory, handler, limits=limits)
    busy = await connect_tls(tcp(server), kit.good)
    idle = await connect_tls(tcp(server), kit.other)
    await ask(idle, b"x")
    await ask(busy, b"x")
    start = trio.current_time()
    clock.jump(400)  # both quiet for 400 of their 600 s
    await busy.send_all(b"hush")  # an unanswered keep-alive
    await eventually(lambda: handler.hushed == 1)
    clock.jump(300)  # idle: 700 s quiet; busy: 300 s since its keep-alive
    with trio.fail_after(PATIENCE):
        assert await idle.receive_some() == b""
    assert await ask(busy, b"ping") == b"ping"
    assert trio.current_time() - start >= limits.idle_timeout
    await eventually(lambda: server.stats.closed[("tcp", CloseReason.IDLE)] == 1)
    assert server.stats.closed[("tcp", CloseReason.IDLE)] == 1


async def test_read_rate_limit_slows_a_flooding_device(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    limits = SessionLimits(
        handshake_timeout=1.0, bytes_per_second=100_000, byte_burst=10_000, max_message_size=4096
    )
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=limits)
    stream = await connect_tls(tcp(server), kit.good)
    payload = b"x" * 70_000
    start = trio.current_time()
    async with trio.open_nursery() as inner:
        inner.start_soon(stream.send_all, payload)
        received = 0
        with trio.fail_after(PATIENCE):
            while received < len(payload):
                chunk = await stream.receive_some()
                assert len(chunk) <= 4096 or received > 0  # server reads at most 4 KiB at once
                received += len(chunk)
    # (70,000 - 10,000 burst) bytes at 100,000 bytes/s take at least 0.6 s.
    assert trio.current_time() - start >= 0.55


async def test_session_limit_refuses_extra_connections(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    limits = SessionLimits(handshake_timeout=1.0, max_sessions=1)
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=limits)
    first = await connect_tls(tcp(server), kit.good)
    await ask(first, b"x")
    assert await outcome(server, kit.other) in {"handshake failed", "broken", "closed"}
    assert server.stats.refused[("tcp", RefuseReason.SERVER_FULL)] == 1
    assert await ask(first, b"y") == b"y"


async def test_graceful_shutdown_says_farewell_then_close_notify(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    server = await start_device_server(nursery, kit, directory, EchoHandler(), udp=False)
    stream = await connect_tls(tcp(server), kit.good)
    await ask(stream, b"x")
    address = tcp(server)
    with trio.fail_after(PATIENCE):
        await server.shutdown()
        received = b""
        while chunk := await stream.receive_some():
            received += chunk
    assert received == b"come back later"
    assert server.stats.closed[("tcp", CloseReason.SHUTDOWN)] == 1
    with pytest.raises(OSError):
        await trio.open_tcp_stream(*address)


async def test_port_zero_and_disabled_transport(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    server = await start_device_server(nursery, kit, directory, EchoHandler(), udp=False)
    assert server.udp_address is None
    assert tcp(server)[1] > 0
    probe = socket.socket()
    probe.settimeout(2)
    probe.connect(tcp(server))
    probe.close()


class _DirectoryDown(MemoryDeviceDirectory):
    """A directory whose backing store fails for one device (e.g. a database outage)."""

    def __init__(self, device_ids: list[str], failing: str) -> None:
        super().__init__(device_ids)
        self.failing = failing

    async def authorize(self, certificate: ClientCertificate) -> bool:
        if certificate.device_id == self.failing:
            raise OSError("database is unreachable")
        return await super().authorize(certificate)


async def test_directory_failure_refuses_without_stopping_the_server(
    nursery: trio.Nursery, kit: DeviceKit
) -> None:
    directory = _DirectoryDown(kit.registered, failing=kit.other_id)
    server = await start_device_server(nursery, kit, directory, EchoHandler(), udp=False)
    assert await outcome(server, kit.other) == "closed"
    assert server.stats.refused[("tcp", RefuseReason.DIRECTORY_ERROR)] == 1
    assert await outcome(server, kit.good) == f"{kit.good_id}|tcp|False"


class SlowDirectory(MemoryDeviceDirectory):
    """Answers only once ``release`` is set (a store read in flight)."""

    def __init__(self, device_ids: list[str]) -> None:
        super().__init__(device_ids)
        self.asked = trio.Event()
        self.release = trio.Event()

    async def authorize(self, certificate: ClientCertificate) -> bool:
        answer = await super().authorize(certificate)
        self.asked.set()
        await self.release.wait()
        return answer


async def test_a_revocation_during_authorization_refuses_the_handshake(
    nursery: trio.Nursery, kit: DeviceKit
) -> None:
    """The directory said yes before the revocation committed; the revocation's event came
    before the answer did, with no session yet to close: the handshake is refused anyway."""
    directory = SlowDirectory(kit.registered)
    server = await start_device_server(nursery, kit, directory, EchoHandler(), udp=False)
    result: list[str] = []

    async def device() -> None:
        result.append(await outcome(server, kit.good))

    async with trio.open_nursery() as inner:
        inner.start_soon(device)
        await directory.asked.wait()
        assert not server.registry.close_device(kit.good_id)  # the DEVICE_REVOKED handler
        directory.release.set()
    assert result == ["closed"]
    assert server.stats.refused[("tcp", RefuseReason.NOT_AUTHORIZED)] == 1
    assert server.stats.full_handshakes["tcp"] == 0
    # A later handshake is asked afresh (the directory, not the registry, decides).
    assert await outcome(server, kit.good) == f"{kit.good_id}|tcp|False"
