"""Failed sign-ins and lockouts where an operator sees them: log lines and audit rows.

* Lockouts, and attempts refused by a sign-in limit (429) or by a full password-hashing
  queue (503), are WARNINGs on the ``ota.api.sign_in`` logger: the first of a burst at once,
  then one summary per ``interval`` (by reason and busiest address groups), as refused
  device connections are reported (both aggregate with :class:`server.burst_log.BurstLog`).
* Failed sign-ins (wrong or unknown credentials) are INFO, aggregated the same way.
* The failure that first locks a key writes a ``sign_in.lockout`` audit row; the lockouts
  that extend it only reach the log. An audit row so costs an attacker a whole limit's worth
  of guesses: failed attempts alone never drive store writes. An administrator clearing a
  limit writes ``sign_in.unlock`` (``server.api.sign_in_limits``).

Names and keys in log lines are shown with ``ascii()`` and cut short: they come from
clients.
"""

from __future__ import annotations

import logging

import trio

from otacore.errors import OtaError
from server.api.throttle import Attempt, Lockout, TooManyAttemptsError, noun
from server.burst_log import BurstLog, BurstSummary
from server.fleet import Fleet

log = logging.getLogger("ota.api.sign_in")


def shown(kind: str, key: str) -> str:
    """A key as log lines and messages show it: ``user 'dave'``, ``address 192.0.2.7``."""
    if kind == "address":
        return f"address {key}"
    text = key if len(key) <= 64 else key[:61] + "..."
    return f"{noun(kind)} {text!a}"


def _duration(seconds: float) -> str:
    return f"{seconds:g} s" if seconds < 120 else f"{seconds / 60:g} min"


class SignInLog:
    """Aggregated log lines about sign-ins; :meth:`run` writes the summaries when due."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        #: Lockouts and refusals (WARNING).
        self.limits = BurstLog(interval)
        #: Failed sign-ins (INFO).
        self.failures = BurstLog(interval)
        self._due = trio.Event()

    def _further(self, what: str) -> str:
        return f"further {what} are summarised every {self.interval:g} s"

    def failed(self, now: float, attempt: Attempt) -> None:
        """A sign-in failed on its credentials."""
        if self.failures.note(now, "failed sign-ins", attempt.group):
            account = shown(*attempt.account) if attempt.account else "no account"
            log.info("failed sign-in for %s from %s; %s", account, attempt.group,
                     self._further("failed sign-ins"),
                     extra={"event": "sign_in_failed", "account": account,
                            "address": attempt.group})
            self._due.set()

    def locked(self, now: float, lockout: Lockout) -> None:
        """A failure locked a key."""
        reason = f"{noun(lockout.kind)} lockouts"
        if self.limits.note(now, reason, lockout.group):
            if lockout.kind == "address":
                what = f"locked for {_duration(lockout.seconds)}"
            else:
                what = (f"the last from {lockout.group}; locked for "
                        f"{_duration(lockout.seconds)} for addresses it has not signed in "
                        "from before")
            log.warning(
                "sign-in lockout: %s after %d failed attempts (%s); clear it with: ota admin "
                "sign-in-limits clear %s; %s", shown(lockout.kind, lockout.key),
                lockout.failures, what, _clear_args(lockout.kind, lockout.key),
                self._further("sign-in lockouts and refusals"),
                extra={"event": "sign_in_lockout", "kind": lockout.kind, "key": lockout.key,
                       "address": lockout.group, "failures": lockout.failures,
                       "seconds": lockout.seconds})
            self._due.set()

    def refused(self, now: float, refusal: TooManyAttemptsError, group: str) -> None:
        """An attempt was refused by a limit (429)."""
        state = "locked" if refusal.locked else "busy"
        if self.limits.note(now, f"refused ({noun(refusal.kind)} {state})", group):
            log.warning("refused sign-in from %s: %s %s (retry after %d s); %s", group,
                        shown(refusal.kind, refusal.key),
                        "is locked" if refusal.locked else "has too many attempts in progress",
                        refusal.retry_after, self._further("sign-in lockouts and refusals"))
            self._due.set()

    def busy(self, now: float, group: str) -> None:
        """An attempt was refused because the password-hashing queue is full (503)."""
        if self.limits.note(now, "refused (hashing queue full)", group):
            log.warning("refused sign-in from %s: the password-hashing queue is full (if this "
                        "is not an attack, raise --password-hash-threads or "
                        "--password-hash-queue); %s", group,
                        self._further("sign-in lockouts and refusals"))
            self._due.set()

    def flush(self, now: float) -> None:
        """Log the summaries due at ``now``."""
        summary = self.limits.flush(now)
        if summary is not None:
            log.warning("sign-in limits in the last %g s: %s; most from %s", self.interval,
                        summary.reasons(), summary.sources())
        summary = self.failures.flush(now)
        if summary is not None:
            log.info("%s in the last %g s; most from %s", _failures(summary), self.interval,
                     summary.sources())

    async def run(self) -> None:
        """Write the summaries as they fall due; runs as long as the API."""
        while True:
            await self._due.wait()
            self._due = trio.Event()
            while deadlines := [due for due in (self.limits.deadline, self.failures.deadline)
                                if due is not None]:
                await trio.sleep_until(min(deadlines))
                self.flush(trio.current_time())


def _failures(summary: BurstSummary) -> str:
    return f"{summary.count} more failed sign-ins"


def _clear_args(kind: str, key: str) -> str:
    return f"{kind} {key!a}" if kind != "address" else f"address {key}"


async def audit_lockout(fleet: Fleet, lockout: Lockout) -> None:
    """The audit row of a key's first lockout (a store failure is logged, not raised: the
    client's answer does not depend on it)."""
    try:
        await fleet.record_sign_in_lockout(lockout.kind, lockout.key, group=lockout.group,
                                           failures=lockout.failures, seconds=lockout.seconds)
    except OtaError as exc:
        log.error("could not write the audit row of the sign-in lockout of %s: %s",
                  shown(lockout.kind, lockout.key), exc)
