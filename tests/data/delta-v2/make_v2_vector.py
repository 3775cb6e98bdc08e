"""How the version-2 test vectors here were made: at commit 379ad81, the last whose maker
wrote only format version 2 (today's maker writes version 3 when a copy has a long run of
unchanged bytes), from the repository root of that commit:
``OTA_PURE_PYTHON=1 python tests/data/delta-v2/make_v2_vector.py``.

old.bin / new.bin: the version-1 vector's pair (tests/data/delta-v1). One patch per codec:
zstd.otad (codec 0), lzma2.otad (codec 1), zstd-old.otad (codec 2, the old image as a zstd
dictionary), and thumb-words.otad (Thumb-2 + pointer filters forced: a prelude with maps).
"""

import sys
from pathlib import Path

sys.path[:0] = ["."]
from otacore import delta  # noqa: E402

here = Path("tests/data/delta-v2")
old, new = (here / "old.bin").read_bytes(), (here / "new.bin").read_bytes()
made = {
    "zstd.otad": delta.make_patch(old, new, codecs=(delta.CODEC_ZSTD,)),
    "lzma2.otad": delta.make_patch(old, new, codecs=(delta.CODEC_LZMA2,)),
    "zstd-old.otad": delta.make_patch(old, new, codecs=(delta.CODEC_ZSTD_OLD,)),
    "thumb-words.otad": delta.make_patch(
        old, new, filters=delta.FILTER_THUMB | delta.FILTER_WORDS
    ),
}
for name, patch in made.items():
    header = delta.read_header(patch)
    assert header.version == 2 and delta.apply_patch(old, patch) == new, name
    (here / name).write_bytes(patch)
    print(name, len(patch), delta.CODEC_NAMES[header.codec])
