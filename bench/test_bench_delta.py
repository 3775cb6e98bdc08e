"""pytest-benchmark: delta patch making and streaming application.

Runs on the corpus pairs of bench/delta/corpus when they were built
(``python bench/delta/build_corpus.py``), else on a synthetic relinked Thumb-2 image, so the
benchmarks always have something real to chew on. Every round checks the exact round trip.
Run: ``.venv/bin/python -m pytest bench/test_bench_delta.py --benchmark-enable``.
"""

from __future__ import annotations

import hashlib
import random
import struct
from pathlib import Path
from typing import Any

import pytest

from otacore import delta
from otacore.delta_stream import PatchApplier

CORPUS = Path(__file__).parent / "delta" / "corpus"
PAIRS = ("app-minor", "sys-minor", "sys-major", "big-minor")


def _synthetic_pair(size: int = 256 * 1024) -> tuple[bytes, bytes]:
    """Thumb-2-like code with BL calls and pointer tables; the release inserts a function
    near the start, so every later call and pointer shifts."""
    rng = random.Random(7)
    vocabulary = [rng.getrandbits(16) & 0xE7FF for _ in range(300)]  # no 32-bit prefixes
    functions = [rng.randrange(0, size - 8, 2) for _ in range(400)]

    def build(insert: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            at = len(out)
            if rng.random() < 0.1:
                target = rng.choice(functions)
                target += insert if target > 4096 else 0
                off = target - at - 4
                s, i1, i2 = (off >> 24) & 1, (off >> 23) & 1, (off >> 22) & 1
                out += struct.pack(
                    "<HH",
                    0xF000 | (s << 10) | ((off >> 12) & 0x3FF),
                    0xD000 | ((1 ^ i1 ^ s) << 13) | ((1 ^ i2 ^ s) << 11) | ((off >> 1) & 0x7FF),
                )
            else:
                out += struct.pack("<H", rng.choice(vocabulary))
            if at < 4096 <= len(out) and insert:
                out += bytes(rng.getrandbits(8) for _ in range(insert))
        return bytes(out[:size])

    state = rng.getstate()
    old = build(0)
    rng.setstate(state)
    return old, build(512)


def _pairs() -> list[tuple[str, bytes, bytes]]:
    found = [
        (name, (CORPUS / name / "old.bin").read_bytes(), (CORPUS / name / "new.bin").read_bytes())
        for name in PAIRS
        if (CORPUS / name / "new.bin").exists()
    ]
    return found or [("synthetic", *_synthetic_pair())]


@pytest.fixture(params=_pairs(), ids=lambda pair: pair[0])
def pair(request: pytest.FixtureRequest) -> tuple[str, bytes, bytes]:
    found: tuple[str, bytes, bytes] = request.param
    return found


def test_make_patch(benchmark: Any, pair: tuple[str, bytes, bytes]) -> None:
    _, old, new = pair
    patch = benchmark(delta.make_patch, old, new)
    assert delta.apply_patch(old, patch) == new
    benchmark.extra_info["patch_bytes"] = len(patch)
    benchmark.extra_info["new_bytes"] = len(new)


def test_streaming_apply(benchmark: Any, pair: tuple[str, bytes, bytes]) -> None:
    _, old, new = pair
    patch = delta.make_patch(old, new)

    def apply() -> bytes:
        digest = hashlib.sha256()
        applier = PatchApplier(old, digest.update)
        for at in range(0, len(patch), 1024):
            applier.feed(patch[at : at + 1024])
        applier.finish()
        return digest.digest()

    assert benchmark(apply) == hashlib.sha256(new).digest()
