"""Compressed full images: round trips, and every malformed frame is a CompressedImageError."""

from __future__ import annotations

import random

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacore.coap import Code, Message, MessageType
from otacore.errors import PayloadSchemaError
from otacore.protocol.ota_wire import offer_compressed, offer_delta_base, offer_request
from otacore.zstd_image import CompressedImageError, compress_image, inflate_image

#: Seeded noise: a hypothesis failure below replays with the same frame.
IMAGE = (b"\x00\xbf\x10\xb5" * 3000) + random.Random(17).randbytes(2000) + bytes(20_000)
FRAME = compress_image(IMAGE)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=20_000), st.integers(1, 19))
def test_round_trip(image: bytes, level: int) -> None:
    frame = compress_image(image, level=level)
    assert inflate_image(frame, len(image)) == image


def test_frame_states_size_checksum_and_a_small_window() -> None:
    params = zstandard.get_frame_parameters(FRAME)
    assert params.content_size == len(IMAGE)
    assert params.has_checksum
    assert params.window_size <= 1 << 17
    assert len(FRAME) * 2 < len(IMAGE)


@pytest.mark.parametrize(
    ("frame", "size", "match"),
    [
        (b"", len(IMAGE), "not a zstd frame"),
        (b"not zstd at all", len(IMAGE), "not a zstd frame"),
        (FRAME[:-1], len(IMAGE), "truncated inside its checksum"),
        (FRAME[: len(FRAME) // 2], len(IMAGE), "truncated"),
        (FRAME + b"\x00", len(IMAGE), "1 bytes follow the zstd frame"),
        (FRAME + FRAME, len(IMAGE), "follow the zstd frame"),
        (FRAME, len(IMAGE) + 1, "the manifest names"),
        (zstandard.ZstdCompressor(write_content_size=False).compress(IMAGE), len(IMAGE), "size"),
        (
            zstandard.ZstdCompressor(write_checksum=False).compress(IMAGE),
            len(IMAGE),
            "no content checksum",
        ),
    ],
)
def test_malformed_frames_say_what_is_wrong(frame: bytes, size: int, match: str) -> None:
    with pytest.raises(CompressedImageError, match=match):
        inflate_image(frame, size)


def test_a_frame_needing_more_window_than_the_device_has_is_refused_before_inflating() -> None:
    big = random.Random(18).randbytes(1 << 16) * 8  # matches 64 KiB back need a big window
    frame = compress_image(big, window_log=20)
    with pytest.raises(CompressedImageError, match="window"):
        inflate_image(frame, len(big), max_window_log=12)
    assert inflate_image(frame, len(big), max_window_log=20) == big


def test_corrupted_checksum_is_detected() -> None:
    frame = bytearray(FRAME)
    frame[-1] ^= 0xFF
    with pytest.raises(CompressedImageError, match="corrupt"):
        inflate_image(bytes(frame), len(IMAGE))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_corruption_is_an_error_or_the_exact_image(data: st.DataObject) -> None:
    frame = bytearray(FRAME)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(frame) - 1))
        frame[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    try:
        out = inflate_image(bytes(frame[:cut]), len(IMAGE))
    except CompressedImageError:
        return
    assert out == IMAGE  # a change the frame does not depend on (never a wrong image)


def test_offer_names_the_encoding() -> None:
    manifest = b"signed manifest"
    plain = offer_request(manifest)
    assert offer_compressed(plain) is False
    compressed = offer_request(manifest, compressed=True)
    assert offer_compressed(compressed) is True
    assert offer_delta_base(compressed) is None
    with pytest.raises(ValueError, match="not both"):
        offer_request(manifest, bytes(32), compressed=True)


@pytest.mark.parametrize(
    ("queries", "match"),
    [
        (["enc=gzip"], "unknown file encoding"),
        (["enc=zstd", "enc=zstd"], "unknown file encoding"),
        (["enc=zstd", "delta=" + "00" * 32], "cannot also be a compressed image"),
    ],
)
def test_bad_offer_encodings_are_refused(queries: list[str], match: str) -> None:
    message = Message(MessageType.CON, Code.POST, payload=b"m")
    message.set_uri_path("m")
    for query in queries:
        message.add_uri_query(query)
    with pytest.raises(PayloadSchemaError, match=match):
        offer_compressed(message)
