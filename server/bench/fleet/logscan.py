"""What went wrong in a run, as its logs say: warnings and errors of the server nodes and of
a throwaway PostgreSQL cluster, counted by message.

A benchmark whose release ends "done" can still have logged a deadlock, a collided write or
an update that failed and was retried: those lines are the first thing to read when a
figure looks odd, so the result carries their counts (``log_problems``) instead of leaving
them in files nobody opens. Messages are grouped with device ids and numbers masked, so
1,000 devices failing the same way are one line counted 1,000 times.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: Distinct messages kept per source (the most frequent first).
TOP_MESSAGES = 12
#: Longest message kept (characters).
MESSAGE_CHARS = 240

# The server's log lines (server/logs.py's format; worker processes insert
# "worker N [pid]"): "2026-12-07 06:51:19,602 [worker 1 [28267] ]LEVEL logger: text".
_SERVER_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?:worker \d+ \[\d+\] )?"
    r"(?P<level>WARNING|ERROR|CRITICAL) (?P<logger>\S+): (?P<text>.*)$"
)
# PostgreSQL's default log_line_prefix '%m [%p] ':
# "2026-12-07 06:51:18.505 UTC [28267] ERROR:  deadlock detected".
_POSTGRES_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \S+ \[\d+\] "
    r"(?P<level>WARNING|ERROR|FATAL|PANIC):\s+(?P<text>.*)$"
)
# Device ids (24 hex digits, Particle's format), other long hex strings (hashes,
# transaction ids), then any number: what varies between lines saying the same thing.
_DEVICE_ID = re.compile(r"\b[0-9a-f]{24}\b")
_HEX = re.compile(r"\b[0-9a-f]{12,}\b")
_NUMBER = re.compile(r"\d+")


def mask(text: str) -> str:
    """``text`` with device ids, long hex strings and numbers replaced by placeholders."""
    text = _DEVICE_ID.sub("<device>", text)
    text = _HEX.sub("<hex>", text)
    return _NUMBER.sub("N", text)[:MESSAGE_CHARS]


def _summary(found: Iterable[tuple[str, str]]) -> dict[str, Any]:
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    for level, message in found:
        levels[level.lower()] += 1
        messages[f"{level} {message}"] += 1
    return {
        "by_level": dict(sorted(levels.items())),
        "messages": dict(messages.most_common(TOP_MESSAGES)),
        "distinct_messages": len(messages),
    }


def _lines(paths: Iterable[Path]) -> Iterable[str]:
    for path in paths:
        try:
            with path.open(errors="replace") as lines:
                yield from lines
        except FileNotFoundError:
            continue


def scan_server_logs(paths: Iterable[Path]) -> dict[str, Any]:
    """Warnings and errors in ``ota server`` logs: counts per level and the most frequent
    messages (logger and masked text), with ``tracebacks``: lines starting one."""
    found: list[tuple[str, str]] = []
    tracebacks = 0
    for line in _lines(paths):
        if line.startswith("Traceback (most recent call last)"):
            tracebacks += 1
            continue
        matched = _SERVER_LINE.match(line.rstrip("\n"))
        if matched:
            found.append(
                (matched["level"], f"{matched['logger']}: {mask(matched['text'])}")
            )
    return _summary(found) | {"tracebacks": tracebacks}


def scan_postgres_log(path: Path) -> dict[str, Any] | None:
    """Warnings and errors in a PostgreSQL server log (None when there is no log)."""
    if not path.is_file():
        return None
    found = []
    for line in _lines([path]):
        matched = _POSTGRES_LINE.match(line.rstrip("\n"))
        if matched:
            found.append((matched["level"], mask(matched["text"])))
    return _summary(found)


def error_count(summary: dict[str, Any] | None) -> int:
    """Lines at error level or worse (and tracebacks) in a scan's summary."""
    if summary is None:
        return 0
    worse = ("error", "critical", "fatal", "panic")
    return sum(summary["by_level"].get(level, 0) for level in worse) + summary.get(
        "tracebacks", 0
    )
