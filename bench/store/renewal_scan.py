"""What one server process's session-lease renewal reads, before and after revision 0010.
Not a test: prints figures (and writes them as JSON with ``--json``).

    .venv/bin/python -m bench.store.renewal_scan [--held 100000] [--origins 4]
        [--other-node 50000] [--offline 50000] [--repeat 5] [--seed N]
        [--backends sqlite,postgresql] [--pg-url URL] [--pg-icu-locale en-US] [--json OUT]

The devices table: ``--held`` devices whose sessions one node holds, spread evenly over
``--origins`` processes of it (main and workers, "<node>:<role>-<pid>/<serial>" owners),
``--other-node`` devices held by another node (its id holds "_" and "."), ``--offline``
devices with no session; rows in random order (devices connect in any order), as the
seeded ``random.Random`` says (the seed is printed).

Each backend's database is brought to revision 0009 (index ``ix_devices_session_node``
only), seeded, and every process's renewal runs as before revision 0010 (node, then the
owner's prefix by ``substr``); then the same database is upgraded to the head (index
``ix_devices_session_node_owner``, owners in byte order) and the renewal runs as now
(``server.store.tx_fleet.RENEW_SESSION_LEASES``). Each renewal is its own transaction, as a
process's is. Per process and phase: the median wall time of ``--repeat`` renewals and of
the read alone (a count with the statement's WHERE: no row written), and on
PostgreSQL one ``EXPLAIN (ANALYZE, BUFFERS)`` of it: rows the scan read (returned plus
removed by its filter), shared buffers touched, the plan's nodes. SQLite has no row counter
to read; its plan (``EXPLAIN QUERY PLAN``) says what the search is bounded by.

PostgreSQL: the server at ``--pg-url`` (default ``$OTA_TEST_PG_URL``) or a throwaway cluster
this script starts (server.store.pg_cluster); the database is created with the ICU locale
``--pg-icu-locale`` as default collation (a language collation, as production databases
often have; "" for the cluster's default) and dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command

from server.store import migrate
from server.store import schema as t
from server.store.tx_fleet import RENEW_SESSION_LEASES, session_owner_range

NODE = "node-a"
OTHER_NODE = "node_b.x-1"
#: The renewal statement before revision 0010 (commit 4607144), verbatim.
LEGACY_RENEWAL = (
    sa.update(t.devices)
    .where(t.devices.c.session_node == sa.bindparam("key_node"),
           sa.func.substr(t.devices.c.session_owner, 1,
                          sa.bindparam("key_prefix_length", type_=sa.Integer))
           == sa.bindparam("key_prefix", type_=sa.String))
    .values(session_lease_until=sa.bindparam("until"))
    .returning(t.devices.c.id, t.devices.c.session_owner)
)


def origins_of(node: str, count: int) -> list[str]:
    """``count`` process origins of ``node``: its main process and workers."""
    return [f"{node}:main-{1000}"] + [f"{node}:worker{n}-{1000 + n}" for n in range(1, count)]


def device_rows(args: argparse.Namespace, rng: random.Random) -> list[dict[str, Any]]:
    """The bench's devices (see the module doc), in random order."""
    held: list[tuple[str | None, str | None]] = []
    for node, count in ((NODE, args.held), (OTHER_NODE, args.other_node)):
        origins = origins_of(node, args.origins)
        held += [(node, f"{origins[n % len(origins)]}/{n + 1}") for n in range(count)]
    held += [(None, None)] * args.offline
    rng.shuffle(held)
    return [{"id": f"{rng.getrandbits(96):024x}", "product_id": 1, "notes": "",
             "development": False, "flash_requested": False, "firmware_updates_forced": False,
             "firmware_updates_enabled": True, "updates_pending": False,
             "reset_pending": False, "online": node is not None, "certs_revoked": False,
             "session_node": node, "session_owner": owner,
             "session_lease_until": None if node is None else 1, "created_at": 1,
             "updated_at": 1} for node, owner in held]


def seed(engine: sa.Engine, rows: list[dict[str, Any]]) -> None:
    """The product and the devices, in chunks."""
    with engine.begin() as conn:
        conn.execute(sa.insert(t.products).values(
            id=1, slug="bench", name="Bench", platform_id=13, description="",
            firmware_updates_forced=False, created_at=1))
        for start in range(0, len(rows), 10_000):
            conn.execute(sa.insert(t.devices), rows[start:start + 10_000])


def migrate_to(engine: sa.Engine, revision: str) -> float:
    """Bring the database to ``revision``; seconds it took."""
    started = time.perf_counter()
    with engine.begin() as conn:
        command.upgrade(migrate._config(conn), revision)
    return time.perf_counter() - started


def analyze(engine: sa.Engine) -> None:
    """Fresh planner statistics (and on PostgreSQL no dead rows of the previous phase)."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE devices")
    else:
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")


def parameters(phase: str, origin: str, until: int) -> dict[str, Any]:
    """The statement's parameters for ``origin`` in ``phase``."""
    if phase == "before":
        prefix = f"{origin}/"
        return {"key_node": NODE, "key_prefix": prefix, "key_prefix_length": len(prefix),
                "until": until}
    low, high = session_owner_range(origin)
    return {"key_node": NODE, "key_owner_low": low, "key_owner_high": high, "until": until}


def _scan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The plan's nodes that read a table or an index."""
    if "Scan" in plan["Node Type"]:
        yield plan
    for child in plan.get("Plans", []):
        yield from _scan_nodes(child)


def explain(engine: sa.Engine, statement: sa.Update, params: dict[str, Any]) -> dict[str, Any]:
    """PostgreSQL's EXPLAIN (ANALYZE, BUFFERS) of one renewal (committed, as a real one)."""
    compiled = statement.compile(dialect=engine.dialect)
    with engine.begin() as conn:
        explained = conn.exec_driver_sql(
            f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {compiled}", compiled.construct_params(params)
        ).scalar_one()
        # This transaction's updates of devices, and how many were HOT (the new row version
        # on the same page, no index touched: session_lease_until is in no index).
        updated, hot = conn.execute(sa.text(
            "SELECT pg_stat_get_xact_tuples_updated('devices'::regclass), "
            "pg_stat_get_xact_tuples_hot_updated('devices'::regclass)")).one()
    root = explained[0]
    plan = root["Plan"]
    scans = list(_scan_nodes(plan))
    # The rows the scans looked at: the bitmap heap scan or index scan that produced the
    # rows (returned + removed by its filter or its recheck of a lossy bitmap page); a bitmap
    # index scan only feeds its heap scan.
    heap = [s for s in scans if s["Node Type"] != "Bitmap Index Scan"]
    read = sum(s["Actual Rows"] + s.get("Rows Removed by Filter", 0)
               + s.get("Rows Removed by Index Recheck", 0) for s in heap)
    return {
        "rows_renewed": plan["Actual Rows"] if plan["Node Type"] != "ModifyTable" else
        plan["Plans"][0]["Actual Rows"],
        "rows_read": read,
        "shared_buffers": plan["Shared Hit Blocks"] + plan["Shared Read Blocks"],
        "scan_buffers": sum(s["Shared Hit Blocks"] + s["Shared Read Blocks"] for s in heap),
        "explain_ms": root["Execution Time"],
        "hot_share": round(hot / updated, 3) if updated else None,
        "plan": [f"{s['Node Type']} {s.get('Index Name', '')}".strip() for s in scans],
    }


def sqlite_plan(engine: sa.Engine, statement: sa.Update, params: dict[str, Any]) -> list[str]:
    """SQLite's EXPLAIN QUERY PLAN of the statement."""
    compiled = statement.compile(dialect=engine.dialect)
    values = compiled.construct_params(params)
    positional = tuple(values[name] for name in compiled.positiontup or ())
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", positional).all()
    return [str(row[-1]) for row in rows]


def run_phase(engine: sa.Engine, phase: str, origins: list[str],
              repeat: int) -> list[dict[str, Any]]:
    """Every process's renewal in ``phase``: figures per origin."""
    statement = LEGACY_RENEWAL if phase == "before" else RENEW_SESSION_LEASES
    results = []
    for number, origin in enumerate(origins):
        times, renewed = [], 0
        for attempt in range(repeat + 1):  # the first warms the cache, not counted
            params = parameters(phase, origin, 10 + attempt)
            started = time.perf_counter()
            with engine.begin() as conn:
                renewed = len(conn.execute(statement, params).all())
            if attempt:
                times.append((time.perf_counter() - started) * 1000)
        # The read alone: the statement's WHERE in a count (no row written).
        count = sa.select(sa.func.count()).select_from(t.devices).where(statement.whereclause)
        reads = []
        for _attempt in range(repeat):
            started = time.perf_counter()
            with engine.connect() as conn:
                conn.execute(count, parameters(phase, origin, 0)).scalar_one()
            reads.append((time.perf_counter() - started) * 1000)
        figures: dict[str, Any] = {"origin": origin, "renewed": renewed,
                                   "median_ms": round(statistics.median(times), 2),
                                   "read_only_ms": round(statistics.median(reads), 2)}
        if engine.dialect.name == "postgresql":
            figures.update(explain(engine, statement, parameters(phase, origin, 100 + number)))
        else:
            figures["plan"] = sqlite_plan(engine, statement, parameters(phase, origin, 1))
        results.append(figures)
    return results


@contextmanager
def database(backend: str, args: argparse.Namespace, workdir: Path) -> Iterator[sa.Engine]:
    """A fresh, empty database of ``backend``, dropped (PostgreSQL) after."""
    if backend == "sqlite":
        engine = sa.create_engine(f"sqlite:///{workdir / 'renewal.sqlite'}")
        try:
            yield engine
        finally:
            engine.dispose()
        return
    cluster = None
    admin_url = args.pg_url or os.environ.get("OTA_TEST_PG_URL")
    if not admin_url:
        from server.store.pg_cluster import PgCluster

        cluster = PgCluster.start()
        admin_url = cluster.url()
    name = f"ota_renewal_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    locale = (f" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE '{args.pg_icu_locale}'"
              if args.pg_icu_locale else "")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"{locale}')
    engine = sa.create_engine(sa.make_url(admin_url).set(database=name))
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
        if cluster is not None:
            cluster.stop()


def bench(backend: str, args: argparse.Namespace, rows: list[dict[str, Any]],
          workdir: Path) -> dict[str, Any]:
    """Both phases on one database of ``backend``."""
    origins = origins_of(NODE, args.origins)
    with database(backend, args, workdir) as engine:
        migrate_to(engine, "0009")
        seed(engine, rows)
        analyze(engine)
        before = run_phase(engine, "before", origins, args.repeat)
        upgrade_s = migrate_to(engine, "head")
        analyze(engine)
        after = run_phase(engine, "after", origins, args.repeat)
    return {"backend": backend, "upgrade_seconds": round(upgrade_s, 2), "before": before,
            "after": after}


def report(result: dict[str, Any]) -> None:
    """The figures as a table."""
    print(f"\n== {result['backend']}: revision 0009 -> head took {result['upgrade_seconds']} s")
    for phase in ("before", "after"):
        rows = result[phase]
        print(f"-- {phase}: {rows[0]['plan']}")
        for row in rows:
            line = (f"   {row['origin']:<22} renewed {row['renewed']:>7}  "
                    f"{row['median_ms']:>8} ms (read alone {row['read_only_ms']:>7} ms)")
            if "rows_read" in row:
                line += (f"  read {row['rows_read']:>7} rows  scan buffers "
                         f"{row['scan_buffers']:>6}  all buffers {row['shared_buffers']:>7}"
                         f"  HOT {row['hot_share']}")
            print(line)
        total_ms = sum(row["median_ms"] for row in rows)
        total_read_ms = sum(row["read_only_ms"] for row in rows)
        total_read = sum(row.get("rows_read", 0) for row in rows)
        print(f"   per period, all {len(rows)} processes: {total_ms:.1f} ms (read alone "
              f"{total_read_ms:.1f} ms)"
              + (f", {total_read} rows read" if total_read else ""))


def main(argv: list[str] | None = None) -> int:
    """Run the bench (see the module doc)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held", type=int, default=100_000)
    parser.add_argument("--origins", type=int, default=4)
    parser.add_argument("--other-node", type=int, default=50_000)
    parser.add_argument("--offline", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default=None)
    parser.add_argument("--pg-icu-locale", default="en-US")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    seed_value = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed {seed_value}: {args.held} devices held by {NODE} over {args.origins} "
          f"processes, {args.other_node} by {OTHER_NODE}, {args.offline} offline")
    rows = device_rows(args, random.Random(seed_value))
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for backend in args.backends.split(","):
            results.append(bench(backend, args, rows, Path(workdir)))
            report(results[-1])
    if args.json:
        args.json.write_text(json.dumps({"seed": seed_value, "args": vars(args) | {
            "json": str(args.json)}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
