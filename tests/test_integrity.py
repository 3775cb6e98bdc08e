"""The integrity kernel: native and pure-Python twins agree with zlib/hashlib and each other."""

from __future__ import annotations

import hashlib
import itertools
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacore import integrity
from otacore._select import load_native, load_twin

TWIN = load_twin("integrity")
NATIVE = load_native("integrity")
KERNELS = [pytest.param(TWIN, id="twin")] + (
    [pytest.param(NATIVE, id="native")] if NATIVE is not None else []
)

# Sizes around the folding thresholds of the hardware CRC (64-byte blocks, 16-byte folds).
EDGE_SIZES = [0, 1, 2, 3, 7, 8, 15, 16, 17, 31, 63, 64, 65, 79, 80, 127, 128, 129, 4095, 65537]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("size", EDGE_SIZES)
def test_crc32_matches_zlib_at_edge_sizes(kernel: object, size: int) -> None:
    data = bytes((i * 131 + 7) & 0xFF for i in range(size))
    for start in (0, 0xFFFFFFFF, 0x12345678):
        assert kernel.crc32(data, start) == zlib.crc32(data, start)  # type: ignore[attr-defined]


@settings(max_examples=300)
@given(data=st.binary(max_size=5000), start=st.integers(0, 2**32 - 1), skip=st.integers(0, 15))
def test_native_and_twin_crc32_agree(data: bytes, start: int, skip: int) -> None:
    # An unaligned view exercises the alignment prologue of slicing-by-8.
    view = memoryview(data)[min(skip, len(data)) :]
    expected = zlib.crc32(view, start)
    assert TWIN.crc32(view, start) == expected
    if NATIVE is not None:
        assert NATIVE.crc32(view, start) == expected


def test_crc32_is_chainable() -> None:
    a, b = b"firmware " * 50, b"chunk" * 33
    assert integrity.crc32(b, integrity.crc32(a)) == zlib.crc32(a + b)


def test_crc32_of_a_huge_buffer() -> None:
    data = np.random.default_rng(1).integers(0, 256, 8 * 1024 * 1024 + 3, dtype=np.uint8)
    assert integrity.crc32(data.tobytes()) == zlib.crc32(data.tobytes())


@st.composite
def buffers_with_offsets(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    data = draw(st.binary(max_size=4000))
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=40))
    return data, sorted([0, *cuts, len(data)])


@settings(max_examples=200)
@given(buffers_with_offsets())
def test_batch_matches_per_chunk_crc(case: tuple[bytes, list[int]]) -> None:
    data, offsets = case
    expected = [zlib.crc32(data[a:b]) for a, b in itertools.pairwise(offsets)]
    assert TWIN.crc32_batch(data, offsets).tolist() == expected
    if NATIVE is not None:
        result = NATIVE.crc32_batch(data, np.array(offsets, dtype=np.int64))
        assert result.dtype == np.uint32
        assert result.tolist() == expected


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "offsets",
    [[0, 5, 3], [-1, 4], [0, 11], [5, 2]],
    ids=["decreasing", "negative", "past-end", "backwards"],
)
def test_batch_rejects_bad_offsets(kernel: object, offsets: list[int]) -> None:
    with pytest.raises(ValueError, match="outside"):
        kernel.crc32_batch(b"0123456789", offsets)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kernel", KERNELS)
def test_batch_edge_cases(kernel: object) -> None:
    assert kernel.crc32_batch(b"", [0]).tolist() == []  # type: ignore[attr-defined]
    assert kernel.crc32_batch(b"", [0, 0]).tolist() == [0]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="at least one"):
        kernel.crc32_batch(b"abc", [])  # type: ignore[attr-defined]


@settings(max_examples=150)
@given(st.binary(min_size=38, max_size=3000))
def test_module_digests_agree(image: bytes) -> None:
    expected = (zlib.crc32(image[:-4]), hashlib.sha256(image[:-38]).digest())
    assert TWIN.module_digests(image) == expected
    if NATIVE is not None:
        assert NATIVE.module_digests(image) == expected


@pytest.mark.parametrize("kernel", KERNELS)
def test_module_digests_refuse_short_images(kernel: object) -> None:
    with pytest.raises(ValueError, match="at least 38"):
        kernel.module_digests(b"x" * 37)  # type: ignore[attr-defined]
