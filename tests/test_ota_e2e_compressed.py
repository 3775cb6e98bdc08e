"""End to end over real sockets: full images travel zstd-compressed to devices that inflate them.

A device that announces compressed OTA (Hello ``compressed_ota``) and runs no known base gets
the image as one zstd frame, inflates it, and installs it only when the inflated image matches
the signed manifest's SHA-256. A device that does not announce it gets the raw image. A device
that takes the frame but cannot inflate it (its zstd window is smaller than the frame's) makes
the server fall back to the raw image in the same session. An incompressible image travels raw
to everyone. Release counters count compressed transfers on their own. When a device on a
stored base could get either a patch or the frame, the smaller travels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio

from otacore.protocol.link import Transport
from otacore.zstd_image import compress_image
from server.fleet.deltas import RELEASE_BYTES_EVENT
from tests.test_ota_e2e_kit import (
    STEP,
    SYSTEM_5003,
    TRANSPORTS,
    app,
    app_with_body,
    ota_rig,
    running,
    transfers_of,
    updated_to,
)


def _firmware_like_body(version: int, size: int) -> bytes:
    """Compressible like real firmware: repeated instruction-like patterns, tables, strings
    and zero-filled padding, different per version (so no delta base applies)."""
    out = bytearray()
    seed = hashlib.sha256(f"compressible v{version}".encode()).digest()
    n = 0
    while len(out) < size:
        n += 1
        out += seed[n % 32 : n % 32 + 4] * 3  # a few repeated opcodes
        out += f"log: sensor {n % 97} reading out of range (v{version})\0".encode()
        out += (n * 2654435761 % 2**32).to_bytes(4, "little")
        if n % 50 == 0:
            out += bytes(256)
    return bytes(out[:size])


def _app(version: int) -> bytes:
    return app_with_body(version, _firmware_like_body(version, 60_000))


#: v1 runs; the server never stores it, so no delta base is known and v2 goes out whole.
V1 = _app(1)
V2 = _app(2)
#: Incompressible (pseudo-random body): the frame would save nothing.
V3 = app(3, size=40_000, seed="incompressible")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_devices_announcing_compressed_ota_get_zstd_frames_others_raw_images(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    assert len(compress_image(V2)) * 2 < len(V2)  # the test image is compressible
    async with ota_rig(nursery, tmp_path, count=3) as rig:
        a, b, c = rig.ids
        fleet_service = rig.engine.fleet
        await rig.upload_device_os(SYSTEM_5003)
        for version, image in ((2, V2), (3, V3)):
            await rig.upload(version, image)
        inflating = rig.fleet([(a, transport)], firmware=(SYSTEM_5003, V1))
        raw_only = rig.fleet([(b, transport)], firmware=(SYSTEM_5003, V1), compressed_ota=False)
        # Announces compressed OTA but affords only a 1 KiB zstd window: it takes the frame,
        # cannot inflate it, and refuses the file; the server then sends the raw image.
        small_window = rig.fleet(
            [(c, transport)], firmware=(SYSTEM_5003, V1), max_zstd_window_log=10
        )
        async with running(inflating), running(raw_only), running(small_window):
            for device_id in (a, b, c):
                await rig.wait_device(device_id, lambda d: d["online"] and bool(d["modules"]))

            await rig.release(2, product_default=True, intelligent=True)
            await inflating.wait_until(updated_to(a, 2), timeout=STEP)
            await raw_only.wait_until(updated_to(b, 2), timeout=STEP)
            await small_window.wait_until(updated_to(c, 2), timeout=STEP)
            await rig.events.wait_for(RELEASE_BYTES_EVENT, count=3)
            sent = transfers_of(rig.events, 2)
            assert {d: sent[d]["transfer"] for d in (a, b, c)} == {
                a: "zstd",
                b: "full",
                c: "full",
            }
            frame_size = sent[a]["bytes_sent"]
            assert frame_size * 2 < len(V2), (frame_size, len(V2))
            assert sent[b]["bytes_sent"] == sent[c]["bytes_sent"] == len(V2)
            # Every device runs exactly the released image (the emulator installs only an
            # image whose SHA-256 matches the signed manifest).
            for fleet, device_id in ((inflating, a), (raw_only, b), (small_window, c)):
                running_sha = {m.sha256 for m in fleet.device(device_id).device.describe().modules}
                assert hashlib.sha256(V2).digest() in running_sha
            assert rig.engine.compressed.computed == 1  # compressed once, for every session
            totals = await fleet_service.transfer_bytes(rig.product, 2)
            assert totals == {
                "bytes_sent": frame_size + 2 * len(V2),
                "bytes_full": 3 * len(V2),
                "delta_transfers": 0,
                "full_transfers": 2,
                "compressed_transfers": 1,
            }

            # An incompressible image goes out raw, even to a device that inflates frames.
            await rig.release(3, product_default=True, intelligent=True)
            await inflating.wait_until(updated_to(a, 3), timeout=STEP)
            await rig.events.wait_for(RELEASE_BYTES_EVENT, count=4)
            assert transfers_of(rig.events, 3)[a]["transfer"] == "full"


def _padded_app(version: int) -> bytes:
    """An application that is almost all zero padding: its zstd frame is a few dozen bytes,
    less than any patch's fixed header, while a patch from an unrelated base is still far
    smaller than the image (so both encodings are on offer)."""
    body = f"v{version} of a mostly empty application".encode() + bytes(60_000)
    return app_with_body(version, body)


#: A stored base (so a delta can be made) with nothing in common with _padded_app's body.
UNRELATED_BASE = app_with_body(1, hashlib.shake_256(b"unrelated base").digest(40_000))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_smaller_of_delta_and_zstd_frame_travels(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    # Issue 18: a patch is never sent when the compressed image is smaller. Both devices run
    # a stored base; the one that inflates frames gets the frame, the other the patch.
    target = _padded_app(2)
    async with ota_rig(nursery, tmp_path, count=2) as rig:
        a, b = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        for version, image in ((1, UNRELATED_BASE), (2, target)):
            await rig.upload(version, image)
        inflating = rig.fleet([(a, transport)], firmware=(SYSTEM_5003, UNRELATED_BASE))
        raw_only = rig.fleet([(b, transport)], firmware=(SYSTEM_5003, UNRELATED_BASE),
                             compressed_ota=False)
        async with running(inflating), running(raw_only):
            for device_id in (a, b):
                await rig.wait_device(device_id, lambda d: d["online"] and bool(d["modules"]))
            await rig.release(2, product_default=True, intelligent=True)
            await inflating.wait_until(updated_to(a, 2), timeout=STEP)
            await raw_only.wait_until(updated_to(b, 2), timeout=STEP)
            await rig.events.wait_for(RELEASE_BYTES_EVENT, count=2)
            sent = transfers_of(rig.events, 2)
            assert (sent[a]["transfer"], sent[b]["transfer"]) == ("zstd", "delta")
            assert sent[a]["bytes_sent"] == len(compress_image(target))
            assert sent[a]["bytes_sent"] < sent[b]["bytes_sent"] < len(target) // 10
            for fleet, device_id in ((inflating, a), (raw_only, b)):
                running_sha = {m.sha256 for m in fleet.device(device_id).device.describe().modules}
                assert hashlib.sha256(target).digest() in running_sha
