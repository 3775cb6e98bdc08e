"""Durable control-plane store: SQLAlchemy Core database plus content-addressed blobs."""

from __future__ import annotations

from server.store.blobs import Blobs, BlobStore
from server.store.db_blobs import DatabaseBlobStore
from server.store.errors import (
    BlobCorruptError,
    BlobMissingError,
    SchemaVersionError,
    StoreConfigError,
    StoreConflictError,
    StoreUnavailableError,
    StoreValueError,
)
from server.store.records import (
    AuditRecord,
    ClientRecord,
    DeviceRecord,
    FirmwareRecord,
    FlashRecord,
    GroupRecord,
    ProductRecord,
    ReleaseRecord,
    TokenRecord,
    UpdateStateRecord,
    UserRecord,
)
from server.store.store import Store, Tx

__all__ = [
    "AuditRecord",
    "BlobCorruptError",
    "BlobMissingError",
    "BlobStore",
    "Blobs",
    "ClientRecord",
    "DatabaseBlobStore",
    "DeviceRecord",
    "FirmwareRecord",
    "FlashRecord",
    "GroupRecord",
    "ProductRecord",
    "ReleaseRecord",
    "SchemaVersionError",
    "Store",
    "StoreConfigError",
    "StoreConflictError",
    "StoreUnavailableError",
    "StoreValueError",
    "TokenRecord",
    "Tx",
    "UpdateStateRecord",
    "UserRecord",
]
