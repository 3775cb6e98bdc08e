"""Pure-Python twin of ext/delta.pyx (same functions, same results, much slower).

The suffix array uses numpy prefix doubling (the suffix array is unique, so it equals SA-IS's
result); the matcher, the gap covers and the filter walk follow ext/delta_match.h and
ext/delta_filter.h step by step (the covers skip searches that cannot find 4 bytes by a
vectorised 4-gram lookup first), so spans, predictions and difference bytes are identical.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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


def suffix_array(data: Buffer) -> NDArray[np.int32]:
    """Suffix array of ``data`` as an int32 numpy array (prefix doubling)."""
    text = np.frombuffer(bytes(data), dtype=np.uint8)
    n = int(text.shape[0])
    if n > MAX_INDEXED:
        raise ValueError(f"cannot index {n} bytes; the limit is {MAX_INDEXED}")
    if n == 0:
        return np.empty(0, dtype=np.int32)
    rank = text.astype(np.int64)
    positions = np.arange(n, dtype=np.int64)
    step = 1
    while True:
        # Second key: rank of the suffix `step` further on, 0 past the end (shorter first).
        second = np.zeros(n, dtype=np.int64)
        second[: n - step] = rank[step:] + 1 if step < n else second[:0]
        order = np.lexsort((second, rank))
        first_sorted, second_sorted = rank[order], second[order]
        changed = np.empty(n, dtype=bool)
        changed[0] = False
        changed[1:] = (first_sorted[1:] != first_sorted[:-1]) | (
            second_sorted[1:] != second_sorted[:-1]
        )
        new_rank = np.empty(n, dtype=np.int64)
        new_rank[order] = np.cumsum(changed)
        rank = new_rank
        if int(rank.max()) == n - 1 or step >= n:
            return positions[order].astype(np.int32)
        step *= 2


def _common_prefix(a: bytes, a_at: int, b: bytes, b_at: int, limit: int) -> int:
    """Number of equal bytes of a[a_at:] and b[b_at:], at most limit."""
    done = 0
    step = 16
    while done < limit:
        size = min(step, limit - done)
        if a[a_at + done : a_at + done + size] == b[b_at + done : b_at + done + size]:
            done += size
            step *= 2
        elif size > 16:
            step = size // 2  # the first difference is in this chunk: narrow it down
        else:
            for k in range(size):
                if a[a_at + done + k] != b[b_at + done + k]:
                    return done + k
    return done


def _search(
    old: bytes, sa: list[int], new: bytes, scan: int, end: int | None = None
) -> tuple[int, int]:
    """(length, old position) of the longest prefix of new[scan:end] found in old."""
    old_n = len(old)
    key_n = min((len(new) if end is None else end) - scan, _MAX_MATCH)
    if old_n == 0 or key_n == 0:
        return 0, 0
    lo, hi = 0, old_n - 1
    lcp_lo = _common_prefix(old, sa[lo], new, scan, min(old_n - sa[lo], key_n))
    lcp_hi = _common_prefix(old, sa[hi], new, scan, min(old_n - sa[hi], key_n))
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        start = min(lcp_lo, lcp_hi)
        suffix = sa[mid]
        room = old_n - suffix
        limit = min(room, key_n)
        common = start + _common_prefix(old, suffix + start, new, scan + start, limit - start)
        if common == key_n:
            below = False
        elif common == room:
            below = True
        else:
            below = old[suffix + common] < new[scan + common]
        if below:
            lo, lcp_lo = mid, common
        else:
            hi, lcp_hi = mid, common
    if lcp_lo >= lcp_hi:
        return lcp_lo, sa[lo]
    return lcp_hi, sa[hi]


def find_matches(
    old: Buffer, new: Buffer, sa: NDArray[np.int32], threshold: int = 8, step: int = 1
) -> NDArray:
    """Copy spans covering ``new`` from ``old``: int64 rows (new_pos, old_pos, length)."""
    o, nw = bytes(old), bytes(new)
    old_n, new_n = len(o), len(nw)
    index = np.ascontiguousarray(sa, dtype=np.int32)
    if index.shape[0] != old_n:
        raise ValueError(f"suffix array has {index.shape[0]} entries for {old_n} bytes")
    if threshold < 0 or step < 1:
        raise ValueError("threshold must not be negative and step must be positive")
    if old_n and (int(index.min()) < 0 or int(index.max()) >= old_n):
        raise ValueError("suffix array entries are outside the old image")
    sa_list = index.tolist()

    def same(o_at: int, n_at: int) -> bool:
        return 0 <= o_at < old_n and o[o_at] == nw[n_at]

    spans: list[tuple[int, int, int]] = []
    scan = match_len = pos = 0
    last_scan = last_pos = last_offset = 0
    while scan < new_n:
        old_score = 0
        scan += match_len
        scored = scan
        while scan < new_n:
            match_len, pos = _search(o, sa_list, nw, scan)
            while scored < scan + match_len:
                if same(scored + last_offset, scored):
                    old_score += 1
                scored += 1
            if (match_len == old_score and match_len != 0) or match_len > old_score + threshold:
                break
            if match_len > _SKIP_LEN:
                skip_to = scan + match_len // 2
                while scan < skip_to:
                    if same(scan + last_offset, scan):
                        old_score -= 1
                    scan += 1
                continue
            for _ in range(step):
                if scan >= new_n:
                    break
                if same(scan + last_offset, scan):
                    old_score -= 1
                scan += 1
        if match_len != old_score or scan == new_n:
            len_fwd = len_back = 0
            agree = best = i = 0
            while last_scan + i < scan and last_pos + i < old_n:
                if o[last_pos + i] == nw[last_scan + i]:
                    agree += 1
                i += 1
                if agree * 2 - i > best * 2 - len_fwd:
                    best, len_fwd = agree, i
            if scan < new_n:
                agree = best = 0
                i = 1
                while scan >= last_scan + i and pos >= i:
                    if o[pos - i] == nw[scan - i]:
                        agree += 1
                    if agree * 2 - i > best * 2 - len_back:
                        best, len_back = agree, i
                    i += 1
            if last_scan + len_fwd > scan - len_back:
                overlap = (last_scan + len_fwd) - (scan - len_back)
                score = best_score = split = 0
                for i in range(overlap):
                    if nw[last_scan + len_fwd - overlap + i] == o[last_pos + len_fwd - overlap + i]:
                        score += 1
                    if nw[scan - len_back + i] == o[pos - len_back + i]:
                        score -= 1
                    if score > best_score:
                        best_score, split = score, i + 1
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
    """Per position of ``new``: does the _COVER_MIN-gram starting there occur in old?"""
    found = np.zeros(len(new), dtype=bool)
    grams = _grams(new)
    if grams.shape[0] and old_grams.shape[0]:
        found[: grams.shape[0]] = np.isin(grams, np.unique(old_grams))
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
    sa_list = index.tolist()
    # A search finds _COVER_MIN bytes or more exactly where new's _COVER_MIN-gram at that
    # position occurs in old: a set lookup, done for all positions at once, skips the
    # searches that cannot succeed (most of a literal gap) without changing any result.
    seen = _grams_in(nw, _grams(o))

    literal = costs.__getitem__
    def copy(o_at: int, n_at: int) -> int:
        return _COVER_EQUAL if o[o_at] == nw[n_at] else _COVER_WRONG

    out: list[list[int]] = []
    at = cursor = 0  # new and old end of the last span out
    for gap_end, span_old, span_len in [*rows, [new_n, 0, 0]]:
        p = at
        while gap_end - p >= _COVER_MIN:
            if not seen[p]:
                p += 1
                continue
            length, pos = _search(o, sa_list, nw, p, gap_end)
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
    """Largest key <= x of a (keys, deltas) map."""

    def __init__(self, pair: MapPair) -> None:
        keys, deltas = pair
        # Searched in place: copying a 2048-entry map into Python ints on every call would
        # cost the streaming applier more memory than its bound allows.
        self.keys = np.asarray(keys, dtype=np.int64)
        self.deltas = np.asarray(deltas, dtype=np.int64)
        if self.keys.ndim != 1 or self.keys.shape != self.deltas.shape:
            raise ValueError("a map needs one delta per key")

    def find(self, x: int) -> int | None:
        if not self.keys.shape[0] or x < self.keys[0]:
            return None
        at = int(np.searchsorted(self.keys, x, side="right"))
        return int(self.deltas[at - 1])


class _Model:
    def __init__(self, model: Model) -> None:
        filters, base, image_size, reloc, values = model
        _check_filters(filters)
        if not (0 <= base < (1 << 32) and 0 <= image_size <= (1 << 32)):
            raise ValueError(f"bad image range: base {base}, size {image_size}")
        self.filters, self.base, self.image_size = filters, base, image_size
        self.reloc, self.values = _Lookup(reloc), _Lookup(values)

    def in_image(self, w: int) -> bool:
        return self.image_size > 0 and 0 <= w - self.base < self.image_size

    def predict_word(self, w: int) -> int:
        delta = self.reloc.find(w - self.base) if self.in_image(w) else self.values.find(w)
        return w if delta is None else (w + delta) & 0xFFFFFFFF


def _indices(mask: NDArray[np.bool_]) -> Iterator[int]:
    """Positions of True in ``mask``, converted a few hundred at a time (bounded memory)."""
    found = np.flatnonzero(mask)
    for start in range(0, found.shape[0], 256):
        yield from found[start : start + 256].tolist()


def _events(
    src: bytes, pos: int, span_end: int, stop: int, model: _Model
) -> Iterator[tuple[str, int]]:
    """Consumed items ("branch"/"word"/"call", old offset) of the walk over [pos, stop)."""
    filters = model.filters
    view = np.frombuffer(src, dtype=np.uint8)
    avail_end = min(span_end, pos + len(src))
    if not filters & FILTER_X86 and filters & (FILTER_THUMB | FILTER_WORDS):
        thumb, words = bool(filters & FILTER_THUMB), bool(filters & FILTER_WORDS)
        first = pos + (pos & 1)
        wide = view.astype(np.uint32)
        base = first - pos
        count = max(0, (avail_end - 4 - first) // 2 + 1)  # even e with e + 4 <= avail_end
        if count == 0:
            return
        h1 = wide[base : base + 2 * count : 2] | (wide[base + 1 : base + 2 * count : 2] << 8)
        h2 = wide[base + 2 : base + 2 * count + 2 : 2] | (
            wide[base + 3 : base + 2 * count + 2 : 2] << 8
        )
        branch = np.zeros(count + 1, dtype=bool)
        if thumb:
            branch[:count] = ((h1 & 0xF800) == 0xF000) & (
                ((h2 & 0xD000) == 0xD000) | ((h2 & 0xD000) == 0x9000)
            )
        word = np.zeros(count, dtype=bool)
        if words:
            word[(first & 3) >> 1 :: 2] = True  # halfword k sits at first + 2k: 4-aligned ones
            word &= ~branch[:count] & ~branch[1:]
        s = first
        for e in _indices(branch[:count] | word):
            e_pos = first + 2 * e
            if e_pos >= stop:
                break
            if e_pos < s:
                continue
            yield ("branch" if branch[e] else "word"), e_pos
            s = e_pos + 4
    elif filters & FILTER_X86:
        room = max(0, min(stop, span_end - 4) - pos)  # e + 5 <= span_end and e < stop
        calls = np.zeros(max(0, stop - pos), dtype=bool)
        calls[:room] = (view[:room] == 0xE8) | (view[:room] == 0xE9)
        pointers = np.zeros_like(calls)
        if filters & FILTER_WORDS and model.image_size > 0:
            reach = max(0, min(stop, span_end - 3) - pos)  # e + 4 <= span_end
            wide = view.astype(np.int64)
            value = (
                wide[:reach]
                | (wide[1 : reach + 1] << 8)
                | (wide[2 : reach + 2] << 16)
                | (wide[3 : reach + 3] << 24)
            )
            pointers[:reach] = (value >= model.base) & (value - model.base < model.image_size)
        s = pos
        for rel in _indices(calls | pointers):
            if pos + rel < s:
                continue
            yield ("word" if pointers[rel] else "call"), pos + rel
            s = pos + rel + (4 if pointers[rel] else 5)


def _walk_end(pos: int, span_end: int, stop: int, filters: int, last: int) -> int:
    """Old offset where the walk stops, given the end of the last consumed item."""
    s = max(last, pos)
    if s >= stop:
        return s
    if not filters & FILTER_X86 and filters & (FILTER_THUMB | FILTER_WORDS):
        return stop if stop % 2 == 0 or stop == span_end else stop + 1
    return stop


def _wrap25(t: int) -> int:
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
    data = data[:need]
    out = bytearray(data)
    last = pos
    for kind, at in _events(data, pos, span_end, stop, walk):
        rel = at - pos
        if kind == "branch":
            target = at + 4 + _thumb_offset(data, rel)
            delta = walk.reloc.find(target)
            if absolute:
                _thumb_encode(out, rel, _wrap25(_wrap64(target + (delta or 0))))
            elif delta is not None:
                _thumb_encode(out, rel, _wrap64(target + delta - (at + shift + 4)))
            last = at + 4
        elif kind == "word":
            out[rel : rel + 4] = walk.predict_word(_le32(data, rel)).to_bytes(4, "little")
            last = at + 4
        else:
            target = at + 5 + _s32(_le32(data, rel + 1))
            delta = walk.reloc.find(target)
            if absolute:
                moved = _wrap64(target + (delta or 0)) & 0xFFFFFFFF
                out[rel + 1 : rel + 5] = moved.to_bytes(4, "little")
            elif delta is not None:
                moved = _wrap64(target + delta - (at + shift + 5)) & 0xFFFFFFFF
                out[rel + 1 : rel + 5] = moved.to_bytes(4, "little")
            last = at + 5
    end = _walk_end(pos, span_end, stop, walk.filters, last)
    return bytes(out[: end - pos]), end


def _span_rows(spans: object, old_n: int, new_n: int) -> list[list[int]]:
    rows: list[list[int]] = np.ascontiguousarray(spans, dtype=np.int64).reshape(-1, 3).tolist()
    for i, (new_pos, old_pos, length) in enumerate(rows):
        if length < 0 or new_pos < 0 or old_pos < 0 or new_pos + length > new_n:
            raise ValueError(f"span {i} {(new_pos, old_pos, length)} is outside the images")
        if old_pos + length > old_n:
            raise ValueError(f"span {i} {(new_pos, old_pos, length)} is outside the images")
    return rows


def observe(old: Buffer, new: Buffer, spans: object, model: Model) -> tuple[NDArray, ...]:
    """(branch_keys, branch_deltas, word_keys, word_deltas) as in the native kernel."""
    walk = _Model(model)
    o, nw = bytes(old), bytes(new)
    rows = _span_rows(spans, len(o), len(nw))
    branch: tuple[list[int], list[int]] = ([], [])
    word: tuple[list[int], list[int]] = ([], [])
    for new_pos, old_pos, length in rows:
        if length == 0:
            continue
        end = old_pos + length
        shift = new_pos - old_pos
        for kind, at in _events(o[old_pos:end], old_pos, end, end, walk):
            if kind == "branch":
                if _is_thumb_branch(nw, at + shift):
                    target = at + 4 + _thumb_offset(o, at)
                    moved = at + shift + 4 + _thumb_offset(nw, at + shift)
                    branch[0].append(target)
                    branch[1].append(moved - target)
            elif kind == "word":
                value = _le32(o, at)
                word[0].append(value)
                word[1].append(_s32(_le32(nw, at + shift) - value))
            elif nw[at + shift] == o[at]:
                target = at + 5 + _s32(_le32(o, at + 1))
                moved = at + shift + 5 + _s32(_le32(nw, at + shift + 1))
                branch[0].append(target)
                branch[1].append(moved - target)
    return tuple(np.array(values, dtype=np.int64) for pair in (branch, word) for values in pair)


def diff_spans(old: Buffer, new: Buffer, spans: object, model: Model) -> bytes:
    """Concatenated difference bytes (new - predicted, mod 256) of every copy span, in order."""
    _Model(model)
    o, nw = bytes(old), bytes(new)
    parts = []
    for new_pos, old_pos, length in _span_rows(spans, len(o), len(nw)):
        if length == 0:
            continue
        end = old_pos + length
        predicted, _ = predict(o[old_pos:end], old_pos, end, end, new_pos - old_pos, model)
        parts.append(_sub_bytes(nw[new_pos : new_pos + length], predicted[:length]))
    return b"".join(parts)


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
