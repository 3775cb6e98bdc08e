"""A throwaway PostgreSQL cluster: ``initdb`` into a temporary directory, ``pg_ctl start`` on
a free loopback port, stop and delete it at the end.

The test command (scripts/run-tests.sh, through ``python -m server.store.pg_cluster``) and
the test fixtures start one, so the store tests run on PostgreSQL as well as SQLite; the
fleet benchmark can start one for several server nodes. It is for tests and benchmarks
only: durability is switched off (``fsync=off`` and friends) and every local user may
connect without a password.

PostgreSQL refuses to run as root (``initdb``: "cannot be run as root"), and tests and CI run
as root: the cluster's files and processes then belong to an unprivileged system user
(``OTA_PG_USER``, else Debian's ``postgres``, which the ``postgresql`` package creates, else
``nobody``). The server binaries are looked up in ``OTA_PG_BINDIR``, then
``/usr/lib/postgresql/<version>/bin`` (Debian's layout, newest version first), then ``PATH``.

Command line (for shell scripts)::

    eval "$(python -m server.store.pg_cluster start)"   # exports OTA_TEST_PG_URL, OTA_TEST_PG_DIR
    python -m server.store.pg_cluster stop "$OTA_TEST_PG_DIR"
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psycopg
import sqlalchemy as sa
from psycopg import sql

from otacore.errors import StoreError

#: Name of the cluster's superuser (``initdb -U``): what the URLs connect as.
SUPERUSER = "ota"
#: The file in the cluster directory that lets ``stop DIR`` find the cluster again.
STATE_FILE = "cluster.json"
#: How long ``pg_ctl`` may take to start or stop the server (seconds).
PG_CTL_TIMEOUT = 60
#: Ports tried before giving up (another process may take a free port before the server binds).
PORT_ATTEMPTS = 5
#: Where Debian installs each PostgreSQL version's server binaries.
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
#: What to tell a user whose machine lacks PostgreSQL.
INSTALL_HINT = "install Debian's postgresql package: bash scripts/system-deps.sh (as root)"

# Settings for a throwaway cluster: nothing here must survive a crash (the directory is
# deleted at the end), so durability is traded for speed. Never use these for real data:
# fsync=off and full_page_writes=off can corrupt a cluster on power loss
# (https://www.postgresql.org/docs/current/runtime-config-wal.html).
_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    # Two test workers each hold a few pools, and server nodes hold their own.
    "max_connections": "300",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",  # tests provoke errors on purpose
    "timezone": "'UTC'",
}


class PgClusterError(StoreError):
    """The throwaway PostgreSQL cluster could not be found, started or stopped."""


def find_bindir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres`` (see module doc)."""
    override = os.environ.get("OTA_PG_BINDIR")
    if override:
        if not (Path(override) / "initdb").exists():
            raise PgClusterError(f"OTA_PG_BINDIR={override} holds no initdb")
        return Path(override)

    def version_of(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    candidates = sorted(
        (path.parent for path in Path("/").glob(DEBIAN_BINDIRS.lstrip("/") + "/initdb")),
        key=version_of,
        reverse=True,
    )
    if candidates:
        return candidates[0]
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    raise PgClusterError(
        f"PostgreSQL's server programs (initdb, pg_ctl) are not installed: nothing in "
        f"{DEBIAN_BINDIRS} or on PATH; {INSTALL_HINT}, or set OTA_PG_BINDIR"
    )


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user the cluster runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    wanted = os.environ.get("OTA_PG_USER")
    for name in [wanted] if wanted else ["postgres", "nobody"]:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PgClusterError(
        f"PostgreSQL refuses to run as root and user {wanted or 'postgres'!r} does not exist; "
        f"{INSTALL_HINT} (it creates 'postgres'), or name another user in OTA_PG_USER"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PgCluster:
    """A running throwaway cluster in ``root`` (data, socket, log), listening on ``port``."""

    root: Path
    port: int
    bindir: Path
    #: The system user the server runs as (None: the current user).
    user: str | None

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (``initdb -D``)."""
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        """The server's log (``pg_ctl -l``): where to look when it misbehaves."""
        return self.root / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` on this cluster (psycopg 3, as the superuser)."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @classmethod
    def start(cls, parent: Path | str | None = None, *,
              settings: Mapping[str, str] | None = None) -> PgCluster:
        """initdb a new cluster in a fresh directory under ``parent`` (default: the system
        temporary directory, which must be reachable by the cluster's user) and start it;
        return once it accepts connections. ``settings`` (postgresql.conf names and
        values, quoted as there) override the throwaway defaults."""
        bindir = find_bindir()
        account = _run_as()
        root = Path(tempfile.mkdtemp(prefix="ota-pg-", dir=parent))
        cluster = cls(root, 0, bindir, account.pw_name if account else None)
        try:
            if account is not None:
                os.chown(root, account.pw_uid, account.pw_gid)
            cluster._initdb(settings or {})
            cluster._start_on_free_port()
            cluster._wait_until_accepting()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @classmethod
    def attach(cls, root: Path | str) -> PgCluster:
        """The cluster a ``start`` left in ``root`` (to stop it from another process)."""
        try:
            state = json.loads((Path(root) / STATE_FILE).read_text())
            return cls(Path(root), int(state["port"]), Path(state["bindir"]), state["user"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PgClusterError(f"{root} holds no throwaway cluster ({exc})") from exc

    def _command(self, program: str, *args: str, timeout: float = PG_CTL_TIMEOUT
                 ) -> subprocess.CompletedProcess[str]:
        """Run one of the cluster's programs as its user; raise with its output on failure."""
        command = [str(self.bindir / program), *args]
        account = pwd.getpwnam(self.user) if self.user else None
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PGTZ": "UTC"}
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False, env=env,
                cwd=self.root,
                user=account.pw_uid if account else None,
                group=account.pw_gid if account else None,
                extra_groups=[] if account else None,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PgClusterError(f"{shlex.join(command)} failed: {exc}") from exc
        if done.returncode != 0:
            raise PgClusterError(
                f"{shlex.join(command)} exited with {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
        return done

    def _initdb(self, overrides: Mapping[str, str]) -> None:
        # trust: the cluster is reachable from this machine only (127.0.0.1 and a socket in
        # a private directory), holds throwaway data, and the tests connect without secrets.
        self._command("initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "-A", "trust",
                      "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
        settings = {**_SETTINGS, "unix_socket_directories": f"'{self.root}'", **overrides}
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# otacloud throwaway test cluster (server/store/pg_cluster.py)\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def _start_on_free_port(self) -> None:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.port = _free_port()
            try:
                self._command("pg_ctl", "start", "-D", str(self.data_dir), "-l",
                              str(self.log_file), "-w", "-t", str(PG_CTL_TIMEOUT),
                              "-o", f"-p {self.port}")
            except PgClusterError:
                log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
                if attempt < PORT_ATTEMPTS and "could not bind" in log:
                    continue  # the port was taken between the probe and the bind
                raise
            (self.root / STATE_FILE).write_text(json.dumps(
                {"port": self.port, "bindir": str(self.bindir), "user": self.user}))
            return

    def _wait_until_accepting(self, timeout: float = PG_CTL_TIMEOUT) -> None:
        """Connect until the server answers a query (``pg_ctl -w`` already waited for
        the postmaster; this also proves the URL works)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER,
                                     dbname="postgres", connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PgClusterError(
                        f"the throwaway cluster on port {self.port} does not accept "
                        f"connections: {exc}; see {self.log_file}") from exc
                time.sleep(0.05)

    def shut_down(self, mode: str = "fast") -> None:
        """Stop the server, keeping the cluster, as an operator's ``pg_ctl stop -m mode``
        would: "fast" ends every session (each client sees its connection terminated),
        "immediate" kills the server processes without a checkpoint, as a crash would (the
        next start recovers from the WAL). Tests use it to take the database away from
        running server nodes; :meth:`start_again` brings it back on the same port."""
        if mode not in ("smart", "fast", "immediate"):
            raise PgClusterError(f"pg_ctl has no shutdown mode {mode!r} (smart, fast or "
                                 "immediate)")
        self._command("pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w",
                      "-t", str(PG_CTL_TIMEOUT))

    def start_again(self) -> None:
        """Start the server :meth:`shut_down` stopped, on the same port; return once it
        accepts connections (after crash recovery, when it was stopped "immediate")."""
        self._command("pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_file),
                      "-w", "-t", str(PG_CTL_TIMEOUT), "-o", f"-p {self.port}")
        self._wait_until_accepting()

    def stop(self) -> None:
        """Stop the server (if it runs) and delete the whole directory."""
        try:
            if (self.data_dir / "postmaster.pid").exists():
                # immediate: nothing in a throwaway cluster needs a clean shutdown.
                self._command("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate",
                              "-w", "-t", str(PG_CTL_TIMEOUT))
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def admin_connection(url: str) -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit psycopg connection for ``url`` (CREATE/DROP DATABASE cannot run in a
    transaction)."""
    parsed = sa.make_url(url)
    return psycopg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, password=parsed.password,
        dbname=parsed.database or "postgres", autocommit=True, connect_timeout=10,
    )


def create_database(admin_url: str, name: str, *, template: str | None = None) -> str:
    """Create database ``name`` (a copy of ``template`` when given) on the cluster of
    ``admin_url`` and return its URL. Copying a template that already holds the schema is
    much faster than creating the schema again."""
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        statement = sql.SQL("{} TEMPLATE {}").format(statement, sql.Identifier(template))
    with admin_connection(admin_url) as conn:
        conn.execute(statement)
    return sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` if it exists, ending its sessions first (PostgreSQL 13+)."""
    with admin_connection(admin_url) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def main(argv: Sequence[str] | None = None) -> int:
    """``start`` prints shell exports of the new cluster's URL and directory; ``stop DIR``
    stops and deletes it."""
    parser = argparse.ArgumentParser(prog="python -m server.store.pg_cluster",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start a cluster; print its environment")
    start.add_argument("--parent", help="directory to create the cluster in (default: TMPDIR)")
    stop = commands.add_parser("stop", help="stop the cluster in DIR and delete DIR")
    stop.add_argument("dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            cluster = PgCluster.start(args.parent)
            print(f"export OTA_TEST_PG_URL={shlex.quote(cluster.url())}")
            print(f"export OTA_TEST_PG_DIR={shlex.quote(str(cluster.root))}")
        elif Path(args.dir).exists():  # already gone: nothing to stop
            PgCluster.attach(args.dir).stop()
    except PgClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
