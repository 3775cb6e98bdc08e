"""What OpenSSL itself costs per device connection, without trio, sockets or our code.

    .venv/bin/python bench/sessions/openssl_cost.py [--connections 2000]

Client and server objects talk through memory BIOs in this one process. For each case it
reports the server side only:

* memory: malloc'd bytes (glibc mallinfo2) held per idle server connection after one
  request/answer, kept alive ``--connections`` at a time (Python's share is ~0.5 KiB);
* CPU: process time spent inside the server's handshake calls, full and resumed.

Cases: TLS 1.3 through stdlib ``ssl`` (the OpenSSL Python was built with), with and without
client certificates, and DTLS 1.2 through pyOpenSSL (the OpenSSL bundled with cryptography),
configured as server/transport uses them. This is the floor under the numbers of
session_memory.py and handshake_rate.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import ssl
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench_common import DEFAULT_WORKDIR, fleet
from bench_server import malloc_in_use
from OpenSSL import SSL

from server.identity import load_pki
from server.transport.dtls import make_dtls_server_context
from server.transport.tls import make_tls_client_context, make_tls_server_context


def _tls_pair(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    session: ssl.SSLSession | None,
    keep_session: bool = False,
) -> tuple[float, ssl.SSLObject, ssl.SSLSession | None]:
    """One TLS 1.3 connection in memory; returns server CPU seconds, the server object and,
    if ``keep_session``, the client's session (with its ticket) for resumption. (Taking
    the session makes the client side hold memory, which would count against the server.)"""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    spent = 0.0
    for _ in range(10):
        with contextlib.suppress(ssl.SSLWantReadError):
            client.do_handshake()
        s_in.write(c_out.read())
        started = time.process_time()
        try:
            server.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        spent += time.process_time() - started
        c_in.write(s_out.read())
        if done:
            break
    started = time.process_time()
    server.write(b"answer")  # sends the session ticket too
    spent += time.process_time() - started
    c_in.write(s_out.read())
    client.read()
    client.write(b"request")
    s_in.write(c_out.read())
    server.read()
    return spent, server, client.session if keep_session else None


def _dtls_pair(server_ctx: SSL.Context, client_ctx: SSL.Context) -> tuple[float, SSL.Connection]:
    server, client = SSL.Connection(server_ctx), SSL.Connection(client_ctx)
    server.set_accept_state()
    client.set_connect_state()
    for connection in (server, client):
        connection.set_ciphertext_mtu(1400)

    def pump(source: SSL.Connection, sink: SSL.Connection) -> None:
        while True:
            try:
                sink.bio_write(source.bio_read(65536))
            except SSL.WantReadError:
                return

    spent = 0.0
    for _ in range(12):
        with contextlib.suppress(SSL.WantReadError):
            client.do_handshake()
        pump(client, server)
        started = time.process_time()
        try:
            server.do_handshake()
            done = True
        except SSL.WantReadError:
            done = False
        spent += time.process_time() - started
        pump(server, client)
        if done:
            break
    client.write(b"request")
    pump(client, server)
    server.read(2048)
    server.write(b"answer")
    pump(server, client)
    client.read(2048)
    return spent, server


def _measure(make: Callable[[], tuple[Any, ...]], count: int) -> dict[str, float]:
    make()
    make()
    gc.collect()
    held = []
    before = malloc_in_use()
    cpu = 0.0
    for _ in range(count):
        spent, connection, *_ = make()
        cpu += spent
        held.append(connection)
    gc.collect()
    return {
        "server_kib_per_connection": round((malloc_in_use() - before) / count / 1024, 1),
        "server_handshake_ms": round(cpu / count * 1e3, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    args = parser.parse_args()
    ca_dir, devices, _ = fleet(Path(args.workdir), 1)
    device = devices[0]
    pki = load_pki(ca_dir)
    client_tls = make_tls_client_context(device.ca_path, device.cert_path, device.key_path)

    for mutual in (True, False):
        server_tls = make_tls_server_context(pki)
        if not mutual:
            server_tls.verify_mode = ssl.CERT_NONE
        full = _measure(partial(_tls_pair, server_tls, client_tls, None), args.connections)
        _, _, saved = _tls_pair(server_tls, client_tls, None, keep_session=True)
        resumed = _measure(
            partial(_tls_pair, server_tls, client_tls, saved), min(args.connections, 500)
        )
        _, probe, _ = _tls_pair(server_tls, client_tls, saved)
        assert probe.session_reused
        print(
            json.dumps(
                {
                    "case": f"TLS 1.3 {'mutual' if mutual else 'server-auth only'}",
                    "openssl": ssl.OPENSSL_VERSION,
                    **full,
                    "resumed_handshake_ms": resumed["server_handshake_ms"],
                }
            ),
            flush=True,
        )

    server_dtls = make_dtls_server_context(pki)
    server_dtls.set_options(SSL.OP_NO_QUERY_MTU)  # trio sets this in serve(); no MTU to query

    def dtls_once() -> tuple[float, Any]:
        client = device.dtls_context()
        client.set_options(SSL.OP_NO_QUERY_MTU)
        return _dtls_pair(server_dtls, client)

    print(
        json.dumps(
            {
                "case": "DTLS 1.2 mutual",
                "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
                **_measure(dtls_once, args.connections),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
