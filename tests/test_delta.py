"""Delta patches: kernel twins agree, round trips are exact, damage is a clear error, CLI."""

from __future__ import annotations

import hashlib
import itertools
import random
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from otacore import delta, delta_family, delta_planner, delta_relocation, delta_stream
from otacore._select import load_native, load_twin
from otacore.delta import PatchHeader, put_varint, zigzag
from otacore.errors import PatchBaseMismatchError, PatchFormatError
from server.cli.delta_cmd import app

TWIN = load_twin("delta")
NATIVE = load_native("delta")
KERNELS = [pytest.param(TWIN, id="twin")] + (
    [pytest.param(NATIVE, id="native")] if NATIVE is not None else []
)
FILTER_SETS = list(delta.AUTO_FILTERS)
needs_native = pytest.mark.skipif(NATIVE is None, reason="native delta kernel not built")


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """Run make/apply on the given kernel (both modules hold a reference to it)."""
    monkeypatch.setattr(delta, "_kernel", request.param)
    monkeypatch.setattr(delta_stream, "_kernel", request.param)
    yield request.param


# --- inputs that look like firmware ------------------------------------------------------


def thumb_image(rng: random.Random, size: int) -> bytearray:
    """Random Thumb-ish code: BL instructions to random targets, pointers, noise."""
    out = bytearray(rng.randbytes(size))
    for at in range(0, size - 4, 2):
        roll = rng.random()
        if roll < 0.08:
            off = rng.randrange(-at, max(1, size - at)) & ~1
            struct.pack_into("<HH", out, at, *_encode_bl(off))
        elif roll < 0.12 and at % 4 == 0:
            struct.pack_into("<I", out, at, 0x08000000 + rng.randrange(size))
    return out


def _encode_bl(off: int) -> tuple[int, int]:
    s, i1, i2 = (off >> 24) & 1, (off >> 23) & 1, (off >> 22) & 1
    h1 = 0xF000 | (s << 10) | ((off >> 12) & 0x3FF)
    h2 = 0xD000 | (((1 ^ i1) ^ s) << 13) | (((1 ^ i2) ^ s) << 11) | ((off >> 1) & 0x7FF)
    return h1, h2


@st.composite
def image_pairs(draw: st.DrawFn, max_size: int = 3000) -> tuple[bytes, bytes]:
    """(old, new) pairs: random, identical, empty, unrelated, shifted, edited, repetitive."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    kind = draw(
        st.sampled_from(
            [
                "random",
                "identical",
                "empty_old",
                "empty_new",
                "unrelated",
                "shifted",
                "edited",
                "repetitive",
                "thumb",
                "tiny",
            ]
        )
    )
    size = draw(st.integers(0, max_size))
    old = bytes(thumb_image(rng, size)) if kind == "thumb" else rng.randbytes(size)
    if kind == "repetitive":
        old = bytes(rng.choice(b"\x00\xff\x01") for _ in range(size))
    if kind == "tiny":
        old = draw(st.binary(max_size=8))
        return old, draw(st.binary(max_size=8))
    if kind == "random":
        return old, draw(st.binary(max_size=200))
    if kind == "identical":
        return old, old
    if kind == "empty_old":
        return b"", old
    if kind == "empty_new":
        return old, b""
    if kind == "unrelated":
        return old, rng.randbytes(rng.randrange(max_size + 1))
    if kind == "shifted":
        cut = rng.randrange(len(old) + 1)
        return old, old[cut:] + rng.randbytes(rng.randrange(64)) + old[:cut]
    new = bytearray(old)
    for _ in range(rng.randrange(1, 6)):
        at = rng.randrange(len(new) + 1)
        op = rng.randrange(4)
        if op == 0:
            new[at:at] = rng.randbytes(rng.randrange(1, 300))
        elif op == 1:
            del new[at : at + rng.randrange(1, 300)]
        elif op == 2:  # relocation: every aligned word in a region moves by a constant
            for j in range(at - at % 4, min(len(new) - 3, at + 400), 4):
                value = struct.unpack_from("<I", new, j)[0]
                struct.pack_into("<I", new, j, (value + 0x40) & 0xFFFFFFFF)
        else:
            new[at:at] = old[rng.randrange(len(old) + 1) :][: rng.randrange(500)]
    return old, bytes(new)


# --- kernel twins agree ------------------------------------------------------------------


def _random_map(data: st.DataObject, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    keys = sorted(set(data.draw(st.lists(st.integers(low, high), max_size=6))))
    deltas = [data.draw(st.integers(-300, 300)) for _ in keys]
    return np.array(keys, dtype=np.int64), np.array(deltas, dtype=np.int64)


@needs_native
@settings(max_examples=100, deadline=None)
@given(image_pairs(1500), st.sampled_from(FILTER_SETS), st.data())
def test_native_and_twin_kernels_agree(
    pair: tuple[bytes, bytes], filters: int, data: st.DataObject
) -> None:
    assert NATIVE is not None
    old, new = pair
    sa = NATIVE.suffix_array(old)
    assert np.array_equal(sa, TWIN.suffix_array(old))
    spans = NATIVE.find_matches(old, new, sa, 8)
    assert np.array_equal(spans, TWIN.find_matches(old, new, sa, 8))
    # A load address that makes some of the (random) words point into the image.
    base = data.draw(st.sampled_from([0, 0x100, 0x08000000]))
    image_size = data.draw(st.sampled_from([0, len(old), 1 << 20]))
    empty = (np.empty(0, np.int64), np.empty(0, np.int64))
    bare = (filters, base, image_size, empty, empty)
    observed = NATIVE.observe(old, new, spans, bare)
    for ours, theirs in zip(observed, TWIN.observe(old, new, spans, bare), strict=True):
        assert np.array_equal(ours, theirs)
    model = (
        filters,
        base,
        image_size,
        _random_map(data, -99, 5000),
        _random_map(data, 0, 2**32 - 1),
    )
    assert NATIVE.diff_spans(old, new, spans, model) == TWIN.diff_spans(old, new, spans, model)
    assert NATIVE.normalize(new, model) == TWIN.normalize(new, model)
    coarse = NATIVE.find_matches(old, new, sa, 16, 3)
    assert np.array_equal(coarse, TWIN.find_matches(old, new, sa, 16, 3))
    if old:
        pos = data.draw(st.integers(0, len(old)))
        end = data.draw(st.integers(pos, len(old)))
        limit = data.draw(st.integers(pos, end + 16))
        shift = data.draw(st.integers(-500, 500))
        src = old[pos : min(limit + 8, end)]
        assert NATIVE.predict(src, pos, end, limit, shift, model) == TWIN.predict(
            src, pos, end, limit, shift, model
        )
    assert NATIVE.add_bytes(old, old) == TWIN.add_bytes(old, old)


@pytest.mark.parametrize("module", KERNELS)
def test_suffix_array_is_sorted(module: ModuleType) -> None:
    data = bytes(random.Random(5).choice(b"ab\x00") for _ in range(700))
    sa = module.suffix_array(data).tolist()
    assert sorted(sa) == list(range(len(data)))
    assert all(data[a:] < data[b:] for a, b in itertools.pairwise(sa))


@pytest.mark.parametrize("module", KERNELS)
def test_kernels_reject_bad_arguments(module: ModuleType) -> None:
    old, new = b"abcdef", b"abcxyz"
    with pytest.raises(ValueError):
        module.find_matches(old, new, np.array([0, 1, 2], dtype=np.int32))
    with pytest.raises(ValueError):
        module.find_matches(old, new, np.array([0, 1, 2, 3, 4, 99], dtype=np.int32))
    with pytest.raises(ValueError):
        module.find_matches(old, new, module.suffix_array(old), 8, 0)
    with pytest.raises(ValueError):
        module.observe(old, new, np.array([[0, 3, 9]]), (0, 0, 0, ([], []), ([], [])))
    with pytest.raises(ValueError):
        module.predict(old, 0, 6, 6, 0, (4, 1 << 32, 0, ([], []), ([], [])))  # bad base
    with pytest.raises(ValueError):
        module.predict(b"ab", 0, 6, 6, 0, (0, 0, 0, ([], []), ([], [])))  # src too short
    with pytest.raises(ValueError):
        module.predict(old, 0, 6, 6, 0, (3, 0, 0, ([], []), ([], [])))  # x86 + thumb
    with pytest.raises(ValueError):
        module.add_bytes(b"ab", b"a")


@pytest.mark.parametrize("module", KERNELS)
def test_thumb_prediction_removes_relocation_noise(module: ModuleType) -> None:
    """Code moved by 0x100 whose calls go to unmoved functions: after the maker's maps the
    difference stream is all zeros, without them it is not."""
    rng = random.Random(3)
    old = bytearray(rng.randrange(0x80) for _ in range(4000))  # no halfword looks like a BL
    callee_area = 400  # calls target offsets below this; everything from 1000 on moves
    for at in range(1000, 4000, 4):
        struct.pack_into("<HH", old, at, *_encode_bl(rng.randrange(0, callee_area, 2) - at - 4))
    inserted = bytes(0x100)
    new = bytearray(old[:1000] + inserted + old[1000:])
    for at in range(1000, 4000, 4):
        off = struct.unpack_from("<HH", old, at)
        target = at + 4 + _decode_bl(*off)
        moved = at + 0x100
        struct.pack_into("<HH", new, moved, *_encode_bl(target - moved - 4))
    spans = np.array([[1000 + 0x100, 1000, 3000]], dtype=np.int64)
    empty = (np.empty(0, np.int64), np.empty(0, np.int64))
    observed = module.observe(bytes(old), bytes(new), spans, (1, 0, 0, empty, empty))
    branch_map = delta_relocation.fit_map(observed[0], observed[1], cap=64, zero_default=False)
    filtered = module.diff_spans(bytes(old), bytes(new), spans, (1, 0, 0, branch_map, empty))
    plain = module.diff_spans(bytes(old), bytes(new), spans, (0, 0, 0, empty, empty))
    assert filtered == bytes(3000)
    assert plain.count(0) < 2900


def _decode_bl(h1: int, h2: int) -> int:
    s = (h1 >> 10) & 1
    i1, i2 = 1 ^ (((h2 >> 13) & 1) ^ s), 1 ^ (((h2 >> 11) & 1) ^ s)
    off = (i1 << 23) | (i2 << 22) | ((h1 & 0x3FF) << 12) | ((h2 & 0x7FF) << 1)
    return off - (1 << 24) if s else off


def test_fit_map_follows_runs_and_respects_cap() -> None:
    keys = np.array([10, 11, 12, 50, 51, 52, 53, 90, 91], dtype=np.int64)
    deltas = np.array([5, 5, 5, 9, 9, 7, 9, 5, 5], dtype=np.int64)
    got = delta_relocation.fit_map(keys, deltas, cap=10, zero_default=False)
    assert got[0].tolist() == [10, 50, 90] and got[1].tolist() == [5, 9, 5]
    capped = delta_relocation.fit_map(keys, deltas, cap=1, zero_default=False)
    assert len(capped[0]) <= 1
    zeros = delta_relocation.fit_map(keys, np.zeros(9, np.int64), cap=10, zero_default=True)
    assert zeros[0].tolist() == []


# --- round trips -------------------------------------------------------------------------


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(pair=image_pairs(), filters=st.sampled_from([None, *FILTER_SETS]))
def test_round_trip_is_exact(
    kernel: ModuleType, pair: tuple[bytes, bytes], filters: int | None
) -> None:
    old, new = pair
    patch = delta.make_patch(old, new, filters=filters, block_limit=1024)
    assert delta.apply_patch(old, patch) == new
    header = delta.read_header(patch)
    assert header.target_sha256 == hashlib.sha256(new).digest()[: delta.V2_DIGEST_SIZE]
    assert (header.base_size, header.target_size) == (len(old), len(new))


def _make_with(kernel: ModuleType, old: bytes, new: bytes, filters: int | None) -> bytes:
    original = delta._kernel
    try:
        delta._kernel = kernel
        return delta.make_patch(old, new, filters=filters)
    finally:
        delta._kernel = original


@needs_native
@settings(max_examples=40, deadline=None)
@given(pair=image_pairs(2000), filters=st.sampled_from([None, *FILTER_SETS]))
def test_native_and_twin_make_identical_patches(
    pair: tuple[bytes, bytes], filters: int | None
) -> None:
    assert NATIVE is not None
    old, new = pair
    assert _make_with(NATIVE, old, new, filters) == _make_with(TWIN, old, new, filters)


def relinked_firmware(seed: int, functions: int = 120) -> tuple[bytes, bytes]:
    """A Thumb-2 image (functions calling each other, a table of function pointers, a RAM
    pointer pool) and its relink after a function was inserted at the front."""
    rng = random.Random(seed)
    bodies = [rng.randrange(20, 60) * 2 for _ in range(functions)]
    callees = [[rng.randrange(functions) for _ in range(3)] for _ in range(functions)]
    filler = [rng.randrange(0x4000) for _ in range(64)]  # 16-bit instructions, never BL
    globals_ = [0x20000000 + 8 * i for i in range(32)]

    def link(inserted: int, ram_shift: int) -> bytes:
        base = 0x08000000
        starts, at = [], 0x100 + inserted
        for size in bodies:
            starts.append(at)
            at += size
        at = (at + 3) & ~3  # tables are word-aligned
        image = bytearray(at + 4 * functions + 4 * len(globals_))
        for f, (start, size) in enumerate(zip(starts, bodies, strict=True)):
            local = random.Random(f)
            for pos in range(start, start + size, 2):
                struct.pack_into("<H", image, pos, local.choice(filler))
            for k, callee in enumerate(callees[f]):
                pos = start + 8 + 8 * k
                struct.pack_into("<HH", image, pos, *_encode_bl(starts[callee] - pos - 4))
        table = at
        for f, start in enumerate(starts):
            struct.pack_into("<I", image, table + 4 * f, base + start + 1)
        for g, address in enumerate(globals_):
            struct.pack_into("<I", image, table + 4 * functions + 4 * g, address + ram_shift)
        return bytes(image)

    return link(0, 0), link(0x40, 8)


@pytest.mark.parametrize("module", KERNELS)
def test_relinked_firmware_costs_almost_nothing(module: ModuleType) -> None:
    """Every call, function pointer and RAM pointer moved: the model predicts them all."""
    old, new = relinked_firmware(1)
    patch = _make_with(module, old, new, None)
    assert delta.apply_patch(old, patch) == new
    plain = _make_with(module, old, new, 0)
    assert len(patch) < 150 and 2 * len(patch) < len(plain)


def test_family_and_base_detection() -> None:
    old, new = relinked_firmware(2)
    assert delta_family.detect_family(old) == delta.FILTER_THUMB
    assert delta_family.detect_family(random.Random(3).randbytes(50_000)) == 0
    # Code calls its functions from many places: CALLs to 60 entries, not to random spots.
    x86 = bytearray(random.Random(4).randbytes(20_000))
    entries = random.Random(5).sample(range(19_000), 60)
    for at in range(0, 19_000, 40):
        x86[at] = 0xE8
        struct.pack_into("<i", x86, at + 1, random.Random(at).choice(entries) - at - 5)
    assert delta_family.detect_family(bytes(x86)) == delta.FILTER_X86
    spans = np.array([[0x140, 0x100, len(old) - 0x100]], dtype=np.int64)
    planner = delta_planner.Planner(old, new, spans, 1 << 16)
    assert planner.base(x86=False) == 0x08000000


def test_patch_of_identical_images_is_small() -> None:
    old = random.Random(1).randbytes(200_000)
    patch = delta.make_patch(old, old)
    assert len(patch) < delta.HEADER_SIZE + 64
    assert delta.apply_patch(old, patch) == old


def test_adversarial_repetition_terminates_and_round_trips() -> None:
    """Old and new made of long runs that match everywhere slightly differently."""
    old = (b"\x00" * 997 + b"\x01") * 120
    new = (b"\x00" * 1003 + b"\x01") * 110 + b"\x00" * 4000
    assert delta.apply_patch(old, delta.make_patch(old, new)) == new


def test_maker_rejects_bad_options() -> None:
    with pytest.raises(delta.PatchInputError):
        delta.make_patch(b"a", b"b", window_log=25)
    with pytest.raises(delta.PatchInputError):
        delta.make_patch(b"a", b"b", block_limit=10)
    with pytest.raises(delta.PatchInputError):
        delta.make_patch(b"a", b"b", filters=3)


# --- damaged patches ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> tuple[bytes, bytes, bytes]:
    rng = random.Random(9)
    old = bytes(thumb_image(rng, 30_000))
    new = old[:5000] + rng.randbytes(700) + old[5000:20000] + old[21000:]
    return old, new, delta.make_patch(old, new, block_limit=4096)


def test_every_truncation_is_a_format_error(sample: tuple[bytes, bytes, bytes]) -> None:
    old, _, patch = sample
    for cut in range(len(patch)):
        with pytest.raises(PatchFormatError):
            delta.apply_patch(old, patch[:cut])


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_random_damage_is_an_error_or_the_exact_target(
    sample: tuple[bytes, bytes, bytes], data: st.DataObject
) -> None:
    old, new, patch = sample
    damaged = bytearray(patch)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(damaged) - 1))
        damaged[at] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(damaged)))
        damaged[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        result = delta.apply_patch(old, bytes(damaged))
    except PatchFormatError:
        return
    assert result == new


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_a_format_error(garbage: bytes) -> None:
    with pytest.raises(PatchFormatError):
        delta.apply_patch(b"old", garbage)
    with pytest.raises(PatchFormatError):
        delta.apply_patch(b"old", delta.MAGIC + garbage)


def test_wrong_base_is_reported(sample: tuple[bytes, bytes, bytes]) -> None:
    old, _, patch = sample
    with pytest.raises(PatchBaseMismatchError, match="different base"):
        delta.apply_patch(bytes([old[0] ^ 1]) + old[1:], patch)
    with pytest.raises(PatchBaseMismatchError, match="base image"):
        delta.apply_patch(old[:-1], patch)


def test_header_checks(sample: tuple[bytes, bytes, bytes]) -> None:
    old, _, patch = sample
    with pytest.raises(delta.PatchVersionError, match="magic"):
        delta.apply_patch(old, b"BSDIFF40" + patch[8:])
    header = delta.read_header(patch)
    newer = PatchHeader(**{**header.__dict__, "version": 6}).pack() + patch[header.size :]
    with pytest.raises(delta.PatchVersionError, match="version 6"):
        delta.apply_patch(old, newer)
    flipped = bytearray(patch)
    flipped[header.size - 10] ^= 1
    with pytest.raises(delta.PatchCorruptError, match="CRC"):
        delta.apply_patch(old, bytes(flipped))
    with pytest.raises(delta.PatchCorruptError, match="after its payload"):
        delta.read_header(patch + b"x")


def craft(old: bytes, new: bytes, records: list[bytes], **fields: int) -> bytes:
    """A patch with a valid header (and CRC) around hand-written payload records."""
    payload = bytearray()
    for record in records:
        put_varint(payload, len(record))
        payload += record
    frame = zstandard.ZstdCompressor(level=3).compress(bytes(payload))
    values = {
        "version": 1,
        "window_log": 17,
        "base_size": len(old),
        "target_size": len(new),
        "block_limit": 4096,
        "payload_size": len(frame),
        "base_sha256": hashlib.sha256(old).digest(),
        "target_sha256": hashlib.sha256(new).digest(),
    }
    values.update(fields)
    return PatchHeader(**values).pack() + frame  # type: ignore[arg-type]


def block(entries: list[tuple[int, int, int]], tail: bytes) -> bytes:
    out = bytearray()
    put_varint(out, len(entries))
    for seek, copy, extra in entries:
        put_varint(out, zigzag(seek))
        put_varint(out, copy)
        put_varint(out, extra)
    return bytes(out) + tail


OLD, NEW = b"0123456789", b"01234xyz"
PRELUDE = b"\x00"


def test_crafted_valid_patch_applies() -> None:
    patch = craft(OLD, NEW, [PRELUDE, block([(0, 5, 3)], bytes(5) + b"xyz"), b""])
    assert delta.apply_patch(OLD, patch) == NEW


@pytest.mark.parametrize(
    ("records", "fields", "message"),
    [
        ([PRELUDE, block([(-1, 5, 3)], bytes(5) + b"xyz"), b""], {}, "outside"),
        ([PRELUDE, block([(8, 5, 3)], bytes(5) + b"xyz"), b""], {}, "outside"),
        ([PRELUDE, block([(0, 5, 4)], bytes(5) + b"xyzw"), b""], {}, "past the"),
        ([PRELUDE, block([(0, 5, 3)], bytes(5) + b"xy"), b""], {}, "add up"),
        ([PRELUDE, block([(0, 5, 3)], bytes(5) + b"xyz")], {}, "end record"),
        ([PRELUDE, block([(0, 5, 3)], bytes(5) + b"xyz"), b"", b"\x01"], {}, "after its end"),
        ([b"\x03", b""], {}, "filter set"),
        ([b"\x01\x00\x02\x05\x00\x00\x00\x00", b""], {}, "not increasing"),
        ([b"\x01\x00\xff\xff\x03", b""], {}, "entries"),
        ([b"\x04\x80\x80\x80\x80\x10\x00\x00", b""], {}, "load address"),
        ([b"\x04\x00\x01\x00", b""], {}, "ends inside the relocation map"),
        ([b"\x00\x00", b""], {}, "trailing"),
        ([PRELUDE, block([(0, 5, 3)], bytes(5) + b"xyz"), b""], {"block_limit": 100000}, "allows"),
        ([PRELUDE, block([(0, 5, 3)], bytes(5) + b"xyz"), b""], {"window_log": 19}, "window"),
        ([PRELUDE, block([(0, 5, 0)], bytes(5)), b""], {}, "produced 5 bytes"),
        ([PRELUDE, block([(0, 5, 3)], bytes(5) + b"xyw"), b""], {}, "SHA-256"),
        ([PRELUDE, block([(0, 5, 3)], bytes(5) + b"xyz"), b""], {"target_size": 9}, "produced 8"),
        ([PRELUDE, b"\x00"], {}, "claims 0 entries"),
        ([PRELUDE, bytes(300)], {"block_limit": 256}, "exceeds its block limit"),
    ],
)
def test_crafted_corruption_is_a_clear_error(
    records: list[bytes], fields: dict[str, int], message: str
) -> None:
    patch = craft(OLD, NEW, records, **fields)
    applier = delta_stream.PatchApplier(OLD, bytearray().extend)
    with pytest.raises(PatchFormatError, match=message):
        applier.feed(patch)
        applier.finish()


def test_frame_needing_a_bigger_window_than_declared_is_refused() -> None:
    big = random.Random(4).randbytes(300_000) * 2
    payload = bytearray()
    put_varint(payload, 1)
    payload += b"\x00"
    params = zstandard.ZstdCompressionParameters.from_level(19, window_log=20)
    frame = zstandard.ZstdCompressor(compression_params=params).compress(bytes(payload) + big)
    header = PatchHeader(1, 17, 0, 0, 4096, len(frame), hashlib.sha256(b"").digest(), bytes(32))
    with pytest.raises(PatchFormatError):
        delta.apply_patch(b"", header.pack() + frame)


# --- the CLI -----------------------------------------------------------------------------


def test_cli_make_apply_info(tmp_path: Path, sample: tuple[bytes, bytes, bytes]) -> None:
    old, new, _ = sample
    (tmp_path / "old.bin").write_bytes(old)
    (tmp_path / "new.bin").write_bytes(new)
    runner = CliRunner()
    made = runner.invoke(app, ["make", *(str(tmp_path / n) for n in ("old.bin", "new.bin", "p"))])
    assert made.exit_code == 0, made.output
    applied = runner.invoke(app, ["apply", *(str(tmp_path / n) for n in ("old.bin", "p", "out"))])
    assert applied.exit_code == 0, applied.output
    assert (tmp_path / "out").read_bytes() == new
    shown = runner.invoke(app, ["info", str(tmp_path / "p")])
    assert shown.exit_code == 0 and f"target: {len(new)} bytes" in shown.output


def _one_line_failure(result: Any, needle: str) -> None:
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
    assert "Traceback" not in result.output


def test_cli_failures_are_one_line(tmp_path: Path, sample: tuple[bytes, bytes, bytes]) -> None:
    old, new, patch = sample
    (tmp_path / "old.bin").write_bytes(old)
    (tmp_path / "other.bin").write_bytes(new)
    (tmp_path / "p").write_bytes(patch)
    (tmp_path / "cut").write_bytes(patch[:-10])
    runner = CliRunner()
    path = str(tmp_path)
    _one_line_failure(
        runner.invoke(app, ["apply", f"{path}/other.bin", f"{path}/p", f"{path}/out"]), "base"
    )
    _one_line_failure(
        runner.invoke(app, ["apply", f"{path}/old.bin", f"{path}/cut", f"{path}/out"]), "truncated"
    )
    _one_line_failure(
        runner.invoke(app, ["apply", f"{path}/missing", f"{path}/p", f"{path}/out"]), "missing"
    )
    _one_line_failure(
        runner.invoke(app, ["make", f"{path}/missing", f"{path}/p", f"{path}/q"]), "cannot read"
    )
    _one_line_failure(
        runner.invoke(app, ["make", f"{path}/old.bin", f"{path}/p", f"{path}/nodir/q"]),
        "cannot write",
    )
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_header_crc_covers_every_field(sample: tuple[bytes, bytes, bytes]) -> None:
    _, _, patch = sample
    size = delta.read_header(patch).size
    body = patch[: size - 4]
    assert struct.unpack("<I", patch[size - 4 : size])[0] == zlib.crc32(body)


@needs_native
def test_twin_has_the_native_api() -> None:
    def public(module: ModuleType) -> set[str]:
        return {
            name
            for name in dir(module)
            if not name.startswith("_")
            and (callable(getattr(module, name)) or name.isupper())
            and getattr(getattr(module, name), "__module__", module.__name__) == module.__name__
        }

    assert public(TWIN) == public(NATIVE)  # type: ignore[arg-type]
