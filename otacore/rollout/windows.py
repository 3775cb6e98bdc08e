"""Maintenance windows: a cron expression, a duration and an IANA time zone.

A window opens at each time the cron expression matches in its time zone and stays open
``duration_minutes`` of real (UTC) time. Cron matching, DST included, is the ``cronsim``
library's (a nonexistent local time of a spring-forward day fires at the first valid time
after it, an ambiguous autumn time fires once, as Debian's cron does); zones are
``zoneinfo``'s. Times in and out are epoch milliseconds (UTC), as everywhere in the store.

Offers *start* only inside an open window; a transfer in progress may finish after it
closes (the rollout distinguishes the two, see ``Rollout.may_offer`` / ``may_continue``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from otacore.rollout.errors import MaintenanceWindowError

#: Longest window: a week (a longer one is always open for a weekly cron).
MAX_DURATION_MINUTES = 7 * 24 * 60
_MS = 1000


def _to_datetime(ms: int, zone: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(ms / _MS, tz=UTC).astimezone(zone)


def _to_ms(moment: datetime) -> int:
    return round(moment.timestamp() * _MS)


@dataclass(frozen=True)
class MaintenanceWindow:
    """A recurring window; construct validates the expression, duration and zone."""

    cron: str
    duration_minutes: int
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if not isinstance(self.cron, str) or len(self.cron.split()) != 5:
            raise MaintenanceWindowError(
                f"cron expression {self.cron!r} must have five fields: minute hour "
                'day-of-month month day-of-week (e.g. "0 2 * * *" for 02:00 every day)'
            )
        object.__setattr__(self, "cron", " ".join(self.cron.split()))
        duration = self.duration_minutes
        if isinstance(duration, bool) or not isinstance(duration, int):
            raise MaintenanceWindowError("a window's duration must be whole minutes")
        if not 1 <= duration <= MAX_DURATION_MINUTES:
            raise MaintenanceWindowError(
                f"a window's duration must be 1..{MAX_DURATION_MINUTES} minutes, not {duration}"
            )
        try:
            zone = ZoneInfo(str(self.timezone))
        except (ZoneInfoNotFoundError, ValueError):
            raise MaintenanceWindowError(
                f"unknown time zone {self.timezone!r}; give an IANA name such as "
                "Europe/Berlin or UTC"
            ) from None
        try:
            CronSim(self.cron, datetime(2000, 1, 1, tzinfo=zone))
        except CronSimError as exc:
            raise MaintenanceWindowError(f"cron expression {self.cron!r}: {exc}") from None
        object.__setattr__(self, "_zone", zone)

    @property
    def zone(self) -> ZoneInfo:
        """The window's time zone."""
        zone: ZoneInfo = self.__dict__["_zone"]
        return zone

    def last_start(self, now_ms: int) -> int | None:
        """The latest opening at or before ``now_ms`` (None: none in cronsim's range)."""
        # cronsim's reverse iteration yields times strictly before its start: start 1 ms on.
        after = _to_datetime(now_ms + 1, self.zone)
        try:
            return _to_ms(next(CronSim(self.cron, after, reverse=True)))
        except StopIteration:
            return None

    def is_open(self, now_ms: int) -> bool:
        """True when ``now_ms`` lies in [opening, opening + duration) of some opening.
        Every opening lasts equally long, so the latest one decides."""
        start = self.last_start(now_ms)
        return start is not None and now_ms < start + self.duration_minutes * 60 * _MS

    def closes_at(self, now_ms: int) -> int | None:
        """When the window open at ``now_ms`` closes (None: it is closed now)."""
        start = self.last_start(now_ms)
        if start is None:
            return None
        end = start + self.duration_minutes * 60 * _MS
        return end if now_ms < end else None

    def next_open(self, now_ms: int) -> int | None:
        """``now_ms`` when open, else the next opening after it (None: never again)."""
        if self.is_open(now_ms):
            return now_ms
        try:
            return _to_ms(next(CronSim(self.cron, _to_datetime(now_ms, self.zone))))
        except StopIteration:
            return None

    def describe(self) -> str:
        """The window in words."""
        return f"cron {self.cron!r} for {self.duration_minutes} min ({self.timezone})"

    def to_dict(self) -> dict[str, object]:
        """Compact JSON/msgpack-able form."""
        return {"cron": self.cron, "duration": self.duration_minutes, "timezone": self.timezone}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> MaintenanceWindow:
        """The inverse of :meth:`to_dict`."""
        try:
            return cls(str(data["cron"]), data["duration"], str(data["timezone"]))  # type: ignore[arg-type]
        except KeyError as exc:
            raise MaintenanceWindowError(f"malformed window {data!r}: missing {exc}") from None


def any_open(windows: Iterable[MaintenanceWindow], now_ms: int) -> bool:
    """True when no window applies (empty) or at least one applicable window is open."""
    windows = list(windows)
    return not windows or any(w.is_open(now_ms) for w in windows)


def next_opening(windows: Sequence[MaintenanceWindow], now_ms: int) -> int | None:
    """The earliest time at or after ``now_ms`` when one of ``windows`` is open."""
    times = [t for t in (w.next_open(now_ms) for w in windows) if t is not None]
    return min(times) if times else None


def windows_for(
    device_groups: Iterable[str],
    product_window: MaintenanceWindow | None,
    group_windows: Mapping[str, MaintenanceWindow],
) -> tuple[MaintenanceWindow, ...]:
    """The windows that apply to a device: its groups' windows when any of its groups has
    one (the more specific rule, like group releases over the product default), else the
    product's window, else none (always open). The device may start when any applies."""
    mine = tuple(group_windows[g] for g in sorted(set(device_groups)) if g in group_windows)
    if mine:
        return mine
    return (product_window,) if product_window is not None else ()

