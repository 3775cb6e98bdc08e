"""Kill -9 the server at random moments during uploads and releases: nothing acknowledged is lost.

A real ``ota server`` subprocess takes a stream of firmware uploads (one client) and uploads
plus forced releases (a second client) until it is SIGKILLed at a random moment. It is then
restarted on the same data directory and every upload or release that got a 2xx answer must
be there, byte for byte; an operation in flight when the kill landed may or may not have
happened, but nothing else may appear. Finally the database passes ``integrity_check`` and
every blob still matches its SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import random
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.store import Store

CYCLES = 4
REPO = Path(__file__).resolve().parent.parent


def _start_server(data: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli.server_cmd",
                "server",
                "--data",
                str(data),
                "--api-port",
                "0",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    line = b""
    while b"\n" not in line:
        if time.monotonic() > deadline or not selector.select(deadline - time.monotonic()):
            proc.kill()
            raise AssertionError(f"server did not start; log: {log.read_text()[-2000:]}")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"server exited; log: {log.read_text()[-2000:]}")
        line += chunk
    selector.close()
    url = line.decode().split("listening on ", 1)[1].split()[0]
    return proc, url


@dataclass
class Ledger:
    """What one client was told succeeded, and what it had in flight when the server died."""

    uploads: dict[int, str] = field(default_factory=dict)  # version -> sha256
    releases: list[int] = field(default_factory=list)  # product-default versions, in order
    in_flight_upload: tuple[int, str] | None = None
    in_flight_release: int | None = None
    next_version: int = 1


def _client_loop(
    url: str,
    token: str,
    slug: str,
    ledger: Ledger,
    *,
    releases: bool,
    make_firmware: Callable[..., bytes],
    rng: random.Random,
) -> None:
    """Upload (and maybe release) until the server dies; record every acknowledgement."""
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        while True:
            try:
                if releases and ledger.uploads and rng.random() < 0.4:
                    version = rng.choice(sorted(ledger.uploads))
                    ledger.in_flight_release = version
                    response = client.put(
                        f"/v1/products/{slug}/firmware/release",
                        json={"version": version, "product_default": True, "force": True},
                    )
                    assert response.status_code == 200, response.text
                    ledger.releases.append(version)
                    ledger.in_flight_release = None
                else:
                    version = ledger.next_version
                    ledger.next_version += 1
                    image = make_firmware(
                        version, size=rng.randrange(20_000, 200_000), seed=rng.randrange(1 << 30)
                    )
                    sha = hashlib.sha256(image).hexdigest()
                    ledger.in_flight_upload = (version, sha)
                    response = client.post(
                        f"/v1/products/{slug}/firmware",
                        data={"version": str(version), "title": f"v{version}"},
                        files={"binary": ("f.bin", image)},
                    )
                    assert response.status_code == 201, response.text
                    ledger.uploads[version] = sha
                    ledger.in_flight_upload = None
            except httpx.TransportError:
                return  # the server was killed


def _verify(url: str, token: str, slug: str, ledgers: list[Ledger]) -> None:
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        listing = {fw["version"]: fw for fw in client.get(f"/v1/products/{slug}/firmware").json()}
        allowed: dict[int, str] = {}
        for ledger in ledgers:
            for version, sha in ledger.uploads.items():
                assert version in listing, f"acknowledged upload {version} was lost"
                assert listing[version]["sha256"] == sha
                allowed[version] = sha
            if ledger.in_flight_upload is not None:
                version, sha = ledger.in_flight_upload
                if version in listing:  # it committed just before the kill
                    assert listing[version]["sha256"] == sha
                    ledger.uploads[version] = sha
                    allowed[version] = sha
                ledger.in_flight_upload = None
        assert set(listing) == set(allowed), "firmware appeared that nobody uploaded"
        for version, sha in allowed.items():
            binary = client.get(f"/v1/products/{slug}/firmware/{version}/binary")
            assert hashlib.sha256(binary.content).hexdigest() == sha
        defaults = frozenset(v for v, fw in listing.items() if fw["product_default"])
        releaser = ledgers[1]
        acceptable = {frozenset(releaser.releases[-1:])}
        if releaser.in_flight_release is not None:  # it may have committed before the kill
            acceptable.add(frozenset({releaser.in_flight_release}))
        assert defaults in acceptable, (defaults, releaser.releases[-1:])
        if releaser.in_flight_release in defaults:
            releaser.releases.append(releaser.in_flight_release)
        releaser.in_flight_release = None


def test_sigkill_during_uploads_and_releases_loses_nothing(tmp_path: Path, make_firmware) -> None:
    data, log = tmp_path / "data", tmp_path / "server.log"
    fleet = Fleet(Store.open_dir(data, pool_size=1), EventBus())
    token = fleet.create_api_token_sync("owner").access_token
    slug = fleet.create_product_sync(SYSTEM_ACTOR, "Crash Test", 13).slug
    fleet.store.close()
    # A new seed each run (kill moments, image sizes); printed, and OTA_SIGKILL_SEED=N
    # replays a run.
    seed = int(os.environ.get("OTA_SIGKILL_SEED") or int.from_bytes(os.urandom(4), "big"))
    print(f"sigkill: seed {seed} (OTA_SIGKILL_SEED={seed} replays it)")
    rng = random.Random(seed)
    uploader, releaser = Ledger(next_version=1), Ledger(next_version=30_000)
    kills = in_flight_kills = 0
    for _cycle in range(CYCLES):
        proc, url = _start_server(data, log)
        try:
            _verify(url, token, slug, [uploader, releaser])
            threads = [
                threading.Thread(
                    target=_client_loop,
                    args=(url, token, slug, ledger),
                    kwargs={
                        "releases": ledger is releaser,
                        "make_firmware": make_firmware,
                        "rng": random.Random(rng.random()),
                    },
                )
                for ledger in (uploader, releaser)
            ]
            for thread in threads:
                thread.start()
            if _cycle == 0:
                # However slow the machine, the run has acknowledged work to lose.
                deadline = time.monotonic() + 60
                while not (uploader.uploads or releaser.uploads):
                    assert time.monotonic() < deadline, "no upload was acknowledged in 60 s"
                    time.sleep(0.01)
            time.sleep(rng.uniform(0.05, 1.2))
            proc.send_signal(signal.SIGKILL)
            kills += 1
            for thread in threads:
                thread.join(60)
                assert not thread.is_alive()
            in_flight_kills += any(
                (ledger.in_flight_upload, ledger.in_flight_release) != (None, None)
                for ledger in (uploader, releaser)
            )
        finally:
            proc.kill()
            proc.wait()
    proc, url = _start_server(data, log)
    try:
        _verify(url, token, slug, [uploader, releaser])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
    assert kills == CYCLES and len(uploader.uploads) + len(releaser.uploads) > 0
    print(
        f"sigkill: {kills} kills, {len(uploader.uploads) + len(releaser.uploads)} uploads and "
        f"{len(releaser.releases)} releases acknowledged, {in_flight_kills} kills with a "
        "request in flight"
    )
    store = Store.open_dir(data, pool_size=1)
    try:
        assert store.check() == "ok"
        with store.read() as tx:
            referenced = tx.referenced_blobs()
        # Orphans of killed uploads are kept for the sweep's grace period (an upload on
        # its way to its row is never swept), then swept.
        assert referenced <= set(store.blobs.names())
        store.sweep_blobs(grace_s=0)
        assert referenced == set(store.blobs.names())
        for name in referenced:
            store.blobs.get(name)  # raises if a blob does not match its name
        assert list((data / "blobs" / "tmp").iterdir()) == []
    finally:
        store.close()
