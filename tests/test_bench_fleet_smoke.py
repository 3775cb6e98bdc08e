"""A tiny end-to-end run of ``ota bench fleet``: a real server subprocess, one load
generator with six emulated devices on both transports, an immediate release (full images
from one server process, a patch release sent as deltas from two) and the nginx baseline;
checks that the result is complete and sane and that no child process outlives the run."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from server.bench.fleet import BenchError
from server.bench.fleet.nginx_baseline import find_nginx
from server.bench.fleet.options import BenchOptions
from server.bench.fleet.record_devices import DeviceStack
from server.bench.fleet.report import QuietReporter, percentiles, results_table
from server.bench.fleet.runner import run_fleet_bench

DEVICES = 6
REQUIRED = (
    "devices",
    "sessions_peak",
    "server_rss_per_session_kib",
    "handshakes_per_s_full",
    "handshakes_per_s_resumed",
    "release_all_updated_s",
    "update_latency_s",
    "goodput_mb_s",
    "server_cpu_s_per_mb",
    "bytes_on_wire",
    "bytes_full_images",
    "nginx_goodput_mb_s",
)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.parametrize(
    ("server_procs", "release", "device_stack"),
    [(1, "full", "records"), (2, "delta", "records"), (1, "full", "openssl")],
)
async def test_small_fleet_run_reports_every_field(
    tmp_path: Path, server_procs: int, release: str, device_stack: DeviceStack
) -> None:
    out = tmp_path / "out"
    options = BenchOptions(
        devices=DEVICES,
        transport="both",
        release=release,
        procs=1,
        server_procs=server_procs,
        out_dir=out,
        work_parent=tmp_path,
        online_timeout=30,
        release_timeout=30,
        device_stack=device_stack,
    )
    reporter = QuietReporter()
    result = await run_fleet_bench(options, reporter, command="test")

    assert _processes_mentioning(str(tmp_path)) == []  # server, nginx, load generators
    assert [p for p in tmp_path.iterdir() if p.name.startswith("ota-bench-fleet-")] == []
    assert json.loads((out / "result.json").read_text()) == result
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "result.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert any("matplotlib" in note for note in result["notes"])
    for name in REQUIRED:
        assert name in result, name

    image = 128 * 1024
    assert result["devices"] == DEVICES and result["image_size"] == image
    assert result["server_procs"] == server_procs
    assert result["sessions_peak"] == result["sessions_online"] == DEVICES
    assert result["online_end"] == "done" and result["sessions_online_s"] > 0
    assert result["release_devices"] == result["release_updated"] == DEVICES
    assert result["release_outcomes"] == {}
    assert result["release_end"] == "done" and result["release_not_updated"]["phases"] == {}
    # Why sessions ended in the release, by "transport: reason" (a reboot is not counted).
    errors = result["release_device_errors"]
    assert all(k.split(":")[0] in ("tcp", "udp") and v > 0 for k, v in errors.items())
    latency = result["update_latency_s"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert latency["max"] == pytest.approx(result["release_all_updated_s"], abs=1e-3)
    for transport, stages in result["update_stages_s"].items():
        assert stages["devices"] == DEVICES // 2, transport
        assert all(stages[stage]["min"] >= 0 for stage in ("queued", "download"))
        # The image is written, the device reboots and reconnects before it counts.
        assert stages["apply_reboot_verify"]["min"] > 0
    assert result["bytes_delivered"] == result["bytes_full_images"] == DEVICES * image
    stats = result["release_stats"]
    assert stats["bytes_full_images"] == DEVICES * image
    if release == "full":
        # Every image crossed the link once, plus CoAP/transfer framing and session chatter.
        assert DEVICES * image <= result["bytes_on_wire"] < 1.2 * DEVICES * image
        assert (stats["full_transfers"], stats["bytes_sent"]) == (DEVICES, DEVICES * image)
    else:
        # A patch release: each device got the shared v1 -> v2 delta, a tiny fraction.
        assert stats["delta_transfers"] == DEVICES and stats["full_transfers"] == 0
        assert stats["bytes_sent"] * 50 < DEVICES * image
        assert result["bytes_on_wire"] < DEVICES * image / 10
    assert result["goodput_mb_s"] > 0 and result["server_cpu_s_per_mb"] > 0
    assert result["server_rss_peak_kib"] > 0 and result["server_rss_per_session_kib"] is not None
    assert result["handshakes_per_s_full"] > 0 and result["handshakes_per_s_resumed"] > 0
    for transport in ("tcp", "udp"):
        full, resumed = (result["handshakes"][transport][m] for m in ("full", "resumed"))
        assert (full["ok"], full["reused"], full["failed"]) == (DEVICES // 2, 0, 0)
        assert (resumed["ok"], resumed["failed"]) == (DEVICES // 2, 0)
        if server_procs == 1:
            assert resumed["reused"] == DEVICES // 2
        else:  # each process has its own ticket keys: a ticket resumes only where issued
            assert 0 <= resumed["reused"] <= DEVICES // 2
    assert result["release"] == result["release_run"] == release
    if find_nginx() is None:
        assert result["nginx_goodput_mb_s"] is None and "nginx" in result["nginx"]["note"]
    else:
        assert result["nginx_goodput_mb_s"] > 0
        assert result["nginx"]["ok"] == DEVICES and result["nginx"]["failed"] == 0
        assert full["device_stack"] == device_stack
        assert full["loadgen_rss_per_connection_kib"] is not None
    assert result["device_stack"] == device_stack
    assert results_table(result).row_count >= 10
    assert "devices updated" in reporter.phases


def test_percentiles_and_option_checks() -> None:
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None, "min": None, "max": None}
    values = percentiles([float(v) for v in range(1, 101)])
    assert values["p50"] == pytest.approx(50.5) and values["p99"] == pytest.approx(99.01)
    with pytest.raises(BenchError, match="procs"):
        BenchOptions(devices=2, procs=3)
    with pytest.raises(BenchError, match="device-stack"):
        BenchOptions(devices=2, procs=1, device_stack="boringssl")  # type: ignore[arg-type]
    with pytest.raises(BenchError, match="server-procs"):
        BenchOptions(devices=2, procs=1, server_procs=0)
    with pytest.raises(BenchError, match="20,000"):
        BenchOptions(devices=40_000, procs=1)
    with pytest.raises(BenchError, match="full or delta"):
        BenchOptions(devices=2, release="patch")  # type: ignore[arg-type]
