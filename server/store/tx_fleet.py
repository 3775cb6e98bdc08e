"""Store queries on products, devices and groups (portable SQLAlchemy Core)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from server.store import schema as t
from server.store.device_status import UPDATE_STATUSES, status_source
from server.store.records import (
    AuditRecord,
    DeviceRecord,
    DeviceStatusRecord,
    FlashRecord,
    GroupRecord,
    ProductRecord,
    new_row_id,
    record_columns,
    record_from,
)

#: Device columns callers may change through ``update_device``.
DEVICE_MUTABLE = frozenset(
    {
        "name",
        "notes",
        "development",
        "desired_firmware_version",
        "flash_requested",
        "firmware_updates_forced",
        "firmware_updates_enabled",
        "updates_pending",
        "reset_pending",
        "online",
        "session_owner",
        "session_node",
        "session_lease_until",
        "certs_revoked",
        "last_ip_address",
        "last_handshake_at",
        "last_heard_at",
        "platform_id",
        "firmware_version",
        "system_version",
        "modules",
        "last_update_status",
        "last_update_error",
        "last_update_at",
    }
)
PRODUCT_MUTABLE = frozenset({"name", "description", "firmware_updates_forced"})

# Statements of the device-session hot path, built once: SQLAlchemy then only looks up the
# compiled form in its cache and binds the parameters (building a select per call cost
# several times its execution). Rows are read positionally into records.
DEVICE_COLUMNS = record_columns(DeviceRecord, t.devices, skip=("groups",))
_DEVICE_WIDTH = len(DEVICE_COLUMNS)
_PRODUCT_COLUMNS = [
    column.label(f"product_{column.key}") for column in record_columns(ProductRecord, t.products)
]
_PRODUCT_WIDTH = len(_PRODUCT_COLUMNS)
#: A device with one row per group it belongs to (one row with a NULL name when none).
_DEVICE_MEMBERSHIPS = t.devices.outerjoin(
    t.device_groups, t.device_groups.c.device_id == t.devices.c.id
).outerjoin(t.groups, t.groups.c.id == t.device_groups.c.group_id)
_GROUP_NAME = t.groups.c.name.label("member_of")

SELECT_DEVICE = (
    sa.select(*DEVICE_COLUMNS, _GROUP_NAME)
    .select_from(_DEVICE_MEMBERSHIPS)
    .where(t.devices.c.id == sa.bindparam("device_id"))
    .order_by(t.groups.c.name)
)
SELECT_DEVICE_AND_PRODUCT = (
    sa.select(*DEVICE_COLUMNS, *_PRODUCT_COLUMNS, _GROUP_NAME)
    .select_from(_DEVICE_MEMBERSHIPS.join(t.products, t.products.c.id == t.devices.c.product_id))
    .where(t.devices.c.id == sa.bindparam("device_id"))
    .order_by(t.groups.c.name)
)
SELECT_DEVICE_ONLINE = sa.select(t.devices.c.product_id, t.devices.c.online).where(
    t.devices.c.id == sa.bindparam("device_id")
)
# Update statements name their key ``key_*``: a bindparam may not share a column's name.
#: The SET clause comes from the parameter names given at execution (SQLAlchemy compiles
#: and caches one form per set of names).
UPDATE_DEVICE = sa.update(t.devices).where(t.devices.c.id == sa.bindparam("key_device_id"))
#: What a device whose session ended (or whose lease expired) is left with.
_NO_SESSION = {"online": False, "session_owner": None, "session_node": None,
               "session_lease_until": None}
CLEAR_PRESENCE = (
    sa.update(t.devices)
    .where(t.devices.c.id == sa.bindparam("key_device_id"),
           t.devices.c.session_owner == sa.bindparam("key_owner"),
           # NULL (no node) matches NULL: a presence written without a session lease.
           t.devices.c.session_node.is_not_distinct_from(sa.bindparam("key_node")))
    .values(**_NO_SESSION, last_heard_at=sa.bindparam("now"), updated_at=sa.bindparam("now"))
)


def session_owner_range(origin: str) -> tuple[str, str]:
    """The session owners of process ``origin`` as the half-open range ``[low, high)``:
    its sessions' tokens are "<origin>/<serial>", and in byte order exactly the strings
    that start with "<origin>/" lie from "<origin>/" to "<origin>0" ("0" follows "/" in
    ASCII, and an origin holds no "/"). A range, unlike ``substr``, bounds a search of the
    index on (node, owner); unlike ``LIKE`` it gives "_" and "%" (a node id may hold "_")
    no meaning. It needs the owner column in byte order: BINARY on SQLite, collation "C"
    on PostgreSQL (``schema.devices``), as a language collation may ignore the "/".
    ValueError for an origin that cannot name a process."""
    if not origin or "/" in origin:
        raise ValueError(f"a process origin is non-empty and holds no '/', not {origin!r}")
    return f"{origin}/", f"{origin}0"


def held_by_process(node: Any, owner_low: Any, owner_high: Any) -> sa.ColumnElement[bool]:
    """Devices whose session lease ``node`` holds for a session of one of its processes:
    the owner in ``[owner_low, owner_high)`` of :func:`session_owner_range` (values or bind
    parameters). The one predicate of a process's sessions, so that its renewal and the
    release of a dead process's sessions agree; index ``ix_devices_session_node_owner``
    serves it reading that process's rows only."""
    owner = t.devices.c.session_owner
    return sa.and_(t.devices.c.session_node == node, owner >= owner_low, owner < owner_high)


#: One server process's renewal of its sessions' leases: one statement per process and
#: period, whatever the number of sessions; each process of a node renews only its own, so
#: a hung or dead process's leases run out (:func:`held_by_process`).
RENEW_SESSION_LEASES = (
    sa.update(t.devices)
    .where(held_by_process(sa.bindparam("key_node"), sa.bindparam("key_owner_low"),
                           sa.bindparam("key_owner_high")))
    .values(session_lease_until=sa.bindparam("until"))
    .returning(t.devices.c.id, t.devices.c.session_owner)
)
#: The sweeper: every device whose session lease expired is offline (one statement; the
#: rows it changed are the devices that went offline, each reported once). A session owner
#: without a lease was written by a server older than leases (schema revision 0003): no
#: live session renews it.
SWEEP_EXPIRED_SESSIONS = (
    sa.update(t.devices)
    .where(sa.or_(t.devices.c.session_lease_until < sa.bindparam("now"),
                  sa.and_(t.devices.c.session_owner.is_not(None),
                          t.devices.c.session_lease_until.is_(None))))
    .values(**_NO_SESSION, updated_at=sa.bindparam("now"))
    .returning(t.devices.c.id, t.devices.c.product_id)
)
SELECT_PRODUCT_BY_ID = sa.select(*record_columns(ProductRecord, t.products)).where(
    t.products.c.id == sa.bindparam("product_id")
)


def _device_from_rows(rows: Sequence[Any]) -> DeviceRecord | None:
    """The device of SELECT_DEVICE(_AND_PRODUCT) rows (group names in the last column)."""
    if not rows:
        return None
    groups = tuple(row[-1] for row in rows if row[-1] is not None)
    return DeviceRecord(*rows[0][:_DEVICE_WIDTH], groups=groups)  # type: ignore[misc]


class FleetQueries:
    """Products, devices and groups; mixed into :class:`server.store.store.Tx`."""

    conn: Connection

    # --- products -----------------------------------------------------------------------

    def insert_product(
        self, *, slug: str, name: str, platform_id: int, description: str, now: int
    ) -> ProductRecord:
        """Create a product; the caller checks the slug is free."""
        result = self.conn.execute(
            sa.insert(t.products).values(
                slug=slug,
                name=name,
                platform_id=platform_id,
                description=description,
                firmware_updates_forced=False,
                created_at=now,
            )
        )
        product_id = new_row_id(result)
        product = self.get_product(product_id)
        assert product is not None
        return product

    def get_product(self, ref: int | str) -> ProductRecord | None:
        """A product by numeric id or by slug."""
        if isinstance(ref, int):
            found = self.conn.execute(SELECT_PRODUCT_BY_ID, {"product_id": ref}).first()
            return None if found is None else ProductRecord(*found)
        if ref.isascii() and ref.isdigit() and len(ref) <= 18:  # fits SQLite's integers
            where = sa.or_(t.products.c.id == int(ref), t.products.c.slug == ref)
        else:
            where = t.products.c.slug == ref
        row = self.conn.execute(sa.select(t.products).where(where)).mappings().first()
        return None if row is None else record_from(ProductRecord, row)

    def list_products(self) -> list[ProductRecord]:
        """Every product, by id."""
        rows = self.conn.execute(sa.select(t.products).order_by(t.products.c.id)).mappings()
        return [record_from(ProductRecord, row) for row in rows]

    def update_product(self, product_id: int, fields: dict[str, Any]) -> None:
        """Change product columns listed in PRODUCT_MUTABLE."""
        unknown = set(fields) - PRODUCT_MUTABLE
        if unknown:
            raise ValueError(f"product columns {sorted(unknown)} cannot be changed")
        self.conn.execute(
            sa.update(t.products).where(t.products.c.id == product_id).values(**fields)
        )

    # --- devices ------------------------------------------------------------------------

    def _groups_of(self, device_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
        found: dict[str, list[str]] = {device_id: [] for device_id in device_ids}
        if not device_ids:
            return {}
        query = (
            sa.select(t.device_groups.c.device_id, t.groups.c.name)
            .join(t.groups, t.groups.c.id == t.device_groups.c.group_id)
            .where(t.device_groups.c.device_id.in_(list(device_ids)))
            .order_by(t.groups.c.name)
        )
        for device_id, name in self.conn.execute(query):
            found[device_id].append(name)
        return {device_id: tuple(names) for device_id, names in found.items()}

    def _devices_from_rows(self, rows: Iterable[Any]) -> list[DeviceRecord]:
        rows = list(rows)
        groups = self._groups_of([row["id"] for row in rows])
        return [record_from(DeviceRecord, row, groups=groups[row["id"]]) for row in rows]

    def get_device(self, device_id: str) -> DeviceRecord | None:
        """A device by id, with its group names."""
        rows = self.conn.execute(SELECT_DEVICE, {"device_id": device_id}).all()
        return _device_from_rows(rows)

    def get_device_and_product(self, device_id: str) -> tuple[DeviceRecord, ProductRecord] | None:
        """A device (with its group names) and its product, in one query."""
        rows = self.conn.execute(SELECT_DEVICE_AND_PRODUCT, {"device_id": device_id}).all()
        device = _device_from_rows(rows)
        if device is None:
            return None
        product = ProductRecord(*rows[0][_DEVICE_WIDTH : _DEVICE_WIDTH + _PRODUCT_WIDTH])
        return device, product

    def get_device_online(self, device_id: str) -> tuple[int, bool] | None:
        """(product id, online flag) of a device, or None when it does not exist."""
        row = self.conn.execute(SELECT_DEVICE_ONLINE, {"device_id": device_id}).first()
        return None if row is None else (int(row[0]), bool(row[1]))

    def insert_device(self, device_id: str, product_id: int, now: int) -> None:
        """Add a device to a product with default settings."""
        self.conn.execute(
            sa.insert(t.devices).values(
                id=device_id,
                product_id=product_id,
                name=None,
                notes="",
                development=False,
                desired_firmware_version=None,
                flash_requested=False,
                firmware_updates_forced=False,
                firmware_updates_enabled=True,
                updates_pending=False,
                reset_pending=False,
                online=False,
                certs_revoked=False,
                created_at=now,
                updated_at=now,
            )
        )

    def delete_device(self, device_id: str) -> None:
        """Remove a device (its group memberships, flashes and update state cascade)."""
        self.conn.execute(
            sa.delete(t.device_groups).where(t.device_groups.c.device_id == device_id)
        )
        self.conn.execute(
            sa.delete(t.device_flashes).where(t.device_flashes.c.device_id == device_id)
        )
        self.conn.execute(
            sa.delete(t.device_updates).where(t.device_updates.c.device_id == device_id)
        )
        self.conn.execute(sa.delete(t.devices).where(t.devices.c.id == device_id))

    def update_device(self, device_id: str, fields: dict[str, Any], now: int) -> bool:
        """Change device columns listed in DEVICE_MUTABLE and stamp ``updated_at``; True
        when the device exists (a row was updated)."""
        unknown = fields.keys() - DEVICE_MUTABLE
        if unknown:
            raise ValueError(f"device columns {sorted(unknown)} cannot be changed")
        params = {**fields, "updated_at": now, "key_device_id": device_id}
        return bool(self.conn.execute(UPDATE_DEVICE, params).rowcount)

    def list_devices(
        self,
        product_id: int,
        *,
        id_contains: str | None = None,
        name_contains: str | None = None,
        group_names: Sequence[str] = (),
        online: bool | None = None,
        firmware_version: int | None = None,
        development: bool | None = None,
        locked: bool | None = None,
        update_status: str | None = None,
        offset: int = 0,
        limit: int | None = None,
    ) -> tuple[list[DeviceRecord], int]:
        """One page of a product's devices (by id) matching the filters, and the total: the
        count and the page are one statement each, whatever the filters (``group_names``: in
        any of them; ``firmware_version``: the version the device reports; ``locked``: a
        lock is set; ``update_status``: see :mod:`server.store.device_status`)."""
        where = [t.devices.c.product_id == product_id]
        if id_contains:
            where.append(t.devices.c.id.contains(id_contains.lower(), autoescape=True))
        if name_contains:
            where.append(
                sa.func.lower(t.devices.c.name).contains(name_contains.lower(), autoescape=True)
            )
        if online is not None:
            where.append(t.devices.c.online == online)
        if firmware_version is not None:
            where.append(t.devices.c.firmware_version == firmware_version)
        if development is not None:
            where.append(t.devices.c.development == development)
        if locked is not None:
            lock = t.devices.c.desired_firmware_version
            where.append(lock.is_not(None) if locked else lock.is_(None))
        source: sa.FromClause = t.devices
        if update_status is not None:
            if update_status not in UPDATE_STATUSES:
                raise ValueError(f"unknown update status {update_status!r}")
            status = status_source(product_id)
            source = status.from_clause
            where.append(status.update_status == update_status)
        if group_names:
            members = (
                sa.select(t.device_groups.c.device_id)
                .join(t.groups, t.groups.c.id == t.device_groups.c.group_id)
                .where(t.groups.c.product_id == product_id, t.groups.c.name.in_(list(group_names)))
            )
            where.append(t.devices.c.id.in_(members))
        total = self.conn.execute(
            sa.select(sa.func.count()).select_from(source).where(*where)
        ).scalar_one()
        query = (sa.select(t.devices).select_from(source).where(*where)
                 .order_by(t.devices.c.id).offset(offset))
        if limit is not None:
            query = query.limit(limit)
        return self._devices_from_rows(self.conn.execute(query).mappings()), int(total)

    def device_statuses(
        self, product_id: int, device_ids: Sequence[str]
    ) -> dict[str, DeviceStatusRecord]:
        """The update status and last update outcome of each of a product's devices named
        (one statement)."""
        if not device_ids:
            return {}
        d = t.devices.c
        status = status_source(product_id)
        rows = self.conn.execute(
            sa.select(d.id, status.update_status, d.last_update_status, d.last_update_error,
                      d.last_update_at)
            .select_from(status.from_clause)
            .where(d.product_id == product_id, d.id.in_(list(device_ids)))
        )
        return {str(row[0]): DeviceStatusRecord(str(row[1]), row[2], row[3], row[4])
                for row in rows}

    def device_audit(
        self, device_id: str, *, before_id: int | None = None, limit: int = 25
    ) -> list[AuditRecord]:
        """A device's audit entries (target ``device:<id>``), newest first, older than
        ``before_id`` when given (index ``ix_audit_target``)."""
        query = (
            sa.select(t.audit_log)
            .where(t.audit_log.c.target == f"device:{device_id}")
            .order_by(t.audit_log.c.id.desc())
            .limit(limit)
        )
        if before_id is not None:
            query = query.where(t.audit_log.c.id < before_id)
        return [record_from(AuditRecord, row) for row in self.conn.execute(query).mappings()]

    def device_flashes(self, device_id: str, *, limit: int = 20) -> list[FlashRecord]:
        """A device's flashes (per-device updates asked for), newest first."""
        query = (
            sa.select(*record_columns(FlashRecord, t.device_flashes))
            .where(t.device_flashes.c.device_id == device_id)
            .order_by(t.device_flashes.c.id.desc())
            .limit(limit)
        )
        return [FlashRecord(*row) for row in self.conn.execute(query)]

    def set_device_groups(self, device_id: str, group_ids: Iterable[int]) -> None:
        """Replace a device's group memberships."""
        self.conn.execute(
            sa.delete(t.device_groups).where(t.device_groups.c.device_id == device_id)
        )
        rows = [{"device_id": device_id, "group_id": gid} for gid in sorted(set(group_ids))]
        if rows:
            self.conn.execute(sa.insert(t.device_groups), rows)

    def mark_all_offline(self, now: int) -> int:
        """Set every device offline (an embedded store at start, when no session of any
        process survives); return how many."""
        result = self.conn.execute(
            sa.update(t.devices)
            .where(sa.or_(t.devices.c.online.is_(True), t.devices.c.session_node.is_not(None)))
            .values(**_NO_SESSION, updated_at=now)
        )
        return int(result.rowcount)

    def clear_presence(self, device_id: str, owner: str, now: int,
                       node: str | None = None) -> bool:
        """Mark the device offline if session ``owner`` of ``node`` still holds it; False
        when a newer session (in this process or another, on any node) took it over.
        ``node`` None: a presence written with no node (a store of an older server)."""
        result = self.conn.execute(CLEAR_PRESENCE, {"key_device_id": device_id,
                                                    "key_owner": owner, "key_node": node,
                                                    "now": now})
        return bool(result.rowcount)

    def clear_presence_of_origin(self, origin: str, now: int,
                                 node: str) -> list[tuple[str, int]]:
        """Mark offline every device held by a session of process ``origin`` of ``node``
        (it died without ending them); (device id, product id) of each."""
        return self._end_sessions(held_by_process(node, *session_owner_range(origin)), now)

    def release_node_sessions(self, node: str, now: int) -> list[tuple[str, int]]:
        """Mark offline every device whose session lease ``node`` holds (the node starts:
        no session of its previous incarnation survives); (device id, product id) of each."""
        return self._end_sessions(t.devices.c.session_node == node, now)

    def _end_sessions(self, where: sa.ColumnElement[bool], now: int) -> list[tuple[str, int]]:
        rows = self.conn.execute(
            sa.update(t.devices).where(where)
            .values(**_NO_SESSION, last_heard_at=now, updated_at=now)
            .returning(t.devices.c.id, t.devices.c.product_id)
        ).all()
        return [(str(device_id), int(product_id)) for device_id, product_id in rows]

    def renew_session_leases(self, node: str, origin: str,
                             until: int) -> list[tuple[str, str]]:
        """Extend to ``until`` (epoch ms) every session lease ``node`` holds for a session
        of process ``origin`` (its session tokens are "<origin>/<serial>"), in one
        statement; (device id, session owner) of each lease renewed: a live session of the
        process missing there lost its lease (the device reconnected elsewhere, to another
        node or another process of this one, or the sweeper found the lease expired)."""
        low, high = session_owner_range(origin)
        rows = self.conn.execute(RENEW_SESSION_LEASES, {
            "key_node": node, "key_owner_low": low, "key_owner_high": high, "until": until})
        return [(str(device_id), str(owner)) for device_id, owner in rows]

    def sweep_expired_sessions(self, now: int) -> list[tuple[str, int]]:
        """Mark offline every device whose session lease expired before ``now``; (device
        id, product id) of each."""
        rows = self.conn.execute(SWEEP_EXPIRED_SESSIONS, {"now": now}).all()
        return [(str(device_id), int(product_id)) for device_id, product_id in rows]

    def device_counts_by_version(self, product_id: int) -> dict[int, int]:
        """How many of the product's devices report running each firmware version."""
        query = (
            sa.select(t.devices.c.firmware_version, sa.func.count())
            .where(t.devices.c.product_id == product_id, t.devices.c.firmware_version.is_not(None))
            .group_by(t.devices.c.firmware_version)
        )
        return {int(version): int(count) for version, count in self.conn.execute(query)}

    def devices_locked_to(self, product_id: int, version: int) -> list[str]:
        """Ids of the product's devices locked to ``version``."""
        query = sa.select(t.devices.c.id).where(
            t.devices.c.product_id == product_id, t.devices.c.desired_firmware_version == version
        )
        return [row[0] for row in self.conn.execute(query)]

    # --- groups ---------------------------------------------------------------------------

    def get_group(self, product_id: int, name: str) -> GroupRecord | None:
        """A group by product and name."""
        row = (
            self.conn.execute(
                sa.select(t.groups).where(
                    t.groups.c.product_id == product_id, t.groups.c.name == name
                )
            )
            .mappings()
            .first()
        )
        return None if row is None else record_from(GroupRecord, row)

    def list_groups(self, product_id: int) -> list[GroupRecord]:
        """A product's groups, by name."""
        rows = self.conn.execute(
            sa.select(t.groups).where(t.groups.c.product_id == product_id).order_by(t.groups.c.name)
        ).mappings()
        return [record_from(GroupRecord, row) for row in rows]

    def group_device_counts(self, product_id: int) -> dict[int, int]:
        """Group id -> number of member devices, for a product's groups."""
        query = (
            sa.select(t.device_groups.c.group_id, sa.func.count())
            .join(t.groups, t.groups.c.id == t.device_groups.c.group_id)
            .where(t.groups.c.product_id == product_id)
            .group_by(t.device_groups.c.group_id)
        )
        return {int(gid): int(count) for gid, count in self.conn.execute(query)}

    def insert_group(
        self, product_id: int, name: str, *, description: str, color: str, now: int
    ) -> GroupRecord:
        """Create a group; the caller checks the name is free."""
        self.conn.execute(
            sa.insert(t.groups).values(
                product_id=product_id,
                name=name,
                description=description,
                color=color,
                created_at=now,
            )
        )
        group = self.get_group(product_id, name)
        assert group is not None
        return group

    def update_group(self, group_id: int, fields: dict[str, Any]) -> None:
        """Change a group's name, description or color."""
        unknown = set(fields) - {"name", "description", "color"}
        if unknown:
            raise ValueError(f"group columns {sorted(unknown)} cannot be changed")
        self.conn.execute(sa.update(t.groups).where(t.groups.c.id == group_id).values(**fields))

    def delete_group(self, group_id: int) -> None:
        """Delete a group, its memberships and its release."""
        self.conn.execute(sa.delete(t.device_groups).where(t.device_groups.c.group_id == group_id))
        self.conn.execute(sa.delete(t.releases).where(t.releases.c.group_id == group_id))
        self.conn.execute(sa.delete(t.groups).where(t.groups.c.id == group_id))

    def ensure_groups(self, product_id: int, names: Iterable[str], now: int) -> list[GroupRecord]:
        """The named groups of a product, creating the missing ones (Particle does so too)."""
        found = []
        for name in sorted(set(names)):
            group = self.get_group(product_id, name)
            if group is None:
                group = self.insert_group(product_id, name, description="", color="", now=now)
            found.append(group)
        return found
