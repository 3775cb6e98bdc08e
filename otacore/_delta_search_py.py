"""Pure-Python twin of the delta kernel's index: the suffix array and the search in it.

Mirrors ext/delta_sais.h (``suffix_array``; SA-IS there, numpy prefix doubling here: the
suffix array is unique, so both give the same) and ota_search / ota_common_prefix of
ext/delta_match.h (:func:`_search`: the same answer as the C bisection, found with ``bisect``
on bytes slices after one vectorised ``searchsorted`` of every position's first 8 bytes,
:func:`_word_ranges`, which also answers every search that finds fewer). The ranges are kept
per suffix array (:func:`_cached_ranges`) and made again only where the new image's words
changed when the maker's second pass brings the same old image. Used by the matcher twin,
otacore/_delta_match_py.py; the kernel API is re-exported by otacore/_delta_py.py.
"""

from __future__ import annotations

import weakref
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from otacore._types import Buffer

MAX_INDEXED = 0x7FFFFFFF
_MAX_MATCH = 1 << 20


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
    size = _WORD  # compared at once: doubles while the bytes agree
    while done < limit:
        if size > limit - done:
            size = limit - done
        x = a[a_at + done : a_at + done + size]
        y = b[b_at + done : b_at + done + size]
        if x != y:
            # As ota_common_prefix: the lowest set bit of the little-endian XOR is in the
            # first byte that differs.
            diff = int.from_bytes(x, "little") ^ int.from_bytes(y, "little")
            return done + (((diff & -diff).bit_length() - 1) >> 3)
        done += size
        size *= 2
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


class _RangesEntry(NamedTuple):
    """What :func:`_cached_ranges` keeps per suffix array."""

    suffixes: weakref.ref[NDArray[np.int32]]
    old: bytes
    new: bytes
    sorted_words: NDArray[np.uint64]  # old's words in suffix array order
    keys: NDArray[np.uint64]  # new's words (:func:`_words`)
    arrays: tuple[NDArray[np.int64], ...]  # :func:`_word_ranges` as arrays
    views: tuple[memoryview, ...]  # ... as memoryviews, and :func:`_known_lengths`


#: id(suffix array) -> its entry: the maker runs find_matches and then cover_gaps on the same
#: three objects, then both again with the same old image and suffix array and a new image
#: normalised another way (pass 2: 13% of the words differ over the public corpus), whose
#: ranges are those of pass 1 except at the words that changed. An entry goes when its
#: suffix array does.
_ranges_cache: dict[int, _RangesEntry] = {}


def _cached_ranges(old: bytes, index: NDArray[np.int32], new: bytes) -> tuple[memoryview, ...]:
    """:func:`_word_ranges` and :func:`_known_lengths`, kept while the suffix array ``index``
    lives, and made again only at the positions whose word changed when the same old image
    comes with another new."""
    key = id(index)
    entry = _ranges_cache.get(key)
    if entry is not None and (entry.suffixes() is not index or entry.old is not old):
        entry = None
    if entry is not None and entry.new is new:
        return entry.views
    keys = _words(new, max(len(new) - _WORD + 1, 0))
    if entry is not None and entry.keys.shape == keys.shape:
        # Each position's ranges are a function of its word alone (and of old and index).
        sorted_words = entry.sorted_words
        changed = np.flatnonzero(keys != entry.keys)
        arrays = tuple(array.copy() for array in entry.arrays)
        for array, part in zip(
            arrays, _key_ranges(old, index, sorted_words, keys[changed]), strict=True
        ):
            array[changed] = part
    else:
        sorted_words = _words(old, len(old))[index]
        arrays = _key_ranges(old, index, sorted_words, keys)
    # memoryviews: fast indexing into ints; and the known lengths for the matcher's loops
    views = (*(array.data for array in arrays), _known_lengths(arrays, len(new)).data)
    try:
        reference = weakref.ref(index, lambda _: _ranges_cache.pop(key, None))
    except TypeError:  # not weakly referenceable (a view of another array's memory is)
        return views
    _ranges_cache[key] = _RangesEntry(reference, old, new, sorted_words, keys, arrays, views)
    return views


def _known_lengths(arrays: tuple[NDArray[np.int64], ...], new_n: int) -> NDArray[np.int64]:
    """Per position of new: the length of :func:`_search`'s answer for any key of at least
    _WORD bytes where :func:`_word_ranges`' ``arrays`` give it (no suffix shares the first
    _WORD bytes), else -1: one lookup per position for the loops instead of three."""
    first, end, found_len = arrays[:3]
    known = np.full(new_n, -1, dtype=np.int64)
    known[: first.shape[0]] = np.where(first == end, found_len, -1)
    return known


def _word_ranges(old: bytes, index: NDArray[np.int32], new: bytes) -> tuple[memoryview, ...]:
    """Per position q of ``new`` that has _WORD bytes: (first, end), the range of suffix array
    entries whose suffixes start with new[q:q + _WORD], except that it may begin with suffixes
    shorter than _WORD that are a prefix of it (zero padding makes them compare equal); and,
    where that range is empty, (length, old position): :func:`_search`'s answer for any key
    of at least _WORD bytes starting at q."""
    keys = _words(new, max(len(new) - _WORD + 1, 0))
    arrays = _key_ranges(old, index, _words(old, len(old))[index], keys)
    return tuple(array.data for array in arrays)


def _key_ranges(
    old: bytes, index: NDArray[np.int32], sorted_words: NDArray[np.uint64], keys: NDArray[np.uint64]
) -> tuple[NDArray[np.int64], ...]:
    """:func:`_word_ranges`'s four arrays for the words ``keys`` (``sorted_words``: old's words
    in the order of its suffix array ``index``).

    The suffix array sorts the padded words too, so one vectorised ``searchsorted`` per side
    does the first _WORD bytes of every search at once. Where no suffix shares them, the
    boundary is ``first`` itself, and the common prefixes of its two neighbours are the equal
    leading bytes of two words (fewer than _WORD, capped at the suffix's length)."""
    old_n = len(old)
    count = keys.shape[0]
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
    return first, end, found_len, found_at


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
