"""The last few stored images read whole, kept in memory: blobs are content-addressed (named
by their SHA-256, verified on read), so a copy can never go stale. A patch release asks for
every device's base image; the devices of a fleet share a few bases, so after the first read
each ask costs no worker-thread hop and no file read. What a device may be given is still
decided by the store at every ask (``DeviceOsService.blob_for_product``): this holds bytes,
not permissions.
"""

from __future__ import annotations

#: Images kept at most, and the largest image kept (bigger ones are read each time).
MAX_RECENT_BLOBS = 8
MAX_RECENT_BLOB_BYTES = 8 * 1024 * 1024


class RecentBlobs:
    """SHA-256 -> bytes of the most recently used images (LRU, bounded in count and size)."""

    __slots__ = ("_entries", "_max_bytes", "_max_entries")

    def __init__(self, max_entries: int = MAX_RECENT_BLOBS,
                 max_bytes: int = MAX_RECENT_BLOB_BYTES) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("the recent-blob cache needs room for at least one image")
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._entries: dict[str, bytes] = {}

    def get(self, sha256: str) -> bytes | None:
        """The image named ``sha256`` if held (it becomes the most recently used)."""
        data = self._entries.pop(sha256, None)
        if data is not None:
            self._entries[sha256] = data
        return data

    def put(self, sha256: str, data: bytes) -> None:
        """Hold ``data`` (read and verified as the image ``sha256``) unless it is too big."""
        if len(data) > self._max_bytes:
            return
        self._entries.pop(sha256, None)
        while len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[sha256] = data

    def __len__(self) -> int:
        return len(self._entries)
