"""``ota bench fleet --nodes 2``: two ``ota server`` nodes on copies of one data directory and
one store (SQLite, or a throwaway PostgreSQL cluster with ``--db-url pg``), devices spread
over them by their first-choice endpoint; the result has the totals, the figures of each
node and the database's, and what the nodes and the cluster logged."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from server.bench.fleet import BenchError
from server.bench.fleet.logscan import error_count, mask, scan_postgres_log, scan_server_logs
from server.bench.fleet.nodes import check_db_url, throwaway_database
from server.bench.fleet.options import BenchOptions
from server.bench.fleet.procs import cluster_cpu_seconds, cpu_seconds
from server.bench.fleet.profile import WAITING, summarize
from server.bench.fleet.report import QuietReporter, results_table
from server.bench.fleet.runner import run_fleet_bench
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


def _round_failure(result: dict[str, Any], out: Path, kind: str, mode: str) -> str:
    """What a handshake round that lost connections says about them: its counts and the
    load generator's errors, what the nodes logged, and the load generator's log."""
    found = result["handshakes"][kind][mode]
    counts = {key: found[key] for key in ("ok", "failed", "reused", "errors")}
    logs = "\n".join(
        f"--- {log.name} (last lines)\n" + "\n".join(log.read_text().splitlines()[-15:])
        for log in sorted(out.glob("loadgen-*.log")))
    # The handshake servers' refusals and sessions that did not end by the device's close.
    ends = "\n".join(
        f"{log.name}: {line}" for log in sorted(out.glob("server-handshakes-*.log"))
        for line in log.read_text().splitlines()
        if "refused" in line or ("closed:" in line and "closed by device" not in line))
    return (f"{kind} {mode} round: {counts}; by node: {found['by_node']}; the nodes "
            f"logged: {result['log_problems']['servers']}\n{ends}\n{logs}")


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
        server_procs=1,  # a single-process node runs the store event relay too
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
    assert result["node_count"] == 2 and result["server_procs"] == 1
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
                    assert found["ok"] == at_handshakes[found["endpoint"]][kind], (
                        _round_failure(result, out, kind, mode))
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


async def test_two_nodes_on_a_throwaway_postgresql_cluster(tmp_path: Path) -> None:
    """``--db-url pg``: the run starts a PostgreSQL cluster, both nodes use it, every device
    updates, the cluster's CPU is measured, nothing logs an error, and the cluster is
    stopped and deleted at the end (its log kept in the output directory)."""
    out = tmp_path / "out"
    notes: list[str] = []

    class Notes(QuietReporter):
        def note(self, text: str) -> None:
            notes.append(text)

    options = BenchOptions(
        devices=DEVICES,
        transport="both",
        procs=1,
        server_procs=1,
        nodes=2,
        db_url="pg",
        out_dir=out,
        work_parent=tmp_path,
        online_timeout=60,
        release_timeout=60,
        handshakes=False,
        nginx=False,
    )
    result = await run_fleet_bench(options, Notes(), command="test")
    print("notes:", notes)
    assert _processes_mentioning(str(tmp_path)) == []
    assert json.loads((out / "result.json").read_text()) == result

    assert result["release_devices"] == result["release_updated"] == DEVICES
    assert result["release_end"] == "done" and result["release_outcomes"] == {}
    assert sum(node["release_updated"] for node in result["nodes"]) == DEVICES
    assert all(node["sessions_at_release"] > 0 for node in result["nodes"]), result["nodes"]

    db = result["db"]
    assert db["backend"] == "postgresql" and db["throwaway_cluster"] is True
    assert db["url"].startswith("postgresql+psycopg://") and db["url"].endswith("/ota")
    assert db["server_version"] and db["server_version"][0].isdigit()
    assert isinstance(db["postmaster_pid"], int)
    assert db["release_cpu_s"] > 0 and 0 < db["release_cpu_share"] < 1
    assert db["session_setup_cpu_s"] > 0
    assert "postmaster" in db["note"]

    # Nothing went wrong on either side (a deadlock or collided write would be counted).
    problems = result["log_problems"]
    assert error_count(problems["servers"]) == 0, problems["servers"]
    assert problems["database"] is not None
    assert error_count(problems["database"]) == 0, problems["database"]
    assert problems["database_log"] == str(out / "postgres.log")
    assert (out / "postgres.log").is_file()

    # The cluster is gone: its postmaster stopped, its directory deleted.
    (started,) = [n for n in notes if n.startswith("throwaway PostgreSQL cluster")]
    cluster_root = started.rsplit("(", 1)[1].rstrip(")")
    assert not Path(cluster_root).exists()
    assert _processes_mentioning(cluster_root) == []


async def test_throwaway_cluster_without_postgresql_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTA_PG_BINDIR", str(tmp_path))  # holds no initdb
    with pytest.raises(BenchError, match=r"--db-url pg: no throwaway cluster: .*no initdb"):
        async with throwaway_database(tmp_path, print):
            raise AssertionError("never reached")  # pragma: no cover
    await trio.lowlevel.checkpoint()


def test_log_scan_counts_server_and_postgres_problems(tmp_path: Path) -> None:
    """Lines in the formats server/logs.py and PostgreSQL's default log_line_prefix write,
    grouped with device ids and numbers masked."""
    device_a, device_b = "0123456789abcdef01234567", "fedcba9876543210fedcba98"
    node0, node1 = tmp_path / "node0.log", tmp_path / "node1.log"
    node0.write_text(
        "2026-12-07 06:51:19,602 INFO otacloud.devices: device endpoint listening\n"
        f"2026-12-07 06:52:01,100 WARNING ota.engine: update of {device_a} failed: the "
        "change collided with another one (a name or version is already taken); retry\n"
        "2026-12-07 06:52:02,100 worker 1 [28267] ERROR ota.sessions: session handler of "
        f"device {device_b} failed\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "psycopg.errors.DeadlockDetected: deadlock detected\n"
    )
    node1.write_text(
        f"2026-12-07 06:52:03,555 worker 2 [28300] WARNING ota.engine: update of {device_b} "
        "failed: the change collided with another one (a name or version is already "
        "taken); retry\n"
    )
    found = scan_server_logs([node0, node1, tmp_path / "missing.log"])
    assert found["by_level"] == {"error": 1, "warning": 2}
    assert found["tracebacks"] == 1
    assert error_count(found) == 2
    collided = (
        "WARNING ota.engine: update of <device> failed: the change collided with another "
        "one (a name or version is already taken); retry"
    )
    assert next(iter(found["messages"])) == collided
    assert found["messages"][collided] == 2 and found["distinct_messages"] == 2

    postgres = tmp_path / "postgres.log"
    postgres.write_text(
        "2026-12-07 06:52:01.012 UTC [31337] ERROR:  deadlock detected\n"
        "2026-12-07 06:52:01.012 UTC [31337] DETAIL:  Process 31337 waits for ShareLock on "
        "transaction 4242; blocked by process 31338.\n"
        "2026-12-07 06:52:04.500 UTC [31340] ERROR:  deadlock detected\n"
        "2026-12-07 06:52:05.000 UTC [31341] LOG:  checkpoint starting: time\n"
        "2026-12-07 06:52:06.000 UTC [31342] FATAL:  terminating connection due to "
        "administrator command\n"
    )
    db = scan_postgres_log(postgres)
    assert db is not None
    assert db["by_level"] == {"error": 2, "fatal": 1}
    assert db["messages"]["ERROR deadlock detected"] == 2
    assert error_count(db) == 3
    assert scan_postgres_log(tmp_path / "none.log") is None
    assert mask(f"device {device_a} sent 4096 of 131072 bytes (sha 0a1b2c3d4e5f6a7b)") == (
        "device <device> sent N of N bytes (sha <hex>)"
    )


def test_node_and_db_url_option_checks() -> None:
    assert check_db_url("pg") == "postgresql"
    BenchOptions(devices=2, procs=1, db_url="pg")
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
    # Single-process nodes relay too (every node runs the store event relay).
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


def test_profile_summary_keeps_waits_apart(tmp_path: Path) -> None:
    """py-spy's samples of threads blocked in the event loop's epoll or in psycopg's wait
    for PostgreSQL are waiting, not work: an area of their own, left out of busy_samples."""
    collapsed = tmp_path / "profile.txt"
    loop = "run (trio/_core/_run.py:2300);EpollIOManager.get_events (trio/_core/_io_epoll.py:243)"
    query = (
        "SessionUpdater.run (server/devices/updater.py:290);Store.write_batch "
        "(server/store/store.py:300);execute (sqlalchemy/engine/base.py:1400)"
    )
    collapsed.write_text(
        f"{loop} 50\n"
        f"{query};Connection.wait (psycopg/connection.py:495) 30\n"
        f"{query};BaseCursor._send_query_prepared (psycopg/_cursor_base.py:602) 15\n"
        "EventRelay._read (server/relay.py:80);read_events_after "
        "(server/store/tx_events.py:40) 5\n"
    )
    summary = summarize(collapsed)
    assert summary["samples"] == 100 and summary["busy_samples"] == 20
    areas = {area["area"]: area["share"] for area in summary["areas"]}
    assert areas[WAITING] == 0.8
    assert areas["store: SQLAlchemy + driver (SQLite, psycopg)"] == 0.15
    assert areas["store layer (server/store)"] == 0.05
    inclusive = {f["function"]: f["share"] for f in summary["project_inclusive"]}
    assert inclusive["Store.write_batch (store.py)"] == 0.45
