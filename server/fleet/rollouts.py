"""Safe rollouts (issue 15): :class:`RolloutService`, the OTA engine's side (what a
rollout says of a device's target: offers, windows, what an abort keeps; claiming offers,
recording device outcomes, letting time pass) over the operator's side
(:mod:`server.fleet.rollout_operations`) and their shared loading and saving
(:mod:`server.fleet.rollout_base`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import trio

from otacore.errors import NotFoundError, ValidationError
from otacore.precedence import DeviceTargeting, ProductReleases, target_firmware_for
from otacore.rollout import Decision, Rollout, RolloutEvent, State, Verdict, windows_for
from otacore.rollout.errors import RolloutOutcomeError
from otacore.rollout.outcomes import IN_FLIGHT
from otacore.rollout.outcomes import Outcome as DeviceOutcome
from otacore.rollout.spec import RolloutSpec, rollout_spec
from server.fleet.base import Outcome, normalize_device_id, releases_of, targeting_of
from server.fleet.errors import RolloutConflictError, UnknownRolloutError
from server.fleet.roles import Actor
from server.fleet.rollout_base import (
    _STEERING_STATES,
    ROLLOUT_EVENT_PREFIX,
    ROLLOUT_PRODUCTS_MAX_AGE,
    RolloutBase,
    RolloutOffer,
    RolloutView,
    progress_of,
)
from server.fleet.rollout_operations import RolloutOperations
from server.store import DeviceRecord, ProductRecord, ReleaseRecord, Tx
from server.store.tx_rollouts import (
    DeviceOutcomeRecord,
    ProgressRow,
    RolloutQueries,
    RolloutRecord,
)

#: Names of the statuses of a device with the rollout's firmware on its way.
_IN_FLIGHT_NAMES = frozenset(o.value for o in IN_FLIGHT)
#: The stored status of a device that installed the rollout's version and passed its
#: self-test.
_SUCCEEDED = DeviceOutcome.SUCCEEDED.value
#: Statuses in an aborted rollout that keep its product's sessions asking it (the OTA
#: engine records outcomes only where a rollout may steer).
_KEPT_OR_ARRIVING = frozenset({_SUCCEEDED, DeviceOutcome.REBOOTING.value})


def _progress_row(record: DeviceOutcomeRecord) -> ProgressRow:
    return (record.device_id, record.phase, record.outcome, record.failures,
            record.held_until, record.updated_at)


def _release_times(records: Collection[ReleaseRecord]) -> dict[str | None, int]:
    """When each of a product's releases was last made, by group name (None: the product
    default)."""
    return {r.group_name: r.released_at for r in records}


def _aborted_at(record: RolloutRecord) -> int:
    """When an aborted rollout was aborted (its last change, for states saved before the
    abort time was kept)."""
    at = record.state_data.get("aborted_at")
    return int(at) if isinstance(at, int) else record.updated_at


def _aborted_keeping(q: RolloutQueries, product_id: int | None) -> list[RolloutRecord]:
    """A product's (None: every product's) aborted rollouts that may keep devices on their
    version: some device succeeded in it, or was rebooting into it at the abort (it
    installed the image; its outcome still arrives and is recorded, so it may be kept
    too). Found in SQL: past rollouts without such a device are not even read."""
    return q.list_rollouts(product_id, states=(State.ABORTED.value,),
                           with_outcomes=_KEPT_OR_ARRIVING)


def _keeps(record: RolloutRecord, released: Mapping[str | None, int]) -> bool:
    """True when an aborted rollout of :func:`_aborted_keeping` still keeps devices on its
    version: not every release it would have made was made again since the abort (see
    ``RolloutService._kept_offer`` for the rule per device)."""
    aborted_at = _aborted_at(record)
    scopes: tuple[str | None, ...] = record.groups or (None,)
    return any(released.get(scope, -1) <= aborted_at for scope in scopes)



class RolloutService(RolloutOperations, RolloutBase):
    """Rollouts of products: the operator's side (inherited), the OTA engine's side (here)
    and, inherited, maintenance windows."""

    async def record_rollout_outcome(
        self, product_ref: int | str, rollout_id: object, device_id: str, outcome: object
    ) -> RolloutView:
        """Record what a device did with the rollout's firmware (the OTA engine calls this;
        no operator involved)."""
        return await self._run_grouped(
            self.rollout_outcome_work(product_ref, rollout_id, device_id, outcome)
        )

    def rollout_outcome_work(
        self, product_ref: int | str, rollout_id: object, device_id: str, outcome: object,
        *, with_view: bool = True,
    ) -> Callable[[Tx], Outcome]:
        """The store work of :meth:`record_rollout_outcome`, to run group-committed
        (``run_write``) or in one transaction with the device's other OTA writes (whose
        callers need no view: ``with_view`` False)."""
        device = normalize_device_id(device_id)

        def apply(machine: Rollout, now: int) -> list[RolloutEvent]:
            return machine.record_outcome(device, outcome, now)

        return self._rollout_change_work(product_ref, rollout_id, apply, device_id=device,
                                         with_view=with_view)

    async def tick_rollout(self, product_ref: int | str, rollout_id: object) -> RolloutView:
        """Let time pass for one rollout (scheduled start, phase waits, reboot timeouts)."""
        return await self._run(self._change_rollout, product_ref, rollout_id, lambda m, now: [])

    async def tick_active_rollouts(self) -> list[RolloutView]:
        """Tick every scheduled, running or paused rollout of every product (what a periodic
        task calls: scheduled starts, phase waits and reboot timeouts need time only).
        Each rollout is its own transaction; one that another process just finished is
        skipped."""

        views = []
        since = self._rollout_notes_mark()
        running, steering = await self._read(self._active_rollouts)
        # What this process knows of other processes' rollouts is refreshed here.
        self._set_rollout_products(steering, since)
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

    # --- the OTA engine's side ------------------------------------------------------------

    async def rollouts_may_steer(self, product_id: int) -> bool:
        """False when this process knows the product has no active rollout (nor an
        aborted one that still keeps devices on its version, see :meth:`_kept_offer`), so
        a device session asks nothing more than its target (no store read added to it). Known from
        a read at the first ask, this process's own rollouts and the rollout events it
        hears since, and refreshed by every :meth:`tick_active_rollouts` (the main
        process's periodic tick) or, in a process that does not tick (a worker), by a read
        at the first ask once the knowledge is older than ``ROLLOUT_PRODUCTS_MAX_AGE``."""
        known: set[int] | None = self.__dict__.get("_rollout_products")
        loaded_at: float = self.__dict__.get("_rollout_products_at", 0.0)
        if known is None or trio.current_time() - loaded_at > ROLLOUT_PRODUCTS_MAX_AGE:
            since = self._rollout_notes_mark()
            _, steering = await self._read(self._active_rollouts)
            self._set_rollout_products(steering, since)
            known = self.__dict__["_rollout_products"]
            assert known is not None
        return product_id in known

    def _active_rollouts(self) -> tuple[list[tuple[int, int]], set[int]]:
        """(product id, rollout id) of every scheduled, running or paused rollout, and the
        products where a rollout may steer a device: those, and those with an aborted
        rollout that still keeps its succeeded devices on its version (:func:`_keeps`)."""
        with self.store.read() as tx:
            q = RolloutQueries(tx.conn)
            records = q.list_rollouts(None, states=_STEERING_STATES)
            active = [(r.product_id, r.id) for r in reversed(records)]  # oldest first
            steering = {r.product_id for r in records}
            aborted: dict[int, list[RolloutRecord]] = {}
            for record in _aborted_keeping(q, None):
                if record.product_id not in steering:
                    aborted.setdefault(record.product_id, []).append(record)
            for product_id, kept in aborted.items():
                released = _release_times(tx.list_releases(product_id))
                if any(_keeps(r, released) for r in kept):
                    steering.add(product_id)
            return active, steering

    async def rollout_offer(self, device: DeviceRecord,
                            product: ProductRecord) -> RolloutOffer | None:
        """What the product's active rollout says of ``device``'s target (None: no active
        rollout decides its firmware), applying its maintenance windows. One group read
        (shared with concurrent sessions); the OTA engine asks it only when
        :meth:`rollouts_may_steer`."""

        since = self._rollout_notes_mark()

        def work(tx: Tx) -> RolloutOffer | None:
            return self._rollout_offer_in(tx, device, product, self.clock(), since)

        return await self._read_grouped(work)

    def _rollout_offer_in(self, tx: Tx, device: DeviceRecord, product: ProductRecord,
                          now: int, read_since: int | None = None) -> RolloutOffer | None:
        # Only the rollouts that can matter are read (each parsed once): active ones, and
        # aborted ones with a device kept on (or arriving at) their version.
        q = RolloutQueries(tx.conn)
        records = q.list_rollouts(product.id, states=_STEERING_STATES)
        aborted = _aborted_keeping(q, product.id)
        release_records = tx.list_releases(product.id) if records or aborted else []
        released = _release_times(release_records)
        keeping = [r for r in aborted if _keeps(r, released)]
        if not records and not keeping:
            self.note_rollout_product(product.id, active=False, read_since=read_since)
            return None
        releases = releases_of(release_records)
        targeting = targeting_of(device)
        # The device's own progress in each rollout: one read for all of them.
        mine = {o.rollout_id: o for o in q.outcomes_of_device(device.id)}
        active = self._active_offer(tx, q, device, product, records, releases, targeting,
                                    mine, now)
        if active is not None and active.steers:
            return active
        # No active rollout steers the device now (none decides it, or its phase is not
        # open yet): one aborted earlier that it succeeded in keeps it on that version.
        kept = self._kept_offer(tx, device, product, keeping, releases, released, targeting,
                                mine, now)
        return kept or active

    def _kept_offer(self, tx: Tx, device: DeviceRecord, product: ProductRecord,
                    keeping: list[RolloutRecord], releases: ProductReleases,
                    released: Mapping[str | None, int], targeting: DeviceTargeting,
                    mine: Mapping[int, DeviceOutcomeRecord], now: int) -> RolloutOffer | None:
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
            row = mine.get(record.id)
            if row is None or not scope.decides(
                    device.id, targeting, device.firmware_version, overlay, (device.id,)):
                continue
            target = target_firmware_for(targeting, overlay)
            aborted_at = _aborted_at(record)
            if released.get(target.group if record.groups else None, -1) > aborted_at:
                continue  # its release was made again after the abort: that one rules
            machine = Rollout.from_dict(record.state_data, partial=True,  # no target set
                                        progress=progress_of([_progress_row(row)]))
            decision = machine.may_offer(device.id, now)
            if decision.verdict is Verdict.SUCCEEDED:
                return RolloutOffer(product.id, record.id, target,
                                    tx.get_firmware(product.id, record.version), decision)
        return None

    def _active_offer(self, tx: Tx, q: RolloutQueries, device: DeviceRecord,
                      product: ProductRecord, records: list[RolloutRecord],
                      releases: ProductReleases, targeting: DeviceTargeting,
                      mine: Mapping[int, DeviceOutcomeRecord], now: int) -> RolloutOffer | None:
        """What the first active rollout that decides the device's firmware says."""
        windows = None
        # Group rollouts first: a group release wins over the product default (precedence),
        # and decides() tells each rollout's own devices apart.
        for record in sorted(records, key=lambda r: not r.groups):
            scope = self._rollout_scope(record)
            overlay = scope.overlay(releases)
            # Format 1 states (saved before per-device rows) list their devices themselves.
            touched = record.id in mine or device.id in record.state_data.get("devices", {})
            if not scope.decides(device.id, targeting, device.firmware_version, overlay,
                                 (device.id,) if touched else ()):
                continue
            machine = self._rollout_machine(tx, q, product, record, only=device)
            windows = windows or self._windows_of(q, product)
            decision = machine.may_offer(device.id, now, windows_for(device.groups, *windows))
            return RolloutOffer(product.id, record.id, target_firmware_for(targeting, overlay),
                                tx.get_firmware(product.id, record.version), decision)
        return None

    def claim_rollout_offer_work(self, product_id: int, rollout_id: int,
                                 device_id: str) -> Callable[[Tx], Outcome]:
        """The store work that asks the rollout again, in the write that records it,
        whether an offer to the device may start, and records it ``offered`` when so (the
        rate limit and phases then hold under concurrent sessions): from the device's
        placement and the rollout's saved counts when that is exact, else with its whole
        target set (see ``_apply_change``). Its value is the :class:`Decision`."""
        device = normalize_device_id(device_id)

        def work(tx: Tx) -> Outcome:
            now = self.clock()
            product = self._product(tx, product_id)
            member = self._device_in(tx, product, device)
            q = RolloutQueries(tx.conn)
            record = self._rollout_record(q, product, rollout_id)
            windows = windows_for(member.groups, *self._windows_of(q, product))

            def claim(machine: Rollout, at: int) -> tuple[list[RolloutEvent], Decision]:
                decision = machine.may_offer(member.id, at, windows)
                if not decision.allowed:
                    return [], decision
                return machine.record_outcome(member.id, "offered", at), decision

            machine, events, decision = self._apply_change(tx, q, product, record, claim, now,
                                                           device_id=member.id)
            bus_events = self._save_rollout(q, product, record, machine, events, now)
            bus_events += self._release_if_completed(tx, product, record, events, now)
            return Outcome(decision, bus_events)

        return work

    def rollout_step_work(self, product_id: int, rollout_id: int, device_id: str,
                          outcome: str) -> Callable[[Tx], Outcome]:
        """:meth:`rollout_outcome_work` to ride on the OTA engine's own writes: a rollout
        deleted meanwhile, or a device it no longer places, records nothing instead of
        failing the write it rides on."""
        work = self.rollout_outcome_work(product_id, rollout_id, device_id, outcome,
                                         with_view=False)

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


__all__ = [
    "ROLLOUT_EVENT_PREFIX",
    "ROLLOUT_PRODUCTS_MAX_AGE",
    "RolloutOffer",
    "RolloutService",
    "RolloutSpec",
    "RolloutView",
    "rollout_spec",
]
