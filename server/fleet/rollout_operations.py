"""Safe rollouts (issue 15), the operator's side: create, show, list, pause, resume and
abort rollouts, and a device's outcomes. :class:`server.fleet.rollouts.RolloutService`
combines it with the OTA engine's side and their shared loading and saving
(:mod:`server.fleet.rollout_base`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

from otacore.errors import ValidationError
from otacore.rollout import Rollout
from otacore.rollout.spec import rollout_spec
from otacore.rollout.targets import RolloutScope
from server.fleet.base import Outcome, check_version
from server.fleet.errors import RolloutConflictError, RolloutRefusedError, UnknownFirmwareError
from server.fleet.roles import Actor, Permission
from server.fleet.rollout_base import (
    ROLLOUT_SCOPE,
    RolloutBase,
    RolloutView,
)
from server.fleet.text import clean_group_name, clean_text
from server.store.tx_rollouts import (
    ACTIVE_STATES,
    ROLLOUT_STATES,
    DeviceOutcomeRecord,
    RolloutQueries,
)


def rollout_states(value: object) -> tuple[str, ...]:
    """Rollout states to list, from a name, comma-separated names or a list of names."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not names:
        raise ValidationError(
            f"state {value!r}: give one or more of {', '.join(ROLLOUT_STATES)}")
    cleaned = tuple(str(n).strip().lower() for n in names)
    unknown = [n for n in cleaned if n not in ROLLOUT_STATES]
    if unknown:
        raise ValidationError(
            f"unknown rollout state(s) {', '.join(map(repr, unknown))}; use "
            f"{', '.join(ROLLOUT_STATES)}")
    return cleaned


class RolloutOperations(RolloutBase):
    """The operator's side of rollouts."""

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
                if record.state not in ACTIVE_STATES:
                    return self._finished_view(q, record, now)
                machine = self._rollout_machine(tx, q, product, record)
                return self._rollout_view(q, record, machine, now)

        return await self._read(work)

    async def list_rollouts(
        self, product_ref: int | str, *, version: object = None, state: object = None
    ) -> list[RolloutView]:
        """A product's rollouts, newest first (optionally of one firmware version, and in
        some states: ``state`` is a state name, several comma-separated, or a list)."""

        def work() -> list[RolloutView]:
            now = self.clock()
            wanted = None if version is None else check_version(version)
            states = None if state is None else rollout_states(state)
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                q = RolloutQueries(tx.conn)
                records = q.list_rollouts(product.id, version=wanted, states=states)
                active = [r for r in records if r.state in ACTIVE_STATES]
                inputs = self._targeting_inputs(tx, product) if active else None
                return [
                    self._rollout_view(
                        q, r, self._rollout_machine(tx, q, product, r, inputs=inputs), now)
                    if r.state in ACTIVE_STATES else self._finished_view(q, r, now)
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

    async def device_rollout_outcomes(self, device_id: str) -> list[DeviceOutcomeRecord]:
        """A device's outcomes in every rollout, newest rollout first."""

        def work() -> list[DeviceOutcomeRecord]:
            with self.store.read() as tx:
                device = self._device(tx, device_id)
                return RolloutQueries(tx.conn).outcomes_of_device(device.id)

        return await self._read(work)
