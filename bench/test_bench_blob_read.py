"""What a device's block costs to read, from the blob directory (SQLite's store) and from the
database's chunked blobs (PostgreSQL's store, issue 16), cold and hot.

Run: OTA_TEST_PG_URL=... .venv/bin/python -m pytest bench/test_bench_blob_read.py
--benchmark-enable --benchmark-only -q
(without OTA_TEST_PG_URL a throwaway PostgreSQL cluster is started for the module).

Images of 656 KiB (the largest Device OS part) and 1.5 MB (the largest application); blocks of
1 KiB (CoAP Block2 SZX 6) at a chunk boundary (two chunk rows). The database store is timed
with its chunk cache off (every block is a query: a node's first read of an image, or a
working set larger than the cache) and on (a release's hot image: memory); ``get`` reads and
verifies a whole image (what a session's delta base or a compressed transfer asks for).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.store import DatabaseBlobStore, Store
from server.store.db_blobs import CHUNK_SIZE

BLOCK = 1024
SIZES = {"656KiB": 656 * 1024, "1.5MB": 1_500_000}
#: A block straddling the boundary of chunks 4 and 5 (both rows read).
OFFSET = 5 * CHUNK_SIZE - BLOCK // 2


def _image(size: int) -> bytes:
    return hashlib.shake_256(f"bench blob {size}".encode()).digest(size)


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh database on OTA_TEST_PG_URL's cluster, or on a cluster of this module."""
    from server.store.pg_cluster import PgCluster, create_database, drop_database

    admin = os.environ.get("OTA_TEST_PG_URL")
    cluster = None
    if not admin:
        cluster = PgCluster.start(tmp_path_factory.mktemp("pg"))
        admin = cluster.url()
    name = f"ota_bench_blobs_{os.getpid()}"
    drop_database(admin, name)
    try:
        yield create_database(admin, name)
    finally:
        drop_database(admin, name)
        if cluster is not None:
            cluster.stop()


@pytest.fixture(scope="module")
def stores(pg_url: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[str, tuple[Store, dict[str, str]]]]:
    """The directory store (SQLite) and the database store (PostgreSQL), each holding the
    images; name -> (store, size label -> sha256)."""
    opened = {
        "directory": Store.open_dir(Path(tmp_path_factory.mktemp("blobs")), pool_size=2),
        "postgresql": Store.open(pg_url, Path(tmp_path_factory.mktemp("unused")), pool_size=2),
    }
    found = {}
    for name, store in opened.items():
        found[name] = (store, {label: store.blobs.put(_image(size))
                               for label, size in SIZES.items()})
    yield found
    for store in opened.values():
        store.close()


def _database_blobs(store: Store, *, cached: bool) -> DatabaseBlobStore:
    blobs = store.blobs
    assert isinstance(blobs, DatabaseBlobStore)
    blobs.cache.clear()
    blobs.cache.max_bytes = 64 * 1024 * 1024 if cached else 0
    return blobs


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("where", ["directory", "postgresql-cold", "postgresql-hot"])
def test_block_read(benchmark, stores, where: str, size: str) -> None:  # type: ignore[no-untyped-def]
    store, names = stores["directory" if where == "directory" else "postgresql"]
    if where != "directory":
        _database_blobs(store, cached=where.endswith("hot"))
    benchmark.group = f"blob-block-1KiB-of-{size}"
    image = _image(SIZES[size])
    data = benchmark(store.blobs.read_range, names[size], OFFSET, BLOCK)
    assert data == image[OFFSET:OFFSET + BLOCK]


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("where", ["directory", "postgresql-cold", "postgresql-hot"])
def test_whole_image_read(benchmark, stores, where: str, size: str) -> None:  # type: ignore[no-untyped-def]
    store, names = stores["directory" if where == "directory" else "postgresql"]
    if where != "directory":
        _database_blobs(store, cached=where.endswith("hot"))
    benchmark.group = f"blob-whole-{size}"
    data = benchmark(store.blobs.get, names[size])
    assert len(data) == SIZES[size]
