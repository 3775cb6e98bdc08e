"""Alembic migrations of the store (server/store/migrate.py, server/store/migrations/).

Every test runs on SQLite and on PostgreSQL: the throwaway cluster of scripts/run-tests.sh
(``OTA_TEST_PG_URL``), or one the session starts (``pg_admin_url`` in tests/conftest.py);
each test gets a database of its own, dropped after.
The upgrade of a data directory written by the last pre-Alembic server is in
tests/test_migrations_upgrade.py.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from server.store import SchemaVersionError, Store, migrate, schema
from server.store.migrate import MigrationError
from server.store.sqlite import create_sqlite_engine, enter_wal
from tests.pre_alembic import drop_tables_after_baseline

#: The packaged revisions, oldest first: what a new or pre-Alembic store gets applied.
REVISIONS = [script.revision for script in migrate.script_directory().walk_revisions()][::-1]
#: The revision a test adds on top of the packaged ones (``_with_extra_revision``).
EXTRA_REVISION = "9999"

#: Opens a fresh, empty database of the test's backend: ``open_url() -> URL``.
UrlFactory = Callable[[], str]


def _pg_databases(base_url: str) -> Iterator[UrlFactory]:
    """Fresh PostgreSQL databases on the server of ``base_url``, dropped at the end."""
    admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def new() -> str:
        name = f"ota_migrations_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        made.append(name)
        return sa.make_url(base_url).set(database=name).render_as_string(hide_password=False)

    try:
        yield new
    finally:
        with admin.connect() as conn:
            for name in made:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UrlFactory]:
    """Makes empty databases of the parametrized backend (PostgreSQL: on the throwaway
    cluster, never skipped)."""
    if request.param == "sqlite":
        counter = iter(range(1000))
        yield lambda: f"sqlite:///{tmp_path / f'db{next(counter)}.sqlite'}"
        return
    yield from _pg_databases(str(request.getfixturevalue("pg_admin_url")))


def _open(url: str, tmp_path: Path) -> Store:
    return Store.open(url, tmp_path / "blobs", pool_size=2)


def _schema_diff(engine: sa.Engine) -> list[object]:
    """What Alembic's autogenerate finds between the database and ``schema.py``."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, schema.metadata))


def _assert_matches_models(engine: sa.Engine) -> None:
    diff = _schema_diff(engine)
    assert diff == [], (
        "server/store/schema.py and the Alembic revisions in server/store/migrations/versions "
        f"disagree: {diff}. A schema change needs a revision: run `python -m "
        "server.store.migrate revision -m \"what changed\"`, review the file it writes, and "
        "run these tests again"
    )


def test_models_and_migrations_agree(new_database: UrlFactory, tmp_path: Path) -> None:
    """After ``upgrade head`` on an empty database, autogenerate finds nothing to do."""
    store = _open(new_database(), tmp_path)
    try:
        assert store.migration is not None
        assert store.migration.applied == REVISIONS
        assert store.migration.before.empty
        _assert_matches_models(store.engine)
        with store.read() as tx:  # what pre-Alembic servers check: they open it as theirs
            assert tx.conn.execute(sa.select(schema.meta.c.value)).scalar_one() == "8"
    finally:
        store.close()
    again = _open(str(store.engine.url.render_as_string(hide_password=False)), tmp_path)
    try:
        assert again.migration is not None and again.migration.applied == []
        assert not again.migration.before.pending
    finally:
        again.close()


def test_a_newer_revision_is_refused(new_database: UrlFactory, tmp_path: Path) -> None:
    url = new_database()
    _open(url, tmp_path).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'f00dcafe'"))
    engine.dispose()
    with pytest.raises(SchemaVersionError, match=r"revision f00dcafe.*upgrade the server"):
        _open(url, tmp_path)


def _make_pre_alembic(url: str, tmp_path: Path, version: int) -> str:
    """A store as a pre-Alembic server of schema ``version`` left it: no alembic_version,
    and for version 3 the tables and columns added since (rollouts, windows, per-certificate
    revocation, event sources, image indexes) missing. One device was revoked by flag."""
    store = _open(url, tmp_path)
    with store.write() as tx:
        product = tx.insert_product(slug="p", name="P", platform_id=13, description="", now=1)
        for device_id in ("a" * 24, "b" * 24):
            tx.insert_device(device_id, product.id, 1)
        tx.update_device("a" * 24, {"certs_revoked": True}, 2)
        tx.add_transfer_bytes(product.id, 1, bytes_sent=10, bytes_full=20, transfer="delta")
    store.close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE alembic_version"))
        drop_tables_after_baseline(conn)  # no pre-Alembic server had them
        # Nor the columns revision 0003 added to devices (its session leases), nor the index
        # revision 0010 made of them.
        conn.execute(sa.text("DROP INDEX ix_devices_session_node_owner"))
        for column in ("session_node", "session_lease_until"):
            conn.execute(sa.text(f"ALTER TABLE devices DROP COLUMN {column}"))
        if version < 8:
            for table in ("rollout_events", "rollout_device_outcomes", "rollouts",
                          "maintenance_windows", "device_revocations"):
                conn.execute(sa.text(f"DROP TABLE {table}"))
            for index in ("ix_firmware_product_sha256", "ix_system_modules_platform_sha256"):
                conn.execute(sa.text(f"DROP INDEX {index}"))
            conn.execute(sa.text("ALTER TABLE event_log DROP COLUMN source"))
            conn.execute(sa.text(
                "INSERT INTO event_log (origin, name, data, coreid, ttl, public, published_at) "
                "VALUES ('old', 'spark/status', 'online', 'x', 60, :f, 1)"), {"f": False})
        if version < 2:
            conn.execute(sa.text(
                "ALTER TABLE firmware_transfer_bytes DROP COLUMN compressed_transfers"))
        conn.execute(sa.text("UPDATE meta SET value = :v"), {"v": str(version)})
    engine.dispose()
    return url


@pytest.mark.parametrize("version", [1, 3, 8])
def test_a_pre_alembic_store_is_brought_to_8_stamped_and_upgraded(
    new_database: UrlFactory, tmp_path: Path, version: int
) -> None:
    url = _make_pre_alembic(new_database(), tmp_path, version)
    engine = sa.create_engine(url)
    found = migrate.status_of(engine)
    assert found.current == () and found.legacy_version == version and found.pending
    engine.dispose()
    store = _open(url, tmp_path)
    try:
        assert store.migration is not None
        # Revision 0001 is stamped, not run (the store's tables were there); later ones run.
        assert store.migration.applied == REVISIONS[1:]
        assert store.migration.legacy_from == (version if version < 8 else None)
        _assert_matches_models(store.engine)
        with store.read() as tx:
            assert tx.conn.execute(sa.text("SELECT version_num FROM alembic_version")
                                   ).scalar_one() == migrate.head_revision()
            assert tx.conn.execute(sa.select(schema.meta.c.value)).scalar_one() == "8"
            assert [p.slug for p in tx.list_products()] == ["p"]
            assert tx.get_device("b" * 24) is not None
            # v8's step: a device an older server revoked by flag stays revoked (a version
            # 8 server never set the flag: nothing to carry over).
            revoked = tx.certificate_standing("a" * 24, "0" * 64).revocation
            assert (revoked is not None) == (version < 8)
            assert tx.certificate_standing("b" * 24, "0" * 64).revocation is None
            totals = tx.conn.execute(sa.select(schema.firmware_transfer_bytes)).one()
            assert totals.bytes_sent == 10 and totals.compressed_transfers == 0
            if version < 8:  # v7's step: a row without a source is a device's
                source = tx.conn.execute(sa.select(schema.event_log.c.source)).scalar_one()
                assert source == "device"
    finally:
        store.close()


def test_a_store_newer_than_the_legacy_versions_is_refused(
    new_database: UrlFactory, tmp_path: Path
) -> None:
    url = _make_pre_alembic(new_database(), tmp_path, 8)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE meta SET value = '9'"))
    engine.dispose()
    with pytest.raises(SchemaVersionError, match=r"schema version 9, newer.*upgrade the server"):
        _open(url, tmp_path)


def test_foreign_tables_are_not_taken_for_a_store(new_database: UrlFactory,
                                                  tmp_path: Path) -> None:
    url = new_database()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE devices (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(MigrationError, match="not written by an otacloud server"):
        _open(url, tmp_path)


def test_nodes_starting_at_once_migrate_once(new_database: UrlFactory, tmp_path: Path) -> None:
    """Several nodes opening one fresh database at the same moment: the migration lock lets
    one create the schema, and the others find it current (none fails on "table exists")."""
    url = new_database()
    nodes = 4
    barrier = threading.Barrier(nodes)
    stores: list[Store] = []
    errors: list[BaseException] = []

    def node(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            stores.append(Store.open(url, tmp_path / f"blobs{index}", pool_size=1))
        except BaseException as exc:
            errors.append(exc)

    # Daemon threads and a bounded join: a deadlock fails the test instead of hanging it.
    threads = [threading.Thread(target=node, args=(i,), daemon=True) for i in range(nodes)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    try:
        assert not any(thread.is_alive() for thread in threads), "a node never finished"
        assert errors == [], _describe_errors(errors)
        applied = sorted((store.migration.applied for store in stores if store.migration),
                         key=len)
        assert applied == [[]] * (nodes - 1) + [REVISIONS]
        _assert_matches_models(stores[0].engine)
    finally:
        for store in stores:
            store.close()


def _describe_errors(errors: list[BaseException]) -> str:
    """Each error with its chain of causes, and SQLite's extended result code when there is
    one (SQLITE_BUSY is "locked", SQLITE_BUSY_SNAPSHOT a reader that could not upgrade)."""
    described = []
    for error in errors:
        chain: list[str] = []
        cause: BaseException | None = error
        while cause is not None:
            code = getattr(cause, "sqlite_errorname", None)
            chain.append(f"{type(cause).__name__}: {cause}" + (f" [{code}]" if code else ""))
            cause = cause.__cause__ or cause.__context__
        described.append(" <- ".join(chain))
    return "; ".join(described)


def _hold_write_lock(path: Path) -> sqlite3.Connection:
    """A connection holding the write lock of the database at ``path`` (still in rollback
    journal mode, as a fresh file is), as a node mid-way into WAL mode would."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE holder (x INTEGER)")
    return holder


def test_entering_wal_waits_out_another_connections_write_lock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Why a node opening a fresh SQLite file could fail with "database is locked" at once
    although its busy timeout is 30 s: PRAGMA journal_mode=WAL upgrades a read to a write,
    and SQLite does not call the busy handler for that. The engine's connect hook retries
    it, so the connection waits until the lock is released."""
    path = tmp_path / "fresh.sqlite"
    holder = _hold_write_lock(path)
    try:
        plain = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                plain.execute("PRAGMA journal_mode=WAL")  # at once, not after 30 s
        finally:
            plain.close()

        retried = threading.Event()

        class _RetrySeen(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "entering WAL mode" in record.getMessage():
                    retried.set()

        caplog.set_level(logging.DEBUG, logger="ota.store")
        seen = _RetrySeen()
        logging.getLogger("ota.store").addHandler(seen)
        engine = create_sqlite_engine(sa.make_url(f"sqlite:///{path}"), pool_size=1)
        outcome: list[object] = []

        def connect() -> None:
            try:
                with engine.connect() as conn:
                    outcome.append(conn.exec_driver_sql("PRAGMA journal_mode").scalar())
            except BaseException as exc:
                outcome.append(exc)
                retried.set()  # no retry is coming: end the wait below

        thread = threading.Thread(target=connect, daemon=True)
        thread.start()
        try:
            assert retried.wait(timeout=30), "the connect hook never retried"
            assert outcome == [], f"the connect hook failed instead of retrying: {outcome}"
            holder.execute("COMMIT")
            thread.join(timeout=30)
            assert not thread.is_alive(), "the connection never entered WAL mode"
            assert outcome == ["wal"]
        finally:
            logging.getLogger("ota.store").removeHandler(seen)
            thread.join(timeout=30)
            engine.dispose()
    finally:
        holder.close()


def test_entering_wal_gives_up_after_its_timeout(tmp_path: Path) -> None:
    """Past its timeout, entering WAL mode fails with SQLite's own "locked" error (which the
    store reports as unavailable, 503), instead of waiting forever."""
    path = tmp_path / "fresh.sqlite"
    holder = _hold_write_lock(path)
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                enter_wal(conn, timeout_s=0.05)
        finally:
            conn.close()
    finally:
        holder.close()


def _connect_at_once(url: sa.URL, nodes: int) -> tuple[list[object], list[BaseException]]:
    """``nodes`` engines on ``url`` connecting at the same moment: the journal mode each
    connection found, and the errors."""
    engines = [create_sqlite_engine(url, pool_size=1) for _ in range(nodes)]
    barrier = threading.Barrier(nodes)
    modes: list[object] = []
    errors: list[BaseException] = []

    def connect(engine: sa.Engine) -> None:
        try:
            barrier.wait(timeout=30)
            with engine.connect() as conn:
                modes.append(conn.exec_driver_sql("PRAGMA journal_mode").scalar())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=connect, args=(engine,), daemon=True)
               for engine in engines]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads), "a connect never ended"
    finally:
        for engine in engines:
            engine.dispose()
    return modes, errors


def test_fresh_sqlite_file_connections_race_into_wal(tmp_path: Path) -> None:
    """Four engines connecting to one fresh file at the same moment, many times over: each
    enters WAL mode (before the fix, about one round in ten failed with "database is
    locked" at once)."""
    nodes, rounds = 4, 25
    for round_number in range(rounds):
        url = sa.make_url(f"sqlite:///{tmp_path / f'race{round_number}.sqlite'}")
        modes, errors = _connect_at_once(url, nodes)
        assert errors == [], f"round {round_number}: {_describe_errors(errors)}"
        assert modes == ["wal"] * nodes


def test_sqlite_foreign_keys_are_back_on_after_a_migration(tmp_path: Path) -> None:
    """Revisions run with foreign keys off (a batch copy's DROP TABLE must not cascade); the
    pooled connection gets them back on, so ON DELETE CASCADE keeps working afterwards."""
    store = Store.open(f"sqlite:///{tmp_path / 'ota.db'}", tmp_path / "blobs", pool_size=1)
    try:
        assert store.migration is not None and store.migration.applied == REVISIONS
        with store.write() as tx:
            assert tx.conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
            product = tx.insert_product(slug="p", name="P", platform_id=13, description="",
                                        now=1)
            tx.insert_device("c" * 24, product.id, 1)
            tx.conn.execute(sa.delete(schema.products))
            assert tx.get_device("c" * 24) is None  # cascaded
    finally:
        store.close()


def test_the_migrations_have_one_head_and_ship_as_package_files() -> None:
    """One line of history, and every file Alembic needs sits inside the package (what
    setuptools puts in the wheel: modules of server.store.migrations and its mako template)."""
    assert migrate.head_revision()
    assert (migrate.MIGRATIONS_DIR / "env.py").is_file()
    assert (migrate.MIGRATIONS_DIR / "script.py.mako").is_file()
    assert (migrate.MIGRATIONS_DIR / "versions" / "__init__.py").is_file()
    assert migrate.MIGRATIONS_DIR.parent == Path(schema.__file__).parent


def test_postgresql_nodes_wait_on_the_advisory_lock(tmp_path: Path, pg_admin_url: str) -> None:
    """While one node holds the migration lock, another node's start waits on it (seen in
    pg_locks), then finds the schema the first one left."""
    databases = _pg_databases(pg_admin_url)
    url = next(databases)()
    holder = sa.create_engine(url)
    opened: list[Store] = []
    errors: list[BaseException] = []

    def second_node() -> None:
        try:
            opened.append(Store.open(url, tmp_path / "blobs", pool_size=1))
        except BaseException as exc:
            errors.append(exc)

    waiting = sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                      "AND NOT granted AND objid = :low")
    low = migrate.PG_MIGRATION_LOCK_KEY & 0xFFFFFFFF  # pg_locks splits a bigint key
    thread = threading.Thread(target=second_node, daemon=True)
    try:
        with holder.connect() as conn, conn.begin():
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(migrate.PG_MIGRATION_LOCK_KEY)))
            report = migrate.upgrade_connection(conn)  # the first node migrates...
            assert report.applied == REVISIONS
            thread.start()
            deadline = time.monotonic() + 60
            with holder.connect() as watcher:  # ...while the second waits for its lock
                while watcher.execute(waiting, {"low": low}).scalar_one() == 0:
                    assert time.monotonic() < deadline, "the second node never waited"
                    time.sleep(0.02)
            assert not opened and not errors
        thread.join(timeout=60)
        assert errors == [] and len(opened) == 1
        assert opened[0].migration is not None and opened[0].migration.applied == []
    finally:
        for store in opened:
            store.close()
        holder.dispose()
        databases.close()


def test_ota_admin_migrate_on_a_database_url(new_database: UrlFactory) -> None:
    """``ota admin migrate --db-url`` (or OTA_DB_URL): --check changes nothing and exits 3
    while an upgrade is pending; the upgrade creates an empty database's schema."""
    from typer.testing import CliRunner

    from server.cli.main import app

    runner = CliRunner()
    url = new_database()
    pending = runner.invoke(app, ["admin", "migrate", "--db-url", url, "--check"])
    assert pending.exit_code == 3, pending.output
    assert "current revision: none (no store yet)" in pending.output
    engine = sa.create_engine(url)
    try:
        assert migrate.status_of(engine).empty
        upgraded = runner.invoke(app, ["admin", "migrate"], env={"OTA_DB_URL": url})
        assert upgraded.exit_code == 0, upgraded.output
        assert f"applied revision(s) {', '.join(REVISIONS)}" in upgraded.output
        _assert_matches_models(engine)
        current = runner.invoke(app, ["admin", "migrate", "--db-url", url, "--check", "--json"])
        assert current.exit_code == 0, current.output
        assert json.loads(current.output)["current"] == [migrate.head_revision()]
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = 'beef'"))
        refused = runner.invoke(app, ["admin", "migrate", "--db-url", url])
        assert refused.exit_code == 1
        assert "revision beef" in refused.output and "upgrade the server" in refused.output
    finally:
        engine.dispose()


def test_ota_admin_migrate_says_what_is_wrong(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from server.cli.main import app

    runner = CliRunner()
    for args, message in (
        ([], "say which store: --data DIR"),
        (["--data", str(tmp_path / "nowhere")], "no store at"),
        (["--db-url", "::nonsense::"], "not a valid SQLAlchemy URL"),
    ):
        result = runner.invoke(app, ["admin", "migrate", *args], env={"OTA_DB_URL": None})
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output
    assert not (tmp_path / "nowhere").exists()


@contextmanager
def _with_extra_revision(tmp_path: Path, body: str) -> Iterator[None]:
    """Within the block, the migrations are a copy of the packaged ones plus a revision
    EXTRA_REVISION whose upgrade() is ``body`` (what a later revision could do)."""
    scripts = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, scripts,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / f"{EXTRA_REVISION}_extra.py").write_text(
        "import sqlalchemy as sa\nfrom alembic import op\n\n"
        f"revision = '{EXTRA_REVISION}'\ndown_revision = '{REVISIONS[-1]}'\n"
        "branch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade():\n{body}\n\n\ndef downgrade():\n    pass\n"
    )
    packaged = migrate.MIGRATIONS_DIR
    migrate.MIGRATIONS_DIR = scripts
    migrate.script_directory.cache_clear()
    try:
        yield
    finally:
        migrate.MIGRATIONS_DIR = packaged
        migrate.script_directory.cache_clear()


def _store_with_a_grouped_device(url: str, tmp_path: Path) -> None:
    store = _open(url, tmp_path)
    with store.write() as tx:
        product = tx.insert_product(slug="p", name="P", platform_id=13, description="", now=1)
        tx.insert_device("d" * 24, product.id, 1)
        group = tx.insert_group(product.id, "beta", description="", color="", now=1)
        tx.set_device_groups("d" * 24, [group.id])
    store.close()


def test_a_sqlite_table_rebuild_does_not_cascade(tmp_path: Path) -> None:
    """A batch-mode revision copies the table and drops the old one; with foreign keys on,
    that DROP would delete the rows referring to it (ON DELETE CASCADE)."""
    url = f"sqlite:///{tmp_path / 'ota.db'}"
    _store_with_a_grouped_device(url, tmp_path)
    with _with_extra_revision(tmp_path, (
        "    with op.batch_alter_table('devices', recreate='always') as batch:\n"
        "        batch.add_column(sa.Column('extra', sa.Integer(), nullable=True))")):
        store = _open(url, tmp_path)
    try:
        assert store.migration is not None and store.migration.applied == [EXTRA_REVISION]
        with store.read() as tx:
            assert tx.conn.execute(sa.select(schema.device_groups)).all() == [("d" * 24, 1)]
            assert "extra" in {c["name"] for c in sa.inspect(tx.conn).get_columns("devices")}
    finally:
        store.close()


def test_a_revision_that_breaks_references_is_rolled_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ota.db'}"
    _store_with_a_grouped_device(url, tmp_path)
    with (_with_extra_revision(tmp_path, "    op.execute('DELETE FROM products')"),
          pytest.raises(MigrationError, match=r"2 row\(s\) pointing at .* \(devices row")):
        _open(url, tmp_path)
    engine = sa.create_engine(url)
    try:
        found = migrate.status_of(engine)
        assert found.current == (REVISIONS[-1],) == (found.head,)  # nothing changed
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(schema.products)
                                ).scalar_one() == 1
    finally:
        engine.dispose()


def test_revision_0008_keeps_stored_patches_as_format_4_and_back(
    new_database: UrlFactory,
) -> None:
    """Revision 0008 puts ``format_version`` into the deltas' key: patches stored before are
    kept as made for version 4, a pair may then hold one per version, and a downgrade keeps
    each pair's newest."""
    from alembic import command

    engine = sa.create_engine(new_database())
    row = {"base_sha256": "a" * 64, "target_sha256": "b" * 64, "patch_sha256": "c" * 64,
           "patch_size": 10, "target_size": 100, "created_at": 1}
    try:
        with engine.begin() as conn:
            command.upgrade(migrate._config(conn), "0007")
            conn.execute(sa.text(
                "INSERT INTO deltas (base_sha256, target_sha256, patch_sha256, patch_size, "
                "target_size, created_at) VALUES (:base_sha256, :target_sha256, "
                ":patch_sha256, :patch_size, :target_size, :created_at)"), row)
            command.upgrade(migrate._config(conn), "0008")
            assert [dict(r) for r in conn.execute(sa.select(schema.deltas)).mappings()] == [
                {**row, "format_version": 4}
            ]
            conn.execute(sa.insert(schema.deltas).values(
                {**row, "format_version": 5, "patch_sha256": "d" * 64}))
            # one patch per pair and version
            with pytest.raises(sa.exc.IntegrityError), conn.begin_nested():
                conn.execute(sa.insert(schema.deltas).values({**row, "format_version": 5}))
            command.downgrade(migrate._config(conn), "0007")
            rows = conn.execute(sa.text("SELECT patch_sha256 FROM deltas")).all()
            assert [r[0] for r in rows] == ["d" * 64]
    finally:
        engine.dispose()
