"""A DTLS session saved at a graceful restart and restored by the next server is counted
as a ``restored`` handshake (it had none), not as a full one; the session gauge follows the
session out of the first server and into the second."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from server.authorization import MemoryDeviceDirectory
from server.metrics import REGISTRY
from server.transport.client import connect_dtls
from tests.test_dtls_restart import SuspendableEcho, free_udp_port, running
from tests.test_transport_dtls import ask, endpoint
from tests.test_transport_tls import PATIENCE, DeviceKit, make_device_kit


@pytest.fixture
def kit(tmp_path: Path) -> DeviceKit:
    return make_device_kit(tmp_path)


def handshakes(kind: str) -> float:
    value = REGISTRY.get_sample_value(
        "ota_handshakes_total", {"transport": "udp", "kind": kind, "result": "ok"})
    assert value is not None
    return value


def udp_sessions() -> float:
    value = REGISTRY.get_sample_value("ota_sessions", {"transport": "udp"})
    assert value is not None
    return value


async def test_a_restored_dtls_session_counts_as_restored(kit: DeviceKit) -> None:
    directory: MemoryDeviceDirectory = kit.directory()
    port = free_udp_port()
    full, restored, sessions = handshakes("full"), handshakes("restored"), udp_sessions()
    async with endpoint() as device_endpoint:
        async with running(kit, directory, port, SuspendableEcho()) as first:
            with trio.fail_after(PATIENCE):
                channel = await connect_dtls(device_endpoint, ("127.0.0.1", port), kit.good)
            assert await ask(channel, b"who") == f"{kit.good_id}|udp|False".encode()
            assert (handshakes("full") - full, udp_sessions() - sessions) == (1, 1)
            with trio.fail_after(PATIENCE):
                await first.shutdown()  # saved for the next process
            assert udp_sessions() == sessions
        async with running(kit, directory, port, SuspendableEcho()) as second:
            assert await ask(channel, b"again") == b"again"
            assert second.udp_endpoint is not None and second.udp_endpoint.stats.restored == 1
            assert handshakes("restored") - restored == 1
            assert handshakes("full") - full == 1  # no new handshake
            assert udp_sessions() - sessions == 1
            channel.close()
