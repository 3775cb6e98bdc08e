"""``/metrics`` over a scripted release to real devices (TLS 1.3 and DTLS 1.2 emulated
devices on real sockets, in-process server): sessions and handshakes move as the devices
connect, ``ota_bytes_sent_total`` moves by exactly the bytes of the files the devices
received, by kind (delta patch, zstd frame, full image), and ``ota_updates_total`` by the
devices updated; a failed handshake is counted as failed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import trio

from otacore.module import ModuleDependency, build_module
from otacore.platforms import ModuleFunction
from server.fleet.deltas import RELEASE_BYTES_EVENT
from tests.test_metrics_access import samples
from tests.test_ota_e2e_kit import (
    BORON,
    STEP,
    SYSTEM_5003,
    ota_rig,
    running,
    transfers_of,
    updated_to,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _body(seed: str, size: int = 60_000) -> bytes:
    """Compressible like firmware: repeated patterns and strings, zero padding."""
    out = bytearray()
    digest = hashlib.sha256(seed.encode()).digest()
    n = 0
    while len(out) < size:
        n += 1
        out += digest[n % 32 : n % 32 + 4] * 3
        out += f"log: sensor {n % 97} reading out of range ({seed})\0".encode()
        if n % 50 == 0:
            out += bytes(256)
    return bytes(out[:size])


def _app(version: int, body: bytes) -> bytes:
    return build_module(body, platform_id=BORON, function=ModuleFunction.USER_PART, index=1,
                        version=6, product_id=BORON, product_version=version,
                        dependencies=[ModuleDependency(ModuleFunction.SYSTEM_PART, 1, 5003)])


BODY = _body("metrics v1")
V1 = _app(1, BODY)  # stored: a device running it gets v2 as a delta patch
V2 = _app(2, BODY[:30_000] + b"release two" + BODY[30_011:])
V1_UNKNOWN = _app(1, _body("another build"))  # not stored: a full image or a zstd frame


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def scrape(api: httpx.AsyncClient) -> Samples:
    response = await api.get("/metrics")
    assert response.status_code == 200, response.text
    return samples(response.text)


async def scrape_until(api: httpx.AsyncClient, before: Samples,
                       expected: dict[tuple[str, tuple[tuple[str, str], ...]], float],
                       timeout: float = STEP) -> Samples:
    """Scrape until every ``expected`` (sample key -> how much it moved since ``before``)
    holds; TooSlowError (with what moved) otherwise."""
    after = before
    try:
        with trio.fail_after(timeout):
            while True:
                after = await scrape(api)
                if all(after.get(key, 0.0) - before.get(key, 0.0) == amount
                       for key, amount in expected.items()):
                    return after
                await trio.sleep(0.05)
    except trio.TooSlowError:
        now = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in expected}
        raise AssertionError(f"metrics moved by {now}, expected {expected}") from None


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


async def test_a_release_moves_the_counters_by_what_the_devices_received(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    async with ota_rig(nursery, tmp_path, count=4) as rig:
        a, b, c, d = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(1, V1)
        await rig.upload(2, V2)
        on_v1 = rig.fleet([(a, "tcp"), (b, "udp")], firmware=(SYSTEM_5003, V1))
        zstd = rig.fleet([(c, "tcp")], firmware=(SYSTEM_5003, V1_UNKNOWN))
        raw = rig.fleet([(d, "udp")], firmware=(SYSTEM_5003, V1_UNKNOWN), compressed_ota=False)
        before = await scrape(rig.api)
        async with running(on_v1), running(zstd), running(raw):
            for device_id in rig.ids:
                await rig.wait_device(device_id, lambda body: body["online"]
                                      and bool(body["modules"]))
            # Four fresh devices: one full handshake each, two sessions per transport.
            connected = await scrape_until(rig.api, before, {
                key("ota_sessions", transport="tcp"): 2,
                key("ota_sessions", transport="udp"): 2,
                key("ota_handshakes_total", transport="tcp", kind="full", result="ok"): 2,
                key("ota_handshakes_total", transport="udp", kind="full", result="ok"): 2,
            })
            for transport in ("tcp", "udp"):
                assert moved(before, connected, "ota_handshakes_total", transport=transport,
                             kind="unknown", result="failed") == 0

            await rig.release(2, product_default=True, intelligent=True)
            await on_v1.wait_until(lambda f: all(updated_to(x, 2)(f) for x in (a, b)),
                                   timeout=STEP)
            await zstd.wait_until(updated_to(c, 2), timeout=STEP)
            await raw.wait_until(updated_to(d, 2), timeout=STEP)
            await rig.events.wait_for(RELEASE_BYTES_EVENT, count=4)
            sent = transfers_of(rig.events, 2)
            assert {x: sent[x]["transfer"] for x in rig.ids} == {
                a: "delta", b: "delta", c: "zstd", d: "full"}
            # What each device received: the patch, the frame, the image (the full image's
            # size is known here; the others as the server recorded them, checked small).
            patch, frame = sent[a]["bytes_sent"], sent[c]["bytes_sent"]
            assert sent[b]["bytes_sent"] == patch and patch * 10 < len(V2)
            assert frame * 2 < len(V2) and sent[d]["bytes_sent"] == len(V2)
            after = await scrape_until(rig.api, before, {
                key("ota_bytes_sent_total", kind="delta"): 2 * patch,
                key("ota_bytes_sent_total", kind="compressed"): frame,
                key("ota_bytes_sent_total", kind="full"): len(V2),
                key("ota_updates_total", result="succeeded"): 4,
                key("ota_updates_total", result="download_failed"): 0,
                key("ota_updates_total", result="image_refused"): 0,
                key("ota_updates_total", result="rolled_back"): 0,
                key("ota_transfers_active"): 0,
                # Rebooted into v2 and connected again: still two sessions each.
                key("ota_sessions", transport="tcp"): 2,
                key("ota_sessions", transport="udp"): 2,
            })
            # Each device handshook again after its reboot (a full or a resumed one).
            for transport in ("tcp", "udp"):
                again = sum(moved(connected, after, "ota_handshakes_total", transport=transport,
                                  kind=kind, result="ok") for kind in ("full", "resumed"))
                assert again >= 2, (transport, again)
            # The store's writes were timed (every transfer's completion is one at least).
            assert moved(before, after, "ota_store_commit_seconds_count") >= 4
            # Retransmitted bytes are counted apart: what was sent twice is never in the sum.
            resent = sum(moved(before, after, "ota_bytes_retransmitted_total", kind=kind)
                         for kind in ("full", "delta", "compressed"))
            chunks = sum(moved(before, after, "ota_retransmits_total", transport=transport)
                         for transport in ("tcp", "udp"))
            assert (resent == 0) == (chunks == 0)
            print(f"retransmitted: {chunks:g} chunks, {resent:g} bytes")
        # The devices are gone (power cut): the TLS sessions leave the gauge at once (the
        # emulator closes a cut device's sockets then, as a kernel does a killed process's:
        # tests/test_emulator_power_cut.py); DTLS sessions stay until their idle timeout
        # (no datagram says a device is gone).
        await scrape_until(rig.api, before, {key("ota_sessions", transport="tcp"): 0,
                                             key("ota_sessions", transport="udp"): 2})


async def test_a_failed_handshake_is_counted(nursery: trio.Nursery, tmp_path: Path) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        before = await scrape(rig.api)
        host, port = rig.kit.tcp
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            # Not a TLS ClientHello: the server's handshake fails on it.
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
            await scrape_until(rig.api, before, {
                key("ota_handshakes_total", transport="tcp", kind="unknown", result="failed"): 1,
                key("ota_device_refusals_total", transport="tcp", reason="handshake_failed"): 1,
            })
