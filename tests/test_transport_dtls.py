"""The UDP device shell: DTLS 1.2 mutual auth on the server's own UDP endpoint (devices
use trio.DTLSEndpoint: real OpenSSL peers), refusals, limits, revocation, close_notify,
idle expiry, fresh client contexts, shutdown; and what the endpoint adds: no OpenSSL object
per established session, discarded records counted by reason, a device restarting on the
same address, idle sessions' AEADs released."""

from __future__ import annotations

import gc
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress

import pytest
import trio
import trio.testing
from OpenSSL import SSL

from server.authorization import MemoryDeviceDirectory
from server.transport import (
    CloseReason,
    DeviceServer,
    DeviceSession,
    RefuseReason,
    SessionLimits,
)
from server.transport.client import (
    DeviceCredentials,
    connect_dtls,
    dtls_session,
    dtls_session_reused,
)
from server.transport.dtls import DTLS1_2_VERSION, send_close_notify
from server.transport.server import DeviceServerConfig, serve_devices
from server.transport.udp_endpoint import UdpEndpoint
from tests.test_transport_tls import (
    FAST_LIMITS,
    PATIENCE,
    DeviceKit,
    EchoHandler,
    eventually,
    make_device_kit,
    start_device_server,
)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> DeviceKit:
    return make_device_kit(tmp_path_factory.mktemp("dtls-kit"))


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
    return await start_device_server(nursery, kit, directory, handler, tcp=False)


def udp(server: DeviceServer) -> tuple[str, int]:
    assert server.udp_address is not None
    return server.udp_address


@asynccontextmanager
async def endpoint() -> AsyncIterator[trio.DTLSEndpoint]:
    sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    with trio.DTLSEndpoint(sock) as dtls_endpoint:
        yield dtls_endpoint


@asynccontextmanager
async def device(
    server: DeviceServer, credentials: DeviceCredentials, session: SSL.Session | None = None
) -> AsyncIterator[trio.DTLSChannel]:
    async with endpoint() as dtls_endpoint:
        with trio.fail_after(PATIENCE):
            channel = await connect_dtls(dtls_endpoint, udp(server), credentials, session=session)
        yield channel


async def ask(channel: trio.DTLSChannel, message: bytes) -> bytes:
    await channel.send(message)
    with trio.fail_after(PATIENCE):
        return await channel.receive()


def refusals(server: DeviceServer) -> int:
    return sum(server.stats.refused.values())


#: Refusals after a completed handshake: the server then sends a close_notify (the device
#: sees "closed"). Every other refusal gives up on the handshake (the device sees nothing).
AFTER_HANDSHAKE = {
    RefuseReason.NOT_AUTHORIZED,
    RefuseReason.BAD_CERTIFICATE,
    RefuseReason.DIRECTORY_ERROR,
}


@contextmanager
def refusals_of(server: DeviceServer, peer: tuple[str, int]) -> Iterator[list[tuple[str, str]]]:
    """Record (reason, detail) of each connection from ``peer`` the server refuses while
    the block runs: other peers' refusals (a silent handshake timing out meanwhile) are
    not this device's."""
    host = server.host
    seen: list[tuple[str, str]] = []
    refuse = host.refuse

    def recording(transport: str, reason: str, who: object, detail: str = "") -> None:
        if who == peer:
            seen.append((reason, detail))
        refuse(transport, reason, who, detail)

    setattr(host, "refuse", recording)  # noqa: B010  (this instance only, for the block)
    try:
        yield seen
    finally:
        delattr(host, "refuse")


async def outcome(server: DeviceServer, credentials: DeviceCredentials) -> str:
    """What a device gets: its identity answer, "closed" (close_notify after the handshake)
    or "refused" (the server gave up on the handshake: trio clients retry forever)."""
    result: list[str] = []
    async with endpoint() as dtls_endpoint:
        host, port = dtls_endpoint.socket.getsockname()[:2]
        with refusals_of(server, (host, port)) as refused, trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:

                async def as_device() -> None:
                    try:
                        channel = await connect_dtls(dtls_endpoint, udp(server), credentials)
                        result.append((await ask(channel, b"who")).decode())
                    except SSL.ZeroReturnError:
                        result.append("closed")
                    nursery.cancel_scope.cancel()

                async def watch_server() -> None:
                    # A refusal after the handshake ends in a close_notify: as_device sees it.
                    await eventually(
                        lambda: any(reason not in AFTER_HANDSHAKE for reason, _ in refused)
                    )
                    result.append("refused")
                    nursery.cancel_scope.cancel()

                nursery.start_soon(as_device)
                nursery.start_soon(watch_server)
    return result[0]


async def test_device_session_over_dtls(
    server: DeviceServer, kit: DeviceKit, handler: EchoHandler
) -> None:
    async with device(server, kit.good) as channel:
        assert await ask(channel, b"who") == f"{kit.good_id}|udp|False".encode()
        assert await ask(channel, b"x" * 1000) == b"x" * 1000
        assert server.registry.get(kit.good_id) is handler.sessions[0]
        assert handler.sessions[0].peer[0] == "127.0.0.1"
    assert server.stats.full_handshakes["udp"] == 1


async def test_dtls_session_resumption(server: DeviceServer, kit: DeviceKit) -> None:
    async with device(server, kit.good) as channel:
        await ask(channel, b"hello")
        saved = dtls_session(channel)
    assert saved is not None
    async with device(server, kit.good, session=saved) as channel:
        assert dtls_session_reused(channel)
        assert await ask(channel, b"who") == f"{kit.good_id}|udp|True".encode()
    assert server.stats.resumed_handshakes["udp"] == 1


@pytest.mark.parametrize(
    ("which", "reason", "detail"),
    [
        ("unknown", RefuseReason.NOT_AUTHORIZED, ""),
        ("revoked", RefuseReason.NOT_AUTHORIZED, ""),
        ("not_a_device", RefuseReason.BAD_CERTIFICATE, "URI SAN"),
        ("expired", RefuseReason.HANDSHAKE_FAILED, "certificate has expired"),
        ("foreign", RefuseReason.HANDSHAKE_FAILED, "unable to get local issuer certificate"),
        ("server_as_client", RefuseReason.HANDSHAKE_FAILED, "unsuitable certificate purpose"),
    ],
)
async def test_bad_devices_are_refused_and_others_still_served(
    server: DeviceServer,
    kit: DeviceKit,
    which: str,
    reason: str,
    detail: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG", logger="otacloud.devices")
    result = await outcome(server, getattr(kit, which))
    # Authorization follows a completed handshake and ends with a close_notify; a
    # certificate that fails verification never completes one.
    assert result == ("closed" if reason in AFTER_HANDSHAKE else "refused")
    assert server.stats.refused[("udp", reason)] == 1
    assert refusals(server) == 1
    assert detail in caplog.text
    assert len(server.registry) == 0
    assert await outcome(server, kit.good) == f"{kit.good_id}|udp|False"


async def test_garbage_datagrams_are_ignored(server: DeviceServer, kit: DeviceKit) -> None:
    sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await sock.connect(udp(server))
    noise = random.Random(19)
    for datagram in (
        noise.randbytes(300),
        b"\x16\xfe\xfd" + bytes(10),  # a DTLS handshake record header, truncated
        b"\x16\xfe\xfd" + bytes(8) + b"\x00\x30\x01" + noise.randbytes(47),  # bogus ClientHello
        b"\x17\xfe\xfd" + noise.randbytes(40),  # application data without a session
        b"",
    ):
        await sock.send(datagram)
    sock.close()
    assert await outcome(server, kit.good) == f"{kit.good_id}|udp|False"
    assert refusals(server) == 0


async def start_silent_handshake(
    server: DeviceServer, credentials: DeviceCredentials, local_address: str | None = None
) -> trio.socket.SocketType:
    """Pass the cookie exchange as ``credentials``, send the ClientHello with the cookie,
    then go silent: the server holds a half-finished handshake until its timeout. Returns
    the peer's socket (close it when done). ``local_address``: the source address."""
    context = credentials.dtls_context()
    context.set_options(SSL.OP_NO_QUERY_MTU)  # memory BIOs have no MTU to query
    connection = SSL.Connection(context)
    connection.set_connect_state()
    connection.set_ciphertext_mtu(1400)
    sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    if local_address is not None:
        await sock.bind((local_address, 0))
    await sock.connect(udp(server))

    async def flight() -> None:
        with suppress(SSL.WantReadError):
            connection.do_handshake()
        await sock.send(connection.bio_read(65536))

    await flight()  # ClientHello
    with trio.fail_after(PATIENCE):
        connection.bio_write(await sock.recv(65536))  # HelloVerifyRequest (RFC 6347 4.2.1)
    await flight()  # ClientHello with the cookie; then silence
    return sock


async def test_half_finished_handshake_times_out(server: DeviceServer, kit: DeviceKit) -> None:
    """A peer that passes the cookie exchange and then goes silent costs only the timeout."""
    sock = await start_silent_handshake(server, kit.good)
    start = trio.current_time()
    assert await outcome(server, kit.good) == f"{kit.good_id}|udp|False"
    await eventually(
        lambda: server.stats.refused[("udp", RefuseReason.HANDSHAKE_TIMEOUT)] == 1
    )
    assert trio.current_time() - start >= FAST_LIMITS.handshake_timeout * 0.8
    sock.close()


async def test_device_close_notify_does_not_stop_the_server(
    server: DeviceServer, kit: DeviceKit
) -> None:
    """Pitfall 1: ZeroReturnError from a device's close_notify stays inside its session."""
    async with device(server, kit.good) as channel:
        await ask(channel, b"hi")
        await send_close_notify(channel)
    await eventually(lambda: server.stats.closed[("udp", CloseReason.PEER)] == 1)
    assert await outcome(server, kit.other) == f"{kit.other_id}|udp|False"


async def test_idle_dtls_session_expires_with_close_notify(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    """Pitfall 2: trio never expires DTLS sessions; the server's idle deadline does."""
    limits = SessionLimits(handshake_timeout=1.0, idle_timeout=0.5)
    server = await start_device_server(
        nursery, kit, directory, EchoHandler(), limits=limits, tcp=False
    )
    async with device(server, kit.good) as channel:
        await ask(channel, b"x")
        start = trio.current_time()
        with pytest.raises(SSL.ZeroReturnError), trio.fail_after(PATIENCE):
            await channel.receive()
        assert trio.current_time() - start >= 0.4
    await eventually(lambda: server.stats.closed[("udp", CloseReason.IDLE)] == 1)
    assert len(server.registry) == 0


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Trio's clock for the test: real time, plus the jumps the test makes."""
    return trio.testing.MockClock(rate=1.0)


async def test_rate_and_size_limits_drop_datagrams(
    nursery: trio.Nursery,
    kit: DeviceKit,
    directory: MemoryDeviceDirectory,
    clock: trio.testing.MockClock,
) -> None:
    # A burst of 5 datagrams, refilled at one an hour: nothing refills while the test
    # runs, however slow the machine, until the test jumps the clock an hour on.
    limits = SessionLimits(
        handshake_timeout=600.0, idle_timeout=100_000.0, messages_per_second=1 / 3600,
        message_burst=5, max_message_size=64,
    )  # fmt: skip
    handler = EchoHandler()
    server = await start_device_server(nursery, kit, directory, handler, limits=limits, tcp=False)
    async with device(server, kit.good) as channel:
        await channel.send(b"y" * 200)  # over max_message_size: dropped (spends no token)
        for index in range(8):  # the burst: the first 5 are answered, 3 dropped
            await channel.send(b"%d" % index)
        session = handler.sessions[0]
        await eventually(lambda: session.dropped + handler.heard == 9)  # type: ignore[attr-defined]
        clock.jump(3600)  # one more token: the marker gets through after the flood
        await channel.send(b"marker")
        replies = []
        with trio.fail_after(PATIENCE):
            while not replies or replies[-1] != b"marker":
                replies.append(await channel.receive())
        assert replies == [b"0", b"1", b"2", b"3", b"4", b"marker"]
        assert session.dropped == 1 + 3  # type: ignore[attr-defined]


async def test_revoking_and_replacing_close_dtls_sessions(
    server: DeviceServer, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    async with device(server, kit.good) as first, device(server, kit.good) as second:
        assert await ask(second, b"two") == b"two"
        with pytest.raises(SSL.ZeroReturnError), trio.fail_after(PATIENCE):
            await first.receive()  # replaced by the newer session of the same device
        directory.revoke(kit.good_id)
        assert server.registry.close_device(kit.good_id)
        with pytest.raises(SSL.ZeroReturnError), trio.fail_after(PATIENCE):
            await second.receive()
    assert await outcome(server, kit.good) == "closed"  # authorized no more
    assert server.stats.refused[("udp", RefuseReason.NOT_AUTHORIZED)] == 1


async def test_handler_error_ends_only_its_dtls_session(
    server: DeviceServer, kit: DeviceKit
) -> None:
    async with device(server, kit.other) as other, device(server, kit.good) as failing:
        await ask(other, b"hi")
        await failing.send(b"boom")
        with pytest.raises(SSL.ZeroReturnError), trio.fail_after(PATIENCE):
            await failing.receive()
        assert await ask(other, b"alive") == b"alive"


async def test_graceful_shutdown_over_dtls(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    # Saving sessions for the next process is off here (tests/test_dtls_restart.py covers
    # it): this is the farewell + close_notify path.
    config = DeviceServerConfig(
        pki_dir=kit.pki.directory, host="127.0.0.1", tcp_port=None, udp_port=0,
        limits=FAST_LIMITS, save_dtls_sessions=False,
    )  # fmt: skip
    handler = EchoHandler()
    server: DeviceServer = await nursery.start(
        serve_devices, config, lambda session: handler, directory
    )
    async with device(server, kit.good) as channel:
        await ask(channel, b"x")
        with trio.fail_after(PATIENCE):
            await server.shutdown()
            assert await channel.receive() == b"come back later"
            with pytest.raises(SSL.ZeroReturnError):
                await channel.receive()
    assert server.stats.closed[("udp", CloseReason.SHUTDOWN)] == 1


def test_dtls_contexts_pin_dtls_1_2(kit: DeviceKit) -> None:
    """Pitfall 4: the raw DTLS 1.2 version number; pitfall 3: one client context each."""
    assert DTLS1_2_VERSION == 0xFEFD
    first, second = kit.good.dtls_context(), kit.good.dtls_context()
    assert first is not second


def records_of(datagram: bytes) -> list[bytes]:
    """The DTLS records in ``datagram`` (RFC 6347 4.1: 13-byte headers, length last)."""
    records, offset = [], 0
    while len(datagram) - offset >= 13:
        stop = offset + 13 + int.from_bytes(datagram[offset + 11 : offset + 13], "big")
        records.append(datagram[offset:stop])
        offset = stop
    return records


def server_openssl_connections(server: DeviceServer) -> int:
    """Live OpenSSL connections made from the server's DTLS context."""
    assert server.udp_endpoint is not None
    context = server.udp_endpoint.context
    gc.collect()
    return sum(
        1 for obj in gc.get_objects()
        if isinstance(obj, SSL.Connection) and obj.get_context() is context
    )  # fmt: skip


async def test_established_sessions_hold_no_openssl_object(
    server: DeviceServer, kit: DeviceKit
) -> None:
    async with device(server, kit.good) as first, device(server, kit.other) as second:
        assert await ask(first, b"a") == b"a"
        assert await ask(second, b"b") == b"b"
        assert server_openssl_connections(server) == 0
        assert server.udp_endpoint is not None
        assert len(server.udp_endpoint.peers) == 2


async def test_records_that_fail_to_open_are_counted_by_reason(
    server: DeviceServer, kit: DeviceKit, handler: EchoHandler
) -> None:
    noise = random.Random(23)
    print("noise seed 23")
    endpoint_stats = server.udp_endpoint.stats  # type: ignore[union-attr]
    async with device(server, kit.good) as channel:
        assert await ask(channel, b"one") == b"one"
        sock = channel.endpoint.socket
        # From the device's own address: a forged record of the session's epoch, one of a
        # wrong epoch, a truncated header. Each is dropped silently; the session goes on.
        await sock.sendto(b"\x17\xfe\xfd\x00\x01" + noise.randbytes(6) + b"\x00\x28"
                          + noise.randbytes(40), udp(server))  # fmt: skip
        await sock.sendto(b"\x17\xfe\xfd\x00\x07" + bytes(6) + b"\x00\x20" + bytes(32),
                          udp(server))  # fmt: skip
        await sock.sendto(b"\x17\xfe\xfd\x00", udp(server))
        # (A slow machine may also see the device's retransmitted handshake flight land on
        # the session: epoch-0 records, WRONG_EPOCH too. Count at least ours.)
        await eventually(
            lambda: endpoint_stats.discarded["AUTHENTICATION_FAILED"] >= 1
            and endpoint_stats.discarded["WRONG_EPOCH"] >= 1
            and endpoint_stats.discarded["TRUNCATED"] >= 1
        )
        assert endpoint_stats.discarded["AUTHENTICATION_FAILED"] == 1
        assert endpoint_stats.discarded["TRUNCATED"] == 1
        assert await ask(channel, b"two") == b"two"
        assert not handler.sessions[0].closed


async def test_strangers_datagrams_are_dropped_and_counted(server: DeviceServer) -> None:
    sock = trio.socket.socket(type=trio.socket.SOCK_DGRAM)
    await sock.connect(udp(server))
    await sock.send(b"\x17\xfe\xfd" + bytes(20))  # application data from nobody
    await sock.send(b"\x16\xfe")  # a truncated record
    stats = server.udp_endpoint.stats  # type: ignore[union-attr]
    await eventually(lambda: sum(stats.dropped.values()) == 2)
    assert stats.dropped == {"NOT_HANDSHAKE": 1, "TRUNCATED": 1}
    assert server.udp_endpoint.peers == {}  # type: ignore[union-attr]
    sock.close()


async def test_device_restarting_on_the_same_address_replaces_its_session(
    server: DeviceServer, kit: DeviceKit, handler: EchoHandler
) -> None:
    """RFC 6347 4.2.8: a new handshake from an established session's address (a device
    that lost its state) starts once it passes the cookie exchange, and ends the old one."""
    async with endpoint() as dtls_endpoint:
        with trio.fail_after(PATIENCE):
            first = await connect_dtls(dtls_endpoint, udp(server), kit.good)
            assert await ask(first, b"old") == b"old"
            second = await connect_dtls(dtls_endpoint, udp(server), kit.good)
            assert await ask(second, b"new") == b"new"
        await eventually(lambda: handler.sessions[0].closed)
        assert handler.sessions[0].close_reason == CloseReason.PEER
        assert server.udp_endpoint.stats.replaced_handshakes == 1  # type: ignore[union-attr]
        assert len(server.udp_endpoint.peers) == 1  # type: ignore[union-attr]


async def test_idle_sessions_release_their_aeads(server: DeviceServer, kit: DeviceKit) -> None:
    """A session whose handler waits for the device keeps its keys, not its AEAD objects
    (OpenSSL cipher contexts, ~2.3 KB each): the next record rebuilds them."""
    async with device(server, kit.good) as channel:
        assert await ask(channel, b"x") == b"x"
        assert server.udp_endpoint is not None
        (link,) = server.udp_endpoint.peers.values()
        layer = link.layer  # type: ignore[union-attr]
        # The echo handler is back in receive(), waiting: nothing is left to open or seal.
        await eventually(lambda: layer._seal_aead is None and layer._open_aead is None)
        assert await ask(channel, b"y") == b"y"  # rebuilt on demand


async def test_new_client_hello_replaces_a_stalled_handshake_of_the_same_address(
    nursery: trio.Nursery,
    kit: DeviceKit,
    directory: MemoryDeviceDirectory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A device that restarts mid-handshake (same address and port) is not left waiting for
    the handshake timeout: its new ClientHello, once past the cookie exchange, replaces it."""
    # No timer retransmission of the stalled handshake's flight during the test: on a real
    # network a stale flight can confuse the restarted device, which is not the point here.
    monkeypatch.setattr(UdpEndpoint, "initial_retransmit_timeout", 600.0)
    # The stalled handshake must not time out before the restarted device replaces it.
    limits = SessionLimits(handshake_timeout=600.0)
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=limits,
                                       tcp=False)  # fmt: skip
    sock = await start_silent_handshake(server, kit.good)
    with trio.fail_after(PATIENCE):
        # The server's whole flight, which the stalled peer never answers: read up to its
        # ServerHelloDone (handshake type 14), so that none of it reaches the new client.
        while not any(record[0] == 22 and record[13:14] == b"\x0e"
                      for record in records_of(await sock.recv(65536))):  # fmt: skip
            pass
    assert server.udp_endpoint is not None
    with trio.DTLSEndpoint(sock) as same_address, trio.fail_after(PATIENCE):
        channel = await connect_dtls(same_address, udp(server), kit.good)
        assert await ask(channel, b"who") == f"{kit.good_id}|udp|False".encode()
    assert server.udp_endpoint.stats.replaced_handshakes == 1
    assert server.stats.refused[("udp", RefuseReason.HANDSHAKE_TIMEOUT)] == 0


class StuckHandler(EchoHandler):
    """Never reads: what the server keeps for a session whose handler fell behind."""

    async def run(self, session: DeviceSession) -> None:
        self.sessions.append(session)
        await trio.sleep_forever()


async def test_unread_datagrams_are_bounded_per_session(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    """Backpressure: at most ``dtls_queue_size`` plaintexts wait for a session's handler;
    the rest are dropped (UDP allows it; CoAP retransmits) and counted."""
    handler = StuckHandler()
    server = await start_device_server(nursery, kit, directory, handler, tcp=False)
    queue_size = server.config.dtls_queue_size
    async with device(server, kit.good) as channel:
        await eventually(lambda: len(handler.sessions) == 1)
        for number in range(queue_size + 5):
            await channel.send(b"%d" % number)
        link = handler.sessions[0].link  # type: ignore[attr-defined]
        await eventually(lambda: link.overflowed == 5)
        assert link.inbox == [b"%d" % number for number in range(queue_size)]
