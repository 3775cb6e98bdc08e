"""Cost-based covers in the literal gaps (ext/delta_match.h ``ota_cover_gaps``, twin
``otacore/_delta_py.py: cover_gaps``): the twins agree, the result is a valid cover that keeps
the scan's spans, the cost rule takes what pays and leaves what does not, patches shrink."""

from __future__ import annotations

import random
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacore import delta, delta_codec, delta_maker
from tests.test_delta import KERNELS, NATIVE, TWIN, image_pairs, needs_native

costs = delta_maker.literal_costs


def _check_cover(spans: np.ndarray, given_spans: np.ndarray, old_n: int, new_n: int) -> None:
    """``spans`` is ordered, inside both images, and keeps every given span on its diagonal."""
    end = 0
    for new_pos, old_pos, length in spans.tolist():
        assert length > 0 and new_pos >= end and old_pos >= 0
        assert new_pos + length <= new_n and old_pos + length <= old_n
        end = new_pos + length
    for new_pos, old_pos, length in given_spans.tolist():
        if length == 0:
            continue
        holder = [
            row
            for row in spans.tolist()
            if row[0] <= new_pos and new_pos + length <= row[0] + row[2]
        ]
        assert holder and holder[0][1] - holder[0][0] == old_pos - new_pos


@st.composite
def arbitrary_spans(draw: st.DrawFn, old_n: int, new_n: int) -> np.ndarray:
    """Any valid ordered, non-overlapping spans (not only what the scan would give)."""
    rows, at = [], 0
    for _ in range(draw(st.integers(0, 6))):
        if at >= new_n or old_n == 0:
            break
        new_pos = draw(st.integers(at, new_n - 1))
        length = draw(st.integers(0, min(new_n - new_pos, old_n, 200)))
        old_pos = draw(st.integers(0, old_n - length))
        rows.append((new_pos, old_pos, length))
        at = new_pos + length
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


@st.composite
def mosaic_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """Adversarial pairs for the cover rule: new is short chunks of old (4-40 bytes, some
    with bytes changed) between random bytes, runs and periodic patterns present in both."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    old = bytearray(rng.randbytes(draw(st.integers(0, 2500))))
    if old and rng.random() < 0.5:  # runs and a period-2 pattern in old as well
        at = rng.randrange(len(old))
        old[at:at] = b"\xff" * rng.randrange(1, 600) + b"\x01\x02" * rng.randrange(1, 300)
    new = bytearray()
    for _ in range(rng.randrange(0, 40)):
        roll = rng.random()
        if roll < 0.5 and old:
            at = rng.randrange(len(old))
            chunk = bytearray(old[at : at + rng.randrange(4, 41)])
            for k in range(0, len(chunk), rng.randrange(3, 12)):
                if rng.random() < 0.3:
                    chunk[k] ^= 1 + rng.randrange(255)
            new += chunk
        elif roll < 0.7:
            new += bytes([rng.randrange(256)]) * rng.randrange(1, 400)
        elif roll < 0.8:
            new += b"\x01\x02" * rng.randrange(1, 200)
        else:
            new += rng.randbytes(rng.randrange(1, 60))
    return bytes(old), bytes(new)


@needs_native
@settings(max_examples=150, deadline=None)
@given(st.one_of(image_pairs(2000), mosaic_pairs()), st.data())
def test_native_and_twin_cover_the_same(pair: tuple[bytes, bytes], data: st.DataObject) -> None:
    assert NATIVE is not None
    old, new = pair
    sa = NATIVE.suffix_array(old)
    seed = data.draw(st.integers(0, 2**32))
    # The maker's estimate, or any costs at all (0 and 255 included).
    literal = data.draw(
        st.sampled_from(
            [
                costs(new),
                np.frombuffer(random.Random(seed).randbytes(len(new)), dtype=np.uint8),
                np.full(len(new), data.draw(st.sampled_from([0, 1, 16, 255])), dtype=np.uint8),
            ]
        )
    )
    for given_spans in (
        NATIVE.find_matches(old, new, sa, 16, 2),
        np.empty((0, 3), dtype=np.int64),
        data.draw(arbitrary_spans(len(old), len(new))),
    ):
        ours = NATIVE.cover_gaps(old, new, sa, given_spans, literal)
        assert np.array_equal(ours, TWIN.cover_gaps(old, new, sa, given_spans, literal))
        _check_cover(ours, given_spans, len(old), len(new))


def _seeded(seed: int) -> random.Random:
    print(f"seed {seed}")
    return random.Random(seed)


@pytest.mark.parametrize("module", KERNELS)
def test_a_paying_match_in_a_gap_is_taken_and_extended(module: ModuleType) -> None:
    rng = _seeded(11)
    old = bytearray(rng.randbytes(4000))
    block = bytearray(old[1000:1064])
    block[40] ^= 0x5A  # one wrong byte: the cover runs through it (approximate extension)
    new = rng.randbytes(300) + bytes(block) + rng.randbytes(300)
    sa = module.suffix_array(bytes(old))
    none = np.empty((0, 3), dtype=np.int64)
    spans = module.cover_gaps(bytes(old), new, sa, none, costs(new)).tolist()
    assert [300, 1000, 64] in spans


@pytest.mark.parametrize("module", KERNELS)
def test_matches_that_do_not_pay_stay_literal(module: ModuleType) -> None:
    rng = _seeded(12)
    old = rng.randbytes(60000)
    # A 5-byte match far away costs a control entry of about 5 bytes: more than it saves.
    new = rng.randbytes(200) + old[50000:50005] + rng.randbytes(200)
    # A long run present in both: literal runs cost zstd next to nothing.
    old_run = old[:30000] + b"\xee" * 3000 + old[30000:]
    new_run = rng.randbytes(100) + b"\xee" * 2000 + rng.randbytes(100)
    none = np.empty((0, 3), dtype=np.int64)
    short = module.cover_gaps(old, new, module.suffix_array(old), none, costs(new))
    assert not any(row[0] <= 200 < row[0] + row[2] for row in short.tolist())
    run = module.cover_gaps(old_run, new_run, module.suffix_array(old_run), none, costs(new_run))
    assert not any(row[0] <= 1100 < row[0] + row[2] for row in run.tolist())


@pytest.mark.parametrize("module", KERNELS)
def test_a_match_on_the_last_spans_diagonal_extends_it(module: ModuleType) -> None:
    rng = _seeded(13)
    old = rng.randbytes(3000)
    new = bytearray(old[500:900])
    new[200:206] = rng.randbytes(6)  # a small edit: one span across it, not two entries
    sa = module.suffix_array(old)
    given_spans = np.array([[0, 500, 150]], dtype=np.int64)
    spans = module.cover_gaps(old, bytes(new), sa, given_spans, costs(bytes(new))).tolist()
    assert spans == [[0, 500, 400]]


@pytest.mark.parametrize("module", KERNELS)
def test_cover_gaps_rejects_bad_arguments(module: ModuleType) -> None:
    old, new = b"abcdefgh" * 4, b"abcdefgh" * 4
    sa = module.suffix_array(old)
    none = np.empty((0, 3), dtype=np.int64)
    for wrong in (costs(new)[:-1], np.zeros((2, len(new)), dtype=np.uint8)):
        with pytest.raises(ValueError, match="literal costs"):
            module.cover_gaps(old, new, sa, none, wrong)
    with pytest.raises(ValueError, match="overlaps"):
        module.cover_gaps(old, new, sa, np.array([[0, 0, 8], [4, 0, 4]]), costs(new))
    with pytest.raises(ValueError, match="outside"):
        module.cover_gaps(old, new, sa, np.array([[30, 0, 8]]), costs(new))
    with pytest.raises(ValueError, match="suffix array"):
        module.cover_gaps(old, new, sa[:-1], none, costs(new))


@needs_native
def test_periodic_input_is_covered_exactly() -> None:
    """Long rejected matches skip half their length: a periodic image (the scan's worst case)
    ends and is covered the same by both twins."""
    assert NATIVE is not None
    old = b"\x01\x02\x03" * 20000
    new = b"\x09" + b"\x01\x02\x03" * 15000 + b"\x07\x01\x02\x03" * 3000
    sa = NATIVE.suffix_array(old)
    none = np.empty((0, 3), dtype=np.int64)
    ours = NATIVE.cover_gaps(old, new, sa, none, costs(new))
    assert np.array_equal(ours, TWIN.cover_gaps(old, new, sa, none, costs(new)))
    _check_cover(ours, none, len(old), len(new))


#: The codec the matcher's effect is measured with (see the test below).
ZSTD_ONLY = (delta_codec.CODEC_ZSTD,)


def _without_covers(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> None:
    monkeypatch.setattr(module, "cover_gaps", lambda old, new, sa, spans, literal: spans)


@pytest.mark.parametrize("module", KERNELS)
def test_covers_shrink_a_patch_of_short_moved_pieces(
    module: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New code built from short pieces of the old (12-24 bytes, below the scan's switching
    threshold) between new bytes: the patch with covers is smaller, and applies exactly.
    Plain zstd only: codec 2 (zstd with the old image as its dictionary) would find these
    pieces itself on an image this small, which hides what the matcher does."""
    rng = _seeded(14)
    old = rng.randbytes(30000)
    new = bytearray()
    while len(new) < 12000:
        at = rng.randrange(len(old) - 24)
        new += old[at : at + rng.randrange(12, 25)] + rng.randbytes(rng.randrange(2, 10))
    monkeypatch.setattr(delta, "_kernel", module)
    with_covers = delta_maker.make_patch(old, bytes(new), effort=1, codecs=ZSTD_ONLY)
    assert delta.apply_patch(old, with_covers) == bytes(new)
    _without_covers(monkeypatch, module)
    without = delta_maker.make_patch(old, bytes(new), effort=1, codecs=ZSTD_ONLY)
    print(f"with covers {len(with_covers)} B, without {len(without)} B")
    assert len(with_covers) < 0.9 * len(without)


def _literal_costs_by_hand(new: bytes) -> list[int]:
    gram = delta_maker.REPEAT_GRAM
    seen: set[bytes] = set()
    repeated = []
    for at in range(len(new) - gram + 1):
        repeated.append(new[at : at + gram] in seen)
        seen.add(new[at : at + gram])
    out = []
    for at in range(len(new)):
        cost = delta_maker.LITERAL_COST
        if any(repeated[max(0, at - gram + 1) : at + 1]):
            cost = delta_maker.REPEAT_COST
        if at and new[at] == new[at - 1]:
            cost = delta_maker.RUN_COST
        out.append(cost)
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=80), st.lists(st.sampled_from(b"ab\x00"), max_size=80).map(bytes)
    )
)
def test_literal_costs_follow_runs_and_earlier_repeats(new: bytes) -> None:
    assert costs(new).tolist() == _literal_costs_by_hand(new)
    assert costs(new).dtype == np.uint8
    for module in (TWIN, NATIVE):
        if module is not None:
            assert module.literal_costs(
                new, delta_maker.LITERAL_COST, delta_maker.RUN_COST, delta_maker.REPEAT_COST
            ).tolist() == _literal_costs_by_hand(new)


def _repetitive_images(draw: st.DrawFn) -> bytes:
    """Images up to ~40 KB whose 8-byte strings repeat a lot: a few random pieces (some a
    few bytes apart from each other) copied all over, periodic runs, one byte everywhere."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    kind = draw(st.sampled_from(["pieces", "periodic", "constant", "random"]))
    size = draw(st.integers(0, 40_000))
    if kind == "constant":
        return bytes([rng.randrange(256)]) * size
    if kind == "periodic":
        period = rng.randrange(1, 24)
        unit = rng.randbytes(period)
        return (unit * (size // period + 1))[:size]
    if kind == "random":
        return rng.randbytes(size)
    pieces = [rng.randbytes(rng.randrange(1, 40)) for _ in range(rng.randrange(1, 12))]
    out = bytearray()
    while len(out) < size:
        piece = bytearray(rng.choice(pieces))
        if piece and rng.random() < 0.3:
            piece[rng.randrange(len(piece))] ^= 1 << rng.randrange(8)
        out += piece
    return bytes(out[:size])


@needs_native
@settings(max_examples=120, deadline=None)
@given(st.composite(_repetitive_images)(), st.tuples(*[st.integers(0, 255)] * 3))
def test_native_and_twin_cost_literals_the_same(
    new: bytes, figures: tuple[int, int, int]
) -> None:
    """The kernel's hash table and the twin's sort find the same earlier strings, for any
    costs (the kernel's hash is seeded per call: two calls must agree too)."""
    assert NATIVE is not None
    literal, run, repeat = figures
    print(f"{len(new)} bytes, costs {figures}")
    expected = TWIN.literal_costs(new, literal, run, repeat)
    assert NATIVE.literal_costs(new, literal, run, repeat).tolist() == expected.tolist()
    assert NATIVE.literal_costs(memoryview(new), literal, run, repeat).tolist() == expected.tolist()


@pytest.mark.parametrize("module", KERNELS)
@pytest.mark.parametrize("figures", [(-1, 1, 6), (10, 256, 6), (10, 1, 1000)])
def test_literal_costs_outside_a_byte_are_refused(
    module: ModuleType, figures: tuple[int, int, int]
) -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.255"):
        module.literal_costs(b"firmware", *figures)


@needs_native
def test_sparse_agreement_on_one_diagonal_is_priced_per_candidate() -> None:
    """A long gap where the previous span's diagonal agrees only in 4-byte islands: every
    island is a candidate join; the bridge priced is at most 511 bytes (HDiffPatch's link
    bound), so the work stays linear, and both twins give the same valid cover."""
    assert NATIVE is not None
    rng = _seeded(15)
    old = rng.randbytes(40000)
    grown = bytearray(old[:1000])
    for at in range(1000, 30000, 50):
        grown += rng.randbytes(46) + old[at + 46 : at + 50]
    new = bytes(grown)
    sa = NATIVE.suffix_array(old)
    given_spans = np.array([[0, 0, 1000]], dtype=np.int64)
    ours = NATIVE.cover_gaps(old, new, sa, given_spans, costs(new))
    assert np.array_equal(ours, TWIN.cover_gaps(old, new, sa, given_spans, costs(new)))
    _check_cover(ours, given_spans, len(old), len(new))
    assert ours.tolist()[0] == [0, 0, 1000]  # islands 46 bytes apart do not pay for a bridge


@needs_native
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_native_and_twin_cost_large_images_the_same(seed: int) -> None:
    """Images of a few hundred KB, half repeats of earlier pieces, half fresh bytes: the
    kernel's table grows past its first sizes and still finds exactly the twin's repeats."""
    rng = random.Random(seed)
    print(f"seed {seed}")
    out = bytearray(rng.randbytes(4096))
    while len(out) < 300_000:
        if rng.random() < 0.5:
            at = rng.randrange(len(out) - 64)
            out += out[at : at + rng.randrange(1, 64)]
        else:
            out += rng.randbytes(rng.randrange(1, 64))
    new = bytes(out)
    expected = TWIN.literal_costs(new, 10, 1, 6)
    assert NATIVE is not None
    assert NATIVE.literal_costs(new, 10, 1, 6).tolist() == expected.tolist()
    assert (expected == 6).sum() > len(new) // 4  # the image does repeat itself
