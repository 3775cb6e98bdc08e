"""Logging set-up of the server's processes: one line per record on stderr, with a time stamp.

``ota server --log-level`` sets the level for the main process and its workers alike, so
what an operator must see (refused handshakes, revoked devices, lockouts: WARNING; sessions
and transfers: INFO) reaches the terminal or the journal.
"""

from __future__ import annotations

import logging

from otacore.errors import ValidationError

#: Level names ``--log-level`` accepts.
LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_log_level(name: str) -> int:
    """The logging level of a ``--log-level`` name, or ValidationError naming the choices."""
    if name.lower() not in LOG_LEVELS:
        raise ValidationError(f"log level {name!r} is not one of: {', '.join(LOG_LEVELS)}")
    level: int = getattr(logging, name.upper())
    return level


def configure_logging(level_name: str, *, prefix: str = "") -> None:
    """Send records of ``level_name`` and above to stderr, one time-stamped line each.

    Leaves logging alone when the process configured it already (a test runner, or a
    program embedding the server), as :func:`logging.basicConfig` does."""
    level = parse_log_level(level_name)
    logging.basicConfig(
        level=level, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"
    )
