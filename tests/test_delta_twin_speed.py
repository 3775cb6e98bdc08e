"""The pure-Python delta twin's shortcuts (otacore/_delta_*_py.py) against what they replace.

The twin answers ota_search (ext/delta_match.h) by bisecting bytes slices from vectorised
8-byte ranges instead of the C loop (made again only where the words changed when the same
old image comes back), builds the suffix array by prefix doubling, and walks the
THUMB/WORDS items of all copy spans at once. Each test here drives one shortcut over inputs
chosen for its edge cases (zero padding past the image's end, long runs, spans that start at
odd offsets, overlap in old, or end between a word and a branch) and compares it with a
step-by-step transcription of the C code or with the native kernel. Seeds are printed.
"""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from otacore import _delta_py as twin
from otacore import _delta_search_py as twin_search
from otacore._select import load_native

NATIVE = load_native("delta")
needs_native = pytest.mark.skipif(NATIVE is None, reason="native delta kernel not built")


def _c_search(old: bytes, sa: list[int], new: bytes, scan: int, end: int | None) -> tuple[int, int]:
    """ota_search as written in ext/delta_match.h (the binary search with both ends'
    common prefixes), with a byte-by-byte common prefix: the reference for twin_search._search."""

    def common(a_at: int, b_at: int, limit: int) -> int:
        i = 0
        while i < limit and old[a_at + i] == new[b_at + i]:
            i += 1
        return i

    old_n = len(old)
    key_n = min((len(new) if end is None else end) - scan, 1 << 20)
    if old_n == 0 or key_n == 0:
        return 0, 0
    lo, hi = 0, old_n - 1
    lcp_lo = common(sa[lo], scan, min(old_n - sa[lo], key_n))
    lcp_hi = common(sa[hi], scan, min(old_n - sa[hi], key_n))
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        start = min(lcp_lo, lcp_hi)
        room = old_n - sa[mid]
        length = start + common(sa[mid] + start, scan + start, min(room, key_n) - start)
        if length == key_n:
            below = False
        elif length == room:
            below = True
        else:
            below = old[sa[mid] + length] < new[scan + length]
        if below:
            lo, lcp_lo = mid, length
        else:
            hi, lcp_hi = mid, length
    return (lcp_lo, sa[lo]) if lcp_lo >= lcp_hi else (lcp_hi, sa[hi])


def _edited(rng: random.Random, data: bytes, alphabet: int) -> bytes:
    """``data`` with a few bytes changed, strings inserted and removed."""
    out = bytearray(data)
    for _ in range(rng.randrange(8)):
        at = rng.randrange(len(out) + 1)
        roll = rng.randrange(3)
        if roll == 0 and out:
            out[at % len(out)] = rng.randrange(alphabet)
        elif roll == 1:
            out[at:at] = bytes(rng.randrange(alphabet) for _ in range(rng.randrange(1, 40)))
        else:
            del out[at : at + rng.randrange(1, 40)]
    return bytes(out)


def test_search_agrees_with_the_c_binary_search() -> None:
    """Small alphabets make long shared prefixes, suffixes that end inside the first 8 bytes
    (zero padding), and keys cut short by ``end``: every boundary case of the bisection."""
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(150):
        alphabet = rng.choice([1, 2, 3, 256])
        old = bytes(rng.randrange(alphabet) for _ in range(rng.choice([1, 2, 7, 9, 40, 600])))
        new = _edited(rng, old, alphabet) if rng.random() < 0.7 else old[::-1]
        index = twin.suffix_array(old)
        sa = index.tolist()
        ranges = twin_search._word_ranges(old, index, new)
        for scan in range(len(new)):
            end = rng.choice([None, rng.randrange(scan, len(new) + 1)])
            want = _c_search(old, sa, new, scan, end)
            got = twin_search._search(old, sa, new, scan, end)
            assert got == want, (seed, old, new, scan, end)
            got = twin_search._search(old, index.data, new, scan, end, ranges)
            assert got == want, (seed, scan)


def test_ranges_made_again_only_where_words_changed() -> None:
    """The maker matches a second new image (normalised another way) against the same old
    image and suffix array; the twin then makes the ranges again only where new's words
    changed. They must equal the ranges made from scratch, for images of the same length
    (the incremental path) and of another length (made whole)."""
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(60):
        alphabet = rng.choice([2, 4, 256])
        old = bytes(rng.randrange(alphabet) for _ in range(rng.choice([5, 9, 60, 700])))
        index = twin.suffix_array(old)
        new = _edited(rng, old, alphabet)
        twin_search._cached_ranges(old, index, new)
        for _ in range(3):
            changed = bytearray(new)
            for _ in range(rng.randrange(4)):
                if changed:
                    changed[rng.randrange(len(changed))] = rng.randrange(alphabet)
            if rng.random() < 0.2:
                changed += bytes(rng.randrange(alphabet) for _ in range(rng.randrange(1, 9)))
            new = bytes(changed)
            got = twin_search._cached_ranges(old, index, new)
            want = twin_search._word_ranges(old, index, new)
            for got_part, want_part in zip(got[:4], want, strict=True):
                assert got_part.tolist() == want_part.tolist(), (seed, old, new)
            # and the lengths the loops read: the search's answer where no suffix shares
            # the first 8 bytes, else -1 (a search is needed)
            first, end, found_len = (part.tolist() for part in want[:3])
            known = [n if f == e else -1 for f, e, n in zip(first, end, found_len, strict=True)]
            known += [-1] * (len(new) - len(known))
            assert got[4].tolist() == known, (seed, old, new)


@needs_native
def test_suffix_array_of_long_runs_and_repeats() -> None:
    """Runs and repeats keep suffixes tied for many doubling rounds."""
    assert NATIVE is not None
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(60):
        unit = bytes(rng.randrange(rng.choice([1, 2, 256])) for _ in range(rng.randrange(1, 9)))
        data = unit * rng.randrange(1, 300) + bytes(rng.randrange(4) for _ in range(5))
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(3))) + data
        assert np.array_equal(twin.suffix_array(data), NATIVE.suffix_array(data)), (seed, data)


@needs_native
def test_matches_and_covers_on_repetitive_images() -> None:
    assert NATIVE is not None
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(40):
        alphabet = rng.choice([2, 4, 256])
        old = bytes(rng.randrange(alphabet) for _ in range(rng.choice([50, 800, 3000])))
        if rng.random() < 0.5:
            old = old[:100] + bytes(rng.randrange(600)) + old[100:]  # a run of zeros (padding)
        new = _edited(rng, old, alphabet)
        sa = NATIVE.suffix_array(old)
        for threshold, step in ((0, 1), (8, 1), (16, 4)):
            spans = NATIVE.find_matches(old, new, sa, threshold, step)
            assert np.array_equal(spans, twin.find_matches(old, new, sa, threshold, step)), seed
        costs = NATIVE.literal_costs(new, 128, 16, 40)
        covered = NATIVE.cover_gaps(old, new, sa, spans, costs)
        assert np.array_equal(covered, twin.cover_gaps(old, new, sa, spans, costs)), seed
        # A second new image of the same length against the same old image and suffix array
        # (the maker's pass 2): the twin makes its ranges again only where words changed. (Its
        # cache holds a suffix array that owns its memory, as the twin's own does.)
        twin_sa = twin.suffix_array(old)
        assert np.array_equal(spans, twin.find_matches(old, new, twin_sa, 16, 4)), seed
        changed = bytearray(new)
        for _ in range(rng.randrange(1, 6) if changed else 0):  # the edits may delete it all
            changed[rng.randrange(len(changed))] = rng.randrange(alphabet)
        second = bytes(changed)
        spans = NATIVE.find_matches(old, second, sa, 8, 2)
        assert np.array_equal(spans, twin.find_matches(old, second, twin_sa, 8, 2)), seed
        costs = NATIVE.literal_costs(second, 128, 16, 40)
        covered = NATIVE.cover_gaps(old, second, sa, spans, costs)
        assert np.array_equal(covered, twin.cover_gaps(old, second, twin_sa, spans, costs)), seed


def _thumb_code(rng: random.Random, size: int) -> bytes:
    """BL/B.W instructions (some back to back, some at odd offsets), pointers, calls, noise."""
    out = bytearray()
    while len(out) < size:
        roll = rng.random()
        if roll < 0.35:
            low = rng.choice([0xD000, 0xF800, 0x9000, 0xB800]) | rng.randrange(0x800)
            out += struct.pack("<HH", 0xF000 | rng.randrange(0x800), low)
        elif roll < 0.55:
            out += struct.pack("<I", rng.randrange(0x07FF0000, 0x08020000))
        elif roll < 0.65:
            out += b"\xe8" + struct.pack("<i", rng.randrange(-4000, 4000))
        else:
            out += rng.randbytes(rng.randrange(1, 4))
    return bytes(out[:size])


def _map(rng: random.Random, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    keys = sorted(rng.sample(range(lo, hi), rng.randrange(6)))
    return np.array(keys, np.int64), np.array([rng.randrange(-300, 300) for _ in keys], np.int64)


@needs_native
def test_walks_of_arbitrary_spans_agree() -> None:
    """Spans the matcher would not make: odd starts, ends right before a branch's second
    halfword, old ranges that overlap, empty spans; and single walks cut by ``limit``."""
    assert NATIVE is not None
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(150):
        size = rng.choice([4, 40, 400])
        old = _thumb_code(rng, size)
        new = _edited(rng, old, 256)
        filters = rng.choice([0, 1, 2, 4, 5, 6])
        model = (
            filters, 0x08000000, rng.choice([0, size, 0x10000]),
            _map(rng, 0, size + 64), _map(rng, 0x07FF0000, 0x08020000),
        )  # fmt: skip
        rows = []
        for _ in range(rng.randrange(10)):
            length = rng.randrange(min(size, len(new)) + 1)
            new_pos = rng.randrange(len(new) - length + 1)
            rows.append((new_pos, rng.randrange(size - length + 1), length))
        spans = np.array(sorted(rows), dtype=np.int64).reshape(-1, 3)
        observed = NATIVE.observe(old, new, spans, model)
        for ours, theirs in zip(twin.observe(old, new, spans, model), observed, strict=True):
            assert np.array_equal(ours, theirs), seed
        assert twin.diff_spans(old, new, spans, model) == NATIVE.diff_spans(old, new, spans, model)
        assert twin.normalize(old, model) == NATIVE.normalize(old, model), seed
        pos = rng.randrange(size + 1)
        span_end = rng.randrange(pos, size + 1)
        limit = rng.randrange(pos, span_end + 3)
        src = old[pos : min(limit + 8, span_end)]
        shift = rng.randrange(-99, 99)
        want = NATIVE.predict(src, pos, span_end, limit, shift, model)
        assert twin.predict(src, pos, span_end, limit, shift, model) == want, seed
