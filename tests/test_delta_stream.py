"""Streaming application: any piece sizes, any old/sink shapes, bounded memory."""

from __future__ import annotations

import io
import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacore import delta
from otacore.delta_decoders import zstd_native_bound
from otacore.delta_stream import (
    OldSource,
    PatchApplier,
    apply_stream,
    python_memory_bound,
)
from otacore.errors import PatchBaseMismatchError, PatchFormatError


def firmware_pair(size: int, seed: int) -> tuple[bytes, bytes]:
    """An old image and a release of it: code inserted early, a block rewritten, a tail cut."""
    rng = random.Random(seed)
    words = [rng.getrandbits(16) for _ in range(512)]
    old = bytearray()
    while len(old) < size:  # code-like: a small vocabulary of halfwords, some random data
        if rng.random() < 0.9:
            old += rng.choice(words).to_bytes(2, "little")
        else:
            old += rng.randbytes(rng.randrange(2, 40))
    old = old[:size]
    new = old[:1000] + rng.randbytes(3000) + old[1000 : size // 2]
    new += rng.randbytes(20_000) + old[size // 2 + 5000 : size - 7000]
    return bytes(old), bytes(new)


@pytest.fixture(scope="module")
def pair() -> tuple[bytes, bytes, bytes]:
    old, new = firmware_pair(200_000, 1)
    return old, new, delta.make_patch(old, new, block_limit=8192)


def test_one_byte_at_a_time(pair: tuple[bytes, bytes, bytes]) -> None:
    old, new, patch = pair
    out = bytearray()
    applier = PatchApplier(old, out.extend)
    for i in range(len(patch)):
        applier.feed(patch[i : i + 1])
    header = applier.finish()
    assert bytes(out) == new and header.target_size == len(new)
    assert applier.bytes_written == len(new)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=40), st.integers(64, 9000))
def test_any_piece_sizes(pair: tuple[bytes, bytes, bytes], sizes: list[int], chunk: int) -> None:
    old, new, patch = pair
    pieces: list[bytes] = []
    at = 0
    while at < len(patch):
        size = sizes[len(pieces) % len(sizes)]
        pieces.append(patch[at : at + size])
        at += size
    out = bytearray()
    apply_stream(old, pieces, out.extend, chunk_size=chunk)
    assert bytes(out) == new


class Flash:
    """A read_at(offset, size) old image that counts reads, like a flash driver."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.largest_read = 0

    def read_at(self, offset: int, size: int) -> bytes:
        self.largest_read = max(self.largest_read, size)
        return self.data[offset : offset + size]


def test_old_image_and_sink_shapes(pair: tuple[bytes, bytes, bytes]) -> None:
    old, new, patch = pair
    flash = Flash(old)
    sink = io.BytesIO()
    apply_stream(flash, [patch], sink, verify_base=False, chunk_size=1024)
    assert sink.getvalue() == new
    assert flash.largest_read <= 1024 + 8
    for source in (
        lambda offset, size: old[offset : offset + size],
        io.BytesIO(old),
        bytearray(old),
    ):
        out = bytearray()
        apply_stream(source, [patch], out.extend)
        assert bytes(out) == new
    with pytest.raises(TypeError):
        PatchApplier(42, out.extend)


def test_short_reads_and_wrong_base(pair: tuple[bytes, bytes, bytes]) -> None:
    old, _, patch = pair
    with pytest.raises(PatchBaseMismatchError, match="returned"):
        apply_stream(Flash(old[:-100]), [patch], bytearray().extend)
    with pytest.raises(PatchBaseMismatchError, match="different base"):
        apply_stream(Flash(old[::-1]), [patch], bytearray().extend)


def test_failure_is_sticky_and_end_states(pair: tuple[bytes, bytes, bytes]) -> None:
    old, _, patch = pair
    applier = PatchApplier(old, bytearray().extend)
    with pytest.raises(PatchFormatError):
        applier.feed(b"XXXX" + patch[4:])
    with pytest.raises(PatchFormatError, match="already failed"):
        applier.feed(patch)
    with pytest.raises(PatchFormatError, match="already failed"):
        applier.finish()
    empty = PatchApplier(old, bytearray().extend)
    with pytest.raises(delta.PatchTruncatedError, match="header"):
        empty.finish()
    partial = PatchApplier(old, bytearray().extend)
    partial.feed(patch[: len(patch) // 2])
    with pytest.raises(delta.PatchTruncatedError, match="payload bytes missing"):
        partial.finish()
    extra = PatchApplier(old, bytearray().extend)
    with pytest.raises(delta.PatchCorruptError, match="after its declared payload"):
        extra.feed(patch + b"\x00")


def test_limits_are_enforced_and_configurable() -> None:
    old, new = firmware_pair(20_000, 2)
    patch = delta.make_patch(old, new, window_log=19, block_limit=1 << 18)
    with pytest.raises(delta.PatchLimitError, match="window"):
        apply_stream(old, [patch], bytearray().extend)
    out = bytearray()
    apply_stream(old, [patch], out.extend, max_window_log=19, max_block_limit=1 << 18)
    assert bytes(out) == new
    assert delta.apply_patch(old, patch) == new


def peak_during_apply(old: OldSource, patch: bytes, piece: int) -> tuple[int, int]:
    """Traced memory peak of streaming ``patch`` onto ``old`` in pieces of ``piece`` bytes
    (the output only counted, as a device writes it to flash), and the bytes written."""
    written = 0

    def sink(data: bytes) -> None:
        nonlocal written
        written += len(data)  # a device writes to flash: nothing is kept

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        applier = PatchApplier(old, sink)
        for at in range(0, len(patch), piece):
            applier.feed(patch[at : at + piece])
        applier.finish()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return peak, written


@pytest.mark.parametrize(("kind", "piece"), [("release", 1), ("unrelated", 1 << 16)])
def test_streaming_memory_stays_bounded(kind: str, piece: int, applier_kernel: str) -> None:
    """A ~1 MB target streams with a Python-side peak under the documented bound, however
    large the images and whatever the patch holds (mostly copies, or all literal bytes),
    with the patch arriving one byte at a time or in 64 KiB pieces; with the kernel and with
    the twin alike."""
    old, new = firmware_pair(1_000_000, 3)
    if kind == "unrelated":
        new = random.Random(5).randbytes(1_000_000)
    patch = delta.make_patch(old, new)
    header = delta.read_header(patch)
    bound = python_memory_bound(header.block_limit)
    peak, written = peak_during_apply(old, patch, piece)
    assert written == len(new)
    assert peak < bound, f"peak {peak} >= bound {bound}"
    assert bound < len(new) // 3  # the bound really is independent of the image size


def test_native_zstd_bound_is_stated() -> None:
    assert 300_000 < zstd_native_bound(17) < 520_000
    assert zstd_native_bound(15) < 220_000
