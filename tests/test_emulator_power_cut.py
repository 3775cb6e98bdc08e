"""A power cut of an emulated device (cancelling its runner) closes its sockets at once,
whatever the garbage collector does: the server sees a TCP connection end (no close_notify)
and no longer holds the session, while a DTLS session stays until its idle timeout; a cut
during the handshake leaves no socket open either.

The collector is switched off in these tests: a trio ``SSLStream`` sits in a reference
cycle, so a socket the emulator left behind closed only when a full collection ran (rarely,
in a long test process with a large heap), and the server then held the TCP session of a
powered-off device for as long (``ota_sessions{transport="tcp"}`` stayed up in
tests/test_metrics_release.py under the full suite)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest
import trio

from server.bench.fleet.record_devices import RecordDeviceRunner
from server.emulator.fleet import EmulatedFleet
from server.transport.session import CloseReason
from tests.collector_state import collector_off
from tests.test_ota_e2e_kit import STEP, ota_rig, running


def udp_port_is_free(port: int) -> bool:
    """True if no socket is bound to this loopback UDP port any more."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind(("127.0.0.1", port))
    except OSError as exc:
        assert exc.errno == errno.EADDRINUSE, exc
        return False
    finally:
        probe.close()
    return True


def over_record_layers(fleet: EmulatedFleet) -> None:
    """Run the fleet's devices on the ``records`` stack (``ota bench fleet``'s default: our
    handshake objects and record layers instead of trio's SSLStream and DTLSChannel)."""
    fleet.open()
    for device_id, runner in list(fleet.runners.items()):
        fleet.runners[device_id] = RecordDeviceRunner(runner.device, runner.link)


@pytest.mark.parametrize("stack", ["openssl", "records"])
async def test_a_power_cut_closes_the_tls_connection_and_the_udp_socket_at_once(
        nursery: trio.Nursery, tmp_path: Path, stack: str) -> None:
    async with ota_rig(nursery, tmp_path, count=2) as rig:
        tcp_device, udp_device = rig.ids
        server = rig.kit.handle.device_server
        assert server is not None
        registry = server.registry
        fleet = rig.fleet([(tcp_device, "tcp"), (udp_device, "udp")])
        if stack == "records":
            over_record_layers(fleet)
        with collector_off():
            async with running(fleet):
                for device_id in rig.ids:
                    await rig.wait_device(device_id, lambda body: body["online"])
                tcp_session = registry.get(tcp_device)
                udp_session = registry.get(udp_device)
                assert tcp_session is not None and udp_session is not None
            # The powered-off device's kernel ended the TCP connection: EOF without
            # close_notify (RFC 8446 6.1), so the server ends the session now, not at
            # its idle timeout (120 s here).
            with trio.fail_after(STEP):
                while registry.get(tcp_device) is tcp_session:
                    await trio.sleep(0.01)
            assert tcp_session.close_reason == CloseReason.TRANSPORT_ERROR
            # No datagram tells the server that a DTLS peer is gone: its session stays...
            assert registry.get(udp_device) is udp_session and not udp_session.closed
            # ...but the device's UDP socket is closed (its port free again).
            assert udp_port_is_free(udp_session.peer[1])


@pytest.mark.parametrize("transport", ["tcp", "udp"])
async def test_a_power_cut_during_the_handshake_leaves_no_socket_open(
        nursery: trio.Nursery, tmp_path: Path, transport: str) -> None:
    """The device's ClientHello reaches a server that never answers; the power goes: the
    TCP connection ends (the listener reads EOF), the UDP socket is closed."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as silent:
            silent.bind(("127.0.0.1", 0))
            address = silent.getsockname()
            server_setting = "server" if transport == "tcp" else "udp_server"
            fleet = rig.fleet([(device_id, "tcp" if transport == "tcp" else "udp")],
                              **{server_setting: address})
            with collector_off():
                if transport == "tcp":
                    silent.listen()
                    listener = trio.SocketListener(trio.socket.from_stdlib_socket(silent))
                    async with running(fleet):
                        accepted = await listener.accept()
                        hello = await accepted.receive_some(4096)
                        assert hello[:1] == b"\x16"  # a TLS handshake record (ClientHello)
                    # Cut: the kernel ends the connection; nothing more arrives.
                    with trio.fail_after(STEP):
                        assert await accepted.receive_some(4096) == b""
                    await accepted.aclose()
                else:
                    udp = trio.socket.from_stdlib_socket(silent)
                    async with running(fleet):
                        hello, device_address = await udp.recvfrom(4096)
                        assert hello[:1] == b"\x16"  # a DTLS handshake record (ClientHello)
                    assert udp_port_is_free(device_address[1])

