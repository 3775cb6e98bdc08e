"""End to end over real sockets: releases reach devices on a known base as delta patches.

Devices on v1 get v2 as a patch computed once for the (v1, v2) pair and shared; a device whose
running image the server does not store gets the full image; an unrelated v3, whose patch
would save nothing, goes out as full images. The bytes each release sent against the bytes
full images would have taken are counted per firmware version.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio

from otacore import delta
from otacore.protocol.link import Transport
from server.api.serialize import firmware_json
from server.fleet.deltas import RELEASE_BYTES_EVENT
from tests.test_ota_e2e_kit import (
    STEP,
    SYSTEM_5003,
    TRANSPORTS,
    app,
    app_with_body,
    flash_statuses,
    ota_rig,
    running,
    sha,
    transfers_of,
    updated_to,
)

_BODY = hashlib.shake_256(b"delta test application").digest(48_000)


def _edited(body: bytes, edits: dict[int, bytes]) -> bytes:
    out = bytearray(body)
    for at, data in edits.items():
        out[at : at + len(data)] = data
    return bytes(out)


V1 = app_with_body(1, _BODY)
#: v2: v1 with a few small edits (a bug fix), so a patch is a tiny fraction of the image.
V2 = app_with_body(2, _edited(_BODY, {1_000: b"fixed the sensor", 30_000: b"\x01\x02\x03\x04"}))
#: A v1 the server never stored: a device running it has no known base.
V1_UNKNOWN = app_with_body(1, _edited(_BODY, {20_000: b"local build"}))
#: An unrelated v3: its patch from v2 is not smaller than the image.
V3 = app(3, size=48_000, seed="unrelated")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_known_base_gets_a_shared_delta_unknown_base_and_unrelated_image_get_full(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=3) as rig:
        a, b, c = rig.ids
        fleet_service = rig.engine.fleet
        await rig.upload_device_os(SYSTEM_5003)
        for version, image in ((1, V1), (2, V2), (3, V3)):
            await rig.upload(version, image)
        devices = rig.fleet([(a, transport), (b, transport)], firmware=(SYSTEM_5003, V1))
        unknown = rig.fleet([(c, transport)], firmware=(SYSTEM_5003, V1_UNKNOWN))
        async with running(devices), running(unknown):
            for device_id in (a, b, c):
                await rig.wait_device(device_id, lambda d: d["online"] and bool(d["modules"]))

            # v2 to everyone at once: a and b (on the stored v1) share one patch.
            await rig.release(2, product_default=True, intelligent=True)
            await devices.wait_until(
                lambda f: all(updated_to(d, 2)(f) for d in (a, b)), timeout=STEP
            )
            await unknown.wait_until(updated_to(c, 2), timeout=STEP)
            await rig.events.wait_for(RELEASE_BYTES_EVENT, count=3)
            for device_id in (a, b, c):
                body = await rig.wait_device(device_id, lambda d: sha(V2) in str(d["modules"]))
                assert body["firmware_version"] == 2
            sent = transfers_of(rig.events, 2)
            assert {d: sent[d]["transfer"] for d in (a, b, c)} == {
                a: "delta",
                b: "delta",
                c: "full",
            }
            patch_size = sent[a]["bytes_sent"]
            assert patch_size == sent[b]["bytes_sent"]
            assert patch_size * 20 < len(V2), (patch_size, len(V2))
            assert sent[c]["bytes_sent"] == len(V2)
            assert rig.engine.deltas.computed == 1  # computed once, reused for b
            assert await fleet_service.count_deltas() == 1
            totals = await fleet_service.transfer_bytes(rig.product, 2)
            assert totals == {
                "bytes_sent": 2 * patch_size + len(V2),
                "bytes_full": 3 * len(V2),
                "delta_transfers": 2,
                "full_transfers": 1,
                "compressed_transfers": 0,
            }
            view = await fleet_service.get_firmware(rig.product, 2)
            stats = firmware_json(view, totals)["release_stats"]
            assert (stats["bytes_sent"], stats["bytes_full_images"]) == (
                2 * patch_size + len(V2),
                3 * len(V2),
            )

            # v3 has nothing in common with v2: the patch is not worth sending.
            await rig.release(3, product_default=True, intelligent=True)
            await devices.wait_until(
                lambda f: all(updated_to(d, 3)(f) for d in (a, b)), timeout=STEP
            )
            await unknown.wait_until(updated_to(c, 3), timeout=STEP)
            await rig.events.wait_for(RELEASE_BYTES_EVENT, count=6)
            sent = transfers_of(rig.events, 3)
            assert {d: (s["transfer"], s["bytes_sent"]) for d, s in sent.items()} == {
                d: ("full", len(V3)) for d in (a, b, c)
            }
            assert rig.engine.deltas.computed == 2  # (v2, v3) tried once for all three
            for device_id in (a, b, c):
                body = await rig.wait_device(device_id, lambda d: sha(V3) in str(d["modules"]))
                assert body["firmware_version"] == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_refused_delta_falls_back_to_the_full_image_in_the_same_session(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    """The server believes the device runs the stored v1 (its record says so) while it runs
    another build: the device refuses the patch (BAD_BASE) and gets the full image at once."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(1, V1)
        await rig.upload(2, V2)
        fleet = rig.fleet([(device_id, transport)], firmware=(SYSTEM_5003, V1_UNKNOWN))
        async with running(fleet):
            body = await rig.wait_device(device_id, lambda d: d["online"] and bool(d["modules"]))
            sessions = fleet.device(device_id).device.sessions
            modules = [
                {**m, "sha256": sha(V1)} if m["sha256"] == sha(V1_UNKNOWN) else m
                for m in body["modules"]
            ]
            assert modules != body["modules"]
            store = rig.engine.fleet.store
            with store.write() as tx:  # what a stale Describe would have left
                tx.update_device(device_id, {"modules": modules}, 0)
            await rig.release(2, product_default=True, intelligent=True)
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for(RELEASE_BYTES_EVENT)
            await rig.events.wait_for("spark/flash/status", device_id, "success")
            assert transfers_of(rig.events, 2)[device_id]["transfer"] == "full"
            assert (device_id, sha(V1), sha(V2)) in rig.engine.deltas.refused
            assert flash_statuses(rig.events, device_id) == ["started", "success"]
            # Refused then taken in one session; one more after the reset into v2.
            assert fleet.device(device_id).device.sessions == sessions + 1
            body = await rig.wait_device(device_id, lambda d: sha(V2) in str(d["modules"]))
            assert body["firmware_version"] == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_each_device_gets_a_patch_in_the_newest_format_its_applier_reads(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    """Three devices on v1: one whose Hello names the newest delta format, one that names
    version 4 and one that names none (older firmware, taken as version 4). The server
    makes the pair once per format and each device applies its own; a device emulating a
    version 4 applier refuses newer patches, so a server that ignored its Hello would have
    fallen back to the full image."""
    async with ota_rig(nursery, tmp_path, count=3) as rig:
        newest, held, unnamed = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        for version, image in ((1, V1), (2, V2)):
            await rig.upload(version, image)
        fleets = [
            rig.fleet([(newest, transport)], firmware=(SYSTEM_5003, V1)),
            rig.fleet([(held, transport)], firmware=(SYSTEM_5003, V1), delta_format=4),
            rig.fleet([(unnamed, transport)], firmware=(SYSTEM_5003, V1), delta_format=None),
        ]
        async with running(fleets[0]), running(fleets[1]), running(fleets[2]):
            for device_id in rig.ids:
                await rig.wait_device(device_id, lambda d: d["online"] and bool(d["modules"]))
            await rig.release(2, product_default=True, intelligent=True)
            for fleet, device_id in zip(fleets, rig.ids, strict=True):
                await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for(RELEASE_BYTES_EVENT, count=3)
            sent = transfers_of(rig.events, 2)
            assert {d: s["transfer"] for d, s in sent.items()} == dict.fromkeys(rig.ids, "delta")
            stored = {
                version: await rig.engine.fleet.find_delta(sha(V1), sha(V2), version)
                for version in (4, 5)
            }
            assert all(found is not None for found in stored.values())
            versions = {v: delta.read_header(found[1]).version  # type: ignore[index]
                        for v, found in stored.items()}
            assert versions == {4: 4, 5: 5}, versions  # (V1 -> V2 gains from sparse columns)
            assert sent[newest]["bytes_sent"] == len(stored[5][1])  # type: ignore[index]
            for device_id in (held, unnamed):
                assert sent[device_id]["bytes_sent"] == len(stored[4][1])  # type: ignore[index]
            assert rig.engine.deltas.computed == 2
            assert await rig.engine.fleet.count_deltas() == 2
            for device_id in rig.ids:  # no refusal, no fallback: one flash each
                await rig.events.wait_for("spark/flash/status", device_id, "success")
                assert flash_statuses(rig.events, device_id) == ["started", "success"]
