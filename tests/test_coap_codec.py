"""CoAP codec: spec vectors, round trips, truncation, and native == twin on any input."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacore._select import load_native, load_twin
from otacore.coap import (
    BlockOption,
    CoapFormatError,
    Code,
    FrameTooLargeError,
    Message,
    MessageType,
    OptionNumber,
    TcpFrameReader,
    UnsupportedVersionError,
    block_slice,
    code_string,
    decode_tcp,
    decode_tcp_stream,
    decode_udp,
    decode_uint,
    encode_tcp,
    encode_udp,
    encode_uint,
    is_critical,
    make_code,
    split_blocks,
    szx_for_size,
)

TWIN = load_twin("coap")
NATIVE = load_native("coap")
KERNELS = [pytest.param(TWIN, id="twin")] + (
    [pytest.param(NATIVE, id="native")] if NATIVE is not None else []
)
needs_native = pytest.mark.skipif(NATIVE is None, reason="native coap kernel not built")

# --- strategies ------------------------------------------------------------------------

option_numbers = st.one_of(
    st.integers(0, 40),
    st.sampled_from([int(number) for number in OptionNumber]),
    st.integers(0, 65535),
)
option_values = st.one_of(st.binary(max_size=20), st.binary(min_size=260, max_size=600))
options_lists = st.lists(st.tuples(option_numbers, option_values), max_size=8)
tokens = st.binary(max_size=8)
payloads = st.one_of(st.binary(max_size=40), st.binary(min_size=1000, max_size=1200))


@st.composite
def udp_tuples(draw: st.DrawFn) -> tuple[int, int, int, bytes, list[tuple[int, bytes]], bytes]:
    code = draw(st.integers(0, 255))
    if code == 0:  # RFC 7252 4.1: an Empty message is the bare 4-byte header
        return draw(st.integers(0, 3)), 0, draw(st.integers(0, 0xFFFF)), b"", [], b""
    return (
        draw(st.integers(0, 3)),
        code,
        draw(st.integers(0, 0xFFFF)),
        draw(tokens),
        draw(options_lists),
        draw(payloads),
    )


def stable_sorted(options: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    return sorted(options, key=lambda item: item[0])


def outcome(func: Any, *args: Any) -> tuple[str, Any]:
    """What a call returns, or the class and message of what it raises."""
    try:
        return "ok", func(*args)
    except (CoapFormatError, ValueError, TypeError) as exc:
        return type(exc).__name__, str(exc)


# --- spec vectors (written by hand from the RFCs) ----------------------------------------

# RFC 7252 appendix A, figure 16: CON [0x7d34] GET /temperature, then ACK 2.05 "22.3 C".
GET_TEMPERATURE = bytes.fromhex("40017d34") + b"\xbb" + b"temperature"
CONTENT_22_3 = bytes.fromhex("60457d34") + b"\xff" + b"22.3 C"
# Figure 17 variant: token 0x20 on message id 0x7d35.
GET_TEMPERATURE_TOKEN = bytes.fromhex("41017d3520") + b"\xbb" + b"temperature"


@pytest.mark.parametrize("kernel", KERNELS)
def test_rfc7252_figure_vectors(kernel: ModuleType) -> None:
    assert kernel.decode_udp(GET_TEMPERATURE) == (
        0,
        Code.GET,
        0x7D34,
        b"",
        [(OptionNumber.URI_PATH, b"temperature")],
        b"",
    )
    assert kernel.decode_udp(CONTENT_22_3) == (2, Code.CONTENT, 0x7D34, b"", [], b"22.3 C")
    assert kernel.decode_udp(GET_TEMPERATURE_TOKEN)[3] == b"\x20"
    assert kernel.encode_udp(0, 1, 0x7D34, b"", [(11, b"temperature")], b"") == GET_TEMPERATURE
    assert kernel.encode_udp(2, 0x45, 0x7D34, b"", [], b"22.3 C") == CONTENT_22_3
    assert kernel.encode_udp(0, 1, 0x7D35, b"\x20", [(11, b"temperature")], b"") == (
        GET_TEMPERATURE_TOKEN
    )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    ("options", "wire"),
    [
        # delta 60 -> nibble 13 + (60 - 13 = 0x2f); length 1
        ([(60, b"\x07")], "d12f07"),
        # delta 2049 -> nibble 14 + (2049 - 269 = 0x06f4); length 1
        ([(2049, b"\x05")], "e106f405"),
        # length 20 -> nibble 13 + (20 - 13 = 7)
        ([(11, b"a" * 20)], "bd07" + "61" * 20),
        # length 300 -> nibble 14 + (300 - 269 = 0x001f)
        ([(11, b"b" * 300)], "be001f" + "62" * 300),
        # repeated Uri-Path: second occurrence has delta 0
        ([(11, b"e"), (11, b"x")], "b16501" + "78"),
        # zero-length option (If-None-Match, section 5.10.8.2)
        ([(5, b"")], "50"),
    ],
)
def test_option_header_forms(kernel: ModuleType, options: list[Any], wire: str) -> None:
    datagram = bytes.fromhex("4002abcd" + wire)
    assert kernel.encode_udp(0, 2, 0xABCD, b"", options, b"") == datagram
    assert kernel.decode_udp(datagram)[4] == options


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    ("datagram", "error", "message"),
    [
        ("400100", CoapFormatError, "datagram of 3 bytes is shorter than the 4-byte CoAP header"),
        ("80010000", UnsupportedVersionError, "CoAP version 2 is not supported"),
        ("49010000", CoapFormatError, "token length 9 is reserved (RFC 7252 3)"),
        ("4f010000", CoapFormatError, "token length 15 is reserved (RFC 7252 3)"),
        ("4800000100", CoapFormatError, "empty message (code 0.00) has 1 bytes after the header"),
        ("42010000aa", CoapFormatError, "truncated token: need 2 bytes, have 1"),
        ("40010000ff", CoapFormatError, "payload marker 0xFF is followed by an empty payload"),
        ("40010000f1", CoapFormatError, "option delta nibble 15 is reserved"),
        ("400100001f", CoapFormatError, "option length nibble 15 is reserved"),
        ("40010000d1", CoapFormatError, "extended delta needs 1 byte, have 0"),
        ("40010000e1ff", CoapFormatError, "extended delta needs 2 bytes, have 1"),
        ("400100001d", CoapFormatError, "extended length needs 1 byte, have 0"),
        ("4001000015aabb", CoapFormatError, "truncated option value: need 5 bytes, have 2"),
        # 65535 + 65804 overflows the 16-bit option number space
        ("40010000e0fef2e0ffff", CoapFormatError, "option number 131339 exceeds"),
    ],
)
def test_udp_format_errors(kernel: ModuleType, datagram: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        kernel.decode_udp(bytes.fromhex(datagram))


@pytest.mark.parametrize("kernel", KERNELS)
def test_empty_messages(kernel: ModuleType) -> None:
    assert kernel.decode_udp(bytes.fromhex("60001234")) == (2, 0, 0x1234, b"", [], b"")
    assert kernel.encode_udp(3, 0, 7, b"", [], b"") == bytes.fromhex("70000007")
    with pytest.raises(ValueError, match="empty message"):
        kernel.encode_udp(0, 0, 7, b"t", [], b"")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((4, 1, 0, b"", [], b""), "message type 4"),
        ((0, 256, 0, b"", [], b""), "code 256"),
        ((0, 1, 65536, b"", [], b""), "message id 65536"),
        ((0, 1, 0, b"123456789", [], b""), "token of 9 bytes"),
        ((0, 1, 0, b"", [(65536, b"")], b""), "option number 65536"),
        ((0, 1, 0, b"", [(11, bytes(65805))], b""), "value of 65805 bytes"),
    ],
)
def test_encode_rejects_bad_arguments(
    kernel: ModuleType, args: tuple[Any, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        kernel.encode_udp(*args)


@pytest.mark.parametrize("kernel", KERNELS)
def test_largest_option_value(kernel: ModuleType) -> None:
    value = bytes(range(256)) * 257 + bytes(12)  # 65804 bytes: 269 + 0xffff
    datagram = kernel.encode_udp(1, 2, 1, b"", [(11, value)], b"x")
    assert datagram[4:7] == bytes.fromhex("beffff")
    assert kernel.decode_udp(datagram)[4] == [(11, value)]


@pytest.mark.parametrize("kernel", KERNELS)
def test_options_sorted_stably(kernel: ModuleType) -> None:
    options = [(15, b"q1"), (11, b"a"), (2049, b"\x01"), (11, b"b"), (15, b"q2"), (1, b"m")]
    decoded = kernel.decode_udp(kernel.encode_udp(0, 2, 9, b"", options, b""))[4]
    assert decoded == [(1, b"m"), (11, b"a"), (11, b"b"), (15, b"q1"), (15, b"q2"), (2049, b"\x01")]


@pytest.mark.parametrize("kernel", KERNELS)
def test_accepts_any_bytes_like(kernel: ModuleType) -> None:
    frame = kernel.encode_udp(0, 2, 9, bytearray(b"tk"), [(11, memoryview(b"h"))], bytearray(b"p"))
    assert kernel.decode_udp(memoryview(frame)) == kernel.decode_udp(bytearray(frame))
    assert kernel.decode_udp(frame) == (0, 2, 9, b"tk", [(11, b"h")], b"p")


# --- TCP framing (RFC 8323 section 3.2) ---------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    ("body_length", "head"),
    [
        (12, "c0"),  # Len 12, no extension
        (14, "d001"),  # Len 13: 8-bit extension holds length - 13
        (268, "d0ff"),
        (269, "e00000"),  # Len 14: 16-bit extension holds length - 269
        (65804, "e0ffff"),
        (65805, "f000000000"),  # Len 15: 32-bit extension holds length - 65805
    ],
)
def test_tcp_length_forms(kernel: ModuleType, body_length: int, head: str) -> None:
    # One Uri-Path option of 11 bytes (12 on the wire) plus a payload to reach body_length.
    payload = b"" if body_length == 12 else b"p" * (body_length - 12 - 1)
    frame = kernel.encode_tcp(1, b"", [(11, b"temperature")], payload)
    assert frame.hex().startswith(head + "01bb")
    assert len(frame) == len(head) // 2 + 1 + body_length
    assert kernel.decode_tcp(frame) == (1, b"", [(11, b"temperature")], payload)


@pytest.mark.parametrize("kernel", KERNELS)
def test_tcp_vector_with_token(kernel: ModuleType) -> None:
    # Len 12 (0xbb + 11 bytes), TKL 2, code 0.02 POST, token 0xbeef, Uri-Path "temperature".
    frame = bytes.fromhex("c202beef") + b"\xbb" + b"temperature"
    assert kernel.decode_tcp(frame) == (2, b"\xbe\xef", [(11, b"temperature")], b"")
    assert kernel.encode_tcp(2, b"\xbe\xef", [(11, b"temperature")], b"") == frame
    # 7.02 Ping signal with no options: Len 0.
    assert kernel.decode_tcp(bytes.fromhex("00e2")) == (Code.PING, b"", [], b"")


@pytest.mark.parametrize("kernel", KERNELS)
def test_tcp_frame_limit_before_buffering(kernel: ModuleType) -> None:
    # Len 15 + 32-bit extension 4189: 1 + 4 + 1 (code) + 0 (token) + 65805 + 4189 = 70000.
    header = bytes.fromhex("f00000105d")
    with pytest.raises(FrameTooLargeError, match="frame of 70000 bytes exceeds the 65536-byte"):
        kernel.decode_tcp_stream(header, 65536)
    assert kernel.decode_tcp_stream(header[:4], 65536) == (None, 0)
    assert kernel.decode_tcp_stream(header, 70000) == (None, 0)
    with pytest.raises(CoapFormatError, match="token length 9 is reserved"):
        kernel.decode_tcp_stream(b"\x09", 65536)


@pytest.mark.parametrize("kernel", KERNELS)
def test_tcp_whole_frame_errors(kernel: ModuleType) -> None:
    frame = kernel.encode_tcp(2, b"t", [(11, b"h")], b"payload")
    with pytest.raises(CoapFormatError, match="followed by 1 extra bytes"):
        kernel.decode_tcp(frame + b"\x00")
    with pytest.raises(CoapFormatError, match=f"truncated frame: need {len(frame)} bytes"):
        kernel.decode_tcp(frame[:-1])
    with pytest.raises(CoapFormatError, match="truncated frame header: need 3 bytes, have 2"):
        kernel.decode_tcp(bytes.fromhex("e000"))
    with pytest.raises(CoapFormatError, match="empty buffer"):
        kernel.decode_tcp(b"")


# --- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=150, deadline=None)
@given(message=udp_tuples())
def test_udp_round_trip(kernel: ModuleType, message: tuple[Any, ...]) -> None:
    msg_type, code, message_id, token, options, payload = message
    datagram = kernel.encode_udp(*message)
    assert kernel.decode_udp(datagram) == (
        msg_type,
        code,
        message_id,
        token,
        stable_sorted(options),
        payload,
    )


@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=150, deadline=None)
@given(
    code=st.integers(0, 255),
    token=tokens,
    options=options_lists,
    payload=payloads,
    trailing=st.binary(max_size=8),
)
def test_tcp_round_trip_and_stream(
    kernel: ModuleType,
    code: int,
    token: bytes,
    options: list[tuple[int, bytes]],
    payload: bytes,
    trailing: bytes,
) -> None:
    frame = kernel.encode_tcp(code, token, options, payload)
    expected = (code, token, stable_sorted(options), payload)
    assert kernel.decode_tcp(frame) == expected
    assert kernel.decode_tcp_stream(frame + trailing, len(frame)) == (expected, len(frame))
    if len(frame) > 2:
        with pytest.raises(FrameTooLargeError):
            kernel.decode_tcp_stream(frame, len(frame) - 1)


# --- truncation at every offset -----------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_udp_truncation_at_every_offset(kernel: ModuleType) -> None:
    options = [
        (11, b"c"),
        (OptionNumber.CHUNK_INDEX, b"\x01\x02"),
        (OptionNumber.FILE_SIZE, b"x" * 300),
    ]
    datagram = kernel.encode_udp(1, 2, 0x1234, b"\x01\x02\x03\x04", options, b"chunk" * 10)
    option_ends = {}
    for count in range(len(options) + 1):
        prefix = kernel.encode_udp(1, 2, 0x1234, b"\x01\x02\x03\x04", options[:count], b"")
        option_ends[len(prefix)] = count
    for cut in range(len(datagram)):
        result = outcome(kernel.decode_udp, datagram[:cut])
        if cut in option_ends:
            # Cutting exactly after an option leaves a shorter but valid message.
            assert result == (
                "ok",
                (1, 2, 0x1234, b"\x01\x02\x03\x04", options[: option_ends[cut]], b""),
            )
        elif cut > len(datagram) - 50:
            # Cutting inside the payload keeps the message valid with a shorter payload.
            assert result[0] == "ok"
            assert result[1][5] == datagram[len(datagram) - 50 : cut]
        else:
            assert result[0] == "CoapFormatError", (cut, result)


@pytest.mark.parametrize("kernel", KERNELS)
def test_tcp_truncation_at_every_offset(kernel: ModuleType) -> None:
    frame = kernel.encode_tcp(2, b"tok", [(11, b"C"), (2049, b"\x09")], b"z" * 400)
    for cut in range(len(frame)):
        assert kernel.decode_tcp_stream(frame[:cut], 1 << 20) == (None, 0)
        with pytest.raises(CoapFormatError):
            kernel.decode_tcp(frame[:cut])
    assert kernel.decode_tcp_stream(frame, 1 << 20)[1] == len(frame)


# --- native == twin ---------------------------------------------------------------------


@needs_native
@settings(max_examples=200, deadline=None)
@given(message=udp_tuples(), tcp_code=st.integers(0, 255))
def test_native_matches_twin_on_messages(message: tuple[Any, ...], tcp_code: int) -> None:
    assert NATIVE is not None
    datagram = TWIN.encode_udp(*message)
    assert NATIVE.encode_udp(*message) == datagram
    assert NATIVE.decode_udp(datagram) == TWIN.decode_udp(datagram)
    _, _, _, token, options, payload = message
    frame = TWIN.encode_tcp(tcp_code, token, options, payload)
    assert NATIVE.encode_tcp(tcp_code, token, options, payload) == frame
    assert NATIVE.decode_tcp(frame) == TWIN.decode_tcp(frame)


def _compare_on(data: bytes, limit: int) -> None:
    assert NATIVE is not None
    assert outcome(NATIVE.decode_udp, data) == outcome(TWIN.decode_udp, data)
    assert outcome(NATIVE.decode_tcp, data) == outcome(TWIN.decode_tcp, data)
    assert outcome(NATIVE.decode_tcp_stream, data, limit) == outcome(
        TWIN.decode_tcp_stream, data, limit
    )


@needs_native
@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=64), limit=st.integers(2, 100))
def test_native_matches_twin_on_random_bytes(data: bytes, limit: int) -> None:
    _compare_on(data, limit)
    if data:
        # Force version 1 so random bytes reach the token and option parsers over UDP.
        _compare_on(bytes([0x40 | data[0] & 0x3F]) + data[1:], limit)


@needs_native
@settings(max_examples=300, deadline=None)
@given(
    message=udp_tuples(),
    edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 2000),
    limit=st.integers(2, 3000),
)
def test_native_matches_twin_on_adversarial_bytes(
    message: tuple[Any, ...], edits: list[tuple[int, int]], cut: int, limit: int
) -> None:
    # Valid encodings with a few bytes overwritten (nibbles 13/14/15, 0xFF, lengths) and cut.
    _, _, _, token, options, payload = message
    for wire in (TWIN.encode_udp(*message), TWIN.encode_tcp(message[1], token, options, payload)):
        mutated = bytearray(wire)
        for position, value in edits:
            mutated[position % len(mutated)] = value
        _compare_on(bytes(mutated), limit)
        _compare_on(bytes(mutated[: cut % (len(mutated) + 1)]), limit)


# --- public Message layer -----------------------------------------------------------------


def test_message_helpers_round_trip() -> None:
    message = Message(MessageType.CON, Code.POST, message_id=0x0102, token=b"\xaa")
    message.set_uri_path("e", "temp/outside")
    message.add_uri_query("ttl=60")
    message.set_content_format(60)
    message.set_block1(BlockOption(num=3, more=True, szx=6))
    message.set_uint_option(OptionNumber.CHUNK_INDEX, 513)
    message.payload = b"{}"
    decoded = decode_udp(encode_udp(message))
    assert decoded.type is MessageType.CON
    assert decoded.uri_path == ["e", "temp/outside"]
    assert decoded.uri_query == ["ttl=60"]
    assert decoded.content_format == 60
    assert decoded.block1 == BlockOption(num=3, more=True, szx=6)
    assert decoded.block2 is None
    assert decoded.uint_option(OptionNumber.CHUNK_INDEX) == 513
    assert decoded.first_option(OptionNumber.CHUNK_INDEX) == b"\x02\x01"
    assert decoded.is_request and not decoded.is_response and not decoded.is_empty
    over_tcp = decode_tcp(encode_tcp(message))
    assert (over_tcp.code, over_tcp.token, over_tcp.options) == (
        decoded.code,
        decoded.token,
        decoded.options,
    )


def test_uri_path_rejects_bad_utf8() -> None:
    message = Message(MessageType.NON, Code.POST, options=[(OptionNumber.URI_PATH, b"\xff")])
    with pytest.raises(CoapFormatError, match="not valid UTF-8"):
        _ = message.uri_path


@pytest.mark.parametrize(
    ("value", "wire"),
    [(0, b""), (1, b"\x01"), (255, b"\xff"), (256, b"\x01\x00"), (2**32 - 1, b"\xff" * 4)],
)
def test_uint_minimal_length(value: int, wire: bytes) -> None:
    assert encode_uint(value) == wire
    assert decode_uint(wire) == value


def test_uint_limits() -> None:
    assert decode_uint(b"\x00\x05") == 5  # leading zeros are tolerated (section 3.2 SHOULD)
    with pytest.raises(CoapFormatError, match="5 bytes, at most 4"):
        decode_uint(b"\x01" * 5)
    with pytest.raises(ValueError):
        encode_uint(-1)


@pytest.mark.parametrize(
    ("block", "wire"),
    [
        (BlockOption(0, True, 2), b"\x0a"),  # RFC 7959 figure 2: 0/1/64
        (BlockOption(2, False, 2), b"\x22"),  # 2/0/64
        (BlockOption(0, False, 0), b""),  # all zero is the empty value
        (BlockOption(1, True, 6), b"\x1e"),  # 1/1/1024
        (BlockOption(2**20 - 1, True, 6), b"\xff\xff\xfe"),
    ],
)
def test_block_values(block: BlockOption, wire: bytes) -> None:
    assert block.encode() == wire
    assert BlockOption.decode(wire) == block


def test_block_errors_and_slicing() -> None:
    with pytest.raises(CoapFormatError, match="SZX 7 is reserved"):
        BlockOption.decode(b"\x0f")
    with pytest.raises(CoapFormatError, match="4 bytes, at most 3"):
        BlockOption.decode(b"\x00\x00\x00\x10")
    with pytest.raises(ValueError):
        BlockOption(2**20, False, 0)
    body = bytes(range(200))
    assert szx_for_size(64) == 2
    assert block_slice(body, 0, 2) == (body[:64], True)
    assert block_slice(body, 3, 2) == (body[192:], False)
    assert block_slice(bytes(128), 1, 2) == (bytes(64), False)
    with pytest.raises(ValueError, match="starts past"):
        block_slice(bytes(128), 2, 2)
    assert b"".join(split_blocks(body, 2)) == body
    assert [len(b) for b in split_blocks(body, 2)] == [64, 64, 64, 8]
    assert split_blocks(b"", 0) == [b""]


def test_codes_and_criticality() -> None:
    assert make_code(2, 5) == Code.CONTENT and code_string(Code.CONTENT) == "2.05"
    assert code_string(Code.REQUEST_ENTITY_TOO_LARGE) == "4.13"
    assert is_critical(OptionNumber.URI_PATH) and not is_critical(OptionNumber.ETAG)
    assert all(is_critical(n) for n in range(OptionNumber.CHUNK_INDEX, 2078, 4))


def test_stream_reader_splits_and_limits() -> None:
    frames = [
        Message(MessageType.CON, Code.POST, token=bytes([i]), payload=bytes(i * 100))
        for i in range(1, 5)
    ]
    stream = b"".join(encode_tcp(m) for m in frames)
    reader = TcpFrameReader()
    received: list[Message] = []
    for i in range(0, len(stream), 7):
        received += reader.feed(stream[i : i + 7])
    assert [(m.token, m.payload) for m in received] == [(m.token, m.payload) for m in frames]
    assert reader.buffered == 0
    small = TcpFrameReader(max_frame_size=64)
    with pytest.raises(FrameTooLargeError):
        small.feed(encode_tcp(frames[0])[:3])
    message, consumed = decode_tcp_stream(encode_tcp(frames[1]) + b"\x00")
    assert message is not None and message.payload == bytes(200) and consumed == 205
