"""Store-specific errors (subclasses of the project's bases in otacore.errors)."""

from __future__ import annotations

from otacore.errors import ConflictError, StoreError, ValidationError


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


class StoreValueError(StoreError, ValidationError):
    """A value does not fit its column (a string longer than the column holds, a number out
    of its range, a character the database cannot store); nothing of the change was saved.
    SQLite stores such values as they are, PostgreSQL refuses them: the API's own checks
    normally refuse them first (400)."""
