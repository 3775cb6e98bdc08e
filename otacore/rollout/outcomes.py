"""Per-device outcomes of a rollout and the counts built from them.

Each failure kind of issue 15 is its own status, so a rollback after boot is never
reported as a success (the AWS complaint) and each kind stays separately visible.
A device's status is its latest outcome; ``failures`` counts every failure it had.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from otacore.rollout.errors import RolloutOutcomeError


class Outcome(StrEnum):
    """What a device reported (or what the rollout concluded) for the rollout's firmware."""

    OFFERED = "offered"
    DOWNLOADING = "downloading"
    #: The image is complete and the device is rebooting into it: its reboot timeout runs.
    REBOOTING = "rebooting"
    SUCCEEDED = "succeeded"
    #: The transfer failed, or the device refused the download.
    DOWNLOAD_FAILED = "download_failed"
    #: The device refused the image (signature, dependencies).
    IMAGE_REFUSED = "image_refused"
    #: The new image booted, failed its self-test, and the device went back.
    ROLLED_BACK = "rolled_back"
    #: The device did not come back within the reboot timeout.
    TIMED_OUT = "timed_out"


#: The failure kinds thresholds count (each separately).
FAILURES = frozenset(
    {Outcome.DOWNLOAD_FAILED, Outcome.IMAGE_REFUSED, Outcome.ROLLED_BACK, Outcome.TIMED_OUT}
)
#: Statuses of a device with the firmware on its way.
IN_FLIGHT = frozenset({Outcome.OFFERED, Outcome.DOWNLOADING, Outcome.REBOOTING})
#: Statuses that finish an attempt (what a threshold's sample counts).
FINISHED = FAILURES | {Outcome.SUCCEEDED}

#: Status names in the order counts are shown; ``pending`` has no outcome yet.
STATUS_NAMES = ("pending", *(o.value for o in Outcome))


def parse_outcome(value: object) -> Outcome:
    """An :class:`Outcome` from its name, or an error listing the names."""
    try:
        return Outcome(str(value))
    except ValueError:
        names = ", ".join(o.value for o in Outcome)
        raise RolloutOutcomeError(f"unknown outcome {value!r}; use one of: {names}") from None


@dataclass
class DeviceProgress:
    """One device's state in a rollout: its phase, latest outcome, failures and hold."""

    phase: int
    status: Outcome | None = None
    failures: int = 0
    #: Epoch ms until which the device gets no new offer (per-device back-off); 0: none.
    held_until: int = 0
    #: Epoch ms of the latest outcome (the reboot timeout counts from a REBOOTING one).
    changed_at: int = 0

    def held(self, now: int) -> bool:
        """True while the back-off holds the device."""
        return self.held_until > now

    def to_list(self) -> list[object]:
        """Compact form: [phase, status or None, failures, held_until, changed_at]."""
        status = None if self.status is None else self.status.value
        return [self.phase, status, self.failures, self.held_until, self.changed_at]

    @classmethod
    def from_list(cls, data: object) -> DeviceProgress:
        """The inverse of :meth:`to_list`."""
        if not isinstance(data, list | tuple) or len(data) != 5:
            raise RolloutOutcomeError(f"malformed device progress {data!r}")
        phase, status, failures, held_until, changed_at = data
        ints = (phase, failures, held_until, changed_at)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
            raise RolloutOutcomeError(f"malformed device progress {data!r}")
        return cls(
            phase, None if status is None else parse_outcome(status), failures, held_until,
            changed_at,
        )


@dataclass
class Counts:
    """Devices by status (exclusive: they add up to ``members``), plus ``held_off`` (failed
    devices the back-off holds now, a subset of the failures) and ``failures_total``
    (every failure reported, retries included)."""

    by_status: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUS_NAMES, 0))
    held_off: int = 0
    failures_total: int = 0

    @property
    def members(self) -> int:
        """Devices counted (the phase's or rollout's target devices)."""
        return sum(self.by_status.values())

    @property
    def failed(self) -> int:
        """Devices whose latest outcome is a failure of any kind."""
        return sum(self.by_status[o.value] for o in FAILURES)

    @property
    def finished(self) -> int:
        """Devices whose latest outcome finished an attempt (succeeded or failed)."""
        return self.failed + self.by_status[Outcome.SUCCEEDED.value]

    def add(self, progress: DeviceProgress | None, now: int) -> None:
        """Count one device (None: no progress yet, i.e. pending)."""
        if progress is None or progress.status is None:
            self.by_status["pending"] += 1
            return
        self.by_status[progress.status.value] += 1
        self.failures_total += progress.failures
        if progress.status in FAILURES and progress.held(now):
            self.held_off += 1

    def to_dict(self) -> dict[str, int]:
        """Flat counts for an API: every status, ``failed``, ``held_off``, ``total``."""
        return {
            **self.by_status,
            "failed": self.failed,
            "held_off": self.held_off,
            "failures_total": self.failures_total,
            "total": self.members,
        }


def count(
    devices: Iterable[str], progress: Mapping[str, DeviceProgress], now: int
) -> Counts:
    """Counts over ``devices`` (each counted once)."""
    counts = Counts()
    for device in devices:
        counts.add(progress.get(device), now)
    return counts


@dataclass(frozen=True)
class RolloutCounts:
    """Counts per phase (index = phase) and over every target device."""

    phases: tuple[Counts, ...]
    total: Counts

    def to_dict(self) -> dict[str, object]:
        """Flat counts: ``{"total": {...}, "phases": [{...}, ...]}``."""
        return {
            "total": self.total.to_dict(),
            "phases": [c.to_dict() for c in self.phases],
        }
