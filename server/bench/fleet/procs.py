"""Child processes of the benchmark (always stopped on exit) and what /proc says about them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import trio

from server.bench.fleet import BenchError

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: The directory the ``server`` package was imported from (server/bench/fleet/procs.py ->
#: ../../..): a source checkout, or site-packages when installed. Children import from it,
#: so they run the same code as this process.
IMPORT_ROOT = Path(__file__).resolve().parents[3]


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/<pid>/status), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no VmRSS line (a zombie?)")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (fields 14 and 15 of
    /proc/<pid>/stat, proc(5)), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores, from /proc/stat (busy is
    everything but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    total = sum(fields)
    idle = fields[3] + fields[4]
    return (total - idle) / _CLOCK_TICKS, total / _CLOCK_TICKS


def children_of(pid: int) -> list[int]:
    """Direct children of a process (from /proc/<pid>/task/*/children)."""
    found: list[int] = []
    with suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live children (e.g. nginx's master and workers)."""
    total = cpu_seconds(pid)
    for child in children_of(pid):
        with suppress(OSError):
            total += cpu_seconds(child)
    return total


def tree_rss_kib(pid: int) -> int:
    """VmRSS of a process plus its live children (the server's worker processes), KiB."""
    total = rss_kib(pid)
    for child in children_of(pid):
        with suppress(OSError, BenchError):
            total += rss_kib(child)
    return total


def child_env() -> dict[str, str]:
    """The environment for children: this one, with this process's ``server`` package first
    on their import path (a checkout run without installing it works too)."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(IMPORT_ROOT) + (os.pathsep + path if path else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for programs that cannot report theirs)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


async def stop_process(process: trio.Process, stop_signal: int, grace: float) -> None:
    """Ask ``process`` to stop with ``stop_signal``; SIGKILL it after ``grace`` seconds."""
    if process.returncode is None:
        with suppress(ProcessLookupError):
            process.send_signal(stop_signal)
        with trio.move_on_after(grace):
            await process.wait()
    if process.returncode is None:
        with suppress(ProcessLookupError):
            process.kill()
        await process.wait()


@asynccontextmanager
async def running_process(
    argv: Sequence[str],
    *,
    log_path: Path,
    stdin: int | None = None,
    stdout: int | None = None,
    stop_signal: int = signal.SIGTERM,
    grace: float = 10.0,
    **options: Any,
) -> AsyncIterator[trio.Process]:
    """Start ``argv`` (stderr, and stdout unless piped, go to ``log_path``); on leaving,
    however that happens (an error, Ctrl-C), stop it and wait for it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=stdin,
            stdout=log.fileno() if stdout is None else stdout,
            stderr=log.fileno(),
            **options,
        )
        try:
            yield process
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(process, stop_signal, grace)
                for stream in (process.stdin, process.stdout):
                    if stream is not None:
                        await trio.aclose_forcefully(stream)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file (for error messages)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


PIPE = subprocess.PIPE


def udp_receive_drops() -> int:
    """Datagrams the kernel dropped because a UDP socket's receive buffer was full
    (RcvbufErrors in /proc/net/snmp; counts the whole network namespace)."""
    rows = [
        line.split()
        for line in Path("/proc/net/snmp").read_text().splitlines()
        if line.startswith("Udp:")
    ]
    header, values = rows[0], rows[1]
    return int(values[header.index("RcvbufErrors")])


def udp_socket_drops(port: int) -> int:
    """Datagrams dropped so far by the open UDP sockets bound to local ``port`` (the last
    column of /proc/net/udp and /proc/net/udp6)."""
    total = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    total += int(fields[-1])
    return total


def cluster_cpu_seconds(postmaster: int) -> float:
    """CPU seconds of a PostgreSQL cluster: its postmaster, every backend and auxiliary
    process alive now, and those that exited (the postmaster reaps its children, so their
    time is in its cutime and cstime, fields 16 and 17 of /proc/<pid>/stat, proc(5))."""
    text = Path(f"/proc/{postmaster}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    total = sum(int(v) for v in fields[11:15]) / _CLOCK_TICKS
    for child in children_of(postmaster):
        with suppress(OSError):
            total += cpu_seconds(child)
    return total


class ResourceWindow:
    """What a phase cost: CPU of the server processes (each with its live children: a
    node's workers) and of a group of others, the machine's busy fraction, UDP datagrams
    dropped for full receive buffers, and the CPU of a local PostgreSQL cluster (by its
    postmaster's pid) when there is one.

    A child that exits inside the window takes its CPU time with it (a restarted worker's
    predecessor is not counted); the cluster's exited backends are counted."""

    def __init__(
        self,
        pid: int | Sequence[int],
        others: list[int],
        udp_port: int | Sequence[int] | None = None,
        *,
        db_pid: int | None = None,
    ) -> None:
        self.pids = [pid] if isinstance(pid, int) else list(pid)
        self.others = others
        self.udp_ports = [udp_port] if isinstance(udp_port, int) else list(udp_port or ())
        self.db_pid = db_pid
        self._start = self._sample()

    def _sample(self) -> dict[str, Any]:
        others = 0.0
        for pid in self.others:
            with suppress(OSError):
                others += cpu_seconds(pid)
        busy, total = machine_cpu_seconds()
        db: float | None = None
        if self.db_pid is not None:
            with suppress(OSError):
                db = cluster_cpu_seconds(self.db_pid)
        return {
            "servers": [tree_cpu_seconds(pid) for pid in self.pids],
            "others": others,
            "busy": busy,
            "total": total,
            "drops": udp_receive_drops(),
            "port_drops": sum(udp_socket_drops(port) for port in self.udp_ports),
            "db": db,
        }

    def read(self) -> dict[str, Any]:
        """Since the window opened: ``process_cpu_s`` (every server process with its
        children), ``process_cpu_s_each`` (per server process), ``others_cpu_s``,
        ``machine_busy`` (fraction of all cores), ``udp_rcvbuf_drops`` (every socket),
        ``udp_port_drops`` (the sockets on the UDP ports: the servers' DTLS sockets)
        and ``db_cpu_s`` (the PostgreSQL cluster; None without one)."""
        end = self._sample()
        start = self._start
        span = end["total"] - start["total"]
        each = [round(b - a, 3) for a, b in zip(start["servers"], end["servers"], strict=True)]
        db = None
        if start["db"] is not None and end["db"] is not None:
            db = round(end["db"] - start["db"], 3)
        return {
            "process_cpu_s": round(sum(end["servers"]) - sum(start["servers"]), 3),
            "process_cpu_s_each": each,
            "others_cpu_s": round(end["others"] - start["others"], 3),
            "machine_busy": round((end["busy"] - start["busy"]) / span, 3) if span > 0 else 0.0,
            "udp_rcvbuf_drops": end["drops"] - start["drops"],
            "udp_port_drops": end["port_drops"] - start["port_drops"],
            "db_cpu_s": db,
        }
