"""A few clients must not stall every device's handshake (issue 13, finding 2).

Over real sockets: attackers on 127.0.0.2 ... 127.0.0.9 hold many connections (silent
ones, and handshakes they start and never finish, over TLS and DTLS) while a real device on
127.0.0.1 connects. The device completes its handshake while the attackers' connections
are still open: a stalled TLS handshake holds no handshake slot, and a stalled DTLS one
holds one of its address's few DTLS slots only. What stalled DTLS handshakes from enough
addresses still achieve (issue 14 removes it) is pinned down too. Connections beyond an
address's bound are closed at once, and the refusals reach the log at WARNING, aggregated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket

import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from server.authorization import MemoryDeviceDirectory
from server.transport import DeviceServer, RefuseReason, SessionLimits
from server.transport.client import connect_dtls, connect_tls
from server.transport.refusals import RefusalLog
from tests.server_cli_capture import capture_server_configs
from tests.test_transport_dtls import ask as dtls_ask
from tests.test_transport_dtls import endpoint as dtls_endpoint
from tests.test_transport_dtls import start_silent_handshake
from tests.test_transport_tls import (
    DeviceKit,
    EchoHandler,
    ask,
    eventually,
    make_device_kit,
    start_device_server,
    start_stalled_tls,
    tcp,
)

ATTACKER = "127.0.0.2"
#: Eight attacker addresses (all of 127.0.0.0/8 is local, no privileges needed).
ATTACKERS = [f"127.0.0.{n}" for n in range(2, 10)]
#: The default admission bounds, with waits long enough that nothing the attacker holds
#: times out while a test runs (the tests assert that the device got through *while* the
#: attacker's connections were open, not how fast).
PATIENT = SessionLimits(hello_timeout=60.0, handshake_timeout=60.0, handshake_wait=60.0)


@pytest.fixture
def clock() -> MockClock:
    """Trio's clock for the test: real time, plus the jumps the test makes."""
    return MockClock(rate=1.0)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> DeviceKit:
    return make_device_kit(tmp_path_factory.mktemp("flood-kit"))


@pytest.fixture
def directory(kit: DeviceKit) -> MemoryDeviceDirectory:
    return kit.directory()


def closed_by_server(stream: trio.SocketStream) -> bool:
    """True if the server closed (or reset) this connection; never blocks."""
    probe = socket.socket(fileno=os.dup(stream.socket.fileno()))
    try:
        return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        probe.close()


def warnings_about(caplog: pytest.LogCaptureFixture, reason: str) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.levelno == logging.WARNING and reason in record.getMessage()
    ]


async def device_answers_over_tls(server: DeviceServer, kit: DeviceKit) -> str:
    with trio.fail_after(30):
        stream = await connect_tls(tcp(server), kit.good)
        try:
            return (await ask(stream, b"who")).decode()
        finally:
            await trio.aclose_forcefully(stream)


async def test_silent_connections_from_one_address_do_not_stall_other_devices(
    nursery: trio.Nursery,
    kit: DeviceKit,
    directory: MemoryDeviceDirectory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="otacloud.devices")
    # The burst's summary must not fall due while the test runs, however slow the machine:
    # with the default 10 s, a run that slow logged a second line. An hour is past every
    # deadline of this test.
    limits = dataclasses.replace(PATIENT, refusal_log_interval=3600.0)
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=limits)
    bound, extra = PATIENT.max_pending_per_address, 5
    assert bound > PATIENT.max_handshakes  # enough to take every slot were silence enough
    attackers = [
        await trio.open_tcp_stream(*tcp(server), local_address=ATTACKER)
        for _ in range(bound + extra)
    ]
    # The connections beyond the address's bound are closed at once...
    await eventually(lambda: sum(map(closed_by_server, attackers)) == extra, timeout=30)
    assert server.stats.refused[("tcp", RefuseReason.ADDRESS_BUSY)] == extra
    # ... the others wait for their ClientHello holding no handshake slot ...
    await eventually(lambda: server.host.gate.pending(ATTACKER) == bound, timeout=30)
    assert server.host.handshakes_in_progress == 0
    # ... so a real device from another address is served while they are all still open.
    assert await device_answers_over_tls(server, kit) == f"{kit.good_id}|tcp|False"
    assert server.host.gate.pending(ATTACKER) == bound
    assert sum(map(closed_by_server, attackers)) == extra
    # The operator sees it: one WARNING line for the burst, naming the address and the knob.
    (warning,) = warnings_about(caplog, RefuseReason.ADDRESS_BUSY)
    assert ATTACKER in warning.getMessage()
    assert "max_pending_per_address" in warning.getMessage()
    for stream in attackers:
        await stream.aclose()
    await eventually(lambda: server.host.pending_connections == 0)


async def device_answers_over_dtls(server: DeviceServer, kit: DeviceKit) -> str:
    async with dtls_endpoint() as local:
        with trio.fail_after(30):
            channel = await connect_dtls(local, server.udp_address or ("", 0), kit.good)
            try:
                return (await dtls_ask(channel, b"who")).decode()
            finally:
                channel.close()


async def test_stalled_tls_handshakes_from_several_addresses_hold_no_slot(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    """Eight addresses each start more TLS handshakes than there are slots per address,
    half stalled after one byte, half after a whole ClientHello the server answered. None
    of them holds a handshake slot while it waits, so a device from another address is
    served while they are all still open."""
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=PATIENT)
    per_address = 8  # of each kind: 128 stalls, twice the process's slots
    attackers = [
        await start_stalled_tls(server, kit.other, how, address)
        for how in ("hello", "byte")
        for address in ATTACKERS
        for _ in range(per_address)
    ]
    await wait_all_tasks_blocked(cushion=0.05)  # the server took in every byte sent
    assert server.host.handshakes_in_progress == 0
    assert server.host.handshakes_waiting == 0
    assert await device_answers_over_tls(server, kit) == f"{kit.good_id}|tcp|False"
    # Served while every attacker connection is still open and its handshake pending.
    assert not any(map(closed_by_server, attackers))
    for address in ATTACKERS:
        assert server.host.gate.pending(address) == 2 * per_address
    assert server.stats.refused[("tcp", RefuseReason.SERVER_BUSY)] == 0
    for stream in attackers:
        await stream.aclose()
    await eventually(lambda: server.host.pending_connections == 0)


async def test_stalled_dtls_handshakes_from_several_addresses_hold_only_their_shares(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    """The cookie exchange proves an address, not that it is one device: one address with
    many source ports passes it many times. Eight addresses each hold twice their share of
    silent DTLS handshakes: each holds only its share of the DTLS slots, so a TLS device
    and a DTLS device from another address are both served while they are all pending."""
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=PATIENT)
    share = PATIENT.max_handshakes_per_address
    per_address = 2 * share
    attackers = [
        await start_silent_handshake(server, kit.other, local_address=address)
        for address in ATTACKERS
        for _ in range(per_address)
    ]
    for address in ATTACKERS:
        await eventually(lambda a=address: server.host.gate.pending(a) == per_address)
    assert await device_answers_over_tls(server, kit) == f"{kit.good_id}|tcp|False"
    assert await device_answers_over_dtls(server, kit) == f"{kit.good_id}|udp|False"
    # Served while the attackers' handshakes are all still pending, each address holding
    # its share of the DTLS slots (and no TLS slot).
    for address in ATTACKERS:
        assert server.host.gate.pending(address) == per_address
        assert server.host.gate.handshakes(address, "udp") == share
    assert server.host.gate.dtls.borrowed == len(ATTACKERS) * share
    assert server.host.gate.tls.borrowed == 0
    for sock in attackers:
        sock.close()


async def test_what_stalled_dtls_handshakes_from_enough_addresses_still_achieve(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory, clock: MockClock
) -> None:
    """The remainder, until issue 14 gives DTLS a handshake that can give its slot back
    while it waits: with max_dtls_handshakes / max_handshakes_per_address addresses, silent
    DTLS handshakes hold every DTLS slot. TLS devices are still served; a DTLS device waits
    (at most ``handshake_wait``, then it retries) until a stalled handshake times out, and
    then gets the first free slot, before the attackers' next handshakes."""
    # Four DTLS slots, two per address, and long timeouts the test's clock decides.
    limits = dataclasses.replace(
        PATIENT, max_dtls_handshakes=4, max_handshakes_per_address=2, handshake_timeout=60.0,
        handshake_wait=600.0,
    )  # fmt: skip
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=limits)
    gate = server.host.gate
    addresses = ATTACKERS[: limits.max_dtls_handshakes // limits.max_handshakes_per_address]
    attackers = [
        await start_silent_handshake(server, kit.other, local_address=address)
        for address in addresses
        for _ in range(limits.max_handshakes_per_address + 1)  # one more waits its turn
    ]
    await eventually(lambda: gate.dtls.borrowed == limits.max_dtls_handshakes)
    await eventually(lambda: gate.waiting() == len(addresses))  # at their addresses' share
    assert await device_answers_over_tls(server, kit) == f"{kit.good_id}|tcp|False"
    answers: list[bytes] = []

    async def dtls_device() -> None:  # no deadline of its own: the test jumps the clock
        async with dtls_endpoint() as local:
            channel = await connect_dtls(local, server.udp_address or ("", 0), kit.good)
            answers.append(await dtls_ask(channel, b"who"))
            channel.close()

    async with trio.open_nursery() as inner:
        inner.start_soon(dtls_device)
        await eventually(lambda: gate.dtls.waiting == 1)  # the device, at the process pool
        assert not answers
        clock.jump(limits.handshake_timeout)  # the stalled handshakes time out
    assert answers == [f"{kit.good_id}|udp|False".encode()]
    # The attackers' next handshakes got the slots freed after the device's.
    await eventually(lambda: gate.dtls.borrowed == len(addresses))
    timeouts = server.stats.refused[("udp", RefuseReason.HANDSHAKE_TIMEOUT)]
    assert timeouts == limits.max_dtls_handshakes
    for sock in attackers:
        sock.close()


def test_refusal_log_reports_a_burst_in_two_lines() -> None:
    log = RefusalLog(interval=10.0)
    first = log.note(0.0, "tcp", "too busy", "192.0.2.1", "raise the limit")
    assert first is not None and "192.0.2.1" in first and "raise the limit" in first
    assert log.deadline == 10.0
    for n in range(1000):
        assert log.note(0.001 * n, "tcp", "too busy", f"192.0.2.{n % 2}", "") is None
    assert log.flush(9.9) is None  # not due yet
    summary = log.flush(10.0)
    assert summary is not None
    assert "1000 more" in summary and "192.0.2.0 (500)" in summary
    assert log.deadline == 20.0
    assert log.flush(20.0) is None  # a quiet interval ends the burst
    assert log.deadline is None
    assert log.note(30.0, "udp", "too busy", "192.0.2.9", "") is not None  # a new burst
    assert log.total == 1002


def test_the_limits_reach_the_listeners_through_ota_server_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from server.cli import server_cmd

    captured = capture_server_configs(monkeypatch)
    runner = CliRunner()
    result = runner.invoke(
        server_cmd.app,
        ["server", "--data", "unused", "--device-limit", "max_pending_per_address=1000",
         "--device-limit", "hello_timeout=2.5", "--device-limit", "max_dtls_handshakes=200"],
    )
    assert result.exit_code == 0, result.output
    (config,) = captured
    assert config.device_limits.max_pending_per_address == 1000
    assert config.device_limits.hello_timeout == 2.5
    assert config.device_limits.max_dtls_handshakes == 200
    assert config.device_limits.max_handshakes_per_address == 4  # the rest: defaults
    for wrong, message in [
        ("nope=1", "unknown device limit 'nope'"),
        ("hello_timeout=soon", "hello_timeout must be a number"),
        ("max_pending_per_address=0", "max_pending_per_address must be at least 1"),
        ("hello_timeout", "NAME=VALUE"),
    ]:
        bad = runner.invoke(server_cmd.app, ["server", "--data", "x", "--device-limit", wrong])
        assert bad.exit_code == 2, bad.output
        assert message in " ".join(bad.output.replace("│", " ").split())  # rich wraps it


def test_worker_processes_get_the_same_limits() -> None:
    from server.workers import WorkerSpec

    limits = SessionLimits.with_overrides({"max_pending_per_address": "900", "hello_timeout": "3"})
    spec = WorkerSpec(index=1, data_dir="d", db_url=None, host="127.0.0.1", tcp_port=1,
                      udp_port=2, limits=dataclasses.asdict(limits))
    received = WorkerSpec.from_json(spec.to_json())  # the line a worker reads on stdin
    assert SessionLimits(**(received.limits or {})) == limits
