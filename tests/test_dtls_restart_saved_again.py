"""A restored DTLS session that a graceful shutdown finds still being authorized again is
saved again as it was, not refused (issue 14 item 6): the third process serves the device
on the same session, with no handshake. Real servers on one loopback port, a real OpenSSL
device (trio.DTLSEndpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from server.authorization import ClientCertificate, MemoryDeviceDirectory
from server.transport.client import connect_dtls
from tests.test_dtls_restart import SuspendableEcho, free_udp_port, handshakes, running
from tests.test_transport_dtls import ask, endpoint
from tests.test_transport_tls import PATIENCE, DeviceKit, make_device_kit


@pytest.fixture
def kit(tmp_path: Path) -> DeviceKit:
    return make_device_kit(tmp_path)


@pytest.fixture
def directory(kit: DeviceKit) -> MemoryDeviceDirectory:
    return kit.directory()


@pytest.fixture
def port() -> int:
    return free_udp_port()


class GatedDirectory(MemoryDeviceDirectory):
    """A directory whose answers wait until :attr:`gate` is set (a slow store)."""

    def __init__(self, inner: MemoryDeviceDirectory) -> None:
        super().__init__()
        self.inner = inner
        self.gate = trio.Event()
        self.asked = trio.Event()

    async def authorize(self, certificate: ClientCertificate) -> bool:
        self.asked.set()
        await self.gate.wait()
        return await self.inner.authorize(certificate)


async def test_a_session_still_being_authorized_at_shutdown_is_saved_again(
    kit: DeviceKit, directory: MemoryDeviceDirectory, port: int
) -> None:
    async with endpoint() as device_endpoint:
        async with running(kit, directory, port) as first:
            with trio.fail_after(PATIENCE):
                channel = await connect_dtls(device_endpoint, ("127.0.0.1", port), kit.good)
            await ask(channel, b"x")
            with trio.fail_after(PATIENCE):
                await first.shutdown()
        assert first.udp_endpoint is not None and first.udp_endpoint.stats.saved == 1

        gated = GatedDirectory(directory)
        async with running(kit, gated, port) as second, trio.open_nursery() as nursery:
            with trio.fail_after(PATIENCE):
                await gated.asked.wait()  # the restored session waits for its answer
            nursery.start_soon(second.shutdown)
            with trio.fail_after(PATIENCE):
                while second.host.accepting:
                    await trio.sleep(0.01)
            gated.gate.set()  # the answer comes once the shutdown has begun
        assert second.udp_endpoint is not None
        assert second.udp_endpoint.stats.restored == 0
        assert second.udp_endpoint.stats.saved == 1
        assert not second.udp_endpoint.stats.not_restored

        echo = SuspendableEcho()
        async with running(kit, directory, port, handler=echo) as third:
            await ask(channel, b"y")  # on the same DTLS session: no handshake
            assert third.udp_endpoint is not None
            assert third.udp_endpoint.stats.restored == 1
            assert handshakes(third) == 0
            # What the first process's handler saved, carried through the second.
            assert echo.restored_states == [b"heard=1"]
            with trio.fail_after(PATIENCE):
                await third.shutdown()
        channel.close()
