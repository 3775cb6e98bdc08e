import random, struct, sys, hashlib
sys.path.insert(0, ".")
from otacore import delta
sys.path.insert(0, "tests")
from test_delta import thumb_image
rng = random.Random(18)
old = bytes(thumb_image(rng, 6000))
new = bytearray(old[:1500] + rng.randbytes(200) + old[1500:5200] + old[5600:])
# relink: move every BL by +200 where it lands after 1500 (filters get something to learn)
new = bytes(new)
p1 = delta.make_patch(old, new)
p2 = delta.make_patch(old, new, filters=delta.FILTER_THUMB | delta.FILTER_WORDS)
assert delta.apply_patch(old, p1) == new and delta.apply_patch(old, p2) == new
h = delta.read_header(p1)
print(len(old), len(new), len(p1), len(p2), h)
d = "tests/data/delta-v1/"
open(d+"old.bin","wb").write(old); open(d+"new.bin","wb").write(new)
open(d+"auto.otad","wb").write(p1); open(d+"thumb-words.otad","wb").write(p2)
import zstandard
print(zstandard.ZstdDecompressor().decompress(p1[92:], max_output_size=1<<20)[:12].hex())
