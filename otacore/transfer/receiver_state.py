"""The receiver's persistent state: what a device keeps across reboots to resume a download
(see :mod:`otacore.transfer.receiver` for why a chain of CRC-32s and not a SHA-256)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from otacore._types import Buffer
from otacore.errors import StoreError
from otacore.integrity import crc32
from otacore.transfer.messages import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE


class ReceiverStateError(StoreError):
    """Saved receiver state is corrupt, truncated or from an unknown format version."""


_STATE = struct.Struct("<BBIIII32s")  # version, flags, size, chunk size, count, chain, sha
_STATE_CRC = struct.Struct("<I")
_VALIDATED = 0x01


@dataclass(slots=True, frozen=True)
class ReceiverState:
    """What a device must keep across reboots to resume a download (see module docstring)."""

    file_sha256: bytes
    file_size: int
    chunk_size: int
    count: int  # chunks 1..count are in the slot
    chain: int  # resume chain over those chunks' CRC-32s
    validated: bool = False  # the whole file passed validation (waiting for FinishAck)
    VERSION: ClassVar[int] = 1
    SIZE: ClassVar[int] = _STATE.size + _STATE_CRC.size

    @property
    def prefix_bytes(self) -> int:
        """Bytes of the file held in the slot from offset 0."""
        return min(self.count * self.chunk_size, self.file_size)

    def to_bytes(self) -> bytes:
        """54-byte record: version 1, fields, then the CRC-32 of everything before it."""
        flags = _VALIDATED if self.validated else 0
        body = _STATE.pack(
            self.VERSION,
            flags,
            self.file_size,
            self.chunk_size,
            self.count,
            self.chain,
            self.file_sha256,
        )
        return body + _STATE_CRC.pack(crc32(body))

    @classmethod
    def from_bytes(cls, data: Buffer) -> ReceiverState:
        """Parse a saved record; raise ReceiverStateError if it cannot be trusted."""
        view = memoryview(data).cast("B")
        if len(view) < 1:
            raise ReceiverStateError("saved transfer state is empty")
        if view[0] != cls.VERSION:
            raise ReceiverStateError(
                f"saved transfer state has format version {view[0]}; this build reads "
                f"version {cls.VERSION} (discard it and download again)"
            )
        if len(view) != cls.SIZE:
            raise ReceiverStateError(
                f"saved transfer state is {len(view)} bytes, expected {cls.SIZE} (torn write?)"
            )
        body = view[: _STATE.size]
        if crc32(body) != _STATE_CRC.unpack_from(view, _STATE.size)[0]:
            raise ReceiverStateError("saved transfer state fails its CRC-32 (torn write?)")
        _, flags, size, chunk_size, count, chain, sha = _STATE.unpack_from(body)
        if flags & ~_VALIDATED:
            raise ReceiverStateError(f"saved transfer state has unknown flags 0x{flags:02x}")
        if chunk_size % 4 or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or not size:
            raise ReceiverStateError(
                f"saved transfer state has impossible sizes (file {size}, chunk {chunk_size})"
            )
        chunks = -(-size // chunk_size)
        if count > chunks or (flags & _VALIDATED and count != chunks):
            raise ReceiverStateError(
                f"saved transfer state holds {count} chunks of a {chunks}-chunk file"
            )
        return cls(sha, size, chunk_size, count, chain, bool(flags & _VALIDATED))
