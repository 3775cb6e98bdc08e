"""Chunk bookkeeping for both ends of a transfer, on Python-int bitsets.

A set of chunks is one Python int: bit ``i`` stands for chunk ``i + 1`` (chunks are numbered
from 1). Python's arbitrary-precision integers do set, test, shift, popcount and "how many
contiguous from the start" in C over whole machine words, so a 1,312-chunk system part costs a
few hundred nanoseconds per operation and no per-chunk objects. Per-chunk scalars (send
sequence, send time, CRC-32) live in ``array.array`` buffers: 4-8 bytes a chunk, unboxed.

The ack bitmap on the wire (u32 LE words) converts to and from these ints with
``int.to_bytes``/``int.from_bytes`` (see messages.ChunkAck).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator

import numpy as np

from otacore._types import Buffer
from otacore.integrity import crc32, crc32_batch

_LITTLE_ENDIAN = sys.byteorder == "little"


def trailing_ones(bits: int) -> int:
    """Number of consecutive set bits from bit 0 (the in-order count of a chunk set)."""
    # bits + 1 turns the trailing ones into zeros and the first zero into a one.
    return (bits ^ (bits + 1)).bit_length() - 1


def iter_bits(bits: int) -> Iterator[int]:
    """Positions of the set bits of ``bits`` (>= 0), lowest first."""
    while bits:
        low = bits & -bits
        yield low.bit_length() - 1
        bits ^= low


def chain_crcs(crcs: Buffer, chain: int = 0) -> int:
    """Extend the resume chain with per-chunk CRC-32 values given as native u32s.

    The chain is the CRC-32 of the chunk CRCs as consecutive u32 little-endian values: it
    changes whenever any chunk's CRC changes, updates in O(1) per chunk and serialises as 4
    bytes (unlike a hashlib SHA-256 state).
    """
    if not _LITTLE_ENDIAN:  # pragma: no cover - no big-endian target today
        swapped = array("I", bytes(memoryview(crcs).cast("B")))
        swapped.byteswap()
        crcs = memoryview(swapped)
    return crc32(crcs, chain)


def stored_prefix_chain(stored: Buffer, chunk_size: int, count: int) -> int:
    """Resume chain of the first ``count`` chunks of ``stored`` (the last may be short).

    Recomputes every chunk's CRC-32 in one batch call, so checking a 656 KB partial download
    after a reboot costs one pass over the data.
    """
    size = len(memoryview(stored).cast("B"))
    ends = np.minimum(np.arange(count + 1, dtype=np.int64) * chunk_size, size)
    if count and ends[-1] <= ends[-2]:
        raise ValueError(f"{count} chunks of {chunk_size} bytes need more than {size} bytes")
    crcs = crc32_batch(stored, ends)
    return chain_crcs(crcs.astype("<u4", copy=False).data)


class SendBook:
    """The sender's view of every chunk: acknowledged, lost, last sent when and in what order.

    Loss detection follows RACK (RFC 8985 section 6.2) with a sequence threshold as in SACK
    recovery (RFC 6675 section 5, DupThresh = 3): a chunk not yet acknowledged is lost when a
    chunk sent more than ``reorder_time`` seconds later has been delivered, or (first
    transmissions only) one sent at least ``REORDER_SENDS`` sends later.
    """

    REORDER_SENDS = 3

    __slots__ = (
        "_retransmitted",
        "_send_seq",
        "_sends",
        "_sent_at",
        "acked",
        "base",
        "chunk_count",
        "delivered_at",
        "delivered_seq",
        "lost",
        "next_new",
    )

    def __init__(self, chunk_count: int, resume_offset: int = 0) -> None:
        self.chunk_count = chunk_count
        #: Chunks the device has acknowledged (bit i = chunk i + 1).
        self.acked = (1 << resume_offset) - 1
        #: Contiguous acknowledged count: chunks 1..base are held by the device.
        self.base = resume_offset
        #: Lowest chunk number never sent in this session.
        self.next_new = resume_offset + 1
        #: Chunks judged lost and waiting to be sent again.
        self.lost = 0
        self._retransmitted = 0
        self._send_seq = array("i", bytes(4 * chunk_count))  # < 2**31 sends per session
        self._sent_at = array("d", bytes(8 * chunk_count))
        self._sends = 0
        self.delivered_seq = 0
        self.delivered_at = float("-inf")

    @property
    def complete(self) -> bool:
        """True when every chunk is acknowledged."""
        return self.base >= self.chunk_count

    def outstanding(self) -> int:
        """Bitset of chunks sent in this session and not yet acknowledged."""
        return ((1 << (self.next_new - 1)) - 1) & ~self.acked

    def schedule(self, window: int, now: float,
                 budget: int | None = None) -> tuple[list[int], int]:
        """Chunk numbers to send now (lost ones first), marked as sent at ``now``.

        Never goes past chunk ``base + window``: the device holds at most a window beyond its
        in-order count, so that is all the flow control needs. At most ``budget`` chunks go
        out, lost ones first (the congestion window's room; None: no cap); the lost ones left
        over wait for the next call. Returns the numbers and how many of them are
        retransmissions.
        """
        numbers: list[int] = []
        seq = self._send_seq
        sent_at = self._sent_at
        sends = self._sends
        lost = self.lost
        retransmissions = 0
        room = self.chunk_count if budget is None else budget
        if lost and room > 0:
            for bit in iter_bits(lost):
                if room == 0:
                    break
                sends += 1
                seq[bit] = sends
                sent_at[bit] = now
                numbers.append(bit + 1)
                retransmissions += 1
                room -= 1
                lost ^= 1 << bit
                self._retransmitted |= 1 << bit
            self.lost = lost
        limit = min(self.chunk_count, self.base + window)
        number = self.next_new
        acked = self.acked
        while number <= limit and room > 0:
            if not (acked >> (number - 1)) & 1:
                sends += 1
                seq[number - 1] = sends
                sent_at[number - 1] = now
                numbers.append(number)
                room -= 1
            number += 1
        self.next_new = number
        self._sends = sends
        return numbers, retransmissions

    def apply_ack(self, in_order: int, bitmap: int) -> tuple[int, float | None]:
        """Record an ack; return (chunks newly acknowledged, RTT sample send time or None).

        Bits naming chunks this session never sent are ignored. The RTT sample is the send
        time of the most recently sent newly acknowledged chunk that was sent only once
        (Karn's rule, RFC 6298 section 3).
        """
        sent = (1 << (self.next_new - 1)) - 1
        # Bitmap bit j is chunk in_order + 2 + j, i.e. bit in_order + 1 + j of the set.
        reported = (((1 << in_order) - 1) | (bitmap << (in_order + 1))) & sent
        newly = reported & ~self.acked
        if not newly:
            return 0, None
        acked = self.acked | newly
        self.acked = acked
        self.lost &= ~newly
        self.base = (acked ^ (acked + 1)).bit_length() - 1  # trailing_ones, inlined
        seq = self._send_seq
        sent_at = self._sent_at
        clean = newly & ~self._retransmitted
        if clean == newly:
            # First transmissions go out in chunk order, so the highest chunk is the latest
            # sent: no need to look at the others (the common, loss-free case).
            top = newly.bit_length() - 1
            if seq[top] > self.delivered_seq:
                self.delivered_seq = seq[top]
                self.delivered_at = sent_at[top]
            return newly.bit_count(), sent_at[top]
        best_seq = self.delivered_seq
        best_bit = -1
        sample_seq = 0
        sample_at: float | None = None
        bits = newly
        while bits:
            low = bits & -bits
            bit = low.bit_length() - 1
            bits ^= low
            s = seq[bit]
            if s > best_seq:
                best_seq = s
                best_bit = bit
            if s > sample_seq and clean & low:
                sample_seq = s
                sample_at = sent_at[bit]
        if best_bit >= 0:
            self.delivered_seq = best_seq
            self.delivered_at = sent_at[best_bit]
        return newly.bit_count(), sample_at

    def detect_losses(self, reorder_time: float) -> int:
        """Mark as lost the holes that later-sent delivered chunks reveal; return how many."""
        holes = self.outstanding() & ~self.lost
        if not holes:
            return 0
        # Only chunks below the highest acknowledged one can be revealed as holes.
        holes &= (1 << (self.acked.bit_length() - 1)) - 1
        seq = self._send_seq
        sent_at = self._sent_at
        seq_limit = self.delivered_seq - self.REORDER_SENDS
        time_limit = self.delivered_at - reorder_time
        retransmitted = self._retransmitted
        marked = 0
        for bit in iter_bits(holes):
            # A retransmission is judged by time only: copies sent in one burst reach the
            # device in any order, and a sequence rule would re-send them in cascades.
            if sent_at[bit] < time_limit or (
                seq[bit] <= seq_limit and not (retransmitted >> bit) & 1
            ):
                self.lost |= 1 << bit
                marked += 1
        return marked

    def mark_highest_lost(self) -> bool:
        """Mark the highest outstanding chunk as lost (the tail-loss probe)."""
        outstanding = self.outstanding()
        if not outstanding:
            return False
        self.lost |= 1 << (outstanding.bit_length() - 1)
        return True

    def mark_lowest_lost(self) -> bool:
        """Mark the lowest outstanding chunk as lost (the probe after a timeout)."""
        outstanding = self.outstanding()
        if not outstanding:
            return False
        self.lost |= outstanding & -outstanding
        return True


class ReceiveBook:
    """The receiver's view: which chunks it holds, its in-order count and the resume chain."""

    DUPLICATE = 0
    OUT_OF_WINDOW = 1
    IN_ORDER = 2  # extended the in-order count by exactly this chunk
    FILLED_GAP = 3  # extended the in-order count past chunks that were out of order
    OUT_OF_ORDER = 4  # held after a gap, right after another held chunk
    NEW_GAP = 5  # held after a gap, with the chunk before it missing

    __slots__ = (
        "_chain",
        "_chain_count",
        "_crc_view",
        "_crcs",
        "chunk_count",
        "count",
        "held",
        "window",
    )

    def __init__(self, chunk_count: int, window: int, count: int = 0, chain: int = 0) -> None:
        self.chunk_count = chunk_count
        self.window = window
        #: Chunks held (bit i = chunk i + 1); chunks 1..count are all set.
        self.held = (1 << count) - 1
        self.count = count
        # The chain is extended lazily (one CRC call per save, not per chunk).
        self._chain = chain
        self._chain_count = count
        self._crcs = array("I", bytes(4 * chunk_count))
        self._crc_view = memoryview(self._crcs)

    @property
    def chain(self) -> int:
        """Resume chain over the CRCs of chunks 1..count (see chain_crcs)."""
        if self._chain_count != self.count:
            self._chain = chain_crcs(self._crc_view[self._chain_count : self.count], self._chain)
            self._chain_count = self.count
        return self._chain

    def accept(self, number: int, crc: int) -> int:
        """Record a chunk whose CRC-32 checked out; return what it was (class constants)."""
        bit = 1 << (number - 1)
        held = self.held
        if held & bit:
            return 0  # DUPLICATE
        count = self.count
        if number > count + self.window:
            return 1  # OUT_OF_WINDOW
        held |= bit
        self.held = held
        self._crcs[number - 1] = crc
        if number == count + 1:
            new_count = (held ^ (held + 1)).bit_length() - 1  # trailing_ones, inlined
            self.count = new_count
            return 2 if new_count == number else 3  # IN_ORDER / FILLED_GAP
        return 4 if (held >> (number - 2)) & 1 else 5  # OUT_OF_ORDER / NEW_GAP

    def ack_bitmap(self) -> int:
        """Bitmap for ChunkAck: bit j = chunk count + 2 + j held."""
        return self.held >> (self.count + 1)

    @property
    def complete(self) -> bool:
        """True when every chunk is held."""
        return self.count >= self.chunk_count
