"""Store queries of safe rollouts (issue 15): rollouts, per-device outcomes, rollout events
and maintenance windows (see the tables at the end of ``schema.py``).

:class:`RolloutQueries` is shaped like the other ``Tx`` mix-ins (it needs only ``conn``);
until it is mixed into ``Tx``, wrap a transaction's connection: ``RolloutQueries(tx.conn)``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from otacore.rollout.outcomes import FAILURES
from server.store import schema as t

_R = t.rollouts
_O = t.rollout_device_outcomes
_E = t.rollout_events
_W = t.maintenance_windows
#: Latest outcomes that are failures.
FAILED_OUTCOMES = tuple(sorted(o.value for o in FAILURES))
#: States in which a rollout may still make offers or change.
ACTIVE_STATES = ("scheduled", "running", "paused")
#: Every state a rollout can be in (what a state filter accepts).
ROLLOUT_STATES = ("scheduled", "running", "paused", "aborted", "completed")
#: One device's stored progress: (device id, phase, outcome or None, failures, held_until,
#: updated_at).
ProgressRow = tuple[str, int, str | None, int, int, int]


@dataclass(frozen=True)
class RolloutRecord:
    """A stored rollout (``state_data`` is the state machine's saved dict)."""

    id: int
    product_id: int
    version: int
    groups: tuple[str, ...]
    immediate: bool
    plan: dict[str, Any]
    criteria: list[dict[str, Any]]
    state: str
    reason: str | None
    state_data: dict[str, Any]
    forced: bool
    created_by: str
    created_at: int
    updated_at: int


@dataclass(frozen=True)
class DeviceOutcomeRecord:
    """A device's latest outcome in one rollout."""

    rollout_id: int
    device_id: str
    phase: int
    outcome: str | None
    failures: int
    held_until: int
    updated_at: int


@dataclass(frozen=True)
class RolloutEventRecord:
    """One stored rollout event."""

    id: int
    rollout_id: int
    at: int
    kind: str
    phase: int | None
    actor: str
    reason: str
    data: dict[str, Any]


@dataclass(frozen=True)
class WindowRecord:
    """A product's (``group`` None) or a group's maintenance window."""

    product_id: int
    group: str | None
    cron: str
    duration_minutes: int
    timezone: str
    updated_by: str
    updated_at: int


class TargetingRow(NamedTuple):
    """What the precedence rules read of one device, and the version it runs (a named
    tuple: 100,000 of them are made at a change)."""

    device_id: str
    development: bool
    locked_version: int | None
    firmware_version: int | None
    groups: frozenset[str]


def _rollout(row: sa.RowMapping) -> RolloutRecord:
    return RolloutRecord(
        id=row["id"],
        product_id=row["product_id"],
        version=row["version"],
        groups=tuple(row["groups"]),
        immediate=bool(row["immediate"]),
        plan=dict(row["plan"]),
        criteria=list(row["criteria"]),
        state=row["state"],
        reason=row["reason"],
        state_data=dict(row["state_data"]),
        forced=bool(row["forced"]),
        created_by=row["created_by"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _scope(group_id: int | None) -> str:
    return "product" if group_id is None else f"group:{group_id}"


class RolloutQueries:
    """Rollout, outcome, event and window queries over one open transaction's connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    # --- rollouts ------------------------------------------------------------------------

    def insert_rollout(
        self,
        *,
        product_id: int,
        version: int,
        groups: Sequence[str],
        immediate: bool,
        plan: Mapping[str, Any],
        criteria: Sequence[Mapping[str, Any]],
        state: str,
        state_data: Mapping[str, Any],
        forced: bool,
        created_by: str,
        now: int,
    ) -> int:
        """Insert a rollout; its id."""
        result = self.conn.execute(
            sa.insert(_R).values(
                product_id=product_id, version=version, groups=sorted(groups),
                immediate=immediate, plan=dict(plan), criteria=[dict(c) for c in criteria],
                state=state, reason=None, state_data=dict(state_data), forced=forced,
                created_by=created_by, created_at=now, updated_at=now,
            )
        )
        pk = result.inserted_primary_key
        assert pk is not None
        return int(pk[0])

    def get_rollout(self, product_id: int, rollout_id: int) -> RolloutRecord | None:
        """One rollout of a product (None: no such rollout in this product)."""
        row = self.conn.execute(
            sa.select(_R).where(_R.c.id == rollout_id, _R.c.product_id == product_id)
        ).mappings().first()
        return None if row is None else _rollout(row)

    def list_rollouts(
        self, product_id: int | None, *, version: int | None = None,
        active_only: bool = False, states: Collection[str] | None = None,
        with_outcomes: Collection[str] | None = None,
    ) -> list[RolloutRecord]:
        """A product's rollouts (``product_id`` None: every product's), newest first;
        optionally of one version, active only, in some ``states``, or with at least one
        device whose latest outcome is one of ``with_outcomes`` (all filters in SQL)."""
        query = sa.select(_R)
        if product_id is not None:
            query = query.where(_R.c.product_id == product_id)
        if version is not None:
            query = query.where(_R.c.version == version)
        if active_only:
            query = query.where(_R.c.state.in_(ACTIVE_STATES))
        if states is not None:
            query = query.where(_R.c.state.in_(list(states)))
        if with_outcomes is not None:
            query = query.where(
                sa.exists().where(_O.c.rollout_id == _R.c.id,
                                  _O.c.outcome.in_(list(with_outcomes)))
            )
        rows = self.conn.execute(query.order_by(_R.c.id.desc())).mappings()
        return [_rollout(row) for row in rows]

    def update_rollout(
        self, rollout_id: int, *, state: str, reason: str | None,
        state_data: Mapping[str, Any], now: int,
    ) -> None:
        """Save a rollout's state machine after a change."""
        self.conn.execute(
            sa.update(_R).where(_R.c.id == rollout_id).values(
                state=state, reason=reason, state_data=dict(state_data), updated_at=now
            )
        )

    def device_targeting(self, product_id: int) -> list[TargetingRow]:
        """Every device of a product with only what a rollout's target set needs (two
        narrow queries instead of full device records: the set is recomputed at every
        rollout change)."""
        d, dg, g = t.devices, t.device_groups, t.groups
        groups: dict[str, set[str]] = {}
        no_groups: frozenset[str] = frozenset()
        for device_id, name in self.conn.execute(
            sa.select(dg.c.device_id, g.c.name)
            .join(g, g.c.id == dg.c.group_id)
            .where(g.c.product_id == product_id)
        ).all():
            groups.setdefault(device_id, set()).add(name)
        rows = self.conn.execute(
            sa.select(d.c.id, d.c.development, d.c.desired_firmware_version,
                      d.c.firmware_version)
            .where(d.c.product_id == product_id)
        ).all()
        named = {device: frozenset(names) for device, names in groups.items()}
        return [
            TargetingRow(device_id, bool(development), locked, running,
                         named.get(device_id, no_groups))
            for device_id, development, locked, running in rows
        ]

    # --- per-device outcomes ---------------------------------------------------------------

    def progress_rows(
        self, rollout_id: int, device_ids: Sequence[str] | None = None
    ) -> list[ProgressRow]:
        """A rollout's stored device progress (all, or of some devices): only the columns
        the state machine reads, as plain tuples (100,000 rows are read at a change)."""
        query = sa.select(_O.c.device_id, _O.c.phase, _O.c.outcome, _O.c.failures,
                          _O.c.held_until, _O.c.updated_at).where(_O.c.rollout_id == rollout_id)
        if device_ids is not None:
            query = query.where(_O.c.device_id.in_(list(device_ids)))
        return [tuple(row) for row in self.conn.execute(query).all()]

    def write_progress(
        self, rollout_id: int, new: Sequence[ProgressRow], changed: Sequence[ProgressRow]
    ) -> None:
        """Insert the ``new`` device rows and update the ``changed`` ones (each statement
        run once for all its rows): a change writes only the devices it touched."""
        if new:
            self.conn.execute(sa.insert(_O), [
                {"rollout_id": rollout_id, "device_id": d, "phase": phase, "outcome": outcome,
                 "failures": failures, "held_until": held, "updated_at": at}
                for d, phase, outcome, failures, held, at in new
            ])
        if changed:
            self.conn.execute(
                sa.update(_O).where(_O.c.rollout_id == rollout_id,
                                    _O.c.device_id == sa.bindparam("key_device"))
                .values(phase=sa.bindparam("phase"), outcome=sa.bindparam("outcome"),
                        failures=sa.bindparam("failures"), held_until=sa.bindparam("held"),
                        updated_at=sa.bindparam("at")),
                [{"key_device": d, "phase": phase, "outcome": outcome, "failures": failures,
                  "held": held, "at": at}
                 for d, phase, outcome, failures, held, at in changed],
            )

    def outcome_counts(self, rollout_id: int, now: int) -> list[tuple[int, str | None, int, int,
                                                                       int]]:
        """(phase, outcome, devices, failures, held) per phase and latest outcome of a
        rollout's stored devices, counted by the database (``held``: failed devices the
        back-off holds at ``now``)."""
        held = sa.func.sum(sa.case((sa.and_(_O.c.held_until > now,
                                            _O.c.outcome.in_(FAILED_OUTCOMES)), 1), else_=0))
        rows = self.conn.execute(
            sa.select(_O.c.phase, _O.c.outcome, sa.func.count(), sa.func.sum(_O.c.failures),
                      held)
            .where(_O.c.rollout_id == rollout_id).group_by(_O.c.phase, _O.c.outcome)
        )
        return [(int(p), o, int(n), int(f or 0), int(h or 0)) for p, o, n, f, h in rows]

    def device_outcomes(
        self, rollout_id: int, device_ids: Sequence[str] | None = None
    ) -> list[DeviceOutcomeRecord]:
        """A rollout's device outcomes (all, or of some devices), by device id."""
        query = sa.select(_O).where(_O.c.rollout_id == rollout_id)
        if device_ids is not None:
            query = query.where(_O.c.device_id.in_(list(device_ids)))
        rows = self.conn.execute(query.order_by(_O.c.device_id)).mappings()
        return [DeviceOutcomeRecord(**dict(row)) for row in rows]

    def outcomes_of_device(self, device_id: str) -> list[DeviceOutcomeRecord]:
        """Every rollout outcome of one device, newest rollout first."""
        rows = self.conn.execute(
            sa.select(_O).where(_O.c.device_id == device_id).order_by(_O.c.rollout_id.desc())
        ).mappings()
        return [DeviceOutcomeRecord(**dict(row)) for row in rows]

    # --- events ----------------------------------------------------------------------------

    def add_rollout_events(self, rollout_id: int, events: Iterable[Mapping[str, Any]]) -> None:
        """Store events (``RolloutEvent.to_dict()`` forms)."""
        rows = [
            {
                "rollout_id": rollout_id, "at": e["at"], "kind": e["kind"],
                "phase": e.get("phase"), "actor": e.get("by", "policy"),
                "reason": e["reason"], "data": dict(e.get("data") or {}),
            }
            for e in events
        ]
        if rows:
            self.conn.execute(sa.insert(_E), rows)

    def rollout_events(self, rollout_id: int, *, limit: int = 200) -> list[RolloutEventRecord]:
        """A rollout's latest events, oldest first."""
        rows = self.conn.execute(
            sa.select(_E).where(_E.c.rollout_id == rollout_id)
            .order_by(_E.c.id.desc()).limit(limit)
        ).mappings()
        return [RolloutEventRecord(**dict(row)) for row in reversed(list(rows))]

    # --- maintenance windows ---------------------------------------------------------------

    def set_window(
        self, product_id: int, group_id: int | None, *, cron: str, duration_minutes: int,
        timezone: str, actor: str, now: int,
    ) -> None:
        """Create or replace the product's or a group's window."""
        scope = _scope(group_id)
        fields = {"cron": cron, "duration_minutes": duration_minutes, "timezone": timezone,
                  "updated_by": actor, "updated_at": now}
        updated = self.conn.execute(
            sa.update(_W).where(_W.c.product_id == product_id, _W.c.scope == scope)
            .values(**fields)
        ).rowcount
        if not updated:
            self.conn.execute(
                sa.insert(_W).values(product_id=product_id, scope=scope, group_id=group_id,
                                     **fields)
            )

    def clear_window(self, product_id: int, group_id: int | None) -> bool:
        """Remove a window; False when there was none."""
        result = self.conn.execute(
            sa.delete(_W).where(_W.c.product_id == product_id, _W.c.scope == _scope(group_id))
        )
        return bool(result.rowcount)

    def list_windows(self, product_id: int) -> list[WindowRecord]:
        """A product's windows: the product's first, then groups' by name."""
        rows = self.conn.execute(
            sa.select(_W, t.groups.c.name.label("group_name"))
            .select_from(_W.outerjoin(t.groups, t.groups.c.id == _W.c.group_id))
            .where(_W.c.product_id == product_id)
        ).mappings()
        records = [
            WindowRecord(
                product_id=row["product_id"], group=row["group_name"], cron=row["cron"],
                duration_minutes=row["duration_minutes"], timezone=row["timezone"],
                updated_by=row["updated_by"], updated_at=row["updated_at"],
            )
            for row in rows
        ]
        return sorted(records, key=lambda w: (w.group is not None, w.group or ""))

    def rollout_links(self, product_id: int) -> dict[int, list[tuple[int, str]]]:
        """Each firmware version's rollouts as (id, state), oldest first: what a firmware
        object links to (one narrow query for a whole firmware listing)."""
        links: dict[int, list[tuple[int, str]]] = {}
        for rollout_id, version, state in self.conn.execute(
            sa.select(_R.c.id, _R.c.version, _R.c.state)
            .where(_R.c.product_id == product_id)
            .order_by(_R.c.id)
        ):
            links.setdefault(version, []).append((rollout_id, state))
        return links
