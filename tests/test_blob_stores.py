"""Both blob stores behind one interface (server.store.blobs.Blobs): the blob directory (the
SQLite store's) and the database's chunked blobs (PostgreSQL's; also run on SQLite, where an
operator could choose it), against the same expectations; then what only the database store
has: verified chunks, the chunk cache, the copy of an older release's blob directory."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.store import BlobCorruptError, BlobMissingError, Blobs, BlobStore, Store
from server.store import schema as t
from server.store.db_blobs import CHUNK_SIZE, DatabaseBlobStore

#: (name, blobs in the database?, database): the directory store on SQLite, the database
#: store on PostgreSQL (the production pairs) and the database store on SQLite.
BACKENDS = ("directory", "postgresql", "sqlite-database")

#: A firmware-sized image: several chunks and a partial last one.
IMAGE_SIZE = 3 * CHUNK_SIZE + 1234


def _image(seed: int, size: int = IMAGE_SIZE) -> bytes:
    print(f"image seed {seed}")
    return random.Random(seed).randbytes(size)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A store whose ``blobs`` is the parametrized implementation."""
    kind = request.param
    if kind == "postgresql":
        opened = Store.open(request.getfixturevalue("pg_database"), tmp_path / "blobs",
                            pool_size=2)
    else:
        opened = Store.open(f"sqlite:///{tmp_path / 'ota.db'}", tmp_path / "blobs",
                            pool_size=2, blobs_in_database=kind == "sqlite-database")
    assert isinstance(opened.blobs, DatabaseBlobStore) == (kind != "directory")
    yield opened
    opened.close()


def _age(store: Store, sha256: str, seconds: float) -> None:
    """Make a stored blob look stored ``seconds`` ago (the file's mtime / the row's time)."""
    if isinstance(store.blobs, BlobStore):
        then = time.time() - seconds
        os.utime(store.blobs.path_of(sha256), (then, then))
        return
    with store.write() as tx:
        tx.conn.execute(sa.update(t.blobs).where(t.blobs.c.sha256 == sha256)
                        .values(stored_at=int((time.time() - seconds) * 1000)))


def test_both_stores_implement_the_interface(store: Store) -> None:
    assert isinstance(store.blobs, Blobs)


def test_put_get_exists_names_delete(store: Store) -> None:
    blobs = store.blobs
    image = _image(1)
    name = blobs.put(image)
    assert name == hashlib.sha256(image).hexdigest()
    assert blobs.put(image) == name  # idempotent: one blob
    assert blobs.exists(name) and list(blobs.names()) == [name]
    assert blobs.get(name) == image
    empty = blobs.put(b"")
    assert blobs.get(empty) == b"" and blobs.read_range(empty, 0, 10) == b""
    assert sorted(blobs.names()) == sorted([name, empty])
    blobs.delete(name)
    blobs.delete(name)  # absent: no error
    assert not blobs.exists(name) and list(blobs.names()) == [empty]
    with pytest.raises(BlobMissingError):
        blobs.get(name)
    with pytest.raises(BlobMissingError):
        blobs.read_range(name, 0, 10)
    with pytest.raises(ValueError, match="SHA-256"):
        blobs.exists("../../etc/passwd")


def test_read_range_edges(store: Store) -> None:
    image = _image(2)
    name = store.blobs.put(image)
    for offset, length in [(0, 1), (0, CHUNK_SIZE), (CHUNK_SIZE - 1, 2), (CHUNK_SIZE, 512),
                           (1, 3 * CHUNK_SIZE), (IMAGE_SIZE - 5, 512), (IMAGE_SIZE, 10),
                           (IMAGE_SIZE + 100, 10), (0, 10 * IMAGE_SIZE), (7, 0)]:
        assert store.blobs.read_range(name, offset, length) == image[offset:offset + length]
    with pytest.raises(ValueError, match="non-negative"):
        store.blobs.read_range(name, -1, 10)
    with pytest.raises(ValueError, match="non-negative"):
        store.blobs.read_range(name, 0, -1)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_read_range_is_slicing(store: Store, data: st.DataObject) -> None:
    size = data.draw(st.integers(0, 2 * CHUNK_SIZE + 10), label="size")
    image = bytes((i * 7 + size) % 251 for i in range(size))
    name = store.blobs.put(image)
    offset = data.draw(st.integers(0, size + 10), label="offset")
    length = data.draw(st.integers(0, size + 10), label="length")
    assert store.blobs.read_range(name, offset, length) == image[offset:offset + length]


def test_sweep_keeps_referenced_and_young_blobs(store: Store) -> None:
    keep, young, old = (store.blobs.put(_image(seed, 1000)) for seed in (3, 4, 5))
    _age(store, keep, 7200)
    _age(store, old, 7200)
    assert store.blobs.sweep({keep}) == [old]  # young: within the grace period
    assert sorted(store.blobs.names()) == sorted([keep, young])
    assert store.blobs.sweep({keep}, grace_s=0) == [young]
    assert list(store.blobs.names()) == [keep]


def test_putting_an_old_orphan_again_protects_it_from_the_sweep(store: Store) -> None:
    """An upload of bytes already stored as an old orphan (a firmware deleted long ago,
    uploaded again): its put refreshes the stored time, so a sweep between the put and the
    commit of the new row leaves the blob alone."""
    image = _image(6, 5000)
    orphan = store.blobs.put(image)
    _age(store, orphan, 7200)
    assert store.blobs.put(image) == orphan  # the upload's put
    assert store.sweep_blobs() == []  # another node starts meanwhile
    assert store.blobs.get(orphan) == image


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_a_node_starting_during_an_upload_does_not_sweep_its_blob(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Node A stores an upload's blob; before A commits the firmware row, node B starts on
    the same database and sweeps (as every server start does): the blob survives, and A's
    firmware row then finds it."""
    url = (request.getfixturevalue("pg_database") if backend == "postgresql"
           else f"sqlite:///{tmp_path / 'ota.db'}")
    node_a = Store.open(url, tmp_path / "a" / "blobs", pool_size=1)
    node_b = Store.open(url, tmp_path / ("b" if backend == "postgresql" else "a") / "blobs",
                        pool_size=1)
    try:
        image = _image(7, 4000)
        with node_a.write() as tx:
            product = tx.insert_product(slug="p", name="P", platform_id=13, description="",
                                        now=1)
        sha256 = node_a.blobs.put(image)  # the upload, row not committed yet
        assert node_b.sweep_blobs() == []
        with node_a.write() as tx:
            tx.insert_firmware(product_id=product.id, version=1, title="t", description="",
                               filename="f.bin", size=len(image), sha256=sha256,
                               platform_id=13, module_function=5, module_index=1,
                               module_version=6, module_info={}, uploaded_by="x",
                               uploaded_at=1)
        assert node_b.blobs.get(sha256) == image
        assert node_b.sweep_blobs(grace_s=0) == []  # referenced now: never swept
    finally:
        node_a.close()
        node_b.close()


@pytest.fixture(params=["postgresql", "sqlite-database"])
def db_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A store whose blobs are in the database."""
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_database")
    else:
        url = f"sqlite:///{tmp_path / 'ota.db'}"
    opened = Store.open(url, tmp_path / "blobs", pool_size=2, blobs_in_database=True)
    yield opened
    opened.close()


def _db_blobs(store: Store) -> DatabaseBlobStore:
    assert isinstance(store.blobs, DatabaseBlobStore)
    return store.blobs


def _tamper(store: Store, sha256: str, number: int, **values: object) -> None:
    with store.write() as tx:
        tx.conn.execute(sa.update(t.blob_chunks).where(
            t.blob_chunks.c.sha256 == sha256, t.blob_chunks.c.n == number).values(**values))


def test_blobs_are_stored_in_verified_chunks(db_store: Store) -> None:
    image = _image(8)
    name = db_store.blobs.put(image)
    with db_store.read() as tx:
        rows = tx.conn.execute(sa.select(t.blob_chunks).where(t.blob_chunks.c.sha256 == name)
                               .order_by(t.blob_chunks.c.n)).all()
        shape = tx.conn.execute(sa.select(t.blobs).where(t.blobs.c.sha256 == name)).one()
    assert [row.n for row in rows] == [0, 1, 2, 3] and shape.size == IMAGE_SIZE
    assert b"".join(bytes(row.data) for row in rows) == image
    assert all(hashlib.sha256(bytes(row.data)).hexdigest() == row.digest for row in rows)
    assert db_store.blobs.put(image) == name  # idempotent: still one set of rows
    with db_store.read() as tx:
        count = tx.conn.execute(sa.select(sa.func.count()).select_from(t.blob_chunks)).scalar()
    assert count == 4


@pytest.mark.parametrize("tampered", ["data", "digest", "truncated", "missing"])
def test_a_corrupt_chunk_is_never_served(db_store: Store, tampered: str) -> None:
    image = _image(9)
    name = db_store.blobs.put(image)
    if tampered == "data":
        bad = bytearray(image[CHUNK_SIZE:2 * CHUNK_SIZE])
        bad[100] ^= 1
        _tamper(db_store, name, 1, data=bytes(bad))
    elif tampered == "digest":
        _tamper(db_store, name, 1, digest="0" * 64)
    elif tampered == "truncated":
        short = image[CHUNK_SIZE:2 * CHUNK_SIZE - 1]
        _tamper(db_store, name, 1, data=short, digest=hashlib.sha256(short).hexdigest())
    else:
        with db_store.write() as tx:
            tx.conn.execute(sa.delete(t.blob_chunks).where(t.blob_chunks.c.sha256 == name,
                                                           t.blob_chunks.c.n == 1))
    with pytest.raises(BlobCorruptError, match=f"{name}.*chunk 1"):
        db_store.blobs.read_range(name, CHUNK_SIZE + 10, 512)
    with pytest.raises(BlobCorruptError, match=name):
        db_store.blobs.get(name)
    with pytest.raises(BlobCorruptError):  # a range across the bad chunk
        db_store.blobs.read_range(name, CHUNK_SIZE - 10, 512)
    # The sound chunks are still served.
    assert db_store.blobs.read_range(name, 10, 512) == image[10:522]
    assert db_store.blobs.read_range(name, 2 * CHUNK_SIZE, 512) == \
        image[2 * CHUNK_SIZE:2 * CHUNK_SIZE + 512]


def test_a_whole_blob_that_differs_from_its_name_is_refused(db_store: Store) -> None:
    """Chunks consistent with their digests but not with the blob's name (rows rewritten
    wholesale): ``get`` verifies the whole."""
    image = _image(10, 1000)
    name = db_store.blobs.put(image)
    other = image[:-1] + bytes([image[-1] ^ 1])
    _tamper(db_store, name, 0, data=other, digest=hashlib.sha256(other).hexdigest())
    with pytest.raises(BlobCorruptError, match="hash differs"):
        db_store.blobs.get(name)
    assert db_store.blobs.get(name, verify=False) == other


def test_hot_chunks_come_from_the_cache(db_store: Store) -> None:
    blobs = _db_blobs(db_store)
    image = _image(11)
    name = blobs.put(image)
    assert blobs.read_range(name, 0, 512) == image[:512]
    misses = blobs.cache.misses
    for offset in range(0, CHUNK_SIZE, 512):  # a device's transfer of chunk 0
        assert blobs.read_range(name, offset, 512) == image[offset:offset + 512]
    assert blobs.cache.misses == misses and blobs.cache.hits >= CHUNK_SIZE // 512
    blobs.delete(name)
    with pytest.raises(BlobMissingError):  # a deleted blob is not served from memory
        blobs.read_range(name, 0, 512)
    assert blobs.cache.size_bytes == 0


def test_the_chunk_cache_is_bounded(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'ota.db'}", tmp_path / "blobs", pool_size=1,
                       blobs_in_database=True)
    try:
        blobs = _db_blobs(store)
        blobs.cache.max_bytes = 2 * CHUNK_SIZE
        images = [_image(seed) for seed in (12, 13)]
        names = [blobs.put(image) for image in images]
        for name, image in zip(names, images, strict=True):
            assert blobs.get(name) == image
            assert blobs.cache.size_bytes <= 2 * CHUNK_SIZE
    finally:
        store.close()


def test_a_put_is_atomic_for_concurrent_readers(db_store: Store) -> None:
    """A reader polling a blob while it is being stored sees it absent or whole."""
    image = _image(14, 20 * CHUNK_SIZE)
    name = hashlib.sha256(image).hexdigest()
    seen: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                assert _db_blobs(db_store).get(name) == image
                seen.append("whole")
            except BlobMissingError:
                seen.append("absent")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        db_store.blobs.put(image)
    finally:
        done.set()
        thread.join(30)
    assert db_store.blobs.get(name) == image
    assert set(seen) <= {"absent", "whole"}


def test_postgresql_keeps_blobs_in_the_database_and_imports_an_old_directory(
    pg_database: str, tmp_path: Path
) -> None:
    """An installation already on PostgreSQL with blobs in ``<data>/blobs`` (the release
    before blobs moved into the database): opening the store copies them in, once; the
    files stay; a corrupt file is not copied (and does not stop the store opening)."""
    fresh = Store.open(pg_database, tmp_path / "new" / "blobs", pool_size=1)
    try:
        assert isinstance(fresh.blobs, DatabaseBlobStore)
        assert not (tmp_path / "new" / "blobs").exists()  # no directory on PostgreSQL
    finally:
        fresh.close()
    old_dir = BlobStore(tmp_path / "old" / "blobs")
    images = [_image(seed, 70_000) for seed in (15, 16)]
    names = [old_dir.put(image) for image in images]
    rotten = old_dir.put(b"rotten")
    old_dir.path_of(rotten).write_bytes(b"r0tten")
    store = Store.open(pg_database, tmp_path / "old" / "blobs", pool_size=1)
    try:
        for name, image in zip(names, images, strict=True):
            assert store.blobs.get(name) == image
            assert old_dir.exists(name)  # the files stay
        assert not store.blobs.exists(rotten)
        again = _db_blobs(store).import_directory(old_dir)
        assert again.copied == [] and again.corrupt == [rotten]  # idempotent
    finally:
        store.close()


def test_the_blob_settings_reach_the_store(pg_database: str, tmp_path: Path) -> None:
    """``[server] blob_cache_mb`` / ``blob_sweep_grace`` (or ``--set server.KEY=...``) reach
    the store a server opens; out-of-range values are refused with the setting's name."""
    from otacore.errors import ValidationError
    from server.app import ServerConfig, open_store
    from server.config_file import build_server_config

    config = build_server_config({"server": {"data_dir": str(tmp_path / "data"),
                                             "db_url": pg_database, "blob_cache_mb": 3,
                                             "blob_sweep_grace": 120}})
    store = open_store(config)
    try:
        assert _db_blobs(store).cache.max_bytes == 3 * 1024 * 1024
        assert store.blob_sweep_grace_s == 120
        orphan = store.blobs.put(b"orphan")
        _age(store, orphan, 100)
        assert store.sweep_blobs() == []  # 100 s old: within the 120 s grace
        _age(store, orphan, 200)
        assert store.sweep_blobs() == [orphan]
    finally:
        store.close()
    for field, value in (("blob_cache_mb", -1), ("blob_sweep_grace", float("nan"))):
        with pytest.raises(ValidationError, match=field):
            ServerConfig(data_dir=tmp_path, **{field: value})  # type: ignore[arg-type]


def test_readers_of_one_cold_chunk_share_one_database_read(db_store: Store) -> None:
    """The devices of a release ask for the same cold block at once: one chunk row is read
    from the database, whatever the interleaving of the readers."""
    blobs = _db_blobs(db_store)
    image = _image(17)
    name = blobs.put(image)
    readers = 8
    barrier = threading.Barrier(readers)
    results: list[bytes] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            barrier.wait(30)
            results.append(blobs.read_range(name, CHUNK_SIZE + 100, 1024))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and results == [image[CHUNK_SIZE + 100:CHUNK_SIZE + 1124]] * readers
    assert blobs.chunks_read == 1


def test_waiting_readers_read_themselves_when_the_first_read_fails(db_store: Store) -> None:
    """A corrupt chunk: every reader gets BlobCorruptError (none waits forever, none is
    served the bad bytes)."""
    blobs = _db_blobs(db_store)
    image = _image(18)
    name = blobs.put(image)
    _tamper(db_store, name, 0, digest="f" * 64)
    barrier = threading.Barrier(4)
    failures: list[BaseException] = []

    def read() -> None:
        barrier.wait(30)
        try:
            blobs.read_range(name, 0, 1024)
        except BlobCorruptError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(failures) == 4 and not blobs.cache.size_bytes


def test_a_server_start_on_postgresql_copies_the_data_directory_blobs(
    pg_database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What ``ota server --data DIR --db-url postgresql://...`` opens (the installation's
    store) copies ``DIR/blobs`` of the previous release into the database, and says so."""
    from server.store.installation import open_installation_store

    data = tmp_path / "data"
    image = _image(19, 100_000)
    name = BlobStore(data / "blobs").put(image)
    with caplog.at_level("INFO", logger="ota.store"):
        store = open_installation_store(data, pg_database)
    try:
        assert store.blobs.get(name) == image
        assert f"copied 1 blobs from {data / 'blobs'} into the database" in caplog.text
    finally:
        store.close()


def test_a_blob_deleted_by_another_node_is_missing_here_too(db_store: Store) -> None:
    """This node read part of a blob (its shape and a chunk are cached); another node deletes
    it: the chunks not cached are "missing", not "corrupt"."""
    blobs = _db_blobs(db_store)
    image = _image(20)
    name = blobs.put(image)
    assert blobs.read_range(name, 0, 10) == image[:10]
    with db_store.write() as tx:  # what another node's delete does
        tx.conn.execute(sa.delete(t.blob_chunks).where(t.blob_chunks.c.sha256 == name))
        tx.conn.execute(sa.delete(t.blobs).where(t.blobs.c.sha256 == name))
    with pytest.raises(BlobMissingError, match=name):
        blobs.read_range(name, 2 * CHUNK_SIZE, 10)
    with pytest.raises(BlobMissingError):
        blobs.read_range(name, 0, 10)  # forgotten, cached chunks with it
