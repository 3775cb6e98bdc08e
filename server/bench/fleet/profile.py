"""Sampling the server with py-spy during a phase, and what dominates the samples."""

from __future__ import annotations

import shutil
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from server.bench.fleet.procs import running_process


def find_py_spy() -> str | None:
    """The py-spy binary: next to this Python (a venv) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


@asynccontextmanager
async def sampling(pid: int, output: Path, *, rate: int = 97) -> AsyncIterator[bool]:
    """Record the stacks of ``pid`` and its subprocesses (the server's workers; collapsed
    "raw" format) while the block runs; yields False (and records nothing) when py-spy is
    not installed."""
    binary = find_py_spy()
    if binary is None:
        yield False
        return
    argv = [
        binary,
        "record",
        "--pid",
        str(pid),
        "--format",
        "raw",
        "--output",
        str(output),
        "--rate",
        str(rate),
        "--nonblocking",
        "--subprocesses",
    ]
    # py-spy writes its output when interrupted (SIGINT), as after Ctrl-C.
    async with running_process(
        argv, log_path=output.with_suffix(".log"), stop_signal=signal.SIGINT, grace=20.0
    ):
        yield True


#: Where a sample's innermost frame lives -> what it is spending time on.
AREAS = (
    (("sqlalchemy/", "sqlite3/", "psycopg/", "psycopg_binary/", "psycopg_pool/"),
     "store: SQLAlchemy + driver (SQLite, psycopg)"),
    (("server/store/",), "store layer (server/store)"),
    (("OpenSSL/", "/ssl.py", "trio/_ssl.py", "trio/_dtls.py", "cryptography/"), "TLS/DTLS"),
    (("trio/", "outcome/", "threading.py", "queue.py"), "trio loop, worker threads"),
    (("otacore/",), "otacore (protocol, transfer)"),
    (("server/",), "server (sessions, OTA)"),
)


#: Innermost frames (function, module path) that wait rather than work: py-spy counts a
#: thread blocked there as a sample when it cannot tell it is idle (with ``--nonblocking``
#: it often cannot), so they are an area of their own, and ``busy_samples`` leaves them out.
WAITS = (
    ("EpollIOManager.get_events", "trio/_core/_io_epoll.py"),  # the event loop, idle
    ("Connection.wait", "psycopg/connection.py"),  # a query's answer from PostgreSQL
    ("WorkerThread._work", "trio/_core/_thread_cache.py"),  # an idle worker thread
)
WAITING = "waiting (idle event loop, PostgreSQL's answer, idle worker threads)"


def _area(path: str, name: str = "") -> str:
    if any(name == wait and path.endswith(where) for wait, where in WAITS):
        return WAITING
    for needles, area in AREAS:
        if any(needle in path for needle in needles):
            return area
    return "other (stdlib, hypercorn, ...)"


def summarize(collapsed: Path, top: int = 12) -> dict[str, Any]:
    """What dominates a collapsed-stack file (``frame;frame;...;leaf count`` per line):
    self samples per function and per area (library, or waiting: see WAITS) of the
    innermost frame, and inclusive samples of the project's own functions (server/,
    otacore/; the CLI entry excluded). Shares are of all samples."""
    own: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    project: Counter[str] = Counter()
    total = 0
    try:
        lines = collapsed.read_text(errors="replace").splitlines()
    except OSError:
        return {"samples": 0, "self": [], "areas": [], "project_inclusive": []}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_split(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        total += count
        name, path = frames[-1]
        own[_label(name, path)] += count
        areas[_area(path, name)] += count
        mine = {
            _label(name, path)
            for name, path in frames
            if path.startswith(("server/", "otacore/")) and not path.startswith("server/cli/")
        }
        for label in mine:
            project[label] += count

    def shares(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "share": round(count / total, 4)}
            for name, count in counter.most_common(top)
        ]

    return {
        "samples": total,
        "busy_samples": total - areas[WAITING],
        "self": shares(own),
        "areas": [
            {"area": area, "share": round(count / total, 4)} for area, count in areas.most_common()
        ],
        "project_inclusive": shares(project),
    }


def _split(frame: str) -> tuple[str, str]:
    """``function (path/to/module.py:123)`` -> (function, path/to/module.py)."""
    name, _, where = frame.partition(" (")
    return name, where.rstrip(")").rsplit(":", 1)[0]


def _label(name: str, path: str) -> str:
    return f"{name} ({Path(path).name})" if path else name
