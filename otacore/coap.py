"""CoAP messages for the device protocol: typed messages over the ``coap`` codec kernel.

The codec (``ext/coap.pyx`` or its twin ``otacore/_coap_py.py``, picked by
``load_kernel("coap")``) moves plain tuples; this module wraps them in :class:`Message` and
adds option helpers: Uri-Path/Uri-Query strings, minimal-length unsigned integers (RFC 7252
section 3.2), Content-Format and Block1/Block2 (RFC 7959 section 2.2).

Framings: :func:`encode_udp`/:func:`decode_udp` for datagrams over UDP/DTLS (RFC 7252
section 3) and :func:`encode_tcp`/:func:`decode_tcp`/:func:`decode_tcp_stream`/
:class:`TcpFrameReader` for byte streams over TCP/TLS (RFC 8323 section 3.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from otacore._coap_py import CoapFormatError, FrameTooLargeError, UnsupportedVersionError
from otacore._select import load_kernel
from otacore._types import Buffer

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "BlockOption",
    "CoapFormatError",
    "Code",
    "FrameTooLargeError",
    "Message",
    "MessageType",
    "OptionNumber",
    "TcpFrameReader",
    "UnsupportedVersionError",
    "block_slice",
    "code_string",
    "decode_tcp",
    "decode_tcp_stream",
    "decode_udp",
    "decode_uint",
    "encode_tcp",
    "encode_udp",
    "encode_uint",
    "is_critical",
    "make_code",
    "split_blocks",
    "szx_for_size",
]

_kernel = load_kernel("coap")

#: True when the compiled kernel is in use.
NATIVE: bool = _kernel.__name__ == "otacore._coap"

#: Default largest TCP frame a stream reader accepts (64 KiB plus headroom for the header).
DEFAULT_MAX_FRAME_SIZE = 65536 + 1024


class MessageType(IntEnum):
    """The T field of a datagram (RFC 7252 section 3)."""

    CON = 0
    NON = 1
    ACK = 2
    RST = 3


# Indexing a tuple is much cheaper than calling the enum on every decoded datagram.
_TYPES: tuple[MessageType, ...] = tuple(MessageType)


def make_code(code_class: int, detail: int) -> int:
    """The code byte for ``class.detail`` (class 0-7, detail 0-31; RFC 7252 section 3)."""
    if not 0 <= code_class <= 7 or not 0 <= detail <= 31:
        raise ValueError(f"code {code_class}.{detail:02d} is outside 0.00..7.31")
    return code_class << 5 | detail


def code_string(code: int) -> str:
    """``"c.dd"`` form of a code byte, e.g. 0x45 -> ``"2.05"``."""
    return f"{code >> 5}.{code & 0x1F:02d}"


class Code(IntEnum):
    """Named codes: methods and responses (RFC 7252 section 12.1) and signals (RFC 8323 5)."""

    EMPTY = 0x00
    GET = 0x01
    POST = 0x02
    PUT = 0x03
    DELETE = 0x04
    CREATED = 0x41  # 2.01
    DELETED = 0x42  # 2.02
    VALID = 0x43  # 2.03
    CHANGED = 0x44  # 2.04
    CONTENT = 0x45  # 2.05
    CONTINUE = 0x5F  # 2.31 (RFC 7959)
    BAD_REQUEST = 0x80  # 4.00
    UNAUTHORIZED = 0x81  # 4.01
    BAD_OPTION = 0x82  # 4.02
    FORBIDDEN = 0x83  # 4.03
    NOT_FOUND = 0x84  # 4.04
    METHOD_NOT_ALLOWED = 0x85  # 4.05
    NOT_ACCEPTABLE = 0x86  # 4.06
    REQUEST_ENTITY_INCOMPLETE = 0x88  # 4.08 (RFC 7959)
    PRECONDITION_FAILED = 0x8C  # 4.12
    REQUEST_ENTITY_TOO_LARGE = 0x8D  # 4.13
    UNSUPPORTED_CONTENT_FORMAT = 0x8F  # 4.15
    INTERNAL_SERVER_ERROR = 0xA0  # 5.00
    NOT_IMPLEMENTED = 0xA1  # 5.01
    BAD_GATEWAY = 0xA2  # 5.02
    SERVICE_UNAVAILABLE = 0xA3  # 5.03
    GATEWAY_TIMEOUT = 0xA4  # 5.04
    PROXYING_NOT_SUPPORTED = 0xA5  # 5.05
    CSM = 0xE1  # 7.01, signals exist only over reliable transports (RFC 8323 5)
    PING = 0xE2  # 7.02
    PONG = 0xE3  # 7.03
    RELEASE = 0xE4  # 7.04
    ABORT = 0xE5  # 7.05


class OptionNumber(IntEnum):
    """Option numbers: RFC 7252 section 12.2, RFC 7641, RFC 7959 and the v3 firmware update."""

    IF_MATCH = 1
    URI_HOST = 3
    ETAG = 4
    IF_NONE_MATCH = 5
    OBSERVE = 6
    URI_PORT = 7
    LOCATION_PATH = 8
    URI_PATH = 11
    CONTENT_FORMAT = 12
    MAX_AGE = 14
    URI_QUERY = 15
    ACCEPT = 17
    LOCATION_QUERY = 20
    BLOCK2 = 23
    BLOCK1 = 27
    SIZE2 = 28
    PROXY_URI = 35
    PROXY_SCHEME = 39
    SIZE1 = 60
    # Device OS firmware_update.cpp (v3 update protocol); all are odd, i.e. critical.
    CHUNK_INDEX = 2049
    WINDOW_SIZE = 2053
    FILE_SIZE = 2057
    FILE_SHA256 = 2061
    CHUNK_SIZE = 2065
    DISCARD_DATA = 2069
    CANCEL_UPDATE = 2073
    MODULE_FUNCTION = 2077


def is_critical(option_number: int) -> bool:
    """True for critical options (odd numbers, RFC 7252 section 5.4.6)."""
    return bool(option_number & 1)


# --- option values (RFC 7252 section 3.2) ------------------------------------------------


def encode_uint(value: int) -> bytes:
    """Minimal-length big-endian unsigned integer (0 encodes as zero bytes; section 3.2)."""
    if value < 0 or value > 0xFFFF_FFFF_FFFF_FFFF:
        raise ValueError(f"uint option value {value} is outside 0..2**64-1")
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def decode_uint(value: bytes, *, max_length: int = 4, name: str = "uint option") -> int:
    """Unsigned integer from an option value of at most ``max_length`` bytes.

    Leading zero bytes are accepted: section 3.2 only says senders SHOULD be minimal.
    """
    if len(value) > max_length:
        raise CoapFormatError(f"{name} value has {len(value)} bytes, at most {max_length} allowed")
    return int.from_bytes(value, "big")


# --- block-wise transfer (RFC 7959 section 2.2) ------------------------------------------

#: Largest block number: NUM is at most 20 bits in a 3-byte option value.
MAX_BLOCK_NUM = (1 << 20) - 1


@dataclass(frozen=True, slots=True)
class BlockOption:
    """A Block1/Block2 value: block number, more flag and size exponent (size = 2**(szx+4))."""

    num: int
    more: bool
    szx: int

    def __post_init__(self) -> None:
        if not 0 <= self.szx <= 6:
            raise ValueError(f"block SZX {self.szx} is outside 0..6 (7 is reserved, RFC 7959 2.2)")
        if not 0 <= self.num <= MAX_BLOCK_NUM:
            raise ValueError(f"block number {self.num} is outside 0..{MAX_BLOCK_NUM}")

    @property
    def size(self) -> int:
        """Block size in bytes (16..1024)."""
        return 1 << (self.szx + 4)

    @property
    def offset(self) -> int:
        """Byte offset of this block in the body."""
        return self.num << (self.szx + 4)

    def encode(self) -> bytes:
        """Option value: NUM << 4 | M << 3 | SZX, minimal length."""
        return encode_uint(self.num << 4 | int(self.more) << 3 | self.szx)

    @classmethod
    def decode(cls, value: bytes) -> BlockOption:
        """Parse an option value of 0-3 bytes; SZX 7 (reserved) raises CoapFormatError."""
        raw = decode_uint(value, max_length=3, name="block option")
        szx = raw & 0x07
        if szx == 7:
            raise CoapFormatError("block SZX 7 is reserved (RFC 7959 2.2); BERT is not supported")
        return cls(num=raw >> 4, more=bool(raw & 0x08), szx=szx)


def szx_for_size(size: int) -> int:
    """SZX for a block size of 16, 32, ..., 1024 bytes."""
    if size not in (16, 32, 64, 128, 256, 512, 1024):
        raise ValueError(f"block size {size} is not a power of two in 16..1024")
    return size.bit_length() - 5


def block_slice(body: Buffer, num: int, szx: int) -> tuple[bytes, bool]:
    """Block ``num`` of ``body`` at size exponent ``szx`` and whether more blocks follow."""
    block = BlockOption(num=num, more=False, szx=szx)
    view = memoryview(body).cast("B")
    start = block.offset
    if start > len(view) or (start == len(view) and start != 0):
        raise ValueError(f"block {num} of size {block.size} starts past the {len(view)}-byte body")
    end = start + block.size
    return bytes(view[start:end]), end < len(view)


def split_blocks(body: Buffer, szx: int) -> list[bytes]:
    """All blocks of ``body`` at size exponent ``szx`` (an empty body gives one empty block)."""
    size = BlockOption(num=0, more=False, szx=szx).size
    view = memoryview(body).cast("B")
    if len(view) == 0:
        return [b""]
    return [bytes(view[i : i + size]) for i in range(0, len(view), size)]


# --- messages --------------------------------------------------------------------------


@dataclass(slots=True)
class Message:
    """One CoAP message. ``type`` and ``message_id`` only exist on UDP; TCP ignores them."""

    type: MessageType
    code: int
    message_id: int = 0
    token: bytes = b""
    options: list[tuple[int, bytes]] = field(default_factory=list)
    payload: bytes = b""

    # -- code ------------------------------------------------------------------------------

    @property
    def is_empty(self) -> bool:
        """Code 0.00 (an ACK, RST or CoAP ping with nothing else in it)."""
        return self.code == 0

    @property
    def is_request(self) -> bool:
        """Code class 0 with a method (0.01-0.31)."""
        return 1 <= self.code <= 31

    @property
    def is_response(self) -> bool:
        """Code class 2, 4 or 5."""
        return (self.code >> 5) in (2, 4, 5)

    # -- generic options --------------------------------------------------------------------

    def option_values(self, number: int) -> list[bytes]:
        """Values of every occurrence of option ``number``, in message order."""
        return [value for num, value in self.options if num == number]

    def first_option(self, number: int) -> bytes | None:
        """Value of the first occurrence of option ``number``, or None."""
        for num, value in self.options:
            if num == number:
                return value
        return None

    def has_option(self, number: int) -> bool:
        """True when option ``number`` occurs at least once."""
        return any(num == number for num, _ in self.options)

    def add_option(self, number: int, value: bytes) -> None:
        """Append one occurrence (encoders sort by number, keeping repeats in order)."""
        self.options.append((number, value))

    def remove_option(self, number: int) -> None:
        """Drop every occurrence of option ``number``."""
        self.options = [(num, value) for num, value in self.options if num != number]

    def set_option(self, number: int, value: bytes) -> None:
        """Replace every occurrence of option ``number`` by one with ``value``."""
        self.remove_option(number)
        self.options.append((number, value))

    def uint_option(self, number: int, *, max_length: int = 4) -> int | None:
        """First occurrence of a uint option decoded, or None when absent."""
        value = self.first_option(number)
        if value is None:
            return None
        return decode_uint(value, max_length=max_length, name=f"option {number}")

    def set_uint_option(self, number: int, value: int) -> None:
        """Set a uint option to ``value`` in minimal-length form."""
        self.set_option(number, encode_uint(value))

    # -- URI options (RFC 7252 section 5.10.1, 6.5) ----------------------------------------

    def _strings(self, number: int, name: str) -> list[str]:
        out = []
        for value in self.option_values(number):
            if len(value) > 255:
                raise CoapFormatError(f"{name} segment of {len(value)} bytes exceeds 255 bytes")
            try:
                out.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                raise CoapFormatError(f"{name} segment {value!r} is not valid UTF-8") from None
        return out

    @property
    def uri_path(self) -> list[str]:
        """Uri-Path segments; e.g. ``["e", "temp"]`` for ``/e/temp``."""
        return self._strings(OptionNumber.URI_PATH, "Uri-Path")

    def set_uri_path(self, *segments: str) -> None:
        """Replace the Uri-Path with these segments (each one option, section 6.5 step 8)."""
        self.remove_option(OptionNumber.URI_PATH)
        for segment in segments:
            encoded = segment.encode("utf-8")
            if len(encoded) > 255:
                raise ValueError(f"Uri-Path segment of {len(encoded)} bytes exceeds 255 bytes")
            self.options.append((OptionNumber.URI_PATH, encoded))

    @property
    def uri_query(self) -> list[str]:
        """Uri-Query arguments, e.g. ``["a=1", "b"]``."""
        return self._strings(OptionNumber.URI_QUERY, "Uri-Query")

    def add_uri_query(self, argument: str) -> None:
        """Append one Uri-Query argument."""
        encoded = argument.encode("utf-8")
        if len(encoded) > 255:
            raise ValueError(f"Uri-Query argument of {len(encoded)} bytes exceeds 255 bytes")
        self.options.append((OptionNumber.URI_QUERY, encoded))

    # -- typed options ----------------------------------------------------------------------

    @property
    def content_format(self) -> int | None:
        """Content-Format (a 0-2 byte uint, section 5.10.3), or None."""
        return self.uint_option(OptionNumber.CONTENT_FORMAT, max_length=2)

    def set_content_format(self, value: int) -> None:
        """Set the Content-Format (0..65535)."""
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"Content-Format {value} is outside 0..65535")
        self.set_uint_option(OptionNumber.CONTENT_FORMAT, value)

    @property
    def block1(self) -> BlockOption | None:
        """Block1 (request body block, RFC 7959 2.2), or None."""
        value = self.first_option(OptionNumber.BLOCK1)
        return None if value is None else BlockOption.decode(value)

    def set_block1(self, block: BlockOption) -> None:
        """Set the Block1 option."""
        self.set_option(OptionNumber.BLOCK1, block.encode())

    @property
    def block2(self) -> BlockOption | None:
        """Block2 (response body block, RFC 7959 2.2), or None."""
        value = self.first_option(OptionNumber.BLOCK2)
        return None if value is None else BlockOption.decode(value)

    def set_block2(self, block: BlockOption) -> None:
        """Set the Block2 option."""
        self.set_option(OptionNumber.BLOCK2, block.encode())


# --- framings ---------------------------------------------------------------------------


def encode_udp(message: Message) -> bytes:
    """Datagram bytes for ``message`` (RFC 7252 section 3)."""
    return bytes(
        _kernel.encode_udp(
            int(message.type),
            message.code,
            message.message_id,
            message.token,
            message.options,
            message.payload,
        )
    )


def decode_udp(datagram: Buffer) -> Message:
    """Parse one datagram; raises CoapFormatError (UnsupportedVersionError for version != 1)."""
    msg_type, code, message_id, token, options, payload = _kernel.decode_udp(datagram)
    return Message(_TYPES[msg_type], code, message_id, token, options, payload)


def encode_tcp(message: Message) -> bytes:
    """Frame bytes for ``message`` (RFC 8323 section 3.2); type and message id are dropped."""
    return bytes(_kernel.encode_tcp(message.code, message.token, message.options, message.payload))


def decode_tcp(frame: Buffer) -> Message:
    """Parse exactly one frame (no trailing bytes) into a Message (type CON, message id 0)."""
    code, token, options, payload = _kernel.decode_tcp(frame)
    return Message(MessageType.CON, code, 0, token, options, payload)


def decode_tcp_stream(
    buffer: Buffer, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> tuple[Message | None, int]:
    """First frame in ``buffer``: ``(message, bytes_consumed)``, or ``(None, 0)`` for "need more".

    Raises FrameTooLargeError as soon as the length field shows a frame over
    ``max_frame_size``, before its bytes arrive.
    """
    decoded, consumed = _kernel.decode_tcp_stream(buffer, max_frame_size)
    if decoded is None:
        return None, 0
    code, token, options, payload = decoded
    return Message(MessageType.CON, code, 0, token, options, payload), int(consumed)


class TcpFrameReader:
    """Sans-IO splitter of a TCP/TLS byte stream into messages (RFC 8323 section 3.2)."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole frame."""
        return len(self._buffer)

    def feed(self, data: Buffer) -> list[Message]:
        """Add received bytes; return every message they complete, in order.

        Raises CoapFormatError (FrameTooLargeError for an oversized frame): the stream cannot
        be resynchronised after that, so the connection should be closed (RFC 8323 5.6 Abort).
        """
        self._buffer += data
        messages: list[Message] = []
        offset = 0
        with memoryview(self._buffer) as view:
            while True:
                message, consumed = decode_tcp_stream(view[offset:], self.max_frame_size)
                if message is None:
                    break
                messages.append(message)
                offset += consumed
        if offset:
            del self._buffer[:offset]
        return messages
