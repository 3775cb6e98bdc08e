"""The durable store: schema, queries, transactions, SQLite settings and the blob directory.

Tests taking ``store`` run on SQLite and on PostgreSQL (tests/conftest.py: store_backend)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from server.events import Event, EventSource
from server.store import (
    BlobCorruptError,
    BlobMissingError,
    BlobStore,
    SchemaVersionError,
    Store,
    StoreConfigError,
    StoreConflictError,
    TokenRecord,
    UpdateStateRecord,
)
from server.store import schema as t
from server.store.tx_events import append_events, read_events_after

D1 = "0123456789abcdef01234567"
D2 = "89abcdef0123456789abcdef"


def _fw(product_id: int, version: int, sha: str = "ab" * 32) -> dict[str, object]:
    return dict(
        product_id=product_id,
        version=version,
        title=f"v{version}",
        description="",
        filename="f.bin",
        size=10,
        sha256=sha,
        platform_id=13,
        module_function=5,
        module_index=1,
        module_version=6,
        module_info={"k": version},
        uploaded_by="me",
        uploaded_at=5,
    )


def test_sqlite_is_wal_with_full_sync_and_foreign_keys(sqlite_store: Store) -> None:
    store = sqlite_store
    with store.read() as tx:
        pragma = tx.conn.exec_driver_sql
        assert pragma("PRAGMA journal_mode").scalar() == "wal"
        assert pragma("PRAGMA synchronous").scalar() == 2  # FULL
        assert pragma("PRAGMA foreign_keys").scalar() == 1
    assert store.check() == "ok" and store.backend == "sqlite"


def test_products_devices_groups(store: Store) -> None:
    with store.write() as tx:
        product = tx.insert_product(slug="w", name="W", platform_id=13, description="", now=1)
        for device_id in (D1, D2):
            tx.insert_device(device_id, product.id, 2)
        groups = tx.ensure_groups(product.id, ["b", "a", "a"], 3)
        tx.set_device_groups(D1, [g.id for g in groups])
        tx.update_device(D2, {"name": "Second", "online": True}, 4)
        with pytest.raises(ValueError, match="cannot be changed"):
            tx.update_device(D2, {"id": "x"}, 4)
    with store.read() as tx:
        assert tx.get_product("w") == tx.get_product(product.id) == tx.get_product(str(product.id))
        assert tx.get_product("nope") is None
        device = tx.get_device(D1)
        assert device is not None and device.groups == ("a", "b")
        assert tx.list_devices(product.id, group_names=["a"])[1] == 1
        assert [d.id for d in tx.list_devices(product.id, name_contains="SEC")[0]] == [D2]
        assert [d.id for d in tx.list_devices(product.id, online=True)[0]] == [D2]
        assert [d.id for d in tx.list_devices(product.id, id_contains="ef0123456789")[0]] == [D2]
        # LIKE wildcards in filters are literal characters.
        assert tx.list_devices(product.id, id_contains="%")[1] == 0
        assert tx.group_device_counts(product.id) == {g.id: 1 for g in groups}
    with store.write() as tx:
        assert tx.mark_all_offline(9) == 1
        tx.delete_group(groups[0].id)
        tx.delete_device(D1)
    with store.read() as tx:
        assert tx.get_device(D1) is None and tx.get_device(D2).online is False  # type: ignore[union-attr]
        assert [g.name for g in tx.list_groups(product.id)] == ["b"]


def test_firmware_releases_flashes_updates(store: Store) -> None:
    with store.write() as tx:
        product = tx.insert_product(slug="w", name="W", platform_id=13, description="", now=1)
        tx.insert_device(D1, product.id, 2)
        group = tx.insert_group(product.id, "beta", description="", color="", now=1)
        tx.insert_firmware(**_fw(product.id, 1))
        tx.insert_firmware(**_fw(product.id, 2, "cd" * 32))
        tx.set_release(product.id, None, version=1, intelligent=False, actor="me", now=3)
        tx.set_release(product.id, group.id, version=2, intelligent=True, actor="me", now=3)
        tx.set_release(product.id, None, version=2, intelligent=False, actor="me", now=4)
        assert tx.mark_image_running_seen(product.id, "cd" * 32, 4, 1, 5) == []  # other slot
        assert tx.mark_image_running_seen(product.id, "cd" * 32, 5, 1, 5) == [2]
        assert tx.mark_image_running_seen(product.id, "cd" * 32, 5, 1, 6) == []  # seen already
        assert tx.downloadable_size(product.id, 13, "cd" * 32) == 10
        assert tx.downloadable_size(product.id + 1, 13, "cd" * 32) is None
    with store.read() as tx:
        releases = tx.list_releases(product.id)
        assert [(r.group_name, r.version, r.intelligent) for r in releases] == [
            (None, 2, False),
            ("beta", 2, True),
        ]
        assert tx.get_firmware(product.id, 2).running_seen_at == 5  # type: ignore[union-attr]
        assert [f.version for f in tx.list_firmware(product.id)] == [2, 1]
        assert tx.referenced_blobs() == {"ab" * 32, "cd" * 32}
    with pytest.raises(StoreConflictError), store.write() as tx:  # (product, version) unique
        tx.insert_firmware(**_fw(product.id, 1))
    with store.write() as tx:
        tx.bump_release_counter(releases[0].id, "devices_started")
        tx.delete_release(product.id, group.id)
        first = tx.insert_flash(
            device_id=D1,
            kind="binary",
            version=None,
            sha256="ef" * 32,
            size=3,
            filename="a",
            module_info=None,
            status="pending",
            error="",
            requested_by="me",
            requested_at=7,
            finished_at=None,
        )
        second = tx.insert_flash(
            device_id=D1,
            kind="binary",
            version=None,
            sha256="ef" * 32,
            size=3,
            filename="b",
            module_info=None,
            status="pending",
            error="",
            requested_by="me",
            requested_at=8,
            finished_at=None,
        )
        tx.put_update_state(UpdateStateRecord(D1, "ef" * 32, None, "delta", 10, 100, "x", 7, 8))
        tx.put_update_state(UpdateStateRecord(D1, "ef" * 32, None, "delta", 50, 100, "x", 7, 9))
    with store.read() as tx:
        assert tx.list_releases(product.id)[0].devices_started == 1
        assert len(tx.list_releases(product.id)) == 1
        assert tx.pending_flash(D1).id == second.id != first.id  # type: ignore[union-attr]
        assert tx.get_update_state(D1).bytes_done == 50  # type: ignore[union-attr]
        assert tx.blob_is_referenced("ef" * 32) and not tx.blob_is_referenced("00" * 32)


def test_failed_transaction_rolls_back(store: Store) -> None:
    with pytest.raises(RuntimeError), store.write() as tx:
        tx.insert_product(slug="w", name="W", platform_id=13, description="", now=1)
        raise RuntimeError("boom")
    with store.read() as tx:
        assert tx.list_products() == []


def test_tokens_users_audit(store: Store) -> None:
    with store.write() as tx:
        user = tx.insert_user("ann", "scrypt$...", "viewer", 1)
        tx.insert_token(
            TokenRecord("a" * 64, "access", "viewer", "ann", user.id, None, None, 1, None, None)
        )
        assert tx.revoke_token("a" * 64, 2) is True and tx.revoke_token("a" * 64, 3) is False
        tx.add_audit(
            actor="ann", action="x.y", product_id=None, target="t", details={"n": 1}, now=4
        )
    with store.read() as tx:
        assert tx.get_token("a" * 64).revoked_at == 2  # type: ignore[union-attr]
        assert tx.list_audit()[0].details == {"n": 1}


def test_reopen_keeps_data_and_refuses_newer_schema(
    store: Store, reopen: Callable[..., Store]
) -> None:
    with store.write() as tx:
        tx.insert_product(slug="w", name="W", platform_id=13, description="", now=1)
    store.close()
    store = reopen()
    with store.read() as tx:
        assert [p.slug for p in tx.list_products()] == ["w"]
    with store.write() as tx:
        tx.conn.execute(sa.update(t.meta).values(value="999"))
    store.close()
    with pytest.raises(SchemaVersionError, match="newer"):
        reopen()


def test_a_version_1_store_is_migrated_in_place(data_dir: Path) -> None:
    store = Store.open_dir(data_dir)
    with store.write() as tx:
        product = tx.insert_product(slug="m", name="M", platform_id=13, description="", now=1)
        tx.add_transfer_bytes(product.id, 1, bytes_sent=10, bytes_full=20, transfer="delta")
        # What a version 1 server wrote: no compressed_transfers column.
        tx.conn.execute(
            sa.text("ALTER TABLE firmware_transfer_bytes DROP COLUMN compressed_transfers")
        )
        # v3's; SQLite drops no indexed column (revision 0010's index holds it)
        tx.conn.execute(sa.text("DROP INDEX ix_devices_session_node_owner"))
        tx.conn.execute(sa.text("ALTER TABLE devices DROP COLUMN session_owner"))
        tx.conn.execute(sa.update(t.meta).values(value="1"))
    store.close()
    store = Store.open_dir(data_dir)
    with store.write() as tx:
        assert tx.conn.execute(sa.select(t.meta.c.value)).scalar_one() == str(t.SCHEMA_VERSION)
        totals = tx.add_transfer_bytes(product.id, 1, bytes_sent=5, bytes_full=20, transfer="zstd")
        tx.insert_device("0123456789abcdef01234567", product.id, 2)
        assert tx.update_device("0123456789abcdef01234567",
                                {"online": True, "session_owner": "main-1/1"}, 3)
        assert tx.clear_presence("0123456789abcdef01234567", "main-1/1", 4)
    store.close()
    assert totals == {
        "bytes_sent": 15,
        "bytes_full": 40,
        "delta_transfers": 1,
        "full_transfers": 0,
        "compressed_transfers": 1,
    }


def test_a_version_3_store_gains_event_sources_and_image_indexes(data_dir: Path) -> None:
    """Schema 7 (issue 13): event_log rows say who published them, and firmware and Device
    OS modules are found by image through indexes; an older store upgrades in place."""
    store = Store.open_dir(data_dir)
    with store.write() as tx:
        product = tx.insert_product(slug="m", name="M", platform_id=13, description="", now=1)
        tx.insert_firmware(**_fw(product.id, 1))
        for name in ("ix_firmware_product_sha256", "ix_system_modules_platform_sha256"):
            tx.conn.execute(sa.text(f"DROP INDEX {name}"))
        tx.conn.execute(sa.text("ALTER TABLE event_log DROP COLUMN source"))  # what v3 had
        tx.conn.execute(sa.text(
            "INSERT INTO event_log (origin, name, data, coreid, ttl, public, published_at) "
            "VALUES ('old', 'ota/device/flash/requested', 'lock', 'x', 60, 0, 1)"))
        tx.conn.execute(sa.update(t.meta).values(value="3"))
    store.close()
    store = Store.open_dir(data_dir)
    with store.write() as tx:
        assert tx.conn.execute(sa.select(t.meta.c.value)).scalar_one() == str(t.SCHEMA_VERSION)
        indexes = set(tx.conn.execute(sa.text(
            "SELECT name FROM sqlite_master WHERE type = 'index'")).scalars())
        assert {"ix_firmware_product_sha256", "ix_system_modules_platform_sha256"} <= indexes
        plan = " ".join(str(row) for row in tx.conn.execute(sa.text(
            "EXPLAIN QUERY PLAN SELECT size FROM firmware WHERE product_id = 1 "
            "AND sha256 = 'x'")))
        assert "ix_firmware_product_sha256" in plan
        # The row written before sources existed is never taken for the cloud's own.
        (old,), _ = read_events_after(tx.conn, 0, exclude_origin="me")
        assert old.source is EventSource.DEVICE
        append_events(tx.conn, "new", [Event("ota/device/flash/requested", "lock")])
        _, new = read_events_after(tx.conn, 0, exclude_origin="me")[0]
        assert new.source is EventSource.CLOUD
        assert tx.downloadable_size(product.id, 13, "ab" * 32) == 10
    store.close()


def test_bad_urls(tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match="file path"):
        Store.open("sqlite://", tmp_path / "b")
    with pytest.raises(StoreConfigError, match="not a valid"):
        Store.open("::nonsense::", tmp_path / "b")


def test_concurrent_writers_queue_instead_of_failing(
    store: Store, reopen: Callable[..., Store]
) -> None:
    with store.write() as tx:
        product = tx.insert_product(slug="w", name="W", platform_id=13, description="", now=1)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(15):
                with store.write() as tx:  # read-then-write in one transaction
                    count = len(tx.list_groups(product.id))
                    tx.insert_group(
                        product.id, f"g{n}-{i}-{count}", description="", color="", now=1
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with store.read() as tx:
        assert len(tx.list_groups(product.id)) == 60
    # A second process-like store on the same file (the CLI does this) also works.
    other = reopen()
    with other.write() as tx:
        tx.insert_group(product.id, "from-other", description="", color="", now=1)


def test_blob_store_is_content_addressed_and_verified(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    data = b"firmware" * 1000
    name = blobs.put(data)
    assert name == hashlib.sha256(data).hexdigest() and blobs.put(data) == name
    assert blobs.path_of(name) == tmp_path / "blobs" / name[:2] / name
    assert blobs.get(name) == data and list(blobs.names()) == [name]
    blobs.path_of(name).write_bytes(b"tampered")
    with pytest.raises(BlobCorruptError):
        blobs.get(name)
    assert blobs.get(name, verify=False) == b"tampered"
    blobs.delete(name)
    with pytest.raises(BlobMissingError):
        blobs.get(name)
    with pytest.raises(ValueError, match="not a lowercase hex"):
        blobs.path_of("../../etc/passwd")


def test_blob_store_removes_interrupted_writes_and_sweeps(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    keep, drop = blobs.put(b"keep"), blobs.put(b"drop")
    leftover = tmp_path / "blobs" / "tmp" / "abc.partial"
    leftover.write_bytes(b"half a write")
    reopened = BlobStore(tmp_path / "blobs")
    assert not leftover.exists()
    assert reopened.sweep({keep}) == []  # both younger than the grace period
    assert reopened.sweep({keep}, grace_s=0) == [drop] and list(reopened.names()) == [keep]
    assert os.listdir(tmp_path / "blobs" / "tmp") == []


def test_versions_accept_only_ascii_digits() -> None:
    """'¹' passes str.isdigit() but not int(): it must be a 400, not a 500 (fuzz finding)."""
    import pytest

    from otacore.errors import ValidationError
    from server.fleet.base import check_version

    assert check_version(" 42 ") == 42
    for bad in ("¹", "٣", "4²", "-1", "65536"):
        with pytest.raises(ValidationError):
            check_version(bad)
