"""Store-specific errors (subclasses of the project's bases in otacore.errors)."""

from __future__ import annotations

from otacore.errors import ConflictError, StoreError


class StoreConfigError(StoreError):
    """The store location or database URL is unusable."""


class BlobMissingError(StoreError):
    """A binary the database refers to is missing from the blob directory."""


class BlobCorruptError(StoreError):
    """A stored binary no longer matches the SHA-256 it is named after."""


class SchemaVersionError(StoreError):
    """The database was written by a newer, incompatible version of the schema."""


class StoreConflictError(StoreError, ConflictError):
    """A write collided with a concurrent one (a uniqueness rule); retrying may succeed."""


class StoreUnavailableError(StoreError):
    """The database is locked, unreachable or out of space; the request can be retried."""
