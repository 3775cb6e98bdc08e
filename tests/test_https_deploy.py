"""The deployment files in ``docs/deploy`` (issue 17 item 4) are what they claim to be.

- ``ota.toml`` loads, and ``ota server --config ota.toml --check`` accepts it (its paths
  pointed at a real data directory and certificate);
- ``otacloud.service`` passes ``systemd-analyze verify`` without a warning (its ``ota``
  pointed at this environment's);
- ``nginx-otacloud.conf`` passes ``nginx -t``, and a real nginx with it terminates HTTPS in
  front of a real server, which counts failed sign-ins under the client's address (from the
  proxy's X-Forwarded-For), not the proxy's.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio

from server.api_tls import issue_api_certificate
from server.app import ServerHandle
from server.config_file import load_server_config
from tests.conftest import _server_config
from tests.ota_server_process import REPO

DEPLOY = REPO / "docs" / "deploy"
OTA = Path(sys.executable).parent / "ota"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def test_the_example_configuration_loads_with_https_and_devices_on_every_address() -> None:
    config = load_server_config(DEPLOY / "ota.toml", {})
    assert config.data_dir == Path("/var/lib/otacloud")
    assert (config.host, config.api_port) == ("0.0.0.0", 8443)
    assert (config.api_cert, config.api_key) == ("/var/lib/otacloud/pki/api.pem",
                                                 "/var/lib/otacloud/pki/api.key")
    assert config.https and config.forwarded_allow_ips == ()
    assert (config.device_host, config.device_port) == ("0.0.0.0", 5684)
    assert config.device_tuning.server_dns_names == ("ota.example.com",)
    assert (config.log_level, config.log_format) == ("info", "text")


def test_ota_server_check_accepts_the_example(tmp_path: Path) -> None:
    data = tmp_path / "data"
    issued = issue_api_certificate(data, ["localhost"])
    result = subprocess.run(
        [sys.executable, "-m", "server.cli.main", "server", "--config",
         str(DEPLOY / "ota.toml"), "--data", str(data), "--api-cert", str(issued.cert_path),
         "--api-key", str(issued.key_path), "--check"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "configuration OK: API on https://0.0.0.0:8443" in result.stdout


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None and OTA.exists()
    text = (DEPLOY / "otacloud.service").read_text()
    assert "ExecStart=/opt/otacloud/bin/ota server --config /etc/otacloud/ota.toml\n" in text
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=otacloud",
                      "User=otacloud", "ProtectHome=yes", "PrivateTmp=yes",
                      "CapabilityBoundingSet=\n"):
        assert hardening in text
    unit = tmp_path / "otacloud.service"
    unit.write_text(text.replace("/opt/otacloud/bin/ota", str(OTA)))
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # unknown keys and bad values only warn


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _nginx_conf(tmp_path: Path, cert: Path, key: Path, api_port: int, https_port: int) -> Path:
    """The example as a whole nginx configuration of its own (loopback ports, test cert)."""
    site = (DEPLOY / "nginx-otacloud.conf").read_text()
    site = site.replace("/etc/letsencrypt/live/ota.example.com/fullchain.pem", str(cert))
    site = site.replace("/etc/letsencrypt/live/ota.example.com/privkey.pem", str(key))
    site = site.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{api_port};")
    site = re.sub(r"listen \[::\]:\d+[^;]*;\n", "", site)
    site = site.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{_free_port()};")
    temp = tmp_path / "nginx-temp"
    temp.mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process off;\npid {tmp_path / 'nginx.pid'};\n"
        f"error_log {tmp_path / 'nginx-error.log'} warn;\n"
        "events { worker_connections 64; }\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {temp}/body;\n"
        f"  proxy_temp_path {temp}/proxy;\n  fastcgi_temp_path {temp}/fastcgi;\n"
        f"  uwsgi_temp_path {temp}/uwsgi;\n  scgi_temp_path {temp}/scgi;\n"
        f"{site}\n}}\n")
    return conf


@pytest.fixture
def nginx_files(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(data dir, nginx's certificate, its key): a certificate for localhost."""
    data = tmp_path / "data"
    issued = issue_api_certificate(data, ["localhost", "127.0.0.1"])
    # nginx's workers run as another user when started by root: give them copies.
    cert, key = tmp_path / "nginx.pem", tmp_path / "nginx.key"
    shutil.copyfile(issued.cert_path, cert)
    shutil.copyfile(issued.key_path, key)
    os.chmod(key, 0o644)  # a throwaway test key
    yield data, cert, key


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
async def test_nginx_terminates_https_and_the_server_counts_the_real_client(
        nursery: trio.Nursery, tmp_path: Path, nginx_files: tuple[Path, Path, Path]) -> None:
    from server.app import serve

    assert NGINX is not None
    data, cert, key = nginx_files
    config = _server_config(data)
    config = replace(config, forwarded_allow_ips=("127.0.0.1",),
                     api=replace(config.api, login_max_failures_per_address=2))
    handle: ServerHandle = await nursery.start(serve, config)
    token = (await trio.to_thread.run_sync(
        lambda: handle.fleet.create_api_token_sync("owner"))).access_token
    api_port = int(handle.api_url.rsplit(":", 1)[1])
    https_port = _free_port()
    conf = _nginx_conf(tmp_path, cert, key, api_port, https_port)
    checked = await trio.run_process([NGINX, "-t", "-q", "-c", str(conf), "-e", "stderr"],
                                     capture_stdout=True, capture_stderr=True, check=False)
    assert checked.returncode == 0, checked.stderr.decode()

    proxy = await trio.lowlevel.open_process([NGINX, "-c", str(conf), "-e", "stderr"])
    try:
        context = ssl.create_default_context(cafile=str(data / "pki" / "ca.pem"))
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.7", verify=context)
        async with httpx.AsyncClient(base_url=f"https://localhost:{https_port}",
                                     transport=transport, timeout=30) as client:
            with trio.fail_after(30):  # until nginx listens
                while True:
                    try:
                        answer = await client.get("/v1/sign-in-limits",
                                                  headers={"Authorization": f"Bearer {token}"})
                        break
                    except httpx.ConnectError:
                        await trio.sleep(0.05)
            assert answer.status_code == 200, answer.text
            for _ in range(2):
                failed = await client.post("/oauth/token", data={
                    "grant_type": "password", "username": "nobody@example.com",
                    "password": "wrong"}, headers={"X-Forwarded-For": "198.51.100.1"})
                assert failed.status_code == 400, failed.text
            limits = (await client.get("/v1/sign-in-limits",
                                       headers={"Authorization": f"Bearer {token}"})).json()
    finally:
        proxy.terminate()
        await proxy.wait()
        handle.shutdown.set()
    addresses = {row["name"]: row for row in limits["limits"] if row["kind"] == "address"}
    # The client's own address (nginx's $remote_addr), neither nginx's nor the one it forged.
    assert set(addresses) == {"127.0.0.7"}, limits
    assert addresses["127.0.0.7"]["locked"] is True
