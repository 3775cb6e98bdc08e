"""The API over HTTPS (issue 17 item 4): ``ota server --api-cert FILE --api-key FILE`` with a
certificate ``ota admin api-cert`` issued from the installation CA.

A real server (hypercorn on trio, on an ephemeral port) serves HTTPS; real clients (httpx,
the stdlib ``ssl`` module, the ``ota`` CLI in its own process) talk to it: trusted through
the installation CA they get answers over TLS 1.2 or 1.3 and HTTP/2 or HTTP/1.1; an
untrusted client refuses the certificate, plain HTTP to the port fails cleanly, and the
server goes on serving after both.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
import trio

from server.api_tls import issue_api_certificate
from server.app import ServerHandle, _hypercorn_config
from server.client import ApiClient, ApiError
from tests.conftest import _server_config
from tests.ota_server_process import REPO


@dataclass
class HttpsApi:
    """A running HTTPS server, its CA file and an owner token."""

    handle: ServerHandle
    ca_file: Path
    token: str

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        """A client that trusts the installation CA (only it)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return httpx.AsyncClient(base_url=self.handle.api_url, verify=context, timeout=30,
                                 headers={"Authorization": f"Bearer {self.token}"},
                                 **kwargs)  # type: ignore[arg-type]

    @property
    def port(self) -> int:
        return int(self.handle.api_url.rsplit(":", 1)[1])


@pytest.fixture
async def https_api(nursery: trio.Nursery, data_dir: Path) -> AsyncIterator[HttpsApi]:
    """The server over HTTPS with a certificate for localhost and 127.0.0.1."""
    from server.app import serve

    issued = await trio.to_thread.run_sync(
        lambda: issue_api_certificate(data_dir, ["localhost", "127.0.0.1"]))
    config = replace(_server_config(data_dir), api_cert=str(issued.cert_path),
                     api_key=str(issued.key_path))
    handle: ServerHandle = await nursery.start(serve, config)
    grant = await trio.to_thread.run_sync(
        lambda: handle.fleet.create_api_token_sync("owner", label="https test"))
    yield HttpsApi(handle, issued.ca_path, grant.access_token)
    handle.shutdown.set()


async def test_the_api_answers_over_https_when_the_installation_ca_is_trusted(
        https_api: HttpsApi) -> None:
    assert https_api.handle.api_url.startswith("https://127.0.0.1:")
    async with https_api.client() as client:
        created = await client.post("/v1/products", json={"name": "Secure", "platform_id": 13})
        assert created.status_code == 201, created.text
        listed = await client.get("/v1/products")
    assert listed.status_code == 200
    assert [p["name"] for p in listed.json()["products"]] == ["Secure"]
    assert listed.http_version == "HTTP/1.1"


async def test_http2_is_negotiated_by_alpn(https_api: HttpsApi) -> None:
    async with https_api.client(http2=True) as client:
        response = await client.get("/v1/access_tokens/current")
    assert response.status_code == 200, response.text
    assert response.http_version == "HTTP/2"


def _handshake(port: int, ca_file: Path, *, maximum: ssl.TLSVersion | None = None,
               server_name: str = "localhost") -> tuple[str | None, str | None]:
    """A raw TLS handshake: (negotiated version, ALPN protocol)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2", "http/1.1"])
    if maximum is not None:
        with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.maximum_version = maximum
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=server_name) as tls:
        return tls.version(), tls.selected_alpn_protocol()


async def test_tls_1_3_by_default_1_2_still_and_nothing_older(https_api: HttpsApi) -> None:
    port, ca = https_api.port, https_api.ca_file
    assert await trio.to_thread.run_sync(_handshake, port, ca) == ("TLSv1.3", "h2")
    assert await trio.to_thread.run_sync(
        lambda: _handshake(port, ca, maximum=ssl.TLSVersion.TLSv1_2)) == ("TLSv1.2", "h2")
    with pytest.raises(ssl.SSLError):
        await trio.to_thread.run_sync(
            lambda: _handshake(port, ca, maximum=ssl.TLSVersion.TLSv1_1))


async def test_the_certificate_names_only_the_hosts_it_was_issued_for(
        https_api: HttpsApi) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await trio.to_thread.run_sync(
            lambda: _handshake(https_api.port, https_api.ca_file, server_name="elsewhere.test"))


async def test_an_untrusted_client_refuses_the_certificate(https_api: HttpsApi) -> None:
    # httpx's default authorities (certifi) do not hold the installation CA.
    async with httpx.AsyncClient(base_url=https_api.handle.api_url, timeout=30) as untrusting:
        with pytest.raises(httpx.ConnectError) as refused:
            await untrusting.get("/v1/products")
    assert isinstance(_root_cause(refused.value), ssl.SSLCertVerificationError)
    assert "unable to get local issuer certificate" in str(_root_cause(refused.value))
    async with https_api.client() as client:  # the server goes on serving
        assert (await client.get("/v1/products")).status_code == 200


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


async def test_plain_http_to_the_https_port_fails_cleanly(https_api: HttpsApi) -> None:
    plain_url = https_api.handle.api_url.replace("https://", "http://")
    async with httpx.AsyncClient(base_url=plain_url, timeout=30) as plain:
        # The server reads no ClientHello and closes: no answer, no plaintext token echo.
        with pytest.raises(httpx.RemoteProtocolError):
            await plain.get("/v1/products", headers={"Authorization": "Bearer x"})
    async with https_api.client() as client:
        assert (await client.get("/v1/products")).status_code == 200


async def test_the_cli_client_trusts_the_ca_file_and_says_what_to_do_without_it(
        https_api: HttpsApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTA_CA_FILE", raising=False)
    url, token, ca = https_api.handle.api_url, https_api.token, https_api.ca_file

    async with https_api.client() as client:
        created = await client.post("/v1/products", json={"name": "Via CLI", "platform_id": 13})
        assert created.status_code == 201, created.text

    def listed(ca_file: Path | None) -> object:
        with ApiClient(url, token, ca_file=ca_file) as client:
            return client.list_groups("via-cli")

    assert await trio.to_thread.run_sync(listed, ca) == {"groups": []}
    with pytest.raises(ApiError, match=r"not trusted.*--ca-file FILE or OTA_CA_FILE"):
        await trio.to_thread.run_sync(listed, None)
    with pytest.raises(ApiError, match=r"CA file .*missing.pem does not exist"):
        await trio.to_thread.run_sync(listed, ca.parent / "missing.pem")

    env = {**os.environ, "OTA_API_URL": url, "OTA_TOKEN": token}
    env.pop("OTA_CA_FILE", None)
    command = [sys.executable, "-m", "server.cli.main"]
    product = ["product", "create", "Via CLI 2", "--platform-id", "13", "--api-url", url,
               "--token", token, "--json"]
    refused = await trio.run_process([*command, *product], cwd=REPO, env=env,
                                     capture_stdout=True, capture_stderr=True, check=False)
    assert refused.returncode == 1
    assert b"not trusted" in refused.stderr and b"Traceback" not in refused.stderr
    made = await trio.run_process([*command, "--ca-file", str(ca), *product], cwd=REPO,
                                  env=env, capture_stdout=True, capture_stderr=True,
                                  check=False)
    assert made.returncode == 0, made.stderr.decode()
    listed_out = await trio.run_process(
        [*command, "group", "list", "--product", "via-cli-2", "--json"], cwd=REPO,
        env={**env, "OTA_CA_FILE": str(ca)}, capture_stdout=True, capture_stderr=True,
        check=False)
    assert listed_out.returncode == 0, listed_out.stderr.decode()


async def test_a_client_that_never_says_hello_is_closed(nursery: trio.Nursery,
                                                        data_dir: Path) -> None:
    """``api.tls_handshake_timeout``: a silent connection is closed, its slot freed."""
    from server.app import serve

    issued = await trio.to_thread.run_sync(
        lambda: issue_api_certificate(data_dir, ["localhost"]))
    config = replace(_server_config(data_dir), api_cert=str(issued.cert_path),
                     api_key=str(issued.key_path), tls_handshake_timeout=0.2)
    assert _hypercorn_config(config).ssl_handshake_timeout == 0.2  # what hypercorn enforces
    handle: ServerHandle = await nursery.start(serve, config)
    port = int(handle.api_url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(30):  # closed by the server: end of stream, nothing sent
        assert await stream.receive_some() == b""
    await stream.aclose()
    handle.shutdown.set()


async def test_ota_server_serves_https_from_its_options(tmp_path: Path) -> None:
    """The command line's --api-cert/--api-key reach hypercorn (the real ``ota server``)."""
    from tests.ota_server_process import start_ota_server

    data = tmp_path / "data"
    issued = await trio.to_thread.run_sync(
        lambda: issue_api_certificate(data, ["localhost", "127.0.0.1"]))
    server = await trio.to_thread.run_sync(lambda: start_ota_server(
        data, tmp_path / "server.log", "--api-cert", str(issued.cert_path), "--api-key",
        str(issued.key_path)))
    try:
        assert server.api_url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(issued.ca_path))
        async with httpx.AsyncClient(base_url=server.api_url, verify=context,
                                     timeout=30) as client:
            answer = await client.get("/v1/products")
        assert answer.status_code == 401  # over TLS, and asks for a token
    finally:
        assert server.stop() == 0, server.tail()
    assert "API certificate" in server.tail() and "valid until" in server.tail()
