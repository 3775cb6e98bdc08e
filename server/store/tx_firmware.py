"""Store queries on product firmware, releases, per-device flashes and updates in flight."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from server.store import schema as t
from server.store.records import (
    FirmwareRecord,
    FlashRecord,
    ReleaseRecord,
    UpdateStateRecord,
    new_row_id,
    record_columns,
    record_from,
)

#: Release scope of the product default; a group release's scope is ``group:<group id>``.
PRODUCT_SCOPE = "product"
#: How a completed transfer travelled -> the firmware_transfer_bytes counter it adds to.
_TRANSFER_COUNTERS = {
    "full": "full_transfers",
    "zstd": "compressed_transfers",
    "delta": "delta_transfers",
}


# Statements of the device-session hot path, built once (see tx_fleet.py); rows are read
# positionally into records. Update and delete keys are named ``key_*``: a bindparam may
# not share the name of a column of the table it changes.
_FLASH = t.device_flashes
_UPDATES = t.device_updates
_BYTES = t.firmware_transfer_bytes
#: Statuses of a flash still to be delivered (written as ORs, not IN: an IN list is
#: re-expanded at every execution).
_FLASH_OPEN = sa.or_(_FLASH.c.status == "pending", _FLASH.c.status == "started")

_FIRMWARE_COLUMNS = record_columns(FirmwareRecord, t.firmware)
_RELEASE_COLUMNS = record_columns(
    ReleaseRecord, t.releases, extra={"group_name": t.groups.c.name.label("group_name")}
)
_RELEASE_WIDTH = len(_RELEASE_COLUMNS)
_RELEASES_WITH_GROUPS = t.releases.outerjoin(t.groups, t.groups.c.id == t.releases.c.group_id)

def _delta_key(base_sha256: str, target_sha256: str, format_version: int) -> list[Any]:
    """The ``deltas`` row of one pair and format version (its primary key)."""
    return [
        t.deltas.c.base_sha256 == base_sha256,
        t.deltas.c.target_sha256 == target_sha256,
        t.deltas.c.format_version == format_version,
    ]


SELECT_FIRMWARE = sa.select(*_FIRMWARE_COLUMNS).where(
    t.firmware.c.product_id == sa.bindparam("product_id"),
    t.firmware.c.version == sa.bindparam("version"),
)
SELECT_RELEASES = (
    sa.select(*_RELEASE_COLUMNS)
    .select_from(_RELEASES_WITH_GROUPS)
    .where(t.releases.c.product_id == sa.bindparam("product_id"))
    .order_by(t.releases.c.group_id.is_not(None), t.groups.c.name)
)
#: The releases with the firmware row of each released version (NULLs when it is missing).
SELECT_RELEASES_WITH_FIRMWARE = (
    sa.select(
        *_RELEASE_COLUMNS, *(column.label(f"firmware_{column.key}") for column in _FIRMWARE_COLUMNS)
    )
    .select_from(
        _RELEASES_WITH_GROUPS.outerjoin(
            t.firmware,
            sa.and_(
                t.firmware.c.product_id == t.releases.c.product_id,
                t.firmware.c.version == t.releases.c.version,
            ),
        )
    )
    .where(t.releases.c.product_id == sa.bindparam("product_id"))
    .order_by(t.releases.c.group_id.is_not(None), t.groups.c.name)
)
#: A Describe reported running the image ``sha256`` in a module slot: the product firmware
#: of that image (in that slot) is seen running, the first time (ix_firmware_product_sha256).
_IMAGE_KEY = (
    t.firmware.c.product_id == sa.bindparam("key_product_id"),
    t.firmware.c.sha256 == sa.bindparam("key_sha256"),
    t.firmware.c.module_function == sa.bindparam("key_function"),
    t.firmware.c.module_index == sa.bindparam("key_index"),
)
SELECT_UNSEEN_IMAGE = sa.select(t.firmware.c.id, t.firmware.c.version).where(
    *_IMAGE_KEY, t.firmware.c.running_seen_at.is_(None)
)
MARK_SEEN_BY_ID = (
    sa.update(t.firmware)
    .where(t.firmware.c.id == sa.bindparam("key_id"), t.firmware.c.running_seen_at.is_(None))
    .values(running_seen_at=sa.bindparam("now"))
)
#: The size of an image a device of a product may download (``fw/<sha256>``): the product's
#: firmware, or a Device OS module of the device's platform; one indexed query.
SELECT_DOWNLOADABLE = sa.union_all(
    sa.select(t.firmware.c.size).where(
        t.firmware.c.product_id == sa.bindparam("product_id"),
        t.firmware.c.sha256 == sa.bindparam("sha256"),
    ),
    sa.select(t.system_modules.c.size).where(
        t.system_modules.c.platform_id == sa.bindparam("platform_id"),
        t.system_modules.c.sha256 == sa.bindparam("sha256"),
    ),
)
#: Release counter name -> the statement adding one to it.
BUMP_RELEASE_COUNTER = {
    name: sa.update(t.releases)
    .where(t.releases.c.id == sa.bindparam("key_release_id"))
    .values({t.releases.c[name]: t.releases.c[name] + 1})
    for name in ("devices_started", "devices_succeeded", "devices_failed")
}
SELECT_PENDING_FLASH = (
    sa.select(*record_columns(FlashRecord, _FLASH))
    .where(_FLASH.c.device_id == sa.bindparam("device_id"), _FLASH_OPEN)
    .order_by(_FLASH.c.id.desc())
    .limit(1)
)
FINISH_FLASH = (
    sa.update(_FLASH)
    .where(_FLASH.c.id == sa.bindparam("key_flash_id"))
    .values(
        status=sa.bindparam("new_status"),
        error=sa.bindparam("new_error"),
        finished_at=sa.bindparam("new_finished_at"),
    )
)
SELECT_UPDATE_STATE = sa.select(*record_columns(UpdateStateRecord, _UPDATES)).where(
    _UPDATES.c.device_id == sa.bindparam("device_id")
)
#: Progress of the transfer in flight: ``started_at`` is kept while the image is the same
#: (the CASE reads the row's old values, as every SET expression does in SQL).
ADVANCE_UPDATE_STATE = (
    sa.update(_UPDATES)
    .where(_UPDATES.c.device_id == sa.bindparam("key_device_id"))
    .values(
        sha256=sa.bindparam("new_sha256"),
        version=sa.bindparam("new_version"),
        transfer=sa.bindparam("new_transfer"),
        bytes_done=sa.bindparam("new_bytes_done"),
        bytes_total=sa.bindparam("new_bytes_total"),
        status=sa.bindparam("new_status"),
        started_at=sa.case(
            (_UPDATES.c.sha256 == sa.bindparam("new_sha256"), _UPDATES.c.started_at),
            else_=sa.bindparam("now"),
        ),
        updated_at=sa.bindparam("now"),
    )
)
UPDATE_UPDATE_STATE = sa.update(_UPDATES).where(
    _UPDATES.c.device_id == sa.bindparam("key_device_id")
)
INSERT_UPDATE_STATE = sa.insert(_UPDATES)
DELETE_UPDATE_STATE = sa.delete(_UPDATES).where(
    _UPDATES.c.device_id == sa.bindparam("key_device_id")
)
_BYTES_KEY = (
    _BYTES.c.product_id == sa.bindparam("key_product_id"),
    _BYTES.c.version == sa.bindparam("key_version"),
)
#: Transfer kind -> the statement adding one transfer to a version's bytes counters.
_ADD_SENT = sa.bindparam("add_sent", type_=sa.BigInteger)
_ADD_FULL = sa.bindparam("add_full", type_=sa.BigInteger)
ADD_TRANSFER_BYTES = {
    transfer: sa.update(_BYTES)
    .where(*_BYTES_KEY)
    .values(
        {
            _BYTES.c.bytes_sent: _BYTES.c.bytes_sent + _ADD_SENT,
            _BYTES.c.bytes_full: _BYTES.c.bytes_full + _ADD_FULL,
            _BYTES.c[column]: _BYTES.c[column] + 1,
        }
    )
    for transfer, column in _TRANSFER_COUNTERS.items()
}
INSERT_TRANSFER_BYTES = sa.insert(_BYTES)
_BYTES_COUNTERS = ("bytes_sent", "bytes_full", *_TRANSFER_COUNTERS.values())
SELECT_TRANSFER_BYTES = sa.select(*(_BYTES.c[name] for name in _BYTES_COUNTERS)).where(
    _BYTES.c.product_id == sa.bindparam("product_id"),
    _BYTES.c.version == sa.bindparam("version"),
)


def group_scope(group_id: int) -> str:
    """Release scope string of a group."""
    return f"group:{group_id}"


class FirmwareQueries:
    """Firmware, releases, flashes and update state; mixed into the store's Tx."""

    conn: Connection

    # --- firmware ---------------------------------------------------------------------------

    def insert_firmware(self, **values: Any) -> FirmwareRecord:
        """Record an uploaded firmware version (its blob must already be stored)."""
        self.conn.execute(sa.insert(t.firmware).values(running_seen_at=None, **values))
        record = self.get_firmware(values["product_id"], values["version"])
        assert record is not None
        return record

    def get_firmware(self, product_id: int, version: int) -> FirmwareRecord | None:
        """One firmware version of a product."""
        row = self.conn.execute(
            SELECT_FIRMWARE, {"product_id": product_id, "version": version}
        ).first()
        return None if row is None else FirmwareRecord(*row)

    def list_firmware(self, product_id: int) -> list[FirmwareRecord]:
        """A product's firmware, newest version first."""
        rows = self.conn.execute(
            sa.select(t.firmware)
            .where(t.firmware.c.product_id == product_id)
            .order_by(t.firmware.c.version.desc())
        ).mappings()
        return [record_from(FirmwareRecord, row) for row in rows]

    def update_firmware(self, firmware_id: int, fields: dict[str, Any]) -> None:
        """Change a firmware's title or description."""
        unknown = set(fields) - {"title", "description"}
        if unknown:
            raise ValueError(f"firmware columns {sorted(unknown)} cannot be changed")
        self.conn.execute(
            sa.update(t.firmware).where(t.firmware.c.id == firmware_id).values(**fields)
        )

    def delete_firmware(self, firmware_id: int) -> None:
        """Delete a firmware row (the caller removes the blob when nothing else refers to it)."""
        self.conn.execute(sa.delete(t.firmware).where(t.firmware.c.id == firmware_id))

    def mark_image_running_seen(
        self, product_id: int, sha256: str, function: int, index: int, now: int
    ) -> list[int]:
        """Note that a device runs the image ``sha256`` in module slot (``function``,
        ``index``): the product's firmware of exactly that image is seen running. Returns
        the versions seen for the first time (usually none: one indexed read)."""
        key = {"key_product_id": product_id, "key_sha256": sha256, "key_function": function,
               "key_index": index}
        versions = []
        for firmware_id, version in self.conn.execute(SELECT_UNSEEN_IMAGE, key).all():
            if self.conn.execute(MARK_SEEN_BY_ID, {"key_id": firmware_id, "now": now}).rowcount:
                versions.append(int(version))
        return versions

    def downloadable_size(self, product_id: int, platform_id: int | None,
                          sha256: str) -> int | None:
        """The size of image ``sha256`` when a device of the product (and platform) may
        download it: the product's firmware or a Device OS module of the platform; None
        otherwise."""
        params = {"product_id": product_id, "platform_id": -1 if platform_id is None
                  else platform_id, "sha256": sha256}
        size = self.conn.execute(SELECT_DOWNLOADABLE, params).scalar()
        return None if size is None else int(size)

    def blob_is_referenced(self, sha256: str) -> bool:
        """True while any firmware or flash request names this blob."""
        for table in (t.firmware, t.device_flashes, t.system_modules):
            query = sa.select(sa.func.count()).select_from(table).where(table.c.sha256 == sha256)
            if self.conn.execute(query).scalar_one():
                return True
        query = (
            sa.select(sa.func.count())
            .select_from(t.deltas)
            .where(t.deltas.c.patch_sha256 == sha256)
        )
        return bool(self.conn.execute(query).scalar_one())

    def referenced_blobs(self) -> set[str]:
        """Every blob name the database refers to."""
        names: set[str] = set()
        for table in (t.firmware, t.device_flashes, t.system_modules):
            names.update(row[0] for row in self.conn.execute(sa.select(table.c.sha256).distinct()))
        patches = sa.select(t.deltas.c.patch_sha256).distinct()
        names.update(row[0] for row in self.conn.execute(patches))
        return names

    # --- Device OS modules ------------------------------------------------------------------

    def insert_system_module(
        self, info: dict[str, Any], sha256: str, size: int, uploaded_by: str, now: int
    ) -> None:
        """Record a Device OS module (its blob is already stored under ``sha256``)."""
        self.conn.execute(
            sa.insert(t.system_modules).values(
                platform_id=info["platform_id"],
                module_function=info["module_function"],
                module_index=info["module_index"],
                module_version=info["module_version"],
                size=size,
                sha256=sha256,
                module_info=info,
                uploaded_by=uploaded_by,
                uploaded_at=now,
            )
        )

    def list_system_modules(self, platform_id: int | None = None) -> list[dict[str, Any]]:
        """Device OS modules (of one platform), oldest version first."""
        query = sa.select(t.system_modules).order_by(
            t.system_modules.c.platform_id,
            t.system_modules.c.module_function,
            t.system_modules.c.module_index,
            t.system_modules.c.module_version,
        )
        if platform_id is not None:
            query = query.where(t.system_modules.c.platform_id == platform_id)
        return [dict(row._mapping) for row in self.conn.execute(query)]

    # --- releases ---------------------------------------------------------------------------

    def list_releases(self, product_id: int) -> list[ReleaseRecord]:
        """A product's releases (default first, then groups by name)."""
        rows = self.conn.execute(SELECT_RELEASES, {"product_id": product_id})
        return [ReleaseRecord(*row) for row in rows]

    def list_releases_with_firmware(
        self, product_id: int
    ) -> tuple[list[ReleaseRecord], dict[int, FirmwareRecord]]:
        """A product's releases (as :meth:`list_releases`) and, in the same query, the
        firmware record of each released version that exists (by version)."""
        releases: list[ReleaseRecord] = []
        firmware: dict[int, FirmwareRecord] = {}
        for row in self.conn.execute(SELECT_RELEASES_WITH_FIRMWARE, {"product_id": product_id}):
            release = ReleaseRecord(*row[:_RELEASE_WIDTH])
            releases.append(release)
            if row[_RELEASE_WIDTH] is not None:  # firmware.id: the version exists
                firmware[release.version] = FirmwareRecord(*row[_RELEASE_WIDTH:])
        return releases, firmware

    def set_release(
        self,
        product_id: int,
        group_id: int | None,
        *,
        version: int,
        intelligent: bool,
        actor: str,
        now: int,
    ) -> None:
        """Release ``version`` to the product default (group_id None) or to one group."""
        scope = PRODUCT_SCOPE if group_id is None else group_scope(group_id)
        where = sa.and_(t.releases.c.product_id == product_id, t.releases.c.scope == scope)
        values = {
            "version": version,
            "intelligent": intelligent,
            "released_at": now,
            "released_by": actor,
            "devices_started": 0,
            "devices_succeeded": 0,
            "devices_failed": 0,
        }
        changed = self.conn.execute(sa.update(t.releases).where(where).values(**values)).rowcount
        if not changed:
            self.conn.execute(
                sa.insert(t.releases).values(
                    product_id=product_id, scope=scope, group_id=group_id, **values
                )
            )

    def delete_release(self, product_id: int, group_id: int | None) -> None:
        """Withdraw the product-default or a group release."""
        scope = PRODUCT_SCOPE if group_id is None else group_scope(group_id)
        self.conn.execute(
            sa.delete(t.releases).where(
                t.releases.c.product_id == product_id, t.releases.c.scope == scope
            )
        )

    def bump_release_counter(self, release_id: int, counter: str) -> None:
        """Add one to a release's started / succeeded / failed counter."""
        statement = BUMP_RELEASE_COUNTER.get(counter)
        if statement is None:
            raise ValueError(f"unknown release counter {counter!r}")
        self.conn.execute(statement, {"key_release_id": release_id})

    # --- per-device flashes -------------------------------------------------------------------

    def insert_flash(self, **values: Any) -> FlashRecord:
        """Queue a flash for one device, superseding any still open (pending or started).

        A device has at most one open flash: the newest request is what the operator wants.
        An older one left open would become the device's target again once the newer one
        finished, flashing it back to the older image."""
        self.conn.execute(
            sa.update(t.device_flashes)
            .where(t.device_flashes.c.device_id == values["device_id"], _FLASH_OPEN)
            .values(status="superseded", finished_at=values["requested_at"])
        )
        result = self.conn.execute(sa.insert(t.device_flashes).values(**values))
        flash_id = new_row_id(result)
        row = (
            self.conn.execute(sa.select(t.device_flashes).where(t.device_flashes.c.id == flash_id))
            .mappings()
            .one()
        )
        return record_from(FlashRecord, row)

    def pending_flash(self, device_id: str) -> FlashRecord | None:
        """The newest pending or started flash of a device."""
        row = self.conn.execute(SELECT_PENDING_FLASH, {"device_id": device_id}).first()
        return None if row is None else FlashRecord(*row)

    def pending_flashes(self, device_ids: list[str]) -> dict[str, FlashRecord]:
        """The newest pending or started flash of each listed device that has one."""
        if len(device_ids) == 1:  # a session's own device: the prebuilt statement
            flash = self.pending_flash(device_ids[0])
            return {} if flash is None else {flash.device_id: flash}
        found: dict[str, FlashRecord] = {}
        for start in range(0, len(device_ids), 500):  # stay below bound-parameter limits
            rows = self.conn.execute(
                sa.select(t.device_flashes)
                .where(
                    t.device_flashes.c.device_id.in_(device_ids[start : start + 500]),
                    t.device_flashes.c.status.in_(("pending", "started")),
                )
                .order_by(t.device_flashes.c.id)
            ).mappings()
            for row in rows:
                found[row["device_id"]] = record_from(FlashRecord, row)  # newest wins
        return found

    def finish_flash(self, flash_id: int, status: str, error: str, now: int | None) -> None:
        """Set a flash's status (started / succeeded / failed) and finish time."""
        params = {"key_flash_id": flash_id, "new_status": status, "new_error": error}
        self.conn.execute(FINISH_FLASH, {**params, "new_finished_at": now})

    # --- update in flight -------------------------------------------------------------------

    def get_update_state(self, device_id: str) -> UpdateStateRecord | None:
        """The transfer in flight to a device, if any."""
        row = self.conn.execute(SELECT_UPDATE_STATE, {"device_id": device_id}).first()
        return None if row is None else UpdateStateRecord(*row)

    def put_update_state(self, state: UpdateStateRecord) -> None:
        """Insert or replace the transfer state of a device."""
        values = {
            "sha256": state.sha256,
            "version": state.version,
            "transfer": state.transfer,
            "bytes_done": state.bytes_done,
            "bytes_total": state.bytes_total,
            "status": state.status,
            "started_at": state.started_at,
            "updated_at": state.updated_at,
        }
        changed = self.conn.execute(
            UPDATE_UPDATE_STATE, {**values, "key_device_id": state.device_id}
        ).rowcount
        if not changed:
            self.conn.execute(INSERT_UPDATE_STATE, {**values, "device_id": state.device_id})

    def advance_update_state(
        self,
        device_id: str,
        *,
        sha256: str,
        version: int | None,
        transfer: str,
        bytes_done: int,
        bytes_total: int,
        status: str,
        now: int,
    ) -> bool:
        """Record progress of the transfer in flight in one statement: ``started_at`` is
        kept when the stored state is for the same image, else set to ``now``. False when
        the device has no state yet (nothing changed: the caller inserts one with
        :meth:`put_update_state`)."""
        params = {
            "key_device_id": device_id,
            "new_sha256": sha256,
            "new_version": version,
            "new_transfer": transfer,
            "new_bytes_done": bytes_done,
            "new_bytes_total": bytes_total,
            "new_status": status,
            "now": now,
        }
        return bool(self.conn.execute(ADVANCE_UPDATE_STATE, params).rowcount)

    def clear_update_state(self, device_id: str) -> None:
        """Forget the transfer state of a device."""
        self.conn.execute(DELETE_UPDATE_STATE, {"key_device_id": device_id})

    # --- delta patches and bytes sent -------------------------------------------------------

    def get_delta(
        self, base_sha256: str, target_sha256: str, format_version: int
    ) -> dict[str, Any] | None:
        """The stored patch row from ``base_sha256`` to ``target_sha256`` made for
        ``format_version``, if any."""
        row = (
            self.conn.execute(
                sa.select(t.deltas).where(*_delta_key(base_sha256, target_sha256, format_version))
            )
            .mappings()
            .first()
        )
        return None if row is None else dict(row)

    def insert_delta(
        self,
        base_sha256: str,
        target_sha256: str,
        format_version: int,
        patch_sha256: str,
        patch_size: int,
        target_size: int,
        now: int,
        *,
        replace: bool = False,
    ) -> None:
        """Record a patch (its blob is already stored). A patch stored before for the same
        pair and format version is kept, or with ``replace`` replaced (its old blob is then
        unreferenced, for ``sweep_blobs``)."""
        key = _delta_key(base_sha256, target_sha256, format_version)
        if replace:
            self.conn.execute(sa.delete(t.deltas).where(*key))
        elif self.get_delta(base_sha256, target_sha256, format_version) is not None:
            return  # another process computed it first: the patches are equivalent
        self.conn.execute(
            sa.insert(t.deltas).values(
                base_sha256=base_sha256,
                target_sha256=target_sha256,
                format_version=format_version,
                patch_sha256=patch_sha256,
                patch_size=patch_size,
                target_size=target_size,
                created_at=now,
            )
        )

    def count_deltas(self) -> int:
        """How many patches are stored."""
        return int(self.conn.execute(sa.select(sa.func.count()).select_from(t.deltas)).scalar_one())

    def add_transfer_bytes(
        self, product_id: int, version: int, *, bytes_sent: int, bytes_full: int, transfer: str
    ) -> dict[str, int]:
        """Add one completed transfer (``transfer``: "full", "zstd" or "delta") to a
        firmware version's bytes counters; the totals."""
        column = _TRANSFER_COUNTERS[transfer]
        params = {
            "key_product_id": product_id,
            "key_version": version,
            "add_sent": bytes_sent,
            "add_full": bytes_full,
        }
        changed = self.conn.execute(ADD_TRANSFER_BYTES[transfer], params).rowcount
        if not changed:
            counters = dict.fromkeys(_TRANSFER_COUNTERS.values(), 0)
            counters[column] = 1
            self.conn.execute(
                INSERT_TRANSFER_BYTES,
                {
                    "product_id": product_id,
                    "version": version,
                    "bytes_sent": bytes_sent,
                    "bytes_full": bytes_full,
                    **counters,
                },
            )
        return self.get_transfer_bytes(product_id, version)

    def get_transfer_bytes(self, product_id: int, version: int) -> dict[str, int]:
        """A firmware version's counters: bytes_sent, bytes_full, delta/full transfers."""
        row = self.conn.execute(
            SELECT_TRANSFER_BYTES, {"product_id": product_id, "version": version}
        ).first()
        if row is None:
            return dict.fromkeys(_BYTES_COUNTERS, 0)
        return {name: int(value) for name, value in zip(_BYTES_COUNTERS, row, strict=True)}
