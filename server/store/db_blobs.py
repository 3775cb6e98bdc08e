"""Content-addressed blobs kept in the database itself: the store's blobs on PostgreSQL, so
the nodes of one installation share nothing but the database (issue 16).

Layout (``server.store.schema``): one ``blobs`` row per blob (its SHA-256, size, chunk size
and stored time) and its bytes in ``blob_chunks`` rows of ``CHUNK_SIZE`` bytes (64 KiB), each
with its own SHA-256. Firmware is up to ~1.5 MB and devices read it a block at a time while
they download (``read_range``, constantly): a block costs the one or two chunk rows under it,
never the whole blob, and each chunk is checked against its digest before a byte of it is
served. Verified chunks are kept in a bounded in-process LRU (:class:`ChunkCache`): blobs are
immutable under their name, so a cached chunk can never go stale, and a release's hot image
is read from the database once per node.

Writes: ``put`` runs in one write transaction (the store's writer lock: PostgreSQL's advisory
lock, SQLite's write lock), so a blob is whole or absent (the ``blobs`` row and its chunks
commit together); the same bytes twice are one blob (found by name, its stored time
refreshed, nothing rewritten). ``sweep`` deletes in that same kind of transaction, and
re-reads the references inside it: an upload's ``put`` and a sweep never interleave.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from server.store import schema as t
from server.store.blobs import SWEEP_GRACE_S, Blobs, check_range, check_sha256_name
from server.store.errors import BlobCorruptError, BlobMissingError

#: Bytes per chunk row. 64 KiB: a 1.5 MB image is 24 rows; a device's block (512 B .. 1 KiB)
#: sits in one row (two at a boundary); a row is TOASTed out of line on PostgreSQL, where
#: ``blob_chunks.data`` is stored uncompressed (revision 0004: firmware does not compress,
#: and an uncompressed value is sliced without decompressing it).
CHUNK_SIZE = 64 * 1024

#: Bytes of verified chunks a node keeps in memory (LRU). 64 MiB holds ~40 images of 1.5 MB:
#: every image of a few concurrent releases, Device OS parts and deltas included.
CHUNK_CACHE_BYTES = 64 * 1024 * 1024

#: Seconds a reader waits for another thread's read of the same chunk before reading it
#: itself (a safety net: that read ends, and wakes it, well before in any sound state).
IN_FLIGHT_WAIT_S = 30.0

#: How a blob store reaches the database: a context manager giving a connection inside a
#: read transaction, or inside a write transaction (committed when the block exits cleanly).
TransactionFactory = Callable[[], AbstractContextManager[Connection]]
#: The names every row of the store refers to, read on the given connection.
ReferencedQuery = Callable[[Connection], set[str]]


@dataclass(frozen=True)
class BlobShape:
    """What a ``blobs`` row says about a blob: its size and the size of its chunks."""

    size: int
    chunk_size: int

    @property
    def chunk_count(self) -> int:
        """Chunk rows the blob has (an empty blob has none)."""
        return -(-self.size // self.chunk_size)


class ChunkCache:
    """Verified chunks by (blob SHA-256, chunk number), least recently used out first,
    bounded in bytes. Thread-safe: the store's reads run in worker threads."""

    def __init__(self, max_bytes: int = CHUNK_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError("the chunk cache size cannot be negative")
        self.max_bytes = max_bytes
        self._chunks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        #: Chunks served from memory / read from the database (for tests and benchmarks).
        self.hits = 0
        self.misses = 0

    def get(self, sha256: str, number: int) -> bytes | None:
        """A held chunk (now the most recently used), or None."""
        with self._lock:
            chunk = self._chunks.get((sha256, number))
            if chunk is None:
                self.misses += 1
                return None
            self._chunks.move_to_end((sha256, number))
            self.hits += 1
            return chunk

    def put(self, sha256: str, number: int, chunk: bytes) -> None:
        """Hold a verified chunk, evicting the least recently used ones to stay in bounds."""
        if len(chunk) > self.max_bytes:
            return
        with self._lock:
            old = self._chunks.pop((sha256, number), None)
            if old is not None:
                self._bytes -= len(old)
            while self._chunks and self._bytes + len(chunk) > self.max_bytes:
                _, evicted = self._chunks.popitem(last=False)
                self._bytes -= len(evicted)
            self._chunks[(sha256, number)] = chunk
            self._bytes += len(chunk)

    def forget(self, sha256: str) -> None:
        """Drop every chunk of a deleted blob."""
        with self._lock:
            for key in [key for key in self._chunks if key[0] == sha256]:
                self._bytes -= len(self._chunks.pop(key))

    def clear(self) -> None:
        """Drop every chunk."""
        with self._lock:
            self._chunks.clear()
            self._bytes = 0

    @property
    def size_bytes(self) -> int:
        """Bytes held."""
        return self._bytes


def _now_ms() -> int:
    return int(time.time() * 1000)


class DatabaseBlobStore:
    """Blobs in the store's database, in verified chunks (module doc); implements
    :class:`server.store.blobs.Blobs`."""

    def __init__(
        self,
        begin_read: TransactionFactory,
        begin_write: TransactionFactory,
        referenced: ReferencedQuery,
        *,
        chunk_size: int = CHUNK_SIZE,
        cache_bytes: int = CHUNK_CACHE_BYTES,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("a blob chunk needs at least one byte")
        self._begin_read = begin_read
        self._begin_write = begin_write
        self._referenced = referenced
        self.chunk_size = chunk_size
        self.cache = ChunkCache(cache_bytes)
        self._clock_ms = clock_ms
        #: Chunk rows read from the database (for tests and benchmarks).
        self.chunks_read = 0
        # Chunks being read by some thread now, and the event set when that read ends.
        self._in_flight: dict[tuple[str, int], threading.Event] = {}
        self._in_flight_lock = threading.Lock()
        # Shapes of blobs seen (immutable under their name; dropped with the blob).
        self._shapes: dict[str, BlobShape] = {}
        self._shapes_lock = threading.Lock()

    # --- reading -----------------------------------------------------------------------------

    def _shape(self, sha256: str) -> BlobShape:
        """Size and chunk size of a stored blob (BlobMissingError when it is not)."""
        check_sha256_name(sha256)
        with self._shapes_lock:
            known = self._shapes.get(sha256)
        if known is not None:
            return known
        query = sa.select(t.blobs.c.size, t.blobs.c.chunk_size).where(t.blobs.c.sha256 == sha256)
        with self._begin_read() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise BlobMissingError(f"binary {sha256} is missing from the database's blobs")
        shape = BlobShape(int(row.size), int(row.chunk_size))
        with self._shapes_lock:
            if len(self._shapes) >= 4096:  # bounded: names of blobs ever read
                self._shapes.clear()
            self._shapes[sha256] = shape
        return shape

    def _chunks(self, sha256: str, shape: BlobShape, first: int, last: int) -> list[bytes]:
        """Chunks ``first..last`` (inclusive) of a blob, each verified: from the cache, the
        missing ones in one query. A chunk another thread is already fetching is waited
        for, not fetched again: the devices of a release ask for the same cold chunk at
        once, and one 64 KiB read serves them all."""
        found = {n: self.cache.get(sha256, n) for n in range(first, last + 1)}
        missing = [n for n, chunk in found.items() if chunk is None]
        if missing:
            found.update(self._fetch_once(sha256, shape, missing))
        absent = [n for n, chunk in found.items() if chunk is None]
        if absent and not self.exists(sha256):  # deleted meanwhile (by another node too)
            self._forget(sha256)
            raise BlobMissingError(f"binary {sha256} is missing from the database's blobs")
        if absent:
            raise BlobCorruptError(
                f"binary {sha256} in the database lacks chunk {absent[0]} of "
                f"{shape.chunk_count}: it cannot be served; upload it again"
            )
        return [chunk for _, chunk in sorted(found.items()) if chunk is not None]

    def _fetch_once(self, sha256: str, shape: BlobShape, numbers: list[int]) -> dict[int, bytes]:
        """The chunks ``numbers``: those no other thread is fetching read here (and their
        waiters woken when done, whatever happened), the others awaited and then taken from
        the cache (or read here if that fetch failed or they were evicted meanwhile)."""
        got: dict[int, bytes] = {}
        with self._in_flight_lock:
            theirs = {n: self._in_flight[(sha256, n)] for n in numbers
                      if (sha256, n) in self._in_flight}
            mine = []
            for n in numbers:
                if n in theirs:
                    continue
                # Cached since this thread looked (a read that ended meanwhile)?
                chunk = self.cache.get(sha256, n)
                if chunk is not None:
                    got[n] = chunk
                    continue
                self._in_flight[(sha256, n)] = threading.Event()
                mine.append(n)
        try:
            if mine:
                got.update(self._query_chunks(sha256, shape, mine))
        finally:
            with self._in_flight_lock:
                for n in mine:
                    self._in_flight.pop((sha256, n)).set()
        for n, fetched in theirs.items():
            fetched.wait(IN_FLIGHT_WAIT_S)
            chunk = self.cache.get(sha256, n)
            got.update({n: chunk} if chunk is not None else
                       self._query_chunks(sha256, shape, [n]))
        return got

    def _query_chunks(self, sha256: str, shape: BlobShape, numbers: list[int]
                      ) -> dict[int, bytes]:
        """Read chunks ``numbers`` from the database (one query), verify and cache them."""
        query = (
            sa.select(t.blob_chunks.c.n, t.blob_chunks.c.data, t.blob_chunks.c.digest)
            .where(t.blob_chunks.c.sha256 == sha256,
                   t.blob_chunks.c.n.between(min(numbers), max(numbers)))
            .order_by(t.blob_chunks.c.n)
        )
        with self._begin_read() as conn:
            rows = conn.execute(query).all()
        with self._in_flight_lock:
            self.chunks_read += len(rows)
        wanted = set(numbers)
        got = {}
        for row in rows:
            if row.n not in wanted:
                continue
            chunk = bytes(row.data)
            self._check_chunk(sha256, shape, row.n, chunk, row.digest)
            self.cache.put(sha256, row.n, chunk)
            got[row.n] = chunk
        return got

    @staticmethod
    def _check_chunk(sha256: str, shape: BlobShape, number: int, chunk: bytes,
                     digest: str) -> None:
        expected = min(shape.chunk_size, shape.size - number * shape.chunk_size)
        if len(chunk) != expected or hashlib.sha256(chunk).hexdigest() != digest:
            raise BlobCorruptError(
                f"binary {sha256} in the database is corrupt: chunk {number} does not match "
                "its SHA-256; it is not served (upload the image again)"
            )

    def exists(self, sha256: str) -> bool:
        """True when the blob is stored."""
        check_sha256_name(sha256)
        with self._begin_read() as conn:
            found = conn.execute(
                sa.select(t.blobs.c.sha256).where(t.blobs.c.sha256 == sha256)
            ).first()
        return found is not None

    def get(self, sha256: str, *, verify: bool = True) -> bytes:
        """A whole blob, its chunks each verified; with ``verify`` also the whole against
        its name (BlobCorruptError)."""
        shape = self._shape(sha256)
        if shape.size == 0:
            data = b""
        else:
            data = b"".join(self._chunks(sha256, shape, 0, shape.chunk_count - 1))
        if verify and hashlib.sha256(data).hexdigest() != sha256:
            raise BlobCorruptError(
                f"binary {sha256} in the database is corrupt (hash differs); upload it again"
            )
        return data

    def read_range(self, sha256: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of a blob from ``offset`` (fewer at its end): only the
        chunks under the range are read (or come from the cache), each verified."""
        check_range(offset, length)
        shape = self._shape(sha256)
        end = min(offset + length, shape.size)
        if offset >= end:
            return b""
        first, last = offset // shape.chunk_size, (end - 1) // shape.chunk_size
        joined = b"".join(self._chunks(sha256, shape, first, last))
        start = offset - first * shape.chunk_size
        return joined[start : start + (end - offset)]

    def names(self) -> Iterator[str]:
        """Every stored blob's SHA-256, in order."""
        with self._begin_read() as conn:
            rows = conn.execute(sa.select(t.blobs.c.sha256).order_by(t.blobs.c.sha256)).all()
        yield from (row.sha256 for row in rows)

    # --- writing -----------------------------------------------------------------------------

    def put(self, data: bytes) -> str:
        """Store ``data`` in one transaction and return its SHA-256 (hex). Idempotent: when
        the blob is there already only its stored time is refreshed (so a sweep leaves it
        alone until the caller's row is committed)."""
        sha256 = hashlib.sha256(data).hexdigest()
        now = self._clock_ms()
        with self._begin_write() as conn:
            refreshed = conn.execute(
                sa.update(t.blobs).where(t.blobs.c.sha256 == sha256).values(stored_at=now)
            ).rowcount
            if refreshed:
                return sha256
            conn.execute(sa.insert(t.blobs).values(
                sha256=sha256, size=len(data), chunk_size=self.chunk_size, stored_at=now
            ))
            rows = [
                {"sha256": sha256, "n": number, "data": chunk,
                 "digest": hashlib.sha256(chunk).hexdigest()}
                for number, chunk in enumerate(
                    data[start : start + self.chunk_size]
                    for start in range(0, len(data), self.chunk_size)
                )
            ]
            if rows:
                conn.execute(sa.insert(t.blob_chunks), rows)
        return sha256

    def _forget(self, sha256: str) -> None:
        self.cache.forget(sha256)
        with self._shapes_lock:
            self._shapes.pop(sha256, None)

    def delete(self, sha256: str) -> None:
        """Remove a blob (no error if absent)."""
        check_sha256_name(sha256)
        with self._begin_write() as conn:
            conn.execute(sa.delete(t.blob_chunks).where(t.blob_chunks.c.sha256 == sha256))
            conn.execute(sa.delete(t.blobs).where(t.blobs.c.sha256 == sha256))
        self._forget(sha256)

    def sweep(self, referenced: set[str], *, grace_s: float = SWEEP_GRACE_S) -> list[str]:
        """Delete blobs stored more than ``grace_s`` seconds ago that no row refers to, in
        one write transaction that reads the references itself (``referenced`` is what the
        caller saw; a blob in either set is kept). Returns the deleted names."""
        cutoff = self._clock_ms() - int(grace_s * 1000)
        with self._begin_write() as conn:
            keep = referenced | self._referenced(conn)
            old = conn.execute(
                sa.select(t.blobs.c.sha256).where(t.blobs.c.stored_at < cutoff)
                .order_by(t.blobs.c.sha256)
            ).scalars().all()
            removed = [name for name in old if name not in keep]
            for start in range(0, len(removed), 500):  # bounded IN lists
                batch = removed[start : start + 500]
                conn.execute(sa.delete(t.blob_chunks).where(t.blob_chunks.c.sha256.in_(batch)))
                conn.execute(sa.delete(t.blobs).where(t.blobs.c.sha256.in_(batch)))
        for name in removed:
            self._forget(name)
        return removed

    def import_directory(self, directory: Blobs) -> BlobImport:
        """Copy into the database every blob of a blob directory it does not hold yet (an
        installation that ran on PostgreSQL with ``<data>/blobs`` before blobs moved into
        the database). Idempotent; each file is verified against its name first, and a
        corrupt one is not copied (named in the result). The files are left in place."""
        with self._begin_read() as conn:
            held = set(conn.execute(sa.select(t.blobs.c.sha256)).scalars())
        result = BlobImport()
        for name in directory.names():
            if name in held:
                continue
            try:
                data = directory.get(name, verify=True)
            except (BlobCorruptError, BlobMissingError):
                result.corrupt.append(name)
                continue
            self.put(data)
            result.copied.append(name)
        return result


@dataclass
class BlobImport:
    """What :meth:`DatabaseBlobStore.import_directory` did: the names copied, and those of
    files that no longer match their name (not copied)."""

    copied: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
