"""The ``ota`` command line: info, module inspect and module create, run as real processes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from otacore._select import load_native
from tests.particle_layout import particle_layout_module


def ota(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli.main", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )


@pytest.mark.skipif(load_native("integrity") is None, reason="native kernels not built")
def test_info_reports_native_kernels() -> None:
    out = ota("info", env={"OTA_PURE_PYTHON": "0"})
    assert out.returncode == 0, out.stderr
    assert "kernel integrity: native" in out.stdout


def test_info_reports_forced_pure_python() -> None:
    out = ota("info", env={"OTA_PURE_PYTHON": "1"})
    assert out.returncode == 0, out.stderr
    assert "native: no" in out.stdout
    assert "python: CPython 3." in out.stdout


def test_inspect_json_of_an_independent_image(tmp_path: Path) -> None:
    image = particle_layout_module(
        b"\x5a" * 3000, start=0x30000, platform=26, function=4, index=1, version=5003,
        deps=((2, 0, 2001), (8, 0, 7)), product=(26, 9),
    )
    path = tmp_path / "system-part1.bin"
    path.write_bytes(image)
    out = ota("module", "inspect", str(path), "--json")
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout)
    assert {k: obj[k] for k in (
        "platform_id", "module_function", "module_index", "module_version", "product_id",
        "product_version", "flags", "size", "crc_ok", "sha256_ok", "valid")} == {
        "platform_id": 26, "module_function": 4, "module_index": 1, "module_version": 5003,
        "product_id": 26, "product_version": 9, "flags": 0, "size": len(image),
        "crc_ok": True, "sha256_ok": True, "valid": True}
    assert obj["dependencies"] == [
        {"function": 2, "index": 0, "version": 2001}, {"function": 8, "index": 0, "version": 7}]
    assert obj["sha256"] == image[-38:-6].hex()


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (lambda im: im[:-3], "error: "),
        (lambda im: im[:500] + b"\xff" + im[501:], "error: CRC-32 mismatch: stored 0x"),
        (lambda im: im[:40], "error: truncated module: 40 bytes"),
    ],
    ids=["cut", "flipped", "truncated"],
)
def test_inspect_rejects_bad_images_with_one_line(tmp_path: Path, corrupt, expected) -> None:  # type: ignore[no-untyped-def]
    image = particle_layout_module(b"\x00" * 2000, start=0xB4000, platform=13, function=5,
                                   index=1, version=3, product=(13, 3))
    path = tmp_path / "bad.bin"
    path.write_bytes(corrupt(image))
    for extra in ([], ["--json"]):
        out = ota("module", "inspect", str(path), *extra)
        assert out.returncode != 0
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), out.stderr
        assert "Traceback" not in out.stderr + out.stdout


def test_inspect_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    out = ota("module", "inspect", str(tmp_path / "nope.bin"))
    assert out.returncode == 2
    assert "cannot read" in out.stderr and "Traceback" not in out.stderr


def test_create_then_inspect(tmp_path: Path) -> None:
    raw = tmp_path / "app.raw"
    raw.write_bytes(random.Random(20).randbytes(5000))
    module = tmp_path / "app.bin"
    out = ota("module", "create", str(raw), str(module), "--platform-id", "13",
              "--version", "7", "--product-id", "4242", "--product-version", "7",
              "--dependency", "system_part:1:5003")
    assert out.returncode == 0, out.stderr
    obj = json.loads(ota("module", "inspect", str(module), "--json").stdout)
    assert obj["valid"] and obj["product_id"] == 4242 and obj["product_version"] == 7
    assert obj["module_function"] == 5 and obj["dependencies"][0]["version"] == 5003
    assert module.read_bytes()[:0] == b"" and obj["size"] == 5000 + 24 + 40 + 4


def test_create_refuses_an_oversized_user_part(tmp_path: Path) -> None:
    raw = tmp_path / "huge.raw"
    raw.write_bytes(bytes(300 * 1024))
    out = ota("module", "create", str(raw), str(tmp_path / "x.bin"), "--platform-id", "13",
              "--version", "1")
    assert out.returncode == 1
    assert "exceeds the 262144-byte limit" in out.stderr
    assert not (tmp_path / "x.bin").exists()
