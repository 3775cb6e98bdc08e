"""Safe rollouts (issue 15) over the store: create, show, list, pause, resume and abort
rollouts, record device outcomes, let time pass, and set maintenance windows.

The policy itself is the sans-IO :class:`otacore.rollout.Rollout`; this service loads it
from the store with the current target set, applies one change and saves it in the same
transaction (so a restart resumes exactly), appends its events to ``rollout_events`` and
publishes them on the bus as ``ota/rollout/<kind>`` after the commit.

The target set is the release's, after Particle's precedence rules (``otacore.precedence``):
devices whose firmware the rollout's release (product default, or its groups) would decide,
if it were released. Devices already running the version and never touched by the rollout
are left out (nothing to deliver to them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from otacore.errors import NotFoundError, ValidationError
from otacore.precedence import DeviceTargeting, ProductReleases, Target, target_firmware_for
from otacore.rollout import (
    Decision,
    EventKind,
    Rollout,
    RolloutCounts,
    RolloutEvent,
    State,
    Verdict,
    windows_for,
)
from otacore.rollout.errors import RolloutOutcomeError, RolloutStateError
from otacore.rollout.outcomes import IN_FLIGHT
from otacore.rollout.outcomes import Outcome as DeviceOutcome
from otacore.rollout.phases import PlanKind
from otacore.rollout.spec import RolloutSpec, rollout_spec
from otacore.rollout.targets import RolloutScope
from server.events import FIRMWARE_RELEASED, Event
from server.fleet.base import (
    Outcome,
    check_version,
    normalize_device_id,
    releases_of,
    targeting_of,
)
from server.fleet.errors import (
    RolloutConflictError,
    RolloutRefusedError,
    UnknownFirmwareError,
    UnknownRolloutError,
)
from server.fleet.roles import Actor, Permission
from server.fleet.text import clean_group_name, clean_text
from server.fleet.windows import WindowService
from server.store import DeviceRecord, FirmwareRecord, ProductRecord, ReleaseRecord, Tx
from server.store.tx_rollouts import (
    DeviceOutcomeRecord,
    RolloutEventRecord,
    RolloutQueries,
    RolloutRecord,
    TargetingRow,
)

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
#: Names of the statuses of a device with the rollout's firmware on its way.
_IN_FLIGHT_NAMES = frozenset(o.value for o in IN_FLIGHT)
#: The stored status of a device that installed the rollout's version and passed its
#: self-test.
_SUCCEEDED = DeviceOutcome.SUCCEEDED.value

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


def _release_times(records: Collection[ReleaseRecord]) -> dict[str | None, int]:
    """When each of a product's releases was last made, by group name (None: the product
    default)."""
    return {r.group_name: r.released_at for r in records}


def _aborted_at(record: RolloutRecord) -> int:
    """When an aborted rollout was aborted (its last change, for states saved before the
    abort time was kept)."""
    at = record.state_data.get("aborted_at")
    return int(at) if isinstance(at, int) else record.updated_at


def _keeps(record: RolloutRecord, released: Mapping[str | None, int]) -> bool:
    """True when an aborted rollout may still keep devices on its version: some device
    succeeded in it, and not every release it would have made was made again since the
    abort (see ``RolloutService._kept_offer`` for the rule per device)."""
    devices = record.state_data.get("devices", {})
    if not any(isinstance(p, list) and len(p) > 1 and p[1] == _SUCCEEDED
               for p in devices.values()):
        return False
    aborted_at = _aborted_at(record)
    scopes: tuple[str | None, ...] = record.groups or (None,)
    return any(released.get(scope, -1) <= aborted_at for scope in scopes)


def _rollout_id(value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 18:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(f"rollout id {value!r} must be a positive whole number")
    return value


#: A product's targeting rows and its releases (what a rollout's target set comes from).
_TargetingInputs = tuple[list[TargetingRow], ProductReleases]


class RolloutService(WindowService):
    """Rollouts of products (and, inherited, their maintenance windows)."""

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
        return {
            d.device_id
            for d in rows
            if scope.decides(d.device_id, DeviceTargeting(d.development, d.locked_version,
                                                          d.groups),
                             d.firmware_version, overlay, touched)
        }

    def _rollout_machine(self, tx: Tx, q: RolloutQueries, product: ProductRecord,
                         record: RolloutRecord, *, only: DeviceRecord | None = None,
                         inputs: _TargetingInputs | None = None) -> Rollout:
        """The rollout's state machine with its current target set; ``only``: with just
        that device's membership (enough for its offer decision under a percent plan,
        whose phases follow from positions; a count plan needs every target to place);
        ``inputs``: the product's targeting rows and releases, when already read."""
        touched = record.state_data.get("devices", {})
        scope = self._rollout_scope(record)
        if only is not None and record.plan.get("kind") == PlanKind.PERCENT.value:
            overlay = scope.overlay(releases_of(tx.list_releases(product.id)))
            decides = scope.decides(only.id, targeting_of(only), only.firmware_version,
                                    overlay, touched)
            return Rollout.from_dict(record.state_data, [only.id] if decides else [])
        return Rollout.from_dict(record.state_data,
                                 self._rollout_targets(tx, product, scope, touched, inputs))

    def _save_rollout(self, q: RolloutQueries, product: ProductRecord, record: RolloutRecord,
              machine: Rollout, events: list[RolloutEvent], now: int) -> list[Event]:
        q.update_rollout(record.id, state=machine.state.value, reason=machine.reason,
                         state_data=machine.to_dict(), now=now)
        q.put_device_outcomes(
            record.id,
            (
                (d, p.phase, None if p.status is None else p.status.value, p.failures,
                 p.held_until)
                for d, p in machine.devices.items()
            ),
            now,
        )
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

    def _rollout_view(self, q: RolloutQueries, record: RolloutRecord, machine: Rollout,
                      now: int) -> RolloutView:
        fresh = q.get_rollout(record.product_id, record.id) or record
        return RolloutView(fresh, machine, machine.counts(now),
                           tuple(q.rollout_events(record.id)))

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
    ) -> Callable[[Tx], Outcome]:
        """The store work of one change: load, tick, apply, save; the view and the bus
        events."""

        def work(tx: Tx) -> Outcome:
            now = self.clock()
            product = self._product(tx, product_ref)
            q = RolloutQueries(tx.conn)
            record = self._rollout_record(q, product, rollout_id)
            if actor is not None:
                actor.require(Permission.MANAGE_DEVICES, "change rollouts")
                actor.require_scope(ROLLOUT_SCOPE, product.id, "change rollouts", product.slug)
            machine = self._rollout_machine(tx, q, product, record)
            try:
                events = machine.tick(now) + apply(machine, now)
            except RolloutStateError as exc:
                raise RolloutConflictError(str(exc)) from None
            bus_events = self._save_rollout(q, product, record, machine, events, now)
            bus_events += self._release_if_completed(tx, product, record, events, now)
            if actor is not None and audit is not None:
                tx.add_audit(actor=actor.subject, action=audit, product_id=product.id,
                             target=f"rollout:{record.id}", details=dict(details or {}),
                             now=now)
            return Outcome(self._rollout_view(q, record, machine, now), bus_events)

        return work

    # --- rollouts ------------------------------------------------------------------------

    async def create_rollout(
        self, actor: Actor, product_ref: int | str, fields: Mapping[str, object]
    ) -> RolloutView:
        """Create (and, unless scheduled later, start) a rollout from the CLI-shaped
        ``fields`` (see :func:`rollout_spec`). Like a release, firmware not yet reported
        running on a device of the product needs ``force`` (audit-logged)."""

        def work() -> Outcome:
            actor.require(Permission.MANAGE_DEVICES, "create rollouts")
            spec = rollout_spec(fields)
            spec = dataclasses.replace(
                spec, groups=tuple(sorted({clean_group_name(g) for g in spec.groups}))
            )
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product_ref)
                actor.require_scope(ROLLOUT_SCOPE, product.id, "create rollouts", product.slug)
                firmware = tx.get_firmware(product.id, spec.version)
                if firmware is None:
                    raise UnknownFirmwareError(
                        f"product {product.slug} has no firmware version {spec.version}; "
                        "upload it first"
                    )
                for name in spec.groups:
                    if tx.get_group(product.id, name) is None:
                        raise RolloutRefusedError(
                            f"group {name!r} does not exist in product {product.slug}; "
                            "create it first"
                        )
                if firmware.running_seen_at is None and not spec.force:
                    raise RolloutRefusedError(
                        f"firmware version {spec.version} has not been reported running on "
                        f"any device of product {product.slug}; lock a test device to it and "
                        "let it connect first, or pass force to roll it out anyway"
                    )
                q = RolloutQueries(tx.conn)
                for other in q.list_rollouts(product.id, active_only=True):
                    # One active rollout per scope: the product default, or each group.
                    shared = set(other.groups) & set(spec.groups)
                    if shared or other.groups == spec.groups == ():
                        where = "the product default" if not shared else (
                            f"group(s) {', '.join(sorted(shared))}")
                        raise RolloutConflictError(
                            f"rollout {other.id} (version {other.version}, {other.state}) "
                            f"already covers {where}; abort it or let it complete first"
                        )
                forced = firmware.running_seen_at is None
                placeholder = Rollout("0", spec.policy, now)
                rid = q.insert_rollout(
                    product_id=product.id, version=spec.version, groups=spec.groups,
                    immediate=spec.immediate, plan=spec.policy.plan.to_dict(),
                    criteria=[t.to_dict() for t in spec.policy.thresholds],
                    state=placeholder.state.value, state_data=placeholder.to_dict(),
                    forced=forced, created_by=actor.subject, now=now,
                )
                # The id salts device placement: a fresh sample per rollout (phases.py).
                machine = Rollout(str(rid), spec.policy, now)
                scope = RolloutScope(spec.version, spec.groups, spec.immediate)
                machine.set_targets(self._rollout_targets(tx, product, scope, ()), now)
                events = machine.tick(now)
                record = self._rollout_record(q, product, rid)
                bus_events = self._save_rollout(q, product, record, machine, events, now)
                bus_events += self._release_if_completed(tx, product, record, events, now)
                self.note_rollout_product(product.id)
                tx.add_audit(
                    actor=actor.subject,
                    action="rollout.create.forced" if forced else "rollout.create",
                    product_id=product.id,
                    target=f"rollout:{rid}",
                    details={"version": spec.version, "groups": list(spec.groups),
                             "immediate": spec.immediate, "force": spec.force,
                             "policy": spec.policy.to_dict(), "targets": len(machine.targets)},
                    now=now,
                )
                view = self._rollout_view(q, record, machine, now)
            return Outcome(view, bus_events)

        return await self._run(work)

    async def get_rollout(self, product_ref: int | str, rollout_id: object) -> RolloutView:
        """One rollout with its counts now and its latest events."""

        def work() -> RolloutView:
            now = self.clock()
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                q = RolloutQueries(tx.conn)
                record = self._rollout_record(q, product, rollout_id)
                machine = self._rollout_machine(tx, q, product, record)
                return self._rollout_view(q, record, machine, now)

        return await self._read(work)

    async def list_rollouts(
        self, product_ref: int | str, *, version: object = None
    ) -> list[RolloutView]:
        """A product's rollouts, newest first (optionally of one firmware version)."""

        def work() -> list[RolloutView]:
            now = self.clock()
            wanted = None if version is None else check_version(version)
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                q = RolloutQueries(tx.conn)
                records = q.list_rollouts(product.id, version=wanted)
                inputs = self._targeting_inputs(tx, product) if records else None
                return [
                    self._rollout_view(
                        q, r, self._rollout_machine(tx, q, product, r, inputs=inputs), now)
                    for r in records
                ]

        return await self._read(work)

    async def pause_rollout(self, actor: Actor, product_ref: int | str, rollout_id: object,
                            reason: str | None = None) -> RolloutView:
        """Stop new offers until resumed (transfers in progress finish)."""
        why = None if reason is None else clean_text(reason, "reason", 500)
        return await self._run(functools.partial(
            self._change_rollout, product_ref, rollout_id,
            lambda m, now: m.pause(actor.subject, now, why or None),
            actor=actor, audit="rollout.pause", details={"reason": why},
        ))

    async def resume_rollout(self, actor: Actor, product_ref: int | str,
                             rollout_id: object) -> RolloutView:
        """Resume a paused rollout (thresholds crossed so far are acknowledged)."""
        return await self._run(functools.partial(
            self._change_rollout, product_ref, rollout_id,
            lambda m, now: m.resume(actor.subject, now),
            actor=actor, audit="rollout.resume",
        ))

    async def abort_rollout(self, actor: Actor, product_ref: int | str, rollout_id: object,
                            reason: str | None = None) -> RolloutView:
        """Stop new offers at once; the ABORTED event lists the devices to discard."""
        why = None if reason is None else clean_text(reason, "reason", 500)
        return await self._run(functools.partial(
            self._change_rollout, product_ref, rollout_id,
            lambda m, now: m.abort(actor.subject, now, why or None),
            actor=actor, audit="rollout.abort", details={"reason": why},
        ))

    async def record_rollout_outcome(
        self, product_ref: int | str, rollout_id: object, device_id: str, outcome: object
    ) -> RolloutView:
        """Record what a device did with the rollout's firmware (the OTA engine calls this;
        no operator involved)."""
        return await self._run_grouped(
            self.rollout_outcome_work(product_ref, rollout_id, device_id, outcome)
        )

    def rollout_outcome_work(
        self, product_ref: int | str, rollout_id: object, device_id: str, outcome: object
    ) -> Callable[[Tx], Outcome]:
        """The store work of :meth:`record_rollout_outcome`, to run group-committed
        (``run_write``) or in one transaction with the device's other OTA writes."""
        device = normalize_device_id(device_id)

        def apply(machine: Rollout, now: int) -> list[RolloutEvent]:
            return machine.record_outcome(device, outcome, now)

        return self._rollout_change_work(product_ref, rollout_id, apply)

    async def tick_rollout(self, product_ref: int | str, rollout_id: object) -> RolloutView:
        """Let time pass for one rollout (scheduled start, phase waits, reboot timeouts)."""
        return await self._run(self._change_rollout, product_ref, rollout_id, lambda m, now: [])

    async def tick_active_rollouts(self) -> list[RolloutView]:
        """Tick every scheduled, running or paused rollout of every product (what a periodic
        task calls: scheduled starts, phase waits and reboot timeouts need time only).
        Each rollout is its own transaction; one that another process just finished is
        skipped."""

        views = []
        running, steering = await self._read(self._active_rollouts)
        # What this process knows of other processes' rollouts is refreshed here.
        self._set_rollout_products(steering)
        for product_id, rollout_id in running:
            try:
                views.append(await self.tick_rollout(product_id, rollout_id))
            except UnknownRolloutError:  # deleted with its product meanwhile
                continue
        return views

    async def rollout_offer_decision(
        self, product_ref: int | str, rollout_id: object, device_id: str,
        *, force_window: bool = False,
    ) -> Decision:
        """May a new offer of the rollout's firmware start for this device now? Applies the
        device's maintenance windows (its groups' windows, else the product's). A small
        read of the session path: it shares a group read with concurrent callers. An offer
        the decision marks ``forced`` is the caller's to audit (:meth:`audit_forced_offer`)."""

        def work(tx: Tx) -> Decision:
            now = self.clock()
            product = self._product(tx, product_ref)
            device = self._device_in(tx, product, device_id)
            q = RolloutQueries(tx.conn)
            record = self._rollout_record(q, product, rollout_id)
            machine = self._rollout_machine(tx, q, product, record, only=device)
            windows = self._windows_of(q, product)
            applicable = windows_for(device.groups, *windows)
            return machine.may_offer(device.id, now, applicable, force_window=force_window)

        return await self._read_grouped(work)

    async def audit_forced_offer(
        self, actor: Actor, product_ref: int | str, rollout_id: object, device_id: str,
        decision: Decision,
    ) -> None:
        """Audit-log an offer started outside the device's maintenance windows because an
        operator forced it (issue 15: forcing is audit-logged)."""
        if not decision.forced:
            raise ValidationError("only a decision marked forced is audited as forced")

        def work() -> Outcome:
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product_ref)
                device = self._device_in(tx, product, device_id)
                record = self._rollout_record(RolloutQueries(tx.conn), product, rollout_id)
                tx.add_audit(actor=actor.subject, action="rollout.offer.forced_window",
                             product_id=product.id, target=f"device:{device.id}",
                             details={"rollout": record.id, "version": record.version,
                                      "phase": decision.phase},
                             now=now)
            return Outcome(None)

        await self._run(work)

    async def device_rollout_outcomes(self, device_id: str) -> list[DeviceOutcomeRecord]:
        """A device's outcomes in every rollout, newest rollout first."""

        def work() -> list[DeviceOutcomeRecord]:
            with self.store.read() as tx:
                device = self._device(tx, device_id)
                return RolloutQueries(tx.conn).outcomes_of_device(device.id)

        return await self._read(work)

    # --- the OTA engine's side ------------------------------------------------------------

    async def rollouts_may_steer(self, product_id: int) -> bool:
        """False when this process knows the product has no active rollout, so a device
        session asks nothing more than its target (no store read added to it). Known from
        a read at the first ask, this process's own rollouts and the rollout events it
        hears since, and refreshed by every :meth:`tick_active_rollouts` (the main
        process's periodic tick) or, in a process that does not tick (a worker), by a read
        at the first ask once the knowledge is older than ``ROLLOUT_PRODUCTS_MAX_AGE``."""
        known: set[int] | None = self.__dict__.get("_rollout_products")
        loaded_at: float = self.__dict__.get("_rollout_products_at", 0.0)
        if known is None or trio.current_time() - loaded_at > ROLLOUT_PRODUCTS_MAX_AGE:
            _, steering = await self._read(self._active_rollouts)
            self._set_rollout_products(steering)
            known = self.__dict__["_rollout_products"]
            assert known is not None
        return product_id in known

    def _set_rollout_products(self, products: set[int]) -> None:
        self.__dict__["_rollout_products"] = products
        self.__dict__["_rollout_products_at"] = trio.current_time()

    def _active_rollouts(self) -> tuple[list[tuple[int, int]], set[int]]:
        """(product id, rollout id) of every scheduled, running or paused rollout, and the
        products where a rollout may steer a device: those, and those with an aborted
        rollout that still keeps its succeeded devices on its version (:func:`_keeps`)."""
        with self.store.read() as tx:
            q = RolloutQueries(tx.conn)
            active: list[tuple[int, int]] = []
            steering: set[int] = set()
            for product in tx.list_products():
                records = q.list_rollouts(product.id)
                for record in records:
                    if record.state in _STEERING_STATES:
                        active.append((product.id, record.id))
                        steering.add(product.id)
                aborted = [r for r in records if r.state == State.ABORTED.value]
                if aborted and product.id not in steering:
                    released = _release_times(tx.list_releases(product.id))
                    if any(_keeps(r, released) for r in aborted):
                        steering.add(product.id)
            return active, steering

    def note_rollout_product(self, product_id: int, active: bool = True) -> None:
        """Note that the product has (or, ``active`` False, has no) active rollout: what
        :meth:`rollouts_may_steer` answers from (another process's rollout events, relayed
        to this one, are noted by the OTA engine as they arrive)."""
        known: set[int] | None = self.__dict__.get("_rollout_products")
        if known is None:
            return  # unknown: every product may have one until the first tick
        if active:
            known.add(product_id)
        else:
            known.discard(product_id)

    async def rollout_offer(self, device: DeviceRecord,
                            product: ProductRecord) -> RolloutOffer | None:
        """What the product's active rollout says of ``device``'s target (None: no active
        rollout decides its firmware), applying its maintenance windows. One group read
        (shared with concurrent sessions); the OTA engine asks it only when
        :meth:`rollouts_may_steer`."""

        def work(tx: Tx) -> RolloutOffer | None:
            return self._rollout_offer_in(tx, device, product, self.clock())

        return await self._read_grouped(work)

    def _rollout_offer_in(self, tx: Tx, device: DeviceRecord, product: ProductRecord,
                          now: int) -> RolloutOffer | None:
        q = RolloutQueries(tx.conn)
        every = q.list_rollouts(product.id)
        records = [r for r in every if r.state in _STEERING_STATES]
        release_records = tx.list_releases(product.id) if every else []
        released = _release_times(release_records)
        keeping = [r for r in every
                   if r.state == State.ABORTED.value and _keeps(r, released)]
        if not records and not keeping:
            self.note_rollout_product(product.id, active=False)
            return None
        releases = releases_of(release_records)
        targeting = targeting_of(device)
        active = self._active_offer(tx, q, device, product, records, releases, targeting, now)
        if active is not None and active.steers:
            return active
        # No active rollout steers the device now (none decides it, or its phase is not
        # open yet): one aborted earlier that it succeeded in keeps it on that version.
        kept = self._kept_offer(tx, device, product, keeping, releases, released, targeting,
                                now)
        return kept or active

    def _kept_offer(self, tx: Tx, device: DeviceRecord, product: ProductRecord,
                    keeping: list[RolloutRecord], releases: ProductReleases,
                    released: Mapping[str | None, int], targeting: DeviceTargeting,
                    now: int) -> RolloutOffer | None:
        """The newest aborted rollout that keeps ``device`` on its version: the device
        succeeded in it, still runs that version, and its release (product default or
        the group deciding it) was not made again since the abort. An operator's lock,
        or a release made after the abort, ends it (issue 15, as hawkBit and AWS IoT Jobs:
        an abort never downgrades devices that installed the version)."""
        for record in sorted(keeping, key=lambda r: (not r.groups, -r.id)):
            if device.firmware_version != record.version:
                continue  # it left the version since (a lock, a later release): not kept
            scope = self._rollout_scope(record)
            overlay = scope.overlay(releases)
            touched = record.state_data.get("devices", {})
            if device.id not in touched or not scope.decides(
                    device.id, targeting, device.firmware_version, overlay, touched):
                continue
            target = target_firmware_for(targeting, overlay)
            aborted_at = _aborted_at(record)
            if released.get(target.group if record.groups else None, -1) > aborted_at:
                continue  # its release was made again after the abort: that one rules
            machine = Rollout.from_dict(record.state_data)  # no target set: not needed
            decision = machine.may_offer(device.id, now)
            if decision.verdict is Verdict.SUCCEEDED:
                return RolloutOffer(product.id, record.id, target,
                                    tx.get_firmware(product.id, record.version), decision)
        return None

    def _active_offer(self, tx: Tx, q: RolloutQueries, device: DeviceRecord,
                      product: ProductRecord, records: list[RolloutRecord],
                      releases: ProductReleases, targeting: DeviceTargeting,
                      now: int) -> RolloutOffer | None:
        """What the first active rollout that decides the device's firmware says."""
        windows = None
        # Group rollouts first: a group release wins over the product default (precedence),
        # and decides() tells each rollout's own devices apart.
        for record in sorted(records, key=lambda r: not r.groups):
            scope = self._rollout_scope(record)
            overlay = scope.overlay(releases)
            touched = record.state_data.get("devices", {})
            if not scope.decides(device.id, targeting, device.firmware_version, overlay,
                                 touched):
                continue
            machine = self._rollout_machine(tx, q, product, record, only=device)
            windows = windows or self._windows_of(q, product)
            decision = machine.may_offer(device.id, now, windows_for(device.groups, *windows))
            return RolloutOffer(product.id, record.id, target_firmware_for(targeting, overlay),
                                tx.get_firmware(product.id, record.version), decision)
        return None

    def claim_rollout_offer_work(self, product_id: int, rollout_id: int,
                                 device_id: str) -> Callable[[Tx], Outcome]:
        """The store work that asks the rollout again, with its whole target set and in
        the write that records it, whether an offer to the device may start, and records
        it ``offered`` when so (the rate limit and phases then hold under concurrent
        sessions). Its value is the :class:`Decision`."""
        device = normalize_device_id(device_id)

        def work(tx: Tx) -> Outcome:
            now = self.clock()
            product = self._product(tx, product_id)
            member = self._device_in(tx, product, device)
            q = RolloutQueries(tx.conn)
            record = self._rollout_record(q, product, rollout_id)
            machine = self._rollout_machine(tx, q, product, record)
            events = machine.tick(now)
            windows = self._windows_of(q, product)
            decision = machine.may_offer(member.id, now, windows_for(member.groups, *windows))
            if decision.allowed:
                events += machine.record_outcome(member.id, "offered", now)
            bus_events = self._save_rollout(q, product, record, machine, events, now)
            bus_events += self._release_if_completed(tx, product, record, events, now)
            return Outcome(decision, bus_events)

        return work

    def rollout_step_work(self, product_id: int, rollout_id: int, device_id: str,
                          outcome: str) -> Callable[[Tx], Outcome]:
        """:meth:`rollout_outcome_work` to ride on the OTA engine's own writes: a rollout
        deleted meanwhile, or a device it no longer places, records nothing instead of
        failing the write it rides on."""
        work = self.rollout_outcome_work(product_id, rollout_id, device_id, outcome)

        def step(tx: Tx) -> Outcome:
            try:
                return work(tx)
            except (NotFoundError, RolloutOutcomeError,
                    RolloutConflictError):
                return Outcome(None)

        return step

    def device_result_work(self, product_id: int, device_id: str,
                           outcome: str) -> Callable[[Tx], Outcome]:
        """The store work recording how a device's update ended (``succeeded``,
        ``rolled_back``, ``image_refused``) in the rollout that has its firmware in flight
        (the newest one), if any: after a reboot the session that hears the result may be
        another process's, so the rollout is found in the store, not in memory."""
        device = normalize_device_id(device_id)

        def work(tx: Tx) -> Outcome:
            for record in RolloutQueries(tx.conn).outcomes_of_device(device):
                if record.outcome in _IN_FLIGHT_NAMES:
                    return self.rollout_step_work(product_id, record.rollout_id, device,
                                                  outcome)(tx)
            return Outcome(None)

        return work

__all__ = ["RolloutOffer", "RolloutService", "RolloutSpec", "RolloutView", "rollout_spec"]
