"""Safe rollouts (issue 15): what the operator's side (:mod:`server.fleet.rollouts`) and
the OTA engine's side (:mod:`server.fleet.rollout_engine`) share: the views, and loading a
rollout from the store with its current target set, applying one change and saving it in
the same transaction (so a restart resumes exactly), appending its events to
``rollout_events`` and publishing them on the bus as ``ota/rollout/<kind>`` after the
commit.

The policy itself is the sans-IO :class:`otacore.rollout.Rollout`.

The target set is the release's, after Particle's precedence rules (``otacore.precedence``):
devices whose firmware the rollout's release (product default, or its groups) would decide,
if it were released. Devices already running the version and never touched by the rollout
are left out (nothing to deliver to them).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from otacore.errors import ValidationError
from otacore.precedence import DeviceTargeting, ProductReleases, Target
from otacore.rollout import (
    Decision,
    EventKind,
    Rollout,
    RolloutCounts,
    RolloutEvent,
    State,
    Verdict,
    saved,
)
from otacore.rollout.errors import RolloutFormatError, RolloutPlanError, RolloutStateError
from otacore.rollout.outcomes import STATUS_NAMES, Counts, DeviceProgress, parse_outcome
from otacore.rollout.outcomes import Outcome as DeviceOutcome
from otacore.rollout.phases import PhasePlan
from otacore.rollout.placement import opened_phases_full
from otacore.rollout.targets import RolloutScope
from server.events import FIRMWARE_RELEASED, Event
from server.fleet.base import Outcome, releases_of, targeting_of
from server.fleet.errors import RolloutConflictError, UnknownRolloutError
from server.fleet.roles import Actor, Permission
from server.fleet.windows import WindowService
from server.store import DeviceRecord, FirmwareRecord, ProductRecord, Tx
from server.store.tx_rollouts import (
    ProgressRow,
    RolloutEventRecord,
    RolloutQueries,
    RolloutRecord,
    TargetingRow,
)

_T = TypeVar("_T")
#: Outcomes by name (a dict lookup per stored row; parse_outcome names a bad one).
_OUTCOMES = {o.value: o for o in DeviceOutcome}
#: Prefix of the bus events of rollouts ("ota/" names are the cloud's own).
ROLLOUT_EVENT_PREFIX = "ota/rollout/"
#: Rollout states in which it may steer a device's target (see :meth:`rollout_offer`).
_STEERING_STATES = frozenset({State.SCHEDULED.value, State.RUNNING.value, State.PAUSED.value})
#: Verdicts that make the rollout's version the device's target: a new offer may start, a
#: transfer (or reboot) in progress goes on (issue 15: a transfer in progress may finish
#: after its window closed, or during a pause), or the device already succeeded.
_STEERING_VERDICTS = frozenset({Verdict.OFFER, Verdict.IN_FLIGHT, Verdict.SUCCEEDED})

#: Seconds a process that does not tick rollouts trusts what it knows of which products
#: have active rollouts (it hears of new ones by their events, relayed between processes;
#: this bounds how long a missed event goes unnoticed).
ROLLOUT_PRODUCTS_MAX_AGE = 60.0

#: Scope needed to change rollouts (a rollout releases firmware).
ROLLOUT_SCOPE = "firmware:release"

@dataclass(frozen=True)
class RolloutView:
    """A rollout with its counts (per phase and total) and its latest events."""

    record: RolloutRecord
    rollout: Rollout
    counts: RolloutCounts
    events: tuple[RolloutEventRecord, ...]

    @property
    def state(self) -> State:
        """The rollout's state."""
        return self.rollout.state

    def to_dict(self) -> dict[str, Any]:
        """What ``ota rollout show --json`` prints and a script polls."""
        return {
            "id": self.record.id,
            "product_id": self.record.product_id,
            "version": self.record.version,
            "groups": list(self.record.groups),
            "immediate": self.record.immediate,
            "forced": self.record.forced,
            **self.rollout.summary(self.counts),
            "events": [
                {"at": e.at, "kind": e.kind, "phase": shown_phase(e.phase), "by": e.actor,
                 "reason": e.reason, "data": e.data}
                for e in self.events
            ],
            "created_by": self.record.created_by,
            "created_at": self.record.created_at,
            "updated_at": self.record.updated_at,
        }


@dataclass(frozen=True)
class RolloutOffer:
    """What an active rollout says about one device's target: the rollout, its version's
    firmware and the decision of :meth:`Rollout.may_offer` (applying the device's
    maintenance windows)."""

    product_id: int
    rollout_id: int
    #: The device's target were the rollout's release made (precedence applied).
    target: Target
    firmware: FirmwareRecord | None
    decision: Decision

    @property
    def steers(self) -> bool:
        """True when the rollout's version is the device's target now (a new offer may
        start, one in progress goes on, or the device already runs it); False: the device
        stays on what the releases give it (it is re-checked on the rollout's events)."""
        return self.decision.verdict in _STEERING_VERDICTS and self.firmware is not None

    @property
    def new_offer(self) -> bool:
        """True when a new offer may start (it is claimed with :meth:`claim_rollout_offer`
        before it is sent)."""
        return self.decision.verdict is Verdict.OFFER

    @property
    def version(self) -> int:
        """The rollout's firmware version."""
        assert self.target.version is not None  # a rollout decides only with its version
        return self.target.version


def shown_phase(index: int | None) -> int | None:
    """A phase as operators see it: numbered from 1, as ``phases[].phase`` and the events'
    reasons ("phase 1 of 3") number it (the policy and the store index from 0)."""
    return None if index is None else index + 1


def progress_of(rows: Iterable[ProgressRow]) -> dict[str, DeviceProgress]:
    """Devices' progress from their stored rows (a row's ``updated_at`` is when its latest
    outcome came: the reboot timeout counts from it)."""
    return {
        device: DeviceProgress(phase, None if outcome is None else _OUTCOMES.get(outcome)
                               or parse_outcome(outcome),
                               failures, held_until, 0 if outcome is None else updated_at)
        for device, phase, outcome, failures, held_until, updated_at in rows
    }


def progress_row(device_id: str, progress: DeviceProgress, now: int) -> ProgressRow:
    """The stored row of one device's progress (a placement without an outcome is dated
    ``now``)."""
    status = None if progress.status is None else progress.status.value
    return (device_id, progress.phase, status, progress.failures, progress.held_until,
            now if status is None else progress.changed_at)


def stored_counts(groups: Iterable[tuple[int, str | None, int, int, int]], phases: int,
                  targets: int | None = None) -> RolloutCounts:
    """Per-phase and total counts from :meth:`RolloutQueries.outcome_counts` rows;
    ``targets`` (the target set's size when last saved) adds the devices never placed to
    the total's pending ones."""
    per_phase = [Counts() for _ in range(phases)]
    total = Counts()
    for phase, outcome, devices, failures, held in groups:
        status = "pending" if outcome is None else parse_outcome(outcome).value
        for counts in (per_phase[phase], total) if 0 <= phase < phases else (total,):
            counts.by_status[status] += devices
            counts.failures_total += failures
            counts.held_off += held
    if targets is not None and targets > total.members:
        total.by_status["pending"] += targets - total.members
    return RolloutCounts(tuple(per_phase), total)


def _count_phases_full(record: RolloutRecord) -> bool:
    """True when the rollout's saved tally shows a count plan whose opened phases hold
    their counts: a device without a placement stays unplaced until the next phase
    opens, and its offer decision needs no target set. (A device that left the target
    set since the last save may have freed a place: it is filled at the next full load,
    the periodic tick at the latest.)"""
    data = record.state_data
    if data.get("v") != saved.FORMAT_VERSION or "tally" not in data:
        return False
    try:
        plan = PhasePlan.from_dict(record.plan)
        tally = saved.saved_tally(data)
    except (RolloutPlanError, RolloutFormatError):
        return False
    opened = len(data.get("opened_at") or ())
    placed = [sum(tally[i][s] for s in STATUS_NAMES) if i in tally else 0
              for i in range(opened)]
    return opened_phases_full(plan, opened, placed)


def _rollout_id(value: object) -> int:
    text = value.strip() if isinstance(value, str) else ""
    # ASCII digits only: str.isdigit() also takes superscripts ("¹") that int() refuses.
    if text.isascii() and text.isdigit() and len(text) <= 18:
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(f"rollout id {value!r} must be a positive whole number")
    return value


#: A product's targeting rows and its releases (what a rollout's target set comes from).
_TargetingInputs = tuple[list[TargetingRow], ProductReleases]


class RolloutBase(WindowService):
    """Loading, changing and saving rollouts (and, inherited, maintenance windows)."""

    # --- loading and saving --------------------------------------------------------------

    @staticmethod
    def _rollout_record(
        q: RolloutQueries, product: ProductRecord, rollout_id: object
    ) -> RolloutRecord:
        rid = _rollout_id(rollout_id)
        record = q.get_rollout(product.id, rid)
        if record is None:
            raise UnknownRolloutError(f"product {product.slug} has no rollout {rid}")
        return record

    @staticmethod
    def _rollout_scope(record: RolloutRecord) -> RolloutScope:
        return RolloutScope(record.version, record.groups, record.immediate)

    @staticmethod
    def _targeting_inputs(tx: Tx, product: ProductRecord) -> _TargetingInputs:
        """What every rollout of the product reads to find its target set (read once for
        a listing of many rollouts)."""
        return (RolloutQueries(tx.conn).device_targeting(product.id),
                releases_of(tx.list_releases(product.id)))

    @classmethod
    def _rollout_targets(
        cls, tx: Tx, product: ProductRecord, scope: RolloutScope, touched: Collection[str],
        inputs: _TargetingInputs | None = None,
    ) -> set[str]:
        """Devices whose firmware this rollout's release decides (see the module doc)."""
        rows, releases = inputs or cls._targeting_inputs(tx, product)
        overlay = scope.overlay(releases)
        # Devices targeted alike (development flag, lock, groups) are decided alike: ask
        # the precedence rules once per kind, not once per device.
        decided: dict[tuple[bool, int | None, frozenset[str]], bool] = {}
        targets = set()
        for d in rows:
            kind = (d.development, d.locked_version, d.groups)
            rule = decided.get(kind)
            if rule is None:
                rule = decided[kind] = scope.decided_by(DeviceTargeting(*kind), overlay)
            if rule and (d.firmware_version != scope.version or d.device_id in touched):
                targets.add(d.device_id)
        return targets

    def _rollout_machine(self, tx: Tx, q: RolloutQueries, product: ProductRecord,
                         record: RolloutRecord, *, only: DeviceRecord | None = None,
                         inputs: _TargetingInputs | None = None) -> Rollout:
        """The rollout's state machine with its current target set and its devices'
        stored progress; ``only``: with just that device's membership and progress when
        that is enough for its offer decision (the device has a saved placement; the
        rollout is not running, so no phase is asked; or a count plan's opened phases are
        full: one row read, not the product's devices); else, as a device not placed yet
        may be placed now (it joined the target set since the last change), with the
        whole target set, as without ``only``. ``inputs``: the product's targeting rows
        and releases, when already read."""
        scope = self._rollout_scope(record)
        legacy = record.state_data.get("devices", {})  # format 1: progress in the state
        if only is not None:
            progress = progress_of(q.progress_rows(record.id, [only.id]))
            known = only.id in progress or only.id in legacy
            if known or record.state != State.RUNNING.value or _count_phases_full(record):
                overlay = scope.overlay(releases_of(tx.list_releases(product.id)))
                decides = scope.decides(only.id, targeting_of(only), only.firmware_version,
                                        overlay, (only.id,) if known else ())
                return Rollout.from_dict(record.state_data, [only.id] if decides else [],
                                         progress=progress, partial=True)
        progress = progress_of(q.progress_rows(record.id))
        touched = progress.keys() | legacy.keys()
        return Rollout.from_dict(record.state_data,
                                 self._rollout_targets(tx, product, scope, touched, inputs),
                                 progress=progress)

    def _light_machine(self, tx: Tx, q: RolloutQueries, product: ProductRecord,
                       record: RolloutRecord, device_id: str) -> Rollout | None:
        """The rollout restored light (``Rollout.from_dict(light=True)``) for a change of
        one device: its saved tally, state and that device's row only, no target set;
        None when that cannot be exact: the device has no row (not placed), is not a
        target now, was not counted at the last full save, or the state has no tally
        (saved before it was kept) or has not started."""
        data = record.state_data
        if ("tally" not in data or data.get("v") != saved.FORMAT_VERSION
                or record.state == State.SCHEDULED.value):
            return None
        uncounted = data.get("uncounted", ())
        if uncounted is None or device_id in uncounted:  # None: too many to list
            return None
        progress = progress_of(q.progress_rows(record.id, [device_id]))
        device = tx.get_device(device_id)
        if device_id not in progress or device is None or device.product_id != product.id:
            return None
        scope = self._rollout_scope(record)
        overlay = scope.overlay(releases_of(tx.list_releases(product.id)))
        if not scope.decides(device_id, targeting_of(device), device.firmware_version,
                             overlay, (device_id,)):
            return None
        return Rollout.from_dict(data, [device_id], progress=progress, partial=True,
                                 light=True)

    def _apply_change(self, tx: Tx, q: RolloutQueries, product: ProductRecord,
                      record: RolloutRecord,
                      apply: Callable[[Rollout, int], tuple[list[RolloutEvent], _T]],
                      now: int, *, device_id: str | None = None
                      ) -> tuple[Rollout, list[RolloutEvent], _T]:
        """Tick the rollout and apply one change: light (O(1)) when the change is about
        ``device_id`` and decides nothing beyond it (:data:`saved.LIGHT_EVENTS`), else,
        or when the light machine decided more (a phase, a threshold, completion: the
        saved tally may miss devices that joined or left), on a full load. The light
        attempt writes nothing, so dropping it is free. A light tick times out only that
        device's reboot; the others' wait for the next full load (the periodic tick at
        the latest). ``apply`` returns ``(events, value)``."""
        if device_id is not None:
            machine = self._light_machine(tx, q, product, record, device_id)
            if machine is not None:
                events = machine.tick(now)
                more, value = apply(machine, now)
                events += more
                if all(e.kind in saved.LIGHT_EVENTS for e in events):
                    return machine, events, value
        machine = self._rollout_machine(tx, q, product, record)
        events = machine.tick(now)
        more, value = apply(machine, now)
        return machine, events + more, value

    def _save_rollout(self, q: RolloutQueries, product: ProductRecord, record: RolloutRecord,
              machine: Rollout, events: list[RolloutEvent], now: int) -> list[Event]:
        """Save the rollout-level state, the rows of the devices whose progress changed
        (a few, whatever the target set's size) and the events; the bus events to
        publish after the commit."""
        q.update_rollout(record.id, state=machine.state.value, reason=machine.reason,
                         state_data=machine.to_dict(), now=now)
        new, changed = machine.take_changed()
        q.write_progress(record.id, [progress_row(d, p, now) for d, p in new.items()],
                         [progress_row(d, p, now) for d, p in changed.items()])
        q.add_rollout_events(record.id, [e.to_dict() for e in events])
        return [
            Event(
                ROLLOUT_EVENT_PREFIX + e.kind.value,
                json.dumps({"rollout": record.id, "version": record.version, **e.to_dict(),
                            "phase": shown_phase(e.phase)}),
                product_id=product.id,
                published_at=now,
            )
            for e in events
        ]

    def _release_if_completed(self, tx: Tx, product: ProductRecord, record: RolloutRecord,
                              events: list[RolloutEvent], now: int) -> list[Event]:
        """A completed rollout becomes its release (product default or its groups), as a
        Particle release of the version would: devices that join the target set later get
        it, and the devices it updated keep it once the rollout no longer steers them."""
        if not any(e.kind is EventKind.COMPLETED for e in events):
            return []
        scopes: list[int | None] = [None] if not record.groups else []
        for name in record.groups:
            group = tx.get_group(product.id, name)
            if group is not None:  # a group deleted meanwhile is released nowhere
                scopes.append(group.id)
        for group_id in scopes:
            tx.set_release(product.id, group_id, version=record.version,
                           intelligent=record.immediate, actor=f"rollout:{record.id}", now=now)
        tx.add_audit(actor=f"rollout:{record.id}", action="firmware.release",
                     product_id=product.id, target=f"firmware:{record.version}",
                     details={"version": record.version, "rollout": record.id,
                              "groups": list(record.groups), "intelligent": record.immediate},
                     now=now)
        data = {"version": record.version, "immediate": record.immediate,
                "product_default": not record.groups, "groups": list(record.groups),
                "rollout": record.id}
        return [Event(FIRMWARE_RELEASED, json.dumps(data), product_id=product.id,
                      published_at=now)]

    def _finished_view(self, q: RolloutQueries, record: RolloutRecord, now: int
                       ) -> RolloutView:
        """An aborted or completed rollout, read without its target set or its devices'
        rows: its counts are of the devices it placed, counted by the database (an ended
        rollout places nobody more; a device that left its target set still counts)."""
        machine = Rollout.from_dict(record.state_data, partial=True)
        counts = stored_counts(q.outcome_counts(record.id, now), len(machine.met_at),
                               machine.saved_targets)
        return RolloutView(record, machine, counts, tuple(q.rollout_events(record.id)))

    def _rollout_view(self, q: RolloutQueries, record: RolloutRecord, machine: Rollout,
                      now: int) -> RolloutView:
        fresh = q.get_rollout(record.product_id, record.id) or record
        # A light machine's tally has no holds of the devices it did not load: the
        # database counts them (one GROUP BY).
        counts = (stored_counts(q.outcome_counts(record.id, now), len(machine.met_at),
                                machine.saved_targets)
                  if machine.light else machine.counts(now))
        return RolloutView(fresh, machine, counts, tuple(q.rollout_events(record.id)))

    def _change_rollout(
        self,
        product_ref: int | str,
        rollout_id: object,
        apply: Callable[[Rollout, int], list[RolloutEvent]],
        *,
        actor: Actor | None = None,
        audit: str | None = None,
        details: Mapping[str, object] | None = None,
    ) -> Outcome:
        """Load, tick, apply one change, save, in a transaction of its own."""
        work = self._rollout_change_work(product_ref, rollout_id, apply, actor=actor,
                                         audit=audit, details=details)
        with self.store.write() as tx:
            return work(tx)

    def _rollout_change_work(
        self,
        product_ref: int | str,
        rollout_id: object,
        apply: Callable[[Rollout, int], list[RolloutEvent]],
        *,
        actor: Actor | None = None,
        audit: str | None = None,
        details: Mapping[str, object] | None = None,
        device_id: str | None = None,
        with_view: bool = True,
    ) -> Callable[[Tx], Outcome]:
        """The store work of one change: load, tick, apply, save; the view (None without
        ``with_view``: a caller that ignores it saves its counting) and the bus events.
        ``device_id``: the change is about that device only (an outcome), so it may run
        light (see :meth:`_apply_change`)."""

        def work(tx: Tx) -> Outcome:
            now = self.clock()
            product = self._product(tx, product_ref)
            q = RolloutQueries(tx.conn)
            record = self._rollout_record(q, product, rollout_id)
            if actor is not None:
                actor.require(Permission.MANAGE_DEVICES, "change rollouts")
                actor.require_scope(ROLLOUT_SCOPE, product.id, "change rollouts", product.slug)
            try:
                machine, events, _ = self._apply_change(
                    tx, q, product, record, lambda m, at: (apply(m, at), None), now,
                    device_id=device_id)
            except RolloutStateError as exc:
                raise RolloutConflictError(str(exc)) from None
            bus_events = self._save_rollout(q, product, record, machine, events, now)
            bus_events += self._release_if_completed(tx, product, record, events, now)
            if actor is not None and audit is not None:
                tx.add_audit(actor=actor.subject, action=audit, product_id=product.id,
                             target=f"rollout:{record.id}", details=dict(details or {}),
                             now=now)
            if not with_view:
                return Outcome(None, bus_events)
            return Outcome(self._rollout_view(q, record, machine, now), bus_events)

        return work

    # --- which products have rollouts ----------------------------------------------------

    def note_rollout_product(self, product_id: int, active: bool = True, *,
                             read_since: int | None = None) -> None:
        """Note that the product has (or, ``active`` False, has no) active rollout: what
        :meth:`rollouts_may_steer` answers from (another process's rollout events, relayed
        to this one, are noted by the OTA engine as they arrive). ``read_since``: the note
        comes from a store read begun at that :meth:`_rollout_notes_mark`, and a note made
        after it (newer knowledge, e.g. a rollout created meanwhile) wins."""
        notes: dict[int, tuple[int, bool]] = self.__dict__.setdefault("_rollout_notes", {})
        last = notes.get(product_id)
        if read_since is not None and last is not None and last[0] > read_since:
            return
        number = next(self._rollout_note_numbers())
        notes[product_id] = (number, active)
        self.__dict__["_rollout_note_last"] = number
        known: set[int] | None = self.__dict__.get("_rollout_products")
        if known is None:
            return  # unknown: every product may have one until the first tick
        if active:
            known.add(product_id)
        else:
            known.discard(product_id)

    def _rollout_note_numbers(self) -> Iterator[int]:
        counter: Iterator[int] | None = self.__dict__.get("_rollout_note_counter")
        if counter is None:
            counter = self.__dict__.setdefault("_rollout_note_counter", itertools.count(1))
        return counter

    def _rollout_notes_mark(self) -> int:
        """The number of the last note so far: take it before a read of the active
        rollouts, and give it to :meth:`_set_rollout_products` with the read's result."""
        last: int = self.__dict__.get("_rollout_note_last", 0)
        return last

    def _set_rollout_products(self, products: set[int], read_since: int) -> None:
        """Replace what this process knows with a read begun at note ``read_since``; the
        notes made since (a rollout created or finished while the read ran) stay applied,
        or a device's result would find its product's rollout unknown and go unrecorded."""
        known = set(products)
        for product_id, (number, active) in list(
                self.__dict__.get("_rollout_notes", {}).items()):
            if number > read_since:
                if active:
                    known.add(product_id)
                else:
                    known.discard(product_id)
        self.__dict__["_rollout_products"] = known
        self.__dict__["_rollout_products_at"] = trio.current_time()
