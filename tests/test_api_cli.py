"""``ota admin token``, ``ota admin user|client`` and ``ota product create``."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import trio
from typer.testing import CliRunner

from server.cli.server_cmd import app

runner = CliRunner()


def test_admin_token_and_product_create_on_the_store(data_dir: Path) -> None:
    result = runner.invoke(app, ["admin", "token", "--data", str(data_dir), "--role", "owner"])
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", token)

    result = runner.invoke(
        app,
        [
            "product",
            "create",
            "Air Monitor",
            "--platform-id",
            "13",
            "--json",
            "--data",
            str(data_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    product = json.loads(result.output)
    assert product["slug"] == "air-monitor" and isinstance(product["id"], int)
    result = runner.invoke(
        app, ["product", "create", "Air Monitor", "--platform-id", "13", "--data", str(data_dir)]
    )
    assert result.output.strip() == f"created product {product['id'] + 1} (slug air-monitor-2)"

    for args, message in (
        (
            ["product", "create", "X", "--platform-id", "4242", "--data", str(data_dir)],
            "unknown platform id 4242",
        ),
        (["admin", "token", "--data", str(data_dir), "--role", "emperor"], "unknown role"),
        (["product", "create", "X", "--platform-id", "13"], "give either --data"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and message in result.output, result.output

    result = runner.invoke(
        app,
        [
            "admin",
            "user",
            "ann@example.com",
            "--password",
            "long enough",
            "--role",
            "viewer",
            "--data",
            str(data_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["admin", "client", "CI", "--data", str(data_dir)])
    assert set(json.loads(result.output)) == {"client_id", "client_secret"}


async def test_product_create_against_a_running_server(api) -> None:
    def invoke(*args: str) -> object:
        return runner.invoke(app, ["product", "create", *args, "--api-url", api.handle.api_url])

    result = await trio.to_thread.run_sync(
        invoke, "Remote", "--platform-id", "32", "--json", "--token", api.token
    )
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    product = json.loads(result.output)  # type: ignore[attr-defined]
    assert product["slug"] == "remote" and product["platform_id"] == 32
    got = await api.client.get(f"/v1/products/{product['id']}")
    assert got.json()["product"]["name"] == "Remote"
    viewer = await api.token_for("viewer")
    result = await trio.to_thread.run_sync(invoke, "Nope", "--platform-id", "32", "--token", viewer)
    assert result.exit_code == 1 and "may not create products" in result.output  # type: ignore[attr-defined]


def test_server_reports_a_busy_port(data_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["server", "--data", str(data_dir), "--api-port", str(port)])
    assert result.exit_code == 1 and "Address already in use" in result.output, result.output
