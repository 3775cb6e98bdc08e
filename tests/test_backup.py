"""``ota admin backup`` / ``restore`` on real files (issue 16, item 6): a round trip brings
back the database, the blobs it refers to and the data directory's keys; a damaged backup,
a missing or corrupt blob, a non-empty target and a running server are each refused with
their own error; the stepped online copy falls back to one step when the server keeps
writing; the data directory's lock."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from server.cli.device_store_cmd import create_provisioned_product
from server.data_lock import DataDirBusyError, hold_data_dir
from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.store import Store
from server.store.backup import _copy_database, backup_installation
from server.store.backup_files import (
    MANIFEST_NAME,
    BackupBlobError,
    BackupError,
    BackupIntegrityError,
    BackupUnsupportedError,
    RestoreRefusedError,
    verify_backup,
)
from server.store.restore import restore_installation


def _installation(tmp_path: Path, make_firmware: Callable[..., bytes],
                  versions: tuple[int, ...] = (1, 2)) -> tuple[Path, int, dict[int, str]]:
    """A data directory with a product, 2 provisioned devices and firmware ``versions``."""
    data = tmp_path / "data"
    product_id, _ = create_provisioned_product(data, tmp_path / "creds", "Sensors", 13, 2)
    store = Store.open_dir(data, pool_size=1)
    fleet = Fleet(store, EventBus())
    shas: dict[int, str] = {}
    try:
        for version in versions:
            image = make_firmware(version, size=20_000 + version, seed=version)

            async def upload(image: bytes = image, version: int = version) -> None:
                await fleet.upload_firmware(SYSTEM_ACTOR, product_id, image,
                                            version=version, title=f"v{version}")

            trio.run(upload)
            shas[version] = hashlib.sha256(image).hexdigest()
    finally:
        store.close()
    return data, product_id, shas


def _firmware(data: Path, product_id: int) -> dict[int, str]:
    store = Store.open_dir(data, pool_size=1)
    try:
        with store.read() as tx:
            return {fw.version: fw.sha256 for fw in tx.list_firmware(product_id)}
    finally:
        store.close()


def _blob(data: Path, sha256: str) -> Path:
    return data / "blobs" / sha256[:2] / sha256


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_restores_database_blobs_and_keys(tmp_path: Path, make_firmware) -> None:
    data, product_id, shas = _installation(tmp_path, make_firmware)
    backup = tmp_path / "backup"
    manifest = backup_installation(data, backup)
    assert manifest.schema_version is not None and manifest.copy_restarts == 0
    assert sorted(manifest.blobs) == sorted(shas.values())
    # Everything in the backup is owner-only: it holds the CA key and the signing keys.
    for path in [backup, *backup.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    assert not list(tmp_path.glob(".backup.partial-*"))  # renamed into place
    assert not list(data.glob(".backup-pins-*"))  # the pins are gone
    keys = {name: body for name, body in _tree(data).items()
            if name.startswith(("keys/", "pki/"))}
    assert any(name.startswith("pki/") for name in keys)
    assert any(name.startswith("keys/") for name in keys)

    restored = tmp_path / "restored"
    result = restore_installation(backup, restored)
    assert not result.replaced and result.database == restored / "ota.db"
    assert _firmware(restored, product_id) == shas
    for sha in shas.values():
        assert hashlib.sha256(_blob(restored, sha).read_bytes()).hexdigest() == sha
    assert {name: body for name, body in _tree(restored).items() if name in keys} == keys
    assert not list(tmp_path.glob(".restored.restore-*"))


def test_unreferenced_blobs_are_left_out(tmp_path: Path, make_firmware) -> None:
    data, _, shas = _installation(tmp_path, make_firmware)
    stray = hashlib.sha256(b"left by a crash").hexdigest()
    _blob(data, stray).parent.mkdir(exist_ok=True)
    _blob(data, stray).write_bytes(b"left by a crash")
    manifest = backup_installation(data, tmp_path / "backup")
    assert stray not in manifest.blobs and sorted(manifest.blobs) == sorted(shas.values())


def _tamper_byte(backup: Path, shas: dict[int, str]) -> None:
    path = backup / "blobs" / shas[1][:2] / shas[1]
    body = bytearray(path.read_bytes())
    body[100] ^= 1
    path.write_bytes(bytes(body))


def _tamper_manifest_hash(backup: Path, shas: dict[int, str]) -> None:
    path = backup / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["files"]["ota.db"]["sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))


def _add_file(backup: Path, shas: dict[int, str]) -> None:
    (backup / "data" / "keys" / "planted.pem").write_bytes(b"not from the installation")


def _remove_file(backup: Path, shas: dict[int, str]) -> None:
    next((backup / "data" / "pki").iterdir()).unlink()


def _truncate_database(backup: Path, shas: dict[int, str]) -> None:
    with (backup / "ota.db").open("r+b") as handle:
        handle.truncate(4096)


def _remove_manifest(backup: Path, shas: dict[int, str]) -> None:
    (backup / MANIFEST_NAME).unlink()


def _garble_manifest(backup: Path, shas: dict[int, str]) -> None:
    (backup / MANIFEST_NAME).write_text("{not json")


def _escape_manifest(backup: Path, shas: dict[int, str]) -> None:
    path = backup / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["files"]["../outside"] = {"sha256": "0" * 64, "size": 1}
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("tamper, words", [
    (_tamper_byte, "changed"),
    (_tamper_manifest_hash, "changed"),
    (_add_file, "not in the manifest"),
    (_remove_file, "missing"),
    (_truncate_database, "changed"),
    (_remove_manifest, "holds no manifest.json"),
    (_garble_manifest, "cannot read"),
    (_escape_manifest, "leaves the backup directory"),
])
def test_a_damaged_backup_is_refused_and_the_target_left_alone(
    tmp_path: Path, make_firmware, tamper: Callable[[Path, dict[int, str]], None], words: str,
) -> None:
    data, _, shas = _installation(tmp_path, make_firmware, versions=(1,))
    backup = tmp_path / "backup"
    backup_installation(data, backup)
    verify_backup(backup)  # whole before the damage
    tamper(backup, shas)
    with pytest.raises(BackupIntegrityError, match=words):
        verify_backup(backup)
    target = tmp_path / "target"
    with pytest.raises(BackupIntegrityError):
        restore_installation(backup, target)
    assert not target.exists() or list(target.iterdir()) == []


def test_a_missing_blob_is_an_error_not_a_gap(tmp_path: Path, make_firmware) -> None:
    data, _, shas = _installation(tmp_path, make_firmware)
    _blob(data, shas[2]).unlink()
    with pytest.raises(BackupBlobError, match=shas[2][:16]):
        backup_installation(data, tmp_path / "backup")
    assert not (tmp_path / "backup").exists()
    assert not list(tmp_path.glob(".backup.partial-*")) and not list(data.glob(".backup-pins-*"))


def test_a_corrupt_blob_is_an_error(tmp_path: Path, make_firmware) -> None:
    data, _, shas = _installation(tmp_path, make_firmware)
    path = _blob(data, shas[1])
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(BackupBlobError, match="no longer match their SHA-256"):
        backup_installation(data, tmp_path / "backup")
    assert not (tmp_path / "backup").exists()


def test_backup_refuses_bad_targets_and_postgresql(tmp_path: Path, make_firmware) -> None:
    data, _, _ = _installation(tmp_path, make_firmware, versions=())
    (tmp_path / "taken").mkdir()
    with pytest.raises(BackupError, match="exists"):
        backup_installation(data, tmp_path / "taken")
    with pytest.raises(BackupError, match="does not exist"):
        backup_installation(data, tmp_path / "no" / "such" / "dir")
    with pytest.raises(BackupError, match="holds no store"):
        backup_installation(tmp_path / "creds", tmp_path / "b")
    with pytest.raises(BackupUnsupportedError, match="pg_dump"):
        backup_installation(data, tmp_path / "b",
                            db_url="postgresql+psycopg://ota@db.example/ota")
    with pytest.raises(BackupUnsupportedError, match="pg_restore"):
        restore_installation(tmp_path / "b", tmp_path / "t",
                             db_url="postgresql+psycopg://ota@db.example/ota")


def test_restore_refuses_a_non_empty_target_without_force(tmp_path: Path, make_firmware) -> None:
    data, product_id, shas = _installation(tmp_path, make_firmware, versions=(1,))
    backup = tmp_path / "backup"
    backup_installation(data, backup)
    other, _, other_shas = _installation(tmp_path / "other", make_firmware, versions=(7,))
    before = _tree(other)
    with pytest.raises(RestoreRefusedError, match="--force"):
        restore_installation(backup, other)
    assert _tree(other) == {**before, "server.lock": _tree(other)["server.lock"]}
    result = restore_installation(backup, other, force=True)
    assert result.replaced
    assert _firmware(other, product_id) == shas
    assert not _blob(other, other_shas[7]).exists()  # the old installation is gone whole
    assert not list((tmp_path / "other").glob(".data.replaced-*"))


def test_restore_refuses_while_the_directory_is_locked(tmp_path: Path, make_firmware) -> None:
    data, _, _ = _installation(tmp_path, make_firmware, versions=(1,))
    backup = tmp_path / "backup"
    backup_installation(data, backup)
    target = tmp_path / "target"
    with hold_data_dir(target):  # what a running ota server holds (see test_backup_cli)
        with pytest.raises(DataDirBusyError, match="in use by another process"):
            restore_installation(backup, target)
        assert [p.name for p in target.iterdir()] == ["server.lock"]
    restore_installation(backup, target)  # the holder left


def test_data_dir_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    with hold_data_dir(tmp_path / "d") as lock:
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(DataDirBusyError, match=f"pid {os.getpid()}"), \
                hold_data_dir(tmp_path / "d"):
            pass
    with hold_data_dir(tmp_path / "d"):  # free again once the holder left
        pass


def test_restore_into_an_external_sqlite_database(tmp_path: Path, make_firmware) -> None:
    data, product_id, shas = _installation(tmp_path, make_firmware, versions=(1,))
    backup = tmp_path / "backup"
    backup_installation(data, backup)
    db_file = tmp_path / "db" / "fleet.db"
    url = f"sqlite:///{db_file}"
    result = restore_installation(backup, tmp_path / "node", db_url=url)
    assert result.database == db_file and not (tmp_path / "node" / "ota.db").exists()
    store = Store.open(url, tmp_path / "node" / "blobs", pool_size=1)
    try:
        with store.read() as tx:
            assert {fw.version: fw.sha256 for fw in tx.list_firmware(product_id)} == shas
    finally:
        store.close()
    # The external database counts as an installation: replacing it needs --force.
    with pytest.raises(RestoreRefusedError):
        restore_installation(backup, tmp_path / "node2", db_url=url)
    # And it can be backed up from there (the blobs and keys stay in the data directory).
    again = backup_installation(tmp_path / "node", tmp_path / "backup2", db_url=url)
    assert again.blobs == sorted(shas.values())


def test_stepped_copy_falls_back_to_one_step_when_writes_keep_restarting_it(
    tmp_path: Path,
) -> None:
    """A write by another connection restarts SQLite's online backup at its next step; when
    the server writes during every step, the copy must still finish, consistent."""
    source = tmp_path / "live.db"
    writer = sqlite3.connect(source, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE t (n INTEGER, pad BLOB)")
    for n in range(300):  # ~300 pages of 4 KiB
        writer.execute("INSERT INTO t VALUES (?, randomblob(3000))", (n,))
    steps = 0

    def write_between_steps() -> None:
        nonlocal steps
        steps += 1
        writer.execute("INSERT INTO t VALUES (?, randomblob(10))", (1000 + steps,))

    restarts = _copy_database(source, tmp_path / "copy.db", step_pages=16, max_restarts=2,
                              after_step=write_between_steps)
    assert restarts == 3  # two tolerated, the third sends the rest in one step
    copy = sqlite3.connect(tmp_path / "copy.db")
    try:
        copied = copy.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        copy.close()
    # Every row committed before the final one-step copy is there (that copy is one
    # snapshot, taken after the last write of the callback).
    assert copied == writer.execute("SELECT count(*) FROM t").fetchone()[0]
    writer.close()


def test_pins_of_a_backup_that_died_are_removed_by_the_next(tmp_path: Path,
                                                            make_firmware) -> None:
    """A backup killed mid-way leaves its pin directory (hard links to blobs) behind; the
    next backup removes it when no other backup runs, and leaves the pins alone while one
    does (running backups hold .backup-pins.lock shared)."""
    import fcntl

    data, _, shas = _installation(tmp_path, make_firmware, versions=(1,))
    dead = data / ".backup-pins-dead"
    (dead / shas[1][:2]).mkdir(parents=True)
    os.link(_blob(data, shas[1]), dead / shas[1][:2] / shas[1])
    other = os.open(data / ".backup-pins.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(other, fcntl.LOCK_SH)  # another backup runs: its pins may be these
        backup_installation(data, tmp_path / "first")
        assert dead.exists()
    finally:
        os.close(other)
    manifest = backup_installation(data, tmp_path / "second")
    assert not dead.exists()
    assert not any(".backup-pins" in name for name in manifest.files), manifest.files
    assert manifest.blobs == [shas[1]]


def test_a_db_url_file_inside_the_data_directory_round_trips(tmp_path: Path) -> None:
    """A --db-url SQLite file kept inside the data directory under another name is the
    database, not a data file: backed up once (not with its -wal/-shm), restored to its
    place."""
    data = tmp_path / "data"
    url = f"sqlite:///{data / 'db' / 'fleet.db'}"
    product_id, _ = create_provisioned_product(data, tmp_path / "creds", "S", 13, 1,
                                               db_url=url)
    writer = Store.open(url, data / "blobs", pool_size=1)  # open: its -wal exists now
    try:
        manifest = backup_installation(data, tmp_path / "backup", db_url=url)
    finally:
        writer.close()
    assert not any(name.startswith("data/db/") for name in manifest.files), manifest.files
    restored = tmp_path / "restored"
    url2 = f"sqlite:///{restored / 'db' / 'fleet.db'}"
    result = restore_installation(tmp_path / "backup", restored, db_url=url2)
    assert result.database == restored / "db" / "fleet.db" and result.database.is_file()
    store = Store.open(url2, restored / "blobs", pool_size=1)
    try:
        with store.read() as tx:
            assert tx.get_product(product_id) is not None
    finally:
        store.close()


def test_shared_holders_of_the_data_dir_lock_exclude_a_restore(tmp_path: Path) -> None:
    """PostgreSQL nodes share a data directory's lock; a restore needs it alone."""
    node = tmp_path / "d"
    with hold_data_dir(node, shared=True), hold_data_dir(node, shared=True), \
            pytest.raises(DataDirBusyError), hold_data_dir(node):
        pass
    with hold_data_dir(tmp_path / "d"), pytest.raises(DataDirBusyError), \
            hold_data_dir(tmp_path / "d", shared=True):
        pass
