"""Delta format version 4: each block's control entries in columns (otacore.delta,
"Columns").

What is checked: version 3 patches made before the change still apply (tests/data/delta-v3);
a version 4 payload and the same records written entry by entry (version 3) give the same
target, whole and streamed in any pieces; the version and the COLUMNS flag must agree; a
column that runs past its record, and 300 mutated payloads, fail only with DeltaError; the
apply memory stays under its bound; the maker held to version 4 writes it, and version 3
when held to that, and keeps a small payload in entry order when zstd prefers that.
Version 5's sparse columns: tests/test_delta_sparse.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacore import delta, delta_codec, delta_forms, delta_maker
from otacore.delta import (
    CODEC_ZSTD,
    COLUMNS,
    EXACT_COPIES,
    PatchCorruptError,
    PatchHeader,
    payload_format_version,
    put_varint,
    read_varint,
)
from otacore.delta_strategy import SearchResult
from otacore.delta_stream import decode_payload, python_memory_bound
from tests.test_delta import image_pairs
from tests.test_delta_exact_copies import _applies, gives_target_or_delta_error, mutated
from tests.test_delta_strategy import PAIRS
from tests.test_delta_stream import firmware_pair, peak_during_apply

V3 = Path(__file__).parent / "data" / "delta-v3"
V2 = Path(__file__).parent / "data" / "delta-v2"
CALLS = Path(__file__).parent / "data" / "delta-v2-thumb-calls"


@pytest.mark.parametrize(
    ("name", "folder", "prefix"),
    [
        ("exact.otad", V2, ""),
        ("exact-zstd.otad", V2, ""),
        ("thumb-calls.otad", CALLS, ""),
        ("dense.otad", V3, "sparse."),
    ],
)
def test_version_3_vectors_still_apply(name: str, folder: Path, prefix: str) -> None:
    old = (folder / f"{prefix}old.bin").read_bytes()
    new = (folder / f"{prefix}new.bin").read_bytes()
    patch = (V3 / name).read_bytes()
    assert delta.read_header(patch).version == 3
    assert _applies(old, new, patch)
    # Today's maker makes the pair as version 4 or 5 (sparse columns where they compress
    # smaller), and as the vector's version 3 when held to it (the same options the vector
    # was made with: tests/data/delta-v3/make_v3_vector.py).
    options = {"window_log": 12, "codecs": (CODEC_ZSTD,)} if prefix else (
        {"codecs": (CODEC_ZSTD,)} if "zstd" in name else {}
    )
    assert delta.make_patch(old, new, format_version=3, **options) == patch
    assert delta.read_header(delta.make_patch(old, new, **options)).version in (4, 5)


# --- the two layouts of the same records ----------------------------------------------------


def _flags(payload: bytes) -> int:
    return read_varint(payload, read_varint(payload, 0)[1])[0]


def _relayout(payload: bytes, to_columns: bool) -> bytes:
    """``payload`` with every block's control entries rewritten in the other layout (and the
    prelude's COLUMNS flag with them): the same records otherwise."""
    length, at = read_varint(payload, 0)
    prelude = bytearray(payload[at : at + length])
    at += length
    field, rest = read_varint(prelude, 0)
    exact = bool(field & EXACT_COPIES)
    columns_now = bool(field & COLUMNS)
    head = bytearray()
    put_varint(head, field | COLUMNS if to_columns else field & ~COLUMNS)
    out = bytearray()
    put_varint(out, len(head) + len(prelude) - rest)
    out += head + prelude[rest:]
    while True:
        size, at = read_varint(payload, at)
        if size == 0:
            break
        record = payload[at : at + size]
        at += size
        count, r = read_varint(record, 0)
        bitmap = (count + 7) // 8 if exact else 0
        body = bytearray(record[:r + bitmap])
        r += bitmap
        values = []
        for _ in range(3 * count):
            value, r = read_varint(record, r)
            values.append(value)
        rows = (
            list(zip(values[:count], values[count : 2 * count], values[2 * count :], strict=True))
            if columns_now
            else list(zip(values[0::3], values[1::3], values[2::3], strict=True))
        )
        ordered = [v for column in zip(*rows, strict=True) for v in column] if to_columns \
            else [v for row in rows for v in row]
        for value in ordered:
            put_varint(body, value)
        body += record[r:]
        put_varint(out, len(body))
        out += body
    put_varint(out, 0)
    return bytes(out)


def _repack(header: PatchHeader, payload: bytes, version: int | None = None) -> bytes:
    frame = delta_codec.compress_zstd(payload, 3, header.window_log)
    fields = {**header.__dict__, "payload_size": len(frame), "codec": CODEC_ZSTD,
              "lzma_props": 0}
    fields["version"] = payload_format_version(payload) if version is None else version
    return PatchHeader(**fields).pack() + frame


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_columns_and_entries_in_order_give_the_same_target(seed: int) -> None:
    """The maker's version 4 payload rewritten entry by entry is a valid version 3 payload
    of the same target, and back again byte for byte."""
    old, new = firmware_pair(120_000, seed)
    patch = delta.make_patch(old, new, codecs=(CODEC_ZSTD,), format_version=4)
    header, payload = decode_payload(patch, old=old)
    assert header.version == 4 and _flags(payload) & COLUMNS
    interleaved = _relayout(payload, to_columns=False)
    assert payload_format_version(interleaved) == 3  # its exact copies remain
    assert _applies(old, new, _repack(header, interleaved))
    assert _relayout(interleaved, to_columns=True) == payload
    assert _applies(old, new, _repack(header, payload))


def test_a_payload_without_exact_copies_has_columns_and_no_bitmap() -> None:
    """Runs too short to split, even in the dense form (changes every 20 bytes): version 4
    still writes columns (COLUMNS, not EXACT_COPIES), and no exact-copy bitmap; held to
    version 3 it is a version 2 patch."""
    rng = random.Random(24)
    old = rng.randbytes(80_000)
    new = bytearray(old)
    for at in range(100, len(new), 20):
        new[at] ^= 0x5A
    patch = delta.make_patch(old, bytes(new), codecs=(CODEC_ZSTD,), format_version=4)
    header, payload = decode_payload(patch, old=old)
    assert header.version == 4 and _flags(payload) & (COLUMNS | EXACT_COPIES) == COLUMNS
    assert _applies(old, bytes(new), patch)
    assert delta.read_header(
        delta.make_patch(old, bytes(new), codecs=(CODEC_ZSTD,), format_version=3)
    ).version == 2


# --- malformed version 4 payloads ---------------------------------------------------------


def _sample() -> tuple[bytes, bytes, PatchHeader, bytes]:
    old, new = firmware_pair(60_000, 12)
    patch = delta.make_patch(old, new, codecs=(CODEC_ZSTD,), format_version=4)
    header, payload = decode_payload(patch)
    assert header.version == 4
    return old, new, header, payload


_SAMPLE = _sample()


def test_version_and_columns_flag_must_agree() -> None:
    old, new, header, payload = _SAMPLE
    assert _applies(old, new, _repack(header, payload))
    with pytest.raises(PatchCorruptError, match=r"version 3 patch's prelude .* is version 4's"):
        delta.apply_patch(old, _repack(header, payload, version=3))
    interleaved = _relayout(payload, to_columns=False)
    with pytest.raises(PatchCorruptError, match=r"version 4 patch's prelude .* is version 3's"):
        delta.apply_patch(old, _repack(header, interleaved, version=4))


def _records(payload: bytes) -> tuple[bytes, list[bytes]]:
    length, at = read_varint(payload, 0)
    head, at = payload[: at + length], at + length
    records = []
    while True:
        size, at = read_varint(payload, at)
        if size == 0:
            return head, records
        records.append(payload[at : at + size])
        at += size


def _join(head: bytes, records: list[bytes]) -> bytes:
    out = bytearray(head)
    for record in records:
        put_varint(out, len(record))
        out += record
    put_varint(out, 0)
    return bytes(out)


def test_a_column_running_past_its_record_is_refused() -> None:
    """A block whose entry count claims more entries than its columns hold: the seek or copy
    column runs into the next one and the lengths no longer add up, or past the record."""
    old, _, header, payload = _SAMPLE
    head, records = _records(payload)
    record = bytearray(records[0])
    count, r = read_varint(record, 0)
    more = bytearray()
    put_varint(more, count + 1)
    damaged = bytes(more) + bytes(record[r:])
    with pytest.raises(PatchCorruptError):
        delta.apply_patch(old, _repack(header, _join(head, [damaged, *records[1:]])))
    cut = bytes(record[: r + (count + 7) // 8 + count // 2])  # inside the seek column
    with pytest.raises(PatchCorruptError):
        delta.apply_patch(old, _repack(header, _join(head, [cut, *records[1:]])))


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32), edits=st.integers(1, 4))
def test_mutated_version_4_payloads_fail_with_a_delta_error_only(seed: int, edits: int) -> None:
    """Whatever the damage inside the (correctly compressed) payload, the applier gives the
    target or raises DeltaError, never another exception."""
    old, new, header, payload = _SAMPLE
    damaged = _repack(header, mutated(payload, seed, edits), version=4)
    gives_target_or_delta_error(old, new, damaged, seed)


def test_apply_memory_stays_under_its_bound_with_columns() -> None:
    """Many short entries (one changed byte every 40-90 bytes of 1 MB, dense form) are read
    through three cursors into the record: the memory bound holds."""
    rng = random.Random(25)
    old = rng.randbytes(1_000_000)
    new = bytearray(old)
    at = 0
    while at < len(new):
        new[at] ^= 0x11
        at += rng.randrange(40, 90)
    patch = delta.make_patch(old, bytes(new), codecs=(CODEC_ZSTD,), format_version=4)
    header, payload = decode_payload(patch, old=old)
    assert header.version == 4 and _flags(payload) & COLUMNS
    peak, written = peak_during_apply(old, patch, 1)
    assert written == len(new)
    assert peak < python_memory_bound(header.block_limit)


# --- the maker's choice of layout for small payloads ------------------------------------------


def _tried_with_and_without_choice(old: bytes, new: bytes) -> tuple[SearchResult, SearchResult]:
    options = {"effort": 2, "block_limit": 1024, "format_version": 4}
    chosen = delta_maker.search_patch(old, new, **options)  # type: ignore[arg-type]
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(delta_forms, "LAYOUT_CHOICE_MAX", -1)  # columns whatever the size
        columns = delta_maker.search_patch(old, new, **options)  # type: ignore[arg-type]
    return chosen, columns


def test_a_small_payload_keeps_entry_order_when_zstd_prefers_it() -> None:
    """Small relinked Thumb-2 firmware whose entries in order make smaller zstd patches than
    in columns: the strategies rank on the smaller, and every patch applies."""
    old, new = PAIRS["thumb relinked"]()
    chosen, columns = _tried_with_and_without_choice(old, new)
    pairs = list(zip(chosen.tried, columns.tried, strict=True))
    assert all(a[1] <= b[1] for a, b in pairs) and any(a[1] < b[1] for a, b in pairs)
    assert _applies(old, new, chosen.patch) and _applies(old, new, columns.patch)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=image_pairs(2000))
def test_the_layout_choice_never_ranks_a_strategy_larger(pair: tuple[bytes, bytes]) -> None:
    old, new = pair
    chosen, columns = _tried_with_and_without_choice(old, new)
    assert all(a[1] <= b[1] for a, b in zip(chosen.tried, columns.tried, strict=True))
    assert _applies(old, new, chosen.patch)
