"""How the version-4 test vectors here were made: with the maker held to version 4 (control
entries in columns; today's maker may write version 5, sparse columns), from the repository
root: ``python tests/data/delta-v4/make_v4_vector.py``. tests/test_delta_sparse.py checks
that they still apply and that the maker held to version 4 still makes them byte for byte.

The pairs and options are tests/data/delta-v3's (its make_v3_vector.py): exact.otad /
exact-zstd.otad (exact copies, LZMA2 and zstd), thumb-calls.otad (Thumb-2 + pointer filters
with the literal branch conversion), dense.otad (the dense form under a 4 KiB window).
"""

import sys
from pathlib import Path

sys.path[:0] = ["."]
from otacore import delta  # noqa: E402
from otacore.delta_stream import decode_payload  # noqa: E402

here = Path("tests/data/delta-v4")
v2, calls = Path("tests/data/delta-v2"), Path("tests/data/delta-v2-thumb-calls")
v3 = Path("tests/data/delta-v3")
pairs = {
    "exact.otad": (v2, "", {}),
    "exact-zstd.otad": (v2, "", {"codecs": (delta.CODEC_ZSTD,)}),
    "thumb-calls.otad": (calls, "", {}),
    "dense.otad": (v3, "sparse.", {"window_log": 12, "codecs": (delta.CODEC_ZSTD,)}),
}
for name, (folder, prefix, options) in pairs.items():
    old = (folder / f"{prefix}old.bin").read_bytes()
    new = (folder / f"{prefix}new.bin").read_bytes()
    patch = delta.make_patch(old, new, format_version=4, **options)  # type: ignore[arg-type]
    header, payload = decode_payload(patch, old=old)
    flags, _ = delta.read_varint(payload, delta.read_varint(payload, 0)[1])
    assert header.version == 4 and delta.apply_patch(old, patch) == new, name
    (here / name).write_bytes(patch)
    print(name, len(patch), delta.CODEC_NAMES[header.codec], f"prelude flags {flags:#b}")
