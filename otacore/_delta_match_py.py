"""Pure-Python twin of the delta kernel's matching: the scan, the gap covers, literal costs.

Mirrors ext/delta_match.h: ota_find_matches (:func:`find_matches`), ota_cover_gaps
(:func:`cover_gaps`) and ota_literal_costs (:func:`literal_costs`, which sorts where the C
code hashes). The control flow of the scan and of the covers follows the C code step by
step, so the spans are identical; its byte loops (scores, extensions, the split of an
overlap) are counts and best prefixes over whole runs, or short loops without a call per
byte. A search whose answer the 8-byte ranges give is one lookup (``ranges[4]``, see
otacore/_delta_search_py.py: _known_lengths); the kernel API is re-exported by
otacore/_delta_py.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import eq

import numpy as np
from numpy.typing import NDArray

from otacore._delta_search_py import _WORD, _cached_ranges, _search
from otacore._types import Buffer

_SKIP_LEN = 256
#: Length of the strings ``literal_costs`` looks for earlier in the image.
REPEAT_GRAM = 8
#: Largest image ``literal_costs`` takes.
MAX_COSTED = 0xFFFFFFFF


#: Runs at least this long are compared with numpy; shorter ones in a Python loop, which
#: costs less than numpy's per-call overhead there.
_VECTOR_MIN = 64


def _agreeing(o: bytes, nw: bytes, offset: int, start: int, stop: int) -> int:
    """Number of q in [start, stop) with 0 <= q + offset < len(o) and o[q + offset] == nw[q]."""
    lo, hi = max(start, -offset), min(stop, len(o) - offset)
    if hi <= lo:
        return 0
    if hi - lo < _VECTOR_MIN:
        return sum(map(eq, o[lo + offset : hi + offset], nw[lo:hi]))
    size = hi - lo
    same = np.frombuffer(o, np.uint8, size, lo + offset) == np.frombuffer(nw, np.uint8, size, lo)
    return int(np.count_nonzero(same))


def _signs(
    o: bytes, o_at: int, nw: bytes, n_at: int, count: int, backward: bool
) -> NDArray[np.int64]:
    """+1 where o[o_at + i] == nw[n_at + i], else -1, for i in range(count) (backward: at
    o_at - 1 - i and n_at - 1 - i)."""
    if backward:
        o_at, n_at = o_at - count, n_at - count
    same = np.frombuffer(o, np.uint8, count, o_at) == np.frombuffer(nw, np.uint8, count, n_at)
    signs = same.astype(np.int64) * 2 - 1
    return signs[::-1] if backward else signs


def _lead(gains: Sequence[int] | NDArray[np.int64]) -> int:
    """Length of the shortest prefix of ``gains`` with the largest sum; 0 unless that sum is
    positive (bsdiff's rule for how far an alignment extends: "if score > best")."""
    if isinstance(gains, np.ndarray):
        if not gains.shape[0]:
            return 0
        totals = np.cumsum(gains)
        at = int(np.argmax(totals))  # the first maximum: the shortest prefix
        return at + 1 if totals[at] > 0 else 0
    total = best = length = 0
    for i, gain in enumerate(gains):
        total += gain
        if total > best:
            best, length = total, i + 1
    return length


def _extension(o: bytes, o_at: int, nw: bytes, n_at: int, count: int, backward: bool) -> int:
    """How far (0..count) an alignment extends from o_at/n_at (backward: before them) while
    2 * agreeing bytes - length is best (ota_find_matches's len_fwd and len_back)."""
    if count >= _VECTOR_MIN:
        return _lead(_signs(o, o_at, nw, n_at, count, backward))
    if backward:
        pairs = zip(o[o_at - count : o_at][::-1], nw[n_at - count : n_at][::-1], strict=True)
    else:
        pairs = zip(o[o_at : o_at + count], nw[n_at : n_at + count], strict=True)
    return _lead([1 if x == y else -1 for x, y in pairs])


def find_matches(
    old: Buffer, new: Buffer, sa: NDArray[np.int32], threshold: int = 8, step: int = 1
) -> NDArray:
    """Copy spans covering ``new`` from ``old``: int64 rows (new_pos, old_pos, length).

    ota_find_matches step by step; its byte loops (the current alignment's score over the
    bytes a match covers or skips, the extensions both ways, the split of their overlap)
    are counts and best prefixes of agreeing bytes, computed over whole runs at once."""
    o, nw = bytes(old), bytes(new)
    old_n, new_n = len(o), len(nw)
    index = np.ascontiguousarray(sa, dtype=np.int32)
    if index.shape[0] != old_n:
        raise ValueError(f"suffix array has {index.shape[0]} entries for {old_n} bytes")
    if threshold < 0 or step < 1:
        raise ValueError("threshold must not be negative and step must be positive")
    if old_n and (int(index.min()) < 0 or int(index.max()) >= old_n):
        raise ValueError("suffix array entries are outside the old image")
    sa_list = index.data  # indexes into Python ints without a list of them
    ranges = _cached_ranges(o, index, nw)
    found_at, known_len = ranges[3], ranges[4]  # (see _known_lengths)

    spans: list[tuple[int, int, int]] = []
    scan = match_len = pos = 0
    last_scan = last_pos = last_offset = 0
    # new[q] has an old byte at the current alignment (ota_same) for inside <= q < outside
    inside, outside = 0, old_n
    while scan < new_n:
        old_score = 0
        scan += match_len
        scored = scan
        while scan < new_n:
            match_len = known_len[scan]
            if match_len >= 0:
                pos = found_at[scan]  # _search's answer, faster
            else:
                match_len, pos = _search(o, sa_list, nw, scan, None, ranges)
            reach = scan + match_len
            if scored < reach:
                if reach - scored >= 16:  # a long run: one call costs less than a loop
                    old_score += _agreeing(o, nw, last_offset, scored, reach)
                elif inside <= scored and reach <= outside:  # no bounds to check
                    for at in range(scored + last_offset, reach + last_offset):
                        if o[at] == nw[at - last_offset]:
                            old_score += 1
                else:
                    for at in range(scored, reach):
                        if 0 <= at + last_offset < old_n and o[at + last_offset] == nw[at]:
                            old_score += 1
                scored = reach
            if (match_len == old_score and match_len != 0) or match_len > old_score + threshold:
                break
            if match_len > _SKIP_LEN:
                skip_to = scan + match_len // 2
                old_score -= _agreeing(o, nw, last_offset, scan, skip_to)
                scan = skip_to
                continue
            stepped = scan + step if scan + step < new_n else new_n
            if inside <= scan and stepped <= outside:  # no bounds to check
                for at in range(scan, stepped):
                    if o[at + last_offset] == nw[at]:
                        old_score -= 1
            else:
                for at in range(scan, stepped):
                    if 0 <= at + last_offset < old_n and o[at + last_offset] == nw[at]:
                        old_score -= 1
            scan = stepped
        if match_len != old_score or scan == new_n:
            ahead = max(0, min(scan - last_scan, old_n - last_pos))
            len_fwd = _extension(o, last_pos, nw, last_scan, ahead, False)
            len_back = 0
            if scan < new_n:
                len_back = _extension(o, pos, nw, scan, min(scan - last_scan, pos), True)
            if last_scan + len_fwd > scan - len_back:
                overlap = (last_scan + len_fwd) - (scan - len_back)
                fwd_at, back_at = last_scan + len_fwd - overlap, scan - len_back
                gains: Sequence[int] | NDArray[np.int64]
                if overlap >= _VECTOR_MIN:
                    gains = (
                        _signs(o, last_pos + len_fwd - overlap, nw, fwd_at, overlap, False)
                        - _signs(o, pos - len_back, nw, back_at, overlap, False)
                    ) // 2
                else:
                    gains = [
                        (nw[fwd_at + i] == o[last_pos + len_fwd - overlap + i])
                        - (nw[back_at + i] == o[pos - len_back + i])
                        for i in range(overlap)
                    ]
                split = _lead(gains)
                len_fwd += split - overlap
                len_back -= split
            if len_fwd > 0:
                spans.append((last_scan, last_pos, len_fwd))
            last_scan = scan - len_back
            last_pos = pos - len_back
            last_offset = pos - scan
            inside, outside = -last_offset, old_n - last_offset
    return np.array(spans, dtype=np.int64).reshape(-1, 3)


# --- cost-based covers in the literal gaps (ext/delta_match.h, ota_cover_gaps) ----------------

_COVER_EQUAL = 1
_COVER_WRONG = 16
_COVER_MIN = 4
_COVER_PATIENCE = 64
_COVER_LINK = 511


def _varint_len(value: int) -> int:
    length = 1
    while value >= 128:
        value >>= 7
        length += 1
    return length


def _entry_cost(seek: int, length: int) -> int:
    zigzag = seek * 2 if seek >= 0 else -(seek + 1) * 2 + 1
    return 16 * (_varint_len(zigzag) + _varint_len(length) + 1)


def _grams(data: bytes) -> NDArray[np.uint32]:
    """Every _COVER_MIN-byte substring of ``data`` as a little-endian uint32, in order."""
    if len(data) < _COVER_MIN:
        return np.empty(0, dtype=np.uint32)
    view = np.frombuffer(data, dtype=np.uint8).astype(np.uint32)
    n = len(data) - _COVER_MIN + 1
    grams: NDArray[np.uint32] = view[:n] | view[1 : n + 1] << np.uint32(8)
    grams |= view[2 : n + 2] << np.uint32(16) | view[3 : n + 3] << np.uint32(24)
    return grams


def _grams_in(new: bytes, old_grams: NDArray[np.uint32]) -> NDArray[np.bool_]:
    """Per position of ``new``: may the _COVER_MIN-gram starting there occur in old?

    ota_cover_gaps's table: one bit per Knuth multiplicative hash of old's grams, no false
    negatives (a false positive only costs a search that finds less than _COVER_MIN bytes)."""
    found = np.zeros(len(new), dtype=bool)
    grams = _grams(new)
    if grams.shape[0] and old_grams.shape[0]:
        bits = 10
        while bits < 24 and (1 << bits) < (old_grams.shape[0] + _COVER_MIN - 1) * 8:
            bits += 1
        multiplier, shift = np.uint32(2654435761), np.uint32(32 - bits)
        table = np.zeros(1 << bits, dtype=bool)
        table[(old_grams * multiplier) >> shift] = True  # uint32 products wrap, as in C
        found[: grams.shape[0]] = table[(grams * multiplier) >> shift]
    return found


def _span_rows(spans: object, old_n: int, new_n: int) -> list[list[int]]:
    """``spans`` as [new_pos, old_pos, length] rows, each checked to lie inside both images
    (the checks of ext/delta.pyx; the filter twin's walks take the same rows)."""
    rows: list[list[int]] = np.ascontiguousarray(spans, dtype=np.int64).reshape(-1, 3).tolist()
    for i, (new_pos, old_pos, length) in enumerate(rows):
        if length < 0 or new_pos < 0 or old_pos < 0 or new_pos + length > new_n:
            raise ValueError(f"span {i} {(new_pos, old_pos, length)} is outside the images")
        if old_pos + length > old_n:
            raise ValueError(f"span {i} {(new_pos, old_pos, length)} is outside the images")
    return rows


def _ordered_spans(spans: object, old_n: int, new_n: int) -> list[list[int]]:
    rows = _span_rows(spans, old_n, new_n)
    end = 0
    for i, (new_pos, _old_pos, length) in enumerate(rows):
        if new_pos < end:
            raise ValueError(
                f"span {i} {(new_pos, _old_pos, length)} overlaps or precedes the one before"
            )
        end = new_pos + length
    return rows


def literal_costs(new: Buffer, literal: int, run: int, repeat: int) -> NDArray[np.uint8]:
    """Per byte of ``new`` (uint8 array): ``run`` where it equals the byte before it, else
    ``repeat`` inside a REPEAT_GRAM-byte string that starts at most REPEAT_GRAM - 1 bytes
    before it (or at it) and occurred earlier in ``new``, else ``literal``. Costs are 0..255.

    The kernel finds earlier strings with a hash table; this twin sorts them instead."""
    for name, value in (("literal", literal), ("run", run), ("repeat", repeat)):
        if not 0 <= value <= 255:
            raise ValueError(f"{name} cost {value} is outside 0..255")
    data = np.frombuffer(memoryview(new).cast("B"), dtype=np.uint8)
    size = data.shape[0]
    if size > MAX_COSTED:
        raise ValueError(f"image of {size} bytes is larger than {MAX_COSTED}")
    costs = np.full(size, literal, dtype=np.uint8)
    if size >= REPEAT_GRAM:
        starts = size - REPEAT_GRAM + 1
        # The REPEAT_GRAM-byte string starting at each position, read as one big-endian word.
        grams = np.ndarray((starts,), dtype=">u8", buffer=data, strides=(1,)).astype(np.uint64)
        order = np.argsort(grams)  # quicksort: a stable sort is 3-4x slower here
        ranked = grams[order]
        head = np.ones(starts, dtype=bool)
        head[1:] = ranked[1:] != ranked[:-1]
        first = np.minimum.reduceat(order, np.flatnonzero(head))  # earliest start per gram
        repeated = np.empty(starts, dtype=bool)  # the gram occurred before this start
        repeated[order] = order != first[np.cumsum(head) - 1]
        # A byte is inside a repeat when one starts at most REPEAT_GRAM - 1 bytes before it.
        inside = np.zeros(size, dtype=bool)
        for shift in range(REPEAT_GRAM):
            inside[shift : shift + starts] |= repeated
        costs[inside] = repeat
    costs[1:][data[1:] == data[:-1]] = run
    return costs


def _next_true(mask: NDArray[np.bool_]) -> memoryview:
    """Per position p of ``mask``: the first position >= p where it is True, or its length.

    A reversed running minimum: one pass (a searchsorted of every position costs 5x more)."""
    size = mask.shape[0]
    marks = np.where(mask, np.arange(size, dtype=np.int64), size)
    return np.minimum.accumulate(marks[::-1])[::-1].data


def cover_gaps(
    old: Buffer, new: Buffer, sa: NDArray[np.int32], spans: object, literal_costs: object
) -> NDArray:
    """``spans`` with the matches added in the literal gaps between them that cost less as
    copies than as literal bytes; ``literal_costs``: per new byte, its estimated compressed
    size as a literal in sixteenths of a byte (the cost model is in ext/delta_match.h)."""
    o, nw = bytes(old), bytes(new)
    old_n, new_n = len(o), len(nw)
    index = np.ascontiguousarray(sa, dtype=np.int32)
    if index.shape[0] != old_n:
        raise ValueError(f"suffix array has {index.shape[0]} entries for {old_n} bytes")
    costs_array = np.ascontiguousarray(literal_costs, dtype=np.uint8)
    if costs_array.ndim != 1 or costs_array.shape[0] != new_n:
        raise ValueError(
            f"literal costs need one entry per new byte ({new_n}), got {costs_array.shape}"
        )
    costs: list[int] = costs_array.tolist()
    if old_n and (int(index.min()) < 0 or int(index.max()) >= old_n):
        raise ValueError("suffix array entries are outside the old image")
    rows = _ordered_spans(spans, old_n, new_n)
    sa_list = index.data  # indexes into Python ints without a list of them
    ranges = _cached_ranges(o, index, nw)
    found_at, known_len = ranges[3], ranges[4]  # (see _known_lengths)
    # A search finds _COVER_MIN bytes or more exactly where new's _COVER_MIN-gram at that
    # position occurs in old: a set lookup, done for all positions at once, skips the
    # searches that cannot succeed (most of a literal gap) without changing any result.
    seen = _grams_in(nw, _grams(o))
    # next_seen[p]: the first position >= p whose gram may occur in old (new_n if none)
    next_seen = _next_true(seen)

    # (ota_copy_cost, written out in the loops below: a call per byte costs more than the
    # comparison)
    equal, wrong = _COVER_EQUAL, _COVER_WRONG
    out: list[list[int]] = []
    at = cursor = 0  # new and old end of the last span out
    for gap_end, span_old, span_len in [*rows, [new_n, 0, 0]]:
        p = at
        while gap_end - p >= _COVER_MIN:
            if next_seen[p] != p:
                p = next_seen[p]  # the positions in between cannot find _COVER_MIN bytes
                continue
            length = known_len[p]
            if length >= 0 and gap_end - p >= _WORD:
                pos = found_at[p]  # _search's answer, faster
            else:
                length, pos = _search(o, sa_list, nw, p, gap_end, ranges)
            if length < _COVER_MIN:
                p += 1
                continue
            collinear = bool(out) and pos - p == cursor - at and p - at <= _COVER_LINK
            if collinear:
                need = sum(
                    (equal if x == y else wrong) - cost
                    for x, y, cost in zip(
                        o[cursor : cursor + p - at], nw[at:p], costs[at:p], strict=True
                    )
                )
            else:
                need = _entry_cost(pos - cursor, length)
            gain = k = 0
            while k < length and gain <= need:
                gain += costs[p + k] - equal
                k += 1
            if gain <= need:
                p += length // 2 if length > _SKIP_LEN else 1
                continue
            back = fwd = 0
            if not collinear:
                score = best = i = 0
                while p - 1 - i >= at and pos - 1 - i >= 0 and i - back < _COVER_PATIENCE:
                    score += costs[p - 1 - i] - (
                        equal if o[pos - 1 - i] == nw[p - 1 - i] else wrong
                    )
                    i += 1
                    if score > best:
                        best, back = score, i
            score = best = i = 0
            while (
                p + length + i < gap_end and pos + length + i < old_n and i - fwd < _COVER_PATIENCE
            ):
                n_at = p + length + i
                score += costs[n_at] - (equal if o[pos + length + i] == nw[n_at] else wrong)
                i += 1
                if score > best:
                    best, fwd = score, i
            if collinear:
                out[-1][2] = p + length + fwd - out[-1][0]
            else:
                out.append([p - back, pos - back, back + length + fwd])
            at = p = out[-1][0] + out[-1][2]
            cursor = out[-1][1] + out[-1][2]
        if span_len > 0:
            out.append([gap_end, span_old, span_len])
            at, cursor = gap_end + span_len, span_old + span_len
    return np.array(out, dtype=np.int64).reshape(-1, 3)
