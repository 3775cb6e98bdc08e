"""The maker's strategy search (otacore.delta_strategy) and the family detector (issue 18).

The search makes the first ``effort`` strategies in full and keeps the smallest patch: it is
never larger than the detector's choice alone, it makes exactly as many as its budget allows
(counted, never timed), and every patch it keeps applies byte-exact, whole and streamed. The
detector takes a family only when branches share targets, as real code's do.
"""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from otacore import delta, delta_family, delta_maker, delta_strategy
from otacore.delta import FILTER_THUMB, FILTER_WORDS, FILTER_X86, PatchInputError
from otacore.delta_stream import PatchApplier
from otacore.errors import ValidationError
from server.cli import server_cmd
from server.cli.delta_cmd import app
from server.devices.delivery import OtaConfig
from server.devices.deltas import DeltaCache
from server.events import EventBus
from server.fleet import Fleet
from server.store import Store
from tests.server_cli_capture import capture_server_configs
from tests.test_delta import relinked_firmware, thumb_image


def _apply_streamed(old: bytes, patch: bytes, piece: int = 997) -> bytes:
    sink = io.BytesIO()
    applier = PatchApplier(io.BytesIO(old), sink)
    for at in range(0, len(patch), piece):
        applier.feed(patch[at : at + piece])
    applier.finish()
    return sink.getvalue()


def _applies(old: bytes, new: bytes, patch: bytes) -> bool:
    return delta.apply_patch(old, patch) == new and _apply_streamed(old, patch) == new


def data_container(seed: int, size: int = 120_000) -> bytes:
    """A vendor-blob-like container: records of a header (E8/E9 type bytes, small lengths
    and offsets) and table data of small integers. Many E8/E9 bytes are followed by a small
    little-endian number, a rel32 that lands inside the image; no two land on one spot."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += bytes((rng.choice((0xE8, 0xE9)),))
        out += struct.pack("<I", rng.randrange(16, 4096))  # record length: lands inside
        out += bytes(rng.randrange(0, 8) for _ in range(rng.randrange(8, 64)))
        out += rng.randbytes(rng.randrange(16, 96))
    return bytes(out[:size])


def _old_detector_counts(image: bytes) -> int:
    """x86 CALL/JMP rel32 targets merely inside the image: what the detector counted before."""
    count = 0
    for at in range(len(image) - 4):
        if image[at] in (0xE8, 0xE9):
            (rel,) = struct.unpack_from("<i", image, at + 1)
            count += 0 <= at + 5 + rel < len(image)
    return count


def x86_code(seed: int, size: int = 40_000, functions: int = 80) -> bytes:
    """Bytes standing in for x86 code: CALLs every ~30 bytes to a set of function entries."""
    rng = random.Random(seed)
    image = bytearray(rng.randbytes(size))
    entries = rng.sample(range(size), functions)
    for at in range(0, size - 5, rng.randrange(24, 36)):
        image[at] = 0xE8
        struct.pack_into("<i", image, at + 1, rng.choice(entries) - at - 5)
    return bytes(image)


def edited(data: bytes, seed: int, edits: int = 40) -> bytes:
    """``data`` with bytes changed, inserted and deleted at random places."""
    rng = random.Random(seed)
    out = bytearray(data)
    for _ in range(edits):
        at = rng.randrange(len(out) + 1)
        action = rng.randrange(3)
        if action == 0:
            out[at : at + 8] = rng.randbytes(8)
        elif action == 1:
            out[at:at] = rng.randbytes(rng.randrange(1, 40))
        else:
            del out[at : at + rng.randrange(1, 40)]
    return bytes(out)


def test_data_containers_are_not_taken_for_x86_code_but_code_still_is() -> None:
    container = data_container(1)
    assert _old_detector_counts(container) >= 100  # the old rule called this x86
    assert delta_family.branch_scores(container) == (0, 0)
    assert delta_family.detect_family(container) == 0
    assert delta_family.detect_family(random.Random(2).randbytes(200_000)) == 0
    assert delta_family.detect_family(bytes(200_000)) == 0
    assert delta_family.detect_family(b"\xe8\x00\x00\x00\x00" * 20_000) == 0  # distinct targets
    assert delta_family.detect_family(x86_code(3)) == FILTER_X86
    assert delta_family.detect_family(relinked_firmware(4)[0]) == FILTER_THUMB


def test_strategy_order_puts_the_detector_first_and_covers_every_filter_set() -> None:
    for family, scores in [(FILTER_THUMB, (500, 3)), (0, (0, 0)), (FILTER_X86, (2, 900))]:
        order = delta_strategy.strategy_order(family, scores)
        assert order[0] is delta_strategy.AUTO
        assert len(order) == delta_strategy.MAX_EFFORT
        # Every filter set is there but the one AUTO makes itself (the family with pointers).
        assert sorted(order[1:]) == sorted(set(delta.AUTO_FILTERS) - {family | FILTER_WORDS})
        assert order[1] == family  # the family's other set comes next
    assert delta_strategy.strategy_order(0, (0, 40))[2:4] == [FILTER_X86 | FILTER_WORDS, FILTER_X86]


def test_the_search_makes_exactly_its_budget_and_keeps_the_first_smallest() -> None:
    sizes = {None: 50, 0: 40, 1: 40, 2: 10, 4: 70, 5: 60}
    order = [None, 0, 1, 4, 5, 2]
    for effort in range(1, delta_strategy.MAX_EFFORT + 1):
        made: list[delta_strategy.Strategy] = []

        def make(
            strategy: delta_strategy.Strategy, made: list[delta_strategy.Strategy] = made
        ) -> bytes:
            made.append(strategy)
            return bytes(sizes[strategy])

        result = delta_strategy.search(order, effort, make)
        assert made == order[:effort]
        assert [s for s, _ in result.tried] == order[:effort]
        best = min(sizes[s] for s in order[:effort])
        assert len(result.patch) == best
        assert result.strategy == next(s for s in order[:effort] if sizes[s] == best)


def test_small_images_get_more_strategies_within_the_same_budget() -> None:
    unit, most = delta_strategy.EFFORT_UNIT, delta_strategy.MAX_EFFORT
    for effort in range(1, most + 1):
        # An image of a unit or more gets exactly its effort; effort 1 is always one strategy.
        assert delta_strategy.strategies_for(effort, unit) == effort
        assert delta_strategy.strategies_for(effort, 10 * unit) == effort
        assert delta_strategy.strategies_for(1, 1) == 1
    # Below a unit, as many makes as fit into effort * unit bytes, never more than all six.
    assert delta_strategy.strategies_for(2, unit // 2) == 4
    assert delta_strategy.strategies_for(2, unit // 2 + 1) == 3
    assert delta_strategy.strategies_for(2, unit // 3) == most
    assert delta_strategy.strategies_for(3, 0) == most
    for size in (1, 1000, unit // 2, unit - 1, unit, 3 * unit):
        counts = [delta_strategy.strategies_for(e, size) for e in range(1, most + 1)]
        assert counts == sorted(counts) and counts[-1] == most  # more effort, never fewer
        # The budget holds: the strategies beyond the effort fit into effort * unit bytes.
        assert all(c == e or c * size <= e * unit for e, c in enumerate(counts, 1))
    with pytest.raises(delta.PatchInputError):
        delta_strategy.strategies_for(0, unit)


def test_a_small_image_searches_every_strategy_at_the_default_effort(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The search makes strategies_for(effort, size) strategies: all six for a small pair at
    the default effort, the effort's two once the unit is no larger than the pair."""
    old, new = PAIRS["x86 code"]()
    size = max(len(old), len(new))
    assert size <= delta_strategy.EFFORT_UNIT // 3
    result = delta_maker.search_patch(old, new)
    assert len(result.tried) == delta_strategy.MAX_EFFORT
    assert _applies(old, new, result.patch)
    monkeypatch.setattr(delta_strategy, "EFFORT_UNIT", size)
    budgeted = delta_maker.search_patch(old, new)
    assert budgeted.tried == result.tried[: delta_strategy.DEFAULT_EFFORT]
    assert len(result.patch) <= len(budgeted.patch)


@pytest.mark.parametrize("effort", [0, 7, -1, True, 2.0, "2"])
def test_an_effort_outside_the_range_is_refused_with_the_range(effort: object) -> None:
    with pytest.raises(
        PatchInputError, match="effort must be a whole number of strategies from 1 to 6"
    ):
        delta_maker.search_patch(b"old", b"new", effort=effort)  # type: ignore[arg-type]
    with pytest.raises(PatchInputError, match="from 1 to 6"):
        delta.make_patch(b"old", b"new", effort=effort)  # type: ignore[arg-type]


PAIRS = {
    "thumb relinked": lambda: relinked_firmware(6),
    "data container": lambda: (data_container(7), edited(data_container(7), 8)),
    "x86 code": lambda: (x86_code(9), edited(x86_code(9), 10)),
    "unrelated": lambda: (random.Random(11).randbytes(5000), random.Random(12).randbytes(6000)),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_more_effort_is_never_larger_and_every_kept_patch_applies(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Effort counted in strategies whatever the image size (these images are small enough to
    # get all six at every effort above 1 otherwise; test_small_images_get_more_strategies).
    monkeypatch.setattr(delta_strategy, "EFFORT_UNIT", 1)
    old, new = PAIRS[name]()
    alone = delta_maker.search_patch(old, new, effort=1)
    assert alone.strategy is delta_strategy.AUTO and len(alone.tried) == 1
    full = delta_maker.search_patch(old, new, effort=delta_strategy.MAX_EFFORT)
    assert len(full.tried) == delta_strategy.MAX_EFFORT
    assert full.tried[0] == alone.tried[0]
    previous = alone.tried[0][1]
    for effort in range(1, delta_strategy.MAX_EFFORT + 1):
        result = delta_maker.search_patch(old, new, effort=effort)
        # Sharing pass 1 between strategies changes nothing: the same sizes as the full search.
        assert result.tried == full.tried[:effort]
        # Strategies compete on their zstd patch; the codec step (otacore.delta_codec) then
        # re-encodes the winner and keeps the smaller, so the result never exceeds it.
        winner = min(size for _, size in full.tried[:effort])
        assert winner <= previous and len(result.patch) <= winner
        assert _applies(old, new, result.patch)
        previous = winner
    # The kept strategy made alone (filters forced) gives the same bytes.
    if full.strategy is not delta_strategy.AUTO:
        forced = delta_maker.search_patch(old, new, filters=full.strategy)
        assert forced.patch == full.patch and len(forced.tried) == 1


def test_the_search_beats_a_wrong_family_guess() -> None:
    """The data container matched as x86 (the old detector's guess) costs several times what
    the search keeps; on the x86-like pair, whose inserted bytes break the CALL model, the
    default effort reaches the plain family, which the detector's choice alone does not."""
    old, new = PAIRS["data container"]()
    kept = delta.make_patch(old, new)
    as_x86 = delta.make_patch(old, new, filters=FILTER_X86 | FILTER_WORDS)
    assert 2 * len(kept) < len(as_x86)
    assert _applies(old, new, as_x86)
    old, new = PAIRS["x86 code"]()
    order = delta_maker.search_patch(old, new, effort=delta_strategy.MAX_EFFORT).tried
    assert [s for s, _ in order[:3]] == [delta_strategy.AUTO, FILTER_X86, FILTER_WORDS]
    # (zstd alone: with the old image as a zstd dictionary, codec 2, even the wrong family's
    # payload of this small pair gets most of it back, which would hide what the search does)
    plain = (delta.CODEC_ZSTD,)
    assert 2 * len(delta.make_patch(old, new, effort=3, codecs=plain)) < len(
        delta.make_patch(old, new, effort=1, codecs=plain)
    )
    assert (
        delta.make_patch(old, new)
        == delta_maker.search_patch(old, new, effort=delta_strategy.DEFAULT_EFFORT).patch
    )


@st.composite
def adversarial_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """Random bytes, branch-like patterns that share targets or not, zero runs, and edits."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    size = draw(st.integers(0, 6000))
    kind = draw(st.sampled_from(["random", "x86", "thumb", "container", "zeros", "bl-same"]))
    if kind == "random":
        old = rng.randbytes(size)
    elif kind == "x86":
        old = x86_code(seed, max(size, 64), functions=rng.randrange(1, 20))
    elif kind == "thumb":
        old = bytes(thumb_image(rng, size))
    elif kind == "container":
        old = data_container(seed, max(size, 16))
    elif kind == "zeros":
        old = bytes(size)
    else:  # the same BL pair everywhere: every target distinct, never a family
        old = struct.pack("<HH", 0xF000, 0xF800) * (size // 4)
    new = edited(old, seed + 1, rng.randrange(0, 12)) if old else rng.randbytes(rng.randrange(64))
    if draw(st.booleans()):
        new = new + draw(st.binary(max_size=64))
    return old, new


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=adversarial_pairs(), effort=st.integers(1, delta_strategy.MAX_EFFORT))
def test_fuzzed_pairs_through_the_search_apply_and_never_grow(
    pair: tuple[bytes, bytes], effort: int
) -> None:
    old, new = pair
    family = delta_family.detect_family(old)
    assert family in (0, FILTER_THUMB, FILTER_X86)
    result = delta_maker.search_patch(old, new, effort=effort, block_limit=1024)
    assert len(result.tried) == delta_strategy.strategies_for(effort, max(len(old), len(new)))
    assert _applies(old, new, result.patch)
    alone = delta_maker.search_patch(old, new, effort=1, block_limit=1024)
    assert len(result.patch) <= len(alone.patch)
    assert delta_maker.search_patch(old, new, effort=effort, block_limit=1024) == result


def test_ota_delta_make_takes_effort_and_reports_what_it_tried(tmp_path: Path) -> None:
    old, new = PAIRS["data container"]()
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    runner = CliRunner()
    made = runner.invoke(
        app,
        [
            "make",
            str(tmp_path / "old"),
            str(tmp_path / "new"),
            str(tmp_path / "p"),
            "--effort",
            "3",
        ],
    )
    assert made.exit_code == 0, made.output
    expected = delta_maker.search_patch(old, new, effort=3)
    assert (tmp_path / "p").read_bytes() == expected.patch
    assert f"strategy {delta_strategy.strategy_name(expected.strategy)} of 3 tried" in made.output
    applied = runner.invoke(
        app, ["apply", str(tmp_path / "old"), str(tmp_path / "p"), str(tmp_path / "out")]
    )
    assert applied.exit_code == 0, applied.output
    assert (tmp_path / "out").read_bytes() == new
    refused = runner.invoke(
        app,
        [
            "make",
            str(tmp_path / "old"),
            str(tmp_path / "new"),
            str(tmp_path / "q"),
            "--effort",
            "7",
        ],
    )
    assert refused.exit_code == 2 and not (tmp_path / "q").exists()


def test_the_server_setting_reaches_the_delta_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = capture_server_configs(monkeypatch)
    runner = CliRunner()
    given_option = runner.invoke(
        server_cmd.app, ["server", "--data", str(tmp_path), "--delta-effort", "5"]
    )
    assert given_option.exit_code == 0, given_option.output
    assert captured[-1].ota.delta_effort == 5  # type: ignore[attr-defined]
    from_file = runner.invoke(
        server_cmd.app, ["server", "--data", str(tmp_path), "--set", "delivery.delta_effort=1"]
    )
    assert from_file.exit_code == 0, from_file.output
    assert captured[-1].ota.delta_effort == 1  # type: ignore[attr-defined]
    assert OtaConfig().delta_effort == delta_strategy.DEFAULT_EFFORT
    for wrong in (0, 7):
        with pytest.raises(ValidationError, match="delta_effort must be a whole number"):
            OtaConfig(delta_effort=wrong)
    refused = runner.invoke(
        server_cmd.app, ["server", "--data", str(tmp_path), "--set", "delivery.delta_effort=9"]
    )
    assert refused.exit_code == 2, refused.output
    assert "delta_effort" in refused.output


async def test_the_server_delta_cache_makes_its_patches_at_its_effort(sqlite_store: Store) -> None:
    """A real store and fleet: the patch the server computes and stores is the search's at
    the cache's effort, and more effort stores a smaller one for the same images."""
    old, new = PAIRS["x86 code"]()
    stored_sizes = []
    for effort, base in ((1, "a"), (3, "b")):
        # zstd-plain: codec 2 would rescue effort 1 on this small pair (see above)
        cache = DeltaCache(Fleet(sqlite_store, EventBus()), effort=effort, codec="zstd-plain")
        base_sha, target_sha = base * 64, "c" * 64  # distinct pairs: nothing shared
        found = await cache.patch_for(base_sha, old, target_sha, new)
        assert found is not None and cache.computed == 1
        stored, patch = found
        assert patch == delta.make_patch(old, new, effort=effort, codecs=(delta.CODEC_ZSTD,))
        assert stored.patch_size == len(patch) and _applies(old, new, patch)
        stored_sizes.append(stored.patch_size)
    assert 2 * stored_sizes[1] < stored_sizes[0]
