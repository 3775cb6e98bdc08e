"""Seal + open of one 1024-byte TLS 1.3 application record: our record layer vs OpenSSL.

Run:
  .venv/bin/python -m pytest bench/test_bench_record_tls13.py --benchmark-enable -q \
      -p no:cacheprovider

For every suite, one real mutual-auth handshake (pyOpenSSL, memory BIOs) provides the keys.
"ours": :class:`Tls13RecordLayer` seals on the server side and a second layer with the
client's view of the secrets opens it. "openssl": the same round through pyOpenSSL, as the
same-run baseline (``Connection.send`` on the server, ``bio_read``, ``bio_write`` and
``recv`` on the client). Each call is one record, so the table's mean is µs per record.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import pytest
from OpenSSL import SSL

from otacore.records.tls13 import ApplicationData, Tls13RecordLayer
from tests.tls13_peers import SUITE_NAMES, context, drain, handshake

PAYLOAD = bytes(range(256)) * 4  # 1024 bytes, a firmware chunk


@functools.cache
def _layers(suite: str) -> tuple[Tls13RecordLayer, Tls13RecordLayer]:
    handover = handshake(suite).handover
    server = handover.record_layer()
    client = Tls13RecordLayer(
        handover.suite,
        is_server=False,
        read_secret=handover.write_secret,
        write_secret=handover.read_secret,
        read_seq=handover.write_seq,
    )
    return server, client


def _ours(server: Tls13RecordLayer, client: Tls13RecordLayer) -> Any:
    return client.receive_data(server.send_application_data(PAYLOAD))


def _openssl_pair(suite: str) -> tuple[SSL.Connection, SSL.Connection]:
    server = SSL.Connection(context(server=True, suites=suite), None)
    server.set_accept_state()
    client = SSL.Connection(context(server=False, suites=suite), None)
    client.set_connect_state()
    for _ in range(10):
        for one, other in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                one.do_handshake()
            data = drain(one)
            if data:
                other.bio_write(data)
    client.send(b"x")  # flush the tickets through the client
    server.bio_write(drain(client))
    server.recv(10)
    return server, client


def _openssl(server: SSL.Connection, client: SSL.Connection) -> bytes:
    server.send(PAYLOAD)
    client.bio_write(server.bio_read(65536))
    return client.recv(65536)


@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_bench_seal_open_ours(benchmark: Any, suite: str) -> None:
    benchmark.group = f"tls13-record-1024-{suite}"
    server, client = _layers(suite)
    events = benchmark(_ours, server, client)
    assert events == [ApplicationData(PAYLOAD)]


@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_bench_seal_open_openssl(benchmark: Any, suite: str) -> None:
    benchmark.group = f"tls13-record-1024-{suite}"
    server, client = _openssl_pair(suite)
    assert benchmark(_openssl, server, client) == PAYLOAD
