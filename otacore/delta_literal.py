"""Branch conversion of a patch's literal (extra) bytes: BCJ-style filters, exact inverses.

New code that matches nothing in the old image reaches the patch as literal bytes. A call
instruction holds its target relative to its own address, so a hundred calls to one function
are a hundred different byte strings; made absolute (xz's "branch/call/jump" filters) they
become equal, and the payload's LZMA2/zstd coder finds the repeats. ``convert(data, offset,
kind)`` does that to ``data`` as if it sat at ``offset`` in the target image (the entry's
output offset); ``restore`` undoes it exactly, whatever the bytes (data that is not code
round-trips too: a transform is a bijection on every input).

Kinds (xz's filter files in src/liblzma/simple/ are the reference for each rule):

* ``THUMB`` (1): Thumb-2 BL and B.W as xz's ``armthumb.c`` (which takes BL only): halfword
  pairs ``11110 S imm10, 1x 1 1 1 imm11`` (bytes ``F0-F7`` then ``B8-BF`` or ``F8-FF``: the
  J1 = J2 = 1 encodings, i.e. targets within +-4 MiB; ARMv7-M ARM A7.7.18, A7.7.12 T4) at
  even target offsets, leftmost first and non-overlapping; the 22-bit halfword offset becomes
  plus (offset + position + 4) / 2 modulo 2**22 (absolute). On bytes holding no B.W pattern it is
  xz's filter with ``start_offset`` = ``offset`` whenever ``offset`` is even (xz aligns to its
  buffer, this module to the target image, so an entry that starts at an odd offset converts
  the instructions the whole image would). B.W is mostly a tail call: taking it too made the
  Thumb pairs' literals 5% smaller again.
* ``RISCV`` (2): RISC-V JAL with rd x1 (ra) or x5 (t0), as xz 5.6's ``riscv.c`` (the
  20-bit absolute target stored big-endian in the immediate's bits), and AUIPC + a 32-bit
  instruction whose rs1 is AUIPC's rd (not x0): their 32-bit pc-relative sum made absolute,
  the upper 20 bits in AUIPC's immediate and the lower 12 in the second instruction's
  (register and opcode fields kept, unlike xz's rearranged pair, so no "fake pair" decoding
  is needed). An AUIPC with rd != x0 that is not such a pair makes the scan skip 6 bytes (as
  xz) so that no later conversion can change the fields its test read.

Value 3 is reserved: x86 E8/E9 (xz ``x86.c``) was measured on the public corpus and gained
nothing (bench/delta/results/literal-branch-probe.md).

Each transform reads and writes only the bytes it is given (one entry's literal bytes: an
instruction that straddles two entries or a copy is left alone), and the fields that decide
whether a position is converted are never changed by any conversion, so ``restore`` finds
the same positions in the converted bytes. Numpy throughout; the only sequential part (which
RISC-V candidates the scan takes) is a loop over candidate positions. There is no Cython
kernel, so no pure-Python twin: this module is what the maker and both appliers use.
"""

from __future__ import annotations

import re

import numpy as np
from numpy.typing import NDArray

from otacore._types import Buffer
from otacore.errors import DeltaError

NONE = 0
THUMB = 1
RISCV = 2
#: Kinds a patch may name (format: otacore.delta, prelude bits 3-4); 3 is reserved (x86
#: E8/E9 was measured and gained nothing: bench/delta/results/literal-branch-probe.md).
KIND_NAMES = {NONE: "none", THUMB: "thumb", RISCV: "riscv"}

_U8 = NDArray[np.uint8]
_I64 = NDArray[np.int64]
#: Instruction start positions handled per numpy step: bounds the temporaries (some 40
#: bytes per position) an applier holds on top of its record, whatever the record size.
WINDOW = 1024
#: Runs up to this many bytes are converted candidate by candidate in plain Python (most
#: entries' literal runs are short; numpy's fixed cost per call would dominate them).
SMALL_RUN = 256


class LiteralConversionError(DeltaError):
    """A conversion asked for with a kind this code does not know, or outside its buffer."""


def convert(data: Buffer, offset: int, kind: int) -> bytes:
    """``data`` (one entry's literal bytes at target ``offset``) with its branches made absolute."""
    out = bytearray(data)
    convert_into(out, offset, kind)
    return bytes(out)


def restore(data: Buffer, offset: int, kind: int) -> bytes:
    """Inverse of :func:`convert`: the original literal bytes of ``data`` at ``offset``."""
    out = bytearray(data)
    restore_into(out, offset, kind)
    return bytes(out)


def convert_into(
    buf: bytearray, offset: int, kind: int, start: int = 0, end: int | None = None
) -> None:
    """:func:`convert` in place on ``buf[start:end]``, which sits at target ``offset``."""
    _run(buf, start, len(buf) if end is None else end, offset, kind, True)


def restore_into(
    buf: bytearray,
    offset: int,
    kind: int,
    start: int = 0,
    end: int | None = None,
    *,
    plain: bool = False,
) -> None:
    """:func:`restore` in place on ``buf[start:end]``: what an applier does to each entry's
    literal bytes inside its record buffer (no copy). ``plain`` scans candidate by candidate
    whatever the length (no numpy temporaries: the streaming applier's choice, which keeps
    its memory what it was before version 3); the result is the same."""
    _run(buf, start, len(buf) if end is None else end, offset, kind, False, plain)


def _run(
    buf: bytearray,
    start: int,
    end: int,
    offset: int,
    kind: int,
    encode: bool,
    plain: bool = False,
) -> None:
    if kind not in KIND_NAMES:
        raise LiteralConversionError(
            f"literal branch conversion {kind} is not known (this code knows "
            + ", ".join(f"{k} {name}" for k, name in KIND_NAMES.items())
            + ")"
        )
    if not 0 <= start <= end <= len(buf):
        raise LiteralConversionError(f"range {start}..{end} is outside the {len(buf)}-byte buffer")
    if kind == NONE or end - start < 4:
        return
    if plain or end - start <= SMALL_RUN:
        _run_small(buf, start, end, offset - start, kind, encode)
        return
    data = np.frombuffer(buf, dtype=np.uint8, count=end - start, offset=start)
    step = _thumb if kind == THUMB else _riscv
    resume = 0  # first position where an instruction may start (the last one's end)
    for window in range(0, end - start, WINDOW):
        resume = step(data, window, min(window + WINDOW, end - start), resume, offset, encode)


#: The byte that makes a position a candidate (Thumb: the first halfword's high byte, one
#: after the instruction's start; RISC-V: a JAL ra/t0 or AUIPC opcode byte).
_FIRST_BYTE = {THUMB: re.compile(b"[\xf0-\xf7]"), RISCV: re.compile(b"[\x17\x97\xef]")}


def _run_small(buf: bytearray, start: int, end: int, base: int, kind: int, encode: bool) -> None:
    """The same scan as the numpy steps, candidate by candidate (``base`` + index is the
    target offset): cheaper than numpy's per-call cost on the short runs most entries are."""
    lead = 1 if kind == THUMB else 0
    resume = start
    for match in _FIRST_BYTE[kind].finditer(buf, start + lead, end):
        at = match.start() - lead
        if at < resume or (base + at) & 1 or at + 4 > end:
            continue
        pc = base + at
        if kind == THUMB:
            b0, b1, b2, b3 = buf[at : at + 4]
            if b3 & 0xB8 != 0xB8:
                continue
            value = (b1 & 7) << 19 | b0 << 11 | (b3 & 7) << 8 | b2
            half_pc = (pc + 4) >> 1
            value = (value + half_pc if encode else value - half_pc) & 0x3FFFFF
            buf[at : at + 4] = bytes(
                (value >> 11 & 0xFF, 0xF0 | value >> 19, value & 0xFF, b3 & 0xF8 | value >> 8 & 7)
            )
            resume = at + 4
            continue
        inst = int.from_bytes(buf[at : at + 4], "little")
        if buf[at] == 0xEF:
            if buf[at + 1] & 0x0D:
                continue  # JAL with rd other than x1/x5
            buf[at : at + 4] = _jal_word(inst, pc, encode).to_bytes(4, "little")
            resume = at + 4
            continue
        rd = inst >> 7 & 0x1F
        if rd == 0 or at + 8 > end:
            continue
        inst2 = int.from_bytes(buf[at + 4 : at + 8], "little")
        if inst2 & 3 != 3 or inst2 >> 15 & 0x1F != rd:
            resume = at + 6
            continue
        inst, inst2 = _pair_words(inst, inst2, pc, encode)
        buf[at : at + 8] = inst.to_bytes(4, "little") + inst2.to_bytes(4, "little")
        resume = at + 8


def _jal_word(inst: int, pc: int, encode: bool) -> int:
    """One JAL word converted (or restored) at ``pc``: the numpy steps' arithmetic."""
    b1, b2, b3 = inst >> 8 & 0xFF, inst >> 16 & 0xFF, inst >> 24
    if encode:
        target = (
            (b1 & 0xF0) << 8 | (b2 & 0x0F) << 16 | (b2 & 0x10) << 7
            | (b2 & 0xE0) >> 4 | (b3 & 0x7F) << 4 | (b3 & 0x80) << 13
        ) + pc
        b1, b2, b3 = (b1 & 0x0F) | (target >> 13 & 0xF0), target >> 9 & 0xFF, target >> 1 & 0xFF
    else:
        relative = ((b1 & 0xF0) << 13 | b2 << 9 | b3 << 1) - pc
        b1 = (b1 & 0x0F) | (relative >> 8 & 0xF0)
        b2 = (relative >> 16 & 0x0F) | (relative >> 7 & 0x10) | (relative << 4 & 0xE0)
        b3 = (relative >> 4 & 0x7F) | (relative >> 13 & 0x80)
    return (inst & 0xFF) | b1 << 8 | b2 << 16 | b3 << 24


def _pair_words(inst: int, inst2: int, pc: int, encode: bool) -> tuple[int, int]:
    """One AUIPC pair converted (or restored) at ``pc``: the numpy steps' arithmetic."""
    if encode:
        low12 = inst2 >> 20
        value = ((inst & 0xFFFFF000) + low12 - ((low12 & 0x800) << 1) + pc) & 0xFFFFFFFF
        return (inst & 0xFFF) | (value & 0xFFFFF000), (inst2 & 0xFFFFF) | (value & 0xFFF) << 20
    relative = ((inst & 0xFFFFF000 | inst2 >> 20) - pc) & 0xFFFFFFFF
    return (inst & 0xFFF) | ((relative + 0x800) & 0xFFFFF000), (
        (inst2 & 0xFFFFF) | (relative & 0xFFF) << 20
    )


def _starts(data: _U8, window: int, window_end: int, resume: int, offset: int) -> _I64:
    """Positions in [window, window_end) at even target offsets, from ``resume`` on, where a
    4-byte instruction fits."""
    first = max(window, resume)
    first += (offset + first) & 1
    return np.arange(first, min(window_end, len(data) - 3), 2, dtype=np.int64)


def _thumb(
    data: _U8, window: int, window_end: int, resume: int, offset: int, encode: bool
) -> int:
    at = _starts(data, window, window_end, resume, offset)
    # xz armthumb.c: (buf[i+1] & 0xF8) == 0xF0 && (buf[i+3] & 0xF8) == 0xF8, widened to
    # B.W (0xB8: bit 6 free); those bits survive the conversion, so both directions find
    # the same candidates.
    hits = at[((data[at + 1] & 0xF8) == 0xF0) & ((data[at + 3] & 0xB8) == 0xB8)]
    if not len(hits):
        return resume
    # Leftmost non-overlapping: in a run of candidates 2 bytes apart, every other one.
    index = np.arange(len(hits))
    run_start = np.maximum.accumulate(np.where(np.diff(hits, prepend=-4) != 2, index, 0))
    taken = hits[(index - run_start) % 2 == 0]
    b0, b1, b2, b3 = (data[taken + k].astype(np.int64) for k in range(4))
    value = ((b1 & 7) << 19) | (b0 << 11) | ((b3 & 7) << 8) | b2
    half_pc = (offset + taken + 4) >> 1
    value = (value + half_pc if encode else value - half_pc) & 0x3FFFFF
    data[taken] = (value >> 11) & 0xFF
    data[taken + 1] = 0xF0 | ((value >> 19) & 7)
    data[taken + 2] = value & 0xFF
    data[taken + 3] = (b3 & 0xF8) | ((value >> 8) & 7)
    return int(taken[-1]) + 4


def _riscv(
    data: _U8, window: int, window_end: int, resume: int, offset: int, encode: bool
) -> int:
    at = _starts(data, window, window_end, resume, offset)
    # JAL rd=x1/x5: byte 0xEF and (byte1 & 0x0D) == 0 (xz riscv.c); AUIPC: opcode 0x17.
    first = data[at]
    candidates = at[((first == 0xEF) & ((data[at + 1] & 0x0D) == 0)) | ((first & 0x7F) == 0x17)]
    jals: list[int] = []
    pairs: list[int] = []
    size = len(data)
    for position in candidates.tolist():
        if position < resume:
            continue
        if data[position] == 0xEF:
            jals.append(position)
            resume = position + 4
            continue
        rd = (int(data[position]) >> 7) | ((int(data[position + 1]) & 0x0F) << 1)
        if rd == 0 or position + 8 > size:
            continue  # AUIPC x0 (LPAD, hints) is never a pair
        inst2 = int.from_bytes(data[position + 4 : position + 8].tobytes(), "little")
        if inst2 & 3 == 3 and (inst2 >> 15) & 0x1F == rd:
            pairs.append(position)
            resume = position + 8
        else:
            resume = position + 6  # xz: later conversions must not touch what this test read
    if jals:
        _riscv_jal(data, np.array(jals, dtype=np.int64), offset, encode)
    if pairs:
        _riscv_pair(data, np.array(pairs, dtype=np.int64), offset, encode)
    return resume


def _riscv_jal(data: _U8, jal: _I64, offset: int, encode: bool) -> None:
    b1, b2, b3 = (data[jal + k].astype(np.int64) for k in (1, 2, 3))
    pc = offset + jal
    if encode:  # xz riscv.c: J-type immediate -> absolute target, big-endian bits 20..1
        target = (
            ((b1 & 0xF0) << 8) | ((b2 & 0x0F) << 16) | ((b2 & 0x10) << 7)
            | ((b2 & 0xE0) >> 4) | ((b3 & 0x7F) << 4) | ((b3 & 0x80) << 13)
        ) + pc
        data[jal + 1] = (b1 & 0x0F) | ((target >> 13) & 0xF0)
        data[jal + 2] = (target >> 9) & 0xFF
        data[jal + 3] = (target >> 1) & 0xFF
    else:
        relative = (((b1 & 0xF0) << 13) | (b2 << 9) | (b3 << 1)) - pc
        data[jal + 1] = (b1 & 0x0F) | ((relative >> 8) & 0xF0)
        data[jal + 2] = (
            ((relative >> 16) & 0x0F) | ((relative >> 7) & 0x10) | ((relative << 4) & 0xE0)
        )
        data[jal + 3] = ((relative >> 4) & 0x7F) | ((relative >> 13) & 0x80)


def _riscv_pair(data: _U8, pair: _I64, offset: int, encode: bool) -> None:
    shifts = np.array([0, 8, 16, 24], dtype=np.int64)
    spans = pair[:, None] + np.arange(8)
    words = (data[spans].astype(np.int64).reshape(-1, 2, 4) << shifts).sum(axis=2)
    inst, inst2 = words[:, 0], words[:, 1]
    pc = offset + pair
    if encode:
        # AUIPC adds imm20 << 12 to pc, the paired instruction its sign-extended imm12.
        low12 = inst2 >> 20
        relative = (inst & 0xFFFFF000) + low12 - ((low12 & 0x800) << 1)
        value = (relative + pc) & 0xFFFFFFFF
        inst = (inst & 0xFFF) | (value & 0xFFFFF000)
        inst2 = (inst2 & 0xFFFFF) | ((value & 0xFFF) << 20)
    else:
        value = (inst & 0xFFFFF000) | (inst2 >> 20)
        relative = (value - pc) & 0xFFFFFFFF
        inst = (inst & 0xFFF) | ((relative + 0x800) & 0xFFFFF000)
        inst2 = (inst2 & 0xFFFFF) | ((relative & 0xFFF) << 20)
    words = np.stack([inst, inst2], axis=1)
    data[spans] = ((words[:, :, None] >> shifts) & 0xFF).reshape(-1, 8).astype(np.uint8)
