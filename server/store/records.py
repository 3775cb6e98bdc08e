"""Immutable records the store returns (one per table row, plus joined names)."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa

_R = TypeVar("_R")


#: Record class -> the names of its fields (``dataclasses.fields`` walks the class each call).
_FIELD_NAMES: dict[type, frozenset[str]] = {}


def field_names(cls: type) -> frozenset[str]:
    """The field names of record class ``cls`` (computed once per class)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = frozenset(f.name for f in dataclasses.fields(cls))
        _FIELD_NAMES[cls] = names
    return names


def record_from(cls: type[_R], row: Mapping[Any, Any], **extra: Any) -> _R:
    """Build record ``cls`` from a row mapping, ignoring columns the record does not hold."""
    names = field_names(cls)
    values = {k: v for k, v in row.items() if k in names}
    values.update(extra)
    return cls(**values)


def record_columns(
    cls: type,
    table: sa.Table,
    *,
    skip: Collection[str] = (),
    extra: Mapping[str, sa.ColumnElement[Any]] | None = None,
) -> list[sa.ColumnElement[Any]]:
    """The columns to select so that ``cls(*row)`` builds the record positionally (cheaper
    than a row mapping): one per field of ``cls`` in field order, taken from ``table`` or
    from ``extra`` (joined columns); fields in ``skip`` must come last and have defaults.
    Raises at import time when a field has no column, so a schema drift cannot go unseen."""
    columns: list[sa.ColumnElement[Any]] = []
    extra = extra or {}
    skipped = False
    for item in dataclasses.fields(cls):
        if item.name in skip:
            skipped = True
            continue
        if skipped:
            raise LookupError(f"{cls.__name__}: skipped fields must come after {item.name}")
        if item.name in extra:
            columns.append(extra[item.name])
        elif item.name in table.c:
            columns.append(table.c[item.name])
        else:
            raise LookupError(f"{cls.__name__}.{item.name} has no column in {table.name}")
    return columns


@dataclass(frozen=True)
class ProductRecord:
    """A product: devices of one platform sharing firmware."""

    id: int
    slug: str
    name: str
    platform_id: int
    description: str
    firmware_updates_forced: bool
    created_at: int


@dataclass(frozen=True)
class DeviceRecord:
    """A device of a product, with its settings and what it last reported."""

    id: str
    product_id: int
    name: str | None
    notes: str
    development: bool
    desired_firmware_version: int | None
    flash_requested: bool
    firmware_updates_forced: bool
    firmware_updates_enabled: bool
    updates_pending: bool
    reset_pending: bool
    online: bool
    certs_revoked: bool
    last_ip_address: str | None
    last_handshake_at: int | None
    last_heard_at: int | None
    platform_id: int | None
    firmware_version: int | None
    system_version: int | None
    modules: list[dict[str, Any]] | None
    created_at: int
    updated_at: int
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceStatusRecord:
    """A device's update status (``server.store.device_status``) and how its last update
    ended; read apart from :class:`DeviceRecord`, which the device sessions hold (their
    memory stays what it was)."""

    update_status: str
    #: "started", "succeeded" or "failed" with the device's reason, and when (None: no
    #: update recorded).
    last_update_status: str | None
    last_update_error: str | None
    last_update_at: int | None


@dataclass(frozen=True)
class GroupRecord:
    """A device group (a tag) of a product."""

    id: int
    product_id: int
    name: str
    description: str
    color: str
    created_at: int


@dataclass(frozen=True)
class FirmwareRecord:
    """An uploaded product firmware version; the binary is the blob named ``sha256``."""

    id: int
    product_id: int
    version: int
    title: str
    description: str
    filename: str
    size: int
    sha256: str
    platform_id: int
    module_function: int
    module_index: int
    module_version: int
    module_info: dict[str, Any]
    uploaded_by: str
    uploaded_at: int
    running_seen_at: int | None


@dataclass(frozen=True)
class ReleaseRecord:
    """A release: ``group_name`` None means the product default."""

    id: int
    product_id: int
    scope: str
    group_id: int | None
    group_name: str | None
    version: int
    intelligent: bool
    released_at: int
    released_by: str
    devices_started: int
    devices_succeeded: int
    devices_failed: int


@dataclass(frozen=True)
class FlashRecord:
    """A per-device flash request and its outcome."""

    id: int
    device_id: str
    kind: str
    version: int | None
    sha256: str
    size: int
    filename: str
    module_info: dict[str, Any] | None
    status: str
    error: str
    requested_by: str
    requested_at: int
    finished_at: int | None


@dataclass(frozen=True)
class UpdateStateRecord:
    """The transfer in flight to one device."""

    device_id: str
    sha256: str
    version: int | None
    transfer: str
    bytes_done: int
    bytes_total: int
    status: str
    started_at: int
    updated_at: int


@dataclass(frozen=True)
class UserRecord:
    """An operator account (password stored as a scrypt hash)."""

    id: int
    username: str
    password_hash: str
    role: str
    disabled: bool
    created_at: int


@dataclass(frozen=True)
class ClientRecord:
    """An OAuth client for the client_credentials grant."""

    client_id: str
    secret_hash: str
    name: str
    role: str
    created_at: int


@dataclass(frozen=True)
class TokenRecord:
    """A stored token (by hash) with its role and lifetime."""

    token_hash: str
    kind: str
    role: str
    subject: str
    user_id: int | None
    client_id: str | None
    pair_hash: str | None
    created_at: int
    expires_at: int | None
    revoked_at: int | None


@dataclass(frozen=True)
class AuditRecord:
    """One audit-log entry."""

    id: int
    at: int
    actor: str
    action: str
    product_id: int | None
    target: str
    details: dict[str, Any]


def new_row_id(result: Any) -> int:
    """The autoincrement id an INSERT produced (portable: no RETURNING needed)."""
    key = result.inserted_primary_key
    if key is None:
        raise RuntimeError("the INSERT produced no primary key")
    return int(key[0])
