"""The throwaway PostgreSQL cluster of the test command (server/store/pg_cluster.py): started
through its command line as scripts/run-tests.sh does, it runs as an unprivileged user on a
loopback port with durability off, serves databases copied from a template, and leaves
nothing behind; without PostgreSQL installed it says how to install it."""

from __future__ import annotations

import os
import pwd
import shlex
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from server.store import pg_cluster
from server.store.pg_cluster import PgClusterError, create_database, drop_database

REPO = Path(__file__).resolve().parent.parent


def _exports(text: str) -> dict[str, str]:
    """``export NAME=value`` lines (shell-quoted) as a dict."""
    found = {}
    for line in text.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        found[name] = shlex.split(value)[0]
    return found


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.store.pg_cluster", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_command_line_starts_a_private_cluster_and_stop_removes_it() -> None:
    started = _cli("start")
    assert started.returncode == 0, started.stderr
    env = _exports(started.stdout)
    root = Path(env["OTA_TEST_PG_DIR"])
    try:
        url = env["OTA_TEST_PG_URL"]
        assert url.startswith("postgresql+psycopg://ota@127.0.0.1:")
        cluster = pg_cluster.PgCluster.attach(root)
        with psycopg.connect(host="127.0.0.1", port=cluster.port, user="ota",
                             dbname="postgres") as conn:
            settings = dict(conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                (["fsync", "synchronous_commit", "full_page_writes", "listen_addresses",
                  "unix_socket_directories"],)).fetchall())
            owner = conn.execute(
                "SELECT usename FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            ).fetchone()
        assert settings == {"fsync": "off", "synchronous_commit": "off",
                            "full_page_writes": "off", "listen_addresses": "127.0.0.1",
                            "unix_socket_directories": str(root)}
        assert owner == ("ota",)
        # The server's files belong to an unprivileged system user when we are root
        # (initdb refuses root).
        files_owner = pwd.getpwuid((root / "data").stat().st_uid).pw_name
        if os.geteuid() == 0:
            assert files_owner != "root" and files_owner == cluster.user
        # A database copied from a template holds the template's tables.
        create_database(url, "tmpl")
        with psycopg.connect(host="127.0.0.1", port=cluster.port, user="ota", dbname="tmpl",
                             autocommit=True) as conn:
            conn.execute("CREATE TABLE marker (x int)")
        copy_url = create_database(url, "copy", template="tmpl")
        assert copy_url.endswith("/copy")
        session = psycopg.connect(host="127.0.0.1", port=cluster.port, user="ota",
                                  dbname="copy", autocommit=True)
        assert session.execute("SELECT count(*) FROM marker").fetchone() == (0,)
        drop_database(url, "copy")  # ends that session first (WITH (FORCE))
        with pytest.raises(psycopg.OperationalError):  # terminated by the drop
            session.execute("SELECT 1")
        session.close()
    finally:
        stopped = _cli("stop", str(root))
    assert stopped.returncode == 0, stopped.stderr
    assert not root.exists()
    assert _cli("stop", str(root)).returncode == 0  # already gone: nothing to do


def test_without_postgresql_it_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    monkeypatch.delenv("OTA_PG_BINDIR", raising=False)
    monkeypatch.setattr(pg_cluster, "DEBIAN_BINDIRS", str(tmp_path / "none/*/bin"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PgClusterError, match=r"scripts/system-deps\.sh"):
        pg_cluster.find_bindir()
    monkeypatch.setenv("OTA_PG_BINDIR", str(tmp_path))
    with pytest.raises(PgClusterError, match="holds no initdb"):
        pg_cluster.find_bindir()


def test_the_newest_installed_version_is_chosen(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    for version in ("9.6", "15", "13"):
        bindir = tmp_path / version / "bin"
        bindir.mkdir(parents=True)
        (bindir / "initdb").touch()
    monkeypatch.delenv("OTA_PG_BINDIR", raising=False)
    monkeypatch.setattr(pg_cluster, "DEBIAN_BINDIRS", str(tmp_path / "*/bin"))
    assert pg_cluster.find_bindir() == tmp_path / "15" / "bin"


def test_a_stop_of_something_else_is_refused(tmp_path: Path) -> None:
    result = _cli("stop", str(tmp_path))
    assert result.returncode == 1 and "holds no throwaway cluster" in result.stderr
    assert tmp_path.exists()  # never deletes a directory it did not create
