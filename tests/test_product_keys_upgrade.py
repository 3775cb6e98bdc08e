"""An installation upgraded from the last pre-Alembic release (tests/data/store-v8.tar.gz)
keeps its products' signing keys: the key files that release kept in ``<data>/keys`` are
imported into the store when ``ota server`` starts on it (sealed under a new KEK), so the
devices provisioned trusting those keys still verify what the server signs."""

from __future__ import annotations

import signal
import sqlite3
from contextlib import closing
from pathlib import Path

import trio

from server.devices.key_vault import KEK_FILE
from server.devices.keys import product_key_state
from server.store import Store
from tests.test_migrations_upgrade import _start_server, _unpack
from tests.test_product_keys_store import _old_release_files


async def test_ota_server_start_imports_the_key_files_of_store_v8(tmp_path: Path) -> None:
    data, _ = _unpack(tmp_path)
    with closing(sqlite3.connect(data / "ota.db")) as db:
        (product,) = [row[0] for row in db.execute("SELECT id FROM products")]
    statements, current = _old_release_files(data, product, 2)
    assert not (data / KEK_FILE).exists()

    process, _ = await _start_server(data, tmp_path / "server.log")
    try:
        # The import runs before the device listeners start; the store says when it is done.
        with trio.fail_after(60):
            while True:
                with closing(sqlite3.connect(data / "ota.db", timeout=30)) as db:
                    tables = {r[0] for r in db.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table'")}
                    if "product_signing_keys" in tables and db.execute(
                            "SELECT count(*) FROM product_signing_keys").fetchone()[0]:
                        break
                await trio.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            await process.wait()
    assert process.returncode == 0, (tmp_path / "server.log").read_text()

    store = Store.open_dir(data, pool_size=1)
    try:
        state = product_key_state(store, data, product)
    finally:
        store.close()
    assert state.key.key_id == current and state.statements == statements
    assert (data / KEK_FILE).stat().st_mode & 0o777 == 0o600
    assert (data / "keys" / f"product-{product}.ed25519").exists()  # left for older nodes
