"""The saved form of a rollout's state (:meth:`Rollout.to_dict` / :meth:`Rollout.from_dict`).

Format 2 holds the rollout-level state only (state, phases opened and met, rate limit,
acknowledged thresholds...) and, for light restores, the tally (target devices by phase and
status), the target count and the devices with progress it does not count: a few hundred
bytes whatever the number of devices (the tally has a few entries per phase; the devices
not counted are those that left the target set). Each device's progress (phase, latest
outcome, failures, hold) is stored by the caller, one row per device, and only the rows
that changed are written (:meth:`Rollout.take_changed`). Format 1, written before, also
held every device's progress; it is still read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING

from otacore.rollout.errors import RolloutFormatError
from otacore.rollout.events import EventKind, State
from otacore.rollout.outcomes import DeviceProgress
from otacore.rollout.policy import Policy

if TYPE_CHECKING:
    from otacore.rollout.rollout import Rollout

#: Version of the format :func:`dump` writes.
FORMAT_VERSION = 2
#: Most devices outside the target set a state lists (see :func:`_uncounted`).
MAX_UNCOUNTED = 1000
#: Versions :func:`load` reads.
READABLE_FORMATS = (1, 2)
#: Events a light machine (``Rollout.from_dict(light=True)``) may decide by itself: they
#: concern only the device it was given, or the rate limit's own state. Any other asks
#: for a full load.
LIGHT_EVENTS = frozenset({EventKind.DEVICE_HELD, EventKind.DEVICE_TIMED_OUT,
                          EventKind.RATE_INCREASED})


def dump(rollout: Rollout) -> dict[str, object]:
    """The rollout-level state as a compact msgpack/JSON-able dict (no device's progress,
    no target set)."""
    return {
        "v": FORMAT_VERSION,
        "id": rollout.id,
        "policy": rollout.policy.to_dict(),
        "created_at": rollout.created_at,
        "state": rollout.state.value,
        "reason": rollout.reason,
        "opened_at": list(rollout.opened_at),
        "met_at": list(rollout.met_at),
        "recent_offers": list(rollout.recent_offers),
        "rate": rollout.rate,
        "since_increase": [rollout.offered_since_increase, rollout.succeeded_since_increase],
        "acknowledged": dict(rollout.acknowledged),
        "aborted_at": rollout.aborted_at,
        # What light restores count with (Rollout.from_dict): the target set's size, the
        # tally (target devices by phase and status) and the devices it does not count.
        # A light machine carries forward what its full load saved.
        "targets": rollout.saved_targets if rollout.light else len(rollout.targets),
        "tally": [[phase, {k: n for k, n in sorted(counter.items()) if n}]
                  for phase, counter in sorted(rollout._tally.items(),
                                               key=lambda item: -1 if item[0] is None
                                               else item[0])
                  if any(counter.values())],
        "uncounted": rollout.uncounted if rollout.light else _uncounted(rollout),
    }


def _uncounted(rollout: Rollout) -> list[str] | None:
    """The devices with progress outside the target set, None when more than
    :data:`MAX_UNCOUNTED` (the state stays small; light restores are then refused until
    a full save finds fewer)."""
    left = [d for d in rollout.devices if d not in rollout.targets]
    return None if len(left) > MAX_UNCOUNTED else sorted(left)


def saved_tally(data: Mapping[str, object]) -> dict[int | None, Counter[str]]:
    """The tally a state of format 2 saved (for a light restore)."""
    if "tally" not in data:
        raise RolloutFormatError("this rollout state has no saved tally: load it in full")
    try:
        return {None if phase is None else int(phase): Counter(
                    {str(k): int(n) for k, n in counts.items()})
                for phase, counts in data["tally"]}  # type: ignore[attr-defined]
    except (TypeError, ValueError, AttributeError) as exc:
        raise RolloutFormatError(f"malformed rollout tally: {exc!r}") from None


def load(cls: type[Rollout], data: Mapping[str, object],
         progress: Mapping[str, DeviceProgress] | None) -> Rollout:
    """A rollout from :func:`dump`'s dict and its devices' stored ``progress`` (a format 1
    dict's own devices win over it and count as changed: the next save stores them); the
    caller sets the target set."""
    if not isinstance(data, Mapping) or data.get("v") not in READABLE_FORMATS:
        version = data.get("v") if isinstance(data, Mapping) else None
        raise RolloutFormatError(
            f"rollout state of format {version!r}; this server reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}"
        )
    try:
        rollout = cls(
            str(data["id"]),
            Policy.from_dict(data["policy"]),  # type: ignore[arg-type]
            int(data["created_at"]),  # type: ignore[call-overload]
        )
        rollout.state = State(str(data["state"]))
        reason = data["reason"]
        rollout.reason = None if reason is None else str(reason)
        rollout.opened_at = [int(t) for t in data["opened_at"]]  # type: ignore[attr-defined]
        met = [None if t is None else int(t) for t in data["met_at"]]  # type: ignore[attr-defined]
        rollout.devices = dict(progress or {})
        rollout.stored = set(rollout.devices)
        if data["v"] == 1:  # every device's progress inside the state
            legacy = {
                str(d): DeviceProgress.from_list(p)
                for d, p in data["devices"].items()  # type: ignore[attr-defined]
            }
            rollout.devices.update(legacy)
            rollout.changed = set(legacy)
        rollout.recent_offers = [int(t) for t in data["recent_offers"]]  # type: ignore[attr-defined]
        rate = data["rate"]
        rollout.rate = None if rate is None else int(rate)  # type: ignore[call-overload]
        since: list[int] = [int(n) for n in data["since_increase"]]  # type: ignore[attr-defined]
        rollout.offered_since_increase, rollout.succeeded_since_increase = since
        acks = data["acknowledged"]
        rollout.acknowledged = {str(k): int(v) for k, v in acks.items()}  # type: ignore[attr-defined]
        saved_targets = data.get("targets")  # absent before format 2
        rollout.saved_targets = None if saved_targets is None else int(saved_targets)  # type: ignore[call-overload]
        uncounted = data.get("uncounted", ())
        rollout.uncounted = (None if uncounted is None
                             else [str(d) for d in uncounted])  # type: ignore[attr-defined]
        aborted_at = data.get("aborted_at")  # absent in states saved before it existed
        rollout.aborted_at = None if aborted_at is None else int(aborted_at)  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RolloutFormatError(f"malformed rollout state: {exc!r}") from None
    phases = len(rollout.policy.plan.phases)
    if len(met) != phases or len(rollout.opened_at) > phases:
        raise RolloutFormatError("malformed rollout state: phase lists do not fit the plan")
    if any(p.phase >= phases for p in rollout.devices.values()):
        raise RolloutFormatError("malformed rollout state: a device's phase is not planned")
    rollout.met_at = met
    return rollout
