"""Would branch conversion of the literal bytes make our patches smaller? (issue 18 evidence)

For every pair of a corpus it makes our patch (``otacore.delta_maker.search_patch``,
defaults, with the maker's own literal branch conversion off: ``LITERAL_KINDS`` emptied, so
the patch is the version 2 one), decodes its payload (format in ``otacore/delta.py``),
converts the extra (literal) bytes of every entry with each transform at that entry's
output offset in the new image (``otacore.delta_literal``'s Thumb-2 and RISC-V, and an x86
E8/E9 one kept here; instructions that straddle two entries or a copy are left alone),
re-encodes the payload with the patch's own codec and settings (``PatchEncoder.encode``:
same codec, LZMA properties, preset and zstd level) and prints, per pair and in total: the
patch, the same payload re-encoded (a check: equal unless the codec step picked the fast
level-3 literal candidate), the size per transform, and the best (a transform only counts
where it is smaller than the re-encoded original). It also gives the zstd level-3 size of
the concatenated literal bytes, plain and converted: the cheap screen a maker would use to
pick the transform.

Writes ``<out>/literal-branch-probe.json``. Run:
``python bench/delta/literal_branch_probe.py [--corpus DIR] [--pairs a b] [--cache DIR]``
(``--cache`` keeps the patches made, so a second run only re-encodes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import zstandard
from numpy.typing import NDArray

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from otacore import delta_codec, delta_literal, delta_maker  # noqa: E402
from otacore.delta import read_varint  # noqa: E402
from otacore.delta_stream import decode_payload  # noqa: E402

#: The format's transforms, and x86 (measured here only: it gained nothing, so the format
#: keeps its value reserved).
X86 = 3
TRANSFORMS = {"thumb": delta_literal.THUMB, "riscv": delta_literal.RISCV, "x86": X86}




def literal_runs(payload: bytes) -> list[tuple[int, int, int]]:
    """(payload offset, length, target offset) of every entry's extra bytes."""
    length, at = read_varint(payload, 0)
    at += length  # the prelude
    runs: list[tuple[int, int, int]] = []
    out = 0
    while True:
        length, at = read_varint(payload, at)
        if length == 0:
            return runs
        record_end = at + length
        count, r = read_varint(payload, at)
        entries = []
        copied = 0
        for _ in range(count):
            _, r = read_varint(payload, r)
            copy, r = read_varint(payload, r)
            extra, r = read_varint(payload, r)
            entries.append((copy, extra))
            copied += copy
        extra_at = r + copied
        for copy, extra in entries:
            out += copy
            if extra:
                runs.append((extra_at, extra, out))
            extra_at += extra
            out += extra
        assert extra_at == record_end, "record lengths do not add up"
        at = record_end


def converted(payload: bytes, runs: list[tuple[int, int, int]], kind: int) -> bytes:
    """``payload`` with every run's extra bytes converted in place."""
    out = bytearray(payload)
    for at, length, offset in runs:
        if kind == X86:
            _x86(np.frombuffer(out, dtype=np.uint8, count=length, offset=at), offset)
        else:
            delta_literal.convert_into(out, offset, kind, at, at + length)
    return bytes(out)


def _x86(data: NDArray[np.uint8], offset: int, encode: bool = True) -> None:
    """x86 E8/E9 conversion in place (xz x86.c simplified): a rel32 whose top byte is 00/FF
    becomes absolute modulo 2**25, sign-extended; an opcode 1-3 bytes after an unconverted
    E8/E9 is left alone, so no conversion changes a byte that decided about an earlier one
    (xz's prev_mask does that job). Exact inverse with ``encode`` False."""
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



def baseline_patch(old: bytes, new: bytes) -> bytes:
    """Our patch without the maker's version 3 features, literal branch conversion and
    exact copies (format version 2, the records this probe walks)."""
    return delta_maker.search_patch(old, new, format_version=2).patch


def _z3(data: bytes) -> int:
    return len(zstandard.ZstdCompressor(level=3).compress(data)) if data else 0


def probe(old: bytes, new: bytes, patch: bytes) -> dict:
    """The sizes of the module docstring for one pair."""
    header, payload = decode_payload(patch, old=old)
    encoder = delta_codec.PatchEncoder(
        old, new, window_log=header.window_log, block_limit=header.block_limit
    )

    def encode(data: bytes) -> int:
        return len(encoder.encode(data, header.codec, props=header.lzma_props))

    runs = literal_runs(payload)
    literal = b"".join(payload[at : at + n] for at, n, _ in runs)
    row: dict = {
        "patch": len(patch),
        "codec": delta_codec.CODEC_NAMES[header.codec],
        "literal": len(literal),
        "runs": len(runs),
        "reencoded": encode(payload),
        "z3:none": _z3(literal),
    }
    for name, kind in TRANSFORMS.items():
        started = time.perf_counter()
        changed = converted(payload, runs, kind)
        row[f"t:{name}"] = encode(changed)
        row[f"z3:{name}"] = _z3(b"".join(changed[at : at + n] for at, n, _ in runs))
        row[f"s:{name}"] = round(time.perf_counter() - started, 3)
    base = row["reencoded"]
    best = min(TRANSFORMS, key=lambda name: row[f"t:{name}"])
    row["best"] = best if row[f"t:{best}"] < base else "none"
    row["best_size"] = min(base, row[f"t:{best}"])
    row["gain"] = base - row["best_size"]
    screen = min(TRANSFORMS, key=lambda name: row[f"z3:{name}"])
    row["screen"] = screen if row[f"z3:{screen}"] < row["z3:none"] else "none"
    row["screen_size"] = base if row["screen"] == "none" else row[f"t:{row['screen']}"]
    return row


def table(rows: dict[str, dict]) -> str:
    """One markdown line per pair plus the total."""
    names = list(TRANSFORMS)
    lines = [
        "| pair | codec | literal B | patch | re-encoded | "
        + " | ".join(names)
        + " | best | gain | z3 screen picks | screen size |",
        "|---|---|---:|---:|---:|" + "---:|" * len(names) + "---|---:|---|---:|",
    ]
    total = {key: 0 for key in ("patch", "reencoded", "best_size", "gain", "screen_size")}
    per = {name: 0 for name in names}
    for pair, row in rows.items():
        cells = [str(row[f"t:{name}"]) for name in names]
        lines.append(
            f"| {pair} | {row['codec']} | {row['literal']} | {row['patch']} | {row['reencoded']} | "
            + " | ".join(cells)
            + f" | {row['best']} | {row['gain']} | {row['screen']} | {row['screen_size']} |"
        )
        for key in total:
            total[key] += row[key]
        for name in names:
            per[name] += row[f"t:{name}"]
    lines.append(
        f"| **total** | | | {total['patch']} | {total['reencoded']} | "
        + " | ".join(str(per[name]) for name in names)
        + f" | {total['best_size']} | **{total['gain']}** | | {total['screen_size']} |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Probe every pair (or --pairs), print the table, write the json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=HERE / "corpus-public")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--pairs", nargs="*")
    parser.add_argument("--cache", type=Path, help="directory keeping the patches made")
    args = parser.parse_args()
    manifest = json.loads((args.corpus / "manifest.json").read_text())
    rows: dict[str, dict] = {}
    for pair in args.pairs or list(manifest):
        old = (args.corpus / pair / "old.bin").read_bytes()
        new = (args.corpus / pair / "new.bin").read_bytes()
        cached = args.cache / f"{pair}.otad" if args.cache else None
        if cached is not None and cached.exists():
            patch = cached.read_bytes()
        else:
            patch = baseline_patch(old, new)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_bytes(patch)
        rows[pair] = probe(old, new, patch)
        print(pair, json.dumps(rows[pair]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "literal-branch-probe.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


__all__ = ["baseline_patch", "converted", "literal_runs", "probe", "table"]

if __name__ == "__main__":
    main()
