"""Frame + seal of a 16-chunk window: the chunk framing kernel vs its twin vs the per-chunk path.

Run: .venv/bin/python -m pytest bench/test_bench_chunk_framing.py --benchmark-enable -q -s \
        -p no:cacheprovider

Each round turns the same 16 ``Chunk`` messages of a real ``TransferSender`` window (512- or
1024-byte chunks) into what goes on the wire, sealed with AES-128-GCM, in one session
established with an OpenSSL peer (DTLS 1.2: ECDHE-ECDSA-AES128-GCM-SHA256, TLS 1.3:
TLS_AES_128_GCM_SHA256). Per group ("<dtls|tls>-window16-<chunk size>"), in the same run:

- ``kernel``: ``otacore.transfer.framing.frame_chunks(..., sealer=layer)`` on the compiled
  kernel: one framing call, one batch seal (the layer reserves the sequence numbers); over
  UDP the 16 message ids come from the link's ``ReliableLayer.next_message_id`` first;
- ``twin``: the same call on the pure-Python twin;
- ``per-chunk-ours``: today's path, each chunk alone: ``transfer_request`` + the link's
  ``notify`` (message id, ``encode_udp``/``encode_tcp``), then our record layer's ``seal``
  per datagram (DTLS) or ``send_application_data`` of the joined stream (TLS, as the TCP
  shell writes it);
- ``per-chunk-openssl``: the same framing, sealed by OpenSSL (pyOpenSSL ``send`` +
  ``bio_read``), which is what the server runs today.

The printed summary gives microseconds per chunk (median / 16). Every variant's output is
checked to open at the OpenSSL peer once, so the benchmark measures working code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL

from otacore import chunk_framing
from otacore._select import load_native, load_twin
from otacore.coap_reliability import ReliableLayer
from otacore.protocol.link import TcpLink, UdpLink
from otacore.protocol.ota_wire import transfer_request
from otacore.records import dtls12, tls13
from otacore.records.dtls12 import DtlsRecordLayer
from otacore.records.openssl_memory import drain_output
from otacore.transfer import (
    Chunk,
    PreparedFile,
    RetransmitPolicy,
    StartReply,
    TransferSender,
    TransferStatus,
)
from otacore.transfer.framing import frame_chunks
from tests import tls13_peers
from tests.test_record_dtls12 import client_reads, established, make_dtls_pki

WINDOW = 16
#: DTLS rounds each start from a fresh message layer (untimed): its map of recent NON
#: message ids is not what is measured here.
ROUNDS = 5000
DTLS_SUITE = "ECDHE-ECDSA-AES128-GCM-SHA256"
TLS_SUITE = "TLS_AES_128_GCM_SHA256"
NATIVE = load_native("chunk_framing")
TWIN = load_twin("chunk_framing")
KERNELS = [pytest.param(TWIN, id="twin")] + (
    [pytest.param(NATIVE, id="kernel")] if NATIVE is not None else []
)
_RESULTS: dict[str, dict[str, float]] = {}


def window_chunks(chunk_size: int) -> tuple[PreparedFile, list[Chunk]]:
    """The 16 chunks a sender hands out for its first window of a 128 KB image."""
    prepared = PreparedFile(os.urandom(128 * 1024), chunk_size)
    policy = RetransmitPolicy(congestion_control=False)
    sender = TransferSender(prepared, chunk_size, WINDOW, 77, policy=policy)
    sender.start(0.0)
    outputs = sender.handle(StartReply(77, TransferStatus.OK, WINDOW, 0), 0.01)
    chunks = [item for item in outputs if isinstance(item, Chunk)]
    assert len(chunks) == WINDOW
    return prepared, chunks


@pytest.fixture(scope="module")
def dtls_pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Any]:
    return make_dtls_pki(Path(tmp_path_factory.mktemp("bench-chunk-framing")))


@pytest.fixture
def use_kernel(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], None]:
    def use(module: Any) -> None:
        monkeypatch.setattr(chunk_framing, "_kernel", module)
        monkeypatch.setattr(dtls12, "_framing_kernel", module)
        monkeypatch.setattr(tls13, "_framing_kernel", module)

    return use


def record(benchmark: Any, group: str, variant: str) -> None:
    """Keep median / WINDOW in microseconds for the summary (benchmarks enabled only; the
    median, as the two cores are shared and the mean picks up other processes' bursts)."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        per_chunk = stats.stats.median / WINDOW * 1e6
        benchmark.extra_info["us_per_chunk"] = round(per_chunk, 3)
        _RESULTS.setdefault(group, {})[variant] = per_chunk


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    yield
    if _RESULTS:
        print("\nframe + seal of a 16-chunk window, AES-128-GCM: microseconds per chunk (median)")
        for group, variants in sorted(_RESULTS.items()):
            cells = ", ".join(f"{name} {value:.2f}" for name, value in sorted(variants.items()))
            print(f"  {group}: {cells}")


# --- DTLS 1.2 -----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [512, 1024])
@pytest.mark.parametrize("module", KERNELS)
def test_dtls_batch(benchmark: Any, dtls_pki: Any, use_kernel: Callable[[Any], None],
                    module: Any, chunk_size: int) -> None:  # fmt: skip
    use_kernel(module)
    _server, client, layer = established(dtls_pki, DTLS_SUITE)
    prepared, chunks = window_chunks(chunk_size)
    first = frame_chunks(prepared, chunks, transport="udp", message_ids=1, sealer=layer)
    assert [client_reads(client, d) for d in first] == frame_chunks(
        prepared, chunks, transport="udp", message_ids=1
    )
    group = f"dtls-window16-{chunk_size}"
    benchmark.group = group
    benchmark.pedantic(
        batch_udp, setup=lambda: ((ReliableLayer(), prepared, chunks, layer), {}), rounds=ROUNDS
    )
    record(benchmark, group, "kernel" if module is NATIVE else "twin")


def batch_udp(reliable: ReliableLayer, prepared: PreparedFile, chunks: list[Chunk],
              layer: DtlsRecordLayer) -> list[bytes]:  # fmt: skip
    """The message ids from the link's message layer (section 4.4), then one framing call
    and one batch seal."""
    ids = [reliable.next_message_id() for _ in chunks]
    return frame_chunks(prepared, chunks, transport="udp", message_ids=ids, sealer=layer)


def per_chunk_udp(link: UdpLink, chunks: list[Chunk], seal: Callable[[bytes], bytes]) -> list[
        bytes]:  # fmt: skip
    for chunk in chunks:
        link.notify(transfer_request(chunk), 0.0)
    return [seal(datagram) for datagram in link.take_outgoing()]


@pytest.mark.parametrize("chunk_size", [512, 1024])
def test_dtls_per_chunk_ours(benchmark: Any, dtls_pki: Any, chunk_size: int) -> None:
    _server, client, layer = established(dtls_pki, DTLS_SUITE)
    _prepared, chunks = window_chunks(chunk_size)
    link = UdpLink()
    for datagram in per_chunk_udp(link, chunks, layer.seal):
        assert client_reads(client, datagram)
    group = f"dtls-window16-{chunk_size}"
    benchmark.group = group
    benchmark.pedantic(
        per_chunk_udp, setup=lambda: ((UdpLink(), chunks, layer.seal), {}), rounds=ROUNDS
    )
    record(benchmark, group, "per-chunk-ours")


@pytest.mark.parametrize("chunk_size", [512, 1024])
def test_dtls_per_chunk_openssl(benchmark: Any, dtls_pki: Any, chunk_size: int) -> None:
    server, client, _layer = established(dtls_pki, DTLS_SUITE)
    _prepared, chunks = window_chunks(chunk_size)
    conn = server.conn  # OpenSSL seals; our layer above is never used

    def seal(datagram: bytes) -> bytes:
        conn.send(datagram)
        return conn.bio_read(4096)

    link = UdpLink()
    for datagram in per_chunk_udp(link, chunks, seal):
        assert client_reads(client, datagram)
    group = f"dtls-window16-{chunk_size}"
    benchmark.group = group
    benchmark.pedantic(
        per_chunk_udp, setup=lambda: ((UdpLink(), chunks, seal), {}), rounds=ROUNDS
    )
    record(benchmark, group, "per-chunk-openssl")


# --- TLS 1.3 ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [512, 1024])
@pytest.mark.parametrize("module", KERNELS)
def test_tls_batch(benchmark: Any, use_kernel: Callable[[Any], None], module: Any,
                   chunk_size: int) -> None:  # fmt: skip
    use_kernel(module)
    session = tls13_peers.handshake(TLS_SUITE)
    layer, peer = session.layer, session.peer
    prepared, chunks = window_chunks(chunk_size)
    wire = frame_chunks(prepared, chunks, transport="tcp", sealer=layer)
    stream = b"".join(frame_chunks(prepared, chunks, transport="tcp"))
    assert tls13_peers.recv_all(peer, wire) == stream
    group = f"tls-window16-{chunk_size}"
    benchmark.group = group
    benchmark(frame_chunks, prepared, chunks, transport="tcp", sealer=layer)
    record(benchmark, group, "kernel" if module is NATIVE else "twin")


def per_chunk_tcp(link: TcpLink, chunks: list[Chunk], seal: Callable[[bytes], bytes]) -> bytes:
    for chunk in chunks:
        link.notify(transfer_request(chunk), 0.0)
    return seal(b"".join(link.take_outgoing()))  # as the TCP shell writes a wake-up's output


@pytest.mark.parametrize("chunk_size", [512, 1024])
def test_tls_per_chunk_ours(benchmark: Any, chunk_size: int) -> None:
    session = tls13_peers.handshake(TLS_SUITE)
    layer, peer = session.layer, session.peer
    _prepared, chunks = window_chunks(chunk_size)
    link = TcpLink()
    link.take_outgoing()
    assert tls13_peers.recv_all(peer, per_chunk_tcp(link, chunks, layer.send_application_data))
    group = f"tls-window16-{chunk_size}"
    benchmark.group = group
    benchmark(per_chunk_tcp, link, chunks, layer.send_application_data)
    record(benchmark, group, "per-chunk-ours")


@pytest.mark.parametrize("chunk_size", [512, 1024])
def test_tls_per_chunk_openssl(benchmark: Any, chunk_size: int) -> None:
    session = tls13_peers.handshake(TLS_SUITE)
    conn = session.peer  # the OpenSSL side seals (the cost is the same either way round)
    drain_output(conn)
    _prepared, chunks = window_chunks(chunk_size)

    def seal(data: bytes) -> bytes:
        conn.send(data)
        return drain_output(conn)

    link = TcpLink()
    link.take_outgoing()
    assert isinstance(per_chunk_tcp(link, chunks, seal), bytes)
    group = f"tls-window16-{chunk_size}"
    benchmark.group = group
    benchmark(per_chunk_tcp, link, chunks, seal)
    record(benchmark, group, "per-chunk-openssl")
    assert isinstance(conn, SSL.Connection)
