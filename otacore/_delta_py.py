"""Pure-Python twin of ext/delta.pyx (same functions, same results, slower).

It computes what the C code computes, but not always the way the C code does, because
CPython's per-step cost decides: the suffix array comes from numpy prefix doubling (it is
unique, so it equals SA-IS's); ota_search's bisection becomes ``bisect`` on bytes slices
after one vectorised ``searchsorted`` of every position's first 8 bytes (which also answers
every search that finds fewer, see :func:`_search`); the matcher's byte loops are counts and
best prefixes over runs; the filter walk finds the items of all copy spans at once and
rewrites them with array arithmetic. The matcher's and the covers' control flow follow
ext/delta_match.h step by step, so spans, predictions and difference bytes are identical
(tests/test_delta.py and tests/test_delta_twin_speed.py compare them with the kernel).
"""

from __future__ import annotations

import weakref
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from operator import eq

import numpy as np
from numpy.typing import NDArray

from otacore._types import Buffer

FILTER_THUMB = 1
FILTER_X86 = 2
FILTER_WORDS = 4
LOOKAHEAD = 8
MAX_INDEXED = 0x7FFFFFFF
_MAX_MATCH = 1 << 20
_SKIP_LEN = 256
_POSITION_LIMIT = 1 << 40
#: Length of the strings ``literal_costs`` looks for earlier in the image.
REPEAT_GRAM = 8
#: Largest image ``literal_costs`` takes.
MAX_COSTED = 0xFFFFFFFF

MapPair = tuple[Sequence[int] | NDArray[np.int64], Sequence[int] | NDArray[np.int64]]
#: (filters, base, image_size, relocation map, value map); see ext/delta_filter.h.
Model = tuple[int, int, int, MapPair, MapPair]


def _check_filters(filters: int) -> None:
    if filters < 0 or filters > 7 or (filters & FILTER_X86 and filters & FILTER_THUMB):
        raise ValueError(f"invalid filter set {filters}")


#: Bytes of every suffix the suffix array's first sort compares (7 bytes and a 3-bit length
#: fill one 64-bit key).
_SEED_BYTES = 7


def suffix_array(data: Buffer) -> NDArray[np.int32]:
    """Suffix array of ``data`` as an int32 numpy array.

    Prefix doubling (Manber and Myers, "Suffix arrays: a new method for on-line string
    searches", 1993) over the groups still tied only (Larsson and Sadakane, "Faster suffix
    sorting", 2007): the suffixes are sorted by their first 7 bytes at once, then each round
    sorts the members of every group that still share their first h bytes by the group of the
    suffix h bytes further on, doubling h. The suffix array is unique, so it equals SA-IS's
    (ext/delta_sais.h)."""
    text = bytes(data)
    n = len(text)
    if n > MAX_INDEXED:
        raise ValueError(f"cannot index {n} bytes; the limit is {MAX_INDEXED}")
    if n == 0:
        return np.empty(0, dtype=np.int32)
    positions = np.arange(n, dtype=np.int64)
    # The first 7 bytes (zeros past the end) above the suffix's length capped at 7: a suffix
    # that is a prefix of another's 7 bytes sorts before it, as it should.
    padded = text + bytes(8)
    words = np.ndarray((n,), dtype=">u8", buffer=padded, strides=(1,)).astype(np.uint64)
    seed = (words >> np.uint64(8)) << np.uint64(3)
    seed |= np.minimum(n - positions, _SEED_BYTES).astype(np.uint64)
    order = np.argsort(seed)
    keys = seed[order]
    head = np.ones(n, dtype=bool)  # head[j]: order[j] starts a group of equal prefixes
    head[1:] = keys[1:] != keys[:-1]
    # rank[p]: index in order where the group of suffix p starts (its final index once alone)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.maximum.accumulate(np.where(head, positions, 0))
    shared = _SEED_BYTES  # every group's members share their first `shared` bytes
    alone = head.copy()
    alone[:-1] &= head[1:]  # a group of one: its next entry starts another group
    tied = np.flatnonzero(~alone)  # indices in order of the suffixes still tied, ascending
    while tied.shape[0]:
        members = order[tied]
        # Second key: the group of the suffix `shared` bytes on; -1 past the end (shorter first).
        later = np.full(members.shape[0], -1, dtype=np.int64)
        inside = members + shared < n
        later[inside] = rank[members[inside] + shared]
        sort_keys = rank[members] * (n + 1) + later + 1
        # Timsort: each group's members come in runs already sorted (long repeats, such as
        # padding, shift by one byte from suffix to suffix); 1.5x faster over the corpus.
        sub = np.argsort(sort_keys, kind="stable")
        members, sort_keys = members[sub], sort_keys[sub]
        order[tied] = members  # each group keeps its place: the group is the first key
        starts = np.ones(members.shape[0], dtype=bool)
        starts[1:] = sort_keys[1:] != sort_keys[:-1]
        run_first = np.maximum.accumulate(np.where(starts, np.arange(members.shape[0]), 0))
        rank[members] = tied[run_first]
        # Groups lie whole inside `tied`: one is alone when the entry after it starts another.
        alone = starts.copy()
        alone[:-1] &= starts[1:]
        tied = tied[~alone]
        shared *= 2
    return order.astype(np.int32)


def _common_prefix(a: bytes, a_at: int, b: bytes, b_at: int, limit: int) -> int:
    """Number of equal bytes of a[a_at:] and b[b_at:], at most limit."""
    done = 0
    step = _WORD
    while done < limit:
        size = min(step, limit - done)
        x = a[a_at + done : a_at + done + size]
        y = b[b_at + done : b_at + done + size]
        if x != y:
            # As ota_common_prefix: the lowest set bit of the little-endian XOR is in the
            # first byte that differs.
            diff = int.from_bytes(x, "little") ^ int.from_bytes(y, "little")
            return done + (((diff & -diff).bit_length() - 1) >> 3)
        done += size
        step *= 2
    return done


#: Bytes of a string whose suffix-array range :func:`_word_ranges` finds for every position.
_WORD = 8
#: Each bisection round compares this many times as many bytes of the key as the one before.
_WIDEN = 4


def _words(data: bytes, count: int) -> NDArray[np.uint64]:
    """The _WORD bytes starting at each of the first ``count`` positions of ``data`` (zeros
    past its end) as big-endian integers: they sort as the strings do."""
    if count == 0:
        return np.empty(0, dtype=np.uint64)
    padded = data + bytes(_WORD)
    return np.ndarray((count,), dtype=">u8", buffer=padded, strides=(1,)).astype(np.uint64)


#: id(suffix array) -> (a weak reference to it, old, new, their :func:`_word_ranges`): the
#: maker runs find_matches and then cover_gaps on the same three objects. An entry goes when
#: its suffix array does.
_Ranges = tuple[memoryview, ...]
_ranges_cache: dict[int, tuple[weakref.ref[NDArray[np.int32]], bytes, bytes, _Ranges]] = {}


def _cached_ranges(old: bytes, index: NDArray[np.int32], new: bytes) -> tuple[memoryview, ...]:
    """:func:`_word_ranges`, kept while the suffix array ``index`` lives."""
    key = id(index)
    entry = _ranges_cache.get(key)
    if entry is not None and entry[0]() is index and entry[1] is old and entry[2] is new:
        return entry[3]
    ranges = _word_ranges(old, index, new)
    try:
        reference = weakref.ref(index, lambda _: _ranges_cache.pop(key, None))
    except TypeError:  # not weakly referenceable (a view of another array's memory is)
        return ranges
    _ranges_cache[key] = (reference, old, new, ranges)
    return ranges


def _word_ranges(old: bytes, index: NDArray[np.int32], new: bytes) -> tuple[memoryview, ...]:
    """Per position q of ``new`` that has _WORD bytes: (first, end), the range of suffix array
    entries whose suffixes start with new[q:q + _WORD], except that it may begin with suffixes
    shorter than _WORD that are a prefix of it (zero padding makes them compare equal); and,
    where that range is empty, (length, old position): :func:`_search`'s answer for any key
    of at least _WORD bytes starting at q.

    The suffix array sorts the padded words too, so one vectorised ``searchsorted`` per side
    does the first _WORD bytes of every search at once. Where no suffix shares them, the
    boundary is ``first`` itself, and the common prefixes of its two neighbours are the equal
    leading bytes of two words (fewer than _WORD, capped at the suffix's length)."""
    old_n = len(old)
    count = max(len(new) - _WORD + 1, 0)
    sorted_words = _words(old, old_n)[index]
    keys = _words(new, count)
    # All in the keys' sorted order, then put back in new's: numpy narrows each search from
    # the one before, and the neighbours' words are read in order (5x faster on 1.5 MB).
    key_order = np.argsort(keys)
    ordered_keys = keys[key_order]
    ordered_first = np.searchsorted(sorted_words, ordered_keys, side="left")
    ordered_end = np.searchsorted(sorted_words, ordered_keys, side="right")
    first = np.empty(count, dtype=np.int64)
    end = np.empty(count, dtype=np.int64)
    first[key_order] = ordered_first
    end[key_order] = ordered_end
    found_len = np.zeros(count, dtype=np.int64)
    found_at = np.zeros(count, dtype=np.int64)
    if old_n and count:
        missing = np.flatnonzero(ordered_first == ordered_end)
        boundary = ordered_first[missing]
        lo = np.minimum(np.maximum(boundary - 1, 0), max(old_n - 2, 0))
        hi = np.minimum(lo + 1, old_n - 1)
        ends: list[tuple[NDArray[np.int64], NDArray[np.int64]]] = []
        for bracket_end in (lo, hi):
            suffix = index[bracket_end].astype(np.int64)
            diff = sorted_words[bracket_end] ^ ordered_keys[missing]
            # Equal leading bytes: the first non-zero byte of the big-endian XOR.
            common = (diff.astype(">u8").view(np.uint8).reshape(-1, _WORD) != 0).argmax(axis=1)
            ends.append((np.minimum(common, old_n - suffix), suffix))
        (lcp_lo, at_lo), (lcp_hi, at_hi) = ends
        take_lo = lcp_lo >= lcp_hi
        found_len[key_order[missing]] = np.where(take_lo, lcp_lo, lcp_hi)
        found_at[key_order[missing]] = np.where(take_lo, at_lo, at_hi)
    # memoryviews: fast indexing into Python ints
    return first.data, end.data, found_len.data, found_at.data


def _search(
    old: bytes,
    sa: Sequence[int] | memoryview,
    new: bytes,
    scan: int,
    end: int | None = None,
    ranges: tuple[memoryview, ...] | None = None,
) -> tuple[int, int]:
    """(length, old position) of the longest prefix of new[scan:end] found in old;
    ``ranges``: :func:`_word_ranges` of old and new, or None.

    ota_search (ext/delta_match.h) bisects the suffix array for the boundary between the
    suffixes that sort before the key (truncated to key_n bytes) and those that do not, then
    takes the end of the final bracket [lo, hi] with the longer common prefix (lo on a tie).
    With a sorted suffix array that bracket is a function of the boundary alone: lo = boundary
    - 1 clamped to [0, old_n - 2], hi = lo + 1 (the C loop keeps "lo below, hi not below";
    when no suffix or every suffix sorts before the key, one end never moves). Its common
    prefixes are exact (the C loop's skip only avoids re-comparing a prefix both ends share).
    So the twin finds the same boundary with ``bisect`` on ``bytes`` slices, whose ordering is
    the C comparison's ("a suffix that is a proper prefix of the key sorts before it"): first
    among the suffixes that share the key's first _WORD bytes (from ``ranges``, else by
    bisecting), then among those that share _WIDEN times as many, and so on up to key_n; a
    round that finds no suffix sharing its probe has the boundary (all the suffixes before
    the range sort before the key, all after it after).
    """
    old_n = len(old)
    key_n = min((len(new) if end is None else end) - scan, _MAX_MATCH)
    if old_n == 0 or key_n == 0:
        return 0, 0
    first, last = 0, old_n  # the boundary lies in [first, last]
    size = _WORD
    if ranges is not None and key_n >= _WORD:
        first, last = ranges[0][scan], ranges[1][scan]
        if first == last:
            return ranges[2][scan], ranges[3][scan]
        while first < last and sa[first] > old_n - _WORD:
            first += 1  # a shorter suffix padded with zeros: it sorts before the key
        size *= _WIDEN
    known, known_common = -1, 0  # an entry whose common prefix is already measured
    while True:
        if first == last:
            boundary = first
            break
        if last - first == 1:  # one suffix left: compare it whole
            suffix = sa[first]
            room = old_n - suffix
            known, known_common = first, _common_prefix(old, suffix, new, scan, min(room, key_n))
            below = known_common != key_n and (
                known_common == room or old[suffix + known_common] < new[scan + known_common]
            )
            boundary = first + below
            break
        size = min(size, key_n)
        probe = new[scan : scan + size]

        def prefix(suffix: int, size: int = size) -> bytes:
            return old[suffix : suffix + size]

        boundary = bisect_left(sa, probe, first, last, key=prefix)
        if size == key_n:
            break
        first, last = boundary, bisect_right(sa, probe, boundary, last, key=prefix)
        size *= _WIDEN
    lo = min(max(boundary - 1, 0), max(old_n - 2, 0))
    hi = min(lo + 1, old_n - 1)
    if lo == known:
        lcp_lo = known_common
    else:
        lcp_lo = _common_prefix(old, sa[lo], new, scan, min(old_n - sa[lo], key_n))
    if hi == known:
        lcp_hi = known_common
    else:
        lcp_hi = _common_prefix(old, sa[hi], new, scan, min(old_n - sa[hi], key_n))
    if lcp_lo >= lcp_hi:
        return lcp_lo, sa[lo]
    return lcp_hi, sa[hi]


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
    ranges_first, ranges_end, found_len, found_at = ranges
    ranged = len(ranges_first)

    spans: list[tuple[int, int, int]] = []
    scan = match_len = pos = 0
    last_scan = last_pos = last_offset = 0
    while scan < new_n:
        old_score = 0
        scan += match_len
        scored = scan
        while scan < new_n:
            if scan < ranged and ranges_first[scan] == ranges_end[scan]:
                match_len, pos = found_len[scan], found_at[scan]  # _search's answer, faster
            else:
                match_len, pos = _search(o, sa_list, nw, scan, None, ranges)
            if scored < scan + match_len:
                if scan + match_len - scored < 16:  # a short run: a loop costs less than a call
                    for at in range(scored, scan + match_len):
                        if 0 <= at + last_offset < old_n and o[at + last_offset] == nw[at]:
                            old_score += 1
                else:
                    old_score += _agreeing(o, nw, last_offset, scored, scan + match_len)
                scored = scan + match_len
            if (match_len == old_score and match_len != 0) or match_len > old_score + threshold:
                break
            if match_len > _SKIP_LEN:
                skip_to = scan + match_len // 2
                old_score -= _agreeing(o, nw, last_offset, scan, skip_to)
                scan = skip_to
                continue
            for at in range(scan, min(scan + step, new_n)):
                if 0 <= at + last_offset < old_n and o[at + last_offset] == nw[at]:
                    old_score -= 1
            scan = min(scan + step, new_n)
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
    ranges_first, ranges_end, found_len, found_at = ranges
    ranged = len(ranges_first)
    # A search finds _COVER_MIN bytes or more exactly where new's _COVER_MIN-gram at that
    # position occurs in old: a set lookup, done for all positions at once, skips the
    # searches that cannot succeed (most of a literal gap) without changing any result.
    seen = _grams_in(nw, _grams(o))
    # next_seen[p]: the first position >= p whose gram may occur in old (new_n if none)
    candidates = np.flatnonzero(seen)
    next_seen = np.append(candidates, new_n)[np.searchsorted(candidates, np.arange(new_n))].data

    literal = costs.__getitem__
    def copy(o_at: int, n_at: int) -> int:
        return _COVER_EQUAL if o[o_at] == nw[n_at] else _COVER_WRONG

    out: list[list[int]] = []
    at = cursor = 0  # new and old end of the last span out
    for gap_end, span_old, span_len in [*rows, [new_n, 0, 0]]:
        p = at
        while gap_end - p >= _COVER_MIN:
            if next_seen[p] != p:
                p = next_seen[p]  # the positions in between cannot find _COVER_MIN bytes
                continue
            if p < ranged and ranges_first[p] == ranges_end[p] and gap_end - p >= _WORD:
                length, pos = found_len[p], found_at[p]  # _search's answer, faster
            else:
                length, pos = _search(o, sa_list, nw, p, gap_end, ranges)
            if length < _COVER_MIN:
                p += 1
                continue
            collinear = bool(out) and pos - p == cursor - at and p - at <= _COVER_LINK
            if collinear:
                need = sum(copy(cursor + k, at + k) - literal(at + k) for k in range(p - at))
            else:
                need = _entry_cost(pos - cursor, length)
            gain = k = 0
            while k < length and gain <= need:
                gain += literal(p + k) - _COVER_EQUAL
                k += 1
            if gain <= need:
                p += length // 2 if length > _SKIP_LEN else 1
                continue
            back = fwd = 0
            if not collinear:
                score = best = i = 0
                while p - 1 - i >= at and pos - 1 - i >= 0 and i - back < _COVER_PATIENCE:
                    score += literal(p - 1 - i) - copy(pos - 1 - i, p - 1 - i)
                    i += 1
                    if score > best:
                        best, back = score, i
            score = best = i = 0
            while (
                p + length + i < gap_end
                and pos + length + i < old_n
                and i - fwd < _COVER_PATIENCE
            ):
                score += literal(p + length + i) - copy(pos + length + i, p + length + i)
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


# --- relocation filters (ext/delta_filter.h) -------------------------------------------------


def _le16(b: bytes | bytearray, at: int) -> int:
    return b[at] | (b[at + 1] << 8)


def _le32(b: bytes | bytearray, at: int) -> int:
    return b[at] | (b[at + 1] << 8) | (b[at + 2] << 16) | (b[at + 3] << 24)


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _wrap64(v: int) -> int:
    return ((v + (1 << 63)) % (1 << 64)) - (1 << 63)


def _is_thumb_branch(b: bytes | bytearray, at: int) -> bool:
    h1, h2 = _le16(b, at), _le16(b, at + 2)
    return (h1 & 0xF800) == 0xF000 and (h2 & 0xD000) in (0xD000, 0x9000)


def _thumb_offset(b: bytes | bytearray, at: int) -> int:
    h1, h2 = _le16(b, at), _le16(b, at + 2)
    s, j1, j2 = (h1 >> 10) & 1, (h2 >> 13) & 1, (h2 >> 11) & 1
    i1, i2 = 1 ^ (j1 ^ s), 1 ^ (j2 ^ s)
    off = (i1 << 23) | (i2 << 22) | ((h1 & 0x3FF) << 12) | ((h2 & 0x7FF) << 1)
    return off - (1 << 24) if s else off


def _thumb_encode(out: bytearray, at: int, off: int) -> None:
    if off & 1 or off < -(1 << 24) or off >= (1 << 24):
        return
    h1, h2 = _le16(out, at), _le16(out, at + 2)
    s, i1, i2 = (off >> 24) & 1, (off >> 23) & 1, (off >> 22) & 1
    h1 = (h1 & 0xF800) | (s << 10) | ((off >> 12) & 0x3FF)
    h2 = (h2 & 0xD000) | (((1 ^ i1) ^ s) << 13) | (((1 ^ i2) ^ s) << 11) | ((off >> 1) & 0x7FF)
    out[at : at + 4] = bytes((h1 & 0xFF, h1 >> 8, h2 & 0xFF, h2 >> 8))


class _Lookup:
    """Largest key <= x of a (keys, deltas) map (ota_map_find)."""

    def __init__(self, pair: MapPair) -> None:
        keys, deltas = pair
        # Searched in place: copying a 2048-entry map into Python ints on every call would
        # cost the streaming applier more memory than its bound allows.
        self.keys = np.asarray(keys, dtype=np.int64)
        self.deltas = np.asarray(deltas, dtype=np.int64)
        if self.keys.ndim != 1 or self.keys.shape != self.deltas.shape:
            raise ValueError("a map needs one delta per key")

    def find_all(self, x: NDArray[np.int64]) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
        """(found, delta) per entry of ``x``; delta is 0 where no key is <= x."""
        after = np.searchsorted(self.keys, x, side="right")
        found = after > 0
        if not self.keys.shape[0]:
            return found, np.zeros(x.shape, dtype=np.int64)
        return found, np.where(found, self.deltas[after - 1], 0)


class _Model:
    def __init__(self, model: Model) -> None:
        filters, base, image_size, reloc, values = model
        _check_filters(filters)
        if not (0 <= base < (1 << 32) and 0 <= image_size <= (1 << 32)):
            raise ValueError(f"bad image range: base {base}, size {image_size}")
        self.filters, self.base, self.image_size = filters, base, image_size
        self.reloc, self.values = _Lookup(reloc), _Lookup(values)

    def in_image(self, words: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Per word value: does it point into the old image (ota_in_image)?"""
        inside: NDArray[np.bool_] = (words >= self.base) & (words - self.base < self.image_size)
        return inside & (self.image_size > 0)

    def predict_words(self, words: NDArray[np.int64]) -> NDArray[np.int64]:
        """ota_predict_word of each word value (0..2^32-1): moved by the relocation map
        (image offset) when it points into the image, else by the value map."""
        inside = self.in_image(words)
        found_in, delta_in = self.reloc.find_all(words - self.base)
        found_out, delta_out = self.values.find_all(words)
        found = np.where(inside, found_in, found_out)
        delta = np.where(inside, delta_in, delta_out)
        return np.where(found, (words + delta) & 0xFFFFFFFF, words)


#: Kinds of the items a walk consumes (codes in the arrays :func:`_events` returns).
_ITEM_BRANCH, _ITEM_WORD, _ITEM_CALL = 0, 1, 2


def _le16_at(view: NDArray[np.uint8], at: NDArray[np.int64]) -> NDArray[np.int64]:
    return view[at].astype(np.int64) | (view[at + 1].astype(np.int64) << 8)


def _le32_at(view: NDArray[np.uint8], at: NDArray[np.int64]) -> NDArray[np.int64]:
    return _le16_at(view, at) | (_le16_at(view, at + 2) << 16)


def _s32_all(v: NDArray[np.int64]) -> NDArray[np.int64]:
    return ((v + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def _thumb_branches_at(view: NDArray[np.uint8], at: NDArray[np.int64]) -> NDArray[np.bool_]:
    h1, h2 = _le16_at(view, at), _le16_at(view, at + 2)
    is_branch: NDArray[np.bool_] = ((h1 & 0xF800) == 0xF000) & (
        ((h2 & 0xD000) == 0xD000) | ((h2 & 0xD000) == 0x9000)
    )
    return is_branch


def _thumb_offsets(view: NDArray[np.uint8], at: NDArray[np.int64]) -> NDArray[np.int64]:
    """ota_thumb_offset of the BL/B.W at each offset ``at`` of ``view``."""
    h1, h2 = _le16_at(view, at), _le16_at(view, at + 2)
    s, j1, j2 = (h1 >> 10) & 1, (h2 >> 13) & 1, (h2 >> 11) & 1
    i1, i2 = 1 ^ (j1 ^ s), 1 ^ (j2 ^ s)
    off = (i1 << 23) | (i2 << 22) | ((h1 & 0x3FF) << 12) | ((h2 & 0x7FF) << 1)
    return off - (s << 24)


def _thumb_encode_all(
    out: NDArray[np.uint8], at: NDArray[np.int64], off: NDArray[np.int64]
) -> None:
    """ota_thumb_encode: offset ``off`` into the branch at each ``at`` of ``out``, where it
    fits (even, signed 25 bits); the others stay as they are."""
    fits = ((off & 1) == 0) & (off >= -(1 << 24)) & (off < (1 << 24))
    at, off = at[fits], off[fits]
    h1, h2 = _le16_at(out, at), _le16_at(out, at + 2)
    s, i1, i2 = (off >> 24) & 1, (off >> 23) & 1, (off >> 22) & 1
    h1 = (h1 & 0xF800) | (s << 10) | ((off >> 12) & 0x3FF)
    h2 = (h2 & 0xD000) | (((1 ^ i1) ^ s) << 13) | (((1 ^ i2) ^ s) << 11) | ((off >> 1) & 0x7FF)
    _put_le32(out, at, h1 | (h2 << 16))


def _put_le32(out: NDArray[np.uint8], at: NDArray[np.int64], values: NDArray[np.int64]) -> None:
    for byte in range(4):
        out[at + byte] = (values >> (8 * byte)) & 0xFF


def _grid_events(
    view: NDArray[np.uint8],
    base: int,
    firsts: NDArray[np.int64],
    avails: NDArray[np.int64],
    stops: NDArray[np.int64],
    thumb: bool,
    words: bool,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int8]]:
    """(walk index, old offset, kind) of the items the THUMB/WORDS walks consume, walks in
    order and each walk's items in order. ``view`` holds old offsets [base, base + len);
    walk i starts at the even offset firsts[i] and takes items at e < stops[i] with
    e + 4 <= avails[i].

    A branch or a 4-aligned word not overlapping one can start at every even offset
    (ext/delta_filter.h), so the candidates are found once for the whole view; a walk takes
    its candidates' range, plus a word that is one only in this walk (the branch right after
    it does not fit before avails[i]). Every item takes 2 halfwords: along a run of
    candidates at consecutive halfwords a walk takes the first, skips the second, takes the
    third, and so on."""
    none = np.empty(0, dtype=np.int64)
    e0 = base + (base & 1)  # halfword k of the grid is at old offset e0 + 2k
    count = max(0, (base + view.shape[0] - 4 - e0) // 2 + 1)  # e + 4 <= the view's end
    if count == 0 or firsts.shape[0] == 0:
        return none, none, np.empty(0, dtype=np.int8)
    branch = np.zeros(count + 1, dtype=bool)
    if thumb:
        # The halfwords at e0, e0 + 2, ... as strided slices (cheaper than gathering them).
        halves = view[e0 - base : e0 - base + 2 * count + 2]
        halfwords = halves[0::2].astype(np.uint16) | (halves[1::2].astype(np.uint16) << 8)
        h1, h2 = halfwords[:count], halfwords[1 : count + 1]
        branch[:count] = ((h1 & 0xF800) == 0xF000) & (
            ((h2 & 0xD000) == 0xD000) | ((h2 & 0xD000) == 0x9000)
        )
    aligned = np.zeros(count + 1, dtype=bool)
    aligned[(e0 & 3) >> 1 :: 2] = True  # 4-aligned halfwords
    word = np.zeros(count, dtype=bool)
    if words:
        word = aligned[:count] & ~branch[:count] & ~branch[1:]
    candidates = np.flatnonzero(branch[:count] | word)
    k_first = (firsts - e0) // 2
    k_last = (avails - 4 - e0) // 2  # the last halfword whose item fits
    k_stop = np.minimum(k_last, (stops - 1 - e0) // 2)
    lo = np.searchsorted(candidates, k_first, side="left")
    regular = np.maximum(np.searchsorted(candidates, k_stop, side="right") - lo, 0)
    at_last = np.clip(k_last, 0, count - 1)
    extra = (
        (k_first <= k_last)
        & (k_last <= k_stop)
        & aligned[at_last]
        & ~branch[at_last]
        & branch[at_last + 1]
    )
    if not words:
        extra[:] = False
    lengths = regular + extra
    total = int(lengths.sum())
    if total == 0:
        return none, none, np.empty(0, dtype=np.int8)
    walk_of = np.repeat(np.arange(firsts.shape[0]), lengths)
    index = np.arange(total)
    within = index - (np.cumsum(lengths) - lengths)[walk_of]
    padded = np.append(candidates, 0)  # so that an extra's index stays in bounds
    from_range = padded[np.minimum(lo[walk_of] + within, candidates.shape[0])]
    ks = np.where(within < regular[walk_of], from_range, at_last[walk_of])
    run_start = within == 0
    run_start[1:] |= ks[1:] != ks[:-1] + 1
    taken = (index - np.maximum.accumulate(np.where(run_start, index, 0))) % 2 == 0
    ks = ks[taken]
    kinds = np.where(branch[ks], _ITEM_BRANCH, _ITEM_WORD).astype(np.int8)
    return walk_of[taken], e0 + 2 * ks, kinds


def _events(
    view: NDArray[np.uint8], pos: int, span_end: int, stop: int, model: _Model
) -> tuple[NDArray[np.int8], NDArray[np.int64]]:
    """(kinds, old offsets) of the items (_ITEM_BRANCH/_ITEM_WORD/_ITEM_CALL) the walk over
    [pos, stop) consumes, in order; ``view`` holds the old bytes from offset ``pos``."""
    filters = model.filters
    none = (np.empty(0, dtype=np.int8), np.empty(0, dtype=np.int64))
    avail_end = min(span_end, pos + view.shape[0])
    if not filters & FILTER_X86 and filters & (FILTER_THUMB | FILTER_WORDS):
        _, at, kinds = _grid_events(
            view,
            pos,
            np.array([pos + (pos & 1)], dtype=np.int64),
            np.array([avail_end], dtype=np.int64),
            np.array([stop], dtype=np.int64),
            bool(filters & FILTER_THUMB),
            bool(filters & FILTER_WORDS),
        )
        return kinds, at
    if filters & FILTER_X86:
        room = max(0, min(stop, span_end - 4) - pos)  # e + 5 <= span_end and e < stop
        calls = np.zeros(max(0, stop - pos), dtype=bool)
        calls[:room] = (view[:room] == 0xE8) | (view[:room] == 0xE9)
        pointers = np.zeros_like(calls)
        if filters & FILTER_WORDS and model.image_size > 0:
            reach = max(0, min(stop, span_end - 3) - pos)  # e + 4 <= span_end
            pointers[:reach] = model.in_image(_le32_at(view, np.arange(reach)))
        kind_list: list[int] = []
        at_list: list[int] = []
        s = pos
        is_pointer = pointers.tolist()
        for rel in np.flatnonzero(calls | pointers).tolist():
            if pos + rel < s:
                continue  # inside the item before (calls and words overlap: walk in order)
            kind_list.append(_ITEM_WORD if is_pointer[rel] else _ITEM_CALL)
            at_list.append(pos + rel)
            s = pos + rel + (4 if is_pointer[rel] else 5)
        return np.array(kind_list, dtype=np.int8), np.array(at_list, dtype=np.int64)
    return none


def _walk_end(pos: int, span_end: int, stop: int, filters: int, last: int) -> int:
    """Old offset where the walk stops, given the end of the last consumed item."""
    s = max(last, pos)
    if s >= stop:
        return s
    if not filters & FILTER_X86 and filters & (FILTER_THUMB | FILTER_WORDS):
        return stop if stop % 2 == 0 or stop == span_end else stop + 1
    return stop


def _wrap25(t: NDArray[np.int64]) -> NDArray[np.int64]:
    return (((t + (1 << 24)) & ((1 << 25) - 1)) - (1 << 24)) & ~1


def normalize(image: Buffer, model: Model) -> bytes:
    """``image`` with branches and calls holding absolute (mapped) targets, words mapped."""
    data = bytes(image)
    return _walk(data, 0, len(data), len(data), 0, model, absolute=True)[0]


def predict(
    src: Buffer, pos: int, span_end: int, limit: int, shift: int, model: Model
) -> tuple[bytes, int]:
    """Predicted new bytes for old bytes ``src`` (from old offset ``pos``) of a copy span."""
    return _walk(src, pos, span_end, limit, shift, model, absolute=False)


def _rewrite(
    out: NDArray[np.uint8],
    data: NDArray[np.uint8],
    rel: NDArray[np.int64],
    kinds: NDArray[np.int8],
    at: NDArray[np.int64],
    shift: NDArray[np.int64],
    walk: _Model,
    absolute: bool,
) -> None:
    """The walk's rewrite of every consumed item at once (items never overlap): the item of
    kind ``kinds[i]`` at old offset ``at[i]`` sits at ``rel[i]`` in ``data`` (the old bytes)
    and ``out`` (their prediction, a copy of ``data`` to start with); its copy moves it by
    ``shift[i]``. Arithmetic wraps at 64 bits as ota_wrap's does (numpy int64 wraps)."""
    # (each kind only when present: the streaming applier predicts in small pieces, where
    # numpy's per-call cost would dominate)
    is_branch, is_word = kinds == _ITEM_BRANCH, kinds == _ITEM_WORD
    word_rel = rel[is_word]
    if word_rel.shape[0]:
        _put_le32(out, word_rel, walk.predict_words(_le32_at(data, word_rel)))
    b_rel, b_at, b_shift = rel[is_branch], at[is_branch], shift[is_branch]
    if b_rel.shape[0]:
        target = b_at + 4 + _thumb_offsets(data, b_rel)
        found, delta = walk.reloc.find_all(target)
        if absolute:
            _thumb_encode_all(out, b_rel, _wrap25(target + delta))
        else:
            _thumb_encode_all(out, b_rel[found], (target + delta - (b_at + b_shift + 4))[found])
    is_call = kinds == _ITEM_CALL
    if not is_call.any():
        return
    c_rel, c_at, c_shift = rel[is_call], at[is_call], shift[is_call]
    target = c_at + 5 + _s32_all(_le32_at(data, c_rel + 1))
    found, delta = walk.reloc.find_all(target)
    if absolute:
        _put_le32(out, c_rel + 1, (target + delta) & 0xFFFFFFFF)
    else:
        moved = (target + delta - (c_at + c_shift + 5)) & 0xFFFFFFFF
        _put_le32(out, c_rel[found] + 1, moved[found])


def _walk(
    src: Buffer, pos: int, span_end: int, limit: int, shift: int, model: Model, absolute: bool
) -> tuple[bytes, int]:
    walk = _Model(model)
    if not (0 <= pos <= span_end <= _POSITION_LIMIT) or limit < pos:
        raise ValueError(f"bad span: pos {pos}, end {span_end}, limit {limit}")
    if abs(shift) > _POSITION_LIMIT:
        raise ValueError(f"shift {shift} is out of range")
    stop = min(limit, span_end)
    need = min(limit + LOOKAHEAD, span_end) - pos
    data = bytes(src)
    if len(data) < need:
        raise ValueError(f"predict needs {need} old bytes, got {len(data)}")
    view = np.frombuffer(data, dtype=np.uint8, count=need)
    kinds, at = _events(view, pos, span_end, stop, walk)
    if not at.shape[0]:  # nothing to rewrite: the old bytes as they are
        end = _walk_end(pos, span_end, stop, walk.filters, pos)
        return data[: end - pos], end
    out = view.copy()
    _rewrite(out, view, at - pos, kinds, at, np.full(at.shape, shift, np.int64), walk, absolute)
    last = pos
    if at.shape[0]:
        last = int(at[-1]) + (5 if kinds[-1] == _ITEM_CALL else 4)
    end = _walk_end(pos, span_end, stop, walk.filters, last)
    return out[: end - pos].tobytes(), end


def _span_rows(spans: object, old_n: int, new_n: int) -> list[list[int]]:
    rows: list[list[int]] = np.ascontiguousarray(spans, dtype=np.int64).reshape(-1, 3).tolist()
    for i, (new_pos, old_pos, length) in enumerate(rows):
        if length < 0 or new_pos < 0 or old_pos < 0 or new_pos + length > new_n:
            raise ValueError(f"span {i} {(new_pos, old_pos, length)} is outside the images")
        if old_pos + length > old_n:
            raise ValueError(f"span {i} {(new_pos, old_pos, length)} is outside the images")
    return rows


def _span_events(
    old: NDArray[np.uint8], rows: list[list[int]], walk: _Model
) -> tuple[NDArray[np.int8], NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """(kinds, old offsets, shifts, offsets in the spans' old bytes laid end to end) of the
    items the walk consumes in each copy span, spans in order."""
    table = np.array([row for row in rows if row[2] > 0], dtype=np.int64).reshape(-1, 3)
    new_pos, old_pos, length = table[:, 0], table[:, 1], table[:, 2]
    laid = np.cumsum(length) - length  # where each span's old bytes start, laid end to end
    ends = old_pos + length
    filters = walk.filters
    if not filters or not table.shape[0]:
        empty = np.empty(0, dtype=np.int64)
        return np.empty(0, dtype=np.int8), empty, empty, empty
    if not filters & FILTER_X86 and filters & (FILTER_THUMB | FILTER_WORDS):
        span_of, at, kinds = _grid_events(
            old,
            0,
            old_pos + (old_pos & 1),
            ends,
            ends,
            bool(filters & FILTER_THUMB),
            bool(filters & FILTER_WORDS),
        )
        return kinds, at, (new_pos - old_pos)[span_of], at - old_pos[span_of] + laid[span_of]
    kinds_list, ats, shifts, rels = [], [], [], []
    for (span_new, span_old, _), span_end, span_laid in zip(
        table.tolist(), ends.tolist(), laid.tolist(), strict=True
    ):
        kind, at = _events(old[span_old:span_end], span_old, span_end, span_end, walk)
        kinds_list.append(kind)
        ats.append(at)
        shifts.append(np.full(at.shape, span_new - span_old, np.int64))
        rels.append(at - span_old + span_laid)
    if not kinds_list:
        empty = np.empty(0, dtype=np.int64)
        return np.empty(0, dtype=np.int8), empty, empty, empty
    return (
        np.concatenate(kinds_list),
        np.concatenate(ats),
        np.concatenate(shifts),
        np.concatenate(rels),
    )


def observe(old: Buffer, new: Buffer, spans: object, model: Model) -> tuple[NDArray, ...]:
    """(branch_keys, branch_deltas, word_keys, word_deltas) as in the native kernel."""
    walk = _Model(model)
    o, nw = bytes(old), bytes(new)
    rows = _span_rows(spans, len(o), len(nw))
    old_view = np.frombuffer(o, dtype=np.uint8)
    new_view = np.frombuffer(nw, dtype=np.uint8)
    kinds, at, shift, _ = _span_events(old_view, rows, walk)
    moved_at = at + shift
    # Branches (and calls, never in the same walk) that are still one in new, in order.
    branch_at, branch_moved_at = at[kinds == _ITEM_BRANCH], moved_at[kinds == _ITEM_BRANCH]
    kept = _thumb_branches_at(new_view, branch_moved_at)
    branch_at, branch_moved_at = branch_at[kept], branch_moved_at[kept]
    targets = branch_at + 4 + _thumb_offsets(old_view, branch_at)
    moved = branch_moved_at + 4 + _thumb_offsets(new_view, branch_moved_at)
    call_at, call_moved_at = at[kinds == _ITEM_CALL], moved_at[kinds == _ITEM_CALL]
    kept = new_view[call_moved_at] == old_view[call_at]
    call_at, call_moved_at = call_at[kept], call_moved_at[kept]
    if call_at.shape[0]:
        targets = call_at + 5 + _s32_all(_le32_at(old_view, call_at + 1))
        moved = call_moved_at + 5 + _s32_all(_le32_at(new_view, call_moved_at + 1))
    word_at, word_moved_at = at[kinds == _ITEM_WORD], moved_at[kinds == _ITEM_WORD]
    values = _le32_at(old_view, word_at)
    word_deltas = _s32_all(_le32_at(new_view, word_moved_at) - values)
    return targets, moved - targets, values, word_deltas


def diff_spans(old: Buffer, new: Buffer, spans: object, model: Model) -> bytes:
    """Concatenated difference bytes (new - predicted, mod 256) of every copy span, in order.

    Every span's walk at once: its old bytes laid end to end, rewritten item by item."""
    walk = _Model(model)
    o, nw = bytes(old), bytes(new)
    rows = _span_rows(spans, len(o), len(nw))
    old_view = np.frombuffer(o, dtype=np.uint8)
    new_view = np.frombuffer(nw, dtype=np.uint8)
    laid_old = [old_view[old_pos : old_pos + length] for _, old_pos, length in rows]
    laid_new = [new_view[new_pos : new_pos + length] for new_pos, _, length in rows]
    if not laid_old:
        return b""
    data = np.concatenate(laid_old)
    kinds, at, shift, rel = _span_events(old_view, rows, walk)
    predicted = data.copy()
    _rewrite(predicted, data, rel, kinds, at, shift, walk, absolute=False)
    return (np.concatenate(laid_new) - predicted).tobytes()


def add_bytes(a: Buffer, b: Buffer) -> bytes:
    """Bytewise (a + b) mod 256 of two equally long buffers."""
    x = np.frombuffer(bytes(a), dtype=np.uint8)
    y = np.frombuffer(bytes(b), dtype=np.uint8)
    if x.shape != y.shape:
        raise ValueError(f"cannot add {x.shape[0]} bytes to {y.shape[0]} bytes")
    return (x + y).tobytes()


def _sub_bytes(a: Buffer, b: Buffer) -> bytes:
    """Bytewise (a - b) mod 256 of two equally long buffers."""
    x = np.frombuffer(bytes(a), dtype=np.uint8)
    y = np.frombuffer(bytes(b), dtype=np.uint8)
    return (x - y).tobytes()
