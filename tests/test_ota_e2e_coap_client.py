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
