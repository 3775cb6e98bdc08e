"""The rollout state machine, sans-IO: time comes in as epoch milliseconds, decisions and
events go out; no clocks, sockets or threads (the model of h11 and aioquic).

The caller (the fleet service) tells it the target set (:meth:`Rollout.set_targets`), asks
:meth:`Rollout.may_offer` before starting an offer and :meth:`Rollout.may_continue` during a
transfer, reports what devices do with :meth:`Rollout.record_outcome`, calls
:meth:`Rollout.tick` now and then (scheduled starts, phase waits, reboot timeouts), and
relays operators' :meth:`pause`/:meth:`resume`/:meth:`abort`. Each of those returns the
:class:`RolloutEvent` list it caused. :meth:`to_dict`/:meth:`from_dict` save and restore
the whole state; the target set is the store's to recompute (it is not saved: a device's
phase is its saved placement, see :mod:`otacore.rollout.placement`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from otacore.rollout import criteria, saved
from otacore.rollout.errors import RolloutFormatError, RolloutOutcomeError, RolloutStateError
from otacore.rollout.events import Decision, EventKind, RolloutEvent, State, Verdict
from otacore.rollout.outcomes import (
    FAILURES,
    IN_FLIGHT,
    STATUS_NAMES,
    Counts,
    DeviceProgress,
    Outcome,
    RolloutCounts,
    parse_outcome,
)
from otacore.rollout.phases import PlanKind, positions_of
from otacore.rollout.placement import place
from otacore.rollout.policy import MINUTE_MS, Policy
from otacore.rollout.windows import MaintenanceWindow, any_open, next_opening

POLICY_ACTOR = "policy"
#: Tally key of the failures reported (retries included), beside the status names.
_FAILURES_KEY = "#failures"


class Rollout:
    """One rollout of one firmware version; see the module docstring for the protocol."""

    def __init__(self, rollout_id: str, policy: Policy, created_at: int) -> None:
        if not isinstance(rollout_id, str) or not rollout_id:
            raise RolloutFormatError("a rollout id must be a non-empty string")
        self.id = rollout_id
        self.policy = policy
        self.created_at = created_at
        self.state = State.SCHEDULED
        #: Why the rollout is paused, aborted or completed (None while it runs).
        self.reason: str | None = None
        #: Epoch ms the rollout was aborted (None: not aborted); a release made later
        #: supersedes what it keeps (see :meth:`may_offer`).
        self.aborted_at: int | None = None
        #: Epoch ms each opened phase opened at (its length = phases opened).
        self.opened_at: list[int] = []
        #: Epoch ms each phase met its success condition (None: not yet).
        self.met_at: list[int | None] = [None] * len(policy.plan.phases)
        self.devices: dict[str, DeviceProgress] = {}
        self.targets: set[str] = set()
        #: How many targets it had at its last save (None: not known, or never saved).
        self.saved_targets: int | None = None
        #: Restored with the tally it saved and only the devices asked about (see
        #: :meth:`from_dict`): its counts are the saved ones, changed by what it does.
        self.light = False
        #: Devices with progress that were not targets at the last full save (so not in
        #: the saved tally; None: too many to list): a light restore cannot count them.
        self.uncounted: list[str] | None = []
        #: Epoch ms of the offers of the last minute (the rate limit's sliding window).
        self.recent_offers: list[int] = []
        self.rate: int | None = None if policy.rate is None else policy.rate.base_per_minute
        self.offered_since_increase = 0
        self.succeeded_since_increase = 0
        #: Failed counts operators resumed past, by ``criteria.ack_key``.
        self.acknowledged: dict[str, int] = {}
        self._position = positions_of(rollout_id)
        self._positions: dict[str, float] = {}
        #: Devices whose progress changed (placed, an outcome, a hold) since the caller
        #: last took them (:meth:`take_changed`): what it saves (a few rows, not all).
        self.changed: set[str] = set()
        #: Devices whose progress the caller has stored (given to :meth:`from_dict`, or
        #: taken since): a changed one is updated, any other inserted.
        self.stored: set[str] = set()
        #: Target devices by phase (None: not placed yet) and status, kept up to date by
        #: every change, so counts and thresholds cost O(phases), not O(devices).
        self._tally: dict[int | None, Counter[str]] = {}
        #: Devices the back-off ever held (held_off is counted among them only).
        self._held: set[str] = set()

    @classmethod
    def particle_release(cls, rollout_id: str, created_at: int) -> Rollout:
        """A Particle release: one phase with every target device, no criteria."""
        return cls(rollout_id, Policy.particle_release(), created_at)

    @property
    def start_at(self) -> int | None:
        """When the rollout starts: the policy's start, else its first phase's (None: at
        the first tick)."""
        if self.policy.start_at is not None:
            return self.policy.start_at
        return self.policy.plan.phases[0].start_at

    # --- membership ---------------------------------------------------------------------

    def position(self, device_id: str) -> float:
        """The device's stable place in [0, 1) (cached)."""
        found = self._positions.get(device_id)
        if found is None:
            found = self._positions[device_id] = self._position(device_id)
        return found

    def phase_of(self, device_id: str) -> int | None:
        """The device's phase (0-based), None when it is not placed (yet): see
        :mod:`otacore.rollout.placement` for when and how devices are placed."""
        progress = self.devices.get(device_id)
        return None if progress is None else progress.phase

    def set_targets(self, device_ids: Iterable[str], now: int) -> list[RolloutEvent]:
        """Replace the target set (devices the release reaches after precedence rules).
        Devices that join later fall into phases by the same rule; leavers keep their
        history but are no longer counted or offered."""
        self.targets = set(device_ids)
        self._place()
        self._recount()
        return self._evaluate(now)

    def _count(self, device_id: str, sign: int) -> None:
        """Add (+1) or remove (-1) one target device's contribution to the tally."""
        if device_id not in self.targets:
            return
        tally = self._tally.setdefault(self.phase_of(device_id), Counter())
        progress = self.devices.get(device_id)
        if progress is None or progress.status is None:
            tally["pending"] += sign
        else:
            tally[progress.status.value] += sign
            tally[_FAILURES_KEY] += sign * progress.failures

    def _recount(self) -> None:
        """The tally from scratch (what :meth:`_count` keeps up to date), in one pass."""
        tally: dict[int | None, Counter[str]] = {}
        devices = self.devices
        for device in self.targets:
            progress = devices.get(device)
            if progress is None:
                phase, status, failures = None, "pending", 0
            else:
                phase = progress.phase
                status = "pending" if progress.status is None else progress.status.value
                failures = progress.failures
            counter = tally.get(phase)
            if counter is None:
                counter = tally[phase] = Counter()
            counter[status] += 1
            if failures:
                counter[_FAILURES_KEY] += failures
        self._tally = tally

    def _place(self) -> None:
        placed = {d: p.phase for d, p in self.devices.items()}
        new = place(self.policy.plan, len(self.opened_at), self.targets, placed, self.position)
        for device, phase in new.items():
            self._count(device, -1)
            self.devices[device] = DeviceProgress(phase)
            self.changed.add(device)
            self._count(device, 1)

    def take_changed(self) -> tuple[dict[str, DeviceProgress], dict[str, DeviceProgress]]:
        """(new, updated): the devices whose progress changed since the last call (or
        the load) with their progress now, those not stored yet apart: the rows a caller
        saves (inserts, updates). They count as stored from then on."""
        new: dict[str, DeviceProgress] = {}
        updated: dict[str, DeviceProgress] = {}
        for device in sorted(self.changed):
            (updated if device in self.stored else new)[device] = self.devices[device]
        self.stored |= self.changed
        self.changed = set()
        return new, updated

    def members(self, phase: int) -> list[str]:
        """Target devices of one phase."""
        return [d for d in self.targets if self.phase_of(d) == phase]

    # --- questions ----------------------------------------------------------------------

    def may_offer(
        self,
        device_id: str,
        now: int,
        windows: Sequence[MaintenanceWindow] = (),
        *,
        force_window: bool = False,
    ) -> Decision:
        """May a new offer to ``device_id`` start now? ``windows`` are the maintenance
        windows that apply to the device (none: always open); ``force_window`` lets the
        offer start outside them (the decision says ``forced``: audit-log it)."""
        if self.state is State.ABORTED:
            progress = self.devices.get(device_id)
            if progress is not None and progress.status is Outcome.SUCCEEDED:
                # As hawkBit and AWS IoT Jobs: an abort stops new offers and discards
                # downloads; a device that installed the version and passed its self-test
                # keeps it (no downgrade to the release's older version).
                return Decision(Verdict.SUCCEEDED,
                                "the device succeeded before the abort and keeps the version",
                                progress.phase)
            return Decision(Verdict.ABORTED, f"rollout aborted: {self.reason}")
        if self.state is State.SCHEDULED:
            return Decision(
                Verdict.SCHEDULED, "the rollout has not started", retry_at=self.start_at
            )
        if self.state is State.PAUSED:
            return Decision(Verdict.PAUSED, f"rollout paused: {self.reason}")
        if device_id not in self.targets:
            return Decision(Verdict.NOT_TARGETED, "the device is not in the rollout's target set")
        phase = self.phase_of(device_id)
        if phase is None or phase >= len(self.opened_at):
            nxt = len(self.opened_at)
            start = self.policy.plan.phases[nxt].start_at if nxt < len(self.met_at) else None
            where = "no phase yet" if phase is None else f"phase {phase + 1}"
            return Decision(
                Verdict.PHASE_NOT_OPEN,
                f"the device is in {where}; {len(self.opened_at)} phase(s) open",
                phase, retry_at=start,
            )
        progress = self.devices.get(device_id)
        if progress is not None and progress.status is Outcome.SUCCEEDED:
            return Decision(Verdict.SUCCEEDED, "the device already succeeded", phase)
        if progress is not None and progress.status in IN_FLIGHT:
            return Decision(
                Verdict.IN_FLIGHT, f"an offer is in flight ({progress.status})", phase
            )
        if progress is not None and progress.held(now):
            return Decision(
                Verdict.HELD_OFF,
                f"held after {progress.failures} failures",
                phase, retry_at=progress.held_until,
            )
        forced = False
        if not any_open(windows, now):
            if not force_window:
                return Decision(
                    Verdict.OUTSIDE_WINDOW,
                    "outside the maintenance window(s): "
                    + "; ".join(w.describe() for w in windows),
                    phase, retry_at=next_opening(windows, now),
                )
            forced = True
        if self.rate is not None:
            recent = [t for t in self.recent_offers if t > now - MINUTE_MS]
            if len(recent) >= self.rate:
                return Decision(
                    Verdict.RATE_LIMITED,
                    f"{len(recent)} offers in the last minute (limit {self.rate}/min)",
                    phase, retry_at=min(recent) + MINUTE_MS,
                )
        return Decision(Verdict.OFFER, "offer", phase, forced=forced)

    def may_continue(self, device_id: str, now: int) -> Decision:
        """May a transfer in progress go on? Yes unless the rollout was aborted (then the
        device discards it); a closed window or a pause lets it finish."""
        if self.state is State.ABORTED:
            return Decision(Verdict.ABORTED, f"rollout aborted, discard: {self.reason}")
        return Decision(Verdict.CONTINUE, "continue", self.phase_of(device_id))

    def counts(self, now: int) -> RolloutCounts:
        """Devices by status, per phase and over every target device (see ``Counts``)."""
        phases = [Counts() for _ in self.policy.plan.phases]
        total = Counts()
        for phase, tally in self._tally.items():
            for status in STATUS_NAMES:
                total.by_status[status] += tally[status]
                if phase is not None:
                    phases[phase].by_status[status] += tally[status]
            total.failures_total += tally[_FAILURES_KEY]
            if phase is not None:
                phases[phase].failures_total += tally[_FAILURES_KEY]
        for device in self._held:
            progress = self.devices[device]
            if device in self.targets and progress.status in FAILURES and progress.held(now):
                total.held_off += 1
                phases[progress.phase].held_off += 1
        return RolloutCounts(tuple(phases), total)

    def summary(self, counts: RolloutCounts) -> dict[str, object]:
        """State, reason, policy, current rate, total counts and each phase (its size,
        start, when it opened and met its condition, its counts) as JSON-able data."""
        phases = []
        for index, phase in enumerate(self.policy.plan.phases):
            phases.append({
                "phase": index + 1,
                "size": phase.size,
                "start_at": phase.start_at,
                "opened_at": self.opened_at[index] if index < len(self.opened_at) else None,
                "met_at": self.met_at[index],
                "counts": counts.phases[index].to_dict(),
            })
        return {
            "state": self.state.value,
            "reason": self.reason,
            "plan": self.policy.plan.to_dict(),
            "criteria": [t.to_dict() for t in self.policy.thresholds],
            "policy": self.policy.to_dict(),
            "rate_per_minute": self.rate,
            "counts": counts.total.to_dict(),
            "phases": phases,
        }

    def in_flight(self) -> list[str]:
        """Devices with an offer, a download or a reboot in progress (sorted)."""
        return sorted(d for d, p in self.devices.items() if p.status in IN_FLIGHT)

    # --- inputs -------------------------------------------------------------------------

    def record_outcome(self, device_id: str, outcome: object, now: int) -> list[RolloutEvent]:
        """Record what a device did; returns the events it caused (a hold, a crossed
        threshold, a pause or abort, a phase advancing, a rate increase)."""
        outcome = parse_outcome(outcome)
        progress = self.devices.get(device_id)
        if progress is None:
            phase = self.phase_of(device_id) if device_id in self.targets else None
            if phase is None:
                raise RolloutOutcomeError(
                    f"device {device_id} has no place in rollout {self.id} (not a target, or "
                    "its phase is not placed yet): it cannot have been offered its firmware"
                )
            progress = self.devices[device_id] = DeviceProgress(phase)
        events: list[RolloutEvent] = []
        self._count(device_id, -1)
        self.changed.add(device_id)
        progress.status = outcome
        progress.changed_at = now
        if outcome is Outcome.OFFERED:
            if self.rate is not None:  # the rate limit's sliding minute
                self.recent_offers = [t for t in self.recent_offers if t > now - MINUTE_MS]
                self.recent_offers.append(now)
            self.offered_since_increase += 1
        elif outcome is Outcome.SUCCEEDED:
            self.succeeded_since_increase += 1
        elif outcome in FAILURES:
            events += self._failed(device_id, progress, now)
        self._count(device_id, 1)
        events += self._grow_rate(now)
        events += self._evaluate(now)
        return events

    def _failed(self, device_id: str, progress: DeviceProgress, now: int) -> list[RolloutEvent]:
        progress.failures += 1
        backoff = self.policy.backoff
        if backoff is None or progress.failures % backoff.max_failures:
            return []
        progress.held_until = now + backoff.hold_ms
        self._held.add(device_id)
        return [
            RolloutEvent(
                EventKind.DEVICE_HELD, now,
                f"device {device_id} failed {progress.failures} times: no offer until "
                f"{progress.held_until}",
                progress.phase,
                data={"device": device_id, "failures": progress.failures,
                      "held_until": progress.held_until, "last": str(progress.status)},
            )
        ]

    def _grow_rate(self, now: int) -> list[RolloutEvent]:
        limit = self.policy.rate
        if limit is None or self.rate is None or limit.increment_factor <= 1:
            return []
        by_notified = (
            limit.increase_after_notified is not None
            and self.offered_since_increase >= limit.increase_after_notified
        )
        by_succeeded = (
            limit.increase_after_succeeded is not None
            and self.succeeded_since_increase >= limit.increase_after_succeeded
        )
        if not (by_notified or by_succeeded):
            return []
        grown = limit.grown(self.rate)
        self.offered_since_increase = self.succeeded_since_increase = 0
        if grown == self.rate:
            return []
        before, self.rate = self.rate, grown
        why = "offered" if by_notified else "succeeded"
        return [
            RolloutEvent(
                EventKind.RATE_INCREASED, now,
                f"rate {before} -> {grown} offers/min after enough devices {why}",
                data={"from": before, "to": grown},
            )
        ]

    def tick(self, now: int) -> list[RolloutEvent]:
        """Let time pass: a scheduled start, reboot timeouts, phase waits and starts."""
        events: list[RolloutEvent] = []
        if self.state is State.SCHEDULED:
            start = self.start_at
            if start is not None and now < start:
                return events
            self.state = State.RUNNING
            events.append(RolloutEvent(EventKind.STARTED, now, "the rollout started"))
            events += self._open_phase(now)
        timeout = self.policy.reboot_timeout_ms
        rebooting = sorted(d for d, p in self.devices.items() if p.status is Outcome.REBOOTING)
        for device_id in rebooting:
            progress = self.devices[device_id]
            if now >= progress.changed_at + timeout:
                self._count(device_id, -1)
                self.changed.add(device_id)
                progress.status = Outcome.TIMED_OUT
                progress.changed_at = now
                events.append(
                    RolloutEvent(
                        EventKind.DEVICE_TIMED_OUT, now,
                        f"device {device_id} did not come back within "
                        f"{timeout // 1000} s of rebooting into the new firmware",
                        progress.phase, data={"device": device_id},
                    )
                )
                events += self._failed(device_id, progress, now)
                self._count(device_id, 1)
        self._held = {d for d in self._held if self.devices[d].held(now)}
        return events + self._evaluate(now)

    def pause(self, by: str, now: int, reason: str | None = None) -> list[RolloutEvent]:
        """Stop new offers until :meth:`resume` (transfers in progress finish)."""
        if self.state not in (State.SCHEDULED, State.RUNNING):
            raise RolloutStateError(
                f"rollout {self.id} is {self.state}; only a scheduled or running rollout "
                "can be paused"
            )
        return [self._pause(now, reason or f"paused by {by}", by)]

    def resume(self, by: str, now: int) -> list[RolloutEvent]:
        """Resume a paused rollout. Thresholds crossed so far are acknowledged: each fires
        again only once more devices of its scope have failed."""
        if self.state is not State.PAUSED:
            raise RolloutStateError(
                f"rollout {self.id} is {self.state}; only a paused rollout can be resumed"
            )
        for crossing in self._crossings(now, acknowledged=False):
            key = criteria.ack_key(crossing.threshold_index, crossing.phase)
            self.acknowledged[key] = crossing.failed
        self.state = State.RUNNING if self.opened_at else State.SCHEDULED
        self.reason = None
        events = [RolloutEvent(EventKind.RESUMED, now, f"resumed by {by}", by=by)]
        if self.state is State.SCHEDULED:
            return events + self.tick(now)
        return events + self._evaluate(now)

    def abort(self, by: str, now: int, reason: str | None = None) -> list[RolloutEvent]:
        """Stop new offers at once; the event lists the devices mid-transfer to discard."""
        if self.state is State.ABORTED:
            raise RolloutStateError(f"rollout {self.id} is already aborted: {self.reason}")
        return [self._abort(now, reason or f"aborted by {by}", by)]

    # --- the machine --------------------------------------------------------------------

    def _pause(self, now: int, reason: str, by: str, data: Mapping[str, object] | None = None
               ) -> RolloutEvent:
        self.state = State.PAUSED
        self.reason = reason
        return RolloutEvent(EventKind.PAUSED, now, reason, by=by, data=dict(data or {}))

    def _abort(self, now: int, reason: str, by: str, data: Mapping[str, object] | None = None
               ) -> RolloutEvent:
        self.state = State.ABORTED
        self.reason = reason
        self.aborted_at = now
        # Devices mid-transfer discard it; one already rebooting has installed the image
        # (its outcome still arrives and counts).
        downloading = (Outcome.OFFERED, Outcome.DOWNLOADING)
        discard = sorted(d for d, p in self.devices.items() if p.status in downloading)
        payload = {**(data or {}), "discard": discard}
        return RolloutEvent(EventKind.ABORTED, now, reason, by=by, data=payload)

    def _crossings(self, now: int, *, acknowledged: bool = True) -> list[criteria.Crossing]:
        if not self.policy.thresholds:
            return []
        counts = self.counts(now)
        opened = counts.phases[: len(self.opened_at)]
        acks = self.acknowledged if acknowledged else {}
        return criteria.evaluate(self.policy.thresholds, opened, counts.total, acks)

    def _evaluate(self, now: int) -> list[RolloutEvent]:
        """Thresholds first (they may halt), then phase progress and completion."""
        events: list[RolloutEvent] = []
        if self.state in (State.RUNNING, State.PAUSED, State.COMPLETED):
            for crossing in self._crossings(now):
                action = crossing.threshold.action
                if action is criteria.Action.PAUSE and self.state is not State.RUNNING:
                    continue  # already halted (or done): resume acknowledges it
                events.append(
                    RolloutEvent(
                        EventKind.THRESHOLD_CROSSED, now, crossing.reason, crossing.phase,
                        data=crossing.to_dict(),
                    )
                )
                if action is criteria.Action.ABORT:
                    events.append(self._abort(now, crossing.reason, POLICY_ACTOR,
                                              crossing.to_dict()))
                else:
                    events.append(self._pause(now, crossing.reason, POLICY_ACTOR,
                                              crossing.to_dict()))
                break
        if self.state is State.RUNNING:
            events += self._advance(now)
        return events

    def _phase_met(self, phase: int, now: int) -> tuple[bool, str]:
        counts = self.counts(now).phases[phase]
        members, succeeded = counts.members, counts.by_status[Outcome.SUCCEEDED.value]
        met = succeeded * 100 >= self.policy.success_percent * members
        return met, (
            f"phase {phase + 1}: {succeeded} of {members} devices succeeded "
            f"(condition {self.policy.success_percent:g}%)"
        )

    def _advance(self, now: int) -> list[RolloutEvent]:
        events: list[RolloutEvent] = []
        phases = self.policy.plan.phases
        while self.state is State.RUNNING:
            current = len(self.opened_at) - 1
            if self.met_at[current] is None:
                met, why = self._phase_met(current, now)
                if met:
                    self.met_at[current] = now
                    events.append(RolloutEvent(EventKind.PHASE_ADVANCED, now, why, current))
            if len(self.opened_at) == len(phases):
                if self.met_at[current] is not None and all(
                    self._phase_met(p, now)[0] for p in range(len(phases))
                ):
                    self.state = State.COMPLETED
                    self.reason = "every phase met its success condition"
                    events.append(RolloutEvent(EventKind.COMPLETED, now, self.reason))
                break
            nxt = phases[current + 1]
            if nxt.start_at is not None:
                due = now >= nxt.start_at
            else:
                met_at = self.met_at[current]
                due = met_at is not None and now >= met_at + self.policy.phase_wait_ms
            if not due:
                break
            events += self._open_phase(now)
        return events

    def _open_phase(self, now: int) -> list[RolloutEvent]:
        index = len(self.opened_at)
        self.opened_at.append(now)
        self._place()
        size = self.policy.plan.phases[index].size
        unit = "%" if self.policy.plan.kind is PlanKind.PERCENT else " devices"
        shown = "every remaining device" if size is None else f"{size:g}{unit} cumulative"
        return [
            RolloutEvent(
                EventKind.PHASE_STARTED, now,
                f"phase {index + 1} of {len(self.met_at)} started ({shown}; "
                f"{self.counts(now).phases[index].members} devices)",
                index,
            )
        ]

    # --- persistence (the format: otacore.rollout.saved) -----------------------------------

    def to_dict(self) -> dict[str, object]:
        """The rollout-level state as a compact msgpack/JSON-able dict, small whatever the
        number of devices: their progress is the caller's to store per device (see
        :meth:`take_changed`), and the target set its to recompute."""
        return saved.dump(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object], targets: Iterable[str] = (), *,
                  progress: Mapping[str, DeviceProgress] | None = None,
                  partial: bool = False, light: bool = False) -> Rollout:
        """Restore a rollout saved by :meth:`to_dict`, with the current target set and
        the stored ``progress`` of its devices (all of them, or, ``partial``, only those
        the caller asks about, e.g. the one device of an offer decision: then nobody is
        placed, as placement ranks the whole set). A state of format 1 carries its
        devices' progress itself: it wins over ``progress``, and every device of it
        counts as changed, so that the next save stores it per device.

        ``light`` (with ``partial``): the counts are the tally of the last save, kept up
        to date by what this machine does with the devices it was given (targets then,
        not in :attr:`uncounted`): a change of one device costs O(1), not O(targets).
        Any event but those of :data:`saved.LIGHT_EVENTS` is to be decided again on a
        full load (the saved tally misses devices that joined or left since)."""
        rollout = saved.load(cls, data, progress)
        rollout.targets = set(targets)
        rollout._held = {d for d, p in rollout.devices.items() if p.held_until}
        if light:
            rollout.light = True
            rollout._tally = saved.saved_tally(data)
            return rollout
        if not partial:
            rollout._place()
        rollout._recount()
        return rollout
