"""What the metrics cost on the OTA sender's path.

Run: .venv/bin/python -m pytest bench/test_bench_metrics.py --benchmark-enable
Groups:
- metrics-increment: one counter increment as the main process makes it (prometheus-client's
  in-memory value), and as a worker process makes it (the multiprocess mode's mmap-backed
  value: a lock, a pid check and a write into the mapped file).
- metrics-sender-128KB: the server's share of a 128 KB transfer (bench/test_bench_transfer's
  sender_alone: 256 chunks of 512 B) without metrics; with a worker's counter incremented per
  chunk (what counting each chunk as it leaves would cost); and as shipped
  (``TransferRun.count_sent``: the sender's own tallies read and added to the metrics at each
  progress write and at the end, here every 32 acknowledgements).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import values

from otacore.module import build_module
from otacore.transfer import (
    ChunkAck,
    FinishReply,
    PreparedFile,
    ReceiverStats,
    SenderPhase,
    StartReply,
    TransferSender,
    TransferStatus,
)
from server import metrics
from server.metrics import MULTIPROC_ENV

IMAGE = build_module(random.Random(1).randbytes(128 * 1024 - 68), platform_id=32, function=5,
                     version=7)
PREPARED = PreparedFile(IMAGE, 512)
CHUNKS = PREPARED.chunk_count


@pytest.fixture
def mmap_value(tmp_path: Path) -> Iterator[Any]:
    """A value as a worker process's counter holds it (multiprocess mode, files in
    ``tmp_path``)."""
    saved = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = str(tmp_path)
    try:
        value_class = values.MultiProcessValue()
        yield value_class("counter", "bench", "bench_total", (), (), "a bench counter")
    finally:
        if saved is None:
            del os.environ[MULTIPROC_ENV]
        else:
            os.environ[MULTIPROC_ENV] = saved


def _sender_run(on_chunks: Callable[[int], None] | None = None,
                on_progress: Callable[[TransferSender], None] | None = None) -> None:
    """The server's share of a transfer: start, every chunk out, an ack every two chunks,
    finish; ``on_chunks(n)`` after each batch of n chunks out, ``on_progress(sender)`` every
    32 acknowledgements and at the end."""
    sender = TransferSender(PREPARED, 512, 256, 1)
    sender.start(0.0)
    out = sender.handle(StartReply(1, TransferStatus.OK, 256, 0), 0.05)
    if on_chunks is not None:
        on_chunks(len(out))
    for n, count in enumerate(range(2, CHUNKS + 1, 2)):
        out = sender.handle(ChunkAck(1, count, 0), 0.1)
        if on_chunks is not None:
            on_chunks(len(out))
        if on_progress is not None and n % 32 == 31:
            on_progress(sender)
    sender.handle(FinishReply(1, TransferStatus.OK, ReceiverStats()), 0.15)
    if on_progress is not None:
        on_progress(sender)
    assert sender.phase is SenderPhase.DONE


@pytest.mark.benchmark(group="metrics-increment")
def test_increment_in_memory(benchmark) -> None:  # type: ignore[no-untyped-def]
    child = metrics.BYTES_SENT.labels("full")
    benchmark(child.inc, 512)


@pytest.mark.benchmark(group="metrics-increment")
def test_increment_mmap_worker(benchmark, mmap_value) -> None:  # type: ignore[no-untyped-def]
    benchmark(mmap_value.inc, 512)


@pytest.mark.benchmark(group="metrics-sender-128KB")
def test_sender_without_metrics(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark.extra_info["chunks"] = CHUNKS
    benchmark(_sender_run)


@pytest.mark.benchmark(group="metrics-sender-128KB")
def test_sender_counting_each_chunk(benchmark, mmap_value) -> None:  # type: ignore[no-untyped-def]
    def per_chunk(count: int) -> None:
        for _ in range(count):
            mmap_value.inc(512)

    benchmark.extra_info["chunks"] = CHUNKS
    benchmark(_sender_run, on_chunks=per_chunk)


@pytest.mark.benchmark(group="metrics-sender-128KB")
def test_sender_counting_as_shipped(benchmark) -> None:  # type: ignore[no-untyped-def]
    counted = [0, 0, 0]

    def at_progress(sender: TransferSender) -> None:  # TransferRun.count_sent's work
        stats = sender.stats()
        sent, again, chunks = stats.bytes_sent, stats.bytes_retransmitted, \
            stats.chunks_retransmitted
        metrics.file_bytes("full", (sent - again) - (counted[0] - counted[1]),
                           again - counted[1], chunks - counted[2], "udp")
        counted[:] = [sent, again, chunks]

    def run() -> None:
        counted[:] = [0, 0, 0]
        _sender_run(on_progress=at_progress)

    benchmark.extra_info["chunks"] = CHUNKS
    benchmark(run)
