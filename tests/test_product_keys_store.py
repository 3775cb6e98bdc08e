"""The products' signing keys in the store (server.devices.keys, key_vault, key_import,
key_cache): private at rest, opened only with the data directory's KEK, imported once from
an older release's key files, one statement per sequence, and every process's cache told
of a change through the event log."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgpack
import pytest
import sqlalchemy as sa
import trio

from otacore.signing import KeyAction, generate_signing_key, introduce_key, parse_statement
from server.devices.key_cache import ProductKeyCache, changed_product
from server.devices.key_import import (
    KeyFilesMismatchError,
    import_key_files,
)
from server.devices.key_vault import KEK_FILE, KeyVault, KeyVaultError
from server.devices.keys import (
    product_key_state,
    product_signing_key,
    product_statements,
    rotate_product_key,
    withdraw_product_key,
)
from server.events import PRODUCT_KEYS_CHANGED, EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.relay import EventRelay, RelaySettings
from server.store import Store
from server.store import schema as t
from server.store.backup import backup_installation
from server.store.errors import StoreConflictError
from server.store.restore import restore_installation


def _product(store: Store, name: str = "Sensors") -> int:
    return Fleet(store, EventBus()).create_product_sync(SYSTEM_ACTOR, name, 13).id


def test_the_database_file_never_holds_a_private_key_in_clear(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = Store.open_dir(data, pool_size=1)
    try:
        products = [_product(store, f"P{n}") for n in range(2)]
        keys = [product_signing_key(store, data, p) for p in products]
        for product in products:
            for _ in range(3):
                keys.append(rotate_product_key(store, data, product).new)
    finally:
        store.close()  # checkpoints the WAL into ota.db
    files = [p for p in data.iterdir() if p.name.startswith("ota.db")]
    raw = b"".join(p.read_bytes() for p in files)
    assert len(keys) == 8
    for key in keys:
        assert key.private_bytes() not in raw, f"{key.key_id}'s private key is in clear"
        assert key.public_key in raw  # the scan does see what the rows hold
    assert os.stat(data / KEK_FILE).st_mode & 0o777 == 0o600


def test_a_sealed_key_opens_only_with_its_kek_product_and_key_id(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    product = _product(store)
    key = product_signing_key(store, data_dir, product)
    assert product_signing_key(store, data_dir, product) == key  # made once, then read

    # Another node's data directory with another KEK: the error names both KEKs and the fix.
    other = tmp_path / "other-node"
    KeyVault.create(other)
    with pytest.raises(KeyVaultError, match=rf"sealed under key-encryption key .* but this "
                                            rf"node's {other / KEK_FILE} is key .*copy"):
        product_signing_key(store, other, product)
    # No KEK at all while the store holds sealed keys: none is made, the error says why.
    bare = tmp_path / "bare-node"
    with pytest.raises(KeyVaultError, match=f"{bare / KEK_FILE} is missing, but the store"):
        product_signing_key(store, bare, product)
    assert not (bare / KEK_FILE).exists()
    # A truncated KEK file.
    (bare / KEK_FILE).parent.mkdir(parents=True)
    (bare / KEK_FILE).write_bytes(b"short")
    with pytest.raises(KeyVaultError, match="holds 5 bytes"):
        product_signing_key(store, bare, product)

    # A sealed key moved onto another product's row fails authentication (the AAD).
    second = _product(store, "Other")
    product_signing_key(store, data_dir, second)
    keys = t.product_signing_keys
    with store.write() as tx:
        sealed = tx.conn.execute(sa.select(keys.c.sealed_private_key).where(
            keys.c.product_id == product)).scalar_one()
        tx.conn.execute(sa.update(keys).where(keys.c.product_id == second)
                        .values(sealed_private_key=sealed))
    with pytest.raises(KeyVaultError, match="fails authentication"):
        product_signing_key(store, data_dir, second)


def _old_release_files(data: Path, product: int, rotations: int) -> tuple[list[bytes], str]:
    """Key files as releases before revision 0009 wrote them: the current key, one file per
    rotated-in key, the statements. Returns the statements and the current key id."""
    keys_dir = data / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    current = generate_signing_key()
    statements = []
    for sequence in range(1, rotations + 1):
        new = generate_signing_key()
        statements.append(introduce_key(current, new.public_key, product_id=product,
                                        sequence=sequence).to_bytes())
        (keys_dir / f"product-{product}-{new.key_id}.ed25519").write_bytes(new.private_bytes())
        current = new
    (keys_dir / f"product-{product}.ed25519").write_bytes(current.private_bytes())
    if statements:
        (keys_dir / f"product-{product}.statements").write_bytes(msgpack.packb(statements))
    return statements, current.key_id


def test_key_files_of_an_older_release_are_imported_once(store: Store, data_dir: Path) -> None:
    product = _product(store)
    statements, current = _old_release_files(data_dir, product, 3)
    assert import_key_files(store, data_dir) == [product]
    assert import_key_files(store, data_dir) == []  # idempotent
    state = product_key_state(store, data_dir, product)
    assert state.key.key_id == current and state.statements == statements
    with store.read() as tx:
        held = {r.key_id for r in tx.signing_keys(product)}
    assert current in held and len(held) == 3  # the rotated-in keys, sealed too
    assert (data_dir / "keys" / f"product-{product}.ed25519").exists()  # the files stay

    # The store moves on (a rotation): the now older files still agree (a prefix).
    rotation = rotate_product_key(store, data_dir, product)
    assert rotation.sequence == 4 and rotation.old.key_id == current
    assert import_key_files(store, data_dir) == []

    # A product whose first use finds its files imports them (no new key is made).
    lazy = _product(store, "Lazy")
    _, lazy_current = _old_release_files(data_dir, lazy, 0)
    assert product_signing_key(store, data_dir, lazy).key_id == lazy_current


def test_key_files_that_disagree_with_the_store_are_an_error_naming_both(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    product = _product(store)
    stored = product_signing_key(store, data_dir, product)
    # This node's directory rotated alone, before the keys moved into the store.
    node = tmp_path / "diverged"
    (node / KEK_FILE).parent.mkdir(parents=True)
    (node / KEK_FILE).write_bytes((data_dir / KEK_FILE).read_bytes())
    _, diverged = _old_release_files(node, product, 1)
    with pytest.raises(KeyFilesMismatchError) as raised:
        import_key_files(store, node)
    message = str(raised.value)
    assert diverged in message and stored.key_id in message
    assert f"product-{product}.ed25519" in message and "move this node's" in message
    assert product_signing_key(store, data_dir, product) == stored  # nothing overwritten


def test_a_statement_sequence_is_taken_once(store: Store, data_dir: Path) -> None:
    """The UNIQUE (product_id, sequence) a rotation relies on instead of a lock file."""
    product = _product(store)
    rotate_product_key(store, data_dir, product)
    with pytest.raises(StoreConflictError), store.write() as tx:
        tx.add_key_statements(product, 1, [b"a second statement 1"], 0)
    assert len(product_statements(store, product)) == 1
    withdrawn = parse_statement(product_statements(store, product)[0]).signer_key_id
    assert withdraw_product_key(store, data_dir, product, withdrawn) == 2
    statements = [parse_statement(s) for s in product_statements(store, product)]
    assert [(s.sequence, s.action) for s in statements] == [
        (1, KeyAction.INTRODUCE), (2, KeyAction.WITHDRAW)]


async def test_another_process_s_rotation_reaches_the_cache_through_the_relay(
    store: Store, data_dir: Path
) -> None:
    """The cache re-reads on the PRODUCT_KEYS_CHANGED event the rotation appended to the
    event log (the relay publishes it); the stamp check is set far beyond the test, so
    only the event can bring the change."""
    product = _product(store)
    key = await trio.to_thread.run_sync(product_signing_key, store, data_dir, product)
    bus = EventBus()
    cache = ProductKeyCache(store, data_dir, trio.CapacityLimiter(2), recheck_interval=3600)
    relay = EventRelay(store, bus, "test-process", settings=RelaySettings())
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        await nursery.start(cache.run, bus)
        assert (await cache.snapshot(product)).key == key
        reads = cache.reads
        with bus.subscribe(name_prefix=PRODUCT_KEYS_CHANGED) as seen:
            rotation = await trio.to_thread.run_sync(rotate_product_key, store, data_dir,
                                                     product)
            with trio.fail_after(30):
                event = await seen.receive.receive()
                while (cached := cache.cached(product)) is None or cached.key != rotation.new:
                    await trio.sleep(0.01)
        assert changed_product(event) == product and event.product_id is None
        assert cached.statements == product_statements(store, product)
        assert cached.trusted_at(1) >= {key.key_id, rotation.new.key_id}
        assert cache.reads == reads + 1  # one read for the change, none per lookup
        for _ in range(100):
            assert (await cache.snapshot(product)).key == rotation.new
        assert cache.reads == reads + 1
        nursery.cancel_scope.cancel()


async def test_without_a_relay_the_stamp_check_finds_a_rotation(
    sqlite_store: Store, data_dir: Path
) -> None:
    """One server on its embedded store runs no relay: ``ota product rotate-key`` beside it
    reaches its cache at the next stamp check."""
    store = sqlite_store
    product = _product(store)
    await trio.to_thread.run_sync(product_signing_key, store, data_dir, product)
    cache = ProductKeyCache(store, data_dir, trio.CapacityLimiter(2), recheck_interval=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run, EventBus())
        rotation = await trio.to_thread.run_sync(rotate_product_key, store, data_dir, product)
        with trio.fail_after(30):
            while (cached := cache.cached(product)) is None or cached.key != rotation.new:
                await trio.sleep(0.01)
        assert cache.statements(product) == product_statements(store, product)
        nursery.cancel_scope.cancel()


def test_a_backup_restores_the_keys_with_the_kek_that_opens_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = Store.open_dir(data, pool_size=1)
    try:
        product = _product(store)
        rotate_product_key(store, data, product)
        before = product_key_state(store, data, product)
    finally:
        store.close()
    manifest = backup_installation(data, tmp_path / "backup")
    assert f"data/{KEK_FILE.as_posix()}" in manifest.files  # the KEK: with the data files
    restored = tmp_path / "restored"
    restore_installation(tmp_path / "backup", restored)
    store = Store.open_dir(restored, pool_size=1)
    try:
        assert product_key_state(store, restored, product) == before
    finally:
        store.close()


async def test_a_store_outage_is_logged_once_not_at_every_check(
    pg_admin_url: str, pg_database: str, tmp_path: Path, data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The stamp check runs every second in every server process: while the database is
    away (here: it refuses connections and its sessions are ended, as in a restart) one
    warning says so, not one per check; one line says when the keys are read again."""
    from server.store.pg_cluster import admin_connection

    database = sa.engine.make_url(pg_database).database
    store = Store.open(pg_database, tmp_path / "blobs")
    try:
        product = _product(store)
        await trio.to_thread.run_sync(product_signing_key, store, data_dir, product)
        cache = ProductKeyCache(store, data_dir, trio.CapacityLimiter(2),
                                recheck_interval=0.01)

        def allow_connections(allowed: bool) -> None:
            with admin_connection(pg_admin_url) as conn:
                conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {allowed}')
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = %s", (database,))

        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run, EventBus())
            read = await cache.snapshot(product)  # in use, as by a device's offer
            with caplog.at_level(logging.INFO, logger="ota.keys"):
                await trio.to_thread.run_sync(allow_connections, False)
                with trio.fail_after(60):
                    while cache.failed_checks < 5:
                        await trio.sleep(0.01)
                await trio.to_thread.run_sync(allow_connections, True)
                with trio.fail_after(60):
                    while not any("read again" in r.getMessage() for r in caplog.records):
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    warnings = [r for r in caplog.records if "not re-read" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert cache.cached(product) is read  # the keys read before stayed in use
