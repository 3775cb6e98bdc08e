"""The client's address behind trusted reverse proxies (``ota server --forwarded-allow-ips``).

Behind a reverse proxy every request's TCP peer is the proxy, so the sign-in throttle
(``server.api.auth``) would count every client as one. A proxy says who its client was in
``X-Forwarded-For`` (each proxy appends the address it received the request from) and how
the client spoke in ``X-Forwarded-Proto``. Anyone can send those headers, so they are read
only when the TCP peer is one of the trusted proxy addresses, and then from the right: the
client address is the rightmost entry that is not itself a trusted proxy (the entries to
its left were written by the client, and may be lies). Hypercorn's ``ProxyFixMiddleware``
trusts a fixed number of hops from any peer, which lets a client that reaches the server
directly pick its own address; hence this middleware.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from otacore.errors import ValidationError

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``--forwarded-allow-ips *``: trust every peer (only where nothing but the proxy can
#: reach the API port, e.g. a private network or a firewall that says so).
ANY_PEER = "*"


def parse_trusted_proxies(entries: Sequence[str]) -> tuple[Network, ...] | None:
    """The networks of ``--forwarded-allow-ips`` entries (addresses or CIDR networks), or
    None for ``*`` (every peer). ValidationError naming a wrong entry."""
    if ANY_PEER in entries:
        return None
    networks: list[Network] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValidationError(
                f"forwarded_allow_ips: {entry!r} is not an IP address or network (e.g. "
                "127.0.0.1, 10.0.0.0/8, ::1), nor '*'") from None
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:4711" (RFC 7239 style)
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:4711"
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxyHeaders:
    """ASGI middleware: the client address and scheme from the forwarded headers of
    requests whose TCP peer is a trusted proxy (see the module docstring)."""

    def __init__(self, app: AsgiApp, trusted: Sequence[str]) -> None:
        self.app = app
        self.networks = parse_trusted_proxies(trusted)

    def trusts(self, host: str) -> bool:
        """True when ``host`` (a peer or a forwarded address) is a trusted proxy."""
        if self.networks is None:
            return True
        address = _address(host)
        return address is not None and any(address in network for network in self.networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")
            if client is not None and self.trusts(str(client[0])):
                scope = dict(scope)
                self._rewrite(scope)
        await self.app(scope, receive, send)

    def _rewrite(self, scope: Scope) -> None:
        forwarded_for: list[str] = []
        proto: list[str] = []
        for name, value in scope.get("headers", ()):
            if name == b"x-forwarded-for":
                forwarded_for += value.decode("latin-1").split(",")
            elif name == b"x-forwarded-proto":
                proto += value.decode("latin-1").split(",")
        client: str | None = None
        for entry in reversed(forwarded_for):
            address = _address(entry)
            if address is None:
                break  # garbage: whatever is left of it cannot be believed either
            client = str(address)
            if not self.trusts(client):
                break  # the first hop no trusted proxy wrote
        if client is not None:
            scope["client"] = (client, 0)
        if proto:
            scheme = proto[-1].strip().lower()  # what the nearest proxy was spoken to with
            if scheme in ("http", "https"):
                websocket = scope["type"] == "websocket"
                scope["scheme"] = {"http": "ws", "https": "wss"}[scheme] if websocket else scheme
