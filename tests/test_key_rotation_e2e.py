"""Signing key rotation over the air: a device learns a new key (introduced by the old one)
in the answer to its Hello, accepts firmware signed with it, and drops a withdrawn key."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from typer.testing import CliRunner

from otacore.protocol.link import Transport
from server.cli.main import app as ota_app
from server.devices.keys import product_signing_key, product_statements
from server.emulator.flash import Flash
from tests.test_ota_e2e_kit import STEP, SYSTEM_5003, TRANSPORTS, app, ota_rig, running, updated_to


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_rotation_reaches_devices_before_firmware_signed_with_the_new_key(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        data = rig.kit.data_dir
        old = product_signing_key(data, rig.product)
        runner = CliRunner()
        result = await trio.to_thread.run_sync(lambda: runner.invoke(
            ota_app, ["product", "rotate-key", "--data", str(data), "--product",
                      str(rig.product), "--json"]))
        assert result.exit_code == 0, result.output
        new = product_signing_key(data, rig.product)
        assert new.key_id != old.key_id and len(product_statements(data, rig.product)) == 1
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
        fleet = rig.fleet([(device_id, transport)])
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
        trust = Flash.open(rig.state_root / device_id, fsync=False).load_trust_store()
        assert trust is not None and trust.sequence == 2
        assert new.key_id in trust.key_ids and old.key_id not in trust.key_ids
