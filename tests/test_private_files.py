"""Files at rest are owner-only (issue 13, finding 10).

The data directory (database with its -wal/-shm, blobs, CA, server key, signing keys) and a
provisioning output directory (device private keys) are created 0700/0600 even under the
usual umask 022, and a data directory an older release left 0755/0644 is tightened when the
server or the CLI opens it.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from typer.testing import CliRunner

from server.private_files import (
    create_private_file,
    make_private_dir,
    tighten_tree,
    write_private_file,
)
from tests.conftest import _make_firmware
from tests.device_server import start_device_server


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and everything below it, by path relative to ``root``."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for directory, subdirs, files in os.walk(root):
        for name in subdirs + files:
            path = Path(directory) / name
            found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def not_private(root: Path) -> dict[str, str]:
    """Entries whose mode is not exactly 0700 (directories) or 0600 (files)."""
    wrong = {}
    for name, mode in modes(root).items():
        wanted = 0o700 if (root / name).is_dir() else 0o600
        if mode != wanted:
            wrong[name] = oct(mode)
    return wrong


async def test_a_new_installation_is_private_under_umask_022(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with umask(0o022):
        # A product with provisioned devices (CA, server key, device keys, the KEK of the
        # signing keys, which are in the store),
        # the running server (SQLite in WAL mode: -wal and -shm exist), and an upload.
        kit = await start_device_server(nursery, tmp_path, count=2)
        async with kit.api() as api:
            response = await api.post(
                f"/v1/products/{kit.product_id}/firmware",
                data={"version": "2", "title": "v2"},
                files={"binary": ("app.bin", _make_firmware(2), "application/octet-stream")},
            )
            assert response.status_code == 201, response.text
        data = modes(kit.data_dir)
        for expected in ("ota.db", "ota.db-wal", "ota.db-shm", "pki/ca.key", "pki/ca.pem",
                         "pki/server.key", "keys", "blobs", "blobs/tmp"):
            assert expected in data, sorted(data)
        assert any(name.startswith("blobs/") and len(Path(name).name) == 64 for name in data)
        assert "keys/signing-keys.kek" in data
        assert not_private(kit.data_dir) == {}
        # What `ota device provision --out` wrote: device private keys, certificates, trust.
        creds = modes(kit.creds_dir)
        assert f"{kit.device_ids[0]}/key.pem" in creds and "signing-keys.txt" in creds
        assert not_private(kit.creds_dir) == {}


def _loosen(root: Path) -> None:
    """What an older release left: directories 0755, files 0644."""
    for directory, _subdirs, files in os.walk(root):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(Path(directory) / name, 0o644)


def test_an_older_data_directory_is_tightened_when_the_cli_opens_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from server.cli.main import app

    data = tmp_path / "data"
    runner = CliRunner()
    with umask(0o022):
        created = runner.invoke(app, ["product", "create", "Old", "--platform-id", "13",
                                      "--data", str(data)])
        assert created.exit_code == 0, created.output
        pki = runner.invoke(app, ["device", "pki-init", "--data", str(data)])
        assert pki.exit_code == 0, pki.output
        _loosen(data)
        assert modes(data)["ota.db"] == 0o644 and modes(data)["pki/ca.key"] == 0o644
        caplog.set_level(logging.WARNING, logger="ota.files")
        opened = runner.invoke(app, ["admin", "token", "--data", str(data)])
        assert opened.exit_code == 0, opened.output
    assert not_private(data) == {}
    (warning,) = [r for r in caplog.records if "readable by other users" in r.getMessage()]
    assert str(data) in warning.getMessage()


def test_pki_init_tightens_the_data_directory_too(tmp_path: Path) -> None:
    from server.cli.main import app

    data = tmp_path / "data"
    (data / "blobs").mkdir(parents=True)
    (data / "blobs" / "left-over").write_bytes(b"x")
    _loosen(data)
    with umask(0o022):
        result = CliRunner().invoke(app, ["device", "pki-init", "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert not_private(data) == {}


def test_private_file_helpers_ignore_the_umask(tmp_path: Path) -> None:
    with umask(0o000):  # the loosest umask: nothing filtered out
        directory = make_private_dir(tmp_path / "a" / "b")
        write_private_file(directory / "replaced", b"one")
        write_private_file(directory / "replaced", b"two")
        write_private_file(directory / "key", b"secret", exclusive=True)
        with pytest.raises(FileExistsError):
            write_private_file(directory / "key", b"other", exclusive=True)
        assert create_private_file(directory / "db")
        assert not create_private_file(directory / "db")
    assert (directory / "replaced").read_bytes() == b"two"
    assert (directory / "key").read_bytes() == b"secret"
    assert not_private(tmp_path / "a") == {}
    assert [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == []


def test_tighten_tree_leaves_symbolic_links_alone(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"not ours")
    os.chmod(outside, 0o644)
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    (root / "link").symlink_to(outside)
    (root / "file").write_bytes(b"ours")
    os.chmod(root / "file", 0o664)
    changed = tighten_tree(root)
    assert sorted(p.name for p in changed) == ["file", "root"]
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644  # the link's target is not ours
