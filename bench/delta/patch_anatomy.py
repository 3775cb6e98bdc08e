"""Where the bytes of our patches go, per pair of a corpus (evidence for the delta engine work).

For every pair it makes our patch (``otacore.delta.make_patch``, defaults) and walks its
payload (format in ``otacore/delta.py``): the filter set and map sizes of the prelude, the
control entries, the bytes covered by copies and how many of their difference bytes are
non-zero (what the prediction got wrong), and the extra (literal) bytes. Then:

* each stream compressed alone (zstd level 19, the patch's window) to show which one costs
  the patch its bytes: ``ctrl_z``, ``diff_z``, ``extra_z``;
* ``extra_in_old``: literal bytes lying in a 32-byte window that also occurs in the old
  image, i.e. data the matcher did not copy although the old image has it (moved or
  reordered blocks, or matches it judged too short or too noisy);
* ``extra_z_dict``: the literals compressed with the old image as a zstd raw-content
  dictionary, what they would cost if literals could reference the old image the way
  ``zstd --patch-from`` does;
* ``win20``: our patch with ``window_log=20`` (the format's largest window) instead of 17;
* ``new_z``: the new image alone, zstd -19 (a patch should never be larger);
* ``streams_apart``: header + prelude + the three streams compressed apart (bsdiff's layout)
  against ``patch`` (ours interleaves them per record in one zstd frame);
* with ``--filter-sweep``: our patch with each filter set forced (``filters=``), to show
  what the automatic choice of instruction set (``detect_family``) gives or costs.

Writes ``<out>/public-anatomy.json`` and ``.md``. Run:
``python bench/delta/patch_anatomy.py [--corpus bench/delta/corpus-public] [--pairs a b]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import zstandard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from otacore import delta  # noqa: E402
from otacore.delta import read_varint  # noqa: E402
from otacore.delta_stream import decode_payload  # noqa: E402

#: Literal runs are checked against the old image in windows of this many bytes.
PROBE = 32
FILTER_NAMES = {1: "thumb", 2: "x86", 4: "words"}




def _unzigzag(value: int) -> int:
    return value >> 1 if not value & 1 else -((value + 1) >> 1)


def walk(patch: bytes, old: bytes | None = None) -> dict:
    """The streams of an OTAD patch (any version and codec; codec 2 needs ``old``): prelude
    facts, control, difference and extra bytes (version 3: the bitmaps count as control;
    exact copies have no difference bytes; version 4: control entries in columns; version 5:
    sparse columns, their bitmaps counted as control)."""
    header, payload = decode_payload(patch, old=old)
    length, at = read_varint(payload, 0)
    prelude = payload[at : at + length]
    at += length
    flags, p = read_varint(prelude, 0)
    filters, exact_copies = flags & 7, bool(flags & delta.EXACT_COPIES)
    columns = bool(flags & delta.COLUMNS)
    sparse = bool(flags & delta.SPARSE_COLUMNS)
    maps = [0, 0]
    if filters:
        _, p = read_varint(prelude, p)  # load address + 1
        for which in range(2):
            count, p = read_varint(prelude, p)
            maps[which] = count
            for _ in range(2 * count):
                _, p = read_varint(prelude, p)
    control, diff, extra = bytearray(), bytearray(), bytearray()
    entries = seeks = copied = 0
    runs: list[tuple[int, int]] = []  # (offset in the new image, length) of literal runs
    while True:
        length, at = read_varint(payload, at)
        if length == 0:
            break
        record = payload[at : at + length]
        at += length
        count, r = read_varint(record, 0)
        bitmap = (count + 7) // 8 if exact_copies else 0
        exact = int.from_bytes(record[r : r + bitmap], "little")
        r += bitmap
        copies = extras = 0
        fields = []
        if sparse:
            # version 5: bitmaps of the non-zero seeks and extras, the copy lengths, then the
            # non-zero seeks and the non-zero extras
            width = (count + 7) // 8
            marks = [int.from_bytes(record[r + k * width : r + (k + 1) * width], "little")
                     for k in range(2)]
            r += 2 * width
            wanted = count + marks[0].bit_count() + marks[1].bit_count()
        else:
            wanted = 3 * count
        for _ in range(wanted):
            value, r = read_varint(record, r)
            fields.append(value)
        if sparse:
            copy_lengths, values = fields[:count], iter(fields[count:])
            seek_values = [next(values) if marks[0] >> i & 1 else 0 for i in range(count)]
            extra_values = [next(values) if marks[1] >> i & 1 else 0 for i in range(count)]
            rows = zip(seek_values, copy_lengths, extra_values, strict=True)
        elif columns:
            # version 4 (COLUMNS): all seeks, then all copy lengths, then all extra lengths
            rows = zip(fields[:count], fields[count : 2 * count], fields[2 * count :], strict=True)
        else:
            rows = zip(fields[0::3], fields[1::3], fields[2::3], strict=True)
        for index, (seek, copy, more) in enumerate(rows):
            seeks += _unzigzag(seek) != 0
            copied += copy
            if more:
                runs.append((copied + len(extra) + extras, more))
            copies += 0 if exact >> index & 1 else copy
            extras += more
        control += record[:r]
        diff += record[r : r + copies]
        extra += record[r + copies : r + copies + extras]
        entries += count
    return {
        "filters": "+".join(n for bit, n in FILTER_NAMES.items() if filters & bit) or "none",
        "reloc_map": maps[0],
        "value_map": maps[1],
        "prelude": len(prelude),
        "entries": entries,
        "seeks": seeks,
        "copied": copied,
        "literal_runs": runs,
        "control": bytes(control),
        "diff": bytes(diff),
        "extra": bytes(extra),
        "window_log": header.window_log,
    }


def _z(data: bytes, window_log: int, dictionary: bytes | None = None) -> int:
    if not data:
        return 0
    params = zstandard.ZstdCompressionParameters.from_level(
        19, window_log=window_log, source_size=len(data)
    )
    dict_data = (
        zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        if dictionary
        else None
    )
    return len(
        zstandard.ZstdCompressor(compression_params=params, dict_data=dict_data).compress(data)
    )


def extra_in_old(old: bytes, new: bytes, patch: bytes) -> int:
    """Literal bytes of the patch covered by a PROBE-byte window that also occurs in ``old``."""
    windows = {old[i : i + PROBE] for i in range(0, max(0, len(old) - PROBE + 1))}
    covered = bytearray(len(new))  # 1 where a literal byte is explained by an old window
    runs: list[tuple[int, int]] = walk(patch, old)["literal_runs"]
    for start, size in runs:
        for i in range(start, start + size - PROBE + 1):
            if new[i : i + PROBE] in windows:
                covered[i : i + PROBE] = b"\x01" * PROBE
    return sum(covered[s : s + n].count(1) for s, n in runs)


def anatomy(old: bytes, new: bytes) -> dict:
    """The figures of the module docstring for one pair."""
    patch = delta.make_patch(old, new)
    parts = walk(patch, old)
    window_log = parts["window_log"]
    diff = parts["diff"]
    return {
        "patch": len(patch),
        "filters": parts["filters"],
        "reloc_map": parts["reloc_map"],
        "value_map": parts["value_map"],
        "prelude": parts["prelude"],
        "entries": parts["entries"],
        "seeks": parts["seeks"],
        "copy_bytes": parts["copied"],
        "diff_nonzero": len(diff) - diff.count(0),
        "extra_bytes": len(parts["extra"]),
        "ctrl_z": _z(parts["control"], window_log),
        "diff_z": _z(diff, window_log),
        "extra_z": _z(parts["extra"], window_log),
        "extra_z_dict": _z(parts["extra"], 27, old),
        "extra_in_old": extra_in_old(old, new, patch),
        "win20": len(delta.make_patch(old, new, window_log=20)),
        "new_z": _z(new, 27),
        "streams_apart": delta.read_header(patch).size
        + parts["prelude"]
        + _z(parts["control"], window_log)
        + _z(diff, window_log)
        + _z(parts["extra"], window_log),
    }


def filter_sweep(old: bytes, new: bytes) -> dict[str, int]:
    """Our patch size with every filter set forced."""
    names = {0: "none", 1: "thumb", 5: "thumb+words", 4: "words", 2: "x86", 6: "x86+words"}
    return {f"f:{names[f]}": len(delta.make_patch(old, new, filters=f)) for f in delta.AUTO_FILTERS}


COLUMNS = (
    ("patch", "patch"),
    ("filters", "filters"),
    ("entries", "entries"),
    ("copy_bytes", "copied"),
    ("diff_nonzero", "diff ≠ 0"),
    ("extra_bytes", "literal"),
    ("extra_in_old", "literal in old"),
    ("ctrl_z", "ctrl z"),
    ("diff_z", "diff z"),
    ("extra_z", "literal z"),
    ("extra_z_dict", "literal z, old as dict"),
    ("win20", "window 2^20"),
    ("streams_apart", "streams apart"),
    ("new_z", "new alone z"),
)


def markdown(rows: dict[str, dict]) -> str:
    """One line per pair, the columns above."""
    lines = [
        "| pair | class | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for pair, row in rows.items():
        lines.append(
            f"| {pair} | {row['class']} | " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |"
        )
    sweeps = {pair: row for pair, row in rows.items() if "f:none" in row}
    if sweeps:
        keys = [k for k in next(iter(sweeps.values())) if k.startswith("f:")]
        lines += ["", "| pair | chosen | " + " | ".join(k[2:] for k in keys) + " |"]
        lines.append("|---|---|" + "---:|" * len(keys))
        for pair, row in sweeps.items():
            best = min(row[k] for k in keys)
            cells = [f"**{row[k]}**" if row[k] == best else str(row[k]) for k in keys]
            lines.append(f"| {pair} | {row['filters']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure every pair (or --pairs) and write the json and markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=HERE / "corpus-public")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="public-anatomy")
    parser.add_argument("--pairs", nargs="*")
    parser.add_argument(
        "--filter-sweep", action="store_true", help="also make the patch with each filter set"
    )
    parser.add_argument(
        "--merge", action="store_true", help="keep the other pairs already in <name>.json"
    )
    args = parser.parse_args()
    manifest = json.loads((args.corpus / "manifest.json").read_text())
    rows: dict[str, dict] = {}
    for pair in args.pairs or list(manifest):
        old = (args.corpus / pair / "old.bin").read_bytes()
        new = (args.corpus / pair / "new.bin").read_bytes()
        rows[pair] = {"class": manifest[pair].get("class", ""), **anatomy(old, new)}
        if args.filter_sweep:
            rows[pair].update(filter_sweep(old, new))
        print(pair, json.dumps(rows[pair]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{args.name}.json"
    if args.merge and json_path.exists():
        kept = json.loads(json_path.read_text())
        kept.update(rows)
        rows = {pair: kept[pair] for pair in manifest if pair in kept}
    json_path.write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
