"""Branch conversion of a patch's literal (extra) bytes: BCJ-style filters, exact inverses.

New code that matches nothing in the old image reaches the patch as literal bytes. A call
instruction holds its target relative to its own address, so a hundred calls to one function
are a hundred different byte strings; made absolute (xz's "branch/call/jump" filters) they
become equal, and the payload's LZMA2/zstd coder finds the repeats. ``convert(data, offset,
kind)`` does that to ``data`` as if it sat at ``offset`` in the target image (the entry's
output offset); ``restore`` undoes it exactly, whatever the bytes (data that is not code
round-trips too: a transform is a bijection on every input).

Kinds (xz's filter files in src/liblzma/simple/ are the reference for each rule):

* ``THUMB`` (1): Thumb-2 BL as xz's ``armthumb.c``: halfword pairs ``F0xx-F7xx, F8xx-FFxx``
  at even target offsets, leftmost first and non-overlapping; the 22-bit halfword offset
  becomes (offset + position + 4) / 2 + offset, modulo 2**22. Equal to xz's filter with
  ``start_offset`` = ``offset`` whenever ``offset`` is even (xz aligns to the buffer, this
  module to the target image, so an entry that starts at an odd offset converts the same
  instructions as the whole image would).
* ``RISCV`` (2): RISC-V JAL with rd x1 (ra) or x5 (t0), as xz 5.6's ``riscv.c`` (the
  20-bit absolute target stored big-endian in the immediate's bits), and AUIPC + a 32-bit
  instruction whose rs1 is AUIPC's rd (not x0): their 32-bit pc-relative sum made absolute,
  the upper 20 bits in AUIPC's immediate and the lower 12 in the second instruction's
  (register and opcode fields kept, unlike xz's rearranged pair, so no "fake pair" decoding
  is needed). An AUIPC with rd != x0 that is not such a pair makes the scan skip 6 bytes (as
  xz) so that no later conversion can change the fields its test read.
* ``X86`` (3): E8/E9 (CALL/JMP rel32) whose displacement's top byte is 00 or FF, as xz's
  ``x86.c`` simplified: the 25-bit displacement becomes (offset + position + 5 + disp) modulo
  2**25, sign-extended so the top byte stays 00/FF. xz's ``prev_mask`` state is replaced by
  one rule: an opcode byte is not converted when an unconverted E8/E9 lies 1-3 bytes before
  it, so a conversion never changes the byte that decided about an earlier opcode.

Every transform reads and writes only the bytes of one entry (an instruction that straddles
two entries or a copy is left alone) and is numpy code with the scan's only sequential part
(x86, RISC-V: which candidates are taken) a loop over candidate positions. There is no
Cython kernel, so no pure-Python twin: this module is what both appliers use.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from otacore._types import Buffer
from otacore.errors import DeltaError

NONE = 0
THUMB = 1
RISCV = 2
X86 = 3
KIND_NAMES = {NONE: "none", THUMB: "thumb", RISCV: "riscv", X86: "x86"}

_U8 = NDArray[np.uint8]
_I64 = NDArray[np.int64]


class LiteralKindError(DeltaError):
    """A literal branch conversion kind this code does not know."""


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


def convert_into(buf: bytearray | memoryview, offset: int, kind: int) -> None:
    """:func:`convert` in place (``buf`` is writable)."""
    _run(buf, offset, kind, True)


def restore_into(buf: bytearray | memoryview, offset: int, kind: int) -> None:
    """:func:`restore` in place (``buf`` is writable): what an applier does to each entry."""
    _run(buf, offset, kind, False)


def _run(buf: bytearray | memoryview, offset: int, kind: int, encode: bool) -> None:
    if kind == NONE or len(buf) < 4:
        if kind not in KIND_NAMES:
            raise LiteralKindError(_unknown(kind))
        return
    data = np.frombuffer(buf, dtype=np.uint8)
    if kind == THUMB:
        _thumb(data, offset, encode)
    elif kind == RISCV:
        _riscv(data, offset, encode)
    elif kind == X86:
        _x86(data, offset, encode)
    else:
        raise LiteralKindError(_unknown(kind))


def _unknown(kind: int) -> str:
    return (
        f"literal branch conversion {kind} is not known (this code knows "
        + ", ".join(f"{k} {name}" for k, name in KIND_NAMES.items())
        + ")"
    )


def _thumb(data: _U8, offset: int, encode: bool) -> None:
    size = len(data)
    at = np.arange(offset & 1, size - 3, 2, dtype=np.int64)
    # xz armthumb.c: (buf[i+1] & 0xF8) == 0xF0 && (buf[i+3] & 0xF8) == 0xF8; those bits
    # survive the conversion, so both directions find the same candidates.
    hits = at[((data[at + 1] & 0xF8) == 0xF0) & ((data[at + 3] & 0xF8) == 0xF8)]
    if not len(hits):
        return
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
    data[taken + 3] = 0xF8 | ((value >> 8) & 7)


def _riscv_taken(data: _U8, offset: int) -> tuple[list[int], list[int]]:
    """Positions of the JALs and AUIPC pairs the scan converts (same on both sides)."""
    size = len(data)
    at = np.arange(offset & 1, size - 3, 2, dtype=np.int64)
    low = data[at] & 0x7F
    # JAL rd=x1/x5: byte 0xEF and (byte1 & 0x0D) == 0 (xz riscv.c); AUIPC: opcode 0x17.
    jal_mask = (data[at] == 0xEF) & ((data[at + 1] & 0x0D) == 0)
    candidates = at[jal_mask | (low == 0x17)]
    jals: list[int] = []
    pairs: list[int] = []
    resume = 0
    raw = data.tobytes()
    for position in candidates.tolist():
        if position < resume:
            continue
        if raw[position] == 0xEF:
            jals.append(position)
            resume = position + 4
            continue
        rd = (raw[position] >> 7) | ((raw[position + 1] & 0x0F) << 1)
        if rd == 0 or position + 8 > size:
            continue  # (LPAD and hints: AUIPC x0 is never a pair)
        inst2 = int.from_bytes(raw[position + 4 : position + 8], "little")
        if inst2 & 3 == 3 and (inst2 >> 15) & 0x1F == rd:
            pairs.append(position)
            resume = position + 8
        else:
            resume = position + 6  # xz: later conversions must not touch what this test read
    return jals, pairs


def _riscv(data: _U8, offset: int, encode: bool) -> None:
    jal_list, pair_list = _riscv_taken(data, offset)
    if jal_list:
        jal = np.array(jal_list, dtype=np.int64)
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
    if pair_list:
        pair = np.array(pair_list, dtype=np.int64)
        words = _words(data, pair)
        inst, inst2 = words[:, 0], words[:, 1]
        pc = offset + pair
        if encode:
            # AUIPC adds imm20 << 12 to pc, inst2 a sign-extended 12-bit immediate.
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
        _put_words(data, pair, np.stack([inst, inst2], axis=1))


def _words(data: _U8, at: _I64) -> NDArray[np.int64]:
    """The two little-endian 32-bit words at each of ``at`` (shape (n, 2))."""
    raw = data[at[:, None] + np.arange(8)].astype(np.int64).reshape(-1, 2, 4)
    return (raw << np.array([0, 8, 16, 24], dtype=np.int64)).sum(axis=2)


def _put_words(data: _U8, at: _I64, words: NDArray[np.int64]) -> None:
    shifts = np.array([0, 8, 16, 24], dtype=np.int64)
    raw = (words[:, :, None] >> shifts) & 0xFF
    data[at[:, None] + np.arange(8)] = raw.reshape(-1, 8).astype(np.uint8)


def _x86(data: _U8, offset: int, encode: bool) -> None:
    size = len(data)
    opcodes = np.flatnonzero((data & 0xFE) == 0xE8).tolist()
    raw = data.tobytes()
    taken: list[int] = []
    resume = 0
    free_opcode = -8  # last E8/E9 not inside a converted instruction
    for position in opcodes:
        if position < resume:
            continue
        if position - free_opcode > 3 and position + 5 <= size and raw[position + 4] in (0, 0xFF):
            taken.append(position)
            resume = position + 5
        else:
            free_opcode = position
    if not taken:
        return
    at = np.array(taken, dtype=np.int64)
    field = data[at[:, None] + np.arange(1, 5)].astype(np.int64)
    value = (field << np.array([0, 8, 16, 24], dtype=np.int64)).sum(axis=1) & 0x1FFFFFF
    pc = offset + at + 5
    value = (value + pc if encode else value - pc) & 0x1FFFFFF
    value |= -(value >> 24) & 0xFE000000  # sign-extend bit 24: the top byte is 00 or FF
    data[at[:, None] + np.arange(1, 5)] = (
        (value[:, None] >> np.array([0, 8, 16, 24], dtype=np.int64)) & 0xFF
    ).astype(np.uint8)
