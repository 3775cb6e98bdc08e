"""Delta format version 3: exact copies (otacore.delta, "Exact copies").

A copy's long run of unchanged bytes becomes an entry of its own, marked exact in its
block's bitmap, with no difference bytes. What is checked: version 2 patches made before
the change still apply (tests/data/delta-v2); a patch is version 3 exactly when it uses
exact copies; splits anywhere (down to one-byte runs, under every filter set, where an
instruction straddles a split) still give the target exactly, whole and streamed, on both
kernels; every malformed bitmap, flag or version mismatch is refused with its error; fuzzed
version 3 patches fail only with DeltaError; the apply memory stays under its bound.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacore import delta, delta_codec, delta_forms, delta_maker, delta_planner, delta_stream
from otacore._select import load_native, load_twin
from otacore.delta import (
    CODEC_ZSTD,
    EXACT_COPIES,
    PatchCorruptError,
    PatchHeader,
    payload_format_version,
    put_varint,
)
from otacore.delta_stream import decode_payload, python_memory_bound
from otacore.errors import DeltaError
from tests.server_cli_capture import capture_server_configs
from tests.test_delta import image_pairs, relinked_firmware
from tests.test_delta_format_v2 import _apply_in_pieces
from tests.test_delta_strategy import PAIRS
from tests.test_delta_stream import firmware_pair, peak_during_apply

V2 = Path(__file__).parent / "data" / "delta-v2"


def _applies(old: bytes, new: bytes, patch: bytes) -> bool:
    return all(
        out == new
        for out in (delta.apply_patch(old, patch), _apply_in_pieces(old, patch, 1),
                    _apply_in_pieces(old, patch, 997))
    )


@pytest.mark.parametrize("name", ["zstd.otad", "lzma2.otad", "zstd-old.otad", "thumb-words.otad"])
def test_version_2_vectors_still_apply(name: str) -> None:
    old, new = (V2 / "old.bin").read_bytes(), (V2 / "new.bin").read_bytes()
    patch = (V2 / name).read_bytes()
    assert delta.read_header(patch).version == 2
    assert _applies(old, new, patch)


def _prelude_flags(patch: bytes, old: bytes) -> int:
    _, payload = decode_payload(patch, old=old)
    return delta.read_varint(payload, delta.read_varint(payload, 0)[1])[0]


def test_a_long_unchanged_run_makes_a_version_3_patch_and_none_a_version_2() -> None:
    old, new = firmware_pair(200_000, 11)
    patch = delta.make_patch(old, new, format_version=3)
    assert delta.read_header(patch).version == 3
    _, payload = decode_payload(patch, old=old)
    assert payload_format_version(payload) == 3
    assert _applies(old, new, patch)
    # Version 4 and 5 (the default): the same exact copies, control entries in (sparse)
    # columns.
    for version in (4, 5):
        newest = delta.make_patch(old, new, format_version=version)
        assert delta.read_header(newest).version == version
        assert _prelude_flags(newest, old) & (EXACT_COPIES | delta.COLUMNS) == (
            EXACT_COPIES | delta.COLUMNS
        )
        assert _applies(old, new, newest)
    # Nothing in common: no copy, so no exact copy; the patch stays version 2.
    unrelated = random.Random(3).randbytes(5000), random.Random(4).randbytes(5000)
    patch = delta.make_patch(*unrelated, format_version=3)
    assert delta.read_header(patch).version == 2
    # Held to version 2 (appliers that read no version 3): larger, and version 2.
    without = delta.make_patch(old, new, format_version=2)
    assert delta.read_header(without).version == 2 and _applies(old, new, without)
    assert len(without) > len(delta.make_patch(old, new))


KERNELS = [pytest.param(load_twin("delta"), id="twin")]
if load_native("delta") is not None:
    KERNELS.append(pytest.param(load_native("delta"), id="native"))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("run", [1, 2, 3, 5, 8, 64])
@pytest.mark.parametrize("filters", [None, *delta.AUTO_FILTERS])
def test_splits_anywhere_still_give_the_target(
    kernel: object, run: int, filters: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny runs split copies inside instructions and pointers: the pieces' difference
    bytes are made for their own spans, so the output is still exact."""
    monkeypatch.setattr(delta, "_kernel", kernel)
    monkeypatch.setattr(delta_stream, "_kernel", kernel)
    monkeypatch.setattr(delta_planner, "EXACT_RUN_MIN", run)
    old, new = relinked_firmware(7)
    patch = delta.make_patch(old, new, filters=filters, block_limit=1024)
    # (exact copies, their control entries in (sparse) columns or, for a small payload, in
    # order)
    assert delta.read_header(patch).version in (3, 4, 5)
    assert _prelude_flags(patch, old) & EXACT_COPIES
    assert _applies(old, new, patch)


@pytest.mark.parametrize("version", [3, 4, 5])
def test_both_kernels_make_the_same_version_3_to_5_patches(
    monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    native = load_native("delta")
    if native is None:
        pytest.skip("native delta kernel not built")
    old, new = PAIRS["thumb relinked"]()
    made = []
    for kernel in (load_twin("delta"), native):
        monkeypatch.setattr(delta, "_kernel", kernel)
        made.append(delta.make_patch(old, new, format_version=version))
    # (held to 5, the maker writes version 4 where columns compress smaller than sparse ones)
    assert made[0] == made[1]
    assert delta.read_header(made[0]).version in ((4, 5) if version == 5 else (version,))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=image_pairs(), run=st.integers(1, 40), block_limit=st.sampled_from([256, 1024]))
def test_fuzzed_pairs_with_exact_copies_apply(
    pair: tuple[bytes, bytes], run: int, block_limit: int
) -> None:
    old, new = pair
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(delta_planner, "EXACT_RUN_MIN", run)
        patch = delta.make_patch(old, new, block_limit=block_limit)
    header = delta.read_header(patch)
    assert header.version in (2, 3, 4, 5)
    assert _applies(old, new, patch)


# --- malformed version 3 payloads --------------------------------------------------------


def _v3_sample() -> tuple[bytes, bytes, PatchHeader, bytes]:
    old, new = firmware_pair(60_000, 12)
    patch = delta.make_patch(old, new, codecs=(CODEC_ZSTD,), format_version=3)
    header, payload = decode_payload(patch)
    assert header.version == 3
    return old, new, header, payload


def _repack(header: PatchHeader, payload: bytes, version: int | None = None) -> bytes:
    frame = delta_codec.compress_zstd(payload, 3, header.window_log)
    fields = {**header.__dict__, "payload_size": len(frame), "codec": CODEC_ZSTD}
    if version is not None:
        fields["version"] = version
    return PatchHeader(**fields).pack() + frame


def _records(payload: bytes) -> list[bytes]:
    records, at = [], 0
    while True:
        size, at = delta.read_varint(payload, at)
        if size == 0:
            return records
        records.append(payload[at : at + size])
        at += size


def _join(records: list[bytes]) -> bytes:
    out = bytearray()
    for record in records:
        put_varint(out, len(record))
        out += record
    put_varint(out, 0)
    return bytes(out)


def _with_prelude_flags(payload: bytes, change: int) -> bytes:
    records = _records(payload)
    flags, at = delta.read_varint(records[0], 0)
    head = bytearray()
    put_varint(head, flags ^ change)
    records[0] = bytes(head) + records[0][at:]
    return _join(records)


def test_the_sample_repacks_and_applies() -> None:
    old, new, header, payload = _v3_sample()
    assert _applies(old, new, _repack(header, payload))


def test_version_and_flag_must_agree() -> None:
    old, _, header, payload = _v3_sample()
    with pytest.raises(PatchCorruptError, match=r"version 2 patch's prelude .* is version 3's"):
        delta.apply_patch(old, _repack(header, payload, version=2))
    cleared = _with_prelude_flags(payload, EXACT_COPIES)
    with pytest.raises(PatchCorruptError, match=r"version 3 patch's prelude .* is version 2's"):
        delta.apply_patch(old, _repack(header, cleared))
    with pytest.raises(PatchCorruptError, match=r"version 3 patch's prelude .* is version 4's"):
        delta.apply_patch(old, _repack(header, _with_prelude_flags(payload, delta.COLUMNS)))
    with pytest.raises(PatchCorruptError, match=r"sparse columns \(bit 7\) without columns"):
        delta.apply_patch(old, _repack(header, _with_prelude_flags(payload, 1 << 7)))
    with pytest.raises(PatchCorruptError, match="unknown filter set"):
        delta.apply_patch(old, _repack(header, _with_prelude_flags(payload, 1 << 8)))
    with pytest.raises(PatchCorruptError, match="unknown filter set"):
        delta.apply_patch(old, _repack(header, _with_prelude_flags(payload, 3)))  # THUMB | X86


def _first_block_with_exact(payload: bytes) -> tuple[list[bytes], int, int, int]:
    """(records, index of a block with an exact entry, its entry count, bitmap start)."""
    records = _records(payload)
    for index, record in enumerate(records[1:], 1):
        count, at = delta.read_varint(record, 0)
        if any(record[at : at + (count + 7) // 8]):
            return records, index, count, at
    raise AssertionError("the sample has no exact entry")


def test_a_bitmap_marking_entries_past_the_count_is_refused() -> None:
    old, _, header, payload = _v3_sample()
    records, index, count, at = _first_block_with_exact(payload)
    bitmap = bytearray(records[index][at : at + (count + 7) // 8])
    if count % 8 == 0:
        pytest.skip("no spare bit in this block's bitmap")
    bitmap[-1] |= 0x80
    record = bytearray(records[index])
    record[at : at + len(bitmap)] = bitmap
    records[index] = bytes(record)
    with pytest.raises(PatchCorruptError, match="bitmap marks entries it lacks"):
        delta.apply_patch(old, _repack(header, _join(records)))


def test_a_flipped_exact_bit_breaks_the_record_lengths() -> None:
    old, _, header, payload = _v3_sample()
    records, index, count, at = _first_block_with_exact(payload)
    record = bytearray(records[index])
    bits = int.from_bytes(record[at : at + (count + 7) // 8], "little")
    first_exact = (bits & -bits).bit_length() - 1
    record[at + first_exact // 8] ^= 1 << (first_exact % 8)  # now it claims difference bytes
    records[index] = bytes(record)
    with pytest.raises(PatchCorruptError, match="do not add up"):
        delta.apply_patch(old, _repack(header, _join(records)))


def test_payload_format_version_reads_long_prelude_lengths() -> None:
    for prelude_size in (1, 200, 70_000):
        for flags, want in ((0, 2), (5, 2), (EXACT_COPIES, 3), (EXACT_COPIES | 5, 3)):
            prelude = bytearray()
            put_varint(prelude, flags)
            prelude += bytes(prelude_size - 1)
            payload = bytearray()
            put_varint(payload, len(prelude))
            assert payload_format_version(bytes(payload + prelude)) == want
    assert payload_format_version(b"") == 2


def mutated(payload: bytes, seed: int, edits: int) -> bytes:
    """``payload`` with ``edits`` random edits (a flipped bit, a replaced byte or 1-5 bytes
    cut), chosen by ``seed``."""
    rng = random.Random(seed)
    damaged = bytearray(payload)
    for _ in range(edits):
        at = rng.randrange(len(damaged))
        choice = rng.randrange(3)
        if choice == 0:
            damaged[at] ^= 1 << rng.randrange(8)
        elif choice == 1:
            damaged[at] = rng.randrange(256)
        else:
            del damaged[at : at + rng.randrange(1, 6)]
    return bytes(damaged)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), edits=st.integers(1, 4))
def test_mutated_version_3_payloads_fail_with_a_delta_error_only(seed: int, edits: int) -> None:
    """Whatever the damage inside the (correctly compressed) payload, the applier gives the
    target or raises DeltaError, never another exception."""
    old, new, header, payload = _SAMPLE
    gives_target_or_delta_error(old, new, _repack(header, mutated(payload, seed, edits)), seed)


def gives_target_or_delta_error(old: bytes, new: bytes, damaged: bytes, seed: int) -> None:
    """Apply the ``damaged`` patch (made with ``seed``): it gives ``new`` or raises DeltaError,
    never another exception or other output (the version 3 to 5 fuzz tests)."""
    try:
        out = delta.apply_patch(old, damaged)
    except DeltaError:
        return
    assert out == new, f"seed {seed}: damaged patch produced other output without an error"


_SAMPLE = _v3_sample()


def test_apply_memory_stays_under_its_bound_with_exact_copies() -> None:
    old, new = firmware_pair(1_000_000, 3)
    patch = delta.make_patch(old, new)
    header = delta.read_header(patch)
    assert header.version in (4, 5) and _prelude_flags(patch, old) & EXACT_COPIES
    peak, written = peak_during_apply(old, patch, 1)
    assert written == len(new)
    assert peak < python_memory_bound(header.block_limit)


# --- holding the maker to version 2 (devices whose applier reads no version 3) ------------


def test_the_maker_held_to_version_2_writes_version_2() -> None:
    old, new = firmware_pair(200_000, 11)
    for made in (
        delta.make_patch(old, new, format_version=2),
        delta_maker.search_patch(old, new, format_version=2, effort=3).patch,
    ):
        assert delta.read_header(made).version == 2
        _, payload = decode_payload(made, old=old)
        assert payload_format_version(payload) == 2
        assert _applies(old, new, made)
    for wrong in (1, 6, True, "3"):
        with pytest.raises(delta.PatchInputError, match="format version must be one of 2, 3, 4, 5"):
            delta.make_patch(old, new, format_version=wrong)  # type: ignore[arg-type]


def test_ota_delta_make_and_ota_server_take_the_format_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from otacore.errors import ValidationError
    from server.cli import server_cmd
    from server.cli.delta_cmd import app
    from server.devices.delivery import OtaConfig

    old, new = firmware_pair(100_000, 13)
    (tmp_path / "old.bin").write_bytes(old)
    (tmp_path / "new.bin").write_bytes(new)
    runner = CliRunner()
    for version in ("2", "3", "4", "5"):
        made = runner.invoke(app, ["make", str(tmp_path / "old.bin"), str(tmp_path / "new.bin"),
                                   str(tmp_path / "p"), "--format-version", version])
        assert made.exit_code == 0, made.output
        got = delta.read_header((tmp_path / "p").read_bytes()).version
        # (version 5 only where sparse columns compress smaller than version 4's columns)
        assert got == int(version) or (version == "5" and got == 4)
        assert _applies(old, new, (tmp_path / "p").read_bytes())
    refused = runner.invoke(app, ["make", str(tmp_path / "old.bin"), str(tmp_path / "new.bin"),
                                  str(tmp_path / "q"), "--format-version", "6"])
    assert refused.exit_code == 2 and not (tmp_path / "q").exists()

    captured = capture_server_configs(monkeypatch)
    given = runner.invoke(
        server_cmd.app, ["server", "--data", str(tmp_path), "--delta-format-version", "2"]
    )
    assert given.exit_code == 0, given.output
    assert captured[-1].ota.delta_format_version == 2  # type: ignore[attr-defined]
    from_file = runner.invoke(
        server_cmd.app,
        ["server", "--data", str(tmp_path), "--set", "delivery.delta_format_version=2"],
    )
    assert from_file.exit_code == 0, from_file.output
    assert captured[-1].ota.delta_format_version == 2  # type: ignore[attr-defined]
    assert OtaConfig().delta_format_version == delta.NEWEST_VERSION
    for wrong in (1, 6, True):
        with pytest.raises(ValidationError, match="delta_format_version must be one of"):
            OtaConfig(delta_format_version=wrong)


async def test_the_server_delta_cache_makes_the_version_it_is_held_to(
    sqlite_store: object,
) -> None:
    from server.devices.deltas import DeltaCache
    from server.events import EventBus
    from server.fleet import Fleet

    old, new = firmware_pair(200_000, 14)
    versions = []
    for held, base in ((2, "a"), (3, "b"), (4, "d")):
        cache = DeltaCache(Fleet(sqlite_store, EventBus()), format_version=held)  # type: ignore[arg-type]
        found = await cache.patch_for(base * 64, old, "c" * 64, new)
        assert found is not None
        versions.append(delta.read_header(found[1]).version)
        assert _applies(old, new, found[1])
    assert versions == [2, 3, 4]


async def test_the_server_stores_a_patch_per_format_and_remakes_one_of_another_codec(
    sqlite_store: object,
) -> None:
    """A pair's patch is made and stored once per format version (devices' appliers differ:
    Hello.delta_format); a stored patch in a codec the server no longer sends (an operator
    set delta_codec for devices without LZMA2) is made again and stored in its place."""
    from server.devices.deltas import DeltaCache
    from server.events import EventBus
    from server.fleet import Fleet

    old, new = firmware_pair(200_000, 14)
    fleet = Fleet(sqlite_store, EventBus())  # type: ignore[arg-type]
    pair = ("e" * 64, "f" * 64)
    cache = DeltaCache(fleet)

    async def served(version: int) -> tuple[int, int]:
        found = await cache.patch_for(pair[0], old, pair[1], new, version)
        assert found is not None and _applies(old, new, found[1])
        stored = await fleet.find_delta(*pair, version)
        assert stored is not None and stored[1] == found[1]  # what is served is what is stored
        header = delta.read_header(found[1])
        return header.version, header.codec

    assert await served(5) == (5, delta.CODEC_LZMA2)
    assert await served(4) == (4, delta.CODEC_LZMA2)
    assert (cache.computed, await fleet.count_deltas()) == (2, 2)
    cache = DeltaCache(fleet)  # a restarted server: both come from the store
    assert await served(5) == (5, delta.CODEC_LZMA2)
    assert await served(4) == (4, delta.CODEC_LZMA2)
    assert cache.computed == 0
    cache.codec = "zstd"
    assert (await served(5))[1] in (delta.CODEC_ZSTD, delta.CODEC_ZSTD_OLD)
    assert (cache.computed, await fleet.count_deltas()) == (1, 2)


def _sparse_container(seed: int) -> tuple[bytes, bytes]:
    """64 KB of old bytes and a new image with one byte changed every 48-200 bytes: no run
    reaches EXACT_RUN_MIN, and the regular payload is far larger than a 4 KiB window."""
    rng = random.Random(seed)
    print(f"seed {seed}")
    old = rng.randbytes(64 * 1024)
    new = bytearray(old)
    at = 0
    while True:
        at += rng.randrange(48, 200)
        if at >= len(new):
            return old, bytes(new)
        new[at] ^= 1 + rng.randrange(255)


def _alternatives_seen(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of other forms each codec step was handed."""
    seen: list[int] = []
    real_finish = delta_codec.PatchEncoder.finish

    def finish(self: delta_codec.PatchEncoder, *args: object, **kwargs: object) -> bytes:
        seen.append(len(kwargs.get("alternatives", ())))  # type: ignore[arg-type]
        return real_finish(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(delta_codec.PatchEncoder, "finish", finish)
    return seen


@pytest.mark.parametrize("seed", [5, 6])
def test_sparse_changes_get_the_dense_form_and_lzma2_decides_between_the_forms(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Sparse one-byte changes under a small window: the dense form (every zero run of
    EXACT_RUN_DENSE or more an exact copy) wins with zstd by far more than DENSE_MARGIN,
    but the regular form's payload is small, so it goes through the codec step too, and
    the patch is never larger than the version 2 maker's (LZMA2 may prefer the regular
    form). Above DENSE_ALWAYS (lowered to 0 here) a clear loser is not encoded again."""
    old, new = _sparse_container(seed)
    seen = _alternatives_seen(monkeypatch)
    both = delta_maker.search_patch(old, new, window_log=12, effort=1)
    regular = delta_maker.search_patch(old, new, window_log=12, effort=1, format_version=2)
    print(f"both forms {len(both.patch)} B (zstd {both.tried}), version 2 {len(regular.patch)} B "
          f"(zstd {regular.tried})")
    assert both.tried[0][1] < (1 - delta_forms.DENSE_MARGIN) * regular.tried[0][1]
    assert seen[0] == 1
    assert len(both.patch) <= len(regular.patch)
    assert _applies(old, new, both.patch)
    seen.clear()
    monkeypatch.setattr(delta_forms, "DENSE_ALWAYS", 0)
    dense_only = delta_maker.search_patch(old, new, window_log=12, effort=1)
    assert seen == [0]
    assert delta.read_header(dense_only.patch).version in (4, 5)
    assert _prelude_flags(dense_only.patch, old) & EXACT_COPIES
    assert _applies(old, new, dense_only.patch)
