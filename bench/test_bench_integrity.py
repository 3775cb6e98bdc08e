"""Integrity kernel microbenchmarks, each against its baseline in the same run.

Run: .venv/bin/python -m pytest bench/test_bench_integrity.py --benchmark-enable
Goals (issue 2): verifying a 1 MB module within 10% of zlib.crc32 + hashlib.sha256 on the
same buffer; batch CRC of 1,000 chunks of 512 B at least 5x faster than a Python loop.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import zlib

import numpy as np
import pytest

from otacore._select import load_native, load_twin
from otacore.module import build_module, validate_module

NATIVE = load_native("integrity")
TWIN = load_twin("integrity")
NOISE = random.Random(2)  # seeded: every run measures the same bytes
MODULE = build_module(NOISE.randbytes(1024 * 1024 - 68), platform_id=32, function=5, version=1)
CHUNKS = NOISE.randbytes(512 * 1000)
OFFSETS = np.arange(0, len(CHUNKS) + 1, 512, dtype=np.int64)
needs_native = pytest.mark.skipif(NATIVE is None, reason="native kernels not built")


@pytest.mark.benchmark(group="verify-1MB-module")
def test_baseline_zlib_crc32_plus_hashlib_sha256(benchmark) -> None:  # type: ignore[no-untyped-def]
    view = memoryview(MODULE)
    benchmark(lambda: (zlib.crc32(view[:-4]), hashlib.sha256(view[:-38]).digest()))


@needs_native
@pytest.mark.benchmark(group="verify-1MB-module")
def test_native_module_digests(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark(NATIVE.module_digests, MODULE)  # type: ignore[union-attr]


@pytest.mark.benchmark(group="verify-1MB-module")
def test_twin_module_digests(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark(TWIN.module_digests, MODULE)


@pytest.mark.benchmark(group="verify-1MB-module")
def test_validate_module_end_to_end(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark(validate_module, MODULE)


@pytest.mark.benchmark(group="crc-1000x512B")
def test_baseline_python_loop_over_zlib_crc32(benchmark) -> None:  # type: ignore[no-untyped-def]
    view = memoryview(CHUNKS)
    bounds = OFFSETS.tolist()
    benchmark(lambda: [zlib.crc32(view[a:b]) for a, b in itertools.pairwise(bounds)])


@needs_native
@pytest.mark.benchmark(group="crc-1000x512B")
def test_native_crc32_batch(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark(NATIVE.crc32_batch, CHUNKS, OFFSETS)  # type: ignore[union-attr]


@pytest.mark.benchmark(group="crc-1000x512B")
def test_twin_crc32_batch(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark(TWIN.crc32_batch, CHUNKS, OFFSETS)


@pytest.mark.benchmark(group="crc-1MB")
def test_baseline_zlib_crc32_1mb(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark(zlib.crc32, MODULE)


@needs_native
@pytest.mark.benchmark(group="crc-1MB")
def test_native_crc32_1mb(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark(NATIVE.crc32, MODULE)  # type: ignore[union-attr]
