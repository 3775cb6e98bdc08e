"""Behind a reverse proxy (issue 17 item 4): ``--forwarded-allow-ips`` names the proxies
whose ``X-Forwarded-For`` says who the client is, so the sign-in limits count each client
and not the proxy; a client that reaches the server directly cannot pick its address by
sending the header itself.

The middleware is checked on its own (scopes in, scopes out), then on a real server whose
sign-in throttle sees the forwarded addresses; connections come from real loopback source
addresses (127.0.0.1 is "the proxy", 127.0.0.5 a client that bypasses it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from otacore.errors import ValidationError
from server.app import ServerHandle
from server.proxy_headers import TrustedProxyHeaders, parse_trusted_proxies
from tests.conftest import _server_config

PASSWORD = "correct horse battery"


async def _seen(trusted: list[str], peer: str, headers: list[tuple[bytes, bytes]],
                kind: str = "http") -> tuple[Any, Any]:
    """(client, scheme) the app behind the middleware sees for one request."""
    seen: dict[str, Any] = {}

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        seen.update(scope)

    scope = {"type": kind, "client": (peer, 4711), "scheme": "http" if kind == "http" else "ws",
             "headers": headers}
    await TrustedProxyHeaders(app, trusted)(scope, None, None)  # type: ignore[arg-type]
    assert scope["client"] == (peer, 4711)  # the server's own scope is left as it was
    return seen["client"], seen["scheme"]


XFF = b"x-forwarded-for"
PROTO = b"x-forwarded-proto"


async def test_the_headers_of_a_trusted_proxy_name_the_client() -> None:
    assert await _seen(["127.0.0.1"], "127.0.0.1",
                       [(XFF, b"192.0.2.7"), (PROTO, b"https")]) == (("192.0.2.7", 0), "https")
    # A network of proxies; IPv6; a chain of two proxies, both trusted.
    assert (await _seen(["10.0.0.0/8"], "10.1.2.3", [(XFF, b"2001:db8::5, 10.9.9.9")]))[0] \
        == ("2001:db8::5", 0)
    # "ws" becomes "wss" for a WebSocket the proxy received over TLS.
    assert (await _seen(["127.0.0.1"], "127.0.0.1", [(PROTO, b"https")], "websocket"))[1] \
        == "wss"


async def test_what_a_client_wrote_left_of_the_proxy_is_not_believed() -> None:
    # The client sent "X-Forwarded-For: 198.51.100.1"; the proxy appended its real address.
    assert (await _seen(["127.0.0.1"], "127.0.0.1",
                        [(XFF, b"198.51.100.1, 192.0.2.7")]))[0] == ("192.0.2.7", 0)
    # Two header lines count as one list, in order.
    assert (await _seen(["127.0.0.1"], "127.0.0.1",
                        [(XFF, b"198.51.100.1"), (XFF, b"192.0.2.7")]))[0] == ("192.0.2.7", 0)
    # Garbage where the proxy's entry should be: the peer stays the client.
    assert (await _seen(["127.0.0.1"], "127.0.0.1", [(XFF, b"unknown")]))[0] \
        == ("127.0.0.1", 4711)


async def test_the_headers_of_anyone_else_are_ignored() -> None:
    assert await _seen(["127.0.0.1"], "127.0.0.5",
                       [(XFF, b"192.0.2.7"), (PROTO, b"https")]) == (("127.0.0.5", 4711), "http")
    assert await _seen(["10.0.0.0/8"], "192.0.2.200", [(XFF, b"10.0.0.1")]) \
        == (("192.0.2.200", 4711), "http")
    # "*" trusts every peer (a private network only the proxy reaches).
    assert (await _seen(["*"], "192.0.2.200", [(XFF, b"198.51.100.3")]))[0] \
        == ("198.51.100.3", 0)


def test_a_wrong_entry_is_refused_with_examples() -> None:
    assert parse_trusted_proxies(["*"]) is None
    assert [str(n) for n in parse_trusted_proxies(["127.0.0.1", "10.0.0.0/8", "::1"]) or ()] \
        == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
    with pytest.raises(ValidationError, match=r"'proxy\.local' is not an IP address"):
        parse_trusted_proxies(["proxy.local"])


@pytest.fixture
async def proxied(nursery: trio.Nursery, data_dir: Path) -> AsyncIterator[ServerHandle]:
    """A server that trusts 127.0.0.1 as its proxy; 3 failed sign-ins lock an address."""
    from server.app import serve

    config = _server_config(data_dir)
    config = replace(config, forwarded_allow_ips=("127.0.0.1",), api=replace(
        config.api, login_max_failures_per_address=3, login_max_failures_per_user=100,
        login_first_account_lockout_seconds=600))
    handle: ServerHandle = await nursery.start(serve, config)
    await trio.to_thread.run_sync(
        lambda: handle.fleet.create_user_sync("ops@example.com", PASSWORD, "developer"))
    yield handle
    handle.shutdown.set()


def _from(handle: ServerHandle, address: str) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=handle.api_url, transport=transport, timeout=30)


async def _sign_in(client: httpx.AsyncClient, password: str, forwarded_for: str) -> int:
    response = await client.post("/oauth/token", headers={"X-Forwarded-For": forwarded_for},
                                 data={"grant_type": "password", "username": "ops@example.com",
                                       "password": password})
    return response.status_code


async def test_sign_in_limits_count_the_clients_behind_the_proxy(
        proxied: ServerHandle) -> None:
    async with _from(proxied, "127.0.0.1") as proxy, _from(proxied, "127.0.0.5") as direct:
        for _ in range(3):  # one client behind the proxy fails three times...
            assert await _sign_in(proxy, "wrong", "192.0.2.1") == 400
        assert await _sign_in(proxy, PASSWORD, "192.0.2.1") == 429  # ...and is locked out
        # Another client behind the same proxy is not; nor a client lying about its address.
        assert await _sign_in(proxy, PASSWORD, "192.0.2.2") == 200
        assert await _sign_in(proxy, PASSWORD, "192.0.2.2, 192.0.2.1") == 429
        # A client reaching the server directly is counted by its own address, whatever
        # it claims: changing the header does not escape its lockout.
        for n in range(3):
            assert await _sign_in(direct, "wrong", f"198.51.100.{n}") == 400
        assert await _sign_in(direct, PASSWORD, "198.51.100.99") == 429
        assert await _sign_in(proxy, PASSWORD, "198.51.100.99") == 200


async def test_without_trusted_proxies_the_header_is_ignored(nursery: trio.Nursery,
                                                             data_dir: Path) -> None:
    from server.app import serve

    config = _server_config(data_dir)
    config = replace(config, api=replace(config.api, login_max_failures_per_address=3,
                                         login_max_failures_per_user=100))
    handle: ServerHandle = await nursery.start(serve, config)
    await trio.to_thread.run_sync(
        lambda: handle.fleet.create_user_sync("ops@example.com", PASSWORD, "developer"))
    async with _from(handle, "127.0.0.1") as client:
        for n in range(3):
            assert await _sign_in(client, "wrong", f"192.0.2.{n}") == 400
        assert await _sign_in(client, PASSWORD, "192.0.2.50") == 429
    handle.shutdown.set()


async def test_the_console_marks_its_cookies_secure_behind_a_trusted_https_proxy(
        proxied: ServerHandle) -> None:
    """A TLS-terminating proxy named by --forwarded-allow-ips says https in
    X-Forwarded-Proto: the console's cookies are then Secure; a client reaching the server
    directly cannot make the server believe it spoke https."""
    https = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "192.0.2.9"}
    async with _from(proxied, "127.0.0.1") as proxy, _from(proxied, "127.0.0.5") as direct:
        behind = await proxy.get("/console/login", headers=https)
        assert behind.status_code == 200
        cookies = behind.headers.get_list("set-cookie")
        assert cookies and all("; secure" in c.lower() for c in cookies), cookies
        bypass = await direct.get("/console/login", headers=https)
        cookies = bypass.headers.get_list("set-cookie")
        assert cookies and not any("; secure" in c.lower() for c in cookies), cookies
