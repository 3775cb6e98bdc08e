"""``ota bench fleet --nodes 2``: two ``ota server`` nodes on copies of one data directory and
one SQLite store, devices spread over them by their first-choice endpoint; the result has the
totals, the figures of each node and the database's."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from server.bench.fleet import BenchError
from server.bench.fleet.procs import cluster_cpu_seconds, cpu_seconds
from server.bench.fleet.report import QuietReporter, results_table
from server.bench.fleet.runner import BenchOptions, run_fleet_bench
from server.emulator.endpoints import Endpoint, endpoint_order
from tests.test_bench_fleet_smoke import _processes_mentioning

DEVICES = 8


def _expected_spread(work: Path, names: list[str]) -> dict[str, Counter[str]]:
    """Node endpoint name -> devices (by transport) whose first choice it is."""
    spec = json.loads((work / "loadgen-0.json").read_text())
    addresses = (name.rpartition(":") for name in names)
    endpoints = [Endpoint((host, int(port))) for host, _, port in addresses]
    spread: dict[str, Counter[str]] = {name: Counter() for name in names}
    for device_id, kind in spec["devices"]:
        spread[endpoints[endpoint_order(device_id, endpoints)[0]].name][kind] += 1
    return spread


@pytest.mark.parametrize("explicit_url", [False, True])
async def test_two_nodes_share_one_store_and_report_per_node(
    tmp_path: Path, explicit_url: bool
) -> None:
    out = tmp_path / "out"
    db_url = f"sqlite:///{tmp_path / 'shared.db'}" if explicit_url else None
    options = BenchOptions(
        devices=DEVICES,
        transport="both",
        procs=1,
        server_procs=2,  # each node relays events through the store (see BenchOptions)
        nodes=2,
        db_url=db_url,
        out_dir=out,
        work_parent=tmp_path,
        online_timeout=60,
        release_timeout=60,
        handshakes=not explicit_url,  # once is enough
        nginx=False,
        keep_work=True,
    )
    result = await run_fleet_bench(options, QuietReporter(), command="test")
    assert _processes_mentioning(str(tmp_path)) == []
    assert json.loads((out / "result.json").read_text()) == result
    (work,) = [p for p in tmp_path.iterdir() if p.name.startswith("ota-bench-fleet-")]

    # The nodes' data directories: copies without the store, blobs shared.
    for index in range(2):
        node_dir = work / f"node-{index}"
        assert (node_dir / "blobs").resolve() == (work / "data" / "blobs").resolve()
        assert not any(p.name.startswith("ota.db") for p in node_dir.iterdir())
        assert {p.name for p in (work / "data").iterdir()} - {"ota.db", "ota.db-wal",
                "ota.db-shm"} <= {p.name for p in node_dir.iterdir()}  # fmt: skip
    if explicit_url:
        assert (tmp_path / "shared.db").is_file()
        assert not (work / "data" / "ota.db").exists()

    # Totals as for one server.
    assert result["node_count"] == 2 and result["server_procs"] == 2
    assert result["sessions_peak"] == result["sessions_online"] == DEVICES
    assert result["release_devices"] == result["release_updated"] == DEVICES
    assert result["release_end"] == "done" and result["release_outcomes"] == {}
    assert result["bytes_delivered"] == result["bytes_full_images"]

    # Per node: each device at its first choice, sessions and updates counted there.
    nodes = result["nodes"]
    names = [node["endpoint"] for node in nodes]
    spread = _expected_spread(work, names)
    print("devices per node:", {name: dict(kinds) for name, kinds in spread.items()})
    for node in nodes:
        expected = spread[node["endpoint"]]
        assert node["sessions_at_release"] == sum(expected.values())
        assert node["release_updated"] == sum(expected.values())
        assert node["server_rss_peak_kib"] > 0
        assert node["release_server_cpu_s"] >= 0 and node["session_setup_server_cpu_s"] >= 0
        if not explicit_url:  # (the handshake rounds ran on other server processes)
            handshake_names = [n["handshakes"]["tcp"]["full"]["endpoint"] for n in nodes]
            at_handshakes = _expected_spread(work, handshake_names)
            for kind in ("tcp", "udp"):
                for mode in ("full", "resumed"):
                    found = node["handshakes"][kind][mode]
                    assert found["ok"] == at_handshakes[found["endpoint"]][kind], (kind, mode)
    assert sum(n["sessions_at_release"] for n in nodes) == DEVICES
    assert result["server_rss_peak_kib"] == sum(n["server_rss_peak_kib"] for n in nodes)
    assert result["release_server_cpu_s"] == pytest.approx(
        sum(n["release_server_cpu_s"] for n in nodes), abs=0.01
    )
    assert result["failovers"] == 0  # both nodes stayed up

    # The database: SQLite, embedded in the nodes (no CPU of its own to report).
    db = result["db"]
    assert db["backend"] == "sqlite" and db["shared_by_nodes"] == 2
    expected_url = db_url or f"sqlite:///{(work / 'data' / 'ota.db').resolve()}"
    assert db["url"] == expected_url
    assert db["release_cpu_s"] is None and db["release_cpu_share"] is None
    assert "embedded SQLite" in db["note"]
    assert "nodes" in [str(cell) for cell in results_table(result).columns[0].cells]


def test_node_and_db_url_option_checks() -> None:
    with pytest.raises(BenchError, match="--nodes"):
        BenchOptions(devices=2, procs=1, nodes=0)
    with pytest.raises(BenchError, match="not 'mysql'"):
        BenchOptions(devices=2, procs=1, db_url="mysql://u@h/ota")
    with pytest.raises(BenchError, match="not a database URL"):
        BenchOptions(devices=2, procs=1, db_url="no url")
    # 50,000 TCP sessions are too many for two server processes, not for two nodes' four.
    BenchOptions(devices=50_000, procs=3, server_procs=2, nodes=2, transport="tcp")
    with pytest.raises(BenchError, match="--nodes"):
        BenchOptions(devices=50_000, procs=3, server_procs=2, nodes=1, transport="tcp")
    with pytest.raises(BenchError, match="--server-procs 2 or more"):
        BenchOptions(devices=2, procs=1, server_procs=1, nodes=2)


_BUSY = "import time\\nend = time.process_time() + 0.3\\nwhile time.process_time() < end: pass"
_PARENT = f"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "{_BUSY}"])
child.wait()  # reaped: its CPU time moves to this process's cutime/cstime
print("reaped", flush=True)
sys.stdin.read()
"""


def test_cluster_cpu_counts_children_that_exited() -> None:
    """A postmaster's exited backends count (their time is in its cutime once reaped)."""
    with subprocess.Popen(
        [sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as parent:
        assert parent.stdout is not None and parent.stdin is not None
        assert parent.stdout.readline() == b"reaped\n"
        own = cpu_seconds(parent.pid)
        assert cluster_cpu_seconds(parent.pid) >= own + 0.25  # the child's 0.3 s, in ticks
        parent.stdin.close()
