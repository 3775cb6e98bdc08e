"""How the version-3 test vectors here were made: at commit ad8af09, the last whose maker
wrote at most format version 3 (today's maker writes version 4, control entries in columns),
from the repository root of that commit: ``python tests/data/delta-v3/make_v3_vector.py``.

exact.otad / exact-zstd.otad: tests/data/delta-v2's pair, which makes exact copies (prelude
bit 5), with LZMA2 and with zstd. thumb-calls.otad: tests/data/delta-v2-thumb-calls's pair,
Thumb-2 + pointer filters with the Thumb-2 literal branch conversion (prelude bits 0-4).
dense.otad: sparse.old.bin / sparse.new.bin (16 KB, one byte changed every 48-200 bytes,
seed 7) with a 4 KiB window and zstd, which makes the dense form (every zero run of 2 bytes or more
an exact copy).
"""

import random
import sys
from pathlib import Path

sys.path[:0] = ["."]
from otacore import delta  # noqa: E402
from otacore.delta_stream import decode_payload  # noqa: E402

here = Path("tests/data/delta-v3")
v2, calls = Path("tests/data/delta-v2"), Path("tests/data/delta-v2-thumb-calls")
rng = random.Random(7)
sparse_old = rng.randbytes(16 * 1024)
sparse_new = bytearray(sparse_old)
at = rng.randrange(48, 200)
while at < len(sparse_new):
    sparse_new[at] ^= 1 + rng.randrange(255)
    at += rng.randrange(48, 200)
(here / "sparse.old.bin").write_bytes(sparse_old)
(here / "sparse.new.bin").write_bytes(bytes(sparse_new))
pairs = {
    "exact.otad": (v2, {}),
    "exact-zstd.otad": (v2, {"codecs": (delta.CODEC_ZSTD,)}),
    "thumb-calls.otad": (calls, {}),
    "dense.otad": (here, {"window_log": 12, "codecs": (delta.CODEC_ZSTD,)}),
}
for name, (folder, options) in pairs.items():
    prefix = "sparse." if folder == here else ""
    old = (folder / f"{prefix}old.bin").read_bytes()
    new = (folder / f"{prefix}new.bin").read_bytes()
    patch = delta.make_patch(old, new, **options)
    header, payload = decode_payload(patch, old=old)
    flags, _ = delta.read_varint(payload, delta.read_varint(payload, 0)[1])
    assert header.version == 3 and delta.apply_patch(old, patch) == new, name
    (here / name).write_bytes(patch)
    print(name, len(patch), delta.CODEC_NAMES[header.codec], f"prelude flags {flags:#b}")
