"""Key rotation while devices are online: a device whose session began before ``ota product
rotate-key`` (and before the withdrawal of the key its last firmware was signed with) takes
the next release in that same session, over TLS and DTLS: the server sends it the rotation
statements it lacks (``POST k``, in pieces that fit its transport) before the offer signed
with the new key. A device whose firmware predates that (no ``key_push`` in its Hello) is
made to reconnect once, and learns them from its Hello's answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from otacore.protocol.link import Transport
from otacore.protocol.ota_wire import UDP_MAX_MESSAGE
from server.devices.keys import (
    Rotation,
    product_signing_key,
    product_statements,
    rotate_product_key,
    withdraw_product_key,
)
from server.emulator.flash import Flash
from server.store import Store
from tests.key_helpers import keys_caught_up
from tests.test_ota_e2e_kit import (
    STEP,
    SYSTEM_5003,
    TRANSPORTS,
    OtaRig,
    app,
    flash_statuses,
    ota_rig,
    running,
    updated_to,
)

FLASH_STATUS = "spark/flash/status"
#: Rotations while the device is online: their statements (~126 bytes each in a page) take
#: more than one message to a device over either transport (its 1024-byte messages over
#: TLS, one 1152-byte datagram over DTLS), so the statements travel in several pieces.
ROTATIONS = 12


async def _outcomes(rig: OtaRig, device_id: str, count: int) -> list[str]:
    """Wait until the device's flash statuses hold ``count`` outcomes (success or failed)
    and return them all: a refused offer ends the wait as surely as a success does."""
    with trio.fail_after(STEP):
        while True:
            statuses = flash_statuses(rig.events, device_id)
            if sum(s in ("success", "failed") for s in statuses) >= count:
                return statuses
            await rig.events.changed.wait()
            rig.events.changed = trio.Event()


def _rotate_then_withdraw(store: Store, data: Path, product: int,
                          withdrawn: str) -> list[Rotation]:
    rotations = [rotate_product_key(store, data, product) for _ in range(ROTATIONS)]
    withdraw_product_key(store, data, product, withdrawn)
    return rotations


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("key_push", [True, False], ids=["key-push", "older-firmware"])
async def test_a_device_online_through_a_rotation_takes_the_next_release(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport, key_push: bool
) -> None:
    """The device runs v2, signed with the original key, in a session opened before 12
    rotations and the withdrawal of that key. The immediate release of v3 (signed with the
    newest key) reaches it: with key push in the same session (one more session only: the
    one after the reset into v3); an older device after one reconnect the server asks for.
    Its trust store ends at the product's sequence, without the withdrawn key."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        data, store = rig.kit.data_dir, rig.kit.handle.store
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, app(2))
        await rig.upload(3, app(3))
        fleet = rig.fleet([(device_id, transport)], key_push=key_push)
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            await rig.release(2, product_default=True, intelligent=True)
            assert await _outcomes(rig, device_id, 1) == ["started", "success"]
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            original = product_signing_key(store, data, rig.product)  # the key v2 was signed with
            device = fleet.device(device_id).device
            sessions = device.sessions

            rotations = await trio.to_thread.run_sync(
                _rotate_then_withdraw, store, data, rig.product, original.key_id)
            statements = product_statements(store, rig.product)
            await keys_caught_up(store, data, rig.kit.handle.devices, rig.product)
            page_bytes = sum(len(s) + 2 for s in statements)
            assert page_bytes > UDP_MAX_MESSAGE  # more than one piece, over either transport
            await rig.release(3, product_default=True, intelligent=True)
            assert await _outcomes(rig, device_id, 2) == ["started", "success"] * 2
            await fleet.wait_until(updated_to(device_id, 3), timeout=STEP)
            assert device.status().last_error == ""
            # With key push: no reconnect, only the reset into v3. Older firmware: one
            # reconnect (asked by the server) before the offer, then the reset.
            assert device.sessions == sessions + (1 if key_push else 2)
        trust = Flash.open(rig.state_root / device_id, fsync=False).load_trust_store()
        assert trust is not None and trust.sequence == len(statements) == ROTATIONS + 1
        assert rotations[-1].new.key_id in trust.key_ids
        assert original.key_id not in trust.key_ids
