"""The planner: one pair's copy entries and the candidate payloads built from them.

The maker (otacore.delta_maker) hands a :class:`Planner` the copy spans a matching pass found.
The planner cuts them and the literal gaps between them into entries grouped in records under
the block limit, encodes the control entries and extra bytes once, and per filter set builds a
candidate: the prelude with the relocation model fitted to the copies
(otacore.delta_relocation) and the difference bytes the model leaves. :meth:`Planner.payload`
lays a candidate out as a payload in any format version the maker may make (otacore.delta:
entry order (2), exact copies and literal branch conversion (3), columns (4), sparse columns
(5)); the maker picks among them (otacore.delta_forms).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import zstandard
from numpy.typing import NDArray

from otacore import delta as fmt
from otacore import delta_literal
from otacore.delta import FILTER_THUMB, FILTER_WORDS, FILTER_X86, LITERAL_SHIFT, put_varint, zigzag
from otacore.delta_relocation import EMPTY_MAP, Model, detect_base, encode_map, fit_map

#: Worst-case bytes of one control entry: three varints of at most 10 bytes.
ENTRY_WORST = 30

#: One entry of a block: [new position, old position (-1: none), copy length, extra length]
#: (a list: the planner lengthens the last entry's extra bytes in place).
_Entry = list[int]


def _plan_blocks(spans: NDArray[np.int64], new_n: int, block_limit: int) -> list[list[_Entry]]:
    """Cut copy spans and the literal gaps between them into entries grouped in blocks whose
    records (control + difference + extra bytes) fit the block limit."""
    blocks: list[list[_Entry]] = []
    current: list[_Entry] = []
    used = 10  # the entry count varint
    worst = ENTRY_WORST
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

class Planner:
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
            model = (filters, base or 0, image_size, EMPTY_MAP, EMPTY_MAP)
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
            return (0, 0, 0, EMPTY_MAP, EMPTY_MAP)
        x86 = bool(filters & FILTER_X86)
        base = self.base(x86) if filters & FILTER_WORDS and find_base else None
        if x86:
            observed = self.observe(filters, base)
        else:  # Thumb branch and aligned-word observations do not depend on the base
            observed = self.observe(FILTER_THUMB | FILTER_WORDS, None)
        branch_keys, branch_deltas, word_keys, word_deltas = observed
        if filters == FILTER_WORDS:
            branch_keys, branch_deltas = EMPTY_MAP
        if not filters & FILTER_WORDS:
            word_keys, word_deltas = EMPTY_MAP
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
                encode_map(prelude, *model[3])
                encode_map(prelude, *model[4])
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
        smallest at zstd level CONVERSION_SCREEN_LEVEL, and whether it gains at least
        CONVERSION_SURE of them: a cheap screen, deterministic; the maker
        (``delta_maker._make_one``) confirms a pick that is not sure on the whole payload."""
        if kinds not in self._literal_kind:
            plain_size = _screen_size(b"".join(extra for _, _, extra in self.blocks))
            best, best_size = delta_literal.NONE, plain_size
            for kind in kinds:
                size = _screen_size(b"".join(self.converted_extras(kind)))
                if size < best_size:
                    best, best_size = kind, size
            self._literal_kind[kinds] = (best, best_size <= (1 - CONVERSION_SURE) * plain_size)
        return self._literal_kind[kinds]

CONVERSION_SCREEN_LEVEL = 3
#: A screen gain of at least this fraction is taken without confirming it on the whole
#: payload (one zstd pass saved; on the public corpus every pick that gained 2% at the
#: screen gained 2-6% in the final patch).
CONVERSION_SURE = 0.02


def _screen_size(data: bytes) -> int:
    return len(zstandard.ZstdCompressor(level=CONVERSION_SCREEN_LEVEL).compress(data))


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


def _split_entries(planner: Planner, prelude: bytes, diff: bytes, run: int) -> _Pieces | None:
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
    planner: Planner,
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
    cost = 8 * (ENTRY_WORST + np.where(dense, pieces.copy, 0) + pieces.extra) + bitmaps
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


