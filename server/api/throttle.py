"""Failed sign-in limits for ``/oauth/token``: per address group and per account, bounded.

Plain state, no I/O: the caller passes the time (``trio.current_time()`` in the API). An
attempt comes from an *address group* and, for the password and client-credentials grants,
names an *account* (``("user", name)`` or ``("client", client_id)``). The address group is
the one the device listeners count connections under (the most specific name
:func:`server.transport.admission.source_keys` gives): the IPv4 address, or the IPv6
``/ipv6_prefix_length`` network, since one host usually owns a whole /64 (RFC 4291 section
2.5.4) and could otherwise make every guess from a fresh address.

Address groups (Particle blocks an address for 30 minutes after 10 consecutive failed token
requests: docs, "API rate limits"):

* the ``max_failures_per_address``-th failure, and every one after it, locks the group for
  ``lockout_seconds``; a success from the group clears its failures ("consecutive");
* at most ``max_checks_per_address`` attempts of one group are checked at once, so one group
  holds at most that share of the password-hashing queue, however many addresses it has.

Accounts (OWASP Authentication Cheat Sheet, "Account Lockout": the failure counter belongs
to the account, not to an address, and the lockout must not become a way to lock owners
out):

* the last ``familiar_addresses`` groups an account signed in from successfully are
  *familiar* to it; the account's count ignores attempts from them (their group's own limit
  still applies), so guesses from elsewhere cannot lock the owner out of the places they
  sign in from (Microsoft Entra's smart lockout keeps familiar and unfamiliar locations
  apart likewise);
* failures from unfamiliar groups count. The ``max_failures_per_user``-th and every later one
  lock the account for unfamiliar groups, progressively (OWASP's exponential lockout):
  ``first_account_lockout_seconds``, doubling with each further failure, at most
  ``lockout_seconds``. Between two locks one attempt at a time is admitted;
* a correct password does not clear the account's failures (that would hand a guesser
  fresh guesses after each of the owner's sign-ins); time does, or an installation
  administrator (:meth:`LoginThrottle.clear`: ``DELETE /v1/sign-in-limits/:kind/:name``).

A key forgets its failures once ``lockout_seconds`` passed after both its last failure and
the end of its last lock. While its failures plus its attempts in flight reach its limit, new
attempts are refused before any password is hashed, so a burst of parallel guesses cannot
slip past the count. Failures against accounts that do not exist count like any other (the
caller cannot tell them apart, and must not let an attacker do so).

Memory is bounded: each kind of key keeps at most ``max_keys`` keys; when a table is full,
the eighth that matters least is dropped: fewest failures (with attempts in flight), then
least recently touched. So a key close to its limit outlives any number of keys far from it:
flushing it would take ``max_keys`` keys with more failures each, far more guesses than the
hashing pool checks in one ``lockout_seconds``. Familiar groups are kept for the ``max_keys``
accounts that signed in most recently.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass, field

from server.transport.admission import source_keys

#: Kinds of key: the address group, and the two kinds of account.
KINDS = ("address", "user", "client")
ACCOUNT_KINDS = ("user", "client")
#: Longest account name kept as a key (longer names are cut; they cannot sign in anyway).
MAX_KEY_LENGTH = 256


class TooManyAttemptsError(Exception):
    """An attempt refused by the throttle; ``retry_after`` seconds until it may be retried.
    ``kind`` and ``key`` name the limit that refused it; ``locked`` tells a lockout from
    too many attempts at once."""

    def __init__(self, message: str, retry_after: int, kind: str, key: str,
                 *, locked: bool) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.kind = kind
        self.key = key
        self.locked = locked


@dataclass(frozen=True)
class ThrottleLimits:
    """How many failures each kind of key may collect, how long lockouts last, and how much
    the throttle remembers (see the module docstring for the rules)."""

    max_failures_per_address: int = 10
    max_failures_per_user: int = 20
    #: An address group's lockout; the longest account lockout; how long a key stays quiet
    #: before its failures are forgotten.
    lockout_seconds: float = 1800.0
    #: The first account lockout; each further failure doubles it.
    first_account_lockout_seconds: float = 1.0
    #: Attempts of one address group checked at once (its share of the hashing queue).
    max_checks_per_address: int = 4
    #: Address groups remembered per account as familiar (0: none; the account limit then
    #: applies to every address).
    familiar_addresses: int = 8
    #: Keys kept per kind (address groups, user names, client ids) and accounts whose
    #: familiar groups are kept.
    max_keys: int = 10_000
    #: IPv6 addresses are grouped by this prefix (the device listeners' setting).
    ipv6_prefix_length: int = 64

    def __post_init__(self) -> None:
        if min(self.max_failures_per_address, self.max_failures_per_user,
               self.max_checks_per_address, self.max_keys) < 1:
            raise ValueError("sign-in failure limits, checks per address and tracked keys "
                             "must be at least 1")
        if self.lockout_seconds <= 0 or self.first_account_lockout_seconds <= 0:
            raise ValueError("lockout durations must be positive")
        if self.familiar_addresses < 0:
            raise ValueError("familiar_addresses must be 0 or more")
        if not 1 <= self.ipv6_prefix_length <= 128:
            raise ValueError("ipv6_prefix_length must be between 1 and 128")


@dataclass(frozen=True)
class Attempt:
    """An admitted attempt, to close with :meth:`LoginThrottle.failed`, ``succeeded`` or
    ``abandoned``."""

    #: The address group it came from.
    group: str
    #: ("user", name) or ("client", id); None for grants without an account.
    account: tuple[str, str] | None
    #: True when the group is familiar to the account (the account limit does not apply).
    familiar: bool

    def counted(self) -> list[tuple[str, str]]:
        """The (kind, key) pairs this attempt counts under."""
        keys = [("address", self.group)]
        if self.account is not None and not self.familiar:
            keys.append(self.account)
        return keys


@dataclass(frozen=True)
class Lockout:
    """A key locked by a failure."""

    kind: str
    key: str
    failures: int
    seconds: float
    #: The first lockout since the key's failures began (later ones extend it).
    first: bool
    #: The address group whose failure locked it.
    group: str


@dataclass(frozen=True)
class LimitState:
    """What the throttle holds for one key (for operators)."""

    kind: str
    key: str
    failures: int
    limit: int
    in_flight: int
    #: Seconds the key stays locked (0: not locked).
    locked_for: float


@dataclass
class _Entry:
    failures: int = 0
    in_flight: int = 0
    last_failure_at: float = -math.inf
    locked_until: float = -math.inf
    touched_at: float = 0.0


@dataclass
class _Table:
    limit: int
    max_keys: int
    #: Quiet time after which failures are forgotten.
    window: float
    entries: dict[str, _Entry] = field(default_factory=dict)

    def refresh(self, entry: _Entry, now: float) -> None:
        """Forget the failures of a key quiet for a whole window after its last lock."""
        if entry.failures and entry.locked_until <= now and \
                now - max(entry.last_failure_at, entry.locked_until) >= self.window:
            entry.failures = 0

    def get(self, key: str, now: float) -> _Entry | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.refresh(entry, now)
        if entry.failures == 0 and entry.in_flight == 0 and entry.locked_until <= now:
            del self.entries[key]
            return None
        return entry

    def touch(self, key: str, now: float) -> _Entry:
        entry = self.get(key, now)
        if entry is None:
            self._make_room(now)
            entry = self.entries[key] = _Entry()
        entry.touched_at = now
        return entry

    def _make_room(self, now: float) -> None:
        if len(self.entries) < self.max_keys:
            return
        # Drop the eighth that matters least (amortised: one sort per max_keys / 8 new keys).
        for entry in self.entries.values():
            self.refresh(entry, now)
        ranked = sorted(self.entries.items(),
                        key=lambda item: (item[1].failures + item[1].in_flight,
                                          item[1].touched_at))
        for key, _ in ranked[:max(1, self.max_keys // 8)]:
            del self.entries[key]


class _FamiliarGroups:
    """Per account, the address groups it last signed in from (bounded both ways)."""

    def __init__(self, per_account: int, max_accounts: int) -> None:
        self.per_account = per_account
        self.max_accounts = max_accounts
        self._groups: OrderedDict[tuple[str, str], OrderedDict[str, None]] = OrderedDict()

    def knows(self, account: tuple[str, str], group: str) -> bool:
        return group in self._groups.get(account, ())

    def add(self, account: tuple[str, str], group: str) -> None:
        if self.per_account == 0:
            return
        groups = self._groups.get(account)
        if groups is None:
            if len(self._groups) >= self.max_accounts:
                self._groups.popitem(last=False)  # the account that signed in longest ago
            groups = self._groups[account] = OrderedDict()
        self._groups.move_to_end(account)
        groups[group] = None
        groups.move_to_end(group)
        while len(groups) > self.per_account:
            groups.popitem(last=False)

    def __len__(self) -> int:
        return sum(len(groups) for groups in self._groups.values())


class LoginThrottle:
    """Counts failed sign-ins per address group and per account (see the module docstring)."""

    def __init__(self, limits: ThrottleLimits | None = None) -> None:
        self.limits = limits = limits or ThrottleLimits()
        window = limits.lockout_seconds
        self._tables = {
            "address": _Table(limits.max_failures_per_address, limits.max_keys, window),
            "user": _Table(limits.max_failures_per_user, limits.max_keys, window),
            "client": _Table(limits.max_failures_per_user, limits.max_keys, window),
        }
        self._familiar = _FamiliarGroups(limits.familiar_addresses, limits.max_keys)

    def group_of(self, host: str) -> str:
        """The address group ``host`` counts under (an IP address, or an IPv6 network
        written as ``net/len``, as :meth:`snapshot` shows them)."""
        if "/" in host:
            try:
                network = ipaddress.ip_network(host, strict=False)
            except ValueError:
                return host
            host = str(network.network_address)
        prefix = self.limits.ipv6_prefix_length
        return source_keys(host, prefix, prefix)[0]  # the IPv4 address or the IPv6 /prefix

    @staticmethod
    def account(kind: str, name: object) -> tuple[str, str] | None:
        """The account key of a user name or client id (None for a missing one)."""
        if isinstance(name, str) and name:
            return (kind, name[:MAX_KEY_LENGTH])
        return None

    def tracked(self) -> int:
        """How many entries the throttle holds (tests check it stays bounded)."""
        return sum(len(table.entries) for table in self._tables.values()) + len(self._familiar)

    # --- one attempt ---------------------------------------------------------------------------

    def begin(self, host: str, account: tuple[str, str] | None, now: float) -> Attempt:
        """Admit an attempt from ``host`` (counted in flight) or raise
        :class:`TooManyAttemptsError`."""
        group = self.group_of(host)
        familiar = account is not None and self._familiar.knows(account, group)
        attempt = Attempt(group, account, familiar)
        for kind, key in attempt.counted():
            table = self._tables[kind]
            entry = table.get(key, now)
            if entry is not None:
                self._admit(kind, key, table, entry, now)
        for kind, key in attempt.counted():
            self._tables[kind].touch(key, now).in_flight += 1
        return attempt

    def _admit(self, kind: str, key: str, table: _Table, entry: _Entry, now: float) -> None:
        if entry.locked_until > now:
            wait = max(1, math.ceil(entry.locked_until - now))
            raise TooManyAttemptsError(_locked_message(kind, wait), wait, kind, key, locked=True)
        # Below the limit: the failures still allowed; past it (between locks): one at a time.
        allowance = table.limit - entry.failures if entry.failures < table.limit else 1
        if kind == "address":
            allowance = min(allowance, self.limits.max_checks_per_address)
        if entry.in_flight >= allowance:
            raise TooManyAttemptsError(
                f"too many sign-in attempts at once {_from_or_for(kind)}; wait for the ones "
                "in progress to finish, then retry", 1, kind, key, locked=False)

    def failed(self, attempt: Attempt, now: float) -> list[Lockout]:
        """Record that an admitted attempt failed (wrong or unknown credentials); returns
        the lockouts this failure caused."""
        lockouts = []
        for kind, key in attempt.counted():
            table = self._tables[kind]
            entry = table.touch(key, now)
            entry.in_flight = max(0, entry.in_flight - 1)
            entry.failures += 1
            entry.last_failure_at = now
            if entry.failures >= table.limit:
                seconds = self._lockout_seconds(kind, entry.failures - table.limit)
                entry.locked_until = max(entry.locked_until, now + seconds)
                lockouts.append(Lockout(kind, key, entry.failures, seconds,
                                        entry.failures == table.limit, attempt.group))
        return lockouts

    def _lockout_seconds(self, kind: str, beyond: int) -> float:
        longest = self.limits.lockout_seconds
        if kind == "address":
            return longest
        return min(longest, self.limits.first_account_lockout_seconds * 2.0 ** min(beyond, 64))

    def succeeded(self, attempt: Attempt, now: float) -> None:
        """Close an attempt whose credentials were right: its group's failures are cleared
        (unless it is locked) and the group becomes familiar to the account."""
        self._close(attempt, now, clear_address=True)
        if attempt.account is not None:
            self._familiar.add(attempt.account, attempt.group)

    def abandoned(self, attempt: Attempt, now: float) -> None:
        """Close an attempt that got no verdict on its credentials (a malformed request, a
        full hashing queue, a disabled account): nothing is counted."""
        self._close(attempt, now, clear_address=False)

    def _close(self, attempt: Attempt, now: float, *, clear_address: bool) -> None:
        for kind, key in attempt.counted():
            table = self._tables[kind]
            entry = table.entries.get(key)
            if entry is None:
                continue
            entry.in_flight = max(0, entry.in_flight - 1)
            if clear_address and kind == "address" and entry.locked_until <= now:
                entry.failures = 0
            table.get(key, now)  # drop it if nothing is left

    # --- operators -----------------------------------------------------------------------------

    def snapshot(self, now: float) -> list[LimitState]:
        """Every key with failures or a lock, locked ones first, then by failures."""
        found = []
        for kind, table in self._tables.items():
            for key in list(table.entries):
                entry = table.get(key, now)
                if entry is None or (entry.failures == 0 and entry.locked_until <= now):
                    continue
                found.append(LimitState(kind, key, entry.failures, table.limit,
                                        entry.in_flight, max(0.0, entry.locked_until - now)))
        found.sort(key=lambda state: (state.locked_for > 0, state.failures), reverse=True)
        return found

    def key_of(self, kind: str, name: str) -> str:
        """The key ``name`` counts under: an address's group, or the account name."""
        if kind not in self._tables:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        return self.group_of(name) if kind == "address" else name[:MAX_KEY_LENGTH]

    def held(self, kind: str, name: str, now: float) -> LimitState | None:
        """What the throttle holds for one key (an address, IPv6 network, user name or
        client id): None without failures or a lockout."""
        key = self.key_of(kind, name)
        table = self._tables[kind]
        entry = table.get(key, now)
        if entry is None or (entry.failures == 0 and entry.locked_until <= now):
            return None
        return LimitState(kind, key, entry.failures, table.limit, entry.in_flight,
                          max(0.0, entry.locked_until - now))

    def clear(self, kind: str, name: str, now: float) -> LimitState | None:
        """Forget the failures and lockout of one key; returns what was held (None when
        nothing was). Its familiar address groups stay."""
        state = self.held(kind, name, now)
        if state is None:
            return None
        table = self._tables[kind]
        entry = table.entries[state.key]
        entry.failures = 0
        entry.locked_until = -math.inf
        table.get(state.key, now)  # drop it unless attempts are in flight
        return state


def noun(kind: str) -> str:
    """How messages name a kind of key."""
    return {"address": "address", "user": "account", "client": "OAuth client"}[kind]


def _from_or_for(kind: str) -> str:
    return "from this address" if kind == "address" else f"for this {noun(kind)}"


def _duration(seconds: int) -> str:
    return f"{seconds} seconds" if seconds < 120 else f"{math.ceil(seconds / 60)} minutes"


def _locked_message(kind: str, wait: int) -> str:
    if kind == "address":
        return (f"too many failed sign-in attempts from this address; try again in "
                f"{_duration(wait)}, after checking the user name and password (or client id "
                "and secret)")
    return (f"too many failed sign-in attempts for this {noun(kind)} from addresses it has "
            f"not signed in from before; try again in {_duration(wait)}, sign in from an "
            "address you used before, or ask an installation administrator to clear the "
            "limit (ota admin sign-in-limits clear)")
