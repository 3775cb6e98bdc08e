"""Several server nodes for ``ota bench fleet --nodes K``, and the database they share.

The nodes of one installation are separate ``ota server`` processes started with copies of
one data directory (its CA, server certificate and signing keys) and the same ``--db-url``
(issue 16 item 4). A node's copy holds everything but the store: the embedded database
(``ota.db`` and its ``-wal``/``-shm``) is not copied, and ``blobs/`` is a link to the one
blob directory, because firmware blobs live in the data directory even with ``--db-url``
today, and a node must serve an image uploaded through another. Without ``--db-url`` the
nodes share the prepared SQLite file (``sqlite:///<data>/ota.db``).

The database's CPU: for a PostgreSQL cluster on this machine, its postmaster is found as
the parent of the backend serving one connection (``pg_backend_pid()`` and /proc), and the
cluster's CPU is the postmaster's with every child's, exited ones included
(:func:`~server.bench.fleet.procs.cluster_cpu_seconds`). An embedded SQLite store runs
inside the nodes' processes: its CPU is part of theirs and is not reported apart.

``--db-url pg`` (:data:`THROWAWAY_POSTGRESQL`) asks for a throwaway PostgreSQL cluster
(:mod:`server.store.pg_cluster`: ``initdb`` in a temporary directory, a free loopback port,
durability off) that the run starts, uses and deletes (:func:`throwaway_database`); its
server log is copied into the output directory first (``postgres.log``).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import trio
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from server.bench.fleet import BenchError
from server.bench.fleet.control import ServerProcess, running_server
from server.bench.fleet.images import Installation
from server.store.pg_cluster import PgCluster, PgClusterError, create_database
from server.store.store import BLOB_DIRNAME, DB_FILENAME

#: The ``--db-url`` that asks for a throwaway PostgreSQL cluster started by the run.
THROWAWAY_POSTGRESQL = "pg"
#: The database the nodes use in a throwaway cluster.
THROWAWAY_DATABASE = "ota"
#: The throwaway cluster's server log, copied here in the output directory.
POSTGRES_LOG = "postgres.log"


@dataclass(frozen=True)
class Database:
    """The store every node opens."""

    #: What the nodes get as ``--db-url`` (None: each opens the embedded store of its
    #: data directory, the single-node default).
    url: str | None
    #: ``sqlite`` or ``postgresql``.
    backend: str
    #: The PostgreSQL cluster's postmaster when it runs on this machine (None otherwise).
    postmaster_pid: int | None = None
    #: True when the run started the cluster itself (``--db-url pg``) and deletes it.
    throwaway: bool = False
    #: The database server's version (``SHOW server_version``; None for SQLite).
    server_version: str | None = None

    def describe(self) -> dict[str, Any]:
        """The ``db`` part of the result (the URL without its password)."""
        shown = None if self.url is None else make_url(self.url).render_as_string(True)
        return {
            "url": shown,
            "backend": self.backend,
            "server_version": self.server_version,
            "throwaway_cluster": self.throwaway,
            "postmaster_pid": self.postmaster_pid,
        }


def check_db_url(url: str) -> str:
    """The backend of a ``--db-url`` (``sqlite`` or ``postgresql``; ``pg``, a throwaway
    PostgreSQL cluster, is ``postgresql``); BenchError otherwise."""
    if url == THROWAWAY_POSTGRESQL:
        return "postgresql"
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError as exc:
        raise BenchError(f"--db-url {url!r} is not a database URL: {exc}") from None
    if backend not in ("sqlite", "postgresql"):
        raise BenchError(
            f"--db-url: the store runs on SQLite or PostgreSQL, not {backend!r} "
            "(e.g. postgresql+psycopg://user@/ota?host=/run/postgresql)"
        )
    return backend


def postmaster_of(url: str) -> tuple[int | None, str]:
    """The pid of the postmaster serving ``url`` if the cluster runs on this machine (the
    parent of the backend that answers ``pg_backend_pid()``, else None), and the server's
    version."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            backend_pid = int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
            version = str(conn.execute(sa.text("SHOW server_version")).scalar_one())
            # Read while connected: the backend exits as soon as its connection closes.
            status = _proc_status(backend_pid)
    except (SQLAlchemyError, ImportError) as exc:
        raise BenchError(f"cannot reach the database at --db-url: {exc}") from None
    finally:
        engine.dispose()
    if status is None or status.get("Name") != "postgres":
        return None, version  # another machine (or pid namespace: someone else's pid)
    return int(status["PPid"]), version


def _proc_status(pid: int) -> dict[str, str] | None:
    """The fields of /proc/<pid>/status (None when there is no such process here)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = (line.partition(":") for line in text.splitlines())
    return {name: value.strip() for name, _, value in fields}


def shared_database(install: Installation, nodes: int, *, throwaway: bool = False) -> Database:
    """The database of a run: ``install.db_url`` (``throwaway``: in a cluster the run
    started), or with several nodes the prepared SQLite file, or (one node, no URL) the
    embedded store as a single server uses it."""
    if install.db_url is None:
        if nodes == 1:
            return Database(None, "sqlite")
        return Database(f"sqlite:///{(install.data_dir / DB_FILENAME).resolve()}", "sqlite")
    backend = check_db_url(install.db_url)
    if backend != "postgresql":
        return Database(install.db_url, backend)
    postmaster, version = postmaster_of(install.db_url)
    return Database(install.db_url, backend, postmaster, throwaway, version)


def _skip_store(directory: str, names: list[str]) -> list[str]:
    # The store, and the lock file of a server running on the directory (server.lock).
    return [
        n for n in names if n == BLOB_DIRNAME or n.startswith(DB_FILENAME) or n == "server.lock"
    ]


def copy_for_nodes(data_dir: Path, nodes: int, root: Path, *,
                   link_blobs: bool = True) -> list[Path]:
    """Copies of ``data_dir`` for ``nodes`` nodes under ``root`` (``node-<k>``): everything
    but the store, each with ``blobs`` linked to ``data_dir``'s blob directory (without
    ``link_blobs``: no blob directory, as the nodes of a PostgreSQL store need, whose blobs
    are in the database). The nodes then run with ``--db-url`` naming the one database
    (each its own directory: an embedded-store server holds its data directory's lock
    alone)."""
    blobs = (data_dir / BLOB_DIRNAME).resolve()
    if link_blobs:
        blobs.mkdir(mode=0o700, exist_ok=True)
    found = []
    for index in range(nodes):
        copy = root / f"node-{index}"
        shutil.copytree(data_dir, copy, ignore=_skip_store, symlinks=True)
        if link_blobs:
            (copy / BLOB_DIRNAME).symlink_to(blobs, target_is_directory=True)
        found.append(copy)
    return found


def node_data_dirs(install: Installation, nodes: int, root: Path) -> list[Path]:
    """The data directory of each node: the prepared one alone for a single node on the
    embedded store; else copies of it (:func:`copy_for_nodes`)."""
    if nodes == 1 and install.db_url is None:
        return [install.data_dir]
    return copy_for_nodes(install.data_dir, nodes, root)


@asynccontextmanager
async def running_nodes(
    install: Installation,
    data_dirs: list[Path],
    database: Database,
    log_prefix: Path,
    *,
    workers: int,
) -> AsyncIterator[list[ServerProcess]]:
    """One ``ota server`` per data directory, all on ``database``, started one after the
    other (each marks every device offline as it starts: none is connected yet); all are
    stopped when the block ends."""
    extra = [] if database.url is None else ["--db-url", database.url]
    async with AsyncExitStack() as stack:
        servers = []
        for index, data_dir in enumerate(data_dirs):
            suffix = "" if len(data_dirs) == 1 else f"-node{index}"
            servers.append(
                await stack.enter_async_context(
                    running_server(
                        install,
                        log_prefix.with_name(f"{log_prefix.name}{suffix}.log"),
                        workers=workers,
                        extra_args=extra,
                        data_dir=data_dir,
                    )
                )
            )
        yield servers


@asynccontextmanager
async def throwaway_database(
    out_dir: Path, note: Callable[[str], None]
) -> AsyncIterator[tuple[str, Path]]:
    """Start a throwaway PostgreSQL cluster (:class:`~server.store.pg_cluster.PgCluster`,
    in the system's temporary directory, which the cluster's unprivileged user can reach),
    create the nodes' database in it and yield its URL and the cluster's live log; when the
    block ends, however it ends, copy that log to ``out_dir/postgres.log`` and stop and
    delete the cluster."""
    try:
        cluster = await trio.to_thread.run_sync(PgCluster.start)
    except PgClusterError as exc:
        raise BenchError(f"--db-url {THROWAWAY_POSTGRESQL}: no throwaway cluster: {exc}") from None
    try:
        url = await trio.to_thread.run_sync(create_database, cluster.url(), THROWAWAY_DATABASE)
        note(f"throwaway PostgreSQL cluster on port {cluster.port} ({cluster.root})")
        yield url, cluster.log_file
    finally:
        with trio.CancelScope(shield=True):  # also after Ctrl-C or a signal
            await trio.to_thread.run_sync(_keep_log_and_stop, cluster, out_dir / POSTGRES_LOG)


def _keep_log_and_stop(cluster: PgCluster, log_copy: Path) -> None:
    try:
        if cluster.log_file.exists():
            shutil.copyfile(cluster.log_file, log_copy)
    finally:
        cluster.stop()
