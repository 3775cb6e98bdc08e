"""How the version-2 test vector here was made (run from the root of a ``git archive`` of
commit 1b72a66, before format version 3, with ``OTA_PURE_PYTHON=1``: the twin, whose patches
are the kernel's byte for byte). tests/test_delta_literal.py checks that it still applies and
that today's maker, with literal branch conversion off, makes it byte for byte.

old.bin: 40 Thumb-2 functions of halfwords from a 300-word vocabulary, 20% of them BL calls
(seed 35); new.bin: 12 new functions inserted after the 13th; auto.otad: the default make.
"""

import random
from pathlib import Path

from otacore import delta


def bl(at: int, target: int) -> bytes:
    """BL at ``at`` to ``target`` (ARMv7-M ARM A7.7.18)."""
    offset = target - (at + 4)
    s, i1, i2 = (offset >> 24) & 1, (offset >> 23) & 1, (offset >> 22) & 1
    j1, j2 = (1 ^ i1) ^ s, (1 ^ i2) ^ s
    first = 0xF000 | s << 10 | (offset >> 12) & 0x3FF
    second = 0xD000 | j1 << 13 | j2 << 11 | (offset >> 1) & 0x7FF
    return first.to_bytes(2, "little") + second.to_bytes(2, "little")


rng = random.Random(35)
vocab = [(rng.randrange(0xF000) & ~1).to_bytes(2, "little") for _ in range(300)]
plans = [
    [("bl", rng.randrange(52)) if rng.random() < 0.2 else ("hw", rng.choice(vocab))
     for _ in range(rng.randrange(10, 80))]
    for _ in range(52)
]


def image(order: list[int]) -> bytes:
    starts, at = {}, 0
    for ident in order:
        starts[ident] = at
        at += sum(4 if op == "bl" else 2 for op, _ in plans[ident])
        at += at % 4
    out = bytearray()
    for ident in order:
        for op, arg in plans[ident]:
            out += bl(len(out), starts.get(arg, 0)) if op == "bl" else arg
        out += bytes(len(out) % 4)
    return bytes(out)


old = image(list(range(40)))
new = image([*range(13), *range(40, 52), *range(13, 40)])
auto = delta.make_patch(old, new)
assert delta.read_header(auto).version == 2 and delta.apply_patch(old, auto) == new
here = Path("tests/data/delta-v2-thumb-calls")
for name, data in [("old.bin", old), ("new.bin", new), ("auto.otad", auto)]:
    (here / name).write_bytes(data)
