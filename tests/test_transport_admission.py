"""Handshake admission control: a bounded number of handshakes at once, per process and
across both transports; later connections wait in arrival order, and those that waited
``handshake_wait`` are closed without any cryptography spent on them."""

from __future__ import annotations

from functools import partial

import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from otacore.errors import ValidationError
from server.authorization import MemoryDeviceDirectory
from server.transport import DeviceServer, RefuseReason, SessionLimits
from server.transport.client import connect_tls
from tests.test_transport_dtls import outcome as dtls_outcome
from tests.test_transport_dtls import start_silent_handshake
from tests.test_transport_tls import (
    PATIENCE,
    DeviceKit,
    EchoHandler,
    ask,
    eventually,
    make_device_kit,
    start_device_server,
    tcp,
)
from tests.test_transport_tls import outcome as tls_outcome

#: One handshake at a time; a waiting connection is dropped after 0.3 s.
ONE_SLOT = SessionLimits(
    handshake_timeout=1.0, idle_timeout=5.0, farewell_timeout=1.0, max_handshakes=1,
    handshake_wait=0.3,
)  # fmt: skip
#: One handshake at a time; a waiting connection may wait a minute, longer than the tests
#: take on any machine.
ONE_PATIENT_SLOT = SessionLimits(handshake_timeout=60.0, max_handshakes=1, handshake_wait=60.0)
#: One handshake at a time, in minutes: with a jumping clock (``clock``) the test decides
#: when a wait or a handshake times out, however slow or busy the machine.
ONE_SLOT_IN_MINUTES = SessionLimits(
    handshake_timeout=120.0, max_handshakes=1, handshake_wait=60.0, idle_timeout=600.0
)


@pytest.fixture
def clock() -> MockClock:
    """Trio's clock for the test: real time, plus the jumps the test makes."""
    return MockClock(rate=1.0)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> DeviceKit:
    return make_device_kit(tmp_path_factory.mktemp("admission-kit"))


@pytest.fixture
def directory(kit: DeviceKit) -> MemoryDeviceDirectory:
    return kit.directory()


async def silent_tcp(server: DeviceServer) -> trio.SocketStream:
    """A TCP connection that starts a ClientHello (one byte of a TLS handshake record) and
    stalls: it holds a handshake slot until the handshake timeout (or until it closes)."""
    stream = await trio.open_tcp_stream(*tcp(server))
    await stream.send_all(b"\x16")  # RFC 8446 section 5.1: ContentType handshake(22)
    host = server.host
    await eventually(lambda: host.handshakes_in_progress == 1)
    return stream


async def _append_outcome(out: list[str], server: DeviceServer, kit: DeviceKit) -> None:
    out.append(await tls_outcome(server, kit.good))


def busy(server: DeviceServer, transport: str) -> int:
    return server.stats.refused[(transport, RefuseReason.SERVER_BUSY)]


async def test_a_connection_waits_for_a_slot_and_is_served_when_one_frees(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    server = await start_device_server(
        nursery, kit, directory, EchoHandler(), limits=ONE_PATIENT_SLOT
    )
    holder = await silent_tcp(server)
    served: list[bytes] = []

    async def device() -> None:
        stream = await connect_tls(tcp(server), kit.good)
        served.append(await ask(stream, b"who"))
        await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as inner:
        inner.start_soon(device)
        await eventually(lambda: server.host.handshakes_waiting == 1)
        # Everything in this process (server and device) has done all it can: the device
        # is still queued behind the silent connection, served by nothing else.
        await wait_all_tasks_blocked(cushion=0.05)
        assert not served and server.host.handshakes_waiting == 1
        await holder.aclose()  # its handshake fails at once and gives the slot back
    assert served == [f"{kit.good_id}|tcp|False".encode()]
    assert busy(server, "tcp") == 0
    assert server.stats.refused[("tcp", RefuseReason.HANDSHAKE_FAILED)] == 1


async def test_a_connection_that_waited_too_long_is_closed_unserved(
    nursery: trio.Nursery,
    kit: DeviceKit,
    directory: MemoryDeviceDirectory,
    clock: MockClock,
) -> None:
    limits = ONE_SLOT_IN_MINUTES
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=limits)
    holder = await silent_tcp(server)
    start = trio.current_time()
    outcomes: list[str] = []
    async with trio.open_nursery() as inner:
        inner.start_soon(lambda: _append_outcome(outcomes, server, kit))
        await eventually(lambda: server.host.handshakes_waiting == 1)
        clock.jump(limits.handshake_wait)  # its wait is over; the holder's handshake is not
    assert outcomes[0] in {"handshake failed", "broken", "closed"}
    assert trio.current_time() - start >= limits.handshake_wait
    assert busy(server, "tcp") == 1
    assert server.stats.full_handshakes["tcp"] == 0
    assert server.stats.refused[("tcp", RefuseReason.HANDSHAKE_TIMEOUT)] == 0
    # The silent holder still times out on its own; then the slot serves the next device.
    clock.jump(limits.handshake_timeout - limits.handshake_wait)
    await eventually(lambda: server.stats.refused[("tcp", RefuseReason.HANDSHAKE_TIMEOUT)] == 1)
    assert await tls_outcome(server, kit.other) == f"{kit.other_id}|tcp|False"
    assert server.host.handshakes_waiting == 0
    await holder.aclose()


async def test_slots_are_shared_by_tls_and_dtls(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    """A TCP handshake in progress keeps a DTLS device waiting, and the DTLS device that
    waited too long is dropped; once the slot frees, DTLS devices are served again."""
    # The holder keeps its slot (two minutes) until it closes, however slow the DTLS
    # device's cookie exchange is; the DTLS device waits 0.3 s for it.
    limits = SessionLimits(handshake_timeout=120.0, max_handshakes=1, handshake_wait=0.3)
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=limits)
    holder = await silent_tcp(server)
    assert await dtls_outcome(server, kit.good) == "refused"
    assert busy(server, "udp") >= 1  # each ClientHello retransmission queues anew
    await holder.aclose()
    await eventually(lambda: server.host.handshakes_in_progress == 0)
    assert await dtls_outcome(server, kit.other) == f"{kit.other_id}|udp|False"


async def test_a_silent_dtls_peer_holds_its_slot_only_until_the_handshake_timeout(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    """A peer that passes the cookie exchange and goes silent occupies a slot; the slot
    comes back at the handshake timeout, so it cannot starve other devices for longer."""
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=ONE_SLOT)
    sock = await start_silent_handshake(server, kit.good)
    await eventually(lambda: server.host.handshakes_in_progress == 1)
    await eventually(lambda: server.stats.refused[("udp", RefuseReason.HANDSHAKE_TIMEOUT)] == 1)
    assert await tls_outcome(server, kit.good) == f"{kit.good_id}|tcp|False"
    sock.close()


async def test_a_refused_device_gives_its_slot_back(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    """Refusals after the handshake (revoked, unknown) release the slot: with one slot,
    good devices are still served after them."""
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=ONE_SLOT)
    assert await tls_outcome(server, kit.revoked) in {"handshake failed", "broken", "closed"}
    assert await tls_outcome(server, kit.unknown) in {"handshake failed", "broken", "closed"}
    assert await tls_outcome(server, kit.good) == f"{kit.good_id}|tcp|False"
    assert server.stats.refused[("tcp", RefuseReason.NOT_AUTHORIZED)] == 2
    assert busy(server, "tcp") == 0
    assert server.host.handshakes_in_progress == 0


async def test_connections_waiting_at_shutdown_are_refused_without_a_handshake(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    server = await start_device_server(
        nursery, kit, directory, EchoHandler(), limits=ONE_PATIENT_SLOT
    )
    holder = await silent_tcp(server)
    waiting = await trio.open_tcp_stream(*tcp(server))
    await waiting.send_all(b"\x16")
    silent = await trio.open_tcp_stream(*tcp(server))  # sends nothing: waits for its hello
    await eventually(lambda: server.host.handshakes_waiting == 1)
    await eventually(lambda: server.host.pending_connections == 3)
    # Finishing well before the grace period shows the waiting connection did not hold
    # the shutdown up.
    with trio.fail_after(PATIENCE):
        async with trio.open_nursery() as inner:
            inner.start_soon(partial(server.shutdown, grace=120.0))
            await eventually(lambda: not server.host.accepting)
            # The slot frees during the shutdown: the waiting connection gets it and must
            # give it back without a handshake, letting the shutdown finish early.
            await holder.aclose()
    # The waiting one and the silent one (no need to wait for its hello timeout).
    assert server.stats.refused[("tcp", RefuseReason.SHUTTING_DOWN)] == 2
    assert server.stats.refused[("tcp", RefuseReason.SILENT)] == 0
    assert server.host.handshakes_in_progress == 0
    assert server.host.pending_connections == 0
    assert server.stats.full_handshakes["tcp"] == 0
    await waiting.aclose()
    await silent.aclose()


@pytest.mark.parametrize(
    ("field", "value"), [("max_handshakes", 0), ("handshake_wait", 0.0), ("handshake_wait", -1.0)]
)
def test_admission_limits_must_be_positive(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        SessionLimits(**{field: value})  # type: ignore[arg-type]
