"""DTLS 1.2 records: our layer's seal and open of 1024-byte records against OpenSSL's own.

Run: .venv/bin/python -m pytest bench/test_bench_record_dtls12.py --benchmark-enable -q -s \
        -p no:cacheprovider

Per suite (group "dtls12-<suite>"), in the same run:
- ``ours-seal``: ``DtlsRecordLayer.seal`` of one 1024-byte record;
- ``ours-open``: ``open_datagram`` of one record (a fresh one each round, sealed untimed);
- ``openssl-seal``: pyOpenSSL ``send`` + ``bio_read`` of the same record;
- ``openssl-open``: pyOpenSSL ``bio_write`` + ``recv`` (a fresh record each round).
Both sides come from a real in-process mutual-auth handshake (tests/test_record_dtls12.py).

``test_record_layer_memory`` (runs with the benchmarks disabled too) prints the size of a
layer: ``sys.getsizeof`` of it and its slots, ``tracemalloc`` over 1,000 restored layers, and
RSS over 10,000 layers in a fresh process, with the AEAD objects released and live.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from otacore.records.dtls12_handover import layer_from_connection
from tests.test_record_dtls12 import SUITE_NAMES, Peer, handshake, make_dtls_pki, make_peers

PAYLOAD = bytes(range(256)) * 4  # 1024 bytes
ROUNDS = 5000


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Any]:
    return make_dtls_pki(tmp_path_factory.mktemp("bench-dtls12"))


def pair(pki: tuple[object, Any], suite_name: str) -> tuple[Peer, Peer]:
    server, client = make_peers(pki, suite_name)
    handshake(server, client)
    return server, client


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
def test_ours_seal(benchmark: Any, pki: tuple[object, Any], suite_name: str) -> None:
    server, client = pair(pki, suite_name)
    layer = layer_from_connection(server.conn, server.tracker, is_server=True)
    benchmark.group = f"dtls12-{suite_name}"
    record = benchmark(layer.seal, PAYLOAD)
    client.deliver(record)
    assert client.conn.recv(2048) == PAYLOAD


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
def test_ours_open(benchmark: Any, pki: tuple[object, Any], suite_name: str) -> None:
    server, client = pair(pki, suite_name)
    layer = layer_from_connection(server.conn, server.tracker, is_server=True)
    device = layer_from_connection(client.conn, client.tracker, is_server=False)
    benchmark.group = f"dtls12-{suite_name}"
    events = benchmark.pedantic(
        layer.open_datagram, setup=lambda: ((device.seal(PAYLOAD),), {}), rounds=ROUNDS
    )
    assert events[0].data == PAYLOAD


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
def test_openssl_seal(benchmark: Any, pki: tuple[object, Any], suite_name: str) -> None:
    _server, client = pair(pki, suite_name)
    conn = client.conn

    def seal() -> bytes:
        conn.send(PAYLOAD)
        return conn.bio_read(4096)

    benchmark.group = f"dtls12-{suite_name}"
    assert len(benchmark(seal)) > len(PAYLOAD)


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
def test_openssl_open(benchmark: Any, pki: tuple[object, Any], suite_name: str) -> None:
    server, client = pair(pki, suite_name)

    def sealed() -> tuple[tuple[bytes], dict[str, Any]]:
        client.conn.send(PAYLOAD)
        return (client.conn.bio_read(4096),), {}

    def open_record(record: bytes) -> bytes:
        server.conn.bio_write(record)
        return server.conn.recv(2048)

    benchmark.group = f"dtls12-{suite_name}"
    assert benchmark.pedantic(open_record, setup=sealed, rounds=ROUNDS) == PAYLOAD


_MEASURE = r"""
import gc, json, sys, tracemalloc
from pathlib import Path
sys.path.insert(0, {root!r})
from otacore.records.dtls12 import DtlsRecordLayer
saved = bytes.fromhex({saved!r})

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

one = DtlsRecordLayer.from_bytes(saved)
shallow = sys.getsizeof(one) + sum(
    sys.getsizeof(getattr(one, name)) for name in DtlsRecordLayer.__slots__
    if getattr(one, name) is not None and not isinstance(getattr(one, name), (bool, int))
)
gc.collect()
tracemalloc.start()
kept = [DtlsRecordLayer.from_bytes(saved) for _ in range(1000)]
traced = tracemalloc.get_traced_memory()[0] / 1000
tracemalloc.stop()
del kept
gc.collect()
n = 10000
before = rss()
layers = [DtlsRecordLayer.from_bytes(saved) for _ in range(n)]
idle = (rss() - before) / n
for layer in layers:
    layer.seal(b"x")  # builds the seal AEAD; the open one as the first record would:
    layer._open_aead = layer.suite.make_aead(layer._open_key())
live = (rss() - before) / n
print(json.dumps(dict(shallow=shallow, traced=traced, rss_idle=idle, rss_live=live,
                      saved=len(saved))))
"""


def test_record_layer_memory(pki: tuple[object, Any]) -> None:
    """Bytes per idle session, per suite, each measured in a fresh process."""
    root = str(Path(__file__).resolve().parent.parent)
    print()
    for suite_name in SUITE_NAMES:
        server, client = pair(pki, suite_name)
        layer = layer_from_connection(server.conn, server.tracker, is_server=True)
        client.conn.send(b"first")  # proof the client has our flight: it is dropped
        layer.open_datagram(client.drain())
        code = _MEASURE.format(root=root, saved=layer.to_bytes().hex())
        out = subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout
        figures = json.loads(out)
        print(
            f"{suite_name:32} saved {figures['saved']:4d} B | getsizeof {figures['shallow']:5.0f} B"
            f" | tracemalloc {figures['traced']:5.0f} B | RSS idle {figures['rss_idle']:6.0f} B"
            f" | RSS with AEADs {figures['rss_live']:6.0f} B"
        )
        assert figures["traced"] < 1024  # the Python side of an idle session
