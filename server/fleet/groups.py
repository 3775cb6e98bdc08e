"""Device groups (tags) of a product, and events published through the API."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from otacore.errors import ValidationError
from otacore.messages import EVENT_NAME_RULE, is_event_name
from server.events import (
    API_COREID,
    DEFAULT_TTL,
    RESERVED_PREFIXES,
    Event,
    EventSource,
    reserved_prefix,
)
from server.fleet.base import FleetBase, Outcome
from server.fleet.errors import DuplicateError, UnknownGroupError
from server.fleet.roles import Actor, Permission
from server.fleet.text import clean_color, clean_group_name, clean_text
from server.store import GroupRecord, ProductRecord, Tx

GROUP_FIELDS = frozenset({"name", "description", "color"})
#: Particle's limits on published events: name up to 64 characters, data up to 1024 bytes.
MAX_EVENT_NAME = 64
MAX_EVENT_DATA = 1024


@dataclass(frozen=True)
class GroupView:
    """A group with its member count and the firmware released to it."""

    record: GroupRecord
    device_count: int
    fw_version: int | None
    intelligent: bool


def _group_views(tx: Tx, product_id: int, groups: list[GroupRecord]) -> list[GroupView]:
    counts = tx.group_device_counts(product_id)
    releases = {r.group_id: r for r in tx.list_releases(product_id) if r.group_id is not None}
    views = []
    for group in groups:
        release = releases.get(group.id)
        views.append(
            GroupView(
                group,
                counts.get(group.id, 0),
                release.version if release else None,
                release.intelligent if release else False,
            )
        )
    return views


class GroupService(FleetBase):
    """Create, list, rename and delete groups; publish API events."""

    def _group(self, tx: Tx, product: ProductRecord, name: str) -> GroupRecord:
        group = tx.get_group(product.id, name)
        if group is None:
            raise UnknownGroupError(f"product {product.slug} has no group {name!r}")
        return group

    async def list_groups(self, product_ref: int | str) -> list[GroupView]:
        """A product's groups by name."""

        def work() -> list[GroupView]:
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                return _group_views(tx, product.id, tx.list_groups(product.id))

        return await self._read(work)

    async def get_group(self, product_ref: int | str, name: str) -> GroupView:
        """One group."""

        def work() -> GroupView:
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                return _group_views(tx, product.id, [self._group(tx, product, name)])[0]

        return await self._read(work)

    async def create_group(
        self, actor: Actor, product_ref: int | str, fields: Mapping[str, object]
    ) -> GroupView:
        """Create a group from ``{name, description, color}``."""

        def work() -> Outcome:
            actor.require(Permission.MANAGE_DEVICES, "create groups")
            self._check_fields(fields)
            name = clean_group_name(fields.get("name"))
            description = clean_text(fields.get("description"), "description", 1000)
            color = clean_color(fields.get("color"))
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product_ref)
                if tx.get_group(product.id, name) is not None:
                    raise DuplicateError(f"product {product.slug} already has a group {name!r}")
                group = tx.insert_group(
                    product.id, name, description=description, color=color, now=now
                )
                tx.add_audit(
                    actor=actor.subject,
                    action="group.create",
                    product_id=product.id,
                    target=f"group:{name}",
                    details={"description": description, "color": color},
                    now=now,
                )
                return Outcome(_group_views(tx, product.id, [group])[0])

        return await self._run(work)

    async def update_group(
        self, actor: Actor, product_ref: int | str, name: str, fields: Mapping[str, object]
    ) -> GroupView:
        """Rename a group or change its description or color."""

        def work() -> Outcome:
            actor.require(Permission.MANAGE_DEVICES, "edit groups")
            self._check_fields(fields)
            if not fields:
                raise ValidationError("nothing to change; give name, description or color")
            changes: dict[str, Any] = {}
            if "name" in fields:
                changes["name"] = clean_group_name(fields["name"])
            if "description" in fields:
                changes["description"] = clean_text(fields["description"], "description", 1000)
            if "color" in fields:
                changes["color"] = clean_color(fields["color"])
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product_ref)
                group = self._group(tx, product, name)
                new_name = changes.get("name", group.name)
                if new_name != group.name and tx.get_group(product.id, new_name) is not None:
                    raise DuplicateError(f"product {product.slug} already has a group {new_name!r}")
                tx.update_group(group.id, changes)
                tx.add_audit(
                    actor=actor.subject,
                    action="group.update",
                    product_id=product.id,
                    target=f"group:{group.name}",
                    details=changes,
                    now=now,
                )
                return Outcome(
                    _group_views(tx, product.id, [self._group(tx, product, new_name)])[0]
                )

        return await self._run(work)

    async def delete_group(self, actor: Actor, product_ref: int | str, name: str) -> None:
        """Delete a group: its devices leave it and its release is withdrawn."""

        def work() -> Outcome:
            actor.require(Permission.MANAGE_DEVICES, "delete groups")
            now = self.clock()
            with self.store.write() as tx:
                product = self._product(tx, product_ref)
                group = self._group(tx, product, name)
                tx.delete_group(group.id)
                tx.add_audit(
                    actor=actor.subject,
                    action="group.delete",
                    product_id=product.id,
                    target=f"group:{group.name}",
                    details={},
                    now=now,
                )
            return Outcome(None)

        await self._run(work)

    @staticmethod
    def _check_fields(fields: Mapping[str, object]) -> None:
        unknown = sorted(set(fields) - GROUP_FIELDS)
        if unknown:
            raise ValidationError(
                f"unknown group field(s) {', '.join(unknown)}; known: name, description, color"
            )

    async def publish_event(
        self,
        actor: Actor,
        product_ref: int | str,
        name: object,
        data: object = None,
        *,
        ttl: object = DEFAULT_TTL,
        private: object = True,
    ) -> Event:
        """Publish an event into a product's stream (coreid "api"), as Particle's API does."""
        actor.require(Permission.MANAGE_DEVICES, "publish events")
        if not isinstance(name, str):
            raise ValidationError(f"event name must be a string of {EVENT_NAME_RULE}")
        if not is_event_name(name):
            # The devices' rule (otacore.messages): no look-alikes of reserved names
            # (Cyrillic or fullwidth letters, a leading space) reach subscribers.
            shown = name if len(name) <= 80 else name[:77] + "..."
            raise ValidationError(
                f"event name {shown!a} must be {EVENT_NAME_RULE}, as device events' are"
            )
        if reserved_prefix(name) is not None:
            # The cloud's own names ("particle", "spark", "ota/"): listeners and stream
            # readers take them for the server's word (a release, a revocation...).
            raise ValidationError(
                f"event name {name!r} is reserved for events the cloud itself publishes "
                f"(names starting with {', '.join(repr(p) for p in RESERVED_PREFIXES)}, "
                "any case); choose another name"
            )
        if data is not None and not isinstance(data, str):
            raise ValidationError("event data must be a string")
        if data is not None:
            try:
                encoded = data.encode()
            except UnicodeEncodeError:  # a lone surrogate (a JSON "\ud800" escape)
                raise ValidationError(
                    "event data is not valid Unicode text (it holds a lone UTF-16 surrogate)"
                ) from None
            if len(encoded) > MAX_EVENT_DATA:
                raise ValidationError(f"event data is longer than {MAX_EVENT_DATA} bytes")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= 16_777_216:
            raise ValidationError("ttl must be a non-negative integer (seconds)")
        if not isinstance(private, bool):
            raise ValidationError("private must be true or false")
        product = await self.get_product_record(product_ref)
        event = Event(
            name,
            data,
            product_id=product.id,
            coreid=API_COREID,
            ttl=ttl,
            public=not private,
            published_at=self.clock(),
            source=EventSource.API,
        )
        self.bus.publish(event)
        return event

    async def get_product_record(self, product_ref: int | str) -> ProductRecord:
        """A product by id or slug (404 when unknown)."""

        def work() -> ProductRecord:
            with self.store.read() as tx:
                return self._product(tx, product_ref)

        return await self._read(work)
