"""A minimal device for tests: a CoAP link over a real TLS stream or DTLS channel.

It speaks through the same sans-IO link the server uses (otacore.protocol.link), so tests can
send any message, well-formed or not, and read what the server sends back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from otacore.coap import Message
from otacore.messages import (
    Describe,
    Direction,
    Event,
    Goodbye,
    Hello,
    ModuleDescription,
    to_message,
)
from otacore.protocol.link import (
    CoapLink,
    LinkEvent,
    RequestReceived,
    ResponseReceived,
    make_link,
)
from server.transport.client import DeviceCredentials, connect_dtls, connect_tls


@dataclass
class LinkDevice:
    """One connected device: ``request`` waits for the answer, ``incoming`` collects the rest."""

    device_id: str
    transport: str
    link: CoapLink
    stream: Any
    endpoint: trio.DTLSEndpoint | None = None
    incoming: list[LinkEvent] = field(default_factory=list)
    closed: bool = False

    @classmethod
    async def connect(cls, creds_dir: Path, device_id: str, transport: str,
                      address: tuple[str, int]) -> LinkDevice:
        device_dir = creds_dir / device_id
        creds = DeviceCredentials(device_dir / "cert.pem", device_dir / "key.pem",
                                  creds_dir / "ca.pem")
        if transport == "tcp":
            stream: Any = await connect_tls(address, creds)
            endpoint = None
        else:
            endpoint = trio.DTLSEndpoint(trio.socket.socket(type=trio.socket.SOCK_DGRAM))
            await endpoint.socket.bind(("127.0.0.1", 0))
            stream = await connect_dtls(endpoint, address, creds)
        device = cls(device_id, transport, make_link(transport), stream, endpoint)  # type: ignore[arg-type]
        await device.flush()
        return device

    async def send_raw(self, data: bytes) -> None:
        if self.transport == "tcp":
            await self.stream.send_all(data)
        else:
            await self.stream.send(data)

    async def flush(self) -> None:
        for data in self.link.take_outgoing():
            await self.send_raw(data)

    async def _receive_once(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            try:
                data = await (self.stream.receive_some(65536) if self.transport == "tcp"
                              else self.stream.receive())
            except (trio.BrokenResourceError, trio.ClosedResourceError, Exception):
                self.closed = True
                return
            if not data:
                self.closed = True
                return
            self.incoming.extend(self.link.receive(data, trio.current_time()))
            await self.flush()

    async def request(self, message: Message, timeout: float = 10.0) -> Message:
        token = self.link.request(message, trio.current_time())
        await self.flush()
        deadline = trio.current_time() + timeout
        while trio.current_time() < deadline and not self.closed:
            for event in self.incoming:
                if isinstance(event, ResponseReceived) and event.token == token:
                    self.incoming.remove(event)
                    return event.message
            await self._receive_once(deadline)
        raise TimeoutError(f"no answer to {message.uri_path} (closed={self.closed})")

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> LinkEvent:
        deadline = trio.current_time() + timeout
        while trio.current_time() < deadline and not self.closed:
            for event in self.incoming:
                if predicate(event):
                    self.incoming.remove(event)
                    return event
            await self._receive_once(deadline)
        raise TimeoutError("the expected message did not arrive")

    async def wait_closed(self, timeout: float = 10.0) -> None:
        deadline = trio.current_time() + timeout
        while not self.closed and trio.current_time() < deadline:
            await self._receive_once(deadline)
        assert self.closed, "the server did not close the session"

    async def hello(self, *, product_version: int = 1, system_version: int = 5003,
                    updates_enabled: bool = True, device_id: str | None = None,
                    platform_id: int = 13, max_message_size: int = 1500,
                    key_sequence: int | None = None, key_push: bool = False) -> Message:
        hello = Hello(device_id=device_id or self.device_id, platform_id=platform_id,
                      product_id=13, product_version=product_version,
                      system_version=system_version, supports_immediate_updates=True,
                      updates_enabled=updates_enabled, reset_pending=False,
                      max_message_size=max_message_size, key_sequence=key_sequence,
                      key_push=key_push)
        return await self.request(to_message(hello, Direction.TO_CLOUD))

    async def describe(self, modules: list[ModuleDescription]) -> Message:
        return await self.request(to_message(Describe(tuple(modules)), Direction.TO_CLOUD))

    async def publish(self, name: str, data: str) -> Message:
        return await self.request(to_message(Event(name, data, 60), Direction.TO_CLOUD))

    async def goodbye(self, reason: str = "sleep") -> Message:
        return await self.request(to_message(Goodbye(reason), Direction.TO_CLOUD))

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                if self.transport == "tcp":
                    await self.stream.aclose()
                else:
                    self.stream.close()
                    assert self.endpoint is not None
                    self.endpoint.close()
            except Exception:
                pass


def is_request_to(path: list[str]) -> Any:
    """Predicate: a request from the server to ``path``."""
    return lambda e: isinstance(e, RequestReceived) and e.message.uri_path == path


NEVER = math.inf
