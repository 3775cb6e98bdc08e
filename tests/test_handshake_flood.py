"""One client must not stall every device's handshake (issue 13, finding 2).

Over real sockets: an attacker on 127.0.0.2 holds many connections (silent ones, and
handshakes it starts and never finishes, over TLS and DTLS) while a real device on
127.0.0.1 connects. The device completes its handshake while the attacker's connections
are still open; the attacker's connections beyond its address's bound are closed at once,
and the refusals reach the log at WARNING, aggregated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket

import pytest
import trio

from server.authorization import MemoryDeviceDirectory
from server.transport import DeviceServer, RefuseReason, SessionLimits
from server.transport.client import connect_dtls, connect_tls
from server.transport.refusals import RefusalLog
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
    tcp,
)

ATTACKER = "127.0.0.2"
#: The default admission bounds, with waits long enough that nothing the attacker holds
#: times out while a test runs (the tests assert that the device got through *while* the
#: attacker's connections were open, not how fast).
PATIENT = SessionLimits(hello_timeout=60.0, handshake_timeout=60.0, handshake_wait=60.0)


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
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=PATIENT)
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


async def test_stalled_tls_handshakes_from_one_address_hold_only_its_share_of_slots(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=PATIENT)
    attackers = []
    for _ in range(PATIENT.max_handshakes):  # as many as there are slots in the process
        stream = await trio.open_tcp_stream(*tcp(server), local_address=ATTACKER)
        await stream.send_all(b"\x16")  # a ClientHello's first byte, then nothing
        attackers.append(stream)
    share = PATIENT.max_handshakes_per_address
    await eventually(lambda: server.host.gate.handshakes(ATTACKER) == share, timeout=30)
    await eventually(
        lambda: server.host.handshakes_waiting == PATIENT.max_handshakes - share, timeout=30
    )
    assert await device_answers_over_tls(server, kit) == f"{kit.good_id}|tcp|False"
    # The attacker still holds its share and its other connections still wait their turn.
    assert server.host.gate.handshakes(ATTACKER) == share
    assert server.host.gate.pending(ATTACKER) == PATIENT.max_handshakes
    assert not any(map(closed_by_server, attackers))
    for stream in attackers:
        await stream.aclose()


async def test_stalled_dtls_handshakes_from_one_address_hold_only_its_share_of_slots(
    nursery: trio.Nursery, kit: DeviceKit, directory: MemoryDeviceDirectory
) -> None:
    """The cookie exchange proves an address, not that it is one device: one address with
    many source ports passes it many times."""
    server = await start_device_server(nursery, kit, directory, EchoHandler(), limits=PATIENT)
    attackers = [
        await start_silent_handshake(server, kit.other, local_address=ATTACKER)
        for _ in range(PATIENT.max_handshakes)
    ]
    share = PATIENT.max_handshakes_per_address
    await eventually(lambda: server.host.gate.handshakes(ATTACKER) == share, timeout=30)
    await eventually(lambda: server.host.gate.pending(ATTACKER) == len(attackers), timeout=30)
    async with dtls_endpoint() as local:
        with trio.fail_after(30):
            channel = await connect_dtls(local, server.udp_address or ("", 0), kit.good)
            assert await dtls_ask(channel, b"who") == f"{kit.good_id}|udp|False".encode()
        # Served while the attacker's handshakes are all still pending.
        assert server.host.gate.handshakes(ATTACKER) == share
        assert server.host.gate.pending(ATTACKER) == len(attackers)
        channel.close()
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

    from server.app import ServerConfig
    from server.cli import server_cmd

    captured: list[ServerConfig] = []

    async def run_server(config: ServerConfig) -> None:  # instead of serving
        captured.append(config)

    monkeypatch.setattr(server_cmd, "_run_server", run_server)
    runner = CliRunner()
    result = runner.invoke(
        server_cmd.app,
        ["server", "--data", "unused", "--device-limit", "max_pending_per_address=1000",
         "--device-limit", "hello_timeout=2.5"],
    )
    assert result.exit_code == 0, result.output
    (config,) = captured
    assert config.device_limits.max_pending_per_address == 1000
    assert config.device_limits.hello_timeout == 2.5
    assert config.device_limits.max_handshakes_per_address == 16  # the rest: defaults
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
