"""End to end: a stock CoAP client (libcoap's coap-client) downloads firmware from the real
server with Block2 (RFC 7959), over DTLS and over TLS (RFC 8323), byte for byte."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

from tests.test_ota_e2e_kit import SYSTEM_5004, app, ota_rig, sha

COAP_CLIENT = shutil.which("coap-client-openssl")


def _client_or_skip() -> str:
    """The coap-client binary; a missing one skips locally but fails under CI."""
    if COAP_CLIENT is None:
        if os.environ.get("CI"):
            pytest.fail("coap-client-openssl (libcoap) is required under CI but missing")
        pytest.skip("coap-client-openssl (libcoap) is not installed")
    return COAP_CLIENT


@pytest.mark.parametrize("scheme", ["coaps", "coaps+tcp"])
async def test_coap_client_downloads_the_exact_firmware(
    nursery: trio.Nursery, tmp_path: Path, scheme: str
) -> None:
    client = _client_or_skip()
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        firmware = app(2, size=40_000, seed="coap-client")
        await rig.upload(2, firmware)
        await rig.upload_device_os(SYSTEM_5004)
        device_dir = rig.kit.creds_dir / device_id
        port = (rig.kit.udp if scheme == "coaps" else rig.kit.tcp)[1]
        for image in (firmware, SYSTEM_5004):
            out = tmp_path / f"{sha(image)}.bin"
            command = [
                client,
                "-m",
                "get",
                "-B",
                "30",
                "-c",
                str(device_dir / "cert.pem"),
                "-j",
                str(device_dir / "key.pem"),
                "-R",
                str(rig.kit.creds_dir / "ca.pem"),
                "-o",
                str(out),
                f"{scheme}://127.0.0.1:{port}/fw/{sha(image)}",
            ]
            with trio.fail_after(30):
                result = await trio.run_process(
                    command, capture_stdout=True, capture_stderr=True, check=False
                )
            assert result.returncode == 0, result.stderr.decode(errors="replace")
            assert out.read_bytes() == image  # every Block2 block, in order, nothing more
        # Firmware of no product of this device's is not served.
        command[-1] = f"{scheme}://127.0.0.1:{port}/fw/{sha(b'not stored')}"
        with trio.fail_after(30):
            result = await trio.run_process(
                command, capture_stdout=True, capture_stderr=True, check=False
            )
        assert b"4.04" in result.stdout + result.stderr


def _bytes_read_by_this_process() -> int:
    """``rchar`` of /proc/self/io: every byte this process (all its threads) passed to
    read()/pread() (Linux, proc(5)); socket receives are not counted."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no rchar line")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("scheme", ["coaps", "coaps+tcp"])
async def test_a_block_costs_a_block_not_the_whole_image(
    nursery: trio.Nursery, tmp_path: Path, scheme: str
) -> None:
    """Issue 13, finding 5: each Block2 block re-read (and re-hashed) the whole file, so a
    download of N blocks read N times the image. Over a real download by a stock client,
    the server process now reads the image about once (measured by the kernel's count of
    bytes this process read, not by timing)."""
    client = _client_or_skip()
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        firmware = app(3, size=200_000, seed="block cost")  # ~196 blocks of 1 KiB
        await rig.upload(3, firmware)
        device_dir = rig.kit.creds_dir / device_id
        port = (rig.kit.udp if scheme == "coaps" else rig.kit.tcp)[1]
        out = tmp_path / "download.bin"
        command = [
            client, "-m", "get", "-B", "60",
            "-c", str(device_dir / "cert.pem"), "-j", str(device_dir / "key.pem"),
            "-R", str(rig.kit.creds_dir / "ca.pem"), "-o", str(out),
            f"{scheme}://127.0.0.1:{port}/fw/{sha(firmware)}",
        ]
        before = _bytes_read_by_this_process()
        with trio.fail_after(60):
            result = await trio.run_process(
                command, capture_stdout=True, capture_stderr=True, check=False
            )
        read = _bytes_read_by_this_process() - before
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert out.read_bytes() == firmware
        blocks = -(-len(firmware) // 1024)
        # The session's own store reads (presence, the one authorisation) are a few pages;
        # re-reading the image per block would be ~blocks x 200 KB = ~39 MB.
        assert read < 2 * len(firmware) + 1024 * 1024, (
            f"the server read {read} bytes to send {blocks} blocks of a "
            f"{len(firmware)}-byte image"
        )
