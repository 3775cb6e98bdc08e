"""Delta format version 5: sparse columns (otacore.delta, "Sparse columns").

What is checked: version 4 patches still apply and the maker held to version 4 still makes
them (tests/data/delta-v4); a version 5 payload rewritten in plain columns (version 4) gives
the same target, whole and in pieces, and back again byte for byte; the version and the
flags must agree; bitmaps that mark entries a block lacks, a marked zero, a record too short
for its bitmaps and 300 mutated payloads fail only with DeltaError; the apply memory stays
under its bound; the maker's layout choice never ranks a strategy larger than version 4's.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacore import delta, delta_maker
from otacore.delta import (
    CODEC_ZSTD,
    COLUMNS,
    EXACT_COPIES,
    SPARSE_COLUMNS,
    PatchCorruptError,
    payload_format_version,
    put_varint,
    read_varint,
)
from otacore.delta_stream import decode_payload, python_memory_bound
from tests.test_delta import image_pairs
from tests.test_delta_columns import _flags, _join, _records, _repack
from tests.test_delta_exact_copies import _applies, gives_target_or_delta_error, mutated
from tests.test_delta_format_v2 import _apply_in_pieces
from tests.test_delta_stream import peak_during_apply

DATA = Path(__file__).parent / "data"
V4 = DATA / "delta-v4"
PAIRS = {
    "exact.otad": (DATA / "delta-v2", "", {}),
    "exact-zstd.otad": (DATA / "delta-v2", "", {"codecs": (CODEC_ZSTD,)}),
    "thumb-calls.otad": (DATA / "delta-v2-thumb-calls", "", {}),
    "dense.otad": (DATA / "delta-v3", "sparse.", {"window_log": 12, "codecs": (CODEC_ZSTD,)}),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_version_4_vectors_apply_and_the_maker_held_to_4_makes_them(name: str) -> None:
    folder, prefix, options = PAIRS[name]
    old = (folder / f"{prefix}old.bin").read_bytes()
    new = (folder / f"{prefix}new.bin").read_bytes()
    patch = (V4 / name).read_bytes()
    assert delta.read_header(patch).version == 4
    assert _applies(old, new, patch)
    # (the options the vector was made with: tests/data/delta-v4/make_v4_vector.py)
    assert delta.make_patch(old, new, format_version=4, **options) == patch  # type: ignore[arg-type]
    newest = delta.make_patch(old, new, **options)  # type: ignore[arg-type]
    assert delta.read_header(newest).version in (4, 5) and len(newest) <= len(patch)
    assert _applies(old, new, newest)


# --- the same records in sparse and in plain columns ----------------------------------------


def _entries_of(record: bytes, sparse: bool, exact: bool) -> tuple[bytes, list[tuple[int, ...]],
                                                                      int]:
    """(count varint + exact bitmap, the entries as (zigzag seek, copy, extra), offset past the
    control bytes) of one block record."""
    count, r = read_varint(record, 0)
    r += (count + 7) // 8 if exact else 0
    head = record[:r]
    if not sparse:
        values = []
        for _ in range(3 * count):
            value, r = read_varint(record, r)
            values.append(value)
        columns = values[:count], values[count : 2 * count], values[2 * count :]
        return head, list(zip(*columns, strict=True)), r
    width = (count + 7) // 8
    marks = [int.from_bytes(record[r + k * width : r + (k + 1) * width], "little") for k in (0, 1)]
    r += 2 * width
    copies = []
    for _ in range(count):
        value, r = read_varint(record, r)
        copies.append(value)
    picked = []
    for mark in marks:
        column = []
        for index in range(count):
            value = 0
            if mark >> index & 1:
                value, r = read_varint(record, r)
            column.append(value)
        picked.append(column)
    return head, list(zip(picked[0], copies, picked[1], strict=True)), r


def _relayout(payload: bytes, to_sparse: bool) -> bytes:
    """``payload`` (columns, sparse or not) with every block's control entries rewritten in the
    other column layout, and the prelude's SPARSE_COLUMNS flag with them."""
    head, records = _records(payload)
    _length, at = read_varint(head, 0)
    field, rest = read_varint(head, at)
    sparse_now, exact = bool(field & SPARSE_COLUMNS), bool(field & EXACT_COPIES)
    prelude = bytearray()
    put_varint(prelude, field | SPARSE_COLUMNS if to_sparse else field & ~SPARSE_COLUMNS)
    prelude += head[rest:]
    new_head = bytearray()
    put_varint(new_head, len(prelude))
    new_head += prelude
    out = []
    for record in records:
        start, entries, end = _entries_of(record, sparse_now, exact)
        body = bytearray(start)
        seeks, copies, extras = (list(column) for column in zip(*entries, strict=True))
        if to_sparse:
            for column in (seeks, extras):
                marks = sum(1 << i for i, value in enumerate(column) if value)
                body += marks.to_bytes((len(column) + 7) // 8, "little")
            for value in copies + [v for v in seeks if v] + [v for v in extras if v]:
                put_varint(body, value)
        else:
            for value in seeks + copies + extras:
                put_varint(body, value)
        out.append(bytes(body) + record[end:])
    return _join(bytes(new_head), out)


def _sparse_sample(seed: int) -> tuple[bytes, bytes, delta.PatchHeader, bytes]:
    """A pair whose patch is version 5 (one byte changed every 40-90 bytes: the dense form's
    many entries, their seeks and extras mostly 0)."""
    rng = random.Random(seed)
    old = rng.randbytes(60_000)
    new = bytearray(old)
    at = rng.randrange(40, 90)
    while at < len(new):
        new[at] ^= 1 + rng.randrange(255)
        at += rng.randrange(40, 90)
    patch = delta.make_patch(old, bytes(new), codecs=(CODEC_ZSTD,))
    header, payload = decode_payload(patch, old=old)
    assert header.version == 5 and _flags(payload) & (COLUMNS | SPARSE_COLUMNS)
    return old, bytes(new), header, payload


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_sparse_and_plain_columns_give_the_same_target(seed: int) -> None:
    old, new, header, payload = _sparse_sample(seed)
    plain = _relayout(payload, to_sparse=False)
    assert payload_format_version(plain) == 4
    assert _applies(old, new, _repack(header, plain, version=4))
    assert _relayout(plain, to_sparse=True) == payload
    patch = _repack(header, payload)
    assert _applies(old, new, patch)
    assert all(_apply_in_pieces(old, patch, piece) == new for piece in (1, 7, 4096))


_SAMPLE = _sparse_sample(34)


def test_version_and_sparse_flag_must_agree() -> None:
    old, _new, header, payload = _SAMPLE
    with pytest.raises(PatchCorruptError, match=r"version 4 patch's prelude .* is version 5's"):
        delta.apply_patch(old, _repack(header, payload, version=4))
    plain = _relayout(payload, to_sparse=False)
    with pytest.raises(PatchCorruptError, match=r"version 5 patch's prelude .* is version 4's"):
        delta.apply_patch(old, _repack(header, plain, version=5))
    head, records = _records(payload)
    _length, at = read_varint(head, 0)
    field, rest = read_varint(head, at)
    lone = bytearray()
    put_varint(lone, field & ~COLUMNS)  # sparse columns without columns: no version's
    prelude = bytes(lone) + head[rest:]
    lone_head = bytearray()
    put_varint(lone_head, len(prelude))
    damaged = _join(bytes(lone_head) + prelude, records)
    with pytest.raises(PatchCorruptError, match=r"sparse columns \(bit 7\) without columns"):
        delta.apply_patch(old, _repack(header, damaged))


def _damaged_first_record(change: object) -> bytes:
    _old, _, header, payload = _SAMPLE
    head, records = _records(payload)
    record = bytearray(records[0])
    change(record)  # type: ignore[operator]
    return _repack(header, _join(head, [bytes(record), *records[1:]]))


def _bitmaps_at(record: bytearray) -> tuple[int, int]:
    """(entry count, offset of the seek bitmap) of a block record of the sample."""
    count, r = read_varint(record, 0)
    return count, r + ((count + 7) // 8 if _flags(_SAMPLE[3]) & EXACT_COPIES else 0)


def test_bitmaps_that_mark_missing_entries_are_refused() -> None:
    def mark_past_the_end(record: bytearray) -> None:
        count, at = _bitmaps_at(record)
        assert count % 8, "the sample's first block has spare bits"
        width = (count + 7) // 8
        record[at + 2 * width - 1] |= 0x80  # the extra bitmap's last bit: no such entry

    old = _SAMPLE[0]
    with pytest.raises(PatchCorruptError, match="bitmaps mark entries it lacks"):
        delta.apply_patch(old, _damaged_first_record(mark_past_the_end))


def test_a_record_too_short_for_its_bitmaps_is_refused() -> None:
    def cut_inside_the_bitmaps(record: bytearray) -> None:
        count, at = _bitmaps_at(record)
        del record[at + (count + 7) // 8 :]

    with pytest.raises(PatchCorruptError):
        delta.apply_patch(_SAMPLE[0], _damaged_first_record(cut_inside_the_bitmaps))


def test_a_marked_value_of_zero_is_refused() -> None:
    """A set bit whose value is 0: one way to write a block, so refused."""
    old, _, header, payload = _SAMPLE
    head, records = _records(payload)
    start, entries, end = _entries_of(records[0], True, bool(_flags(payload) & EXACT_COPIES))
    body = bytearray(start)
    seeks, copies, extras = (list(column) for column in zip(*entries, strict=True))
    marks = sum(1 << i for i, value in enumerate(seeks) if value) | 1  # entry 0 marked
    body += marks.to_bytes((len(seeks) + 7) // 8, "little")
    body += sum(1 << i for i, value in enumerate(extras) if value).to_bytes(
        (len(seeks) + 7) // 8, "little"
    )
    marked = [seeks[0], *(v for v in seeks[1:] if v)]  # entry 0's value, 0 or not
    for value in copies + marked + [v for v in extras if v]:
        put_varint(body, value)
    if seeks[0]:
        pytest.skip("the sample's first entry seeks")
    damaged = _join(head, [bytes(body) + records[0][end:], *records[1:]])
    with pytest.raises(PatchCorruptError, match="hold a marked zero"):
        delta.apply_patch(old, _repack(header, damaged))


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32), edits=st.integers(1, 4))
def test_mutated_version_5_payloads_fail_with_a_delta_error_only(seed: int, edits: int) -> None:
    """Whatever the damage inside the (correctly compressed) payload, the applier gives the
    target or raises DeltaError, never another exception."""
    old, new, header, payload = _SAMPLE
    damaged = _repack(header, mutated(payload, seed, edits), version=5)
    gives_target_or_delta_error(old, new, damaged, seed)


def test_apply_memory_stays_under_its_bound_with_sparse_columns(applier_kernel: str) -> None:
    """Many short entries (one changed byte every 40-90 bytes of 1 MB, dense form, sparse
    columns) read through three cursors into the record: the memory bound holds."""
    rng = random.Random(25)
    old = rng.randbytes(1_000_000)
    new = bytearray(old)
    at = 0
    while at < len(new):
        new[at] ^= 0x11
        at += rng.randrange(40, 90)
    patch = delta.make_patch(old, bytes(new), codecs=(CODEC_ZSTD,))
    header, payload = decode_payload(patch, old=old)
    assert header.version == 5 and _flags(payload) & SPARSE_COLUMNS
    peak, written = peak_during_apply(old, patch, 1)
    assert written == len(new)
    assert peak < python_memory_bound(header.block_limit)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=image_pairs(2000))
def test_version_5_never_ranks_a_strategy_larger_than_version_4(
    pair: tuple[bytes, bytes],
) -> None:
    """The layouts version 5 chooses among include version 4's, so every strategy's zstd
    patch is at most version 4's; and the patch applies."""
    old, new = pair
    options = {"effort": 2, "block_limit": 1024}
    newest = delta_maker.search_patch(old, new, **options)  # type: ignore[arg-type]
    held = delta_maker.search_patch(old, new, format_version=4, **options)  # type: ignore[arg-type]
    assert [s for s, _ in newest.tried] == [s for s, _ in held.tried]
    assert all(a[1] <= b[1] for a, b in zip(newest.tried, held.tried, strict=True))
    assert _applies(old, new, newest.patch)
