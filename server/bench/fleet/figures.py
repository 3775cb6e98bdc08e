"""The figures of ``ota bench fleet``: the load generators' replies and the phases'
CPU readings summed up as the result reports them.

Separate from the phases (:mod:`server.bench.fleet.phases`), which measure, and from the
runner, which assembles the result: these are pure functions of what was measured (counts
merged over the load generators, rates, percentiles, per-node and database shares).
"""

from __future__ import annotations

from typing import Any

from server.bench.fleet.control import ServerProcess
from server.bench.fleet.nodes import Database
from server.bench.fleet.report import percentiles
from server.emulator.endpoints import format_address

MB = 1_000_000  # goodput and CPU per MB use decimal megabytes


def name(server: ServerProcess) -> str:
    """A node as the result names it: its TCP address."""
    return format_address(server.tcp)


def merge(counts: list[dict[str, int]]) -> dict[str, int]:
    """The counts of every reply added up, key by key."""
    merged: dict[str, int] = {}
    for one in counts:
        for key, value in one.items():
            merged[key] = merged.get(key, 0) + value
    return merged


def round_summary(
    replies: list[dict[str, Any]], cpu: dict[str, Any], servers: list[ServerProcess]
) -> dict[str, Any]:
    ok = sum(r["ok"] for r in replies)
    ok_by_endpoint = merge([r["ok_by_endpoint"] for r in replies])
    server_cpu = cpu["process_cpu_s"]
    firsts = [r["t_first"] for r in replies if r["t_first"] is not None]
    lasts = [r["t_last"] for r in replies if r["t_last"] is not None]
    seconds = max(lasts) - min(firsts) if firsts and lasts else None
    errors: dict[str, int] = {}
    for reply in replies:
        for text, count in reply["errors"].items():
            errors[text] = errors.get(text, 0) + count
    return {
        "ok": ok,
        "failed": sum(r["failed"] for r in replies),
        "reused": sum(r["reused"] for r in replies),
        "seconds": round(seconds, 3) if seconds else None,
        "per_s": round(ok / seconds, 1) if seconds else None,
        "server_cpu_s": round(server_cpu, 3),
        "per_server_cpu_s": round(ok / server_cpu, 1) if server_cpu > 0 else None,
        "loadgen_cpu_s": cpu["others_cpu_s"],
        "machine_busy": cpu["machine_busy"],
        "udp_rcvbuf_drops": cpu["udp_rcvbuf_drops"],
        "server_udp_socket_drops": cpu["udp_port_drops"],
        "latency_s": percentiles([t for r in replies for t in r["latencies"]]),
        "db_cpu_s": cpu["db_cpu_s"],
        "by_node": [
            {
                "endpoint": name(server),
                "ok": ok_by_endpoint.get(name(server), 0),
                "server_cpu_s": round(node_cpu, 3),
            }
            for server, node_cpu in zip(servers, cpu["process_cpu_s_each"], strict=True)
        ],
        "device_stack": replies[0].get("device_stack") if replies else None,
        # What holding the connections cost the load generators (RSS while all were up).
        "loadgen_rss_per_connection_kib": (
            round(
                sum(r["loadgen_rss_held_kib"] - r["loadgen_rss_before_kib"] for r in replies)
                / ok, 2,
            )
            if ok and all("loadgen_rss_held_kib" in r for r in replies) else None
        ),
        "errors": errors,
    }


#: The update stages between the times a device records (after the release request).
STAGES = ("queued", "download", "apply_reboot_verify")


def stage_summary(timelines: list[list[float]]) -> dict[str, Any]:
    """Percentiles of the time each device spent in each stage of its update: waiting for
    the server to start its download, downloading, then applying, rebooting and
    reconnecting until its Hello is answered (which commits the new image)."""
    return {
        stage: percentiles([times[i + 1] - times[i] for times in timelines])
        for i, stage in enumerate(STAGES)
    } | {"devices": len(timelines)}


def per_node(nodes: list[dict[str, Any]], handshakes: dict[str, Any]) -> list[dict[str, Any]]:
    """Each node's figures: the fleet phase's, with its share of every handshake round."""
    return [
        node
        | {
            "handshakes": {
                kind: {mode: found["by_node"][index] for mode, found in rounds.items()}
                for kind, rounds in handshakes.items()
            }
        }
        for index, node in enumerate(nodes)
    ]


def db_figures(database: Database, fleet: dict[str, Any], nodes: int) -> dict[str, Any]:
    """The database the nodes shared and its CPU over the session setup and the release,
    with its share of the CPU of database and nodes together."""
    figures = database.describe() | {"shared_by_nodes": nodes}
    for phase, cpu in (("session_setup", fleet["session_setup_cpu"]),
                       ("release", fleet["release_cpu"])):  # fmt: skip
        db_cpu = cpu["db_cpu_s"]
        together = (db_cpu or 0.0) + cpu["process_cpu_s"]
        figures[f"{phase}_cpu_s"] = db_cpu
        figures[f"{phase}_cpu_share"] = (
            round(db_cpu / together, 3) if db_cpu is not None and together > 0 else None
        )
    if database.postmaster_pid is None:
        figures["note"] = (
            "embedded SQLite: the database's work runs inside the nodes' processes and is "
            "part of their CPU"
            if database.backend == "sqlite"
            else "the PostgreSQL cluster is not on this machine: its CPU is not measured"
        )
    else:
        figures["note"] = (
            "CPU of the cluster's postmaster and all its children (backends, WAL writer, "
            "checkpointer, ...), exited ones included"
        )
    return figures


def combined_rate(rounds: list[dict[str, Any]]) -> float | None:
    """Handshakes per second over the rounds of every transport together."""
    seconds = sum(r["seconds"] or 0 for r in rounds)
    return round(sum(r["ok"] for r in rounds) / seconds, 1) if seconds else None
