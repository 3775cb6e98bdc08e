"""A store error in a session's OTA write must not leave the device on its old firmware.

Found by ``ota bench fleet --nodes 2`` on PostgreSQL (before the store took one advisory
lock per write transaction): a progress write of a transfer failed with "the change
collided with another one" (an IntegrityError: two nodes inserted the same
``device_updates`` row), and that device stayed online on v1, never offered the release
again, while the other 999 updated.

Here the collision is made on purpose and only once, with a real SQLite file: a trigger
aborts every write of ``device_updates`` (SQLite reports ``RAISE(ABORT)`` as a constraint
failure, which the store turns into StoreConflictError exactly as it does a unique
violation), and is dropped as soon as the server logged the failed update. The collision
was transient: the device's session lives on, so the device still ends on v2: the updater
checks again after a store error (backing off from retry_pause), in the same session.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
import trio

from server.store.errors import StoreUnavailableError
from server.store.store import DB_FILENAME
from tests.test_ota_e2e_kit import (
    STEP,
    SYSTEM_5003,
    app,
    ota_rig,
    running,
    updated_to,
)

#: Small chunks and an early progress write, so the transfer's first write comes early.
SMALL_WINDOWS = {
    "tcp_chunk_size": 1024,
    "udp_chunk_size": 1024,
    "window_limit": 4,
    "progress_step": 4096,
}
COLLIDE = """
CREATE TRIGGER test_collide_{kind} BEFORE {kind} ON device_updates
BEGIN SELECT RAISE(ABORT, 'UNIQUE constraint failed: device_updates.device_id'); END
"""


def _sql(database: Path, *statements: str) -> None:
    with sqlite3.connect(database, timeout=30) as conn:
        for statement in statements:
            conn.execute(statement)


async def test_a_collided_transfer_write_is_retried_in_the_same_session(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # One transport: the updater is the same for both (the wait below costs STEP when
    # the bug is present).
    caplog.set_level(logging.WARNING, logger="ota.engine")
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        rig.tune_engine(**SMALL_WINDOWS)
        database = rig.kit.data_dir / DB_FILENAME
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, app(2, size=48_000))
        fleet = rig.fleet([(device_id, "tcp")], ota_chunk_size=1024)
        async with running(fleet):
            await rig.wait_device(device_id, lambda d: d["online"])
            await rig.engine_done(device_id)  # nothing to offer yet: the device runs v1
            sessions = fleet.device(device_id).device.sessions
            await trio.to_thread.run_sync(
                _sql, database, COLLIDE.format(kind="INSERT"), COLLIDE.format(kind="UPDATE")
            )
            await rig.release(2, product_default=True, intelligent=True)

            def failed_update() -> list[str]:
                return [r.getMessage() for r in caplog.records
                        if r.getMessage().startswith(f"update of {device_id} failed")]

            with trio.fail_after(STEP):
                while not failed_update():  # the transfer's first write collided
                    await trio.sleep(0.01)
            print("server logged:", failed_update())
            assert "collided" in failed_update()[0]
            await trio.to_thread.run_sync(
                _sql, database, "DROP TRIGGER test_collide_INSERT",
                "DROP TRIGGER test_collide_UPDATE",
            )
            # The collision is over; the session lives: the release must still reach it.
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            # (Its reboot into v2 opens the next session; before that it never left.)
            assert fleet.device(device_id).device.sessions == sessions + 1


async def test_an_immediate_release_whose_grouped_read_failed_still_reaches_its_devices(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine reads every online device's target for an immediate release in one
    grouped read; when that read fails (the database locked or away) the release is not
    dropped: each session of the product checks for itself."""
    caplog.set_level(logging.WARNING, logger="ota.engine")
    async with ota_rig(nursery, tmp_path, count=2) as rig:
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, app(2))
        fleet = rig.fleet([(rig.ids[0], "tcp"), (rig.ids[1], "udp")])
        async with running(fleet):
            for device_id in rig.ids:
                await rig.wait_device(device_id, lambda d: d["online"])
                await rig.engine_done(device_id)  # nothing to offer yet: they run v1
            fleet_service = rig.engine.fleet
            reads: list[int] = []

            async def unavailable(product_id: int, **_: object) -> object:
                reads.append(product_id)
                raise StoreUnavailableError("the database is locked (made by the test)")

            monkeypatch.setattr(fleet_service, "online_devices_needing_update", unavailable)
            await rig.release(2, product_default=True, intelligent=True)
            for device_id in rig.ids:
                await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            assert reads == [rig.product]
            assert any("each of its sessions checks for itself" in r.getMessage()
                       for r in caplog.records)
