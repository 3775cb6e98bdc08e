# cython: language_level=3
"""Binary delta kernels: suffix array, approximate matching, relocation filters, byte adds.

Twin: otacore/_delta_py.py (same functions, same results). The C work lives in
ext/delta_sais.h (SA-IS), ext/delta_match.h (bsdiff-style scan, cost-based gap covers) and
ext/delta_filter.h (branch / pointer prediction); this module checks every argument before the
C code sees it.
"""

import numpy as np

import os

from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport free

cdef extern from "delta_sais.h" nogil:
    int ota_suffix_array(const unsigned char *text, int32_t *sa, int32_t n)

cdef extern from "delta_match.h" nogil:
    ctypedef struct ota_span:
        int64_t new_pos
        int64_t old_pos
        int64_t length
    ctypedef struct ota_span_list:
        ota_span *items
        int64_t count
        int64_t capacity
    int ota_find_matches(const uint8_t *old, int64_t old_n, const uint8_t *nw, int64_t new_n,
                         const int32_t *sa, int64_t threshold, int64_t step, ota_span_list *out)
    int ota_cover_gaps(const uint8_t *old, int64_t old_n, const uint8_t *nw, int64_t new_n,
                       const int32_t *sa, const ota_span *spans, int64_t count,
                       const uint8_t *literal_costs, ota_span_list *out)
    int OTA_REPEAT_GRAM
    int ota_literal_costs(const uint8_t *nw, int64_t n, uint8_t literal, uint8_t run,
                          uint8_t repeat, uint64_t seed, uint8_t *out)

cdef extern from "delta_filter.h" nogil:
    int OTA_LOOKAHEAD
    ctypedef struct ota_map:
        const int64_t *keys
        const int64_t *deltas
        int64_t count
    ctypedef struct ota_model:
        int filters
        int64_t base
        int64_t image_size
        ota_map reloc
        ota_map values
    ctypedef struct ota_obs:
        int64_t *keys
        int64_t *deltas
        int64_t count
        int64_t capacity
    int64_t ota_filter_walk(const uint8_t *src, int64_t pos, int64_t span_end, int64_t limit,
                            int64_t shift, const ota_model *m, uint8_t *out, const uint8_t *nw,
                            ota_obs *branch_obs, ota_obs *word_obs, int absolute)

#: Filter bits (see ext/delta_filter.h).
FILTER_THUMB = 1
FILTER_X86 = 2
FILTER_WORDS = 4
#: Bytes past ``limit`` that ``predict`` may read and write.
LOOKAHEAD = 8
#: Length of the strings ``literal_costs`` looks for earlier in the image.
REPEAT_GRAM = OTA_REPEAT_GRAM
#: Largest image ``literal_costs`` takes.
MAX_COSTED = 0xFFFFFFFF
#: Largest old image the suffix array can index.
MAX_INDEXED = 0x7FFFFFFF
_POSITION_LIMIT = 1 << 40


cdef const uint8_t[::1] _bytes_view(object data):
    return memoryview(data).cast("B")


cdef uint8_t _empty_byte = 0


cdef inline const uint8_t *_ptr(const uint8_t[::1] view) noexcept nogil:
    # A zero-length view has no element 0; point at a static byte instead.
    if view.shape[0] == 0:
        return &_empty_byte
    return &view[0]


def _check_filters(int filters):
    if filters < 0 or filters > 7 or (filters & FILTER_X86 and filters & FILTER_THUMB):
        raise ValueError(f"invalid filter set {filters}")


def suffix_array(data):
    """Suffix array of ``data`` as an int32 numpy array (SA-IS, linear time)."""
    cdef const uint8_t[::1] text = _bytes_view(data)
    cdef Py_ssize_t n = text.shape[0]
    cdef int rc
    if n > MAX_INDEXED:
        raise ValueError(f"cannot index {n} bytes; the limit is {MAX_INDEXED}")
    result = np.empty(n, dtype=np.int32)
    cdef int32_t[::1] sa = result
    if n == 0:
        return result
    with nogil:
        rc = ota_suffix_array(&text[0], &sa[0], <int32_t>n)
    if rc != 0:
        raise MemoryError("out of memory building the suffix array")
    return result


def find_matches(old, new, sa, int threshold=8, int step=1):
    """Copy spans covering ``new`` from ``old``: int64 array of rows (new_pos, old_pos, length).

    ``sa`` is ``suffix_array(old)``. Spans are in increasing, non-overlapping new order; the
    bytes between them are literal. ``threshold`` is how many more matching bytes a new
    alignment needs before the scan leaves the current one; ``step`` how far the scan moves
    past a position without a better match (1: every position is searched).
    """
    cdef const uint8_t[::1] o = _bytes_view(old)
    cdef const uint8_t[::1] nw = _bytes_view(new)
    cdef const int32_t[::1] index = np.ascontiguousarray(sa, dtype=np.int32)
    cdef int64_t old_n = o.shape[0], new_n = nw.shape[0], i
    cdef ota_span_list spans
    cdef int rc
    if index.shape[0] != old_n:
        raise ValueError(f"suffix array has {index.shape[0]} entries for {old_n} bytes")
    if threshold < 0 or step < 1:
        raise ValueError("threshold must not be negative and step must be positive")
    for i in range(old_n):
        if index[i] < 0 or index[i] >= old_n:
            raise ValueError(f"suffix array entry {i} ({index[i]}) is outside the old image")
    spans.items = NULL
    spans.count = 0
    spans.capacity = 0
    with nogil:
        rc = ota_find_matches(_ptr(o), old_n, _ptr(nw), new_n,
                              &index[0] if old_n else NULL, threshold, step, &spans)
    try:
        if rc != 0:
            raise MemoryError("out of memory while matching")
        return _span_list_array(&spans)
    finally:
        free(spans.items)


cdef object _span_list_array(ota_span_list *spans):
    result = np.empty((spans.count, 3), dtype=np.int64)
    cdef int64_t[:, ::1] r = result
    cdef Py_ssize_t i
    for i in range(spans.count):
        r[i, 0] = spans.items[i].new_pos
        r[i, 1] = spans.items[i].old_pos
        r[i, 2] = spans.items[i].length
    return result


def literal_costs(new, int literal, int run, int repeat):
    """Per byte of ``new`` (uint8 array): ``run`` where it equals the byte before it, else
    ``repeat`` inside a REPEAT_GRAM-byte string that starts at most REPEAT_GRAM - 1 bytes
    before it (or at it) and occurred earlier in ``new``, else ``literal``
    (ext/delta_match.h, ota_literal_costs). Costs are 0..255."""
    cdef const uint8_t[::1] nw = _bytes_view(new)
    cdef int64_t n = nw.shape[0]
    cdef uint64_t seed = int.from_bytes(os.urandom(8), "little")
    cdef int rc
    for name, value in (("literal", literal), ("run", run), ("repeat", repeat)):
        if not 0 <= value <= 255:
            raise ValueError(f"{name} cost {value} is outside 0..255")
    if n > MAX_COSTED:
        raise ValueError(f"image of {n} bytes is larger than {MAX_COSTED}")
    result = np.empty(n, dtype=np.uint8)
    cdef uint8_t[::1] out = result
    with nogil:
        rc = ota_literal_costs(_ptr(nw), n, <uint8_t>literal, <uint8_t>run, <uint8_t>repeat,
                               seed, &out[0] if n else NULL)
    if rc != 0:
        raise MemoryError("out of memory while estimating literal costs")
    return result


def cover_gaps(old, new, sa, spans, literal_costs):
    """``spans`` (rows of ``find_matches``) with the matches added in the literal gaps between
    them that cost less as copies than as literal bytes (ext/delta_match.h, ota_cover_gaps).

    ``literal_costs`` holds, per byte of ``new``, its estimated compressed size as a literal
    in sixteenths of a byte (uint8). ``spans`` must be in increasing, non-overlapping new
    order inside both images.
    """
    cdef const uint8_t[::1] o = _bytes_view(old)
    cdef const uint8_t[::1] nw = _bytes_view(new)
    cdef const int32_t[::1] index = np.ascontiguousarray(sa, dtype=np.int32)
    cdef int64_t old_n = o.shape[0], new_n = nw.shape[0], i, count
    cdef ota_span_list out
    cdef int rc
    if index.shape[0] != old_n:
        raise ValueError(f"suffix array has {index.shape[0]} entries for {old_n} bytes")
    costs_array = np.ascontiguousarray(literal_costs, dtype=np.uint8)
    if costs_array.ndim != 1 or costs_array.shape[0] != new_n:
        raise ValueError(f"literal costs need one entry per new byte ({new_n}), got {costs_array.shape}")
    cdef const uint8_t[::1] costs = costs_array
    for i in range(old_n):
        if index[i] < 0 or index[i] >= old_n:
            raise ValueError(f"suffix array entry {i} ({index[i]}) is outside the old image")
    rows = _ordered_spans(spans, old_n, new_n)
    cdef const int64_t[:, ::1] r = rows
    count = r.shape[0]
    out.items = NULL
    out.count = 0
    out.capacity = 0
    with nogil:
        rc = ota_cover_gaps(_ptr(o), old_n, _ptr(nw), new_n, &index[0] if old_n else NULL,
                            <const ota_span *>&r[0, 0] if count else NULL, count,
                            _ptr(costs), &out)
    try:
        if rc != 0:
            raise MemoryError("out of memory while covering gaps")
        return _span_list_array(&out)
    finally:
        free(out.items)


cdef object _ordered_spans(spans, int64_t old_n, int64_t new_n):
    rows = _spans_array(spans, old_n, new_n)
    cdef const int64_t[:, ::1] r = rows
    cdef Py_ssize_t i
    cdef int64_t end = 0
    for i in range(r.shape[0]):
        if r[i, 0] < end:
            raise ValueError(f"span {i} {tuple(rows[i])} overlaps or precedes the one before")
        end = r[i, 0] + r[i, 2]
    return rows


cdef class _Model:
    """A model tuple (filters, base, image_size, (reloc keys, deltas), (value keys, deltas))
    held as a C struct over contiguous int64 arrays."""
    cdef object arrays
    cdef ota_model model

    def __init__(self, model):
        filters, base, image_size, reloc, values = model
        _check_filters(filters)
        if not (0 <= base < (1 << 32) and 0 <= image_size <= (1 << 32)):
            raise ValueError(f"bad image range: base {base}, size {image_size}")
        self.model.filters = filters
        self.model.base = base
        self.model.image_size = image_size
        self.arrays = []
        self._set(&self.model.reloc, reloc)
        self._set(&self.model.values, values)

    cdef _set(self, ota_map *target, pair):
        keys = np.ascontiguousarray(pair[0], dtype=np.int64)
        deltas = np.ascontiguousarray(pair[1], dtype=np.int64)
        if keys.ndim != 1 or keys.shape != deltas.shape:
            raise ValueError("a map needs one delta per key")
        self.arrays += [keys, deltas]
        cdef const int64_t[::1] k = keys
        cdef const int64_t[::1] d = deltas
        target.count = k.shape[0]
        target.keys = &k[0] if k.shape[0] else NULL
        target.deltas = &d[0] if d.shape[0] else NULL


def predict(src, int64_t pos, int64_t span_end, int64_t limit, int64_t shift, model):
    """Predicted new bytes for old bytes ``src`` (old offsets ``pos`` onward) of a copy span.

    The span ends at old offset ``span_end`` and its new position is old offset + ``shift``.
    The walk stops at the first instruction boundary at or past ``min(limit, span_end)``;
    ``src`` must reach ``min(limit + LOOKAHEAD, span_end)``. Returns (predicted bytes, the old
    offset where they end). ``model``: (filters, base, image_size, reloc map, value map), a map
    being a (keys, deltas) pair.
    """
    cdef const uint8_t[::1] s = _bytes_view(src)
    cdef _Model m = _Model(model)
    cdef int64_t stop, need, end
    if not (0 <= pos <= span_end <= _POSITION_LIMIT) or limit < pos:
        raise ValueError(f"bad span: pos {pos}, end {span_end}, limit {limit}")
    if abs(shift) > _POSITION_LIMIT:
        raise ValueError(f"shift {shift} is out of range")
    stop = min(limit, span_end)
    need = min(limit + LOOKAHEAD, span_end) - pos
    if s.shape[0] < need:
        raise ValueError(f"predict needs {need} old bytes, got {s.shape[0]}")
    out = bytearray(stop - pos + LOOKAHEAD)
    cdef uint8_t[::1] o = out
    with nogil:
        end = ota_filter_walk(_ptr(s), pos, span_end, limit, shift, &m.model, &o[0], NULL,
                              NULL, NULL, 0)
    return (<const char *>&o[0])[: end - pos], end


def normalize(image, model):
    """``image`` with every branch and call holding its absolute (mapped) target and every
    word mapped: relocated code of two images compares equal after this (maker only)."""
    cdef const uint8_t[::1] s = _bytes_view(image)
    cdef _Model m = _Model(model)
    cdef int64_t n = s.shape[0]
    out = bytearray(n + LOOKAHEAD)
    cdef uint8_t[::1] o = out
    with nogil:
        ota_filter_walk(_ptr(s), 0, n, n, 0, &m.model, &o[0], NULL, NULL, NULL, 1)
    return (<const char *>&o[0])[:n]


cdef object _spans_array(spans, int64_t old_n, int64_t new_n):
    rows = np.ascontiguousarray(spans, dtype=np.int64).reshape(-1, 3)
    cdef const int64_t[:, ::1] r = rows
    cdef Py_ssize_t i
    for i in range(r.shape[0]):
        if (r[i, 2] < 0 or r[i, 0] < 0 or r[i, 1] < 0 or r[i, 0] + r[i, 2] > new_n
                or r[i, 1] + r[i, 2] > old_n):
            raise ValueError(f"span {i} {tuple(rows[i])} is outside the images")
    return rows


cdef tuple _obs_arrays(ota_obs *obs):
    keys = np.empty(obs.count, dtype=np.int64)
    deltas = np.empty(obs.count, dtype=np.int64)
    cdef int64_t[::1] k = keys
    cdef int64_t[::1] d = deltas
    cdef Py_ssize_t i
    for i in range(obs.count):
        k[i] = obs.keys[i]
        d[i] = obs.deltas[i]
    return (keys, deltas)


def observe(old, new, spans, model):
    """What each copy span's branches and words became in ``new``.

    Returns (branch_keys, branch_deltas, word_keys, word_deltas) int64 arrays: old branch
    target and (new target - old target); old word value and (new word - old word) as int32.
    """
    cdef const uint8_t[::1] o = _bytes_view(old)
    cdef const uint8_t[::1] nw = _bytes_view(new)
    rows = _spans_array(spans, o.shape[0], nw.shape[0])
    cdef const int64_t[:, ::1] r = rows
    cdef ota_obs branch_obs, word_obs
    cdef _Model m = _Model(model)
    cdef Py_ssize_t i
    cdef int64_t end = 0
    branch_obs.keys = NULL; branch_obs.deltas = NULL; branch_obs.count = 0; branch_obs.capacity = 0
    word_obs.keys = NULL; word_obs.deltas = NULL; word_obs.count = 0; word_obs.capacity = 0
    try:
        with nogil:
            for i in range(r.shape[0]):
                if r[i, 2] == 0:
                    continue
                end = ota_filter_walk(&o[0] + r[i, 1], r[i, 1], r[i, 1] + r[i, 2],
                                      r[i, 1] + r[i, 2], r[i, 0] - r[i, 1], &m.model, NULL,
                                      &nw[0], &branch_obs, &word_obs, 0)
                if end < 0:
                    break
        if end < 0:
            raise MemoryError("out of memory collecting observations")
        return _obs_arrays(&branch_obs) + _obs_arrays(&word_obs)
    finally:
        free(branch_obs.keys)
        free(branch_obs.deltas)
        free(word_obs.keys)
        free(word_obs.deltas)


def diff_spans(old, new, spans, model):
    """Concatenated difference bytes (new - predicted, mod 256) of every copy span, in order."""
    cdef const uint8_t[::1] o = _bytes_view(old)
    cdef const uint8_t[::1] nw = _bytes_view(new)
    rows = _spans_array(spans, o.shape[0], nw.shape[0])
    cdef const int64_t[:, ::1] r = rows
    cdef _Model m = _Model(model)
    cdef Py_ssize_t i
    cdef int64_t total = 0, at = 0, k, length, longest = 0
    for i in range(r.shape[0]):
        total += r[i, 2]
        longest = max(longest, r[i, 2])
    result = bytearray(total)
    scratch = bytearray(longest + LOOKAHEAD)
    cdef uint8_t[::1] out = result if total else bytearray(1)
    cdef uint8_t[::1] pred = scratch
    with nogil:
        for i in range(r.shape[0]):
            length = r[i, 2]
            if length == 0:
                continue
            ota_filter_walk(&o[0] + r[i, 1], r[i, 1], r[i, 1] + length, r[i, 1] + length,
                            r[i, 0] - r[i, 1], &m.model, &pred[0], NULL, NULL, NULL, 0)
            for k in range(length):
                out[at + k] = <uint8_t>(nw[r[i, 0] + k] - pred[k])
            at += length
    return bytes(result)


def add_bytes(a, b):
    """Bytewise (a + b) mod 256 of two equally long buffers."""
    cdef const uint8_t[::1] x = _bytes_view(a)
    cdef const uint8_t[::1] y = _bytes_view(b)
    cdef Py_ssize_t n = x.shape[0], i
    if y.shape[0] != n:
        raise ValueError(f"cannot add {n} bytes to {y.shape[0]} bytes")
    out = bytearray(n)
    if n == 0:
        return b""
    cdef uint8_t[::1] o = out
    with nogil:
        for i in range(n):
            o[i] = <uint8_t>(x[i] + y[i])
    return bytes(out)
