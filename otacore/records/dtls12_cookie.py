"""The DTLS 1.2 stateless cookie exchange (RFC 6347 section 4.2.1), sans-IO.

Before a server keeps any state for a peer, the peer must prove it receives datagrams at
its source address: the first ClientHello is answered with a HelloVerifyRequest carrying a
cookie, and only a ClientHello that echoes a valid cookie admits the peer.

The cookie is ``HMAC-SHA256(secret, address || ClientHello fixed fields)`` truncated to
:data:`COOKIE_SIZE` bytes (RFC 6347 4.2.1 suggests exactly this). The fixed fields are the
ones the client must repeat unchanged in its second ClientHello: client_version, random,
session_id, cipher_suites and compression_methods (RFC 6347 4.2.1). The secret rotates every
``rotate_after`` seconds and the previous one is still accepted, so a cookie stays valid for
one to two rotation periods. The shell owns the clock: every call takes ``now``.

:meth:`CookieExchange.examine` never raises for anything the network can send: it returns
:class:`Drop` (with a :class:`DropReason`), :class:`Challenge` (the HelloVerifyRequest to
send back) or :class:`Admit` (the parsed ClientHello with a valid cookie).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Final

from otacore.errors import ProtocolError
from otacore.records.dtls12_events import (
    DTLS12_VERSION,
    HANDSHAKE_HEADER_SIZE,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
)

__all__ = [
    "COOKIE_SIZE",
    "Admit",
    "Challenge",
    "ClientHello",
    "ClientHelloError",
    "CookieExchange",
    "Drop",
    "DropReason",
    "Verdict",
    "hello_verify_request",
    "parse_client_hello",
]

#: DTLS 1.0 on the wire: a ClientHello's record may carry it, and a HelloVerifyRequest
#: always does (RFC 6347 4.2.1: "DTLS 1.2 server implementations SHOULD use DTLS version
#: 1.0 regardless of the version of TLS that is expected to be negotiated").
DTLS10_VERSION: Final = 0xFEFF
_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_HELLO_VERIFY_REQUEST: Final = 3
#: Cookie bytes: 128 bits of HMAC, far beyond what an off-path guesser can hit.
COOKIE_SIZE: Final = 16
#: RFC 6347 4.3.2: opaque cookie<0..2^8-1>; RFC 5246 7.4.1.2: session_id<0..32>.
_MAX_SESSION_ID: Final = 32
_SECRET_SIZE: Final = 32
_HANDSHAKE_HEADER: Final = struct.Struct(">B3sH3s3s")


class ClientHelloError(ProtocolError):
    """A datagram is not a well-formed, unfragmented DTLS ClientHello; ``reason`` says why."""

    def __init__(self, reason: DropReason, detail: str) -> None:
        super().__init__(f"not a usable DTLS ClientHello ({reason.name.lower()}): {detail}")
        self.reason = reason


class DropReason(enum.IntEnum):
    """Why a datagram from an unknown peer was dropped without reply."""

    #: Shorter than a record header, or than its length field says.
    TRUNCATED = 1
    #: Not a handshake record of epoch 0 in DTLS 1.0/1.2.
    NOT_HANDSHAKE = 2
    #: A handshake record, but not a ClientHello.
    NOT_CLIENT_HELLO = 3
    #: A ClientHello fragment: reassembly would need per-peer state (RFC 6347 4.2.1 asks
    #: the ClientHello with the cookie to fit one datagram).
    FRAGMENTED = 4
    #: The ClientHello body's fields do not add up.
    MALFORMED = 5
    #: client_version is not DTLS 1.2 or 1.0 (or is higher, which we cannot be asked).
    BAD_VERSION = 6


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the cookie exchange needs of a ClientHello (RFC 6347 4.2.1 / 4.3.2)."""

    #: epoch (always 0) and sequence number of its record, as one 64-bit value.
    record_epoch_seq: int
    message_seq: int
    client_version: int
    random: bytes
    session_id: bytes
    cookie: bytes
    #: client_version, random, session_id, cipher_suites and compression_methods, each
    #: length-prefixed: the input of the cookie's HMAC.
    fixed_fields: bytes


@dataclass(frozen=True, slots=True)
class Drop:
    """Send nothing and keep nothing."""

    reason: DropReason


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``reply`` (a HelloVerifyRequest datagram) and keep nothing."""

    reply: bytes
    hello: ClientHello


@dataclass(frozen=True, slots=True)
class Admit:
    """The ClientHello carries a valid cookie: the peer receives at its address."""

    hello: ClientHello


Verdict = Drop | Challenge | Admit


def _take(body: bytes, offset: int, size: int, what: str) -> tuple[bytes, int]:
    end = offset + size
    if end > len(body):
        raise ClientHelloError(DropReason.MALFORMED, f"{what} runs past the end of the message")
    return body[offset:end], end


def parse_client_hello(datagram: bytes) -> ClientHello:
    """The ClientHello at the start of ``datagram``; ClientHelloError (with a
    :class:`DropReason`) for anything else. Only the first record is read (RFC 6347 4.1.1:
    a datagram may hold several records; the ClientHello must come first)."""
    if len(datagram) < RECORD_HEADER_SIZE:
        raise ClientHelloError(DropReason.TRUNCATED, f"{len(datagram)} bytes, no record header")
    content_type, version, epoch_seq, length = RECORD_HEADER.unpack_from(datagram)
    if content_type != _HANDSHAKE or epoch_seq >> 48 != 0:
        raise ClientHelloError(
            DropReason.NOT_HANDSHAKE, f"record type {content_type}, epoch {epoch_seq >> 48}"
        )
    if version not in (DTLS10_VERSION, DTLS12_VERSION):
        raise ClientHelloError(DropReason.NOT_HANDSHAKE, f"record version {version:#06x}")
    if RECORD_HEADER_SIZE + length > len(datagram):
        raise ClientHelloError(
            DropReason.TRUNCATED, f"record says {length} bytes, {len(datagram) - 13} follow"
        )
    if length < HANDSHAKE_HEADER_SIZE:
        raise ClientHelloError(DropReason.TRUNCATED, "no whole handshake header")
    msg_type, msg_len, message_seq, frag_offset, frag_len = _HANDSHAKE_HEADER.unpack_from(
        datagram, RECORD_HEADER_SIZE
    )
    if msg_type != _CLIENT_HELLO:
        raise ClientHelloError(DropReason.NOT_CLIENT_HELLO, f"handshake type {msg_type}")
    total = int.from_bytes(msg_len, "big")
    fragment = int.from_bytes(frag_len, "big")
    if int.from_bytes(frag_offset, "big") != 0 or fragment != total:
        raise ClientHelloError(DropReason.FRAGMENTED, "the ClientHello is fragmented")
    if HANDSHAKE_HEADER_SIZE + total > length:
        raise ClientHelloError(DropReason.TRUNCATED, "the ClientHello runs past its record")
    start = RECORD_HEADER_SIZE + HANDSHAKE_HEADER_SIZE
    body = datagram[start : start + total]
    # RFC 6347 4.2.1 (ClientHello): client_version, random[32], session_id<0..32>,
    # cookie<0..2^8-1>, cipher_suites<2..2^16-2>, compression_methods<1..2^8-1>, extensions.
    raw_version, offset = _take(body, 0, 2, "client_version")
    client_version = int.from_bytes(raw_version, "big")
    # Lower is newer in DTLS (RFC 6347 4.1): anything newer than 1.2 or older than 1.0.
    if not DTLS12_VERSION <= client_version <= DTLS10_VERSION:
        raise ClientHelloError(DropReason.BAD_VERSION, f"client_version {client_version:#06x}")
    random, offset = _take(body, offset, 32, "random")
    (session_id_size,), offset = _take(body, offset, 1, "session_id length")
    if session_id_size > _MAX_SESSION_ID:
        raise ClientHelloError(DropReason.MALFORMED, f"session_id of {session_id_size} bytes")
    session_id, offset = _take(body, offset, session_id_size, "session_id")
    (cookie_size,), offset = _take(body, offset, 1, "cookie length")
    cookie, offset = _take(body, offset, cookie_size, "cookie")
    raw_suites_size, offset = _take(body, offset, 2, "cipher_suites length")
    suites_size = int.from_bytes(raw_suites_size, "big")
    if suites_size < 2 or suites_size % 2:
        raise ClientHelloError(DropReason.MALFORMED, f"cipher_suites of {suites_size} bytes")
    suites, offset = _take(body, offset, suites_size, "cipher_suites")
    (compression_size,), offset = _take(body, offset, 1, "compression_methods length")
    if compression_size < 1:
        raise ClientHelloError(DropReason.MALFORMED, "no compression method")
    compression, offset = _take(body, offset, compression_size, "compression_methods")
    if offset != len(body):  # extensions<0..2^16-1> must fill the rest exactly
        raw_extensions_size, offset = _take(body, offset, 2, "extensions length")
        if offset + int.from_bytes(raw_extensions_size, "big") != len(body):
            raise ClientHelloError(DropReason.MALFORMED, "extensions do not fill the message")
    fixed = b"".join(
        (raw_version, random, bytes((session_id_size,)), session_id, raw_suites_size, suites,
         bytes((compression_size,)), compression)
    )  # fmt: skip
    return ClientHello(epoch_seq, message_seq, client_version, random, session_id, cookie, fixed)


def hello_verify_request(hello: ClientHello, cookie: bytes) -> bytes:
    """The HelloVerifyRequest datagram answering ``hello`` with ``cookie`` (RFC 6347 4.2.1:
    its record sequence number is the ClientHello's; message_seq 0, as OpenSSL sends)."""
    body = struct.pack(">HB", DTLS10_VERSION, len(cookie)) + cookie
    size = len(body).to_bytes(3, "big")
    message = _HANDSHAKE_HEADER.pack(_HELLO_VERIFY_REQUEST, size, 0, b"\x00\x00\x00", size) + body
    header = RECORD_HEADER.pack(_HANDSHAKE, DTLS10_VERSION, hello.record_epoch_seq, len(message))
    return header + message


def _address_bytes(address: object) -> bytes:
    """A stable encoding of a socket address (IPv4 (host, port) or IPv6 4-tuple): host and
    port only, length-prefixed so no two addresses encode alike."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = str(address[0]).encode(), str(address[1]).encode()
    else:
        host, port = repr(address).encode(), b""
    return struct.pack(">H", len(host)) + host + struct.pack(">H", len(port)) + port


class CookieExchange:
    """Issues and checks cookies under a secret that rotates every ``rotate_after`` seconds
    (the previous secret is still accepted). ``secret``: the first secret (tests); random
    otherwise."""

    __slots__ = ("_current", "_previous", "_rotates_at", "challenges", "rotate_after")

    def __init__(self, now: float, *, rotate_after: float = 30.0, secret: bytes | None = None):
        if rotate_after <= 0:
            raise ValueError(f"rotate_after must be positive, got {rotate_after}")
        self.rotate_after = rotate_after
        self._current = secret if secret is not None else os.urandom(_SECRET_SIZE)
        self._previous: bytes | None = None
        self._rotates_at = now + rotate_after
        #: HelloVerifyRequests issued so far.
        self.challenges = 0

    def _rotate(self, now: float) -> None:
        if now < self._rotates_at:
            return
        if now - self._rotates_at >= self.rotate_after:
            self._previous = None  # idle for two periods: nothing older is still valid
        else:
            self._previous = self._current
        self._current = os.urandom(_SECRET_SIZE)
        self._rotates_at = now + self.rotate_after

    @staticmethod
    def _cookie(secret: bytes, address: object, hello: ClientHello) -> bytes:
        mac = hmac.new(secret, _address_bytes(address), hashlib.sha256)
        mac.update(hello.fixed_fields)
        return mac.digest()[:COOKIE_SIZE]

    def cookie_for(self, address: object, hello: ClientHello, now: float) -> bytes:
        """The cookie ``address`` gets for ``hello`` now."""
        self._rotate(now)
        return self._cookie(self._current, address, hello)

    def is_valid(self, address: object, hello: ClientHello, now: float) -> bool:
        """True if ``hello`` echoes a cookie issued to ``address`` under the current or the
        previous secret."""
        self._rotate(now)
        if len(hello.cookie) != COOKIE_SIZE:
            return False
        valid = hmac.compare_digest(hello.cookie, self._cookie(self._current, address, hello))
        if self._previous is not None:
            valid |= hmac.compare_digest(
                hello.cookie, self._cookie(self._previous, address, hello)
            )
        return valid

    def examine(self, datagram: bytes, address: object, now: float) -> Verdict:
        """What to do with a datagram from a peer that has no state: never raises."""
        try:
            hello = parse_client_hello(datagram)
        except ClientHelloError as error:
            return Drop(error.reason)
        if self.is_valid(address, hello, now):
            return Admit(hello)
        # No cookie, or a wrong one (forged, another address's, older than two rotations):
        # answer as if there were none (RFC 6347 4.2.1), so that an honest client whose
        # cookie expired goes on with the fresh one. The reply is no larger than the hello.
        self.challenges += 1
        return Challenge(hello_verify_request(hello, self.cookie_for(address, hello, now)), hello)
