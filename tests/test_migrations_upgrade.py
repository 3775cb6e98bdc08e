"""The upgrade test of issue 16: a data directory written by the last pre-Alembic server
(tests/data/store-v8.tar.gz, made by tests/data/make_store_v8.py at commit 7d47bd3) is
migrated in place, by ``ota admin migrate`` and by ``ota server`` starting on it, with
nothing lost: every row and blob is still there, and the server serves them (the API lists
the same devices and firmware, a firmware binary downloads byte-identical, tokens and
passwords still sign in)."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import tarfile
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import trio

from server.store import migrate
from tests.test_migrations import _assert_matches_models

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = Path(__file__).with_name("data") / "store-v8.tar.gz"

#: Rows of a table, keyed by column name, sorted (a comparable snapshot).
Rows = list[dict[str, Any]]


def _unpack(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """The archived data directory, unpacked under ``tmp_path``, and its manifest."""
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(tmp_path, filter="data")
    root = tmp_path / "store-v8"
    return root / "data", json.loads((root / "manifest.json").read_text())


def _dump(data: Path) -> dict[str, Rows]:
    """Every row of every table of ``data``'s SQLite file, read with plain sqlite3 (not the
    code under test), as dicts so a revision adding columns leaves old ones comparable."""
    with closing(sqlite3.connect(data / "ota.db")) as db:
        db.row_factory = sqlite3.Row
        tables = [row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        return {table: sorted((dict(row) for row in db.execute(f'SELECT * FROM "{table}"')),
                              key=repr)
                for table in tables}


def _blobs(data: Path) -> dict[str, bytes]:
    return {str(path.relative_to(data)): path.read_bytes()
            for path in sorted((data / "blobs").rglob("*")) if path.is_file()}


def _project(rows: Rows, columns: set[str], ignore: frozenset[str] = frozenset()) -> list[str]:
    """``rows`` restricted to ``columns`` minus ``ignore``, as sorted comparable strings."""
    keep = sorted(columns - ignore)
    return sorted(json.dumps({c: row[c] for c in keep}, sort_keys=True) for row in rows)


def _assert_nothing_lost(before: dict[str, Rows], after: dict[str, Rows], *,
                         changing: dict[str, frozenset[str]] | None = None,
                         growing: frozenset[str] = frozenset()) -> None:
    """Every table and row of ``before`` is in ``after`` with the same values; columns named
    in ``changing`` may differ (what a server start legitimately rewrites), and tables in
    ``growing`` may have gained rows (but lost none)."""
    changing = changing or {}
    assert set(before) - set(after) == set(), "tables disappeared"
    # Tables later revisions add (0003: the named leases of once-per-installation jobs).
    assert set(after) - set(before) <= {"alembic_version", "leases"}
    for table, rows in before.items():
        columns = set(rows[0]) if rows else set()
        old = _project(rows, columns, changing.get(table, frozenset()))
        new = _project(after[table], columns, changing.get(table, frozenset()))
        if table in growing:
            missing = [row for row in old if row not in new]
            assert missing == [], f"{table}: rows lost: {missing}"
        else:
            assert new == old, f"{table}: rows differ after the upgrade"


def _ota(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``ota`` CLI of this checkout."""
    return subprocess.run([sys.executable, "-m", "server.cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_archive_is_a_pre_alembic_store_with_every_table_filled(tmp_path: Path) -> None:
    data, manifest = _unpack(tmp_path)
    rows = _dump(data)
    assert "alembic_version" not in rows
    assert rows["meta"] == [{"key": "schema_version", "value": "8"}]
    assert {table: len(found) for table, found in rows.items()} == manifest["rows"]
    assert all(manifest["rows"].values()), "every table of schema version 8 holds rows"
    for sha256 in manifest["firmware"].values():
        blob = data / "blobs" / sha256[:2] / sha256
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == sha256


def test_ota_admin_migrate_upgrades_store_v8_with_nothing_lost(tmp_path: Path) -> None:
    data, _ = _unpack(tmp_path)
    before, blobs = _dump(data), _blobs(data)
    head = migrate.head_revision()

    pending = _ota("admin", "migrate", "--data", str(data), "--check")
    assert pending.returncode == 3, pending.stderr
    assert "current revision: none (a pre-Alembic store, schema version 8)" in pending.stdout
    assert f"head revision: {head}" in pending.stdout
    assert _dump(data) == before, "--check changed the store"

    upgraded = _ota("admin", "migrate", "--data", str(data))
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"upgraded to {head}" in upgraded.stdout

    after = _dump(data)
    _assert_nothing_lost(before, after)
    assert after["alembic_version"] == [{"version_num": head}]
    assert _blobs(data) == blobs
    engine = sa.create_engine(f"sqlite:///{data / 'ota.db'}")
    try:
        _assert_matches_models(engine)
    finally:
        engine.dispose()

    current = _ota("admin", "migrate", "--data", str(data), "--check", "--json")
    assert current.returncode == 0, current.stderr
    report = json.loads(current.stdout)
    assert report["current"] == [head] and report["pending"] is False


async def _start_server(data: Path, log: Path) -> tuple[trio.Process, str]:
    """``ota server`` on ``data`` (free ports); returns the process and its API URL."""
    argv = [sys.executable, "-m", "server.cli.main", "server", "--data", str(data),
            "--api-port", "0", "--device-port", "0"]
    with log.open("ab") as log_file:
        process = await trio.lowlevel.open_process(
            argv, stdout=subprocess.PIPE, stderr=log_file.fileno(), cwd=REPO)
    assert process.stdout is not None
    text = ""
    with trio.fail_after(60):
        while "ota server: API listening on " not in text or not text.endswith("\n"):
            chunk = await process.stdout.receive_some(4096)
            assert chunk, f"the server exited: {text} {log.read_text()}"
            text += chunk.decode()
    line = next(x for x in text.splitlines() if x.startswith("ota server: API listening on "))
    return process, line.rpartition(" ")[2]


async def _check_served(api_url: str, manifest: dict[str, Any]) -> None:
    """What the migrated store serves through the API, as the old server left it."""
    slug, devices = manifest["product"], manifest["devices"]
    p = f"/v1/products/{slug}"
    owner = {"Authorization": f"Bearer {manifest['owner_token']}"}
    async with httpx.AsyncClient(base_url=api_url, headers=owner, timeout=30) as api:
        products = (await api.get("/v1/products")).json()["products"]
        assert [(x["slug"], x["description"]) for x in products] == [(slug, "made by 7d47bd3")]

        listed = (await api.get(f"{p}/devices")).json()["devices"]
        by_id = {d["id"]: d for d in listed}
        assert sorted(by_id) == devices
        first = by_id[devices[0]]
        assert first["name"] == "kitchen" and first["notes"] == "locked and flashed"
        assert first["desired_firmware_version"] == 2 and first["flash_requested"] is True
        assert first["firmware_version"] == 1 and first["system_version"] == 5003
        detail = (await api.get(f"{p}/devices/{devices[0]}")).json()
        assert detail["update"]["status"] == "downloading"  # the transfer it was in
        assert detail["update"]["sha256"] == manifest["firmware"]["2"]
        assert by_id[devices[1]]["groups"] == ["beta"]
        assert sorted(by_id[devices[2]]["groups"]) == ["beta", "field"]
        assert by_id[devices[2]]["firmware_updates_forced"] is True
        assert by_id[devices[4]]["development"] is True
        # The crashed server's sessions are gone: a start marks their devices offline.
        assert not any(d["online"] for d in listed)

        firmware = (await api.get(f"{p}/firmware")).json()
        assert sorted((f["version"], f["sha256"]) for f in firmware) == sorted(
            (int(v), sha) for v, sha in manifest["firmware"].items())
        for version, sha256 in manifest["firmware"].items():
            binary = await api.get(f"{p}/firmware/{version}/binary")
            assert binary.status_code == 200
            assert hashlib.sha256(binary.content).hexdigest() == sha256

        rollouts = (await api.get(f"{p}/rollouts")).json()["rollouts"]
        assert [r["id"] for r in rollouts] == [manifest["rollout"]]
        counts = rollouts[0]["counts"]
        assert (counts["succeeded"], counts["download_failed"]) == (1, 1)
        windows = (await api.get(f"{p}/window")).json()
        assert windows["window"]["cron"] == "0 2 * * *"
        assert [w["cron"] for w in windows["groups"]] == ["30 3 * * 1-5"]
        team = (await api.get(f"{p}/team")).json()["team"]
        assert sorted(m["username"].split("+")[0] for m in team) == [
            "ci-pipeline", "member@example.com"]
        assert len((await api.get("/v1/device-os")).json()) == 1

        # Tokens and secrets the old server issued still sign in.
        operator = manifest["operator"]
        signed = await api.post("/oauth/token", data={
            "grant_type": "password", "username": operator["username"],
            "password": operator["password"]}, headers={})
        assert signed.status_code == 200, signed.text
        client = await api.post("/oauth/token", data={
            "grant_type": "client_credentials", "client_id": manifest["client"]["id"],
            "client_secret": manifest["client"]["secret"]})
        assert client.status_code == 200, client.text
    for token in (signed.json()["access_token"], manifest["api_user_token"]):
        async with httpx.AsyncClient(base_url=api_url, timeout=30,
                                     headers={"Authorization": f"Bearer {token}"}) as user:
            assert (await user.get(f"{p}/devices")).status_code == 200


async def test_ota_server_start_upgrades_store_v8_and_serves_it(tmp_path: Path) -> None:
    data, manifest = _unpack(tmp_path)
    before, blobs = _dump(data), _blobs(data)
    process, api_url = await _start_server(data, tmp_path / "server.log")
    try:
        await _check_served(api_url, manifest)
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            await process.wait()
    assert process.returncode == 0, (tmp_path / "server.log").read_text()
    after = _dump(data)
    assert after["alembic_version"] == [{"version_num": migrate.head_revision()}]
    _assert_nothing_lost(
        before, after,
        # A start clears the presence a crashed server left (its sessions are gone), and
        # its rollout ticker looks at the running rollout and saves it in today's format
        # (state_data 2: per-device progress moves to rollout_device_outcomes rows; the
        # counts checked above are the same).
        changing={"devices": frozenset({"online", "session_owner", "updated_at"}),
                  "rollouts": frozenset({"updated_at", "state_data"})},
        # Signing in above issued tokens and audited it; the relay appends and prunes
        # (relayed events live ~2 minutes, by design) only its own rows; the rollout's
        # devices without an outcome get their placement rows.
        growing=frozenset({"tokens", "audit_log", "event_log", "rollout_device_outcomes"}),
    )
    assert {name: data for name, data in _blobs(data).items() if name in blobs} == blobs
