"""Results of the fleet benchmark: ``result.json``, a PNG plot, a rich table, and progress."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from server.bench.fleet.logscan import error_count


class Reporter(Protocol):
    """Where the runner tells what it is doing."""

    def phase(self, description: str, total: float | None = None) -> None:
        """A new phase starts (``total`` steps, or unknown)."""

    def advance_to(self, completed: float) -> None:
        """The current phase has done ``completed`` steps."""

    def note(self, text: str) -> None:
        """Something worth a line of its own."""


class QuietReporter:
    """Keeps notes, shows nothing (tests, scripts)."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.phases: list[str] = []

    def phase(self, description: str, total: float | None = None) -> None:
        """Record the phase name."""
        self.phases.append(description)

    def advance_to(self, completed: float) -> None:
        """Nothing to show."""

    def note(self, text: str) -> None:
        """Record the note."""
        self.notes.append(text)


class RichReporter:
    """A rich progress display: one bar per phase (use as a context manager)."""

    def __init__(self, console: Console | None = None) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
        )
        self._task: TaskID | None = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._finish()
        self.progress.stop()

    def _finish(self) -> None:
        if self._task is not None:
            if self.progress.tasks[-1].total is None:  # a phase of unknown length: done
                self.progress.update(self._task, total=1, completed=1)
            self.progress.stop_task(self._task)
            self._task = None

    def phase(self, description: str, total: float | None = None) -> None:
        """Close the previous bar and open one for this phase."""
        self._finish()
        self._task = self.progress.add_task(description, total=total)

    def advance_to(self, completed: float) -> None:
        """Move the current bar."""
        if self._task is not None:
            self.progress.update(self._task, completed=completed)

    def note(self, text: str) -> None:
        """Print a line above the bars."""
        self.progress.console.log(text, markup=False)  # notes name extras: [bench]


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 (linear interpolation between order statistics), min and max."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p95": None, "p99": None, "min": None, "max": None}

    def at(fraction: float) -> float:
        rank = fraction * (len(ordered) - 1)
        low, high = math.floor(rank), math.ceil(rank)
        return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)

    return {
        "p50": round(at(0.50), 4),
        "p95": round(at(0.95), 4),
        "p99": round(at(0.99), 4),
        "min": round(ordered[0], 4),
        "max": round(ordered[-1], 4),
    }


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write the result as indented JSON."""
    path.write_text(json.dumps(result, indent=2) + "\n")


def write_plot(
    path: Path,
    latencies: Sequence[float],
    online_times: Sequence[float],
    title: str,
) -> str | None:
    """CDF of update latency and a timeline of devices updated (and, for context, of
    devices coming online at fleet start). Returns a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write files only
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            "no plot: matplotlib is not installed (it comes with the bench extra: "
            "pip install 'otacloud[bench]')"
        )
    figure, (cdf, timeline) = plt.subplots(1, 2, figsize=(12, 4.5))
    ordered = sorted(latencies)
    count = len(ordered)
    if count:
        cdf.step(ordered, [(i + 1) / count for i in range(count)], where="post")
        timeline.step(
            [0.0, *ordered],
            list(range(count + 1)),
            where="post",
            label="devices updated, s after the release",
        )
    if online_times:
        ordered_online = sorted(online_times)
        timeline.step(
            [0.0, *ordered_online],
            list(range(len(ordered_online) + 1)),
            where="post",
            linestyle="--",
            label="devices online, s after the fleet start",
        )
    cdf.set_xlabel("update latency (s): release request to new firmware verified")
    cdf.set_ylabel("fraction of devices")
    cdf.set_ylim(0, 1.02)
    cdf.grid(alpha=0.3)
    timeline.set_xlabel("seconds")
    timeline.set_ylabel("devices")
    timeline.grid(alpha=0.3)
    timeline.legend(loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def results_table(result: dict[str, Any]) -> Table:
    """The headline numbers as a rich table."""
    table = Table(
        title=f"ota bench fleet: {result['devices']:,} devices, "
        f"{result['transport']}, {result['procs']} load generators"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("note")
    latency = result.get("update_latency_s") or {}
    handshakes = result.get("handshakes") or {}

    def per_transport(mode: str) -> str:
        parts = []
        for transport, rounds in sorted(handshakes.items()):
            found = rounds.get(mode) or {}
            parts.append(
                f"{transport} {_fmt(found.get('per_s'), 0)}/s "
                f"({_fmt(found.get('per_server_cpu_s'), 0)}/server CPU s)"
            )
        return ", ".join(parts)

    nginx = result.get("nginx") or {}
    rows = [
        (
            "sessions_peak",
            _fmt(result.get("sessions_peak")),
            (
                f"all online {_fmt(result.get('sessions_online_s'), 2)} s after the start"
                if result.get("online_end") == "done"
                else f"{_fmt(result.get('sessions_online'))} came online, then the wait "
                f"ended ({result.get('online_end')})"
            ),
        ),
        (
            "server_rss_per_session_kib",
            _fmt(result.get("server_rss_per_session_kib")),
            f"RSS {_fmt(result.get('server_rss_idle_kib'))} -> "
            f"{_fmt(result.get('server_rss_peak_kib'))} KiB",
        ),
        (
            "handshakes_per_s_full",
            _fmt(result.get("handshakes_per_s_full"), 0),
            per_transport("full"),
        ),
        (
            "handshakes_per_s_resumed",
            _fmt(result.get("handshakes_per_s_resumed"), 0),
            per_transport("resumed"),
        ),
        (
            "release_all_updated_s",
            _fmt(result.get("release_all_updated_s"), 2),
            f"{_fmt(result.get('release_updated'))}/{_fmt(result.get('release_devices'))} "
            "devices verified the new firmware",
        ),
        (
            "update_latency_s p50/p95/p99",
            "/".join(_fmt(latency.get(k), 2) for k in ("p50", "p95", "p99")),
            "",
        ),
        (
            "update stages p50 (s)",
            "",
            "; ".join(
                f"{kind}: queued {_fmt(st['queued']['p50'], 1)}, download "
                f"{_fmt(st['download']['p50'], 1)}, apply+reboot+verify "
                f"{_fmt(st['apply_reboot_verify']['p50'], 1)}"
                for kind, st in sorted((result.get("update_stages_s") or {}).items())
            ),
        ),
        (
            "UDP datagrams dropped",
            _fmt(result.get("release_udp_rcvbuf_drops")),
            f"during the release (full receive buffers), "
            f"{_fmt(result.get('release_server_udp_socket_drops'))} at the server's socket",
        ),
        ("goodput_mb_s", _fmt(result.get("goodput_mb_s"), 2), "firmware bytes / release time"),
        (
            "server_cpu_s_per_mb",
            _fmt(result.get("server_cpu_s_per_mb"), 3),
            f"{_fmt(result.get('release_server_cpu_s'), 2)} server CPU s in the release",
        ),
        (
            "bytes_on_wire",
            _fmt(result.get("bytes_on_wire")),
            f"bytes_full_images {_fmt(result.get('bytes_full_images'))} (CoAP level)",
        ),
        (
            "nginx_goodput_mb_s",
            _fmt(result.get("nginx_goodput_mb_s"), 2),
            f"{_fmt(nginx.get('cpu_s_per_mb'), 3)} nginx CPU s/MB; {nginx.get('note', '')}",
        ),
        (
            "server bytes sent / full images",
            _release_bytes(result.get("release_stats")),
            f"--release {result.get('release')}: what the server counted per transfer kind",
        ),
    ]
    nodes = result.get("nodes") or []
    if len(nodes) > 1:
        rows.append(
            (
                "nodes",
                _fmt(len(nodes)),
                "; ".join(
                    f"{node['endpoint']}: {_fmt(node['sessions_at_release'])} sessions, "
                    f"{_fmt(node['release_updated'])} updated, "
                    f"{_fmt(node['release_server_cpu_s'], 2)} CPU s in the release"
                    for node in nodes
                ),
            )
        )
    db = result.get("db") or {}
    if db:
        share = db.get("release_cpu_share")
        rows.append(
            (
                "db CPU share (release)",
                "n/a" if share is None else f"{100 * share:.1f}%",
                f"{db.get('backend')}: {_fmt(db.get('release_cpu_s'), 2)} CPU s; "
                f"{db.get('note', '')}",
            )
        )
    problems = result.get("log_problems") or {}
    for source in ("servers", "database"):
        found = problems.get(source)
        if found is not None:
            levels = found["by_level"]
            rows.append(
                (
                    f"{source} log warnings / errors",
                    f"{_fmt(levels.get('warning', 0))} / {_fmt(error_count(found))}",
                    next(iter(found["messages"]), "none"),
                )
            )
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # plain text: no rich markup
    return table


def _release_bytes(stats: dict[str, Any] | None) -> str:
    """The server's release_stats bytes and transfer kinds as one table cell."""
    if not stats or "bytes_sent" not in stats:
        return "n/a"
    kinds = ", ".join(
        f"{stats.get(name, 0)} {label}"
        for name, label in (
            ("delta_transfers", "delta"),
            ("compressed_transfers", "zstd"),
            ("full_transfers", "full"),
        )
    )
    sent, full = stats["bytes_sent"] / 1e6, stats["bytes_full_images"] / 1e6
    return f"{sent:.2f} / {full:.2f} MB ({kinds})"
