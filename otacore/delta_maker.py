"""The patch maker: matching, relocation models, candidate choice (format: otacore.delta).

1. Guess the instruction set from the old image (``detect_family``): Thumb-2 BL/B.W or x86
   CALL/JMP whose targets land inside the image on a spot other branches also hit, or neither.
2. Pass 1: normalise both images so that every branch holds its absolute target, build the
   suffix array of the old one and match coarsely (bsdiff-style, ext/delta_match.h); then
   cover the literal gaps with every match that is cheaper as a copy than as literal bytes
   by an estimate of the compressed cost (``cover_gaps``, ``literal_costs``; HDiffPatch's
   cover selection). Models are fitted to the scan's spans, the covers only carry bytes.
3. Fit the relocation model to what those copies show: how branch targets and pointers moved
   (``fit_map``), the load address (``detect_base``).
4. Pass 2: rewrite the new image's targets and pointers back into old coordinates (the
   inverse model) and match it again against the same suffix array: relocated code and
   pointer tables now compare equal, so the copies line up exactly; cover the gaps again.
5. Fit the model on the final copies, pick the filter set whose difference bytes compress
   best, and zstd the payload with an explicit window; if a branch conversion of the
   literal bytes (otacore.delta_literal, format version 3) passes a cheap screen and makes
   the payload smaller, keep that one.
6. Repeat 2-5 for other strategies (a filter set forced: its own normalisation and matches)
   as far as the ``effort`` budget allows and keep the smallest patch (otacore.delta_strategy);
   strategies with the same branch family share pass 1.
7. Compress the winner's payload with the other codecs too (LZMA2), and the target as all
   literal bytes, and keep the smallest patch (otacore.delta_codec).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import zstandard
from numpy.typing import NDArray

from otacore import delta as fmt
from otacore import delta_codec, delta_literal, delta_strategy
from otacore._types import Buffer
from otacore.delta import (
    AUTO_FILTERS,
    CODEC_ZSTD_OLD,
    DEFAULT_BLOCK_LIMIT,
    DEFAULT_WINDOW_LOG,
    FILTER_THUMB,
    FILTER_WORDS,
    FILTER_X86,
    LITERAL_SHIFT,
    MAX_BLOCK_LIMIT,
    MAX_IMAGE_SIZE,
    MAX_MAP_ENTRIES,
    MAX_WINDOW_LOG,
    MIN_BLOCK_LIMIT,
    PatchInputError,
    put_varint,
    zigzag,
)

_ENTRY_WORST = 30  # three varints of at most 10 bytes
#: Scan step of the first matching pass, which only has to show how things moved.
FIRST_PASS_STEP = 4
#: Scan step of the second pass: every other position, at no measurable cost in size.
SECOND_PASS_STEP = 2
#: Switching thresholds of the second matching pass: little new code, much new code.
SECOND_PASS_THRESHOLDS = (8, 16)
#: Estimated compressed size of a literal byte, in sixteenths of a byte, for the cost-based
#: covers added in the gaps both passes leave (ext/delta_match.h, ota_cover_gaps). Literal
#: bytes compress to 0.6-0.75 byte each on the public corpus (bench/delta/results/
#: public-anatomy.md: "literal z" / "literal"); 10/16 is the low end, so a short match is only
#: taken where it clearly pays (8-13 gave within 1.5% of each other on the corpus).
LITERAL_COST = 10
#: ... of a literal byte zstd codes as part of a run (it repeats the byte before it).
RUN_COST = 1
#: ... of a literal byte inside a REPEAT_GRAM-byte string that occurred earlier in the new
#: image: zstd codes it as a match within the literals (about 6 bits a byte amortised), so a
#: copy from old gains less there. Generated new code repeats itself: without this rule the
#: covers cost the project's corpus 1.1% (sys-major, app-major); with it, 1.3% less than
#: without covers. (8, 6) beat (6, 3), (8, 2), (8, 5), (8, 7), (12, 5) and (16, 4) on the
#: two corpora together.
REPEAT_COST = 6
#: (the kernel's string length, fixed: ext/delta_match.h, OTA_REPEAT_GRAM)
REPEAT_GRAM: int = fmt._kernel.REPEAT_GRAM


def literal_costs(new: bytes) -> NDArray[np.uint8]:
    """Per byte of ``new``: its estimated compressed size as a literal, in sixteenths of a byte
    (what ``cover_gaps`` weighs a copy against): LITERAL_COST, less in runs and repeats (the
    kernel's ``literal_costs``)."""
    return fmt._kernel.literal_costs(new, LITERAL_COST, RUN_COST, REPEAT_COST)


#: One entry of a block: [new position, old position (-1: none), copy length, extra length]
#: (a list: the planner lengthens the last entry's extra bytes in place).
_Entry = list[int]


def _plan_blocks(spans: NDArray[np.int64], new_n: int, block_limit: int) -> list[list[_Entry]]:
    """Cut copy spans and the literal gaps between them into entries grouped in blocks whose
    records (control + difference + extra bytes) fit the block limit."""
    blocks: list[list[_Entry]] = []
    current: list[_Entry] = []
    used = 10  # the entry count varint
    worst = _ENTRY_WORST
    at = 0
    # (one loop for the gaps and the spans: the literal gap before each span, then the span;
    # a last gap up to the end of the new image; kept flat, it runs once per entry)
    for new_pos, old_pos, length in [*spans.tolist(), [new_n, -1, 0]]:
        gap = new_pos - at
        while gap > 0:  # the gap's literal bytes: the last entry's extra, or new entries
            if current and used < block_limit:
                take = min(gap, block_limit - used)
                current[-1][3] += take
            else:
                if used + worst >= block_limit:
                    if current:
                        blocks.append(current)
                    current, used = [], 10
                take = min(gap, block_limit - used - worst)
                current.append([at, -1, 0, take])
                used += worst
            used += take
            at += take
            gap -= take
        while length > 0:
            if used + worst >= block_limit:
                if current:
                    blocks.append(current)
                current, used = [], 10
            take = min(length, block_limit - used - worst)
            current.append([new_pos, old_pos, take, 0])
            used += worst + take
            new_pos, old_pos, length = new_pos + take, old_pos + take, length - take
        at = new_pos
    if current:
        blocks.append(current)
    return blocks


def _copy_rows(blocks: list[list[_Entry]]) -> NDArray[np.int64]:
    """(new_pos, old_pos, length) of every copy entry of ``blocks``."""
    return np.array(
        [entry[:3] for block in blocks for entry in block if entry[2]],
        dtype=np.int64,
    ).reshape(-1, 3)


def fit_map(
    keys: NDArray[np.int64], deltas: NDArray[np.int64], *, cap: int, zero_default: bool
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """A piecewise-constant map (sorted keys, deltas) agreeing with most observations.

    Observations sorted by key fall into runs of equal delta. A short run (fewer than
    ``min_run`` observations) between two runs of the same delta is noise, such as a constant
    that happens to look like a pointer: it is dropped and its neighbours merge. Each remaining
    run of at least ``min_run`` whose delta differs from the one in force starts an entry;
    what the map gets wrong is left to the difference bytes. ``min_run`` grows until the map
    has at most ``cap`` entries. With ``zero_default`` the delta before the first entry is 0.
    """
    empty = np.empty(0, dtype=np.int64)
    if keys.shape[0] == 0 or cap <= 0:
        return empty, empty
    k, d = _sort_pairs(keys, deltas)
    starts = np.concatenate(([0], np.flatnonzero(d[1:] != d[:-1]) + 1))
    base_counts = np.diff(np.concatenate((starts, [k.shape[0]])))
    base_keys, base_deltas = k[starts], d[starts]
    initial = 0 if zero_default else np.iinfo(np.int64).min
    min_run = 2
    while True:
        rk, rd, rc = _smooth_runs(base_keys, base_deltas, base_counts, min_run)
        chosen = rc >= min_run
        rk, rd, rc = rk[chosen], rd[chosen], rc[chosen]
        # One entry per key: the run with most observations (then the first) wins.
        by_key = np.lexsort((-rc, rk))
        _, first = np.unique(rk[by_key], return_index=True)
        pick = np.sort(by_key[first])
        rk, rd = rk[pick], rd[pick]
        # An entry repeating the delta already in force adds nothing.
        keep = rd != np.concatenate(([initial], rd[:-1]))
        if int(keep.sum()) <= cap:
            return rk[keep].astype(np.int64), rd[keep].astype(np.int64)
        min_run = min_run * 3 // 2 + 1


def _sort_pairs(
    keys: NDArray[np.int64], deltas: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Observations sorted by key, then delta."""
    low = int(keys.min())
    if int(keys.max()) - low < 1 << 32 and -(1 << 31) <= int(deltas.min()) <= int(deltas.max()) < (
        1 << 31
    ):
        # One sort of packed 64-bit (key, delta) values is several times faster than lexsort.
        packed = ((keys - low).astype(np.uint64) << np.uint64(32)) | (deltas + (1 << 31)).astype(
            np.uint64
        )
        packed.sort()
        return (packed >> np.uint64(32)).astype(np.int64) + low, (
            packed & np.uint64(0xFFFFFFFF)
        ).astype(np.int64) - (1 << 31)
    order = np.lexsort((deltas, keys))
    return keys[order], deltas[order]


def _smooth_runs(
    keys: NDArray[np.int64], deltas: NDArray[np.int64], counts: NDArray[np.int64], min_run: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Drop short runs lying between two runs of equal delta and merge those neighbours."""
    while keys.shape[0] > 2:
        noise = np.zeros(keys.shape[0], dtype=bool)
        noise[1:-1] = (counts[1:-1] < min_run) & (deltas[:-2] == deltas[2:])
        noise[1:] &= ~noise[:-1]  # never two neighbours in one pass
        if not noise.any():
            break
        keys, deltas, counts = keys[~noise], deltas[~noise], counts[~noise]
        head = np.concatenate(([True], deltas[1:] != deltas[:-1]))
        group = np.cumsum(head) - 1
        counts = np.bincount(group, weights=counts).astype(np.int64)
        keys, deltas = keys[head], deltas[head]
    return keys, deltas, counts


def detect_base(
    words: tuple[NDArray[np.int64], NDArray[np.int64]],
    branches: tuple[NDArray[np.int64], NDArray[np.int64]],
    *,
    thumb: bool,
    image_size: int,
) -> int | None:
    """The load address of the old image, if its pointers give it away.

    ``words`` and ``branches`` are (old value, delta) and (old target, delta) observations;
    only those that moved count (constants stay put). A function pointer holds base + the
    function's image offset (+1 for Thumb), so the right base turns many moved pointers into
    moved branch targets. Candidates are the 256-aligned differences between a few pointers
    and all targets (load addresses are sector-aligned) that recur most; the one hitting the
    most targets wins if it is well ahead of the next.
    """
    values, value_deltas = words
    targets, target_deltas = branches
    keep = value_deltas != 0
    if thumb:
        keep &= (values & 1) == 1
    values = np.unique(values[keep] - (1 if thumb else 0))
    targets = np.unique(targets[(target_deltas != 0) & (targets >= 0) & (targets < image_size)])
    if values.shape[0] == 0 or targets.shape[0] == 0:
        return None
    sample = values[:: max(1, values.shape[0] // 32)]
    candidates = (sample[:, None] - targets[None, :]).ravel()
    candidates = candidates[
        (candidates & 0xFF == 0) & (candidates >= 0) & (candidates + image_size <= 1 << 32)
    ]
    if candidates.shape[0] == 0:
        return None
    # The right base recurs once per sampled pointer; score only the most recurrent few.
    candidates, recurrence = np.unique(candidates, return_counts=True)
    candidates = candidates[np.argsort(-recurrence, kind="stable")[:16]]
    probes = values[:: max(1, values.shape[0] // 2000)]
    hits = probes[None, :] - candidates[:, None]
    at = np.minimum(np.searchsorted(targets, hits), targets.shape[0] - 1)
    scores = np.count_nonzero(targets[at] == hits, axis=1)
    order = np.argsort(-scores, kind="stable")
    best = int(scores[order[0]])
    runner_up = int(scores[order[1]]) if order.shape[0] > 1 else 0
    if best >= 4 and best >= 2 * runner_up:
        return int(candidates[order[0]])
    return None


def _encode_map(out: bytearray, keys: NDArray[np.int64], deltas: NDArray[np.int64]) -> None:
    put_varint(out, int(keys.shape[0]))
    previous: int | None = None
    for key, delta in zip(keys.tolist(), deltas.tolist(), strict=True):
        put_varint(out, zigzag(key) if previous is None else key - previous)
        put_varint(out, zigzag(delta))
        previous = key


_EMPTY_MAP = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
#: (filters, base, image_size, relocation map, value map): what the walk needs (delta_filter.h).
Model = tuple[int, int, int, tuple[NDArray[np.int64], NDArray[np.int64]], Any]


class _Planner:
    """Builds candidate payloads for one (old, new) pair, one per filter set.

    Control entries and extra bytes do not depend on the filters, so they are encoded once;
    a candidate only brings its prelude (maps) and difference bytes. The relocation model is
    fitted to the ``evidence`` spans (the scan's, long enough to show how code moved) when
    given; the short cost-based covers added to ``spans`` only carry bytes (a chance 6-byte
    match holding a branch would report a bogus move).
    """

    def __init__(
        self,
        old: bytes,
        new: bytes,
        spans: NDArray[np.int64],
        block_limit: int,
        evidence: NDArray[np.int64] | None = None,
        format_version: int = fmt.NEWEST_VERSION,
    ) -> None:
        self.old, self.new, self.block_limit = old, new, block_limit
        #: The newest patch format the payloads may use (2: no version 3 feature).
        self.format_version = format_version
        blocks = _plan_blocks(spans, len(new), block_limit)
        self.rows = _copy_rows(blocks)
        self.evidence = self.rows
        if evidence is not None:
            self.evidence = _copy_rows(_plan_blocks(evidence, len(new), block_limit))
        self._observed: dict[tuple[int, int | None], tuple[NDArray[np.int64], ...]] = {}
        self._bases: dict[bool, int | None] = {}
        self._fits: dict[tuple[object, ...], tuple[NDArray[np.int64], NDArray[np.int64]]] = {}
        self._candidates: dict[tuple[int, int, bool], tuple[bytes, bytes]] = {}
        # Per block: (control bytes, bytes of difference it takes, extra bytes).
        self.blocks: list[tuple[bytes, int, bytes]] = []
        # Every entry in order: (seek, copy length, extra length, new and old position).
        self.entries: list[tuple[int, int, int, int, int]] = []
        # The model (ext/delta_filter.h) of each prelude a candidate made.
        self._models: dict[bytes, Any] = {}
        self._splits: dict[tuple[bytes, int], _Pieces | None] = {}  # -> exact_split
        # Per block: (start in its extra bytes, length, target offset) of each entry's extra.
        self._literal_runs: list[list[tuple[int, int, int]]] = []
        self._converted: dict[int, list[bytes]] = {}  # literal kind -> extra bytes per block
        self._literal_kind: dict[tuple[int, ...], tuple[int, bool]] = {}
        cursor = 0
        entries = self.entries
        for block in blocks:
            control = bytearray()
            put_varint(control, len(block))
            copied = 0
            extra = bytearray()
            runs = []
            for new_pos, old_pos, copy, extra_length in block:
                seek = 0 if copy == 0 else old_pos - cursor
                put_varint(control, zigzag(seek))
                put_varint(control, copy)
                put_varint(control, extra_length)
                entries.append((seek, copy, extra_length, new_pos, cursor + seek))
                cursor += seek + copy
                copied += copy
                start = new_pos + copy
                if extra_length:
                    runs.append((len(extra), extra_length, start))
                    extra += new[start : start + extra_length]
            self.blocks.append((bytes(control), copied, bytes(extra)))
            self._literal_runs.append(runs)

    def observe(self, filters: int, base: int | None) -> tuple[NDArray[np.int64], ...]:
        key = (filters, base)
        if key not in self._observed:
            image_size = len(self.old) if base is not None else 0
            model = (filters, base or 0, image_size, _EMPTY_MAP, _EMPTY_MAP)
            self._observed[key] = fmt._kernel.observe(self.old, self.new, self.evidence, model)
        return self._observed[key]

    def base(self, x86: bool) -> int | None:
        """The old image's load address as its pointers and branches show it, if they do."""
        if x86 not in self._bases:
            words = self.observe(FILTER_THUMB | FILTER_WORDS, None)
            branches = self.observe(FILTER_X86 if x86 else FILTER_THUMB | FILTER_WORDS, None)
            self._bases[x86] = detect_base(
                (words[2], words[3]),
                (branches[0], branches[1]),
                thumb=not x86,
                image_size=len(self.old),
            )
        return self._bases[x86]

    def model(
        self, filters: int, map_cap: int, find_base: bool = True, inverse: bool = False
    ) -> Model:
        """Fit the maps of ``filters`` to what the copies show; with ``find_base``, pointers
        into the image (if its load address shows) share the branches' relocation map. With
        ``inverse`` the maps take new targets and pointers back to old ones (keys in new
        coordinates), for normalising the new image."""
        if filters == 0:
            return (0, 0, 0, _EMPTY_MAP, _EMPTY_MAP)
        x86 = bool(filters & FILTER_X86)
        base = self.base(x86) if filters & FILTER_WORDS and find_base else None
        if x86:
            observed = self.observe(filters, base)
        else:  # Thumb branch and aligned-word observations do not depend on the base
            observed = self.observe(FILTER_THUMB | FILTER_WORDS, None)
        branch_keys, branch_deltas, word_keys, word_deltas = observed
        if filters == FILTER_WORDS:
            branch_keys, branch_deltas = _EMPTY_MAP
        if not filters & FILTER_WORDS:
            word_keys, word_deltas = _EMPTY_MAP
        inside = np.zeros(word_keys.shape[0], dtype=bool)
        if base is not None:
            inside = (word_keys >= base) & (word_keys - base < len(self.old))
        branch_source = "none" if filters == FILTER_WORDS else "x86" if x86 else "thumb"
        reloc_keys = np.concatenate((branch_keys, word_keys[inside] - (base or 0)))
        reloc_deltas = np.concatenate((branch_deltas, word_deltas[inside]))
        value_keys, value_deltas = word_keys[~inside], word_deltas[~inside]
        if inverse:
            reloc_keys, reloc_deltas = reloc_keys + reloc_deltas, -reloc_deltas
            value_keys, value_deltas = value_keys + value_deltas, -value_deltas
        reloc = self._fit(
            (branch_source, base, map_cap, "reloc", inverse),
            reloc_keys,
            reloc_deltas,
            map_cap,
            zero_default=False,
        )
        values = self._fit(
            (x86, base, map_cap, "values", word_keys.shape[0], inverse),
            value_keys,
            value_deltas,
            map_cap,
            zero_default=True,
        )
        size = max(len(self.old), len(self.new)) if inverse else len(self.old)
        return (filters, base or 0, size if base is not None else 0, reloc, values)

    def _fit(
        self,
        key: tuple[object, ...],
        keys: NDArray[np.int64],
        deltas: NDArray[np.int64],
        cap: int,
        zero_default: bool,
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        # Several candidates fit the same observations (e.g. the value map of Thumb + words
        # and of words alone): fit each set once.
        if key not in self._fits:
            self._fits[key] = fit_map(keys, deltas, cap=cap, zero_default=zero_default)
        return self._fits[key]

    def candidate(self, filters: int, map_cap: int, find_base: bool = True) -> tuple[bytes, bytes]:
        """(prelude, difference bytes) for ``filters``."""
        key = (filters, map_cap, find_base)
        if key not in self._candidates:
            self._candidates[key] = self._candidate(filters, map_cap, find_base)
        return self._candidates[key]

    def _candidate(self, filters: int, map_cap: int, find_base: bool) -> tuple[bytes, bytes]:
        while True:  # the prelude is a record too: shrink the maps until it fits the limit
            model = self.model(filters, map_cap, find_base)
            prelude = bytearray()
            put_varint(prelude, filters)
            if filters:
                put_varint(prelude, model[1] + 1 if model[2] else 0)
                _encode_map(prelude, *model[3])
                _encode_map(prelude, *model[4])
            if len(prelude) <= self.block_limit:
                break
            map_cap //= 2
        self._models[bytes(prelude)] = model
        return bytes(prelude), fmt._kernel.diff_spans(self.old, self.new, self.rows, model)

    def diff_of(self, prelude: bytes, rows: NDArray[np.int64]) -> bytes:
        """The difference bytes of copy ``rows`` under the model ``prelude`` (a candidate's)
        describes."""
        return bytes(fmt._kernel.diff_spans(self.old, self.new, rows, self._models[prelude]))

    @cached_property
    def entry_table(self) -> NDArray[np.int64]:
        """``entries`` as an array, one row each (made once: every payload's pieces start
        from it)."""
        return np.array(self.entries, dtype=np.int64).reshape(-1, 5)

    def whole_pieces(self, diff: bytes) -> _Pieces:
        """The entries as they are, one piece each, none exact (for a version 4 payload with
        no stretch to split off)."""
        table = self.entry_table
        seeks, copies, extras = table[:, 0], table[:, 1], table[:, 2]
        return _Pieces(
            seek=seeks,
            copy=copies,
            extra=extras,
            exact=np.zeros(len(table), dtype=bool),
            extra_from=_exclusive_cumsum(extras),
            diff_from=_exclusive_cumsum(copies),
            diff=diff,
        )

    def exact_split(self, prelude: bytes, diff: bytes, run: int) -> _Pieces | None:
        """The entries cut into pieces at their exact stretches (see _packed_payload), the
        pieces' difference bytes and where each piece's start in them; None when no copy
        has a stretch to cut. Made once per candidate (the converted and the plain payload
        share it)."""
        if (prelude, run) not in self._splits:
            self._splits[prelude, run] = _split_entries(self, prelude, diff, run)
        return self._splits[prelude, run]

    def payload(
        self,
        prelude: bytes,
        diff: bytes,
        literal: int = delta_literal.NONE,
        run: int | None = None,
        columns: bool | None = None,
        sparse: bool = False,
    ) -> bytes:
        """The decompressed payload: prelude record, block records, end record. With
        ``literal``, every entry's extra bytes branch converted; with a run of at least
        ``run`` (None: EXACT_RUN_MIN) zero difference bytes inside a copy, exact copies (both
        format version 3, otacore.delta); with ``columns`` (None: when the format version
        allows, 4), control entries in columns, and with ``sparse`` too (version 5) in
        sparse columns; else version 2's."""
        if columns is None:
            columns = self.format_version >= fmt.COLUMNS_FORMAT_VERSION
        if sparse and not (columns and self.format_version >= fmt.SPARSE_FORMAT_VERSION):
            raise ValueError("sparse columns need columns and format version 5")
        extras = [extra for _, _, extra in self.blocks]
        flagged = prelude
        if self.format_version < 3:
            literal = delta_literal.NONE  # no version 3 feature
        if literal:
            flagged = _with_prelude_flags(prelude, literal << LITERAL_SHIFT)
            extras = self.converted_extras(literal)
        packed = None
        if self.format_version >= 3:
            packed = _packed_payload(
                self, prelude, flagged, diff, b"".join(extras),
                EXACT_RUN_MIN if run is None else run,
                columns=columns,
                sparse=sparse,
            )
        if packed is not None:
            return packed
        prelude = flagged
        payload = bytearray()
        put_varint(payload, len(prelude))
        payload += prelude
        diff_at = 0
        for (control, copied, _), extra in zip(self.blocks, extras, strict=True):
            put_varint(payload, len(control) + copied + len(extra))
            payload += control
            payload += diff[diff_at : diff_at + copied]
            payload += extra
            diff_at += copied
        put_varint(payload, 0)
        return bytes(payload)

    def converted_extras(self, literal: int) -> list[bytes]:
        """Each block's extra bytes, every entry's converted alone at its target offset."""
        if literal not in self._converted:
            converted = []
            for (_, _, extra), runs in zip(self.blocks, self._literal_runs, strict=True):
                out = bytearray(extra)
                for start, length, offset in runs:
                    delta_literal.convert_into(out, offset, literal, start, start + length)
                converted.append(bytes(out))
            self._converted[literal] = converted
        return self._converted[literal]

    def literal_kind(self, kinds: tuple[int, ...]) -> tuple[int, bool]:
        """The literal branch conversion of ``kinds`` (or none) that makes the extra bytes
        smallest at zstd level LITERAL_SCREEN_LEVEL, and whether it gains at least
        LITERAL_SURE of them: a cheap screen, deterministic; ``_make_one`` confirms a pick
        that is not sure on the whole payload."""
        if kinds not in self._literal_kind:
            plain_size = _screen_size(b"".join(extra for _, _, extra in self.blocks))
            best, best_size = delta_literal.NONE, plain_size
            for kind in kinds:
                size = _screen_size(b"".join(self.converted_extras(kind)))
                if size < best_size:
                    best, best_size = kind, size
            self._literal_kind[kinds] = (best, best_size <= (1 - LITERAL_SURE) * plain_size)
        return self._literal_kind[kinds]


#: Literal branch conversions the maker screens per branch family (bench/delta/results/
#: literal-branch-probe.md): Thumb-2 where the detector sees Thumb-2, RISC-V where it sees
#: neither Thumb-2 nor x86 (it has no RISC-V score); x86 conversion gained nothing.
LITERAL_KINDS = {
    FILTER_THUMB: (delta_literal.THUMB,),
    0: (delta_literal.RISCV,),
    FILTER_X86: (),
}
LITERAL_SCREEN_LEVEL = 3
#: A screen gain of at least this fraction is taken without confirming it on the whole
#: payload (one zstd pass saved; on the public corpus every pick that gained 2% at the
#: screen gained 2-6% in the final patch).
LITERAL_SURE = 0.02


def _screen_size(data: bytes) -> int:
    return len(zstandard.ZstdCompressor(level=LITERAL_SCREEN_LEVEL).compress(data))


#: Zero difference bytes in a row from which a copy's stretch becomes an exact entry of its
#: own (format version 3). Each split costs up to two control entries of a few bytes, and
#: shorter runs cost LZMA2 little where they are: on the public corpus 256 gained the most
#: in total (64: 3.6 KB larger, most on vendor containers whose changes are dense), see
#: bench/delta/README.md.
EXACT_RUN_MIN = 384


@dataclass(frozen=True)
class _Pieces:
    """The planner's entries cut at their exact stretches, one array element per piece:
    control fields, whether it is exact, where its new and old bytes start, where its extra
    bytes start among all entries' extra bytes; its difference bytes (made for its own span)
    start at ``diff_from`` in ``diff``."""

    seek: NDArray[np.int64]
    copy: NDArray[np.int64]
    extra: NDArray[np.int64]
    exact: NDArray[np.bool_]
    extra_from: NDArray[np.int64]
    diff_from: NDArray[np.int64]
    diff: bytes


def _exclusive_cumsum(values: NDArray[np.int64]) -> NDArray[np.int64]:
    return np.concatenate(([0], np.cumsum(values)[:-1])).astype(np.int64)


def _split_entries(planner: _Planner, prelude: bytes, diff: bytes, run: int) -> _Pieces | None:
    """``planner``'s entries cut at their runs of at least ``run`` zero difference bytes
    (runs end where an entry starts), each run an exact piece; None when there is none."""
    if not planner.entries:
        return None
    seeks, copies, extras, new_at, old_at = planner.entry_table.T
    offsets = _exclusive_cumsum(copies)
    values = np.frombuffer(diff, dtype=np.uint8)
    size = len(values)
    zero = values == 0
    starts_here = np.zeros(size + 1, dtype=bool)
    starts_here[offsets[copies > 0]] = True
    run_start = zero & (~np.concatenate(([False], zero[:-1])) | starts_here[:size])
    run_end = zero & (~np.concatenate((zero[1:], [False])) | starts_here[1:])
    run_starts = np.flatnonzero(run_start)
    run_ends = np.flatnonzero(run_end) + 1
    long = run_ends - run_starts >= run
    run_starts = run_starts[long]
    if not len(run_starts):
        return None
    # Pieces of the copies: the intervals between entry starts, entry ends and run bounds.
    with_copy = np.flatnonzero(copies > 0)
    cuts = np.unique(np.concatenate((
        offsets[with_copy], offsets[with_copy] + copies[with_copy], run_starts, run_ends[long]
    )))
    piece_start = cuts[:-1]
    owner = with_copy[np.searchsorted(offsets[with_copy], piece_start, side="right") - 1]
    found = np.minimum(np.searchsorted(run_starts, piece_start), len(run_starts) - 1)
    exact = run_starts[found] == piece_start
    # Entries without a copy are a piece each (their extra bytes).
    bare = np.flatnonzero(copies == 0)
    owner = np.concatenate((owner, bare))
    piece_start = np.concatenate((piece_start, offsets[bare]))
    length = np.concatenate((np.diff(cuts), np.zeros(len(bare), dtype=np.int64)))
    exact = np.concatenate((exact, np.zeros(len(bare), dtype=bool)))
    order = np.lexsort((piece_start, owner))
    owner, piece_start, length, exact = owner[order], piece_start[order], length[order], exact[
        order
    ]
    first = np.concatenate(([True], owner[1:] != owner[:-1]))
    last = np.concatenate((owner[1:] != owner[:-1], [True]))
    inside = piece_start - offsets[owner]
    new_pos, old_pos = new_at[owner] + inside, old_at[owner] + inside
    # The prediction of a copy depends on where its span ends (an instruction that crosses
    # the end is not predicted), so the pieces' difference bytes are made again for their
    # own spans; a piece is exact only if all of them are still zero.
    copied = length > 0
    rows = np.stack((new_pos[copied], old_pos[copied], length[copied]), axis=1)
    piece_diff = planner.diff_of(prelude, np.ascontiguousarray(rows, dtype=np.int64))
    diff_from = _exclusive_cumsum(length)
    nonzero = np.concatenate(([0], np.cumsum(np.frombuffer(piece_diff, dtype=np.uint8) != 0)))
    exact &= nonzero[diff_from + length] == nonzero[diff_from]
    return _Pieces(
        seek=np.where(first, seeks[owner], 0),
        copy=length,
        extra=np.where(last, extras[owner], 0),
        exact=exact,
        extra_from=_exclusive_cumsum(extras)[owner],
        diff_from=diff_from,
        diff=piece_diff,
    )


def _varints(values: NDArray[np.int64]) -> bytes:
    """``values`` (each >= 0, < 2**35) as consecutive unsigned LEB128 varints."""
    unsigned = values.astype(np.uint64)
    count = np.ones(len(unsigned), dtype=np.int64)
    for bits in (7, 14, 21, 28):
        count += unsigned >= 1 << bits
    at = _exclusive_cumsum(count)
    out = np.zeros(int(count.sum()), dtype=np.uint8)
    for byte in range(5):
        here = count > byte
        group = (unsigned[here] >> np.uint64(7 * byte)) & np.uint64(0x7F)
        more = np.where(count[here] > byte + 1, 0x80, 0).astype(np.uint64)
        out[at[here] + byte] = (group | more).astype(np.uint8)
    return out.tobytes()


def _with_prelude_flags(prelude: bytes, flags: int) -> bytes:
    """``prelude`` with ``flags`` set in its first varint (the filter set's)."""
    value, at = fmt.read_varint(prelude, 0)
    head = bytearray()
    put_varint(head, value | flags)
    return bytes(head) + prelude[at:]


def _packed_payload(
    planner: _Planner,
    prelude: bytes,
    flagged: bytes,
    diff: bytes,
    extras: bytes,
    run: int,
    columns: bool,
    sparse: bool = False,
) -> bytes | None:
    """The version 3 or 4 payload of ``planner``'s entries with exact stretches split off
    (records packed up to the block limit); with ``columns`` (version 4) each record's
    control entries are written in columns, with ``sparse`` too in sparse columns (version
    5), and the entries go whole when no copy has a stretch to split off; without, None
    then. ``prelude`` is the candidate's (its model
    makes the pieces' difference bytes), ``flagged`` the one to send, ``extras`` every
    entry's extra bytes in order as they are sent."""
    pieces = planner.exact_split(prelude, diff, run)
    if pieces is None:
        if not columns or not planner.entries:  # (no block: nothing to write in columns)
            return None
        pieces = planner.whole_pieces(diff)
    exact_copies = bool(pieces.exact.any())
    if exact_copies:
        flagged = _with_prelude_flags(flagged, fmt.EXACT_COPIES)
    if columns:
        flagged = _with_prelude_flags(flagged, fmt.COLUMNS | (fmt.SPARSE_COLUMNS if sparse else 0))
    payload = bytearray()
    put_varint(payload, len(flagged))
    payload += flagged
    dense = ~pieces.exact
    sent_diff = np.frombuffer(pieces.diff, dtype=np.uint8)[np.repeat(dense, pieces.copy)]
    sent_from = _exclusive_cumsum(np.where(dense, pieces.copy, 0))
    extra_from = pieces.extra_from  # (the extra bytes of one record's pieces are contiguous)
    zigzags = np.where(pieces.seek >= 0, pieces.seek * 2, -pieces.seek * 2 - 1)
    fields = np.stack((zigzags, pieces.copy, pieces.extra), axis=1)
    # Greedy records: worst-case control bytes, the bytes the piece carries, 1/8 byte of
    # bitmap each (in eighths; sparse columns 2/8 more), under the block limit less the count
    # varint and a byte of rounding per bitmap.
    bitmaps = 3 if sparse else 1
    cost = 8 * (_ENTRY_WORST + np.where(dense, pieces.copy, 0) + pieces.extra) + bitmaps
    total = np.concatenate(([0], np.cumsum(cost)))
    room = 8 * (planner.block_limit - 10 - bitmaps)
    count = len(cost)
    start = 0
    while start < count:
        end = max(start + 1, int(np.searchsorted(total, total[start] + room, side="right")) - 1)
        end = min(end, count)
        body = bytearray()
        put_varint(body, end - start)
        if exact_copies:
            body += np.packbits(pieces.exact[start:end], bitorder="little").tobytes()
        # (columns: every seek, then every copy length, then every extra length; the seeks
        # and extras are mostly 0, and copy lengths alike, so each column compresses better)
        if sparse:
            body += _sparse_columns(fields[start:end])
        else:
            body += _varints((fields[start:end].T if columns else fields[start:end]).ravel())
        last = end - 1
        body += sent_diff[sent_from[start] : sent_from[last] + (0 if pieces.exact[last] else
                                                               pieces.copy[last])].tobytes()
        body += extras[extra_from[start] : extra_from[last] + pieces.extra[last]]
        put_varint(payload, len(body))
        payload += body
        start = end
    put_varint(payload, 0)
    return bytes(payload)


def _sparse_columns(fields: NDArray[np.int64]) -> bytes:
    """One record's control entries ``fields`` (rows of zigzag seek, copy, extra) in sparse
    columns (format version 5, otacore.delta): a bitmap of the non-zero seeks and one of the
    non-zero extras, the copy lengths, then the non-zero seeks and the non-zero extras."""
    seeks, copies, extras = fields.T
    return b"".join((
        np.packbits(seeks != 0, bitorder="little").tobytes(),
        np.packbits(extras != 0, bitorder="little").tobytes(),
        _varints(copies),
        _varints(seeks[seeks != 0]),
        _varints(extras[extras != 0]),
    ))


def _unexplained(diff: bytes) -> int:
    """How many difference bytes the prediction got wrong."""
    return int(np.count_nonzero(np.frombuffer(diff, dtype=np.uint8)))


def _best_candidate(
    planner: _Planner, choices: list[tuple[int, bool]], map_cap: int, window_log: int
) -> tuple[int, bool]:
    """The (filters, find_base) whose prelude and difference bytes compress smallest."""
    if len(choices) == 1:
        return choices[0]
    scores = []
    for filters, find_base in choices:
        prelude, diff = planner.candidate(filters, map_cap, find_base)
        scores.append(len(prelude) + len(_compress(diff, 1, window_log)))
    return choices[min(range(len(choices)), key=scores.__getitem__)]


#: Branches whose target another branch shares that make a family (see detect_family).
MIN_SHARED_TARGETS = 8


#: ... and at least this fraction of the branches landing inside: chance coincidences are
#: few (about 1% in a container of records whose length fields follow E8/E9 bytes), real
#: code's many (24% in the BCM4345C0 Bluetooth patch RAM, 57-97% in Cortex-M and x86 code).
MIN_SHARED_FRACTION = 1 / 8


def _shared_targets(targets: NDArray[np.int64], size: int) -> int:
    """How many of ``targets`` land inside the image on a spot another of them also hits
    (0 when they are fewer than MIN_SHARED_FRACTION of those landing inside)."""
    inside = targets[(targets >= 0) & (targets < size)]
    _, counts = np.unique(inside, return_counts=True)
    shared = int(counts[counts >= 2].sum())
    return shared if shared >= MIN_SHARED_FRACTION * inside.shape[0] else 0


def branch_scores(image: bytes) -> tuple[int, int]:
    """(Thumb-2, x86) evidence in ``image``: branches whose target another branch shares.

    A function is called from many places, so real code's BL/B.W (Thumb-2) and CALL/JMP rel32
    (x86) targets recur; bytes that only look like branches (dense data, compressed or
    encrypted blobs, another instruction set) give targets that are spread out, and two of
    them hardly ever coincide. Counting targets merely inside the image does not separate
    them: in a 1.4 MB Wi-Fi container about 4% of the E8/E9 bytes are followed by a rel32
    that lands inside, and in such data the x86 count beat the Thumb one (issue 18's corpus);
    none of those targets is shared, while 57-72% of the inside targets of x86-64 ``.text``
    are. Evidence below MIN_SHARED_FRACTION of the inside targets counts as none.
    """
    size = len(image)
    thumb = x86 = 0
    if size >= 4:
        halves = np.frombuffer(image, dtype="<u2", count=size // 2)
        second = halves[1:] & 0xD000
        # BL / B.W (ARMv7-M ARM A7.7.18, A7.7.12 T4): 11110 S imm10, 11 J1 1 J2 imm11 / 10 J1 1 J2.
        found = np.flatnonzero(
            ((halves[:-1] & 0xF800) == 0xF000) & ((second == 0xD000) | (second == 0x9000))
        )
        h1, h2 = halves[found].astype(np.int64), halves[found + 1].astype(np.int64)
        s = (h1 >> 10) & 1
        i1, i2 = 1 ^ (((h2 >> 13) & 1) ^ s), 1 ^ (((h2 >> 11) & 1) ^ s)
        off = (i1 << 23) | (i2 << 22) | ((h1 & 0x3FF) << 12) | ((h2 & 0x7FF) << 1)
        thumb = _shared_targets(2 * found + 4 + off - (s << 24), size)
    if size >= 5:
        data = np.frombuffer(image, dtype=np.uint8)
        at = np.flatnonzero((data[: size - 4] == 0xE8) | (data[: size - 4] == 0xE9))
        rel = sum(data[at + k].astype(np.int64) << (8 * (k - 1)) for k in range(1, 5))
        x86 = _shared_targets(at + 5 + np.where(rel >= 1 << 31, rel - (1 << 32), rel), size)
    return thumb, x86


def detect_family(image: bytes) -> int:
    """FILTER_THUMB or FILTER_X86, whichever has more branches sharing a target inside
    ``image`` (see :func:`branch_scores`), or 0 when neither has MIN_SHARED_TARGETS."""
    return _family_of(branch_scores(image))


def _family_of(scores: tuple[int, int]) -> int:
    thumb, x86 = scores
    if max(thumb, x86) < MIN_SHARED_TARGETS:
        return 0
    return FILTER_THUMB if thumb >= x86 else FILTER_X86


#: The zstd step (moved to otacore.delta_codec with the other codecs).
_compress = delta_codec.compress_zstd


def _check(
    old: bytes, new: bytes, window_log: int, block_limit: int, map_cap: int, filters: int | None
) -> None:
    if len(old) > min(MAX_IMAGE_SIZE, fmt._kernel.MAX_INDEXED) or len(new) > MAX_IMAGE_SIZE:
        raise PatchInputError("images larger than 2 GiB (base) or 4 GiB (target) are not supported")
    if not 10 <= window_log <= MAX_WINDOW_LOG:
        raise PatchInputError(f"window log must be within 10..{MAX_WINDOW_LOG}")
    if not MIN_BLOCK_LIMIT <= block_limit <= MAX_BLOCK_LIMIT:
        raise PatchInputError(f"block limit must be within {MIN_BLOCK_LIMIT}..{MAX_BLOCK_LIMIT}")
    if not 0 <= map_cap <= MAX_MAP_ENTRIES:
        raise PatchInputError(f"map cap must be within 0..{MAX_MAP_ENTRIES}")
    if filters is not None and filters not in AUTO_FILTERS:
        raise PatchInputError(f"filter set {filters} is not one of {AUTO_FILTERS}")


#: Threads one patch's making uses by default (``ota delta make --workers``, ``ota server
#: --delta-threads-per-patch``): the codec passes overlap each other and the second
#: strategy's making. Two, this machine's cores; on the public corpus 7.4 s -> see
#: bench/delta/README.md. MAX_WORKERS bounds what an operator may ask.
DEFAULT_WORKERS = 2
MAX_WORKERS = 16
#: Format versions the maker can be held to (``format_version``): 2 for appliers that read
#: no version 3, 3 for those that read no version 4, 4 for those that read no version 5,
#: 5 (otacore.delta.NEWEST_VERSION) the default.
MAKEABLE_VERSIONS = (2, 3, 4, 5)


def check_workers(workers: int) -> None:
    """Raise PatchInputError unless ``workers`` is a thread count the maker accepts."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise PatchInputError(
            f"workers must be a whole number of threads from 1 to {MAX_WORKERS}, not {workers!r}"
        )


class _Matching:
    """Pass 1 of every strategy normalising with one branch family: the normalised images,
    the old one's suffix array and the coarse matches do not depend on the rest of the filter
    set (pass 1 uses no maps), so strategies sharing a family compute them once."""

    def __init__(
        self,
        old: bytes,
        new: bytes,
        block_limit: int,
        threshold: int,
        window_log: int,
        format_version: int = fmt.NEWEST_VERSION,
    ) -> None:
        self.old, self.new, self.block_limit, self.threshold = old, new, block_limit, threshold
        self.format_version = format_version
        self.encoder = delta_codec.PatchEncoder(
            old, new, window_log=window_log, block_limit=block_limit
        )
        self._by_family: dict[int, tuple[bytes, NDArray[np.int64], _Planner]] = {}
        self._first_lock = threading.Lock()
        self._literal_costs: NDArray[np.uint8] | Future[NDArray[np.uint8]] | None = None

    def start(self, pool: Executor | None) -> None:
        """Start the estimate of the literal bytes' cost in ``pool`` (it runs beside the
        first suffix array; None: it is made when first needed)."""
        if pool is not None:
            self._literal_costs = pool.submit(literal_costs, self.new)

    @property
    def literal_costs(self) -> NDArray[np.uint8]:
        """:func:`literal_costs` of the new image."""
        if isinstance(self._literal_costs, Future):
            self._literal_costs = self._literal_costs.result()
        elif self._literal_costs is None:
            self._literal_costs = literal_costs(self.new)
        return self._literal_costs

    def first(self, family: int) -> tuple[bytes, NDArray[np.int64], _Planner]:
        """(old image normalised, its suffix array, planner of pass 1's matches); made once
        per family even when strategies run in threads (the others wait for it)."""
        with self._first_lock:
            return self._first(family)

    def _first(self, family: int) -> tuple[bytes, NDArray[np.int64], _Planner]:
        if family not in self._by_family:
            kernel = fmt._kernel
            # Pass 1: branches hold absolute targets on both sides (unmapped), coarse scan.
            plain = (family, 0, 0, _EMPTY_MAP, _EMPTY_MAP)
            old_normal = kernel.normalize(self.old, plain) if family else self.old
            new_normal = kernel.normalize(self.new, plain) if family else self.new
            suffixes = kernel.suffix_array(old_normal)
            spans = kernel.find_matches(
                old_normal, new_normal, suffixes, self.threshold, FIRST_PASS_STEP
            )
            covered = kernel.cover_gaps(
                old_normal, new_normal, suffixes, spans, self.literal_costs
            )
            self._by_family[family] = (
                old_normal,
                suffixes,
                _Planner(self.old, self.new, covered, self.block_limit, evidence=spans,
                         format_version=self.format_version),
            )
        return self._by_family[family]


def _make_one(
    matching: _Matching,
    filters: int | None,
    family: int,
    *,
    level: int | None,
    window_log: int,
    map_cap: int,
) -> _Made:
    """The patch of one strategy: ``filters`` forced, or None for the family's best sets."""
    old_bytes, new_bytes, block_limit = matching.old, matching.new, matching.block_limit
    probe = filters if filters is not None else family | FILTER_WORDS
    old_normal, suffixes, first = matching.first(family)
    model = first.model(probe, map_cap)
    retry = [(filters, True)] if filters is not None else [(probe, True), (probe, False)]
    unexplained = _unexplained(first.candidate(probe, map_cap)[1])
    if model[0] == 0 or unexplained <= max(64, len(new_bytes) >> 12):
        if filters is None:  # nothing left for pass 2 to fix: settle among the candidates
            retry = list(dict.fromkeys([*retry, (family, True), (0, True)]))
        plan, choice = first, _best_candidate(first, retry, map_cap, window_log)
    else:
        # Pass 2: the new image's targets and pointers taken back to old coordinates, matched
        # against the same old normalisation and suffix array. Much new code wants a high
        # switching threshold (no chance matches), little a low one (follow every table).
        kernel = fmt._kernel
        new_normal = kernel.normalize(new_bytes, first.model(probe, map_cap, inverse=True))
        literal = len(new_bytes) - int(first.evidence[:, 2].sum())
        second_threshold = SECOND_PASS_THRESHOLDS[literal * 50 > len(new_bytes)]
        spans = kernel.find_matches(
            old_normal, new_normal, suffixes, second_threshold, SECOND_PASS_STEP
        )
        covered = kernel.cover_gaps(
            old_normal, new_normal, suffixes, spans, matching.literal_costs
        )
        plan = _Planner(old_bytes, new_bytes, covered, block_limit, evidence=spans,
                        format_version=matching.format_version)
        choice = _best_candidate(plan, retry, map_cap, window_log)
    prelude, diff = plan.candidate(choice[0], map_cap, choice[1])
    encoder = matching.encoder
    literal, sure = plan.literal_kind(
        LITERAL_KINDS[family] if matching.format_version >= 3 else ()
    )
    converted_payload = converted = b""
    if literal:
        converted_payload, converted = _laid_out(plan, encoder, level, prelude, diff, literal)
        if sure and not encoder.dictionary_fits(converted_payload):
            return _with_dense(
                plan, encoder, level, prelude, diff, literal, converted_payload, converted
            )
    payload, patch = _laid_out(plan, encoder, level, prelude, diff, delta_literal.NONE)
    # A pick the screen is not sure of is kept only if the whole payload gets smaller with
    # zstd, and with the old image as dictionary too when that fits (converted literals no
    # longer match the old image's bytes: bench/delta/results/literal-branch-probe.md).
    if literal and _size(encoder, converted_payload, converted, level) < _size(
        encoder, payload, patch, level
    ):
        return _with_dense(
            plan, encoder, level, prelude, diff, literal, converted_payload, converted
        )
    return _with_dense(plan, encoder, level, prelude, diff, delta_literal.NONE, payload, patch)


#: Payloads up to this many bytes are also made with their control entries in entry order
#: and the smaller zstd patch kept (version 4's columns are smaller on most payloads: on the
#: public corpus they took 3.5 KB off the total and lost on 5 pairs, by 4-169 bytes, all of
#: them with payloads under 64 KiB; there the second payload costs little).
LAYOUT_CHOICE_MAX = 64 * 1024


def _laid_out(
    plan: _Planner,
    encoder: delta_codec.PatchEncoder,
    level: int | None,
    prelude: bytes,
    diff: bytes,
    literal: int,
    run: int | None = None,
) -> tuple[bytes, bytes]:
    """(payload, its ranking zstd patch) of the records with exact copies of ``run`` (None:
    EXACT_RUN_MIN): control entries in columns where the format allows; in sparse columns
    (version 5) when that makes the zstd patch smaller; in entry order when the payload is
    at most LAYOUT_CHOICE_MAX bytes and that makes it smaller still (the regular form only;
    the dense form's many short entries are what columns are for). Ties keep the earlier,
    older layout. Sparse columns win where most seeks and extras are 0 and lose by a few
    bytes elsewhere (the bitmaps), so zstd decides, for one payload build and zstd pass more
    per form."""
    payload = plan.payload(prelude, diff, literal, run)
    patch = encoder.ranking_patch(payload, level)
    if plan.format_version < fmt.COLUMNS_FORMAT_VERSION:
        return payload, patch
    layouts: list[dict[str, bool]] = []
    if plan.format_version >= fmt.SPARSE_FORMAT_VERSION:
        layouts.append({"sparse": True})
    if run is None and len(payload) <= LAYOUT_CHOICE_MAX:
        layouts.append({"columns": False})
    for layout in layouts:
        other = plan.payload(prelude, diff, literal, run, **layout)
        other_patch = encoder.ranking_patch(other, level)
        if len(other_patch) < len(patch):
            payload, patch = other, other_patch
    return payload, patch


@dataclass(frozen=True)
class _Made:
    """A strategy's zstd patch, and the other form of its records (exact copies down to
    EXACT_RUN_DENSE, or not) when that one was made too (for the codec step)."""

    patch: bytes
    other: bytes | None = None


#: The shorter zero runs the dense form of a payload cuts out as exact copies.
EXACT_RUN_DENSE = 2
#: ... and only when the zero runs it cuts are this long on average: LZMA2 codes a short run
#: of zeros in a few bits, an exact copy costs a control entry of about 4 bytes (on the
#: public corpus the pairs whose runs averaged 11-23 bytes never gained, 51-80 did).
DENSE_MEAN_RUN = 32
#: Whichever form loses with zstd goes through the codec step too when its zstd patch is at
#: most this much larger than the other's: LZMA2 may still rank them the other way round
#: (iwlwifi-9260: the regular form 9.6% larger with zstd in version 4, 11.1% in version 5
#: where sparse columns shrink the dense form, and 4% smaller with LZMA2 in both; on the
#: public corpus raising the margin from 0.10 to 0.15 changed that pair alone) ...
DENSE_MARGIN = 0.15
#: ... or when its payload is at most this many bytes, whatever the margin.
DENSE_ALWAYS = 128 * 1024


def _with_dense(
    plan: _Planner,
    encoder: delta_codec.PatchEncoder,
    level: int | None,
    prelude: bytes,
    diff: bytes,
    literal: int,
    payload: bytes,
    patch: bytes,
) -> _Made:
    """``patch``, or the dense form of the same records when its zstd patch is smaller:
    every zero run of EXACT_RUN_DENSE or more difference bytes an exact copy too.

    Which run length is best depends on the pair: where changes are sparse (a container of
    similar sub-images changed alike, a table of shifted pointers), cutting every zero run
    brings the repeats within the window and leaves the coder runs of entries (the public
    corpus's wifi-rtw89, rtw88); where changes are dense the extra entries cost more than
    they save (iwlwifi-9260: 26.1 -> 30.7 KB at 8). The dense form is made only when the
    zero runs it would cut average DENSE_MEAN_RUN bytes or more; the strategies then compete
    on the smaller zstd patch, and the codec step gets both forms unless one lost by more
    than DENSE_MARGIN. (Until version 4 it was made only when the regular payload was larger
    than the window and the dense one would fit it; with control entries in columns its
    entries cost less: rtw88 969 -> 847 bytes, bt-rtl8852cu -89, dos-argon -78, for about
    0.1 s more make CPU on the public corpus.)
    """
    if plan.format_version < 3 or not _dense_pays(diff):
        return _Made(patch)
    dense, dense_patch = _laid_out(plan, encoder, level, prelude, diff, literal, EXACT_RUN_DENSE)
    if len(dense_patch) < len(patch):
        worth = _loser_worth_coding(payload, patch, dense_patch)
        return _Made(dense_patch, payload if worth else None)
    return _Made(patch, dense if _loser_worth_coding(dense, dense_patch, patch) else None)


def _loser_worth_coding(payload: bytes, patch: bytes, winner: bytes) -> bool:
    """Whether the form that lost with zstd (``payload``, its zstd patch ``patch``) goes
    through the codec step too: LZMA2 may rank the two forms the other way round. Always
    when the payload is at most DENSE_ALWAYS bytes (sparse random changes in a 64 KB image:
    the dense form 16% smaller with zstd, the regular one 4% smaller with LZMA2), else only
    within DENSE_MARGIN: the codec step of a regular payload of 0.5 MB costs about 0.17 s of
    CPU, and on the public corpus the two that lost by more (3.8-72%) lost with LZMA2 too."""
    return len(payload) <= DENSE_ALWAYS or len(patch) <= (1 + DENSE_MARGIN) * len(winner)


def _dense_pays(diff: bytes) -> bool:
    """Whether the zero runs of difference bytes ``diff`` that only the dense form cuts (of
    EXACT_RUN_DENSE bytes or more, shorter than EXACT_RUN_MIN) average DENSE_MEAN_RUN bytes
    or more: each costs a control entry of about 4 bytes where LZMA2 codes a short run in a
    few bits."""
    values = np.frombuffer(diff, dtype=np.uint8)
    edges = np.diff(np.concatenate(([0], (values == 0).view(np.int8), [0])))
    lengths = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    # (runs of EXACT_RUN_MIN or more are exact copies in the payload already)
    cut = lengths[(lengths >= EXACT_RUN_DENSE) & (lengths < EXACT_RUN_MIN)]
    return bool(len(cut)) and float(cut.mean()) >= DENSE_MEAN_RUN


def _size(
    encoder: delta_codec.PatchEncoder, payload: bytes, patch: bytes, level: int | None
) -> int:
    """The size of ``patch`` (``payload`` with zstd) or, when the old image and the payload
    fit the window, of ``payload`` with the old image as dictionary (codec 2) if smaller."""
    if not encoder.dictionary_fits(payload):
        return len(patch)
    return min(len(patch), len(encoder.encode(payload, CODEC_ZSTD_OLD, level=level)))


def search_patch(
    old: Buffer,
    new: Buffer,
    *,
    level: int | None = None,
    window_log: int = DEFAULT_WINDOW_LOG,
    block_limit: int = DEFAULT_BLOCK_LIMIT,
    filters: int | None = None,
    threshold: int = 16,
    map_cap: int = MAX_MAP_ENTRIES,
    effort: int = delta_strategy.DEFAULT_EFFORT,
    codecs: Collection[int] = delta_codec.DEFAULT_CODECS,
    lzma_preset: int = delta_codec.DEFAULT_LZMA_PRESET,
    workers: int = DEFAULT_WORKERS,
    format_version: int = fmt.NEWEST_VERSION,
) -> delta_strategy.SearchResult:
    """The smallest of the patches of the first strategies (otacore.delta_strategy) that
    turn ``old`` into ``new``, with what was tried: ``effort`` of them for an image of at least
    EFFORT_UNIT bytes, more for a smaller one (``delta_strategy.strategies_for``).

    ``filters`` forces one filter set (one strategy, whatever ``effort``); ``threshold`` is
    the first pass's switching threshold (ext/delta_match.h). The steps of each strategy are
    in the module docstring. The winner's payload is then compressed with each of ``codecs``
    (``level`` is zstd's, ``lzma_preset`` LZMA2's) and the smallest patch kept, the target as
    all literals included (otacore.delta_codec); ``tried`` holds the strategies' zstd sizes.
    When another strategy than the first won, the first one's payload goes through the
    codec step too when it may still win (_worth_recoding: a zstd patch within RECODE_MARGIN
    of the winner's, or at most RECODE_ALWAYS bytes) and the smaller is kept; so no effort
    gives a larger patch than effort 1 unless the first strategy lost on zstd by more than
    the margin (between two efforts above 1 that is not guaranteed: only winners are
    re-encoded).

    ``workers`` threads (1: none, all in the calling thread) make the strategies beside
    each other and overlap the codec passes; the patch does not depend on it.
    ``format_version`` is the newest format the patch may use: 2 for devices whose applier
    reads no version 3 (no exact copies, no literal branch conversion).
    """
    old_bytes, new_bytes = bytes(old), bytes(new)
    _check(old_bytes, new_bytes, window_log, block_limit, map_cap, filters)
    delta_strategy.check_effort(effort)
    delta_codec.check_codecs(codecs, lzma_preset)
    check_workers(workers)
    if format_version not in MAKEABLE_VERSIONS or isinstance(format_version, bool):
        raise PatchInputError(
            f"format version must be one of {', '.join(map(str, MAKEABLE_VERSIONS))}, "
            f"not {format_version!r}"
        )
    matching = _Matching(
        old_bytes, new_bytes, block_limit, threshold, window_log, format_version
    )
    if filters is not None:
        order: list[delta_strategy.Strategy] = [filters]
        effort, detected = 1, 0
    else:
        scores = branch_scores(old_bytes)
        detected = _family_of(scores)
        order = delta_strategy.strategy_order(detected, scores)
        effort = delta_strategy.strategies_for(effort, max(len(old_bytes), len(new_bytes)))

    made: list[_Made] = []  # each strategy's zstd patch (and dense payload), in order
    with _pools(workers) as (encoders, background, strategies):
        matching.start(encoders)

        def make_strategy(strategy: delta_strategy.Strategy) -> _Made:
            family = detected if strategy is None else strategy & (FILTER_THUMB | FILTER_X86)
            return _make_one(
                matching, strategy, family, level=level, window_log=window_log, map_cap=map_cap
            )

        # The strategies after the first start now, beside it (the search keeps their order).
        ahead = {
            index: strategies.submit(make_strategy, strategy)
            for index, strategy in enumerate(order[1:effort], 1)
        } if strategies is not None else {}

        def finish(one: _Made, pool: Executor | None) -> bytes:
            return matching.encoder.finish(
                one.patch, codecs, level=level, preset=lzma_preset, pool=pool,
                alternatives=() if one.other is None else (one.other,),
            )

        def make(strategy: delta_strategy.Strategy) -> bytes:
            index = len(made)
            made.append(ahead[index].result() if index in ahead else make_strategy(strategy))
            return made[-1].patch

        result = delta_strategy.search(order, effort, make)
        winner = next(one for one in made if one.patch is result.patch)
        if winner is made[0] or not _worth_recoding(made[0].patch, winner.patch):
            # The codec step: the winner's payload with every codec, and the all-literal
            # candidate.
            patch = finish(winner, encoders)
            return delta_strategy.SearchResult(patch, result.strategy, result.tried)
        # The strategies compete on zstd; another codec may favour the first one (what
        # effort 1 returns), so its payload goes through the codec step too, beside the
        # winner's, and the smaller is kept (ties: the winner's).
        first_finished = None if background is None else background.submit(
            finish, made[0], encoders
        )
        patch = finish(winner, encoders)
        first = finish(made[0], None) if first_finished is None else first_finished.result()
        if len(first) < len(patch):
            return delta_strategy.SearchResult(first, result.tried[0][0], result.tried)
        return delta_strategy.SearchResult(patch, result.strategy, result.tried)


#: When another strategy than the first wins on zstd, the first one's payload goes through
#: the codec step too (so that it is never larger than effort 1's) when its zstd patch is
#: at most this much larger than the winner's ...
RECODE_MARGIN = 0.01
#: ... or at most this many bytes, whatever the margin (the codec step costs little there).
RECODE_ALWAYS = 16 * 1024


def _worth_recoding(first: bytes, winner: bytes) -> bool:
    """Whether the first strategy's zstd patch ``first`` may still win the codec step against
    the winner's ``winner``. Another codec ranks two payloads of one pair nearly as zstd
    does: on the public corpus, of 18 pairs another strategy won, the first's codec step
    never won and its ratio to the winner's stayed within 3 points of the zstd ratio (0.2-66%
    larger). The codec step of a 1 MB image's payload costs about 0.25 s of CPU."""
    return len(first) <= RECODE_ALWAYS or len(first) <= (1 + RECODE_MARGIN) * len(winner)


@contextmanager
def _pools(workers: int) -> Iterator[tuple[Executor | None, ...]]:
    """(encoders, background, strategies) for a search with ``workers`` threads, or Nones
    for 1.

    The encoders run codec passes (liblzma and zstd release the GIL, as the kernel's matching
    does), and never wait for each other; the one background thread runs the first
    strategy's codec step when it is worth one beside the winner's, and hands its passes to
    the encoders; the strategy threads make
    the strategies after the first, beside it (they wait only for a pass 1 they share). The
    pools are shut down, their work finished, before the search returns: no thread outlives
    it.
    """
    if workers == 1:
        yield None, None, None
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="delta-encode") as encoders, \
            ThreadPoolExecutor(1, thread_name_prefix="delta-first") as background, \
            ThreadPoolExecutor(workers - 1, thread_name_prefix="delta-strategy") as strategies:
        yield encoders, background, strategies


def make_patch(
    old: Buffer,
    new: Buffer,
    *,
    level: int | None = None,
    window_log: int = DEFAULT_WINDOW_LOG,
    block_limit: int = DEFAULT_BLOCK_LIMIT,
    filters: int | None = None,
    threshold: int = 16,
    map_cap: int = MAX_MAP_ENTRIES,
    effort: int = delta_strategy.DEFAULT_EFFORT,
    codecs: Collection[int] = delta_codec.DEFAULT_CODECS,
    lzma_preset: int = delta_codec.DEFAULT_LZMA_PRESET,
    workers: int = DEFAULT_WORKERS,
    format_version: int = fmt.NEWEST_VERSION,
) -> bytes:
    """A patch that turns ``old`` into ``new``: the smallest :func:`search_patch` finds.

    ``filters`` None lets the search try ``effort`` strategies, the detector's first;
    a filter set forces that one.
    """
    return search_patch(
        old,
        new,
        level=level,
        window_log=window_log,
        block_limit=block_limit,
        filters=filters,
        threshold=threshold,
        map_cap=map_cap,
        effort=effort,
        codecs=codecs,
        lzma_preset=lzma_preset,
        workers=workers,
        format_version=format_version,
    ).patch
