"""The delivery policy of one device session, sans-IO: what the server does next.

Beside :class:`~otacore.transfer.sender.TransferSender` (which moves one file), the
planner decides which file moves, when and how. It is fed facts (what the device reports,
the target the precedence rules chose, what it holds, what it refused, what is in flight,
``now``) and answers with plain decisions; it never touches a socket, a clock, a thread or
the store. The Trio shell (``server.devices.updater``) gathers the facts and carries the
decisions out. The rules:

- Tell the device whether the cloud forces updates, once per change (Particle: a device
  with updates disabled refuses offers unless forced; particle-facts.md).
- Nothing to do without a needed update, while an image is staged or a held reset waits,
  or before the device's modules are known; updates disabled and not forced: tell the
  device an update is pending instead of offering it.
- Device OS parts the application depends on go first, each after the parts it depends
  on, each the oldest stored version that satisfies every need of its slot and never one
  that is not newer than what the device runs (no Device OS downgrade); then the
  application (:mod:`otacore.transfer.module_plan`).
- One module per check: the device resets into it and its next session continues. A
  module the device already runs is skipped; one it refused or rolled back from stops the
  update (until an operator flashes it anew).
- The file that travels: a delta against the image the device runs in that slot, else
  the image zstd-compressed for a device that inflates them, else the image itself; an
  encoded file the device refuses (its offer, or a patch it cannot apply) falls back to
  the next, in the same session.
- One transfer per device at a time; a timed-out transfer is retried (pausing, doubling)
  while attempts are left, and the device resumes from the chunks it holds; when every
  attempt timed out while the session lives, offer again later (doubling, bounded).
- A transfer of an application that is no longer what the device should get is
  cancelled when the shell reads the target anew mid-transfer (an immediate release, a
  flash, a lock with "flash now": whatever kicks a check).
- The first session after a delivery waits (once) for the device's update result, unless
  the image is still staged behind a held reset.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Container, Mapping
from dataclasses import dataclass
from enum import StrEnum

from otacore.errors import ValidationError
from otacore.module import ModuleInfo
from otacore.transfer.messages import TransferStatus
from otacore.transfer.module_plan import (
    CannotPlan,
    DeliveryPlanInputError,
    InstalledModule,
    ModulePlan,
)


class DeliveryPlanStateError(ValidationError):
    """The planner was asked to do something its state forbids (a second transfer to a
    device while one is in flight, ending a transfer that is not in flight)."""


class DowngradePolicy(StrEnum):
    """When the server signs a downgrade authorisation (otacore.downgrade) for a device
    whose target is an older application than the one it has run."""

    #: Whenever the device's target says so: a lock, a flash, an unlock back to a release,
    #: or a release of an older version (rolling a bad release back).
    TARGETED = "targeted"
    #: Only for an operator's choice for that one device: a lock or a flash (a release of
    #: an older version does not take devices down).
    DEVICE = "device"
    #: Never: no application ever goes down a version over the air.
    NEVER = "never"

    @classmethod
    def parse(cls, value: object) -> DowngradePolicy:
        """The policy named ``value``; ValidationError naming the choices otherwise."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value if isinstance(value, str) else "")
        except ValueError:
            choices = ", ".join(policy.value for policy in cls)
            raise ValidationError(
                f"unknown downgrade policy {value!r}; choose one of {choices}"
            ) from None


@dataclass(frozen=True)
class DeliveryPolicy:
    """The settings the planner applies (``ota server`` builds them from ``OtaConfig``)."""

    #: Transfers of one module tried per check when the device stops acknowledging.
    transfer_attempts: int = 3
    #: Seconds before the first retry of a timed-out transfer (doubling after each).
    retry_pause: float = 2.0
    #: Seconds before offering again when every attempt timed out (doubling, up to max).
    retry_later: float = 30.0
    retry_later_max: float = 300.0
    #: Firmware bytes per chunk over TLS, and over DTLS unless the device asks for less.
    tcp_chunk_size: int = 8192
    udp_chunk_size: int = 1024
    #: Which older applications the server authorises.
    downgrades: DowngradePolicy = DowngradePolicy.TARGETED
    #: At most one progress write per this many seconds per transfer.
    progress_interval: float = 1.0

    def __post_init__(self) -> None:
        if self.transfer_attempts < 1:
            raise DeliveryPlanInputError(
                f"transfer_attempts must be at least 1, not {self.transfer_attempts}")
        for name in ("retry_pause", "retry_later", "retry_later_max", "progress_interval"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise DeliveryPlanInputError(
                    f"{name} must be a positive number of seconds, not {value!r}")
        if self.retry_later_max < self.retry_later:
            raise DeliveryPlanInputError(
                f"retry_later_max ({self.retry_later_max}) must be at least retry_later "
                f"({self.retry_later})")
        for name in ("tcp_chunk_size", "udp_chunk_size"):
            if getattr(self, name) < 1:
                raise DeliveryPlanInputError(f"{name} must be at least 1 byte")
        object.__setattr__(self, "downgrades", DowngradePolicy.parse(self.downgrades))


# -- facts in ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetFacts:
    """What the device's target says, as the shell read it (precedence's outcome, the
    pending flash, the device's reported state)."""

    #: A pending flash, or a target version other than the one the device runs.
    update_needed: bool
    #: Updates enabled on the device, or forced by the cloud.
    updates_allowed: bool
    updates_forced: bool
    #: The device holds a reset with an image staged.
    reset_pending: bool
    #: What the device reported (empty: nothing known yet).
    modules: tuple[InstalledModule, ...]
    #: SHA-256 of the application to deliver: the pending flash's, else the target
    #: release's (None: the target firmware is missing).
    target_sha256: str | None


@dataclass(frozen=True)
class Delivery:
    """An image a device validated and is about to boot (or booted without reporting yet)."""

    sha256: str
    #: True for the last module of its update (the application); False for a Device OS
    #: module sent ahead of it, whose success is a step, not the end, of the update.
    final: bool
    #: Serial of the session that delivered it (sessions are numbered as they start).
    session: int
    #: True once a later session waited for its result (each delivery costs one wait).
    awaited: bool = False


# -- decisions out ----------------------------------------------------------------------------


class IdleReason(StrEnum):
    """Why a check ends without an offer."""

    UP_TO_DATE = "no update needed"
    STAGED = "an image is staged in this session"
    MODULES_UNKNOWN = "the device's modules are not known yet"
    RESET_PENDING = "an image waits for the device's held reset"
    REFUSED = "the device refused or rolled back from this image"
    ALREADY_RUNS = "the device runs every planned module"


@dataclass(frozen=True)
class TellForced:
    """Tell the device whether the cloud forces updates."""

    forced: bool


@dataclass(frozen=True)
class Idle:
    """Nothing to offer now."""

    reason: IdleReason


@dataclass(frozen=True)
class AnnouncePending:
    """Updates are disabled on the device and not forced: tell it an update is pending."""


@dataclass(frozen=True)
class PlanModules:
    """Plan the modules that bring the device to ``target_sha256``
    (:func:`otacore.transfer.module_plan.plan_modules`)."""

    target_sha256: str


@dataclass(frozen=True)
class Offer:
    """Offer this module; ``update_sha256`` is the application the update ends with."""

    sha256: str
    function: int
    index: int
    update_sha256: str

    @property
    def final(self) -> bool:
        """True for the application itself (the update's last module)."""
        return self.sha256 == self.update_sha256


class Encoding(StrEnum):
    """How a module travels (the device_updates and release counters' names)."""

    DELTA = "delta"
    ZSTD = "zstd"
    FULL = "full"


@dataclass(frozen=True)
class FileChoice:
    """One way to send a module, in the order to try; ``base_sha256`` for a delta."""

    encoding: Encoding
    base_sha256: str | None = None


class OfferAnswer(StrEnum):
    """How the device answered an offer."""

    ACCEPTED = "accepted"
    UNAVAILABLE = "unavailable"  # updates disabled on the device (it said so)
    REFUSED = "refused"


class Verdict(StrEnum):
    """What follows an offer's answer or a failed transfer."""

    STREAM = "stream"  # accepted: run the transfer
    DISABLE_UPDATES = "disable updates"  # record updates disabled; no failure
    FALL_BACK = "fall back"  # an encoded file refused: offer the next file now
    REFUSE_IMAGE = "refuse image"  # never offer this image again; the update failed
    RETRY = "retry"  # timed out with attempts left: the same update goes on
    FAILED = "failed"  # the update failed


@dataclass(frozen=True)
class InFlight:
    """The transfer running to the device."""

    offer: Offer
    encoding: Encoding
    started_at: float


@dataclass(frozen=True)
class CancelTransfer:
    """Cancel the transfer in flight: what it delivers is no longer wanted."""

    reason: str


#: Failures of a delta or compressed transfer after which the plain image is sent instead:
#: the device took the whole patch or frame but could not rebuild the image from it (a base
#: that differs from what it reported, a zstd window larger than its RAM).
#: The delta patch format a device whose Hello names none is taken to read
#: (otacore.messages.Hello.delta_format): the newest before devices named theirs.
UNNAMED_DELTA_FORMAT = 4
#: The oldest delta patch format the server makes (otacore.delta_maker.MAKEABLE_VERSIONS):
#: a device whose applier reads only older ones gets no delta.
OLDEST_MADE_DELTA_FORMAT = 2


def delta_format_for(named: int | None, configured: int) -> int:
    """The newest delta patch format to make for a device: the server's ``configured``
    one (delivery.delta_format_version), or the older one its Hello ``named``
    (UNNAMED_DELTA_FORMAT when it named none)."""
    return min(configured, UNNAMED_DELTA_FORMAT if named is None else named)


FALL_BACK_STATUSES = frozenset({TransferStatus.BAD_BASE, TransferStatus.REJECTED})


# -- the planner of one session -----------------------------------------------------------------

#: "Never" on the trio clock: one float shared by every planner, not two per session.
_NEVER = -math.inf


class DeliveryPlanner:
    """The delivery policy of one device session: its decisions and the little state they
    need (what the device was told, whether an image is staged, the transfer in flight,
    how many updates in a row timed out)."""

    # One per live session (issue 14 item 4: slots save its dict, ~100 bytes).
    __slots__ = ("in_flight", "invalidated_at", "policy", "progress_recorded_at",
                 "session_serial", "staged", "store_failures", "timed_out_updates",
                 "told_forced")  # fmt: skip

    def __init__(self, policy: DeliveryPolicy, session_serial: int) -> None:
        self.policy = policy
        #: Sessions are numbered in the order they start (a delivery names its session).
        self.session_serial = session_serial
        #: What the device was told about forced updates (None: nothing yet; a device
        #: boots not forced).
        self.told_forced: bool | None = None
        #: True once the device validated an image in this session: it applies it at its
        #: (possibly held) reset, and its next session continues the update.
        self.staged = False
        #: The transfer running to the device (one at a time).
        self.in_flight: InFlight | None = None
        #: Updates in a row whose every attempt timed out (see after_check).
        self.timed_out_updates = 0
        #: Checks in a row that a store error ended (see after_store_error).
        self.store_failures = 0
        #: When transfer progress was last recorded (see record_progress).
        self.progress_recorded_at = _NEVER
        #: When a kick last asked for the target to be read anew (see carried_view_usable).
        self.invalidated_at = _NEVER

    # settling --------------------------------------------------------------------------------

    def must_await_result(self, delivery: Delivery | None, *, reset_pending: bool) -> bool:
        """Wait (once per delivery) for the device's update result before planning, so an
        image it rolled back from is not offered again: in the first session after the
        delivery, unless the image is still staged behind a held reset (a device that never
        staged it, or reports no results, must not hold up every later session)."""
        return (delivery is not None and not delivery.awaited
                and delivery.session < self.session_serial and not reset_pending)

    def invalidate(self, now: float) -> None:
        """Something changed (a flash, a lock, forced updates, a Hello): a view of the
        target read before ``now`` is stale."""
        self.invalidated_at = now

    def carried_view_usable(self, read_at: float, *, described_at: float | None,
                            describe: bool) -> bool:
        """Whether to plan from a view of the target the caller read from ``read_at`` (a
        release's one read of every online device, or, ``describe``, the Describe's own
        transaction) instead of reading it again: not when the read began before a change
        that asked for a new read, nor when it may predate this session's Describe
        (``described_at``; its modules could be those of the image the device left)."""
        predates_describe = not describe and (described_at is None or described_at > read_at)
        return not (read_at < self.invalidated_at or predates_describe)

    # one check of the target -----------------------------------------------------------------

    def forced_notice(self, forced: bool) -> TellForced | None:
        """Whether to tell the device about forced updates now: once per change, and at the
        first check of a session only when forced (a device boots not forced). Call
        :meth:`told` once the device was told."""
        if self.told_forced is None and not forced:
            self.told_forced = False  # its default
            return None
        return TellForced(forced) if self.told_forced != forced else None

    def told(self, notice: TellForced) -> None:
        """The device was told ``notice``."""
        self.told_forced = notice.forced

    def check(self, facts: TargetFacts) -> Idle | AnnouncePending | CannotPlan | PlanModules:
        """What a check of the device's target leads to (after :meth:`forced_notice`)."""
        if not facts.update_needed:
            return Idle(IdleReason.UP_TO_DATE)
        if self.staged:
            return Idle(IdleReason.STAGED)
        if not facts.modules:
            return Idle(IdleReason.MODULES_UNKNOWN)  # its Describe will kick again
        if facts.reset_pending:
            return Idle(IdleReason.RESET_PENDING)
        if not facts.updates_allowed:
            return AnnouncePending()
        if facts.target_sha256 is None:
            return CannotPlan("the target firmware is missing")
        return PlanModules(facts.target_sha256)

    def next_offer(self, plan: ModulePlan, parts: Mapping[str, ModuleInfo],
                   facts: TargetFacts, refused: Collection[str]) -> Offer | Idle:
        """The one module to offer now (the device resets into it; its next session
        continues): the first planned module it does not already run, unless it refused
        or rolled back from that or an earlier one of the plan."""
        running = {m.slot: m.sha256 for m in facts.modules}
        for sha256 in plan.sha256s:
            if sha256 in refused:
                return Idle(IdleReason.REFUSED)
            info = parts[sha256]
            slot = (info.module_function, info.module_index)
            if running.get(slot) == sha256:
                continue  # already runs exactly this image
            return Offer(sha256, info.module_function, info.module_index, plan.update_sha256)
        return Idle(IdleReason.ALREADY_RUNS)

    # the file that travels ---------------------------------------------------------------

    def file_choices(self, offer: Offer, facts: TargetFacts, *, compressed_ota: bool,
                     delta_refused: Container[tuple[str, str]],
                     zstd_refused: Container[str],
                     delta_format: int | None = None) -> tuple[FileChoice, ...]:
        """The files to try for ``offer``, best first: a delta against the image the device
        runs in the slot (when it reported one, it differs, the device did not refuse that
        patch and reads a format the server makes: ``delta_format``, from
        :func:`delta_format_for`, None for any), the image zstd-compressed (for a device
        announcing compressed OTA that did not refuse it), the image itself. The shell skips
        a choice it cannot make (an unknown base, a patch or frame that saves too little)."""
        choices: list[FileChoice] = []
        base = {m.slot: m.sha256 for m in facts.modules}.get((offer.function, offer.index), "")
        readable = delta_format is None or delta_format >= OLDEST_MADE_DELTA_FORMAT
        if (len(base) == 64 and base != offer.sha256 and readable
                and (base, offer.sha256) not in delta_refused):
            choices.append(FileChoice(Encoding.DELTA, base))
        if compressed_ota and offer.sha256 not in zstd_refused:
            choices.append(FileChoice(Encoding.ZSTD))
        choices.append(FileChoice(Encoding.FULL))
        return tuple(choices)

    def chunk_size(self, transport: str, device_chunk_size: int | None) -> int:
        """Chunk size of a transfer: the TLS one, or over DTLS the size the device asked
        for in its Hello (one chunk per datagram it can take), else the DTLS default."""
        if transport == "tcp":
            return self.policy.tcp_chunk_size
        return device_chunk_size or self.policy.udp_chunk_size

    def record_progress(self, bytes_acked: int, total: int, now: float) -> bool:
        """Whether to record this transfer progress: at most once per progress_interval
        (progress is for people watching), and never the final bytes (the end of the
        transfer is recorded as "applying")."""
        if bytes_acked >= total or now - self.progress_recorded_at < self.policy.progress_interval:
            return False
        self.progress_recorded_at = now
        return True

    # outcomes ------------------------------------------------------------------------------

    def on_offer_answer(self, answer: OfferAnswer, encoding: Encoding) -> Verdict:
        """What follows the device's answer to an offer of ``encoding``."""
        if answer is OfferAnswer.ACCEPTED:
            return Verdict.STREAM
        if answer is OfferAnswer.UNAVAILABLE:
            return Verdict.DISABLE_UPDATES
        # Refused: an encoded file may be what it cannot take (its base is not what it
        # reported, or it takes no deltas or compressed images); the plain image decides.
        return Verdict.FALL_BACK if encoding is not Encoding.FULL else Verdict.REFUSE_IMAGE

    def on_transfer_failed(self, status: TransferStatus, encoding: Encoding, *,
                           attempt: int) -> Verdict:
        """What follows a failed transfer (``attempt`` counts from 0): fall back from an
        encoded file the device could not rebuild; retry a timed-out transfer while
        attempts are left (the same update goes on and resumes); else the update failed."""
        if encoding is not Encoding.FULL and status in FALL_BACK_STATUSES:
            return Verdict.FALL_BACK
        if status is TransferStatus.TIMEOUT and self.attempts_left(attempt):
            return Verdict.RETRY
        return Verdict.FAILED

    def attempts_left(self, attempt: int) -> bool:
        """True when another attempt may follow attempt number ``attempt`` (from 0)."""
        return attempt + 1 < self.policy.transfer_attempts

    def retry_pause(self, attempt: int) -> float:
        """Seconds to pause before attempt number ``attempt`` (>= 1) of a timed-out
        transfer: the device stopped acknowledging though its session lives (lost
        datagrams, a congested cell)."""
        return self.policy.retry_pause * 2 ** (attempt - 1)

    def after_check(self, last_failure: TransferStatus | None) -> float | None:
        """After a check: the seconds to wait before checking again when every attempt of
        its transfer timed out while the session lives (doubling per such update, up to
        retry_later_max), else None (and the count starts again)."""
        self.store_failures = 0
        if last_failure is not TransferStatus.TIMEOUT:
            self.timed_out_updates = 0
            return None
        policy = self.policy
        delay = min(policy.retry_later * 2 ** self.timed_out_updates, policy.retry_later_max)
        self.timed_out_updates += 1
        return delay

    def after_store_error(self) -> float:
        """After a check that a store error ended (the database locked, unreachable, or a
        write collided with another node's): the seconds before checking again, from
        retry_pause doubling per such check in a row up to retry_later_max. The device's
        session lives on and the error is the server's: it must still be offered its
        update, without hammering a database that is away."""
        policy = self.policy
        delay = min(policy.retry_pause * 2 ** self.store_failures, policy.retry_later_max)
        self.store_failures += 1
        return delay

    # the transfer in flight -----------------------------------------------------------------

    def transfer_started(self, offer: Offer, encoding: Encoding, now: float) -> InFlight:
        """Record the transfer of ``offer`` beginning at ``now``; a second transfer while
        one is in flight is refused (DeliveryPlanStateError)."""
        if self.in_flight is not None:
            raise DeliveryPlanStateError(
                f"a transfer of {self.in_flight.offer.sha256[:12]} is in flight; end it before "
                f"starting one of {offer.sha256[:12]}")
        self.in_flight = InFlight(offer, encoding, now)
        return self.in_flight

    def transfer_ended(self, *, staged: bool) -> None:
        """The transfer in flight ended; ``staged`` when the device validated the image."""
        if self.in_flight is None:
            raise DeliveryPlanStateError("no transfer is in flight")
        self.in_flight = None
        if staged:
            self.staged = True

    def stale(self, facts: TargetFacts) -> CancelTransfer | None:
        """Whether the transfer in flight should stop, now that the target reads ``facts``
        (a release, a lock change, a flash or a development flag arrived mid-transfer).

        An application transfer stops when the device no longer needs an update (its
        target is now what it runs, or none) or its target is now another image. A Device
        OS part ahead of an application goes on: it is never a downgrade, and the next
        check plans from the new target with the part in place."""
        in_flight = self.in_flight
        if in_flight is None or not in_flight.offer.final:
            return None
        if not facts.update_needed:
            return CancelTransfer("the device no longer needs an update (its target changed)")
        if facts.target_sha256 is not None and facts.target_sha256 != in_flight.offer.sha256:
            return CancelTransfer(
                f"superseded: the device's target is now {facts.target_sha256[:12]}")
        return None


# -- downgrades ---------------------------------------------------------------------------------


def downgrade_needs_authorization(policy: DowngradePolicy, *, application: bool,
                                  per_device: bool, target_version: int,
                                  device_version: int) -> bool:
    """True when the server should sign the device a downgrade authorisation: the target
    is an application older than the one the device has run (its version and anti-rollback
    floor), and the policy allows it (``device``: only for a pending flash or a lock,
    ``per_device``; ``targeted``: any target; ``never``: none). Without one the device
    refuses the older application (otacore.downgrade)."""
    if not application:
        return False
    if policy is DowngradePolicy.NEVER or (policy is DowngradePolicy.DEVICE and not per_device):
        return False
    return target_version < device_version
