"""Delta patch format version 2: the compact header, the zstd and LZMA2 codecs, the
all-literal candidate, version 1 patches still applying, damage always a clear error."""

from __future__ import annotations

import hashlib
import lzma
import random
import struct
import zlib
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from otacore import delta, delta_codec, delta_maker, delta_planner
from otacore.delta import (
    CODEC_LZMA2,
    CODEC_ZSTD,
    PatchCorruptError,
    PatchHeader,
    PatchTruncatedError,
    PatchVersionError,
)
from otacore.delta_decoders import lzma_native_bound
from otacore.delta_stream import (
    PatchApplier,
    decode_payload,
    python_memory_bound,
)
from otacore.errors import DeltaError, PatchBaseMismatchError
from server.cli.delta_cmd import app
from tests.server_cli_capture import capture_server_configs
from tests.test_delta import image_pairs, thumb_image
from tests.test_delta_stream import firmware_pair, peak_during_apply

V1 = Path(__file__).parent / "data" / "delta-v1"
ZSTD_ONLY = (CODEC_ZSTD,)
LZMA_ONLY = (CODEC_LZMA2,)


def _apply_in_pieces(old: bytes, patch: bytes, piece: int) -> bytes:
    out = bytearray()
    applier = PatchApplier(old, out.extend)
    for at in range(0, len(patch), piece):
        applier.feed(patch[at : at + piece])
    applier.finish()
    return bytes(out)


# --- version 1 still applies --------------------------------------------------------------


@pytest.mark.parametrize("name", ["auto.otad", "thumb-words.otad"])
def test_version_1_vector_applies(name: str) -> None:
    """Patches made by the version-1 maker (tests/data/delta-v1) apply, whole and streamed."""
    old, new = (V1 / "old.bin").read_bytes(), (V1 / "new.bin").read_bytes()
    patch = (V1 / name).read_bytes()
    header = delta.read_header(patch)
    assert (header.version, header.size, header.codec) == (1, 92, CODEC_ZSTD)
    assert header.target_sha256 == hashlib.sha256(new).digest()
    assert delta.apply_patch(old, patch) == new
    assert _apply_in_pieces(old, patch, 1) == new
    assert _apply_in_pieces(old, patch, 7) == new
    # The same pair made today is a version 2, 3 or 4 patch (3: it uses exact copies; 4:
    # columns) at least 40 bytes (the header) smaller.
    today = delta.make_patch(old, new)
    assert delta.read_header(today).version in (2, 3, 4, 5)
    assert len(today) <= len(patch) - 40


def test_version_1_vector_damage_is_still_caught() -> None:
    old, patch = (V1 / "old.bin").read_bytes(), (V1 / "auto.otad").read_bytes()
    flipped = bytearray(patch)
    flipped[40] ^= 1
    with pytest.raises(PatchCorruptError, match="CRC"):
        delta.apply_patch(old, bytes(flipped))
    with pytest.raises(PatchBaseMismatchError):
        delta.apply_patch(bytes([old[0] ^ 1]) + old[1:], patch)


# --- the header ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    codec=st.sampled_from([CODEC_ZSTD, CODEC_LZMA2]),
    window_log=st.integers(12, delta.MAX_WINDOW_LOG),
    sizes=st.tuples(*[st.integers(0, delta.MAX_IMAGE_SIZE)] * 2),
    block_limit=st.integers(delta.MIN_BLOCK_LIMIT, delta.MAX_BLOCK_LIMIT),
    payload_size=st.integers(0, delta.MAX_IMAGE_SIZE),
    digests=st.tuples(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16)),
    props=st.sampled_from([delta.lzma_props_byte(3, 0, 2), delta.lzma_props_byte(0, 0, 0)]),
)
def test_header_round_trips_and_every_prefix_is_truncated(
    codec: int,
    window_log: int,
    sizes: tuple[int, int],
    block_limit: int,
    payload_size: int,
    digests: tuple[bytes, bytes],
    props: int,
) -> None:
    header = PatchHeader(
        2,
        window_log,
        *sizes,
        block_limit,
        payload_size,
        *digests,
        codec=codec,
        lzma_props=props if codec == CODEC_LZMA2 else 0,
    )
    raw = header.pack()
    assert 33 <= len(raw) == header.size <= delta.MAX_HEADER_SIZE
    assert PatchHeader.parse(raw + b"payload") == header
    assert zlib.crc32(raw[:-4]) == struct.unpack("<I", raw[-4:])[0]
    for cut in range(len(raw)):
        with pytest.raises(PatchTruncatedError):
            PatchHeader.parse(raw[:cut])


def test_compact_header_size() -> None:
    """What the compact header saves: 92 bytes in version 1, 53 for a 236 KiB image."""
    sha = hashlib.sha256(b"x").digest()
    typical = PatchHeader(2, 17, 241_496, 241_496, 1 << 16, 150, sha, sha)
    assert typical.size == 53
    lzma_header = PatchHeader(2, 17, 241_496, 241_496, 1 << 16, 150, sha, sha, CODEC_LZMA2, 93)
    assert lzma_header.size == 54
    assert PatchHeader(1, 17, 241_496, 241_496, 1 << 16, 150, sha, sha).size == 92


def _with_byte(header_bytes: bytes, at: int, value: int) -> bytes:
    """``header_bytes`` with one byte replaced and the CRC made right again."""
    raw = bytearray(header_bytes)
    raw[at] = value
    return bytes(raw[:-4]) + struct.pack("<I", zlib.crc32(bytes(raw[:-4])))


def test_unknown_codec_version_and_bad_properties_are_refused() -> None:
    old, new = firmware_pair(20_000, 7)
    patch = delta.make_patch(old, new, codecs=LZMA_ONLY)
    header = delta.read_header(patch)
    head, payload = patch[: header.size], patch[header.size :]
    assert header.codec == CODEC_LZMA2
    for codec in (3, 7):
        with pytest.raises(PatchVersionError, match=f"codec {codec} is not supported"):
            delta.apply_patch(old, _with_byte(head, 5, codec << 5 | header.window_log) + payload)
    with pytest.raises(PatchVersionError, match="version 9 is not supported"):
        delta.apply_patch(old, _with_byte(head, 4, 9) + payload)
    with pytest.raises(PatchCorruptError, match="properties byte 0xe1 is invalid"):
        delta.apply_patch(old, _with_byte(head, 6, 225) + payload)
    lc4_lp1 = delta.lzma_props_byte(4, 0, 0) + 9  # lc + lp = 5 > 4
    with pytest.raises(PatchCorruptError, match="properties byte"):
        delta.apply_patch(old, _with_byte(head, 6, lc4_lp1) + payload)
    with pytest.raises(PatchCorruptError, match="LZMA2 window log 11 is below 12"):
        delta.apply_patch(old, _with_byte(head, 5, CODEC_LZMA2 << 5 | 11) + payload)
    with pytest.raises(PatchCorruptError, match="window log 21"):
        delta.apply_patch(old, _with_byte(head, 5, CODEC_LZMA2 << 5 | 21) + payload)
    flipped = bytearray(patch)
    flipped[header.size - 5] ^= 0x10
    with pytest.raises(PatchCorruptError, match="CRC"):
        delta.apply_patch(old, bytes(flipped))
    with pytest.raises(delta.PatchLimitError, match="window"):
        PatchApplier(old, bytearray().extend, max_window_log=header.window_log - 1).feed(patch)


def test_a_chunk_setting_other_properties_than_the_header_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The header's lc/lp fix the decoder's table size; the stream may not change them."""
    # A version 2 payload: its zero runs make LZMA2 compress every chunk, and a compressed
    # chunk sets properties (a version 3 payload of this pair is small and incompressible
    # enough to go out as stored chunks, which set none).
    monkeypatch.setattr(delta_planner, "EXACT_RUN_MIN", 1 << 30)
    old, new = firmware_pair(20_000, 8)
    patch = delta.make_patch(old, new, codecs=LZMA_ONLY, format_version=2)
    header = delta.read_header(patch)
    assert header.version == 2
    _, payload = decode_payload(patch)
    lc4 = delta.lzma_props_byte(4, 0, 2)
    stream = delta_codec.compress_lzma2(payload, header.window_log, lc4, 6)
    lied = PatchHeader(**{**header.__dict__, "payload_size": len(stream)}).pack() + stream
    with pytest.raises(PatchCorruptError, match="sets properties 0x5e, the header declares"):
        delta.apply_patch(old, lied)
    honest = PatchHeader(
        **{**header.__dict__, "payload_size": len(stream), "lzma_props": lc4}
    ).pack()
    assert delta.apply_patch(old, honest + stream) == new


# --- codecs round trip -----------------------------------------------------------------------


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pair=image_pairs(),
    codecs=st.sampled_from([ZSTD_ONLY, LZMA_ONLY, delta_codec.DEFAULT_CODECS]),
    window_log=st.sampled_from([10, 12, 17]),
    piece=st.integers(1, 600),
)
def test_every_codec_round_trips(
    pair: tuple[bytes, bytes], codecs: tuple[int, ...], window_log: int, piece: int
) -> None:
    old, new = pair
    patch = delta.make_patch(old, new, codecs=codecs, window_log=window_log, block_limit=1024)
    header = delta.read_header(patch)
    if codecs == LZMA_ONLY and window_log >= delta.MIN_LZMA_WINDOW_LOG:
        assert header.codec == CODEC_LZMA2
    elif codecs == ZSTD_ONLY or window_log < delta.MIN_LZMA_WINDOW_LOG:
        assert header.codec != CODEC_LZMA2  # LZMA2 cannot have a window below 4 KiB
    assert header.codec in codecs or header.codec == CODEC_ZSTD  # zstd: the fallback
    assert header.version in (2, 3, 4, 5) and header.window_log == window_log
    assert header.target_sha256 == hashlib.sha256(new).digest()[:16]
    assert header.base_sha256 == hashlib.sha256(old).digest()[:16]
    assert _apply_in_pieces(old, patch, piece) == new


def test_the_payload_is_the_same_whatever_the_codec() -> None:
    old, new = firmware_pair(60_000, 9)
    zstd_patch = delta.make_patch(old, new, codecs=ZSTD_ONLY)
    lzma_patch = delta.make_patch(old, new, codecs=LZMA_ONLY)
    old_dict_patch = delta.make_patch(old, new, codecs=(delta.CODEC_ZSTD_OLD,))
    auto = delta.make_patch(old, new)
    payload = decode_payload(zstd_patch)[1]
    assert decode_payload(lzma_patch)[1] == payload
    assert delta.read_header(old_dict_patch).codec == delta.CODEC_ZSTD_OLD
    assert decode_payload(old_dict_patch, old=old)[1] == payload
    with pytest.raises(PatchBaseMismatchError, match="needs its base image"):
        decode_payload(old_dict_patch)
    assert len(auto) <= min(len(zstd_patch), len(lzma_patch), len(old_dict_patch))


def test_lzma2_wins_where_it_is_smaller_and_the_maker_keeps_it() -> None:
    """Words from a small vocabulary (like instruction streams): LZMA2's literal coding with
    the previous byte as context beats zstd's."""
    rng = random.Random(10)
    words = [rng.randbytes(4) for _ in range(300)]
    old = b"".join(rng.choice(words) for _ in range(15_000))
    new = old[:20_000] + b"".join(rng.choice(words) for _ in range(2000)) + old[20_000:]
    zstd_patch = delta.make_patch(old, new, codecs=ZSTD_ONLY)
    auto = delta.make_patch(old, new, codecs=(CODEC_ZSTD, CODEC_LZMA2))
    assert delta.read_header(auto).codec == CODEC_LZMA2
    assert len(auto) < len(zstd_patch)


# --- the all-literal candidate ---------------------------------------------------------------


def _literal_patches(old: bytes, new: bytes, window_log: int = 17) -> list[bytes]:
    encoder = delta_codec.PatchEncoder(old, new, window_log=window_log, block_limit=1 << 16)
    literal = encoder.literal_payload()
    return [
        encoder.encode(literal, CODEC_ZSTD, level=delta_codec.LITERAL_SCREEN_LEVEL),
        encoder.encode(literal, CODEC_ZSTD),
        encoder.encode(literal, CODEC_LZMA2, props=delta_codec.LZMA_PROPS_TRIED[0]),
    ]


@settings(max_examples=30, deadline=None)
@given(pair=image_pairs(max_size=6000))
def test_never_larger_than_the_image_compressed(pair: tuple[bytes, bytes]) -> None:
    old, new = pair
    patch = delta.make_patch(old, new)
    fast, *_ = _literal_patches(old, new)
    assert delta.apply_patch(old, fast) == new  # the candidate is a valid patch itself
    assert len(patch) <= len(fast)


def test_unrelated_images_get_the_literal_patch() -> None:
    seed = random.randrange(1 << 32)
    print("seed", seed)
    rng = random.Random(seed)
    old = bytes(thumb_image(rng, 30_000))
    new = bytes(thumb_image(rng, 30_000))
    patch = delta.make_patch(old, new)
    assert len(patch) <= min(map(len, _literal_patches(old, new)))
    assert delta.apply_patch(old, patch) == new


def test_literal_payload_fills_blocks_exactly() -> None:
    new = random.Random(11).randbytes(3000)
    for block_limit in (256, 300, 1024):
        encoder = delta_codec.PatchEncoder(b"", new, window_log=12, block_limit=block_limit)
        patch = encoder.encode(encoder.literal_payload(), CODEC_ZSTD)
        assert delta.apply_patch(b"", patch) == new
    empty = delta_codec.PatchEncoder(b"abc", b"", window_log=12, block_limit=256)
    assert delta.apply_patch(b"abc", empty.encode(empty.literal_payload(), CODEC_LZMA2)) == b""


# --- damage is always a clear error ------------------------------------------------------------


@pytest.fixture(scope="module")
def v2_patches() -> tuple[bytes, bytes, dict[int, bytes]]:
    old, new = firmware_pair(30_000, 12)
    patches = {codec: delta.make_patch(old, new, codecs=(codec,)) for codec in (0, 1, 2)}
    assert {delta.read_header(patch).codec for patch in patches.values()} == {0, 1, 2}
    return old, new, patches


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    codec=st.sampled_from([CODEC_ZSTD, CODEC_LZMA2, delta.CODEC_ZSTD_OLD]),
    seed=st.integers(0, 2**32),
    kind=st.sampled_from(["flip", "byte", "cut", "insert", "delete", "header"]),
)
def test_mutated_v2_patches_fail_with_a_delta_error_only(
    v2_patches: tuple[bytes, bytes, dict[int, bytes]], codec: int, seed: int, kind: str
) -> None:
    """Fuzz the applier: whatever the damage, the patch applies exactly or raises DeltaError
    (format, base mismatch), never another exception."""
    old, new, patches = v2_patches
    rng = random.Random(seed)
    patch = bytearray(patches[codec])
    size = delta.read_header(bytes(patch)).size
    at = rng.randrange(size if kind == "header" else len(patch))
    if kind in ("flip", "header"):
        patch[at] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        patch[at] = rng.randrange(256)
    elif kind == "cut":
        del patch[at:]
    elif kind == "insert":
        patch[at:at] = rng.randbytes(rng.randrange(1, 20))
    else:
        del patch[at : at + rng.randrange(1, 20)]
    if kind in ("flip", "byte", "header") and rng.random() < 0.5 and at < size:
        # Make the CRC right again, so the damage reaches the field checks and the payload.
        body = bytes(patch[: size - 4])
        patch[size - 4 : size] = struct.pack("<I", zlib.crc32(body))
    try:
        out = _apply_in_pieces(old, bytes(patch), rng.choice([1, 100, 1 << 20]))
    except DeltaError:
        return
    assert out == new, f"seed {seed}: damaged patch produced other output without an error"


def test_truncated_v2_patch_names_what_is_missing(
    v2_patches: tuple[bytes, bytes, dict[int, bytes]],
) -> None:
    old, _, patches = v2_patches
    for patch in patches.values():
        size = delta.read_header(patch).size
        for cut in (3, size - 1, size + 1, len(patch) - 1):
            with pytest.raises(PatchTruncatedError, match="truncated"):
                _apply_in_pieces(old, patch[:cut], 5)
        with pytest.raises(PatchCorruptError, match="after its"):
            _apply_in_pieces(old, patch + b"\x00", 5)


# --- bounded memory ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("piece", "applier_kernel"),
    [(1, "kernel"), (1 << 16, "kernel"), (1 << 16, "twin")],
    indirect=["applier_kernel"],
)
def test_lzma2_streaming_memory_stays_bounded(piece: int, applier_kernel: str) -> None:
    """liblzma allocates through Python's raw allocator, so tracemalloc sees its dictionary
    too: the peak stays under the Python-side bound plus ``lzma_native_bound``. (The twin
    only predicts and adds; byte-at-a-time arrival is the decoder's, the same for both.)"""
    old, new = firmware_pair(1_000_000, 3)
    new = new[:500_000] + random.Random(5).randbytes(300_000) + new[500_000:]
    patch = delta.make_patch(old, new, codecs=LZMA_ONLY)
    header = delta.read_header(patch)
    assert header.codec == CODEC_LZMA2
    peak, written = peak_during_apply(old, patch, piece)
    bound = python_memory_bound(header.block_limit) + lzma_native_bound(
        header.window_log, header.lzma_props
    )
    assert written == len(new)
    assert peak < bound, f"peak {peak} >= bound {bound}"
    assert bound < len(new) // 2


def test_lzma_native_bound_is_the_stated_formula() -> None:
    lc3 = delta.lzma_props_byte(3, 0, 2)
    lc0 = delta.lzma_props_byte(0, 0, 0)
    assert lzma_native_bound(17, lc3) - lzma_native_bound(17, lc0) == 2 * 768 * (8 - 1)
    assert 131_072 < lzma_native_bound(17, lc3) < 180 * 1024
    assert lzma_native_bound(15, lc0) < 64 * 1024


# --- the maker's codec options ------------------------------------------------------------------


def test_codec_options_are_checked() -> None:
    for wrong in ((), (5,), ("zstd",)):
        with pytest.raises(delta.PatchInputError, match="codecs must be"):
            delta.make_patch(b"old", b"new", codecs=wrong)  # type: ignore[arg-type]
    for preset in (10, -1, True):
        with pytest.raises(delta.PatchInputError, match="LZMA preset"):
            delta.make_patch(b"old", b"new", lzma_preset=preset)
    with pytest.raises(delta.PatchInputError, match="codec must be one of auto, zstd, zstd-p"):
        delta_codec.codecs_named("xz")
    with pytest.raises(delta.PatchInputError, match="LZMA2 needs"):
        delta.lzma_props_byte(3, 2, 0)


def test_twin_and_kernel_make_identical_v2_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    from otacore._select import load_native, load_twin

    native = load_native("delta")
    if native is None:
        pytest.skip("native delta kernel not built")
    rng = random.Random(13)
    old = bytes(thumb_image(rng, 40_000))
    new = old[:9000] + rng.randbytes(500) + old[9000:]
    made = []
    for kernel in (load_twin("delta"), native):
        monkeypatch.setattr(delta, "_kernel", kernel)
        made.append(delta_maker.make_patch(old, new))
    assert made[0] == made[1]


def test_cli_codec_option_and_info(tmp_path: Path) -> None:
    old, new = firmware_pair(30_000, 14)
    (tmp_path / "old.bin").write_bytes(old)
    (tmp_path / "new.bin").write_bytes(new)
    runner = CliRunner()
    for codec, name in (("zstd", "zstd"), ("lzma2", "lzma2")):
        made = runner.invoke(
            app,
            ["make", str(tmp_path / "old.bin"), str(tmp_path / "new.bin"), str(tmp_path / "p"),
             "--codec", codec, "--lzma-preset", "6", "--lzma-extreme"],
        )
        assert made.exit_code == 0, made.output
        assert f"codec {name}" in made.output
        shown = runner.invoke(app, ["info", str(tmp_path / "p")])
        assert shown.exit_code == 0 and "payload: " in shown.output
        version = delta.read_header((tmp_path / "p").read_bytes()).version
        assert name in shown.output and f"format version: {version}" in shown.output
        applied = runner.invoke(
            app, ["apply", str(tmp_path / "old.bin"), str(tmp_path / "p"), str(tmp_path / "o")]
        )
        assert applied.exit_code == 0, applied.output
        assert (tmp_path / "o").read_bytes() == new
    refused = runner.invoke(
        app,
        ["make", str(tmp_path / "old.bin"), str(tmp_path / "new.bin"), str(tmp_path / "q"),
         "--codec", "xz"],
    )
    assert refused.exit_code == 1 and "codec must be one of" in refused.output
    v1 = runner.invoke(app, ["info", str(V1 / "auto.otad")])
    assert v1.exit_code == 0 and "format version: 1" in v1.output and "zstd" in v1.output


def test_the_server_codec_setting_reaches_the_delta_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from otacore.errors import ValidationError
    from server.cli import server_cmd
    from server.devices.delivery import OtaConfig

    captured = capture_server_configs(monkeypatch)
    runner = CliRunner()
    given_option = runner.invoke(
        server_cmd.app, ["server", "--data", str(tmp_path), "--delta-codec", "zstd"]
    )
    assert given_option.exit_code == 0, given_option.output
    assert captured[-1].ota.delta_codec == "zstd"  # type: ignore[attr-defined]
    assert OtaConfig().delta_codec == "auto"
    with pytest.raises(ValidationError, match="delta_codec must be one of auto, zstd, zstd-p"):
        OtaConfig(delta_codec="xz")


def test_lzma_compress_is_plain_liblzma() -> None:
    """Codec 1 is what any LZMA2 decoder reads: stdlib lzma decodes the payload directly."""
    old, new = firmware_pair(20_000, 15)
    patch = delta.make_patch(old, new, codecs=LZMA_ONLY)
    header = delta.read_header(patch)
    filters = delta.lzma_filters(header.window_log, header.lzma_props)
    plain = lzma.decompress(patch[header.size :], format=lzma.FORMAT_RAW, filters=filters)
    assert plain == decode_payload(patch)[1]


# --- codec 2: zstd with the old image as dictionary ---------------------------------------------


class _Flash:
    """An old image readable only by offset, like a flash partition."""

    def __init__(self, image: bytes) -> None:
        self.image, self.reads = image, 0

    def read_at(self, offset: int, size: int) -> bytes:
        self.reads += 1
        return self.image[offset : offset + size]


@settings(max_examples=30, deadline=None)
@given(pair=image_pairs(max_size=4000), piece=st.integers(1, 500))
def test_codec_2_round_trips_from_a_flash_like_base(pair: tuple[bytes, bytes], piece: int) -> None:
    old, new = pair
    patch = delta.make_patch(old, new, codecs=(delta.CODEC_ZSTD_OLD,), window_log=14)
    header = delta.read_header(patch)
    fits = len(old) + len(decode_payload(patch, old=old)[1]) <= 1 << 14
    assert header.codec == (delta.CODEC_ZSTD_OLD if fits else CODEC_ZSTD)
    out = bytearray()
    applier = PatchApplier(_Flash(old), out.extend)
    for at in range(0, len(patch), piece):
        applier.feed(patch[at : at + piece])
    applier.finish()
    assert bytes(out) == new


def test_codec_2_is_never_larger_than_zstd_patch_from() -> None:
    """When the window covers the old image and the new one, the maker also tries what
    ``zstd --patch-from`` makes (the new image as literals, the old one as dictionary): the
    patch is at most that frame plus our header and the records' framing (prelude, one
    block header per block limit, end: 9 bytes here)."""
    seed = random.randrange(1 << 32)
    print("seed", seed)
    rng = random.Random(seed)
    old = bytes(thumb_image(rng, 12_000))
    new = old[:3000] + rng.randbytes(40) + old[3000:9000] + old[9100:]
    dictionary = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    params = zstandard.ZstdCompressionParameters.from_level(19, window_log=17)
    patch_from = zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params)
    frame = patch_from.compress(new)
    patch = delta.make_patch(old, new)
    assert len(patch) <= len(frame) + delta.read_header(patch).size + 9
    assert delta.apply_patch(old, patch) == new


def test_codec_2_base_must_fit_the_window() -> None:
    old, new = firmware_pair(20_000, 16)
    patch = delta.make_patch(old, new, codecs=(delta.CODEC_ZSTD_OLD,), window_log=16)
    header = delta.read_header(patch)
    assert header.codec == delta.CODEC_ZSTD_OLD
    small = PatchHeader(**{**header.__dict__, "window_log": 14}).pack()
    with pytest.raises(PatchCorruptError, match="must fit its 16384-byte window"):
        delta.apply_patch(old, small + patch[header.size :])
    # A frame needing the dictionary fails cleanly without the right base.
    other = bytes(len(old))
    with pytest.raises(PatchBaseMismatchError):
        delta.apply_patch(other, patch)
    applier = PatchApplier(other, bytearray().extend, verify_base=False)
    with pytest.raises(DeltaError):
        applier.feed(patch)
        applier.finish()


def test_codec_2_apply_memory_is_the_window_plus_the_base() -> None:
    old, new = firmware_pair(40_000, 17)
    new = new[:20_000] + random.Random(18).randbytes(2000) + new[20_000:]
    patch = delta.make_patch(old, new, codecs=(delta.CODEC_ZSTD_OLD,))
    header = delta.read_header(patch)
    assert header.codec == delta.CODEC_ZSTD_OLD
    peak, written = peak_during_apply(_Flash(old), patch, 1000)
    assert written == len(new)
    # Python's side: the usual bound plus the base read once (<= the window) and the
    # dictionary object's own copy of it; zstd's own state is outside tracemalloc.
    bound = python_memory_bound(header.block_limit) + 2 * header.base_size
    assert peak < bound, f"peak {peak} >= bound {bound}"
