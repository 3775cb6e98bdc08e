"""Separate ``ota server`` processes as the nodes of one installation, for the tests that
run several: start one on a data directory and a database URL with free ports, read what it
prints (its API URL, device endpoints, node id), stop it at the end."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from server.cli.device_store_cmd import create_provisioned_product
from server.emulator.endpoints import Endpoint
from server.events import EventBus
from server.fleet import Fleet
from server.store.installation import Installation

REPO = Path(__file__).resolve().parent.parent


def provisioned_product(data: Path, creds: Path, devices: int, *, name: str = "Sensors",
                        db_url: str | None = None) -> tuple[int, list[str], str]:
    """A product (platform 13) with ``devices`` provisioned devices (credentials in
    ``creds``) in the installation of ``data`` / ``db_url``, and an owner's API token:
    (product id, device ids sorted, token)."""
    product_id, provisioned = create_provisioned_product(data, creds, name, 13, devices,
                                                         db_url=db_url)
    store = Installation(data, db_url).open_store()
    try:
        token = Fleet(store, EventBus()).create_api_token_sync("owner").access_token
    finally:
        store.close()
    return product_id, sorted(d.device_id for d in provisioned), token


class Node:
    """One ``ota server`` node (its main process; ``lines``: what it printed at start)."""

    def __init__(self, process: trio.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.lines: dict[str, str] = {}

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def address(self, name: str) -> tuple[str, int]:
        host, _, port = self.lines[f"ota server: devices on {name}"].rpartition(":")
        return host, int(port)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.address("TLS"), self.address("DTLS"))

    @property
    def api_url(self) -> str:
        return self.lines["ota server: API listening on"]


@asynccontextmanager
async def running_node(data: Path, db_url: str, log_path: Path, *, workers: int = 1,
                       node_id: str | None = None, device_port: int = 0,
                       extra: Sequence[str] = (), graceful_stop: bool = False,
                       ) -> AsyncIterator[Node]:
    """``ota server`` on ``data`` and the database ``db_url`` with ``workers`` processes, a
    free API port, ``device_port`` (0: a free one), ``--node-id node_id`` when given and
    ``extra`` options. At the end it is SIGKILLed if still running (``graceful_stop``: sent
    SIGTERM first, killed after 30 s)."""
    argv = [sys.executable, "-m", "server.cli.main", "server", "--data", str(data),
            "--db-url", db_url, "--api-port", "0", "--device-port", str(device_port),
            "--workers", str(workers),
            *(["--node-id", node_id] if node_id is not None else []), *extra]  # fmt: skip
    with log_path.open("ab") as log:
        process = await trio.lowlevel.open_process(
            argv, stdout=subprocess.PIPE, stderr=log.fileno(), cwd=REPO
        )
    node = Node(process, log_path)
    try:
        assert process.stdout is not None
        text = ""
        with trio.fail_after(60):
            while "devices on DTLS" not in text:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"the server exited: {text} {log_path.read_text()[-3000:]}"
                text += chunk.decode()
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            node.lines[head] = value
        if node_id is not None:
            assert node.lines["ota server: node"] == node_id
        yield node
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None and graceful_stop:
                process.terminate()
                with trio.move_on_after(30):
                    await process.wait()
            if process.returncode is None:
                process.kill()
            await process.wait()
            if process.stdout is not None:
                await trio.aclose_forcefully(process.stdout)


async def upload(api: httpx.AsyncClient, product: int, version: int, image: bytes) -> None:
    response = await api.post(
        f"/v1/products/{product}/firmware",
        data={"version": str(version), "title": f"v{version}"},
        files={"binary": ("app.bin", image, "application/octet-stream")},
    )
    assert response.status_code == 201, response.text


async def release(api: httpx.AsyncClient, product: int, version: int) -> None:
    response = await api.put(
        f"/v1/products/{product}/firmware/release",
        json={"version": version, "product_default": True, "intelligent": True, "force": True},
    )
    assert response.status_code == 200, response.text
