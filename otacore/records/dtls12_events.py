"""The DTLS 1.2 record layer's vocabulary: wire constants, content, alert and handshake
types, and the events ``DtlsRecordLayer.open_datagram`` returns (RFC 6347, RFC 5246)."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

#: DTLS 1.2 on the wire (RFC 6347 4.1: the 1's complement of 1.2).
DTLS12_VERSION: Final = 0xFEFD
#: type(1) version(2) epoch(2) sequence_number(6) length(2) (RFC 6347 4.1).
RECORD_HEADER: Final = struct.Struct(">BHQH")
RECORD_HEADER_SIZE: Final = RECORD_HEADER.size
#: TLSPlaintext.length <= 2^14 (RFC 5246 6.2.1, RFC 6347 4.1.1).
MAX_PLAINTEXT: Final = 1 << 14
#: TLSCiphertext.length <= 2^14 + 2048 (RFC 5246 6.2.3).
MAX_CIPHERTEXT: Final = MAX_PLAINTEXT + 2048
#: The sequence number is 48 bits (RFC 6347 4.1).
MAX_SEQUENCE: Final = (1 << 48) - 1
#: A DTLS handshake message header: msg_type(1) length(3) message_seq(2) fragment_offset(3)
#: fragment_length(3) (RFC 6347 4.2.2).
HANDSHAKE_HEADER_SIZE: Final = 12


class ContentType(enum.IntEnum):
    """Record content types (RFC 5246 6.2.1)."""

    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


class HandshakeType(enum.IntEnum):
    """The handshake messages this layer looks at after the handshake (RFC 5246 7.4)."""

    HELLO_REQUEST = 0
    CLIENT_HELLO = 1
    FINISHED = 20


class AlertLevel(enum.IntEnum):
    """RFC 5246 7.2."""

    WARNING = 1
    FATAL = 2


class AlertDescription(enum.IntEnum):
    """The alerts this layer sends or names (RFC 5246 7.2)."""

    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    BAD_RECORD_MAC = 20
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    DECODE_ERROR = 50
    INTERNAL_ERROR = 80
    USER_CANCELED = 90
    NO_RENEGOTIATION = 100


class DiscardReason(enum.IntEnum):
    """Why a record was dropped without reply (RFC 6347 4.1.2.7)."""

    #: Fewer bytes than a record header, or than the header's length says.
    TRUNCATED = 1
    #: Not version 0xFEFD.
    BAD_VERSION = 2
    #: Another epoch than the session's read epoch (RFC 6347 4.1), e.g. an epoch-0 part of a
    #: retransmitted handshake flight.
    WRONG_EPOCH = 3
    #: Longer than 2^14 + 2048 bytes, or more than 2^14 bytes once opened (RFC 5246 6.2).
    OVERSIZED = 4
    #: The sequence number was received before (RFC 6347 4.1.2.6).
    REPLAYED = 5
    #: Left of the 64-record replay window (RFC 6347 4.1.2.6).
    TOO_OLD = 6
    #: The AEAD rejected it: garbled, tampered, wrong key, too short (RFC 6347 4.1.2.7).
    AUTHENTICATION_FAILED = 7
    #: Authenticated, but a content or handshake type with no meaning after the handshake.
    UNEXPECTED_CONTENT = 8
    #: The session is closed; nothing more is opened.
    CLOSED = 9


@dataclass(slots=True)
class ApplicationData:
    """An authenticated application_data record's plaintext (may be empty)."""

    data: bytes


@dataclass(slots=True)
class RecordDiscarded:
    """A record (or the rest of a datagram) was dropped silently and counted."""

    reason: DiscardReason


@dataclass(frozen=True, slots=True)
class PeerAlert:
    """The peer sent a warning alert other than close_notify; the session goes on."""

    description: int


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """The session is over. ``alert``: the alert that ended it (close_notify for an orderly
    close); ``by_peer``: the peer sent it, else we did. ``reply``: a datagram to send (our
    close_notify answering the peer's, RFC 5246 7.2.1, or our fatal alert), or empty."""

    alert: int
    fatal: bool
    by_peer: bool
    reply: bytes


@dataclass(frozen=True, slots=True)
class PeerRepeatedFlight:
    """The peer retransmitted its last handshake flight (an authenticated Finished in the
    read epoch): it has not received ours (RFC 6347 4.2.4). Send ``replies`` (empty if we
    did not send the handshake's final flight, or the peer has proven it received it)."""

    replies: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class RenegotiationRefused:
    """The peer asked to renegotiate (ClientHello, or HelloRequest to a client, in the read
    epoch). ``reply`` is our warning no_renegotiation alert (RFC 5246 7.2.2); the session
    goes on, and the peer decides whether to continue or close."""

    reply: bytes


@dataclass(frozen=True, slots=True)
class NewHandshakeRequested:
    """A ClientHello in epoch 0 reached an established session's address: the device may
    have restarted and lost its state (RFC 6347 4.2.8). Give the whole datagram to the
    handshake endpoint (cookie exchange first, RFC 6347 4.2.1) and keep this session until
    the new handshake completes: the ClientHello is unauthenticated and may be a stale
    duplicate. The rest of the datagram is not opened."""


RecordEvent = (
    ApplicationData | RecordDiscarded | PeerAlert | SessionClosed | PeerRepeatedFlight
    | RenegotiationRefused | NewHandshakeRequested
)  # fmt: skip
