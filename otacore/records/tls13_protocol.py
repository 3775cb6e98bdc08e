"""The vocabulary of the TLS 1.3 record layer: content types, alerts, size limits and the
events :class:`~otacore.records.tls13.Tls13RecordLayer` reports (RFC 8446 5, 6)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "DEFAULT_REKEY_AFTER_RECORDS",
    "MAX_CIPHERTEXT",
    "MAX_HANDSHAKE_MESSAGE",
    "MAX_INNER_PLAINTEXT",
    "MAX_PLAINTEXT",
    "AlertDescription",
    "ApplicationData",
    "CloseNotifyReceived",
    "ContentType",
    "KeyUpdateReceived",
    "SessionTicketReceived",
    "Tls13Event",
    "alert_name",
]


class ContentType(IntEnum):
    """TLS record content types (RFC 8446 5.1)."""

    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


class AlertDescription(IntEnum):
    """The alerts this layer sends or names (RFC 8446 6)."""

    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    BAD_RECORD_MAC = 20
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    BAD_CERTIFICATE = 42
    CERTIFICATE_REVOKED = 44
    CERTIFICATE_EXPIRED = 45
    ILLEGAL_PARAMETER = 47
    UNKNOWN_CA = 48
    ACCESS_DENIED = 49
    DECODE_ERROR = 50
    DECRYPT_ERROR = 51
    PROTOCOL_VERSION = 70
    INTERNAL_ERROR = 80
    USER_CANCELED = 90
    CERTIFICATE_REQUIRED = 116
    NO_APPLICATION_PROTOCOL = 120


def alert_name(code: int) -> str:
    """An alert's RFC 8446 name (``bad_record_mac``), or ``alert N`` if unknown."""
    try:
        return AlertDescription(code).name.lower()
    except ValueError:
        return f"alert {code}"


#: RFC 8446 5.1: TLSPlaintext.length MUST NOT exceed 2^14.
MAX_PLAINTEXT = 2**14
#: RFC 8446 5.2: TLSCiphertext.length MUST NOT exceed 2^14 + 256.
MAX_CIPHERTEXT = 2**14 + 256
#: RFC 8446 5.4: the encoded TLSInnerPlaintext MUST NOT exceed 2^14 + 1 octets.
MAX_INNER_PLAINTEXT = 2**14 + 1
#: A post-handshake message longer than this is refused: a NewSessionTicket carries a
#: ticket of at most 2^16-1 bytes plus a nonce and extensions (4.6.1), a KeyUpdate 1 byte.
MAX_HANDSHAKE_MESSAGE = 2**17
#: The layer sends a KeyUpdate after this many records under one key, in either direction
#: (for the read side it asks the peer to update). RFC 8446 5.5 allows about 2^24.5
#: full-size records under one AES-GCM key; the AES-CCM analysis (RFC 9147 4.5.3) allows
#: 2^23.5. 2^23 stays below both by a margin (1.4x for CCM, 2.8x for GCM), costs one
#: 5-byte message per 8 million records (128 GiB of 16 KiB records), and with it the
#: 64-bit sequence number (5.3) can never wrap.
DEFAULT_REKEY_AFTER_RECORDS = 2**23


@dataclass(frozen=True, slots=True)
class ApplicationData:
    """Bytes of the peer's application data stream (one record's worth)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class KeyUpdateReceived:
    """The peer updated its write keys (RFC 8446 4.6.3); if it asked for ``update_requested``
    our own KeyUpdate has been queued."""

    update_requested: bool


@dataclass(frozen=True, slots=True)
class SessionTicketReceived:
    """A NewSessionTicket from the server (client side only, RFC 8446 4.6.1)."""

    message: bytes


@dataclass(frozen=True, slots=True)
class CloseNotifyReceived:
    """The peer closed the session (RFC 8446 6.1); our close_notify has been queued."""


Tls13Event = ApplicationData | KeyUpdateReceived | SessionTicketReceived | CloseNotifyReceived
