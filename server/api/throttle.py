"""Failed sign-in limits for ``/oauth/token``: per client address and per account, bounded.

Plain state, no I/O: the caller passes the time (``trio.current_time()`` in the API) and the
keys of one attempt, ``("address", ip)`` and ``("user", name)`` / ``("client", id)``.

* :meth:`LoginThrottle.begin` refuses an attempt while any of its keys is locked, or while
  failures plus attempts still in flight reach the key's limit (so a burst of parallel
  guesses cannot slip past the count before the first one fails); otherwise it counts the
  attempt as in flight.
* :meth:`LoginThrottle.failed` turns the in-flight attempt into a failure; the failure that
  reaches a limit locks the key for ``lockout_seconds`` (Particle locks an address out for
  30 minutes after 10 consecutive failed token requests: docs, "API rate limits").
* :meth:`LoginThrottle.finished` (after a success) clears the failures of the attempt's own
  address (failures are "consecutive" per address, as Particle counts them) and nothing
  else: an attacker's
  failures from another address, or against the account, still count. The account key is
  cleared only by time, so a correct password from one place does not hand another place
  fresh guesses.

Failures against an account that does not exist count like any other (the caller cannot
tell them apart, and must not let an attacker do so). Memory is bounded: each kind of key
keeps at most ``max_keys`` entries; the least recently touched one is dropped to make room
(an entry that is locked or in flight is dropped last).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field


class TooManyAttemptsError(Exception):
    """An attempt refused by the throttle; ``retry_after`` seconds until it may be retried."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ThrottleLimits:
    """How many failures each kind of key may collect before it is locked out, and for how
    long. Failures add up in a window of ``lockout_seconds`` from a key's first failure."""

    max_failures_per_address: int = 10
    max_failures_per_user: int = 20
    lockout_seconds: float = 1800.0
    #: Entries kept per kind of key (addresses, accounts); older ones are forgotten.
    max_keys: int = 10_000


@dataclass
class _Entry:
    failures: int = 0
    in_flight: int = 0
    first_failure_at: float = 0.0
    locked_until: float = 0.0


@dataclass
class _Table:
    limit: int
    max_keys: int
    entries: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)

    def get(self, key: str, now: float, window: float) -> _Entry | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.failures and now - entry.first_failure_at >= window and \
                entry.locked_until <= now:
            entry.failures = 0  # the window passed: old failures no longer count
        if entry.failures == 0 and entry.in_flight == 0 and entry.locked_until <= now:
            del self.entries[key]
            return None
        return entry

    def touch(self, key: str, now: float) -> _Entry:
        entry = self.entries.get(key)
        if entry is None:
            self._make_room(now)
            entry = self.entries[key] = _Entry()
        self.entries.move_to_end(key)
        return entry

    def _make_room(self, now: float) -> None:
        if len(self.entries) < self.max_keys:
            return
        # Oldest first; prefer dropping an idle entry over a locked or busy one.
        for key, entry in self.entries.items():
            if entry.in_flight == 0 and entry.locked_until <= now:
                del self.entries[key]
                return
        self.entries.popitem(last=False)


class LoginThrottle:
    """Counts failed sign-ins per address and per account (see the module docstring)."""

    def __init__(self, limits: ThrottleLimits | None = None) -> None:
        self.limits = limits or ThrottleLimits()
        self._tables = {
            "address": _Table(self.limits.max_failures_per_address, self.limits.max_keys),
            "user": _Table(self.limits.max_failures_per_user, self.limits.max_keys),
            "client": _Table(self.limits.max_failures_per_user, self.limits.max_keys),
        }

    def tracked(self) -> int:
        """How many entries the throttle holds (tests check it stays bounded)."""
        return sum(len(table.entries) for table in self._tables.values())

    def begin(self, keys: list[tuple[str, str]], now: float) -> None:
        """Admit an attempt (counted in flight) or raise :class:`TooManyAttemptsError`."""
        window = self.limits.lockout_seconds
        for kind, key in keys:
            entry = self._tables[kind].get(key, now, window)
            if entry is None:
                continue
            if entry.locked_until > now:
                wait = max(1, math.ceil(entry.locked_until - now))
                raise TooManyAttemptsError(_locked_message(kind, wait), wait)
            if entry.failures + entry.in_flight >= self._tables[kind].limit:
                raise TooManyAttemptsError(
                    f"too many sign-in attempts at once for this {_noun(kind)}; wait for the "
                    "ones in progress to finish, then retry", 1)
        for kind, key in keys:
            self._tables[kind].touch(key, now).in_flight += 1

    def failed(self, keys: list[tuple[str, str]], now: float) -> None:
        """Record that an admitted attempt failed (wrong or unknown credentials)."""
        for kind, key in keys:
            table = self._tables[kind]
            entry = table.touch(key, now)
            entry.in_flight = max(0, entry.in_flight - 1)
            if entry.failures == 0:
                entry.first_failure_at = now
            entry.failures += 1
            if entry.failures >= table.limit:
                entry.locked_until = now + self.limits.lockout_seconds

    def finished(self, keys: list[tuple[str, str]], now: float, *, succeeded: bool) -> None:
        """Close an admitted attempt that did not fail on its credentials (success clears the
        failures of its own address only; a malformed request just leaves the count)."""
        for kind, key in keys:
            table = self._tables[kind]
            entry = table.entries.get(key)
            if entry is None:
                continue
            entry.in_flight = max(0, entry.in_flight - 1)
            if succeeded and kind == "address" and entry.locked_until <= now:
                entry.failures = 0
            table.get(key, now, self.limits.lockout_seconds)  # drop it if nothing is left


def _noun(kind: str) -> str:
    return {"address": "address", "user": "account", "client": "client"}[kind]


def _locked_message(kind: str, wait: int) -> str:
    minutes = f"{wait} seconds" if wait < 120 else f"{math.ceil(wait / 60)} minutes"
    if kind == "address":
        return (f"too many failed sign-in attempts from this address; try again in {minutes}, "
                "after checking the user name and password (or client id and secret)")
    return (f"too many failed sign-in attempts for this {_noun(kind)}; try again in {minutes}, "
            "or ask an administrator to check the account")
