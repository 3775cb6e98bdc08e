"""Handshake admission control: bounded handshake slots per process (TLS: held only while a
handshake computes or is authorized; DTLS: its own pool, held for the whole handshake), per
source address and per IPv6 network; later connections wait in arrival order, and those
that waited ``handshake_wait`` are closed without any cryptography spent on them."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from otacore.errors import ValidationError
from server.authorization import MemoryDeviceDirectory
from server.transport import DeviceServer, RefuseReason, SessionLimits
from server.transport.admission import (
    AdmissionClosed,
    HandshakeGate,
    HandshakeTurn,
    SlotPool,
    SlotsBusy,
    source_keys,
)
from server.transport.client import connect_tls
from tests.test_transport_dtls import outcome as dtls_outcome
from tests.test_transport_dtls import start_silent_handshake
from tests.test_transport_tls import (
    PATIENCE,
    DeviceKit,
    EchoHandler,
    SlowDirectory,
    ask,
    eventually,
    make_device_kit,
    start_device_server,
    tcp,
)
from tests.test_transport_tls import outcome as tls_outcome

#: One handshake at a time per transport; a waiting connection is dropped after 0.3 s.
ONE_SLOT = SessionLimits(
    handshake_timeout=1.0, idle_timeout=5.0, farewell_timeout=1.0, max_handshakes=1,
    max_dtls_handshakes=1, handshake_wait=0.3,
)  # fmt: skip
#: One handshake at a time per transport; a waiting connection may wait a minute, longer
#: than the tests take on any machine.
ONE_PATIENT_SLOT = SessionLimits(
    handshake_timeout=60.0, max_handshakes=1, max_dtls_handshakes=1, handshake_wait=60.0
)
#: One handshake at a time, in minutes: with a jumping clock (``clock``) the test decides
#: when a wait or a handshake times out, however slow or busy the machine.
ONE_SLOT_IN_MINUTES = SessionLimits(
    handshake_timeout=120.0, max_handshakes=1, max_dtls_handshakes=1, handshake_wait=60.0,
    idle_timeout=600.0,
)  # fmt: skip


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


@pytest.fixture
def slow_directory(kit: DeviceKit) -> SlowDirectory:
    """Authorizes once ``release`` is set: until then, a handshake being authorized holds
    its TLS slot (authorization is part of the handshake's work)."""
    return SlowDirectory(kit.registered)


async def hold_tls_slot(
    nursery: trio.Nursery, server: DeviceServer, kit: DeviceKit, directory: SlowDirectory
) -> list[str]:
    """Start a device whose authorization waits for ``directory.release``: it holds a TLS
    handshake slot meanwhile. Returns the list its outcome is appended to."""
    out: list[str] = []

    async def holder() -> None:  # no deadline of its own: tests jump the clock
        stream = await connect_tls(tcp(server), kit.other)
        try:
            await stream.send_all(b"who")
            out.append(bytes(await stream.receive_some()).decode() or "closed")
        except trio.BrokenResourceError:
            out.append("broken")
        finally:
            await trio.aclose_forcefully(stream)

    nursery.start_soon(holder)
    await directory.asked.wait()
    assert server.host.gate.tls.borrowed == 1
    return out


async def _append_outcome(out: list[str], server: DeviceServer, kit: DeviceKit) -> None:
    out.append(await tls_outcome(server, kit.good))


def busy(server: DeviceServer, transport: str) -> int:
    return server.stats.refused[(transport, RefuseReason.SERVER_BUSY)]


# --- over real sockets --------------------------------------------------------------------


async def test_a_connection_waits_for_a_slot_and_is_served_when_one_frees(
    nursery: trio.Nursery, kit: DeviceKit, slow_directory: SlowDirectory
) -> None:
    server = await start_device_server(
        nursery, kit, slow_directory, EchoHandler(), limits=ONE_PATIENT_SLOT
    )
    held = await hold_tls_slot(nursery, server, kit, slow_directory)
    served: list[bytes] = []

    async def device() -> None:
        stream = await connect_tls(tcp(server), kit.good)
        served.append(await ask(stream, b"who"))
        await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as inner:
        inner.start_soon(device)
        await eventually(lambda: server.host.handshakes_waiting == 1)
        # Everything in this process (server and device) has done all it can: the device
        # is still queued behind the authorization in progress, served by nothing else.
        await wait_all_tasks_blocked(cushion=0.05)
        assert not served and server.host.handshakes_waiting == 1
        slow_directory.release.set()  # the holder's authorization ends: its slot frees
    assert served == [f"{kit.good_id}|tcp|False".encode()]
    await eventually(lambda: held == [f"{kit.other_id}|tcp|False"])
    assert busy(server, "tcp") == 0
    assert server.host.handshakes_in_progress == 0


async def test_a_connection_that_waited_too_long_is_closed_unserved(
    nursery: trio.Nursery,
    kit: DeviceKit,
    slow_directory: SlowDirectory,
    clock: MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = ONE_SLOT_IN_MINUTES
    server = await start_device_server(
        nursery, kit, slow_directory, EchoHandler(), limits=limits
    )
    held = await hold_tls_slot(nursery, server, kit, slow_directory)
    start = trio.current_time()
    outcomes: list[str] = []
    async with trio.open_nursery() as inner:
        inner.start_soon(lambda: _append_outcome(outcomes, server, kit))
        await eventually(lambda: server.host.handshakes_waiting == 1)
        clock.jump(limits.handshake_wait)  # its wait is over; the holder's handshake is not
    assert outcomes[0] in {"handshake failed", "broken", "closed"}
    assert trio.current_time() - start >= limits.handshake_wait
    assert busy(server, "tcp") == 1
    assert "all 1 TLS handshake slots busy for 60 s" in caplog.text
    assert server.stats.full_handshakes["tcp"] == 0
    # The holder is served once its authorization ends; then the slot serves the next.
    slow_directory.release.set()
    await eventually(lambda: held == [f"{kit.other_id}|tcp|False"])
    assert await tls_outcome(server, kit.good) == f"{kit.good_id}|tcp|False"
    assert server.host.handshakes_waiting == 0
    assert server.host.handshakes_in_progress == 0


async def test_dtls_handshakes_never_delay_tls_handshakes(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    """DTLS handshakes hold their slot while they wait for the device (trio's handshake
    loop), so they have their own pool: a silent DTLS peer holding the only DTLS slot
    delays no TLS device, and DTLS devices that waited too long are dropped until it
    frees."""
    # The holder keeps its slot (two minutes) until it closes, however slow the DTLS
    # device's cookie exchange is; the DTLS device waits 0.3 s for it.
    limits = SessionLimits(
        handshake_timeout=120.0, max_handshakes=1, max_dtls_handshakes=1, handshake_wait=0.3
    )
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=limits)
    holder = await start_silent_handshake(server, kit.other)
    await eventually(lambda: server.host.gate.dtls.borrowed == 1)
    assert await tls_outcome(server, kit.good) == f"{kit.good_id}|tcp|False"
    assert await dtls_outcome(server, kit.good) == "refused"
    assert busy(server, "udp") >= 1  # each ClientHello retransmission queues anew
    assert busy(server, "tcp") == 0
    assert server.host.gate.dtls.borrowed == 1  # the silent peer's, still
    holder.close()


async def test_tls_authorizations_never_delay_dtls_handshakes(
    nursery: trio.Nursery, kit: DeviceKit, slow_directory: SlowDirectory
) -> None:
    server = await start_device_server(
        nursery, kit, slow_directory, EchoHandler(), limits=ONE_PATIENT_SLOT
    )
    held = await hold_tls_slot(nursery, server, kit, slow_directory)
    result: list[str] = []
    async with trio.open_nursery() as inner:

        async def dtls_device() -> None:
            result.append(await dtls_outcome(server, kit.good))

        inner.start_soon(dtls_device)
        # The DTLS device's handshake got its DTLS slot and waits for its authorization,
        # like the TLS one.
        await eventually(lambda: server.host.gate.dtls.borrowed == 1)
        slow_directory.release.set()
    assert result == [f"{kit.good_id}|udp|False"]
    await eventually(lambda: held == [f"{kit.other_id}|tcp|False"])
    assert busy(server, "udp") == busy(server, "tcp") == 0


async def test_a_silent_dtls_peer_holds_its_slot_only_until_the_handshake_timeout(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    """A peer that passes the cookie exchange and goes silent occupies a DTLS slot; the
    slot comes back at the handshake timeout, so it cannot starve other devices longer."""
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=ONE_SLOT)
    sock = await start_silent_handshake(server, kit.good)
    await eventually(lambda: server.host.gate.dtls.borrowed == 1)
    await eventually(lambda: server.stats.refused[("udp", RefuseReason.HANDSHAKE_TIMEOUT)] == 1)
    assert server.host.gate.dtls.borrowed == 0
    assert await dtls_outcome(server, kit.good) == f"{kit.good_id}|udp|False"
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
    nursery: trio.Nursery, kit: DeviceKit, slow_directory: SlowDirectory
) -> None:
    server = await start_device_server(
        nursery, kit, slow_directory, EchoHandler(), limits=ONE_PATIENT_SLOT
    )
    held = await hold_tls_slot(nursery, server, kit, slow_directory)
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
            # The slot frees during the shutdown (the holder is refused: shutting down),
            # the waiting connection gets it and must give it back without a handshake,
            # letting the shutdown finish early.
            slow_directory.release.set()
    # The holder (authorized during shutdown), the waiting one and the silent one (no need
    # to wait for its hello timeout).
    assert server.stats.refused[("tcp", RefuseReason.SHUTTING_DOWN)] == 3
    assert held == ["closed"]
    assert server.stats.refused[("tcp", RefuseReason.SILENT)] == 0
    assert server.host.handshakes_in_progress == 0
    assert server.host.pending_connections == 0
    assert server.stats.full_handshakes["tcp"] == 0
    await waiting.aclose()
    await silent.aclose()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_handshakes", 0),
        ("max_dtls_handshakes", 0),
        ("max_handshakes_per_address", 0),
        ("max_handshakes_per_ipv6_network", 0),
        ("max_pending_per_ipv6_network", 0),
        ("handshake_wait", 0.0),
        ("handshake_wait", -1.0),
        ("ipv6_network_prefix_length", 65),
        ("ipv6_network_prefix_length", 0),
    ],
)
def test_admission_limits_must_be_positive(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        SessionLimits(**{field: value})  # type: ignore[arg-type]


# --- sans-IO: the pools, turns and source grouping ----------------------------------------


def test_sources_are_addresses_ipv6_prefixes_and_ipv6_networks() -> None:
    assert source_keys("192.0.2.7") == ("192.0.2.7",)
    assert source_keys("::ffff:192.0.2.7") == ("192.0.2.7",)  # IPv4-mapped: the same host
    assert source_keys("2001:db8:100:7:1:2:3:4") == ("2001:db8:100:7::/64", "2001:db8:100::/48")
    assert source_keys("fe80::1%eth0") == ("fe80::/64", "fe80::/48")
    assert source_keys("2001:db8:100:7::1", 64, 64) == ("2001:db8:100:7::/64",)  # no network
    assert source_keys("2001:db8:100:7::1", 56, 32) == ("2001:db8:100::/56", "2001:db8::/32")
    assert source_keys("not an address") == ("not an address",)


async def test_slot_pool_serves_answered_handshakes_first_in_arrival_order(
    autojump_clock: MockClock,
) -> None:
    pool = SlotPool(1, "tcp")
    await pool.take()
    order: list[str] = []

    async def taker(name: str, urgent: bool) -> None:
        await pool.take(urgent)
        order.append(name)
        pool.give_back()

    async with trio.open_nursery() as nursery:
        for name, urgent in [("new-1", False), ("answered-1", True), ("new-2", False),
                             ("answered-2", True)]:
            nursery.start_soon(taker, name, urgent)
            await wait_all_tasks_blocked()  # queued in this order
        assert pool.waiting == 4
        pool.give_back()
    assert order == ["answered-1", "answered-2", "new-1", "new-2"]
    assert pool.borrowed == 0 and pool.waiting == 0


def _gate(**limits: object) -> HandshakeGate:
    return HandshakeGate(dataclasses.replace(SessionLimits(), **limits))  # type: ignore[arg-type]


async def test_a_turn_keeps_nothing_when_its_wait_ends_or_it_is_cancelled(
    autojump_clock: MockClock,
) -> None:
    """A take waiting for the process's slot (its address share already taken) gives the
    share back when it times out or is cancelled; giving back twice gives back once."""
    gate = _gate(max_handshakes=1, max_handshakes_per_address=1, handshake_wait=0.01)
    holder_keys, keys = gate.keys("192.0.2.1"), gate.keys("192.0.2.2")
    assert gate.enter(holder_keys) is None and gate.enter(keys) is None
    holder = gate.turn("tcp", holder_keys)
    await holder.take()
    turn = gate.turn("tcp", keys)
    with pytest.raises(SlotsBusy, match=r"all 1 TLS handshake slots busy for 0\.01 s"):
        await turn.take()
    assert gate.handshakes("192.0.2.2") == 0 and not turn.held
    with trio.move_on_after(0.01):  # cancelled while waiting (a handshake deadline)
        turn.answered = True  # waits without a bound of its own
        await turn.take()
    assert gate.handshakes("192.0.2.2") == 0 and gate.waiting() == 0 and not turn.held
    holder.give_back()
    holder.give_back()  # every exit path may call it: no second release
    assert gate.tls.borrowed == 0 and gate.handshakes("192.0.2.1") == 0
    await turn.take()
    assert turn.held and gate.tls.borrowed == 1
    turn.give_back()
    gate.leave(holder_keys)
    gate.leave(keys)
    assert len(gate) == 0 and gate.total_pending() == 0


async def test_a_first_take_is_refused_once_shutdown_began(autojump_clock: MockClock) -> None:
    gate = _gate(max_handshakes=1)
    keys = gate.keys("192.0.2.1")
    assert gate.enter(keys) is None
    holder, waiter = gate.turn("tcp", keys), gate.turn("tcp", keys)
    await holder.take()
    refused: list[BaseException] = []

    async def wait_then_fail() -> None:
        with pytest.raises(AdmissionClosed) as caught:
            await waiter.take()
        refused.append(caught.value)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_then_fail)
        await wait_all_tasks_blocked()
        gate.accepting = False  # shutdown began while it waited
        holder.give_back()  # it gets the slot, and must give it back unused
    assert refused and gate.tls.borrowed == 0 and not waiter.held
    answered = gate.turn("tcp", keys)  # a handshake the server already answered finishes
    answered.answered = True
    await answered.take()
    assert answered.held
    answered.give_back()


def _v6(prefix: int, host: int = 1) -> str:
    """An address in the /64 ``2001:db8:100:<prefix>::/64`` (all in 2001:db8:100::/48)."""
    return f"2001:db8:100:{prefix:x}::{host:x}"


async def test_an_ipv6_network_holds_only_its_share_of_slots(
    autojump_clock: MockClock,
) -> None:
    """Each /64 may hold its share of the DTLS slots and its /48 four shares: a fifth /64
    of the same /48 waits (and its wait ends), another /48's does not."""
    gate = _gate(max_handshakes_per_address=4, max_handshakes_per_ipv6_network=16)
    share = gate.limits.max_handshakes_per_address
    turns: list[HandshakeTurn] = []
    for prefix in range(1, 5):
        keys = gate.keys(_v6(prefix))
        for _ in range(share):
            assert gate.enter(keys) is None
            turns.append(turn := gate.turn("udp", keys))
            await turn.take()
    assert gate.handshakes("2001:db8:100::/48", "udp") == 16
    assert gate.handshakes(gate.keys(_v6(1))[0], "udp") == share
    fifth = gate.keys(_v6(5))
    assert gate.enter(fifth) is None
    with pytest.raises(SlotsBusy, match=r"16 DTLS handshake slots of 2001:db8:100::/48.*"
                                        r"max_handshakes_per_ipv6_network"):
        await gate.turn("udp", fifth).take()
    other_network = gate.keys("2001:db8:200:1::1")
    assert gate.enter(other_network) is None
    elsewhere = gate.turn("udp", other_network)
    await elsewhere.take()  # at once: another site
    assert gate.dtls.borrowed == 17 and gate.tls.borrowed == 0
    turns[0].give_back()  # a slot of the /48 frees: the fifth /64 may take it
    fifth_turn = gate.turn("udp", fifth)
    await fifth_turn.take()
    assert gate.handshakes("2001:db8:100::/48", "udp") == 16


def test_pending_connections_are_bounded_per_address_and_per_ipv6_network() -> None:
    gate = _gate(max_pending_per_address=2, max_pending_per_ipv6_network=3)
    assert gate.enter(gate.keys(_v6(1, 1))) is None
    assert gate.enter(gate.keys(_v6(1, 2))) is None  # same /64
    full = gate.enter(gate.keys(_v6(1, 3)))
    assert full is not None and "2 connections from 2001:db8:100:1::/64" in full
    assert "max_pending_per_address" in full
    assert gate.enter(gate.keys(_v6(2))) is None  # another /64, same /48: its third
    full = gate.enter(gate.keys(_v6(3)))
    assert full is not None and "3 connections from 2001:db8:100::/48" in full
    assert "max_pending_per_ipv6_network" in full
    assert gate.total_pending() == 3  # each connection once
    assert gate.enter(gate.keys("192.0.2.1")) is None  # IPv4: per address only
    gate.leave(gate.keys(_v6(2)))
    assert gate.enter(gate.keys(_v6(3))) is None
