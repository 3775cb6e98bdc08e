"""A DTLS session keeps its AEAD objects while a transfer streams, and drops them once it
is idle again (issue 14: dropping them at every quiet moment of a transfer rebuilt two
OpenSSL contexts per acknowledgement, ~3.4 ms of server CPU per MB). Real server, real
DTLS 1.2 sockets, an emulated device; the checks read the session's record layer at
points the device's own progress defines, never after a sleep."""

from __future__ import annotations

from pathlib import Path

import trio

from server.devices.updater import SessionUpdater
from tests.test_ota_e2e_kit import (
    STEP,
    SYSTEM_5003,
    WatchedFlash,
    app,
    ota_rig,
    running,
    updated_to,
)

CHUNK = 1024


async def test_a_streaming_dtls_session_keeps_its_ciphers_and_drops_them_once_idle(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        rig.tune_engine(udp_chunk_size=CHUNK, progress_interval=3600.0)
        v2 = app(2, size=96 * CHUNK)
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, v2)
        await rig.release(2, product_default=True)
        fleet = rig.fleet([(device_id, "udp")], ota_chunk_size=CHUNK)
        fleet.open()
        mid_transfer: list[tuple[bool, bool]] = []
        updaters: list[SessionUpdater] = []

        def at_mark(_: int) -> None:
            """Half-way through the image: the server waits for the device's next ack."""
            updater = rig.engine.updaters[device_id]
            updaters.append(updater)
            session = updater.handler.session
            mid_transfer.append((updater.handler.streaming,
                                 session.link.layer.holds_aeads))  # type: ignore[attr-defined]

        WatchedFlash.install(fleet, device_id, marks=[48 * CHUNK], on_mark=at_mark)
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for("spark/flash/status", device_id, "success")
            (updater,) = updaters
            registry = rig.kit.handle.device_server.registry  # type: ignore[union-attr]
            # The device reboots into v2 and comes back; its new session, idle once the
            # update is recorded, holds no AEAD objects after its last answer went out.
            with trio.fail_after(STEP):
                while True:
                    session = registry.get(device_id)
                    handler = registry.handler(device_id)
                    if (session is not None and session is not updater.handler.session
                            and handler is not None and not handler.streaming  # type: ignore[attr-defined]
                            and not session.link.layer.holds_aeads):  # type: ignore[attr-defined]
                        break
                    await trio.sleep(0.05)
        assert mid_transfer == [(True, True)]
