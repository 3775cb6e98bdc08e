"""How the version-1 test vector here was made (run from the repository root at commit
9976361, the last whose maker wrote format version 1; today's maker writes version 2).

old.bin: 6000 bytes of Thumb-ish code (tests/test_delta.py's thumb_image, seed 18);
new.bin: 200 random bytes inserted at 1500 and 400 bytes cut at 5200; auto.otad: the
default make; thumb-words.otad: Thumb-2 + pointer filters forced (a prelude with maps).
"""

import random
import sys
from pathlib import Path

sys.path[:0] = [".", "tests"]
from test_delta import thumb_image  # noqa: E402

from otacore import delta  # noqa: E402

rng = random.Random(18)
old = bytes(thumb_image(rng, 6000))
new = old[:1500] + rng.randbytes(200) + old[1500:5200] + old[5600:]
auto = delta.make_patch(old, new)
forced = delta.make_patch(old, new, filters=delta.FILTER_THUMB | delta.FILTER_WORDS)
assert delta.apply_patch(old, auto) == new and delta.apply_patch(old, forced) == new
here = Path("tests/data/delta-v1")
for name, data in [("old.bin", old), ("new.bin", new), ("auto.otad", auto),
                   ("thumb-words.otad", forced)]:
    (here / name).write_bytes(data)
