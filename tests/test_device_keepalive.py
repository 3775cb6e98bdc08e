"""The emulated device's keep-alive over a path that went dead while the device talks.

Device OS pings once nothing was *received* for its ping interval (``Pinger::process`` on
the time since the last message received), so a device that keeps publishing over a dead
path still asks, and gives up a ping timeout later. Counting from what it last *sent*, as
the emulator did, a device publishing more often than its ping interval never pinged over
TCP (its requests never time out there) until its queue of unanswered requests filled.
Sans-IO, on the simulated clock of tests/test_emulated_device.py's harness.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from otacore.device.emulated import DeviceConfig, DevicePhase
from otacore.protocol.link import Transport
from tests.test_emulated_device import DEVICE_ID, PLATFORM, TRANSPORTS, Harness

INTERVAL, TIMEOUT = 4.0, 3.0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_device_publishing_over_a_dead_path_finds_it_dead_by_its_ping(
        tmp_path: Path, transport: Transport) -> None:
    config = DeviceConfig(DEVICE_ID, PLATFORM, heartbeat_interval=0.5,
                          keepalive_interval=INTERVAL, keepalive_timeout=TIMEOUT)
    h = Harness(tmp_path, transport, config=config)
    h.run_until(lambda: h.device.online)
    h.run_for(10.0)
    assert h.disconnects == []  # answered heartbeats: nothing to ask
    # The path dies: nothing reaches the device any more, while it goes on publishing.
    h.drop_to_device = lambda data: True
    h.auto_connect = False
    silent_since = h.now
    h.run_until(lambda: h.disconnects != [], max_time=60.0)
    assert "keep-alive" in h.disconnects[0], h.disconnects
    # A ping INTERVAL after the last answer, given up TIMEOUT later (plus the wait for
    # answers already on their way when the path died: at most one heartbeat).
    assert h.now - silent_since <= INTERVAL + TIMEOUT + 0.5
    assert h.device.phase is DevicePhase.CONNECTING


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_idle_device_pings_every_interval_and_keeps_its_session(
        tmp_path: Path, transport: Transport) -> None:
    config = DeviceConfig(DEVICE_ID, PLATFORM, keepalive_interval=INTERVAL,
                          keepalive_timeout=TIMEOUT)
    h = Harness(tmp_path, transport, config=config)
    h.run_until(lambda: h.device.online)
    h.run_for(10 * INTERVAL)
    assert h.disconnects == []
    assert h.device.online
