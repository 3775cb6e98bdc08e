"""Logging set-up of the server's processes: one line per record on stderr.

``ota server --log-level`` sets the level for the main process and its workers alike, so
what an operator must see (refused handshakes, revoked devices, lockouts: WARNING; sessions
and transfers: INFO) reaches the terminal or the journal.

``--log-format text`` (the default) writes a time-stamped line of text per record;
``--log-format json`` one JSON object per line, for log shippers and ``jq``::

    {"ts": "2026-12-07T09:12:03.123Z", "level": "info", "logger": "ota.devices",
     "message": "device 0123... online over tls from 192.0.2.7", "origin": "node1:main-4711",
     "event": "session_opened", "device_id": "0123...", "product_id": 1, "transport": "tls"}

``origin`` names the process (``<node id>:<role>-<pid>``, as in the event log; before the
server knows its node id, ``<role>-<pid>``). The fields a log site passes with ``extra=``
(``event`` names what happened; ``device_id``, ``product_id``, ``transport``, ``version``,
``reason``...) become keys of the object; the text format leaves them out (its message says
them).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import traceback
from typing import Any

from otacore.errors import ValidationError

#: Level names ``--log-level`` accepts.
LOG_LEVELS = ("debug", "info", "warning", "error")
#: ``--log-format`` choices.
LOG_FORMATS = ("text", "json")

#: The attributes every LogRecord has: the rest came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName",
}
#: Keys of the JSON object the formatter writes itself; ``extra=`` cannot replace them.
_OWN_KEYS = frozenset({"ts", "level", "logger", "message", "origin", "exc"})

_origin = f"main-{os.getpid()}"


def parse_log_level(name: str) -> int:
    """The logging level of a ``--log-level`` name, or ValidationError naming the choices."""
    if name.lower() not in LOG_LEVELS:
        raise ValidationError(f"log level {name!r} is not one of: {', '.join(LOG_LEVELS)}")
    level: int = getattr(logging, name.upper())
    return level


def check_log_format(name: str) -> str:
    """``name`` if it is a ``--log-format`` choice, else ValidationError naming them."""
    if name not in LOG_FORMATS:
        raise ValidationError(f"log format {name!r} is not one of: {', '.join(LOG_FORMATS)}")
    return name


def set_log_origin(origin: str) -> None:
    """Name this process in every JSON log line from now on (its event-log origin)."""
    global _origin
    _origin = origin


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring), on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object without a line break."""
        stamp = dt.datetime.fromtimestamp(record.created, dt.UTC)
        entry: dict[str, Any] = {
            "ts": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "origin": _origin,
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in _OWN_KEYS and not key.startswith("_"):
                entry[key] = _jsonable(value)
        if record.exc_info:
            entry["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.stack_info:
            entry["exc"] = record.stack_info
        # ensure_ascii: a device's bytes in a message can never break the line or the UTF-8.
        return json.dumps(entry, ensure_ascii=True, separators=(", ", ": "))


def configure_logging(level_name: str, *, prefix: str = "", log_format: str = "text",
                      origin: str | None = None) -> None:
    """Send records of ``level_name`` and above to stderr, one line each, as text (with
    ``prefix`` after the time stamp) or as JSON (``origin``: this process's name).

    Leaves logging alone when the process configured it already (a test runner, or a
    program embedding the server), as :func:`logging.basicConfig` does."""
    level = parse_log_level(level_name)
    check_log_format(log_format)
    if origin is not None:
        set_log_origin(origin)
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
