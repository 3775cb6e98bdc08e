"""Chunk bookkeeping (otacore.transfer.bitmap) against naive set-based models."""

from __future__ import annotations

import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacore.transfer.bitmap import (
    ReceiveBook,
    SendBook,
    chain_crcs,
    iter_bits,
    stored_prefix_chain,
    trailing_ones,
)


@settings(max_examples=300)
@given(st.integers(0, 2**300))
def test_trailing_ones_and_iter_bits_match_naive_versions(bits: int) -> None:
    naive_ones = 0
    while (bits >> naive_ones) & 1:
        naive_ones += 1
    assert trailing_ones(bits) == naive_ones
    assert list(iter_bits(bits)) == [i for i in range(bits.bit_length()) if (bits >> i) & 1]


def _naive_chain(data: bytes, chunk_size: int, count: int) -> int:
    crcs = b"".join(
        zlib.crc32(data[i * chunk_size : (i + 1) * chunk_size]).to_bytes(4, "little")
        for i in range(count)
    )
    return zlib.crc32(crcs)


@settings(max_examples=150)
@given(
    data=st.binary(min_size=1, max_size=3000),
    chunk_size=st.sampled_from([64, 100, 512]),
    seed=st.integers(0, 1000),
)
def test_receive_book_chain_equals_the_chain_of_the_stored_prefix(
    data: bytes, chunk_size: int, seed: int
) -> None:
    n = -(-len(data) // chunk_size)
    book = ReceiveBook(n, window=n)
    order = list(range(1, n + 1))
    random.Random(seed).shuffle(order)
    for number in order:
        piece = data[(number - 1) * chunk_size : number * chunk_size]
        book.accept(number, zlib.crc32(piece))
        expected = _naive_chain(data, chunk_size, book.count)
        assert book.chain == expected
        assert stored_prefix_chain(data[: book.count * chunk_size], chunk_size, book.count) == (
            expected
        )
    assert book.complete


def test_chain_notices_a_changed_chunk_and_a_short_prefix() -> None:
    data = bytes(range(256)) * 8
    good = stored_prefix_chain(data, 512, 4)
    damaged = bytearray(data)
    damaged[1000] ^= 1
    assert stored_prefix_chain(bytes(damaged), 512, 4) != good
    assert chain_crcs(memoryview(b"")) == 0
    with pytest.raises(ValueError, match="need more than"):
        stored_prefix_chain(data[:1024], 512, 3)


@settings(max_examples=200)
@given(
    n=st.integers(1, 80),
    window=st.integers(1, 40),
    arrivals=st.lists(st.integers(1, 80), max_size=200),
)
def test_receive_book_classifies_like_a_set_model(n: int, window: int, arrivals: list[int]) -> None:
    book = ReceiveBook(n, window)
    held: set[int] = set()
    for number in (a for a in arrivals if a <= n):
        count = max(k for k in range(n + 1) if all(i in held for i in range(1, k + 1)))
        kind = book.accept(number, number)
        if number in held:
            assert kind == ReceiveBook.DUPLICATE
            continue
        if number > count + window:
            assert kind == ReceiveBook.OUT_OF_WINDOW
            continue
        held.add(number)
        new_count = max(k for k in range(n + 1) if all(i in held for i in range(1, k + 1)))
        assert book.count == new_count
        if number == count + 1:
            assert kind == (ReceiveBook.IN_ORDER if new_count == number else ReceiveBook.FILLED_GAP)
        else:
            expected = ReceiveBook.OUT_OF_ORDER if number - 1 in held else ReceiveBook.NEW_GAP
            assert kind == expected
        bitmap = book.ack_bitmap()
        assert {new_count + 2 + j for j in iter_bits(bitmap)} == {h for h in held if h > new_count}


@settings(max_examples=200)
@given(
    n=st.integers(1, 120),
    window=st.integers(1, 50),
    steps=st.lists(st.tuples(st.integers(0, 130), st.integers(0, 2**60)), max_size=40),
)
def test_send_book_respects_the_window_and_tracks_acks(
    n: int, window: int, steps: list[tuple[int, int]]
) -> None:
    book = SendBook(n)
    sent: set[int] = set()
    acked: set[int] = set()
    now = 0.0
    for in_order, bitmap in steps:
        numbers, _ = book.schedule(window, now)
        for number in numbers:
            assert number <= book.base + window  # flow control
            assert number not in acked
        sent |= set(numbers)
        now += 0.01
        book.apply_ack(in_order, bitmap)
        reported = set(range(1, in_order + 1)) | {in_order + 2 + j for j in iter_bits(bitmap)}
        acked |= reported & sent  # bits about chunks never sent are ignored
        assert {i + 1 for i in iter_bits(book.acked)} == acked
        assert book.base == max(k for k in range(n + 1) if all(i in acked for i in range(1, k + 1)))
        assert {i + 1 for i in iter_bits(book.outstanding())} == sent - acked


def test_send_book_loss_rules() -> None:
    book = SendBook(10)
    numbers, retransmissions = book.schedule(10, now=0.0)
    assert numbers == list(range(1, 11)) and retransmissions == 0
    # Bitmap bit j is chunk in_order + 2 + j: chunks 2 and 3 held, chunk 1 missing. Only two
    # later sends delivered: below the threshold of three, and no time has passed.
    book.apply_ack(0, 0b11)
    assert book.detect_losses(reorder_time=1.0) == 0
    book.apply_ack(0, 0b111)  # chunk 4 too: three later sends delivered
    assert book.detect_losses(reorder_time=1.0) == 1
    assert book.lost == 0b1
    numbers, retransmissions = book.schedule(10, now=0.5)
    assert numbers == [1] and retransmissions == 1
    # A retransmission is judged by time only: chunks sent before it being delivered (or sent
    # within the reordering window after it) do not condemn it again.
    book.apply_ack(0, 0b11111111)
    assert book.detect_losses(reorder_time=1.0) == 0
    # Chunk 10 sent again at 2.0 and delivered: chunk 1 (sent at 0.5) is now lost by time.
    book.lost = 1 << 9
    book.schedule(10, now=2.0)
    book.apply_ack(0, 0b111111111)
    assert book.detect_losses(reorder_time=1.0) == 1 and book.lost == 0b1
    book.lost = 0
    assert book.mark_highest_lost() and book.lost == 1  # only chunk 1 is outstanding
    book.apply_ack(10, 0)
    assert book.complete and not book.mark_lowest_lost() and not book.mark_highest_lost()


def test_send_book_resumes_past_the_offset() -> None:
    book = SendBook(10, resume_offset=4)
    numbers, _ = book.schedule(3, now=0.0)
    assert numbers == [5, 6, 7]
    assert book.base == 4
    newly, sample = book.apply_ack(7, 0)
    assert newly == 3 and sample == 0.0
    assert not book.complete
    numbers, _ = book.schedule(3, now=1.0)
    assert numbers == [8, 9, 10]
    book.apply_ack(10, 0)
    assert book.complete and book.outstanding() == 0
