"""Pure-Python twin of the delta kernel's relocation filters (ext/delta_filter.h).

``normalize``, ``predict``, ``observe``, ``diff_spans`` and ``add_bytes`` give what
ota_filter_walk and the wrappers in ext/delta.pyx give, byte for byte; instead of walking
item by item, the twin finds the items (Thumb-2 BL/B.W, words, x86 CALL/JMP) of every copy
span at once and rewrites them with array arithmetic (:func:`_grid_events`,
:func:`_rewrite`). The kernel API is re-exported by otacore/_delta_py.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from otacore._delta_match_py import _span_rows
from otacore._types import Buffer

FILTER_THUMB = 1
FILTER_X86 = 2
FILTER_WORDS = 4
LOOKAHEAD = 8
_POSITION_LIMIT = 1 << 40

MapPair = tuple[Sequence[int] | NDArray[np.int64], Sequence[int] | NDArray[np.int64]]
#: (filters, base, image_size, relocation map, value map); see ext/delta_filter.h.
Model = tuple[int, int, int, MapPair, MapPair]


def _check_filters(filters: int) -> None:
    if filters < 0 or filters > 7 or (filters & FILTER_X86 and filters & FILTER_THUMB):
        raise ValueError(f"invalid filter set {filters}")


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
