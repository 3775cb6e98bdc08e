"""Signing key rotation over the air: a device learns a new key (introduced by the old one)
in the answer to its Hello, accepts firmware signed with it, and drops a withdrawn key."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
import trio
from typer.testing import CliRunner

from otacore.protocol.link import Transport
from server.cli.main import app as ota_app
from server.devices.keys import (
    MAX_PRODUCT_KEYS,
    Rotation,
    product_signing_key,
    product_statements,
    rotate_product_key,
    withdraw_product_key,
)
from server.emulator.flash import Flash
from server.store import schema as t
from tests.key_helpers import keys_caught_up
from tests.test_ota_e2e_kit import STEP, SYSTEM_5003, TRANSPORTS, app, ota_rig, running, updated_to


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_rotation_reaches_devices_before_firmware_signed_with_the_new_key(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        data, store = rig.kit.data_dir, rig.kit.handle.store
        old = product_signing_key(store, data, rig.product)
        runner = CliRunner()
        result = await trio.to_thread.run_sync(lambda: runner.invoke(
            ota_app, ["product", "rotate-key", "--data", str(data), "--product",
                      str(rig.product), "--json"]))
        assert result.exit_code == 0, result.output
        new = product_signing_key(store, data, rig.product)
        assert new.key_id != old.key_id and len(product_statements(store, rig.product)) == 1
        await keys_caught_up(store, data, rig.kit.handle.devices, rig.product)
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, app(2))
        fleet = rig.fleet([(device_id, transport)])  # provisioned trusting the old key only
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            await rig.release(2, product_default=True, intelligent=True)
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)  # signed with new
        trust = Flash.open(rig.state_root / device_id, fsync=False).load_trust_store()
        assert trust is not None and trust.sequence == 1
        assert {old.key_id, new.key_id} <= set(trust.key_ids)

        result = await trio.to_thread.run_sync(lambda: runner.invoke(
            ota_app, ["product", "withdraw-key", old.key_id, "--data", str(data),
                      "--product", str(rig.product)]))
        assert result.exit_code == 0, result.output
        refused = await trio.to_thread.run_sync(lambda: runner.invoke(
            ota_app, ["product", "withdraw-key", new.key_id, "--data", str(data),
                      "--product", str(rig.product)]))
        assert refused.exit_code == 1 and "cannot be withdrawn" in refused.output
        await keys_caught_up(store, data, rig.kit.handle.devices, rig.product)
        fleet = rig.fleet([(device_id, transport)])
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
        trust = Flash.open(rig.state_root / device_id, fsync=False).load_trust_store()
        assert trust is not None and trust.sequence == 2
        assert new.key_id in trust.key_ids and old.key_id not in trust.key_ids
        # Both changes are in the product's audit log; the refused withdrawal is not.
        with rig.kit.handle.store.read() as tx:
            audited = [(row.action, row.target, row.product_id)
                       for row in tx.conn.execute(sa.select(t.audit_log)).all()
                       if row.action.startswith("key.")]
        assert audited == [("key.rotate", f"key:{new.key_id}", rig.product),
                           ("key.withdraw", f"key:{old.key_id}", rig.product)]


#: More rotations than one answer ever carried (64); the original key is withdrawn after
#: the first few, and the product retires keys beyond MAX_PRODUCT_KEYS on its own.
ROTATIONS_BEFORE, ROTATIONS_AFTER = 5, 65


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_many_rotations_and_a_withdrawn_original_key_still_update_a_device(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    """Issue 13 finding 4: a product rotated 70 times, whose original key was withdrawn,
    still updates a device provisioned trusting only the original key. The device gets only
    the statements it lacks, a message-sized page at a time (GET k for the rest), and
    applies all of them before the update signed with the newest key is offered."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        data, store = rig.kit.data_dir, rig.kit.handle.store
        original = product_signing_key(store, data, rig.product)

        def rotate_many() -> list[Rotation]:
            rotations = [rotate_product_key(store, data, rig.product)
                         for _ in range(ROTATIONS_BEFORE)]
            withdraw_product_key(store, data, rig.product, original.key_id)
            rotations += [rotate_product_key(store, data, rig.product)
                          for _ in range(ROTATIONS_AFTER)]
            return rotations

        rotations = await trio.to_thread.run_sync(rotate_many)
        statements = product_statements(store, rig.product)
        await keys_caught_up(store, data, rig.kit.handle.devices, rig.product)
        assert len(statements) > 64 and any(r.retired for r in rotations)
        newest = rotations[-1].new.key_id
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, app(2))
        await rig.release(2, product_default=True, intelligent=True)
        fleet = rig.fleet([(device_id, transport)])  # provisioned trusting the original only
        assert rig.trust.key_ids == (original.key_id,)
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)  # signed by newest
            await rig.events.wait_for("spark/flash/status", device_id, "success")
            assert fleet.device(device_id).device.last_error == ""
        trust = Flash.open(rig.state_root / device_id, fsync=False).load_trust_store()
        assert trust is not None and trust.sequence == len(statements)
        assert newest in trust.key_ids and original.key_id not in trust.key_ids
        assert len(trust.key_ids) == MAX_PRODUCT_KEYS
