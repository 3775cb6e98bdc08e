"""A real server (REST API + TLS/DTLS device listeners on ephemeral ports) with a product
and provisioned devices, for end-to-end tests of the device plane."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from server.app import ServerConfig, ServerHandle, serve
from server.cli.device_store_cmd import create_provisioned_product


@dataclass
class DeviceServerKit:
    handle: ServerHandle
    data_dir: Path
    creds_dir: Path
    device_ids: list[str]
    product_id: int
    token: str

    @property
    def tcp(self) -> tuple[str, int]:
        assert self.handle.device_server and self.handle.device_server.tcp_address
        return self.handle.device_server.tcp_address

    @property
    def udp(self) -> tuple[str, int]:
        assert self.handle.device_server and self.handle.device_server.udp_address
        return self.handle.device_server.udp_address

    def address(self, transport: str) -> tuple[str, int]:
        return self.tcp if transport == "tcp" else self.udp

    def api(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.handle.api_url,
                                 headers={"Authorization": f"Bearer {self.token}"}, timeout=30)


def _prepare(data_dir: Path, creds_dir: Path, count: int) -> tuple[int, list[str]]:
    product_id, devices = create_provisioned_product(data_dir, creds_dir, "Sensors", 13, count)
    return product_id, [d.device_id for d in devices]


async def start_device_server(nursery: trio.Nursery, tmp_path: Path, count: int = 4,
                              **overrides: object) -> DeviceServerKit:
    """Create the store, a product, ``count`` provisioned devices, and start the server."""
    data_dir, creds_dir = tmp_path / "data", tmp_path / "creds"
    product_id, ids = await trio.to_thread.run_sync(_prepare, data_dir, creds_dir, count)
    config = ServerConfig(data_dir=data_dir, api_port=0, device_port=0, store_threads=4,
                          graceful_timeout=0.5, **overrides)  # type: ignore[arg-type]
    handle: ServerHandle = await nursery.start(serve, config)
    token = handle.fleet.create_api_token_sync("owner").access_token
    return DeviceServerKit(handle, data_dir, creds_dir, ids, product_id, token)
