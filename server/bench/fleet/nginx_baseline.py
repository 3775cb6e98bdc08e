"""The nginx baseline: Debian's nginx serving the same firmware file over HTTPS (TLS 1.3).

Everything nginx needs lives in one directory of the benchmark's output: a throwaway
self-signed certificate, ``nginx.conf``, the document root, the error log, the pid file and
the temp paths, so it runs as an ordinary foreground child (``-p DIR -c nginx.conf -g
'daemon off; pid ...;'``) next to a system nginx, if any, without touching it.
:func:`fetch_all` is the client side, run by the load generators.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.bench.fleet import BenchError, error_text
from server.bench.fleet.procs import free_port, log_tail, running_process

#: Bytes asked of a stream per read.
READ_SIZE = 65536
#: The file's URL path on the baseline server.
FIRMWARE_PATH = "/firmware.bin"
#: nginx's own limit is per worker; the process limit here is 20,000 descriptors.
MAX_WORKER_CONNECTIONS = 19_000


class NginxUnavailableError(BenchError):
    """nginx is not installed or would not start (the baseline is skipped)."""


@dataclass(frozen=True)
class NginxServer:
    """A running baseline server."""

    address: tuple[str, int]
    path: str
    pid: int
    workers: int


def find_nginx() -> str | None:
    """The nginx binary (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def write_self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for localhost/127.0.0.1 and its key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())  # the curve the device server uses
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def nginx_config(directory: Path, port: int, *, workers: int, connections: int) -> str:
    """nginx.conf for the baseline: one TLS 1.3 listener serving ``directory/www``."""
    temp = directory / "temp"
    # As root the workers would switch to "nobody", who cannot read a private output
    # directory; the master keeps root anyway, so the workers may as well.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes {workers};
worker_rlimit_nofile 20000;
events {{
    worker_connections {min(MAX_WORKER_CONNECTIONS, connections + 64)};
    multi_accept on;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 0;
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl backlog={min(4096, max(511, connections))};
        ssl_certificate {directory / "cert.pem"};
        ssl_certificate_key {directory / "key.pem"};
        ssl_protocols TLSv1.3;
        ssl_session_tickets off;
        root {directory / "www"};
        location / {{ }}
    }}
}}
"""


async def _wait_listening(process: trio.Process, port: int, log: Path, timeout: float) -> None:
    with trio.move_on_after(timeout):
        while process.poll() is None:
            try:
                probe = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await probe.aclose()
            return
    raise NginxUnavailableError(
        f"nginx did not start listening on port {port}: {log_tail(log, 5) or 'no log'}"
    )


@asynccontextmanager
async def running_nginx(
    directory: Path, firmware: Path, *, workers: int, connections: int
) -> AsyncIterator[NginxServer]:
    """Run nginx serving ``firmware`` at :data:`FIRMWARE_PATH` until the block ends.

    Raises :class:`NginxUnavailableError` when nginx is missing or does not come up.
    """
    binary = find_nginx()
    if binary is None:
        raise NginxUnavailableError("nginx is not installed (Debian: apt-get install -y nginx)")
    directory.mkdir(parents=True, exist_ok=True)
    for sub in ("www", "temp"):
        (directory / sub).mkdir(exist_ok=True)
    shutil.copyfile(firmware, directory / "www" / FIRMWARE_PATH.lstrip("/"))
    write_self_signed(directory)
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(nginx_config(directory, port, workers=workers, connections=connections))
    log = directory / "nginx-error.log"
    argv = [
        binary,
        "-p",
        f"{directory}/",
        "-c",
        str(conf),
        "-e",
        str(log),
        "-g",
        f"daemon off; pid {directory / 'nginx.pid'};",
    ]
    async with running_process(
        argv, log_path=directory / "nginx-stderr.log", stop_signal=signal.SIGTERM, grace=5.0
    ) as process:
        await _wait_listening(process, port, log, timeout=10.0)
        yield NginxServer(("127.0.0.1", port), FIRMWARE_PATH, process.pid, workers)


async def fetch_all(
    address: tuple[str, int],
    path: str,
    *,
    clients: int,
    concurrency: int,
    expect: int,
    sources: list[str],
    timeout: float,
) -> dict[str, Any]:
    """``clients`` HTTPS/1.1 GETs of ``path`` (one fresh TLS 1.3 connection each, no
    keep-alive), ``concurrency`` at a time; counts complete bodies of ``expect`` bytes."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a throwaway self-signed certificate
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    request = (f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").encode()
    slots = trio.Semaphore(concurrency)
    errors: Counter[str] = Counter()
    starts: list[float] = []
    ends: list[float] = []
    received = 0

    async def one(position: int) -> None:
        nonlocal received
        async with slots:
            starts.append(time.monotonic())
            try:
                with trio.fail_after(timeout):
                    tcp = await trio.open_tcp_stream(
                        *address, local_address=sources[position % len(sources)]
                    )
                    async with trio.SSLStream(tcp, context, server_hostname="localhost") as tls:
                        await tls.send_all(request)
                        response = bytearray()
                        while chunk := await tls.receive_some(READ_SIZE):
                            response += chunk
            except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                errors[error_text(exc)] += 1
                return
            head, _, body = bytes(response).partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200") or len(body) != expect:
                errors[f"bad response: {head[:40]!r}, {len(body)} bytes"] += 1
                return
            received += len(body)
            ends.append(time.monotonic())

    async with trio.open_nursery() as nursery:
        for position in range(clients):
            nursery.start_soon(one, position)
    return {
        "clients": clients,
        "ok": len(ends),
        "failed": sum(errors.values()),
        "errors": dict(errors.most_common(5)),
        "bytes": received,
        "t_first": min(starts, default=None),
        "t_last": max(ends, default=None),
    }
