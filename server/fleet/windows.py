"""Maintenance windows of products and groups (issue 15): set, clear and list them, and
the windows that apply to a device (its groups', else its product's). Offers of a rollout
start only inside them (:mod:`server.fleet.rollouts`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import trio

from otacore.precedence import TargetReason
from otacore.rollout import MaintenanceWindow
from otacore.rollout.windows import any_open, next_opening, windows_for
from server.events import Event
from server.fleet.base import FleetBase, Outcome
from server.fleet.errors import RolloutRefusedError, UnknownWindowError
from server.fleet.roles import Actor, Permission
from server.fleet.text import clean_group_name
from server.store import ProductRecord, Tx
from server.store import schema as t
from server.store.tx_rollouts import RolloutQueries, WindowRecord

if TYPE_CHECKING:
    from server.fleet.targets import DeviceTarget

#: Scope needed to change maintenance windows.
WINDOW_SCOPE = "products:update"
#: How old (trio seconds) this process's knowledge of which products have windows may be
#: before a session asks the store again (another process may have set one meanwhile).
WINDOW_PRODUCTS_MAX_AGE = 60.0
#: Published (cloud only) when a product's or group's window is set or cleared: engines
#: note the product and re-check the devices a window holds (data: JSON with ``group``
#: and ``cleared``).
WINDOW_CHANGED = "ota/window/changed"
#: The audit action of an operator forcing an offer past a closed maintenance window.
FORCED_WINDOW_ACTION = "window.forced"
#: What the forced action's audit entry says (issue 15: forcing is audit-logged).
FORCED_WINDOW_NOTE = "forced past maintenance window"


@dataclass(frozen=True)
class WindowGate:
    """May a new offer of a release or flash (not a rollout's: its own decision applies
    the windows) start for a device now?"""

    allowed: bool
    #: When (epoch ms) a held offer may start: the next opening of the device's windows.
    retry_at: int | None = None
    #: True when the windows are closed but the operator forced the release or flash.
    forced: bool = False
    detail: str = ""


#: The gate's answer when no window applies (or one is open).
OPEN_GATE = WindowGate(True)


def forced_window_details(**what: Any) -> dict[str, Any]:
    """The details of a forced-past-the-window audit entry."""
    return {"note": FORCED_WINDOW_NOTE, **what}


def _window_of(record: WindowRecord) -> MaintenanceWindow:
    return MaintenanceWindow(record.cron, record.duration_minutes, record.timezone)


def _changed(product_id: int, group: str | None, *, cleared: bool, now: int) -> Event:
    return Event(WINDOW_CHANGED, json.dumps({"group": group, "cleared": cleared}),
                 product_id=product_id, published_at=now)


def window_change_cleared(data: str | None) -> bool:
    """True when a ``WINDOW_CHANGED`` event's data says a window was cleared (unreadable
    data counts as cleared: the reader then re-reads which products have windows)."""
    try:
        parsed = json.loads(data or "")
    except ValueError:
        return True
    return not isinstance(parsed, dict) or parsed.get("cleared") is not False


class WindowService(FleetBase):
    """Maintenance windows of products and groups."""

    @staticmethod
    def _windows_of(
        q: RolloutQueries, product: ProductRecord
    ) -> tuple[MaintenanceWindow | None, dict[str, MaintenanceWindow]]:
        product_window = None
        groups: dict[str, MaintenanceWindow] = {}
        for record in q.list_windows(product.id):
            if record.group is None:
                product_window = _window_of(record)
            else:
                groups[record.group] = _window_of(record)
        return product_window, groups

    def note_window_change(self, product_id: int, cleared: bool) -> None:
        """Another process (or this one) set or cleared a window of the product: a set one
        applies from now; after a clear, whether others remain is read at the next ask."""
        if cleared:
            self.__dict__["_window_products"] = None
        else:
            self._note_window_product(product_id, True)

    def _note_window_product(self, product_id: int, has_window: bool) -> None:
        known: set[int] | None = self.__dict__.get("_window_products")
        if known is None:
            return  # unknown: the first ask reads them all
        if has_window:
            known.add(product_id)
        else:
            known.discard(product_id)

    def _products_with_windows(self) -> set[int]:
        with self.store.read() as tx:
            rows = tx.conn.execute(sa.select(t.maintenance_windows.c.product_id).distinct())
            return {row[0] for row in rows}

    async def windows_may_apply(self, product_id: int) -> bool:
        """False when this process knows the product (and its groups) has no maintenance
        window: a session then pays no store read for the window gate. Known from a read
        at the first ask, refreshed once older than ``WINDOW_PRODUCTS_MAX_AGE``, and kept
        up to date by this process's own set/clear and every process's ``WINDOW_CHANGED``
        events (:meth:`note_window_change`, called by the OTA engine)."""
        known: set[int] | None = self.__dict__.get("_window_products")
        loaded_at: float = self.__dict__.get("_window_products_at", 0.0)
        if known is None or trio.current_time() - loaded_at > WINDOW_PRODUCTS_MAX_AGE:
            known = await self._read(self._products_with_windows)
            self.__dict__["_window_products"] = known
            self.__dict__["_window_products_at"] = trio.current_time()
        return product_id in known

    async def window_gate(self, view: DeviceTarget) -> WindowGate:
        """May the offer ``view`` leads to (its pending flash, else its release or lock
        target) start now? Yes when no window applies to the device (its groups' windows,
        else the product's) or one is open; when they are closed, only if the operator
        forced that flash or release past the window (its newest request says so). No store
        read when this process knows the product has no window. A development device
        is not held: what it runs is its developer's (no release reaches it, rule 1)."""
        if view.device.development or not await self.windows_may_apply(view.product.id):
            return OPEN_GATE

        def work(tx: Tx) -> WindowGate:
            now = self.clock()
            q = RolloutQueries(tx.conn)
            applicable = windows_for(view.device.groups, *self._windows_of(q, view.product))
            if any_open(applicable, now):
                return OPEN_GATE
            detail = ("outside the maintenance window(s): "
                      + "; ".join(w.describe() for w in applicable))
            if self._forced_in(tx, view):
                return WindowGate(True, forced=True, detail=detail)
            return WindowGate(False, next_opening(applicable, now), detail=detail)

        return await self._read_grouped(work)

    @staticmethod
    def _forced_in(tx: Tx, view: DeviceTarget) -> bool:
        """True when the newest request that made the offer (the flash-now of the pending
        flash, else the newest release of the target's version) forced it past the
        window. A later plain request of the same thing withdraws the force."""
        log = t.audit_log
        query = sa.select(log.c.details).where(log.c.product_id == view.product.id)
        if view.pending_flash is not None:
            # The flash's request is audited in its own transaction, at its requested_at.
            query = query.where(log.c.action == "device.update",
                                log.c.target == f"device:{view.device.id}",
                                log.c.at >= view.pending_flash.requested_at)
        elif view.target.version is not None and view.target.reason in (
                TargetReason.GROUP_RELEASE, TargetReason.PRODUCT_DEFAULT):
            query = query.where(log.c.action.in_(("firmware.release", "firmware.release.forced")),
                                log.c.target == f"firmware:{view.target.version}")
        else:
            return False  # a lock without flash-now is never forced
        # Newest first; a few device changes made since the flash are skipped (more than
        # that and the force is not found: the conservative answer, the offer waits).
        for (details,) in tx.conn.execute(query.order_by(log.c.id.desc()).limit(20)):
            if view.pending_flash is not None and not details.get("flash_requested"):
                continue  # a device change that requested no flash
            return bool(details.get("force_window"))
        return False

    def _window_group_id(self, tx: Tx, product: ProductRecord, group: object) -> int | None:
        if group is None:
            return None
        name = clean_group_name(group)
        record = tx.get_group(product.id, name)
        if record is None:
            raise RolloutRefusedError(f"product {product.slug} has no group {name!r}")
        return record.id

    async def set_window(
        self, actor: Actor, product_ref: int | str, *, cron: object, duration: object,
        timezone: object = "UTC", group: object = None,
    ) -> WindowRecord:
        """Set (or replace) the product's maintenance window, or a group's."""

        def work() -> Outcome:
            actor.require(Permission.MANAGE_DEVICES, "set maintenance windows")
            minutes = duration
            if isinstance(minutes, str) and minutes.strip().isdigit():
                minutes = int(minutes)
            window = MaintenanceWindow(str(cron), minutes, str(timezone))  # type: ignore[arg-type]
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product_ref)
                actor.require_scope(WINDOW_SCOPE, product.id, "set maintenance windows",
                                    product.slug)
                group_id = self._window_group_id(tx, product, group)
                q = RolloutQueries(tx.conn)
                q.set_window(product.id, group_id, cron=window.cron,
                             duration_minutes=window.duration_minutes,
                             timezone=window.timezone, actor=actor.subject, now=now)
                tx.add_audit(actor=actor.subject, action="window.set", product_id=product.id,
                             target="product" if group is None else f"group:{group}",
                             details=window.to_dict(), now=now)
                name = None if group is None else clean_group_name(group)
                found = [w for w in q.list_windows(product.id) if w.group == name]
            self._note_window_product(product.id, True)
            return Outcome(found[0], [_changed(product.id, name, cleared=False, now=now)])

        return await self._run(work)

    async def clear_window(self, actor: Actor, product_ref: int | str,
                           group: object = None) -> None:
        """Remove the product's (or a group's) maintenance window."""

        def work() -> Outcome:
            actor.require(Permission.MANAGE_DEVICES, "clear maintenance windows")
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product_ref)
                actor.require_scope(WINDOW_SCOPE, product.id, "clear maintenance windows",
                                    product.slug)
                group_id = self._window_group_id(tx, product, group)
                if not RolloutQueries(tx.conn).clear_window(product.id, group_id):
                    where = "product" if group is None else f"group {group!r}"
                    raise UnknownWindowError(
                        f"the {where} of {product.slug} has no maintenance window"
                    )
                tx.add_audit(actor=actor.subject, action="window.clear", product_id=product.id,
                             target="product" if group is None else f"group:{group}",
                             details={}, now=now)
                still = bool(RolloutQueries(tx.conn).list_windows(product.id))
            self._note_window_product(product.id, still)
            name = None if group is None else clean_group_name(group)
            return Outcome(None, [_changed(product.id, name, cleared=True, now=now)])

        await self._run(work)

    async def list_windows(self, product_ref: int | str) -> list[WindowRecord]:
        """A product's maintenance windows (the product's first, then groups')."""

        def work() -> list[WindowRecord]:
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                return RolloutQueries(tx.conn).list_windows(product.id)

        return await self._read(work)


__all__ = [
    "FORCED_WINDOW_ACTION",
    "FORCED_WINDOW_NOTE",
    "OPEN_GATE",
    "WINDOW_CHANGED",
    "WINDOW_SCOPE",
    "WindowGate",
    "WindowService",
    "forced_window_details",
    "window_change_cleared",
]
