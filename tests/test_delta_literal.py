"""Branch conversion of a patch's literal bytes (otacore.delta_literal, format version 3).

The transforms against liblzma's own ARM-Thumb filter and against a plain sequential
reference of xz's scan loops, exact inverses on any bytes; patches that use them made and
applied whole and streamed; version 2 patches unchanged; malformed prelude bits refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import lzma
import random
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacore import delta, delta_codec, delta_forms, delta_literal, delta_maker, delta_planner
from otacore.delta import (
    CODEC_LZMA2,
    CODEC_ZSTD,
    LITERAL_SHIFT,
    PatchCorruptError,
    PatchFeatureError,
    PatchVersionError,
    read_varint,
)
from otacore.delta_literal import RISCV, THUMB, LiteralConversionError
from otacore.delta_stream import PatchApplier, decode_payload, python_memory_bound
from otacore.errors import DeltaError
from tests.test_delta_stream import peak_during_apply

V2 = Path(__file__).parent / "data" / "delta-v2-thumb-calls"
KINDS = (THUMB, RISCV)


# --- instruction encoders (the architecture manuals' layouts) -------------------------------


def thumb_bl(at: int, target: int, link: bool = True) -> bytes:
    """BL, or B.W without ``link``, at ``at`` to ``target`` (ARMv7-M ARM A7.7.18, A7.7.12)."""
    offset = target - (at + 4)
    assert offset % 2 == 0 and -(1 << 24) <= offset < 1 << 24
    s, i1, i2 = (offset >> 24) & 1, (offset >> 23) & 1, (offset >> 22) & 1
    j1, j2 = (1 ^ i1) ^ s, (1 ^ i2) ^ s  # I1 = NOT(J1 XOR S)
    first = 0xF000 | s << 10 | (offset >> 12) & 0x3FF
    second = (0xD000 if link else 0x9000) | j1 << 13 | j2 << 11 | (offset >> 1) & 0x7FF
    return first.to_bytes(2, "little") + second.to_bytes(2, "little")


def rv_jal(at: int, target: int, rd: int = 1) -> bytes:
    """JAL rd, target (RISC-V unprivileged ISA, J-type: imm[20|10:1|11|19:12])."""
    imm = (target - at) & 0x1FFFFF
    word = (
        (imm >> 20 & 1) << 31 | (imm >> 1 & 0x3FF) << 21 | (imm >> 11 & 1) << 20
        | (imm >> 12 & 0xFF) << 12 | rd << 7 | 0x6F
    )
    return word.to_bytes(4, "little")


def rv_call(at: int, target: int, reg: int = 6) -> bytes:
    """AUIPC reg, hi20; JALR ra, lo12(reg): the psABI's ``call`` of any target."""
    relative = (target - at) & 0xFFFFFFFF
    auipc = ((relative + 0x800) & 0xFFFFF000) | reg << 7 | 0x17
    jalr = (relative & 0xFFF) << 20 | reg << 15 | 1 << 7 | 0x67
    return auipc.to_bytes(4, "little") + jalr.to_bytes(4, "little")


def code_pair(kind: int, seed: int, functions: int = 400, added: int = 80) -> tuple[bytes, bytes]:
    """An old image of ``functions`` functions and a release with ``added`` new ones in the
    middle (new code: literal bytes), every function calling others with Zipf popularity."""
    rng = random.Random(seed)
    print(f"code_pair seed {seed}")
    if kind == THUMB:  # halfword vocabulary, none a BL/B.W prefix (0xF000-0xF7FF)
        vocab = [(rng.randrange(0xF000) & ~1).to_bytes(2, "little") for _ in range(300)]
    else:  # 32-bit ADDI/OP/LOAD/STORE/BRANCH words and a few 16-bit compressed ones
        vocab = [
            ((rng.getrandbits(25) << 7) | rng.choice((0x13, 0x33, 0x03, 0x23, 0x63))).to_bytes(
                4, "little"
            )
            for _ in range(300)
        ] + [(rng.getrandbits(14) << 2 | 1).to_bytes(2, "little") for _ in range(40)]
    total = functions + added
    popularity = list(itertools.accumulate(1 / (rank + 1) for rank in range(total)))
    plans: list[list[tuple[str, int, bytes]]] = []  # (shape, callee, word)
    for _ in range(total):
        plan: list[tuple[str, int, bytes]] = []
        for _ in range(rng.randrange(10, 80)):
            if rng.random() < 0.2:
                callee = rng.choices(range(total), cum_weights=popularity)[0]
                shape = "bl" if kind == THUMB else rng.choice(("jal", "jal", "call"))
                plan.append((shape, callee, b""))
            else:
                plan.append(("word", -1, rng.choice(vocab)))
        plans.append(plan)
    sizes = {"bl": 4, "jal": 4, "call": 8}
    encoders = {"bl": thumb_bl, "jal": rv_jal, "call": rv_call}

    def image(order: list[int]) -> bytes:
        starts, at = {}, 0
        for ident in order:
            starts[ident] = at
            at += sum(sizes.get(op, len(word)) for op, _, word in plans[ident])
            at += at % 4  # functions start 4-aligned
        out = bytearray()
        for ident in order:
            for op, callee, word in plans[ident]:
                out += encoders[op](len(out), starts.get(callee, 0)) if op != "word" else word
            out += bytes(len(out) % 4)
        return bytes(out)

    old_order = list(range(functions))
    new_order = old_order[: functions // 3] + list(range(functions, total))
    new_order += old_order[functions // 3 :]
    return image(old_order), image(new_order)


# --- a plain sequential reference of the scan loops (xz armthumb.c / riscv.c style) ----------


def reference(data: bytes, offset: int, kind: int, encode: bool) -> bytes:
    """The transform as one left-to-right loop that converts as it goes, like xz's filters."""
    buf = bytearray(data)
    size, at = len(buf), offset & 1
    while at + 4 <= size:
        if kind == THUMB and buf[at + 1] & 0xF8 == 0xF0 and buf[at + 3] & 0xB8 == 0xB8:
            value = (buf[at + 1] & 7) << 19 | buf[at] << 11 | (buf[at + 3] & 7) << 8 | buf[at + 2]
            half_pc = (offset + at + 4) >> 1
            value = (value + half_pc if encode else value - half_pc) & 0x3FFFFF
            buf[at : at + 4] = bytes(
                (value >> 11 & 0xFF, 0xF0 | value >> 19, value & 0xFF,
                 buf[at + 3] & 0xF8 | value >> 8 & 7)
            )
            at += 4
        elif kind == RISCV and buf[at] == 0xEF and buf[at + 1] & 0x0D == 0:
            pc = offset + at
            b1, b2, b3 = buf[at + 1], buf[at + 2], buf[at + 3]
            if encode:
                addr = ((b1 & 0xF0) << 8 | (b2 & 0x0F) << 16 | (b2 & 0x10) << 7
                        | (b2 & 0xE0) >> 4 | (b3 & 0x7F) << 4 | (b3 & 0x80) << 13) + pc
                buf[at + 1 : at + 4] = bytes(
                    ((b1 & 0x0F) | (addr >> 13 & 0xF0), addr >> 9 & 0xFF, addr >> 1 & 0xFF)
                )
            else:
                addr = ((b1 & 0xF0) << 13 | b2 << 9 | b3 << 1) - pc
                buf[at + 1 : at + 4] = bytes((
                    (b1 & 0x0F) | (addr >> 8 & 0xF0),
                    (addr >> 16 & 0x0F) | (addr >> 7 & 0x10) | (addr << 4 & 0xE0),
                    (addr >> 4 & 0x7F) | (addr >> 13 & 0x80),
                ))
            at += 4
        elif kind == RISCV and buf[at] & 0x7F == 0x17:
            inst = int.from_bytes(buf[at : at + 4], "little")
            rd = inst >> 7 & 0x1F
            if rd == 0 or at + 8 > size:
                at += 2
                continue
            inst2 = int.from_bytes(buf[at + 4 : at + 8], "little")
            if inst2 & 3 != 3 or inst2 >> 15 & 0x1F != rd:
                at += 6
                continue
            pc = offset + at
            if encode:
                low = inst2 >> 20
                value = ((inst & 0xFFFFF000) + low - ((low & 0x800) << 1) + pc) & 0xFFFFFFFF
                inst = inst & 0xFFF | value & 0xFFFFF000
                inst2 = inst2 & 0xFFFFF | (value & 0xFFF) << 20
            else:
                relative = ((inst & 0xFFFFF000 | inst2 >> 20) - pc) & 0xFFFFFFFF
                inst = inst & 0xFFF | (relative + 0x800) & 0xFFFFF000
                inst2 = inst2 & 0xFFFFF | (relative & 0xFFF) << 20
            buf[at : at + 8] = inst.to_bytes(4, "little") + inst2.to_bytes(4, "little")
            at += 8
        else:
            at += 2
    return bytes(buf)


#: Byte alphabets that make every rule fire often (and collide), plus all bytes.
ALPHABETS = (
    bytes(range(256)),
    b"\xf0\xf7\xf8\xff\xb8\xbf\xd0\x00",
    b"\xef\x6f\x17\x97\x00\x03\x08\x0d\xf3\x33",
    b"\x00\xff",
)
OFFSETS = st.one_of(
    st.integers(0, 64),
    st.integers(0, (1 << 32) - 1),
    st.integers((1 << 32) - 16, (1 << 32) - 1),
)


@st.composite
def patterned(draw: st.DrawFn, max_size: int = 600) -> bytes:
    alphabet = draw(st.sampled_from(ALPHABETS))
    size = draw(st.one_of(st.integers(0, 7), st.integers(0, max_size)))
    return bytes(draw(st.lists(st.sampled_from(alphabet), min_size=size, max_size=size)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterned(), OFFSETS, st.sampled_from(KINDS))
def test_round_trip_and_reference(data: bytes, offset: int, kind: int) -> None:
    """restore(convert(x)) == x on any bytes, and both equal the sequential reference."""
    converted = delta_literal.convert(data, offset, kind)
    assert converted == reference(data, offset, kind, True)
    assert delta_literal.restore(converted, offset, kind) == data
    assert delta_literal.restore(data, offset, kind) == reference(data, offset, kind, False)
    assert len(converted) == len(data)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(KINDS), st.integers(0, 2**31))
def test_windows_join_like_one_pass(offset: int, kind: int, seed: int) -> None:
    """Buffers of several WINDOWs: the windowed scan equals one sequential pass, and a
    sub-range converts alone without touching the bytes around it."""
    rng = random.Random(seed)
    print(f"seed {seed}")
    alphabet = ALPHABETS[1] if kind == THUMB else ALPHABETS[2]
    data = bytes(rng.choice(alphabet) for _ in range(3 * delta_literal.WINDOW + rng.randrange(9)))
    assert delta_literal.convert(data, offset, kind) == reference(data, offset, kind, True)
    buf = bytearray(data)
    start, end = rng.randrange(50), len(data) - rng.randrange(50)
    delta_literal.convert_into(buf, offset, kind, start, end)
    assert buf[:start] == data[:start] and buf[end:] == data[end:]
    assert bytes(buf[start:end]) == delta_literal.convert(data[start:end], offset, kind)
    delta_literal.restore_into(buf, offset, kind, start, end)
    assert bytes(buf) == data


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(KINDS), st.integers(0, 2**31))
def test_the_plain_scan_restores_long_runs_like_the_windowed_one(
    offset: int, kind: int, seed: int
) -> None:
    """The streaming applier restores every run candidate by candidate (``plain``, no numpy
    temporaries): on runs of several WINDOWs it gives what the numpy windows and the
    sequential reference give, and undoes the maker's conversion."""
    rng = random.Random(seed)
    print(f"seed {seed}")
    alphabet = ALPHABETS[1] if kind == THUMB else ALPHABETS[2]
    data = bytes(rng.choice(alphabet) for _ in range(3 * delta_literal.WINDOW + rng.randrange(9)))
    plain, windowed = bytearray(data), bytearray(data)
    delta_literal.restore_into(plain, offset, kind, plain=True)
    delta_literal.restore_into(windowed, offset, kind)
    assert plain == windowed == reference(data, offset, kind, False)
    converted = bytearray(delta_literal.convert(data, offset, kind))
    delta_literal.restore_into(converted, offset, kind, plain=True)
    assert bytes(converted) == data


def _liblzma_armthumb(data: bytes, offset: int) -> bytes:
    """liblzma's ARM-Thumb BCJ output: encode through [ARMTHUMB, LZMA2], decode LZMA2 only."""
    chain = [{"id": lzma.FILTER_ARMTHUMB, "start_offset": offset}, {"id": lzma.FILTER_LZMA2}]
    packed = lzma.compress(data, format=lzma.FORMAT_RAW, filters=chain)
    return lzma.decompress(packed, format=lzma.FORMAT_RAW, filters=chain[1:])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(b"\xf0\xf3\xf7\xf8\xfc\xff\x00\x12\xd0\xe8"), max_size=400),
    st.integers(0, 2**31 - 1),
)
def test_thumb_is_xz_armthumb_without_bw(values: list[int], half_offset: int) -> None:
    """Without B.W patterns (no 0xB8-0xBF bytes) the Thumb rule is liblzma's armthumb.c,
    for any even start offset."""
    data, offset = bytes(values), 2 * half_offset
    assert delta_literal.convert(data, offset, THUMB) == _liblzma_armthumb(data, offset)


def test_known_vectors() -> None:
    """Calls from anywhere to one function become the same bytes, and come back."""
    target = 0x12340
    thumb = [thumb_bl(at, target) for at in (0x100, 0x2000, 0x40000)]
    converted = {delta_literal.convert(code, at, THUMB) for code, at in
                 zip(thumb, (0x100, 0x2000, 0x40000), strict=True)}
    # value = target / 2 (22 bits): F000 | hi, F800 | lo
    assert converted == {bytes((0x12, 0xF0, 0xA0, 0xF9))}
    tail = thumb_bl(0x300, target, link=False)
    assert delta_literal.convert(tail, 0x300, THUMB)[:3] == bytes((0x12, 0xF0, 0xA0))
    assert delta_literal.convert(tail, 0x300, THUMB)[3] & 0xF8 == 0xB8  # still a B.W
    for make, size in ((rv_jal, 4), (rv_call, 8)):
        sites = (0x1000, 0x1F000, 0x80002)
        codes = [make(at, 0x40000) for at in sites]
        same = {
            delta_literal.convert(code, at, RISCV) for code, at in zip(codes, sites, strict=True)
        }
        assert len(same) == 1 and len(next(iter(same))) == size
        for code, at in zip(codes, sites, strict=True):
            assert delta_literal.restore(next(iter(same)), at, RISCV) == code
    # by hand from xz riscv.c: JAL ra -> EF, 0 | target bits 20-17 << 4, bits 16-9, bits 8-1
    assert delta_literal.convert(rv_jal(0x1000, 0x40000), 0x1000, RISCV) == b"\xef\x20\x00\x00"
    # AUIPC t1 + JALR ra, lo(t1): opcode and registers kept, target 0x40000 in the immediates
    assert delta_literal.convert(rv_call(0x1000, 0x40000), 0x1000, RISCV) == bytes.fromhex(
        "17030400" "e7000300"
    )
    # JAL x0 (a jump within a function) and AUIPC x0 (LPAD) stay as they are (xz riscv.c)
    for code in (rv_jal(0, 0x800, rd=0), rv_call(0, 0x12345, reg=0)):
        assert delta_literal.convert(code, 0, RISCV) == code
    # an AUIPC whose next instruction uses another register is no pair
    lone = rv_call(0, 0x12345, reg=6)[:4] + rv_call(0, 0x12345, reg=7)[4:]
    assert delta_literal.convert(lone, 0, RISCV) == lone
    # an odd entry offset converts the instructions at even target offsets
    data = b"\x00" + thumb_bl(0x102, target)
    assert delta_literal.convert(data, 0x101, THUMB) == data[:1] + bytes((0x12, 0xF0, 0xA0, 0xF9))


def test_bad_kind_and_range() -> None:
    with pytest.raises(LiteralConversionError, match="3 is not known"):
        delta_literal.convert(b"\xef\x00\x00\x00", 0, 3)
    with pytest.raises(LiteralConversionError, match="outside"):
        delta_literal.convert_into(bytearray(8), 0, THUMB, 4, 9)
    assert delta_literal.convert(b"\x00\xf0\x00\xf8", 0, delta_literal.NONE) == b"\x00\xf0\x00\xf8"


# --- patches that use it --------------------------------------------------------------------


def _apply_in_pieces(old: bytes, patch: bytes, sizes: list[int]) -> bytes:
    out = bytearray()
    applier = PatchApplier(old, out.extend)
    at = index = 0
    while at < len(patch):
        size = sizes[index % len(sizes)]
        applier.feed(patch[at : at + size])
        at, index = at + size, index + 1
    applier.finish()
    return bytes(out)


def _prelude_field(patch: bytes, old: bytes) -> int:
    _, payload = decode_payload(patch, old=old)
    at = 0
    while payload[at] & 0x80:
        at += 1
    return payload[at + 1]


def _without_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    """The maker without version 3 features: no literal conversion, no exact copies (the
    tests here force a conversion on version 2 records)."""
    monkeypatch.setattr(delta_maker, "LITERAL_KINDS", dict.fromkeys(delta_maker.LITERAL_KINDS, ()))
    monkeypatch.setattr(delta_planner, "EXACT_RUN_MIN", 1 << 40)
    monkeypatch.setattr(delta_forms, "EXACT_RUN_DENSE", 1 << 40)


@pytest.fixture(scope="module")
def pairs() -> dict[int, tuple[bytes, bytes]]:
    return {kind: code_pair(kind, seed) for kind, seed in ((THUMB, 31), (RISCV, 32))}


@pytest.mark.parametrize("kind", KINDS)
def test_maker_converts_new_code_and_it_applies(
    pairs: dict[int, tuple[bytes, bytes]], kind: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New code full of calls: the maker converts its literals (version 3), the patch is
    smaller than without, and applies whole and in any pieces."""
    old, new = pairs[kind]
    patch = delta.make_patch(old, new, format_version=3)
    header = delta.read_header(patch)
    assert header.version == 3
    assert _prelude_field(patch, old) >> LITERAL_SHIFT & 3 == kind
    newest = delta.make_patch(old, new)  # version 4 or 5: the same conversion, columns
    assert delta.read_header(newest).version in (4, 5)
    assert _prelude_field(newest, old) >> LITERAL_SHIFT & 3 == kind
    assert _apply_in_pieces(old, newest, [1, 4096]) == new
    assert delta.apply_patch(old, patch) == new
    assert _apply_in_pieces(old, patch, [1]) == new
    assert _apply_in_pieces(old, patch, [7, 4096, 3, 65536]) == new
    _without_conversion(monkeypatch)
    plain = delta.make_patch(old, new, format_version=3)
    assert delta.read_header(plain).version == 2
    print(f"{delta_literal.KIND_NAMES[kind]}: {len(patch)} B converted, {len(plain)} B not")
    assert len(patch) < len(plain)


def forced(old: bytes, new: bytes, kind: int, codec: int) -> bytes:
    """The maker's patch re-made with every entry's literal bytes converted by ``kind``
    (whatever the maker chose), with ``codec``."""
    patch = delta.make_patch(old, new, effort=1, format_version=3)
    header, payload = decode_payload(patch, old=old)
    if _prelude_field(patch, old) >> LITERAL_SHIFT:  # start from the unconverted payload
        raise AssertionError("expected a version 2 patch to force a transform on")
    out = bytearray(payload)
    length, at = read_varint(out, 0)
    out[at] |= kind << LITERAL_SHIFT  # the filter field: one byte
    at += length
    written = 0
    while True:
        size, at = read_varint(out, at)
        if size == 0:
            break
        end = at + size
        count, r = read_varint(out, at)
        entries = []
        for _ in range(count):
            _, r = read_varint(out, r)
            copy, r = read_varint(out, r)
            extra, r = read_varint(out, r)
            entries.append((copy, extra))
        extra_at = r + sum(copy for copy, _ in entries)
        for copy, extra in entries:
            written += copy
            delta_literal.convert_into(out, written, kind, extra_at, extra_at + extra)
            extra_at, written = extra_at + extra, written + extra
        at = end
    encoder = delta_codec.PatchEncoder(
        old, new, window_log=header.window_log, block_limit=header.block_limit
    )
    return encoder.encode(bytes(out), codec, props=delta.lzma_props_byte(3, 0, 2))




@pytest.mark.parametrize("codec", [CODEC_ZSTD, CODEC_LZMA2])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", KINDS)
def test_forced_transform_applies(
    pairs: dict[int, tuple[bytes, bytes]],
    monkeypatch: pytest.MonkeyPatch,
    arch: int,
    kind: int,
    codec: int,
) -> None:
    """Each transform forced on each kind of code (the wrong one too) applies, streamed
    byte-identically, with either codec."""
    old, new = pairs[arch]
    _without_conversion(monkeypatch)
    patch = forced(old, new, kind, codec)
    assert delta.read_header(patch).version == 3
    assert delta.apply_patch(old, patch) == new
    assert _apply_in_pieces(old, patch, [1, 2, 3, 5000]) == new


def test_v3_apply_memory_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ~1 MB target whose patch is almost all converted literal bytes streams within the
    documented Python-side bound (the conversion is in place in the record)."""
    old, new = code_pair(THUMB, 33, functions=2000, added=12000)
    _without_conversion(monkeypatch)
    patch = forced(old, new, THUMB, CODEC_ZSTD)
    assert len(new) > 900_000
    peak, written = peak_during_apply(old, patch, 1 << 16)
    assert written == len(new)
    assert peak < python_memory_bound(), peak


# --- version 2 unchanged, malformed bits refused ---------------------------------------------


def test_version_2_vector_applies_and_is_still_made() -> None:
    """A patch made by main before version 3 (tests/data/delta-v2-thumb-calls) applies, and
    with the version 3 features off today's maker makes it byte for byte; with them on, no
    larger one."""
    old, new = (V2 / "old.bin").read_bytes(), (V2 / "new.bin").read_bytes()
    patch = (V2 / "auto.otad").read_bytes()
    assert delta.read_header(patch).version == 2
    assert delta.apply_patch(old, patch) == new
    assert _apply_in_pieces(old, patch, [1]) == new
    with pytest.MonkeyPatch.context() as monkeypatch:
        _without_conversion(monkeypatch)
        assert delta.make_patch(old, new, format_version=3) == patch
    assert len(delta.make_patch(old, new, format_version=3)) <= len(patch)


def test_data_without_code_gets_no_conversion(pairs: dict[int, tuple[bytes, bytes]]) -> None:
    rng = random.Random(34)
    old = rng.randbytes(50_000)
    new = old[:20_000] + rng.randbytes(5000) + old[20_000:]
    patch = delta.make_patch(old, new)
    assert _prelude_field(patch, old) & delta.LITERAL_MASK == 0
    # (version 3 for its exact copies only: without them, version 2)
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(delta_planner, "EXACT_RUN_MIN", 1 << 40)
        patcher.setattr(delta_forms, "EXACT_RUN_DENSE", 1 << 40)
        assert delta.read_header(delta.make_patch(old, new, format_version=3)).version == 2


def _with_field(patch: bytes, old: bytes, field: int, version: int) -> bytes:
    """``patch`` re-framed (zstd) with prelude filter field ``field`` and ``version``."""
    header, payload = decode_payload(patch, old=old)
    out = bytearray(payload)
    assert out[0] < 0x80 and field < 0x80  # one-byte prelude length and field
    out[1] = field
    compressed = zstandard.ZstdCompressor().compress(bytes(out))
    fields = {**header.__dict__, "version": version, "codec": CODEC_ZSTD, "lzma_props": 0}
    fields["payload_size"] = len(compressed)
    return delta.PatchHeader(**fields).pack() + compressed


def test_malformed_literal_bits_are_refused(pairs: dict[int, tuple[bytes, bytes]]) -> None:
    old, new = pairs[THUMB]
    patch = delta.make_patch(old, new, format_version=3)
    field = _prelude_field(patch, old)
    copy_filters = field & delta.COPY_FILTER_MASK
    others = field & ~delta.LITERAL_MASK  # copy filters and exact copies, if the patch has them
    assert field >> LITERAL_SHIFT & 3 == THUMB
    # the same payload re-framed: version 3 applies, version 2 with the bits set does not
    assert delta.apply_patch(old, _with_field(patch, old, field, 3)) == new
    with pytest.raises(PatchCorruptError, match=r"version 2 patch's prelude .* is version 3's"):
        delta.apply_patch(old, _with_field(patch, old, field, 2))
    with pytest.raises(PatchCorruptError, match=r"version 3 patch's prelude .* is version 2's"):
        delta.apply_patch(old, _with_field(patch, old, copy_filters, 3))
    with pytest.raises(PatchFeatureError, match="transform 3") as caught:
        delta.apply_patch(old, _with_field(patch, old, others | 3 << 3, 3))
    assert isinstance(caught.value, PatchVersionError)
    with pytest.raises(PatchCorruptError, match="unknown filter set"):
        delta.apply_patch(old, _with_field(patch, old, field | delta.FILTER_X86, 3))
    # a transform that does not match the one used damages the output, which the hash catches
    with pytest.raises(delta.PatchTargetMismatchError):
        delta.apply_patch(old, _with_field(patch, old, others | RISCV << 3, 3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_version_3_patches_fail_only_with_delta_errors(
    pairs: dict[int, tuple[bytes, bytes]], data: st.DataObject
) -> None:
    """Damage to a version 3 patch's bytes or to its payload (re-compressed, so that the
    record parser and the restore see it) gives a DeltaError, never another exception."""
    old, new = pairs[RISCV]
    patch = _fuzz_base(old, new)
    header, payload = decode_payload(patch, old=old)
    in_patch = data.draw(st.booleans())
    damaged = bytearray(patch if in_patch else payload)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(damaged) - 1))
        damaged[at] = data.draw(st.integers(0, 255))
    if in_patch:
        candidate = bytes(damaged)
    else:
        compressed = zstandard.ZstdCompressor().compress(bytes(damaged))
        fields = {**header.__dict__, "payload_size": len(compressed)}
        candidate = delta.PatchHeader(**fields).pack() + compressed
    try:
        out = delta.apply_patch(old, candidate)
    except DeltaError:
        return
    assert hashlib.sha256(out).digest()[:16] == header.target_sha256


_FUZZ_BASE: dict[int, bytes] = {}


def _fuzz_base(old: bytes, new: bytes) -> bytes:
    key = hash((old, new))
    if key not in _FUZZ_BASE:
        _FUZZ_BASE[key] = delta.make_patch(old, new, codecs=(CODEC_ZSTD,), format_version=3)
        assert delta.read_header(_FUZZ_BASE[key]).version == 3
    return _FUZZ_BASE[key]


# --- the probe (bench/delta/literal_branch_probe.py) ------------------------------------------


def _probe_module() -> ModuleType:
    path = Path(__file__).parent.parent / "bench" / "delta" / "literal_branch_probe.py"
    spec = importlib.util.spec_from_file_location("literal_branch_probe", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@settings(max_examples=200, deadline=None)
@given(patterned(), OFFSETS)
def test_probe_x86_transform_round_trips(data: bytes, offset: int) -> None:
    """The probe's x86 E8/E9 transform (measured, not in the format) is an exact inverse."""
    probe = _PROBE
    buf = bytearray(data)
    if len(buf):
        view = np.frombuffer(buf, dtype=np.uint8)
        probe._x86(view, offset)
        converted = bytes(buf)
        probe._x86(view, offset, encode=False)
        assert bytes(buf) == data
        calls = bytes.fromhex("e8 10 00 00 00") * 2
        twice = bytearray(calls)
        probe._x86(np.frombuffer(twice, dtype=np.uint8), 0)
        assert twice[1:5] == (21).to_bytes(4, "little") and twice[6:] == (26).to_bytes(4, "little")
        assert len(converted) == len(data)


def test_probe_measures_a_pair(pairs: dict[int, tuple[bytes, bytes]]) -> None:
    """The probe's record walk finds every literal byte at its target offset, and its row
    says the RISC-V transform is the best one on RISC-V code."""
    old, new = pairs[RISCV]
    plain = _PROBE.baseline_patch(old, new)
    assert delta.read_header(plain).version == 2
    _, payload = decode_payload(plain, old=old)
    runs = _PROBE.literal_runs(payload)
    assert all(payload[at : at + n] == new[offset : offset + n] for at, n, offset in runs)
    row = _PROBE.probe(old, new, plain)
    assert row["reencoded"] == len(plain) and row["best"] == "riscv" and row["gain"] > 0


_PROBE = _probe_module()
