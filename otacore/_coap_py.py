"""Pure-Python twin of ext/coap.pyx: the CoAP message codec (same functions, same results).

Two framings share one option format (RFC 7252 section 3.1):

* UDP/DTLS (RFC 7252 section 3): ``Ver|T|TKL, Code, Message ID, Token, Options, 0xFF, Payload``.
* TCP/TLS (RFC 8323 section 3.2): ``Len|TKL, Extended Length, Code, Token, Options, 0xFF,
  Payload``; ``Len`` counts the bytes from the first option to the end of the frame.

The kernel boundary is plain tuples so the compiled twin stays fast:

* UDP message: ``(type, code, message_id, token, options, payload)``
* TCP message: ``(code, token, options, payload)``

with ``options`` a list of ``(option_number, value_bytes)`` in wire order. Encoders sort the
options by number (stable, so repeated options keep their order). Malformed input raises
:class:`CoapFormatError` with a message naming what is wrong; bad arguments to an encoder
raise ``ValueError`` (or ``TypeError`` for wrong types).

The error classes live here (not in the compiled module) so both twins raise the very same
classes; ``ext/coap.pyx`` imports them from this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import index, itemgetter

from otacore._types import Buffer
from otacore.errors import ProtocolError


class CoapFormatError(ProtocolError):
    """Bytes that are not a well-formed CoAP message (a "message format error")."""


class UnsupportedVersionError(CoapFormatError):
    """The version field is not 1; RFC 7252 section 3 says to ignore such datagrams silently."""


class FrameTooLargeError(CoapFormatError):
    """A stream frame is larger than the receiver accepts; raised as soon as its length is known."""


#: Largest option number (a 16-bit field, RFC 7252 section 5.4).
MAX_OPTION_NUMBER = 65535
#: Largest option value the 14-nibble extended form can describe: 269 + 65535.
MAX_OPTION_VALUE_LENGTH = 65804
#: Longest token (RFC 7252 section 3; lengths 9-15 are reserved).
MAX_TOKEN_LENGTH = 8

UdpTuple = tuple[int, int, int, bytes, list[tuple[int, bytes]], bytes]
TcpTuple = tuple[int, bytes, list[tuple[int, bytes]], bytes]

_first = itemgetter(0)


# --- shared option format (RFC 7252 section 3.1) -----------------------------------------


def _parse_options(data: memoryview, pos: int, end: int) -> tuple[list[tuple[int, bytes]], bytes]:
    """Options and payload of ``data[pos:end]``."""
    options: list[tuple[int, bytes]] = []
    number = 0
    while pos < end:
        byte = data[pos]
        pos += 1
        if byte == 0xFF:
            # Section 3: a marker followed by a zero-length payload is a format error.
            if pos == end:
                raise CoapFormatError(
                    "payload marker 0xFF is followed by an empty payload (RFC 7252 3)"
                )
            return options, bytes(data[pos:end])
        delta = byte >> 4
        length = byte & 0x0F
        if delta == 15:
            raise CoapFormatError("option delta nibble 15 is reserved (RFC 7252 3.1)")
        if length == 15:
            raise CoapFormatError("option length nibble 15 is reserved (RFC 7252 3.1)")
        if delta == 13:
            if end - pos < 1:
                raise CoapFormatError(
                    "truncated option header: extended delta needs 1 byte, have 0"
                )
            delta = data[pos] + 13
            pos += 1
        elif delta == 14:
            if end - pos < 2:
                raise CoapFormatError(
                    f"truncated option header: extended delta needs 2 bytes, have {end - pos}"
                )
            delta = (data[pos] << 8 | data[pos + 1]) + 269
            pos += 2
        if length == 13:
            if end - pos < 1:
                raise CoapFormatError(
                    "truncated option header: extended length needs 1 byte, have 0"
                )
            length = data[pos] + 13
            pos += 1
        elif length == 14:
            if end - pos < 2:
                raise CoapFormatError(
                    f"truncated option header: extended length needs 2 bytes, have {end - pos}"
                )
            length = (data[pos] << 8 | data[pos + 1]) + 269
            pos += 2
        number += delta
        if number > MAX_OPTION_NUMBER:
            raise CoapFormatError(f"option number {number} exceeds the 16-bit maximum 65535")
        if end - pos < length:
            raise CoapFormatError(f"truncated option value: need {length} bytes, have {end - pos}")
        options.append((number, bytes(data[pos : pos + length])))
        pos += length
    return options, b""


def _nibble(value: int) -> tuple[int, bytes]:
    """Nibble and extended bytes for an option delta or length (RFC 7252 section 3.1)."""
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    return 14, (value - 269).to_bytes(2, "big")


def _encode_options(options: Sequence[tuple[int, Buffer]]) -> bytes:
    """Options in wire format, sorted by number (stable)."""
    items = list(options)
    previous = -1
    for item in items:
        number = index(item[0])
        if number < previous:
            items.sort(key=_first)
            break
        previous = number
    out = bytearray()
    previous = 0
    for number_obj, value_obj in items:
        number = index(number_obj)
        if number < 0 or number > MAX_OPTION_NUMBER:
            raise ValueError(f"option number {number} is outside 0..65535")
        value = memoryview(value_obj).cast("B")
        if len(value) > MAX_OPTION_VALUE_LENGTH:
            raise ValueError(
                f"option {number} value of {len(value)} bytes exceeds the 65804-byte maximum"
            )
        delta_nibble, delta_ext = _nibble(number - previous)
        length_nibble, length_ext = _nibble(len(value))
        out.append(delta_nibble << 4 | length_nibble)
        out += delta_ext
        out += length_ext
        out += value
        previous = number
    return bytes(out)


def _check_token(token: Buffer) -> memoryview:
    view = memoryview(token).cast("B")
    if len(view) > MAX_TOKEN_LENGTH:
        raise ValueError(f"token of {len(view)} bytes exceeds the 8-byte maximum (RFC 7252 3)")
    return view


# --- UDP / DTLS framing (RFC 7252 section 3) -----------------------------------------------


def decode_udp(data: Buffer) -> UdpTuple:
    """Decode one datagram into ``(type, code, message_id, token, options, payload)``."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n < 4:
        raise CoapFormatError(
            f"datagram of {n} bytes is shorter than the 4-byte CoAP header (RFC 7252 3)"
        )
    first = view[0]
    version = first >> 6
    if version != 1:
        raise UnsupportedVersionError(f"CoAP version {version} is not supported (only version 1)")
    msg_type = (first >> 4) & 0x03
    tkl = first & 0x0F
    if tkl > MAX_TOKEN_LENGTH:
        raise CoapFormatError(f"token length {tkl} is reserved (RFC 7252 3)")
    code = view[1]
    message_id = view[2] << 8 | view[3]
    # Section 4.1: an Empty message (code 0.00) ends right after the Message ID.
    if code == 0 and n > 4:
        raise CoapFormatError(
            f"empty message (code 0.00) has {n - 4} bytes after the header (RFC 7252 4.1)"
        )
    if n - 4 < tkl:
        raise CoapFormatError(f"truncated token: need {tkl} bytes, have {n - 4}")
    token = bytes(view[4 : 4 + tkl])
    options, payload = _parse_options(view, 4 + tkl, n)
    return msg_type, code, message_id, token, options, payload


def encode_udp(
    msg_type: int,
    code: int,
    message_id: int,
    token: Buffer,
    options: Sequence[tuple[int, Buffer]],
    payload: Buffer,
) -> bytes:
    """Encode one datagram; options are sorted by number (stable for repeats)."""
    msg_type = index(msg_type)
    code = index(code)
    message_id = index(message_id)
    if msg_type < 0 or msg_type > 3:
        raise ValueError(f"message type {msg_type} is outside 0..3")
    if code < 0 or code > 255:
        raise ValueError(f"code {code} is outside 0..255")
    if message_id < 0 or message_id > 0xFFFF:
        raise ValueError(f"message id {message_id} is outside 0..65535")
    token_view = _check_token(token)
    body = memoryview(payload).cast("B")
    if code == 0 and (len(token_view) or len(options) or len(body)):
        raise ValueError(
            "an empty message (code 0.00) carries no token, options or payload (RFC 7252 4.1)"
        )
    parts = [
        bytes((0x40 | msg_type << 4 | len(token_view), code, message_id >> 8, message_id & 0xFF)),
        bytes(token_view),
        _encode_options(options),
    ]
    if len(body):
        parts.append(b"\xff")
        parts.append(bytes(body))
    return b"".join(parts)


# --- TCP / TLS framing (RFC 8323 section 3.2) -----------------------------------------------


def _frame_bounds(view: memoryview, n: int) -> tuple[int, int, int, int]:
    """(extended length bytes, token length, body length, frame size); frame size 0 = need more.

    Needs ``n >= 1``. The token length check happens on the first byte so a stream with a
    reserved TKL fails at once.
    """
    first = view[0]
    tkl = first & 0x0F
    if tkl > MAX_TOKEN_LENGTH:
        raise CoapFormatError(f"token length {tkl} is reserved (RFC 8323 3.2)")
    len_nibble = first >> 4
    if len_nibble < 13:
        ext = 0
    elif len_nibble == 13:
        ext = 1
    elif len_nibble == 14:
        ext = 2
    else:
        ext = 4
    if n < 1 + ext:
        return ext, tkl, 0, 0
    if ext == 0:
        body = len_nibble
    elif ext == 1:
        body = view[1] + 13
    elif ext == 2:
        body = (view[1] << 8 | view[2]) + 269
    else:
        body = (view[1] << 24 | view[2] << 16 | view[3] << 8 | view[4]) + 65805
    return ext, tkl, body, 2 + ext + tkl + body


def _decode_frame(view: memoryview, ext: int, tkl: int, frame: int) -> TcpTuple:
    code = view[1 + ext]
    token = bytes(view[2 + ext : 2 + ext + tkl])
    options, payload = _parse_options(view, 2 + ext + tkl, frame)
    return code, token, options, payload


def decode_tcp(data: Buffer) -> TcpTuple:
    """Decode exactly one frame into ``(code, token, options, payload)``."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n == 0:
        raise CoapFormatError("empty buffer: a CoAP frame needs at least 2 bytes (RFC 8323 3.2)")
    ext, tkl, _body, frame = _frame_bounds(view, n)
    if frame == 0:
        raise CoapFormatError(f"truncated frame header: need {1 + ext} bytes, have {n}")
    if n < frame:
        raise CoapFormatError(f"truncated frame: need {frame} bytes, have {n}")
    if n > frame:
        raise CoapFormatError(f"frame of {frame} bytes is followed by {n - frame} extra bytes")
    return _decode_frame(view, ext, tkl, frame)


def decode_tcp_stream(buffer: Buffer, max_frame_size: int) -> tuple[TcpTuple | None, int]:
    """Decode the first frame of a byte stream: ``(message, bytes_consumed)`` or ``(None, 0)``.

    ``(None, 0)`` means "need more bytes". A frame larger than ``max_frame_size`` raises
    :class:`FrameTooLargeError` as soon as its length field is complete.
    """
    max_frame_size = index(max_frame_size)
    if max_frame_size < 2:
        raise ValueError(f"max_frame_size must be at least 2, got {max_frame_size}")
    view = memoryview(buffer).cast("B")
    n = len(view)
    if n == 0:
        return None, 0
    ext, tkl, _body, frame = _frame_bounds(view, n)
    if frame == 0:
        return None, 0
    if frame > max_frame_size:
        raise FrameTooLargeError(f"frame of {frame} bytes exceeds the {max_frame_size}-byte limit")
    if n < frame:
        return None, 0
    return _decode_frame(view, ext, tkl, frame), frame


def encode_tcp(
    code: int, token: Buffer, options: Sequence[tuple[int, Buffer]], payload: Buffer
) -> bytes:
    """Encode one frame; options are sorted by number (stable for repeats)."""
    code = index(code)
    if code < 0 or code > 255:
        raise ValueError(f"code {code} is outside 0..255")
    token_view = _check_token(token)
    body = memoryview(payload).cast("B")
    encoded_options = _encode_options(options)
    length = len(encoded_options) + (1 + len(body) if len(body) else 0)
    if length < 13:
        head = bytes((length << 4 | len(token_view),))
    elif length < 269:
        head = bytes((13 << 4 | len(token_view), length - 13))
    elif length < 65805:
        head = bytes((14 << 4 | len(token_view),)) + (length - 269).to_bytes(2, "big")
    elif length - 65805 <= 0xFFFFFFFF:
        head = bytes((15 << 4 | len(token_view),)) + (length - 65805).to_bytes(4, "big")
    else:
        raise ValueError(f"message body of {length} bytes is too large for one frame")
    parts = [head, bytes((code,)), bytes(token_view), encoded_options]
    if len(body):
        parts.append(b"\xff")
        parts.append(bytes(body))
    return b"".join(parts)
