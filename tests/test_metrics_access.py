"""``/metrics``: the exposition parses with prometheus-client's own parser, who may scrape
(401 without a token, 403 for a role that may not, the scrape token of the token file, or
anyone with ``metrics_public``), the token file's rotation and errors, and the count of API
requests by route name and status (never a raw path)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from otacore.errors import OtaError
from server.api import ApiSettings
from server.app import ServerConfig, ServerHandle, serve
from server.metrics.endpoint import ScrapeTokenError
from tests.conftest import Api

SCRAPE_TOKEN = "0123456789abcdef0123456789abcdef"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (sample name, sorted labels)."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in found, f"sample {key} appears twice"
            found[key] = sample.value
    return found


def config(data_dir: Path, **api: object) -> ServerConfig:
    return ServerConfig(data_dir=data_dir, api_port=0, device_port=None, store_threads=2,
                        graceful_timeout=0.5, api=ApiSettings(**api))  # type: ignore[arg-type]


async def test_owner_scrapes_a_parsable_exposition(api: Api) -> None:
    response = await api.client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    expected = {
        "ota_sessions": "gauge", "ota_handshakes": "counter", "ota_bytes_sent": "counter",
        "ota_transfers_active": "gauge", "ota_retransmits": "counter",
        "ota_updates": "counter", "ota_store_commit_seconds": "histogram",
        "ota_http_requests": "counter", "ota_device_refusals": "counter",
        "ota_bytes_retransmitted": "counter", "ota_worker_exits": "counter",
    }
    assert {name: families[name].type for name in expected} == expected
    found = samples(response.text)
    # Every label value of the bounded sets is there from the start (rate() needs a zero).
    for kind in ("full", "delta", "compressed"):
        assert ("ota_bytes_sent_total", (("kind", kind),)) in found
    for result in ("succeeded", "download_failed", "image_refused", "rolled_back"):
        assert ("ota_updates_total", (("result", result),)) in found
    assert not any(name.endswith("_created") for name, _ in found)
    # The server wrote to its store at start (the token above): commits were timed.
    assert found[("ota_store_commit_seconds_count", ())] >= 1
    # OpenMetrics for a scraper that asks for it.
    response = await api.client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


async def test_who_may_scrape(api: Api) -> None:
    url = f"{api.handle.api_url}/metrics"
    async with httpx.AsyncClient() as anonymous:
        response = await anonymous.get(url)
        assert response.status_code == 401
        assert "needs a token" in response.json()["error"]
        assert response.headers["www-authenticate"].startswith("Bearer")
        response = await anonymous.get(url, headers={"Authorization": "Bearer nonsense"})
        assert response.status_code == 401
    for role, status in (("administrator", 200), ("developer", 403), ("viewer", 403)):
        client = await api.client_for(role)
        async with client:
            response = await client.get("/metrics")
        assert response.status_code == status, (role, response.text)
        if status == 403:
            assert "read the metrics" in response.json()["error"]


def _write_private(path: Path, text: str) -> None:
    """Write a token file readable by its owner only, as `(umask 077; openssl rand ...)`."""
    path.write_text(text)
    path.chmod(0o600)


async def test_the_scrape_token_file(nursery: trio.Nursery, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    token_file = tmp_path / "scrape.token"
    _write_private(token_file, SCRAPE_TOKEN + "\n")
    handle: ServerHandle = await nursery.start(
        serve, config(tmp_path / "data", metrics_token_file=str(token_file)))
    async with httpx.AsyncClient(base_url=handle.api_url) as client:
        response = await client.get("/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"})
        assert response.status_code == 200
        assert "ota_sessions" in response.text
        assert (await client.get("/metrics", headers={
            "Authorization": f"Bearer {SCRAPE_TOKEN[:-1]}x"})).status_code == 401
        # Rotated: the new token works at once, the old one no longer.
        rotated = "f" * 40
        _write_private(token_file, rotated)
        os.utime(token_file, ns=(1, 1))  # a new stamp even within the clock's resolution
        assert (await client.get("/metrics", headers={
            "Authorization": f"Bearer {rotated}"})).status_code == 200
        assert (await client.get("/metrics", headers={
            "Authorization": f"Bearer {SCRAPE_TOKEN}"})).status_code == 401
        # An owner's token still works beside it.
        owner = handle.fleet.create_api_token_sync("owner").access_token
        assert (await client.get("/metrics", headers={
            "Authorization": f"Bearer {owner}"})).status_code == 200
        # The scrape token is good for nothing else.
        assert (await client.get("/v1/products", headers={
            "Authorization": f"Bearer {rotated}"})).status_code == 401
        # A token file gone while the server runs: its token no longer scrapes (logged),
        # an owner's still does; written again, it works again.
        token_file.unlink()
        for _ in range(2):
            assert (await client.get("/metrics", headers={
                "Authorization": f"Bearer {rotated}"})).status_code == 401
        assert (await client.get("/metrics", headers={
            "Authorization": f"Bearer {owner}"})).status_code == 200
        refusals = [r.getMessage() for r in caplog.records
                    if "scrapes with the token file are refused" in r.getMessage()]
        assert len(refusals) == 1 and str(token_file) in refusals[0]  # once per problem
        _write_private(token_file, rotated)
        assert (await client.get("/metrics", headers={
            "Authorization": f"Bearer {rotated}"})).status_code == 200
    handle.shutdown.set()


@pytest.mark.parametrize("content, reason", [
    (None, "No such file"),
    ("short", "at least 16 characters"),
    ("two\nlines-of-a-long-token", "one line"),
    ("", "at least 16 characters"),
    ("world-readable-token-of-enough-length", "readable by every user"),
])
async def test_a_token_file_it_cannot_use_stops_the_start(
        tmp_path: Path, content: str | None, reason: str) -> None:
    token_file = tmp_path / "scrape.token"
    if content is not None:
        _write_private(token_file, content)
        if "world" in content:
            token_file.chmod(0o644)  # what a plain `openssl rand -hex 32 > FILE` leaves
    with pytest.raises((OtaError, BaseExceptionGroup)) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, config(tmp_path / "data",
                                              metrics_token_file=str(token_file)))
    error = caught.value
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, ScrapeTokenError)
    assert reason in str(error) and str(token_file) in str(error)


async def test_a_public_endpoint_needs_no_token(nursery: trio.Nursery, tmp_path: Path) -> None:
    handle: ServerHandle = await nursery.start(serve, config(tmp_path / "data",
                                                             metrics_public=True))
    async with httpx.AsyncClient(base_url=handle.api_url) as client:
        response = await client.get("/metrics")
        assert response.status_code == 200
        samples(response.text)
        # Public metrics open nothing else.
        assert (await client.get("/v1/products")).status_code == 401
    handle.shutdown.set()


async def test_requests_are_counted_by_route_name_and_status(api: Api) -> None:
    def count(text: str, route: str, status: str) -> float:
        return samples(text).get(
            ("ota_http_requests_total", (("route", route), ("status", status))), 0.0)

    before = (await api.client.get("/metrics")).text
    product = await api.create_product()
    for _ in range(3):
        assert (await api.client.get(f"/v1/products/{product['id']}/devices")).status_code == 200
    assert (await api.client.get("/v1/products/999999/devices")).status_code == 404
    assert (await api.client.get("/no/such/path/abc123")).status_code == 404
    assert (await api.client.delete("/v1/products")).status_code == 405
    after = (await api.client.get("/metrics")).text
    assert count(after, "create_product", "201") - count(before, "create_product", "201") == 1
    assert count(after, "list_devices", "200") - count(before, "list_devices", "200") == 3
    assert count(after, "list_devices", "404") - count(before, "list_devices", "404") == 1
    assert count(after, "unmatched", "404") - count(before, "unmatched", "404") == 1
    assert count(after, "unmatched", "405") - count(before, "unmatched", "405") == 1
    assert count(after, "metrics", "200") - count(before, "metrics", "200") == 1
    # No raw path or id becomes a label value.
    routes = {dict(labels).get("route") for name, labels in samples(after)
              if name == "ota_http_requests_total"}
    assert not any("/" in str(route) or "abc123" in str(route) for route in routes), routes
    assert str(product["id"]) not in {str(route) for route in routes}



def test_the_command_line_and_the_config_file_set_who_may_scrape(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from server.cli.server_cmd import app
    from server.config_file import ConfigError, load_server_config

    token_file = tmp_path / "scrape.token"
    result = CliRunner().invoke(app, ["server", "--data", str(tmp_path / "data"),
                                      "--metrics-public", "--metrics-token-file",
                                      str(token_file), "--print-config"])
    assert result.exit_code == 0, result.output
    section = result.output.split("[metrics]", 1)[1].split("\n[", 1)[0]
    assert "\npublic = true\n" in section
    assert f'\ntoken_file = "{token_file}"\n' in section
    config_file = tmp_path / "ota.toml"
    config_file.write_text(f'[server]\ndata_dir = "{tmp_path}"\n'
                           f'[metrics]\npublic = false\ntoken_file = "{token_file}"\n')
    config = load_server_config(config_file, {})
    assert not config.api.metrics_public
    assert config.api.metrics_token_file == str(token_file)
    # The command line wins over the file.
    result = CliRunner().invoke(app, ["server", "--config", str(config_file),
                                      "--metrics-public", "--print-config"])
    assert "\npublic = true\n" in result.output.split("[metrics]", 1)[1]
    config_file.write_text('[metrics]\npublic = "yes"\n')
    with pytest.raises(ConfigError, match=r"metrics\.public"):
        load_server_config(config_file, {}, data_dir_required=False)
