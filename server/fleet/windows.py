"""Maintenance windows of products and groups (issue 15): set, clear and list them, and
the windows that apply to a device (its groups', else its product's). Offers of a rollout
start only inside them (:mod:`server.fleet.rollouts`)."""

from __future__ import annotations

from otacore.rollout import MaintenanceWindow
from server.fleet.base import FleetBase, Outcome
from server.fleet.errors import RolloutRefusedError, UnknownWindowError
from server.fleet.roles import Actor, Permission
from server.fleet.text import clean_group_name
from server.store import ProductRecord, Tx
from server.store.tx_rollouts import RolloutQueries, WindowRecord

#: Scope needed to change maintenance windows.
WINDOW_SCOPE = "products:update"


def _window_of(record: WindowRecord) -> MaintenanceWindow:
    return MaintenanceWindow(record.cron, record.duration_minutes, record.timezone)


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
            return Outcome(found[0])

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
            return Outcome(None)

        await self._run(work)

    async def list_windows(self, product_ref: int | str) -> list[WindowRecord]:
        """A product's maintenance windows (the product's first, then groups')."""

        def work() -> list[WindowRecord]:
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                return RolloutQueries(tx.conn).list_windows(product.id)

        return await self._read(work)


__all__ = ["WINDOW_SCOPE", "WindowService"]
